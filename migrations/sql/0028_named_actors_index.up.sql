-- A named actor is looked up by any node of the cluster, not only by the node whose
-- driver made it (`ray.get_actor` in a task placed elsewhere, a driver on another
-- machine): a node that does not hold the name asks the log (controlplane/sql/
-- queries.sql, named_actor). The partial index holds only the creations of named
-- actors, so the other appends pay only its predicate. It is keyed by the name's md5:
-- a name may be longer than a btree entry can be (8 kB), and a failed index entry
-- would fail the whole append.
CREATE INDEX events_actor_names_idx ON events (md5(payload ->> 'name'))
    WHERE entity_kind = 'actor' AND event_type = 'creation_requested' AND payload ? 'name';
