-- Sources (see the SQLite migration 0004_sources.sql).
ALTER TABLE units ADD COLUMN source TEXT NOT NULL DEFAULT '';

CREATE TABLE source_operations (
    id           TEXT PRIMARY KEY,
    source       TEXT NOT NULL,
    unit         TEXT NOT NULL,
    action       TEXT NOT NULL,
    state        TEXT NOT NULL,
    hub_revision BIGINT NOT NULL DEFAULT 0,
    report       TEXT NOT NULL DEFAULT '',
    delivered    BIGINT NOT NULL DEFAULT 0,
    detail       TEXT NOT NULL DEFAULT '{}',
    created_at   BIGINT NOT NULL,
    updated_at   BIGINT NOT NULL
);
CREATE INDEX source_operations_open ON source_operations(source, delivered);

CREATE TABLE oci_sources (
    name           TEXT PRIMARY KEY,
    environment    TEXT NOT NULL,
    spec           TEXT NOT NULL,
    credentials    TEXT NOT NULL DEFAULT '{}',
    suspended      BIGINT NOT NULL DEFAULT 0,
    status         TEXT NOT NULL DEFAULT '{}',
    sync_requested BIGINT NOT NULL DEFAULT 0,
    allow_prune    BIGINT NOT NULL DEFAULT 0,
    attempt_at     BIGINT NOT NULL DEFAULT 0,
    created_at     BIGINT NOT NULL,
    updated_at     BIGINT NOT NULL
);

CREATE TABLE hub_state (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
