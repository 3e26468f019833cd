-- A named actor is the cluster's: a node claims a name in the log (`name_reserved`)
-- and looks a name it does not hold up there (controlplane/sql/queries.sql,
-- named_actor), whichever node's driver made the actor. The partial index holds only
-- the claims and the named actors' creations, so other appends pay only its
-- predicate. It is keyed by the name's md5: a name may be longer than a btree entry can
-- be (8 kB), and a failed index entry would fail the whole append.
CREATE INDEX events_actor_names_idx ON events (md5(payload ->> 'name'))
    WHERE entity_kind = 'actor' AND event_type IN ('creation_requested', 'name_reserved')
      AND payload ? 'name';
