-- unitsync hub schema, version 1.
CREATE TABLE environments (
    name        TEXT PRIMARY KEY,
    position    INTEGER NOT NULL,
    created_at  INTEGER NOT NULL
);

CREATE TABLE clusters (
    name        TEXT PRIMARY KEY,
    environment TEXT NOT NULL REFERENCES environments(name),
    labels      TEXT NOT NULL,
    token_hash  TEXT NOT NULL UNIQUE,
    created_at  INTEGER NOT NULL
);

CREATE TABLE operators (
    name        TEXT PRIMARY KEY,
    role        TEXT NOT NULL,
    token_hash  TEXT NOT NULL UNIQUE,
    created_at  INTEGER NOT NULL
);

CREATE TABLE units (
    id          INTEGER PRIMARY KEY,
    environment TEXT NOT NULL REFERENCES environments(name),
    name        TEXT NOT NULL,
    labels      TEXT NOT NULL,
    head        INTEGER NOT NULL,
    destroyed   INTEGER NOT NULL,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    UNIQUE (environment, name)
);

-- Immutable: rows are only ever inserted.
CREATE TABLE revisions (
    unit_id     INTEGER NOT NULL REFERENCES units(id),
    number      INTEGER NOT NULL,
    digest      TEXT NOT NULL,
    tombstone   INTEGER NOT NULL,
    manifests   TEXT NOT NULL,
    documents   INTEGER NOT NULL,
    author      TEXT NOT NULL,
    message     TEXT NOT NULL,
    origin      TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    PRIMARY KEY (unit_id, number)
);

CREATE TABLE unit_status (
    cluster     TEXT NOT NULL REFERENCES clusters(name) ON DELETE CASCADE,
    unit_id     INTEGER NOT NULL REFERENCES units(id),
    acked       INTEGER NOT NULL DEFAULT 0,
    revision    INTEGER NOT NULL DEFAULT 0,
    phase       TEXT NOT NULL DEFAULT 'Unknown',
    message     TEXT NOT NULL DEFAULT '',
    resources   TEXT NOT NULL DEFAULT '[]',
    updated_at  INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (cluster, unit_id)
);

CREATE TABLE audit (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    time        INTEGER NOT NULL,
    actor       TEXT NOT NULL,
    action      TEXT NOT NULL,
    target      TEXT NOT NULL,
    detail      TEXT NOT NULL
);
CREATE INDEX audit_target ON audit(target);
