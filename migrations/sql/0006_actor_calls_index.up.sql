-- The `submitted` events of one actor's method calls, fast: an actor restarted with
-- replay_calls_on_restart re-runs them from the log (and audits ask for them). Partial:
-- only method calls' submitted events are indexed, so other appends pay nothing.
CREATE INDEX events_actor_calls_idx ON events ((payload->>'actor_id'))
 WHERE event_type = 'submitted' AND payload ? 'actor_id';
