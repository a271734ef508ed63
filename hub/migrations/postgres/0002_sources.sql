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
