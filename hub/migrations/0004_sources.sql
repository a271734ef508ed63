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
