-- When each cluster's agent was last heard from, and with which version
-- (written when a session opens and closes).
ALTER TABLE clusters ADD COLUMN last_seen BIGINT NOT NULL DEFAULT 0;
ALTER TABLE clusters ADD COLUMN agent_version TEXT NOT NULL DEFAULT '';
