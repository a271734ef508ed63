-- Sources: the owner of a unit (empty: the hub's own), and the durable
-- record of operations a source asked for (ConfigHub queued operations),
-- so each gets exactly one terminal report across restarts.
ALTER TABLE units ADD COLUMN source TEXT NOT NULL DEFAULT '';

CREATE TABLE source_operations (
    id           TEXT PRIMARY KEY,
    source       TEXT NOT NULL,
    unit         TEXT NOT NULL,
    action       TEXT NOT NULL,
    state        TEXT NOT NULL,
    hub_revision INTEGER NOT NULL DEFAULT 0,
    report       TEXT NOT NULL DEFAULT '',
    delivered    INTEGER NOT NULL DEFAULT 0,
    detail       TEXT NOT NULL DEFAULT '{}',
    created_at   INTEGER NOT NULL,
    updated_at   INTEGER NOT NULL
);
CREATE INDEX source_operations_open ON source_operations(source, delivered);

-- OCI sources: what to follow (spec, JSON), the registry credentials
-- (JSON, never returned by any read), what the last sync found (JSON).
CREATE TABLE oci_sources (
    name           TEXT PRIMARY KEY,
    environment    TEXT NOT NULL,
    spec           TEXT NOT NULL,
    credentials    TEXT NOT NULL DEFAULT '{}',
    suspended      INTEGER NOT NULL DEFAULT 0,
    status         TEXT NOT NULL DEFAULT '{}',
    sync_requested INTEGER NOT NULL DEFAULT 0,
    allow_prune    INTEGER NOT NULL DEFAULT 0,
    attempt_at     INTEGER NOT NULL DEFAULT 0,
    created_at     INTEGER NOT NULL,
    updated_at     INTEGER NOT NULL
);

-- Small durable facts of the hub (the ConfigHub event cursor, ...).
CREATE TABLE hub_state (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
