-- A reader that folds the log (the global schedulers) saves its folded state here now
-- and then, with the position it covers; restarted, it loads the state and reads only
-- the events after that position, so its restart time does not grow with the history.
-- A cache, never the truth: without its row a reader folds the log from the start.
CREATE TABLE checkpoints (
    name      text PRIMARY KEY,
    position  bigint NOT NULL,
    state     bytea NOT NULL,
    saved_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);
