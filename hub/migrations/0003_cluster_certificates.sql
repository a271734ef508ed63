-- Client certificates (mutual TLS) and revocation of cluster credentials.
ALTER TABLE clusters ADD COLUMN revoked INTEGER NOT NULL DEFAULT 0;

CREATE TABLE cluster_certs (
    fingerprint TEXT PRIMARY KEY,
    cluster     TEXT NOT NULL REFERENCES clusters(name) ON DELETE CASCADE,
    not_after   INTEGER NOT NULL,
    created_at  INTEGER NOT NULL
);
