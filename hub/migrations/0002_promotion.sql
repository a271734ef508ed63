-- Promotion: environment policies, upstream links and overrides,
-- the source of promoted revisions, approvals, promotions, soak tracking.
ALTER TABLE environments ADD COLUMN required_approvals INTEGER NOT NULL DEFAULT 0;
ALTER TABLE environments ADD COLUMN soak_seconds INTEGER NOT NULL DEFAULT 0;
ALTER TABLE environments ADD COLUMN auto_promote INTEGER NOT NULL DEFAULT 0;

ALTER TABLE units ADD COLUMN upstream TEXT;
ALTER TABLE units ADD COLUMN overrides TEXT NOT NULL DEFAULT '[]';

ALTER TABLE revisions ADD COLUMN source_revision INTEGER NOT NULL DEFAULT 0;

ALTER TABLE unit_status ADD COLUMN ready_since INTEGER NOT NULL DEFAULT 0;

CREATE TABLE approvals (
    target_env  TEXT NOT NULL,
    unit_id     INTEGER NOT NULL REFERENCES units(id),
    revision    INTEGER NOT NULL,
    approver    TEXT NOT NULL,
    time        INTEGER NOT NULL,
    PRIMARY KEY (target_env, unit_id, revision, approver)
);

CREATE TABLE promotions (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    time        INTEGER NOT NULL,
    actor       TEXT NOT NULL,
    from_env    TEXT NOT NULL,
    to_env      TEXT NOT NULL,
    automatic   INTEGER NOT NULL,
    forced      INTEGER NOT NULL,
    reason      TEXT NOT NULL,
    items       TEXT NOT NULL
);
