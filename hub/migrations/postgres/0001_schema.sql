-- unitsync hub schema for PostgreSQL (the same model as the SQLite
-- migrations 0001-0003; integers are BIGINT, flags 0/1).
CREATE TABLE environments (
    name               TEXT PRIMARY KEY,
    position           BIGINT NOT NULL,
    created_at         BIGINT NOT NULL,
    required_approvals BIGINT NOT NULL DEFAULT 0,
    soak_seconds       BIGINT NOT NULL DEFAULT 0,
    auto_promote       BIGINT NOT NULL DEFAULT 0
);

CREATE TABLE clusters (
    name        TEXT PRIMARY KEY,
    environment TEXT NOT NULL REFERENCES environments(name),
    labels      TEXT NOT NULL,
    token_hash  TEXT NOT NULL UNIQUE,
    created_at  BIGINT NOT NULL,
    revoked     BIGINT NOT NULL DEFAULT 0
);

CREATE TABLE operators (
    name        TEXT PRIMARY KEY,
    role        TEXT NOT NULL,
    token_hash  TEXT NOT NULL UNIQUE,
    created_at  BIGINT NOT NULL
);

CREATE TABLE units (
    id          BIGSERIAL PRIMARY KEY,
    environment TEXT NOT NULL REFERENCES environments(name),
    name        TEXT NOT NULL,
    labels      TEXT NOT NULL,
    head        BIGINT NOT NULL,
    destroyed   BIGINT NOT NULL,
    created_at  BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL,
    upstream    TEXT,
    overrides   TEXT NOT NULL DEFAULT '[]',
    UNIQUE (environment, name)
);

CREATE TABLE revisions (
    unit_id         BIGINT NOT NULL REFERENCES units(id),
    number          BIGINT NOT NULL,
    digest          TEXT NOT NULL,
    tombstone       BIGINT NOT NULL,
    manifests       TEXT NOT NULL,
    documents       BIGINT NOT NULL,
    author          TEXT NOT NULL,
    message         TEXT NOT NULL,
    origin          TEXT NOT NULL,
    created_at      BIGINT NOT NULL,
    source_revision BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (unit_id, number)
);

CREATE TABLE unit_status (
    cluster     TEXT NOT NULL REFERENCES clusters(name) ON DELETE CASCADE,
    unit_id     BIGINT NOT NULL REFERENCES units(id),
    acked       BIGINT NOT NULL DEFAULT 0,
    revision    BIGINT NOT NULL DEFAULT 0,
    phase       TEXT NOT NULL DEFAULT 'Unknown',
    message     TEXT NOT NULL DEFAULT '',
    resources   TEXT NOT NULL DEFAULT '[]',
    updated_at  BIGINT NOT NULL DEFAULT 0,
    ready_since BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (cluster, unit_id)
);

CREATE TABLE audit (
    id          BIGSERIAL PRIMARY KEY,
    time        BIGINT NOT NULL,
    actor       TEXT NOT NULL,
    action      TEXT NOT NULL,
    target      TEXT NOT NULL,
    detail      TEXT NOT NULL
);
CREATE INDEX audit_target ON audit(target);

CREATE TABLE approvals (
    target_env  TEXT NOT NULL,
    unit_id     BIGINT NOT NULL REFERENCES units(id),
    revision    BIGINT NOT NULL,
    approver    TEXT NOT NULL,
    time        BIGINT NOT NULL,
    PRIMARY KEY (target_env, unit_id, revision, approver)
);

CREATE TABLE promotions (
    id          BIGSERIAL PRIMARY KEY,
    time        BIGINT NOT NULL,
    actor       TEXT NOT NULL,
    from_env    TEXT NOT NULL,
    to_env      TEXT NOT NULL,
    automatic   BIGINT NOT NULL,
    forced      BIGINT NOT NULL,
    reason      TEXT NOT NULL,
    items       TEXT NOT NULL
);

CREATE TABLE cluster_certs (
    fingerprint TEXT PRIMARY KEY,
    cluster     TEXT NOT NULL REFERENCES clusters(name) ON DELETE CASCADE,
    not_after   BIGINT NOT NULL,
    created_at  BIGINT NOT NULL
);
