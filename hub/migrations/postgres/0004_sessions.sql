-- Agent sessions open on the hub replicas sharing the store, so that every
-- replica knows whether a cluster's agent is connected (to it or to
-- another). A replica renews its lease while it runs and ends it when it
-- stops; the sessions of a replica whose lease ran out (it crashed) count
-- as closed. Written by replicas on a shared store only.
CREATE TABLE replica_leases (
    replica TEXT PRIMARY KEY,
    expires_at BIGINT NOT NULL
);
CREATE TABLE agent_sessions (
    replica TEXT NOT NULL,
    cluster TEXT NOT NULL,
    agent_version TEXT NOT NULL,
    connected_at BIGINT NOT NULL,
    PRIMARY KEY (replica, cluster)
);
