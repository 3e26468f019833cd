-- Current-state projections: tables kept by the projector (controlplane/projections),
-- which folds the log and records its position in `subscriptions` in the same
-- transaction. Each row says the position of the last event folded into it.

CREATE TABLE jobs (
    job_id          text PRIMARY KEY,
    state           text NOT NULL,
    entrypoint      text,
    driver_node_id  text,
    namespace       text,
    submitted_at    timestamptz,
    started_at      timestamptz,
    ended_at        timestamptz,
    error           text,
    last_position   bigint NOT NULL,
    updated_at      timestamptz NOT NULL
);

CREATE TABLE tasks (
    task_id        text PRIMARY KEY,
    job_id         text,
    name           text,
    state          text NOT NULL,
    node_id        text,
    worker_id      text,
    attempt        integer NOT NULL DEFAULT 0,
    submitted_at   timestamptz,
    scheduled_at   timestamptz,
    started_at     timestamptz,
    ended_at       timestamptz,
    error          text,
    last_position  bigint NOT NULL,
    updated_at     timestamptz NOT NULL
);
CREATE INDEX tasks_state_idx ON tasks (state);
CREATE INDEX tasks_job_idx ON tasks (job_id);

CREATE TABLE objects (
    object_id      text PRIMARY KEY,
    job_id         text,
    state          text NOT NULL,
    size_bytes     bigint,
    node_id        text,
    task_id        text,
    created_at     timestamptz,
    freed_at       timestamptz,
    last_position  bigint NOT NULL,
    updated_at     timestamptz NOT NULL
);
CREATE INDEX objects_state_idx ON objects (state);

CREATE TABLE actors (
    actor_id       text PRIMARY KEY,
    job_id         text,
    name           text,
    namespace      text,
    class_name     text,
    state          text NOT NULL,
    node_id        text,
    worker_id      text,
    num_restarts   integer NOT NULL DEFAULT 0,
    death_cause    text,
    created_at     timestamptz,
    ended_at       timestamptz,
    last_position  bigint NOT NULL,
    updated_at     timestamptz NOT NULL
);
CREATE INDEX actors_state_idx ON actors (state);

CREATE TABLE nodes (
    node_id            text PRIMARY KEY,
    state              text NOT NULL,
    address            text,
    resources          jsonb,
    registered_at      timestamptz,
    last_heartbeat_at  timestamptz,
    dead_at            timestamptz,
    death_cause        text,
    last_position      bigint NOT NULL,
    updated_at         timestamptz NOT NULL
);
