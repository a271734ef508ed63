//! [`SqlStore`]: the one implementation of [`Store`], for SQLite (one file
//! in the data directory) and PostgreSQL (shared by hub replicas), written
//! once against sqlx's `Any` driver with `$N` placeholders (both databases
//! accept them). What differs lives in [`backend`](super::backend).
//!
//! Writes go through the writer pool (one connection on SQLite; on
//! PostgreSQL a few, serialized per unit by advisory and row locks, and
//! re-established after the server restarts). On PostgreSQL every commit is
//! announced with `NOTIFY`, and [`Store::subscribe`] follows the
//! announcements, reconnecting and asking for a resync when it may have
//! missed some.

use std::path::Path;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::{AnyConnection, AnyPool};

use super::backend::{self, Backend, CHANNEL, LEADER_LOCK};
use super::commit::Committer;
use super::rows::{self, ENV_COLUMNS, corrupt, db, int, is_unique_violation, labels_json};
use super::{
    Ack, Announcement, AnnouncementStream, NewPromotion, Operator, Page, Seen, Store, StoreError,
    StoreResult, TokenHash,
};
use crate::lane::Lane;
use crate::model::{
    AuditEntry, Cluster, ClusterName, EnvName, EnvPolicy, Environment, HeadRef, Labels, NewAudit,
    NewRevision, OciAuth, OciSource, Override, Phase, Promotion, Revision, RevisionNum, SourceName,
    SourceOperation, SourceStatus, StatusCell, StatusReport, Unit, UnitRef, UnixMillis,
};

/// One statement of a batched write.
type Write = backend::Statement;

/// Rows per statement of a batched write (its statements share one
/// transaction).
const STATEMENT_ROWS: usize = 256;

/// A replica's lease that ran out this long ago is deleted, with its
/// agent sessions (until then they are kept, and ignored).
const FORGET_LEASES_AFTER: Duration = Duration::from_secs(3600);

pub struct SqlStore {
    backend: Backend,
    writer: AnyPool,
    readers: AnyPool,
    /// The reads that open agent sessions (see [`backend::Pools`]).
    sessions: AnyPool,
    /// PostgreSQL: where to listen for announcements. Never logged (it may
    /// hold a password).
    url: Option<String>,
    /// PostgreSQL: the connection holding the leader lock, while it lives.
    leader: tokio::sync::Mutex<Option<AnyConnection>>,
    /// Every commit goes through it (group commit, on `lane`).
    committer: Committer,
    /// This store among the replicas sharing a database: announcements it
    /// made come back to it, and are ignored.
    origin: String,
    /// The store's own thread (after `committer`: dropped last): the
    /// committer and the batched writes run there.
    lane: Lane,
}

impl std::fmt::Debug for SqlStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqlStore")
            .field("backend", &self.backend)
            .finish_non_exhaustive()
    }
}

impl SqlStore {
    /// Opens (creating if needed) a SQLite database file and migrates it.
    pub async fn sqlite(path: &Path) -> StoreResult<SqlStore> {
        Self::ready(Backend::Sqlite, backend::sqlite(path).await?, None).await
    }

    /// Connects to PostgreSQL (`postgres://user:password@host/db`) and
    /// migrates the database.
    pub async fn postgres(url: &str) -> StoreResult<SqlStore> {
        Self::ready(
            Backend::Postgres,
            backend::postgres(url).await?,
            Some(url.to_owned()),
        )
        .await
    }

    async fn ready(
        backend: Backend,
        backend::Pools {
            writer,
            readers,
            sessions,
        }: backend::Pools,
        url: Option<String>,
    ) -> StoreResult<SqlStore> {
        let mut conn = writer.acquire().await.map_err(db)?;
        backend.migrate(&mut conn).await?;
        drop(conn);
        let lane = Lane::new("store-lane").map_err(|e| StoreError::Database(Box::new(e)))?;
        let committer = Committer::start(&lane, writer.clone(), backend);
        Ok(SqlStore {
            origin: format!("{:016x}", rand::random::<u64>()),
            backend,
            writer,
            readers,
            sessions,
            url,
            leader: tokio::sync::Mutex::new(None),
            committer,
            lane,
        })
    }

    /// Runs a batched write, its statements in one transaction, on the
    /// store's lane: whatever runtime the caller is on (a busy one), the
    /// writer connection, which commits wait for, is held only while the
    /// statements run. One transaction writes each page it changes to the
    /// log once, where a transaction per statement wrote the pages their
    /// rows share again and again (acks of 10,000 agents took a fifth of
    /// the hub's CPU).
    async fn write_on_lane(&self, writes: Vec<Write>) -> StoreResult<()> {
        let writer = self.writer.clone();
        self.lane
            .spawn(async move {
                let mut tx = writer.begin().await?;
                for write in writes {
                    write.execute(&mut *tx).await?;
                }
                tx.commit().await
            })
            .await
            .map_err(|e| StoreError::Database(Box::new(e)))?
            .map_err(db)
    }

    /// The writer pool (tests drive the committer's parts directly).
    #[cfg(test)]
    pub(super) fn writer(&self) -> &AnyPool {
        &self.writer
    }

    /// One statement on one cluster's credential (`value`, if any, binds
    /// first as `$1`, then the name) with its audit entry, announced to
    /// other replicas (their sessions of it are checked at once);
    /// `NotFound` when no row matched.
    async fn cluster_write(
        &self,
        sql: &'static str,
        name: &ClusterName,
        value: Option<&str>,
        audit: &NewAudit,
    ) -> StoreResult<()> {
        let mut tx = self.writer.begin().await.map_err(db)?;
        let mut q = sqlx::query(sql);
        if let Some(v) = value {
            q = q.bind(v.to_owned());
        }
        let done = q
            .bind(name.as_str().to_owned())
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("cluster {name}")));
        }
        insert_audit(&mut tx, audit).await?;
        let announced = backend::credentials_payload(&self.origin, name);
        self.backend.announce(&mut tx, [announced]).await?;
        tx.commit().await.map_err(db)
    }
}

impl SqlStore {
    /// An update of one source row (integer parameters, then the name),
    /// audited in the same transaction.
    async fn source_write(
        &self,
        sql: &'static str,
        values: &[i64],
        name: &SourceName,
        audit: Option<&NewAudit>,
    ) -> StoreResult<()> {
        let mut tx = self.writer.begin().await.map_err(db)?;
        let mut q = sqlx::query(sql);
        for v in values {
            q = q.bind(*v);
        }
        let done = q
            .bind(name.as_str().to_owned())
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("source {name}")));
        }
        if let Some(a) = audit {
            insert_audit(&mut tx, a).await?;
        }
        tx.commit().await.map_err(db)
    }
}

async fn insert_audit(conn: &mut AnyConnection, a: &NewAudit) -> StoreResult<()> {
    sqlx::query(
        "INSERT INTO audit (time, actor, action, target, detail) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(UnixMillis::now().0)
    .bind(a.actor.to_string())
    .bind(a.action)
    .bind(&a.target)
    .bind(&a.detail)
    .execute(conn)
    .await
    .map_err(db)?;
    Ok(())
}

/// A unique-constraint violation is "already exists" (what is named by
/// `what`); anything else a database error.
fn already(what: impl FnOnce() -> String) -> impl FnOnce(sqlx::Error) -> StoreError {
    move |e| {
        if is_unique_violation(&e) {
            StoreError::AlreadyExists(what())
        } else {
            db(e)
        }
    }
}

async fn environment_exists(tx: &mut AnyConnection, env: &EnvName) -> StoreResult<bool> {
    let found: Option<String> = sqlx::query_scalar("SELECT name FROM environments WHERE name = $1")
        .bind(env.as_str())
        .fetch_optional(&mut *tx)
        .await
        .map_err(db)?;
    Ok(found.is_some())
}

/// A cluster row (`c`) with its newest certificate's expiry.
const CLUSTER_COLUMNS: &str = "c.name, c.environment, c.labels, c.created_at, c.revoked, c.last_seen, c.agent_version,
                    COALESCE((SELECT MAX(k2.not_after) FROM cluster_certs k2 WHERE k2.cluster = c.name), 0) AS cert_expires";

/// A status cell (`s`: `unit_status`, `u`: its unit).
const STATUS_COLUMNS: &str = "s.cluster, u.environment, u.name, s.acked, s.revision, s.phase, s.message, s.resources, s.updated_at, s.ready_since";

const UNIT_COLUMNS: &str = "u.environment, u.name, u.labels, u.head, u.destroyed, u.created_at, u.updated_at, u.upstream, u.overrides, u.source,
                    COALESCE(r.source_revision, 0) AS head_source";

#[async_trait]
impl Store for SqlStore {
    async fn create_environment(
        &self,
        name: &EnvName,
        after: Option<&EnvName>,
        policy: EnvPolicy,
        audit: NewAudit,
    ) -> StoreResult<Environment> {
        let mut tx = self.writer.begin().await.map_err(db)?;
        let position: i64 = match after {
            Some(after) => {
                let p: Option<i64> =
                    sqlx::query_scalar("SELECT position FROM environments WHERE name = $1")
                        .bind(after.as_str())
                        .fetch_optional(&mut *tx)
                        .await
                        .map_err(db)?;
                let p = p.ok_or_else(|| StoreError::NotFound(format!("environment {after}")))?;
                // Positions are not constrained unique; keep the order dense.
                sqlx::query("UPDATE environments SET position = position + 1 WHERE position > $1")
                    .bind(p)
                    .execute(&mut *tx)
                    .await
                    .map_err(db)?;
                p + 1
            }
            None => sqlx::query_scalar("SELECT COALESCE(MAX(position) + 1, 0) FROM environments")
                .fetch_one(&mut *tx)
                .await
                .map_err(db)?,
        };
        let now = UnixMillis::now();
        sqlx::query(
            "INSERT INTO environments (name, position, created_at, required_approvals, soak_seconds, auto_promote) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(name.as_str())
        .bind(position)
        .bind(now.0)
        .bind(i64::from(policy.required_approvals))
        .bind(i64::try_from(policy.soak_seconds).unwrap_or(i64::MAX))
        .bind(i64::from(policy.auto_promote))
        .execute(&mut *tx)
        .await
        .map_err(already(|| format!("environment {name}")))?;
        insert_audit(&mut tx, &audit).await?;
        tx.commit().await.map_err(db)?;
        Ok(Environment {
            name: name.clone(),
            position: u32::try_from(position).unwrap_or(0),
            created_at: now,
            policy,
        })
    }

    async fn list_environments(&self) -> StoreResult<Vec<Environment>> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {ENV_COLUMNS} FROM environments ORDER BY position"
        )))
        .fetch_all(&self.readers)
        .await
        .map_err(db)?;
        rows.iter().map(rows::environment).collect()
    }

    async fn create_cluster(
        &self,
        name: &ClusterName,
        env: &EnvName,
        labels: &Labels,
        token: &TokenHash,
        audit: NewAudit,
    ) -> StoreResult<Cluster> {
        let mut tx = self.writer.begin().await.map_err(db)?;
        if !environment_exists(&mut tx, env).await? {
            return Err(StoreError::NotFound(format!("environment {env}")));
        }
        let now = UnixMillis::now();
        sqlx::query(
            "INSERT INTO clusters (name, environment, labels, token_hash, created_at) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(name.as_str())
        .bind(env.as_str())
        .bind(labels_json(labels))
        .bind(&token.0)
        .bind(now.0)
        .execute(&mut *tx)
        .await
        .map_err(already(|| format!("cluster {name}")))?;
        insert_audit(&mut tx, &audit).await?;
        // Other replicas' watchers start over from the store.
        let announced = backend::clusters_payload(&self.origin, env);
        self.backend.announce(&mut tx, [announced]).await?;
        tx.commit().await.map_err(db)?;
        Ok(Cluster {
            name: name.clone(),
            environment: env.clone(),
            labels: labels.clone(),
            created_at: now,
            revoked: false,
            last_seen: UnixMillis(0),
            agent_version: String::new(),
            cert_expires: None,
        })
    }

    async fn list_clusters(&self, env: Option<&EnvName>) -> StoreResult<Vec<Cluster>> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {CLUSTER_COLUMNS}
                 FROM clusters c JOIN environments e ON e.name = c.environment
                 WHERE $1 IS NULL OR c.environment = $1 ORDER BY e.position, c.name"
        )))
        .bind(env.map(EnvName::as_str))
        .fetch_all(&self.readers)
        .await
        .map_err(db)?;
        rows.iter().map(rows::cluster).collect()
    }

    async fn get_cluster(&self, name: &ClusterName) -> StoreResult<Option<Cluster>> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {CLUSTER_COLUMNS} FROM clusters c WHERE c.name = $1"
        )))
        .bind(name.as_str())
        .fetch_optional(&self.readers)
        .await
        .map_err(db)?;
        row.as_ref().map(rows::cluster).transpose()
    }

    async fn delete_cluster(&self, name: &ClusterName, audit: NewAudit) -> StoreResult<EnvName> {
        let mut tx = self.writer.begin().await.map_err(db)?;
        let env: Option<String> =
            sqlx::query_scalar("DELETE FROM clusters WHERE name = $1 RETURNING environment")
                .bind(name.as_str())
                .fetch_optional(&mut *tx)
                .await
                .map_err(db)?;
        let Some(env) = env else {
            return Err(StoreError::NotFound(format!("cluster {name}")));
        };
        insert_audit(&mut tx, &audit).await?;
        let env = rows::parse(&env, "environment")?;
        let announced = [
            backend::clusters_payload(&self.origin, &env),
            backend::credentials_payload(&self.origin, name),
        ];
        self.backend.announce(&mut tx, announced).await?;
        tx.commit().await.map_err(db)?;
        Ok(env)
    }

    async fn cells(&self, which: &[(ClusterName, UnitRef)]) -> StoreResult<Vec<StatusCell>> {
        let mut cells = Vec::with_capacity(which.len());
        for chunk in which.chunks(STATEMENT_ROWS) {
            let mut q = sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {STATUS_COLUMNS} FROM (VALUES {}) AS v
                 JOIN units u ON u.environment = v.column2 AND u.name = v.column3
                 JOIN unit_status s ON s.unit_id = u.id AND s.cluster = v.column1",
                self.backend.values(chunk.len(), 3)
            )));
            for (cluster, unit) in chunk {
                q = q
                    .bind(cluster.as_str())
                    .bind(unit.env.as_str())
                    .bind(unit.name.as_str());
            }
            let rows = q.fetch_all(&self.readers).await.map_err(db)?;
            for row in &rows {
                cells.push(rows::status_cell(row)?);
            }
        }
        Ok(cells)
    }

    async fn cluster_by_token(&self, token: &TokenHash) -> StoreResult<Option<Cluster>> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {CLUSTER_COLUMNS} FROM clusters c WHERE c.token_hash = $1 AND c.revoked = 0"
        )))
        .bind(&token.0)
        .fetch_optional(&self.sessions)
        .await
        .map_err(db)?;
        row.as_ref().map(rows::cluster).transpose()
    }

    async fn set_cluster_token(
        &self,
        name: &ClusterName,
        token: &TokenHash,
        audit: NewAudit,
    ) -> StoreResult<()> {
        self.cluster_write(
            "UPDATE clusters SET token_hash = $1 WHERE name = $2",
            name,
            Some(&token.0),
            &audit,
        )
        .await
    }

    async fn add_cluster_cert(
        &self,
        name: &ClusterName,
        fingerprint: &str,
        not_after: UnixMillis,
        audit: NewAudit,
    ) -> StoreResult<()> {
        let mut tx = self.writer.begin().await.map_err(db)?;
        let done = sqlx::query(
            "INSERT INTO cluster_certs (fingerprint, cluster, not_after, created_at)
             SELECT $1, name, $2, $3 FROM clusters WHERE name = $4 AND revoked = 0",
        )
        .bind(fingerprint)
        .bind(not_after.0)
        .bind(UnixMillis::now().0)
        .bind(name.as_str())
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("cluster {name}")));
        }
        insert_audit(&mut tx, &audit).await?;
        tx.commit().await.map_err(db)
    }

    async fn cluster_by_cert(&self, fingerprint: &str) -> StoreResult<Option<Cluster>> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {CLUSTER_COLUMNS} FROM cluster_certs k
                 JOIN clusters c ON c.name = k.cluster WHERE k.fingerprint = $1 AND c.revoked = 0"
        )))
        .bind(fingerprint)
        .fetch_optional(&self.sessions)
        .await
        .map_err(db)?;
        row.as_ref().map(rows::cluster).transpose()
    }

    async fn latest_status_time(&self) -> StoreResult<UnixMillis> {
        let latest: i64 = sqlx::query_scalar(
            "SELECT CAST(COALESCE(MAX(updated_at), 0) AS BIGINT) FROM unit_status",
        )
        .fetch_one(&self.readers)
        .await
        .map_err(db)?;
        Ok(UnixMillis(latest))
    }

    async fn credentials_in_force(
        &self,
        held: &[(ClusterName, crate::auth::Credential)],
    ) -> StoreResult<std::collections::HashSet<(ClusterName, crate::auth::Credential)>> {
        use crate::auth::Credential;
        let (mut tokens, mut certs) = (Vec::new(), Vec::new());
        for (name, credential) in held {
            match credential {
                Credential::Token(hash) => tokens.push((name, hash.0.as_str())),
                Credential::Certificate(fingerprint) => certs.push((name, fingerprint.as_str())),
            }
        }
        // As `cluster_by_token` and `cluster_by_cert` find them; each row
        // names the pair it confirms.
        let by_token = "SELECT c.name, v.column2 FROM (VALUES {}) AS v
             JOIN clusters c ON c.name = v.column1 AND c.token_hash = v.column2
             WHERE c.revoked = 0";
        let by_cert = "SELECT c.name, v.column2 FROM (VALUES {}) AS v
             JOIN cluster_certs k ON k.cluster = v.column1 AND k.fingerprint = v.column2
             JOIN clusters c ON c.name = k.cluster WHERE c.revoked = 0";
        let token: fn(String) -> Credential = |hash| Credential::Token(TokenHash(hash));
        let cert: fn(String) -> Credential = Credential::Certificate;
        let mut in_force = std::collections::HashSet::new();
        for (sql, held, credential) in [(by_token, tokens, token), (by_cert, certs, cert)] {
            for chunk in held.chunks(STATEMENT_ROWS) {
                let values = self.backend.values(chunk.len(), 2);
                let mut q = sqlx::query(sqlx::AssertSqlSafe(sql.replace("{}", &values)));
                for (name, credential) in chunk {
                    q = q.bind(name.as_str()).bind(*credential);
                }
                for row in q.fetch_all(&self.sessions).await.map_err(db)? {
                    let name: String = sqlx::Row::try_get(&row, 0).map_err(db)?;
                    let held: String = sqlx::Row::try_get(&row, 1).map_err(db)?;
                    in_force.insert((rows::parse(&name, "cluster name")?, credential(held)));
                }
            }
        }
        Ok(in_force)
    }

    async fn revoke_cluster(&self, name: &ClusterName, audit: NewAudit) -> StoreResult<()> {
        self.cluster_write(
            "UPDATE clusters SET revoked = 1 WHERE name = $1",
            name,
            None,
            &audit,
        )
        .await
    }

    async fn create_operator(
        &self,
        op: &Operator,
        token: &TokenHash,
        audit: NewAudit,
    ) -> StoreResult<()> {
        let mut tx = self.writer.begin().await.map_err(db)?;
        sqlx::query(
            "INSERT INTO operators (name, role, token_hash, created_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(&op.name)
        .bind(op.role.as_str())
        .bind(&token.0)
        .bind(UnixMillis::now().0)
        .execute(&mut *tx)
        .await
        .map_err(already(|| format!("operator {}", op.name)))?;
        insert_audit(&mut tx, &audit).await?;
        tx.commit().await.map_err(db)
    }

    async fn rotate_operator(
        &self,
        name: &str,
        token: &TokenHash,
        audit: NewAudit,
    ) -> StoreResult<Operator> {
        let mut tx = self.writer.begin().await.map_err(db)?;
        let row = sqlx::query(
            "UPDATE operators SET token_hash = $1 WHERE name = $2 RETURNING name, role",
        )
        .bind(&token.0)
        .bind(name)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db)?
        .ok_or_else(|| StoreError::NotFound(format!("operator {name}")))?;
        let op = rows::operator(&row)?;
        insert_audit(&mut tx, &audit).await?;
        tx.commit().await.map_err(db)?;
        Ok(op)
    }

    async fn install_admin_token(&self, token: &TokenHash) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO operators (name, role, token_hash, created_at) VALUES ('admin', 'admin', $1, $2)
             ON CONFLICT (name) DO UPDATE SET role = 'admin', token_hash = excluded.token_hash",
        )
        .bind(&token.0)
        .bind(UnixMillis::now().0)
        .execute(&self.writer)
        .await
        .map_err(db)?;
        Ok(())
    }

    async fn operator_by_token(&self, token: &TokenHash) -> StoreResult<Option<Operator>> {
        let row = sqlx::query("SELECT name, role FROM operators WHERE token_hash = $1")
            .bind(&token.0)
            .fetch_optional(&self.readers)
            .await
            .map_err(db)?;
        row.as_ref().map(rows::operator).transpose()
    }

    async fn commit_release(
        &self,
        revs: Vec<NewRevision>,
        promotion: Option<NewPromotion>,
    ) -> StoreResult<(Vec<Revision>, Option<u64>)> {
        self.committer.commit(revs, promotion).await
    }

    async fn get_unit(&self, unit: &UnitRef) -> StoreResult<Option<Unit>> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {UNIT_COLUMNS}
             FROM units u LEFT JOIN revisions r ON r.unit_id = u.id AND r.number = u.head
             WHERE u.environment = $1 AND u.name = $2"
        )))
        .bind(unit.env.as_str())
        .bind(unit.name.as_str())
        .fetch_optional(&self.readers)
        .await
        .map_err(db)?;
        row.as_ref().map(rows::unit).transpose()
    }

    async fn list_units(&self, env: Option<&EnvName>) -> StoreResult<Vec<Unit>> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {UNIT_COLUMNS}
             FROM units u JOIN environments e ON e.name = u.environment
             LEFT JOIN revisions r ON r.unit_id = u.id AND r.number = u.head
             WHERE $1 IS NULL OR u.environment = $1 ORDER BY e.position, u.name"
        )))
        .bind(env.map(EnvName::as_str))
        .fetch_all(&self.readers)
        .await
        .map_err(db)?;
        rows.iter().map(rows::unit).collect()
    }

    async fn history(&self, unit: &UnitRef) -> StoreResult<Vec<Revision>> {
        let rows = sqlx::query(
            "SELECT r.number, r.digest, r.tombstone, r.documents, r.author, r.message, r.origin, r.created_at, r.source_revision
             FROM revisions r JOIN units u ON u.id = r.unit_id
             WHERE u.environment = $1 AND u.name = $2 ORDER BY r.number",
        )
        .bind(unit.env.as_str())
        .bind(unit.name.as_str())
        .fetch_all(&self.readers)
        .await
        .map_err(db)?;
        rows.iter()
            .map(|r| rows::revision(unit, r, false))
            .collect()
    }

    async fn get_revision(&self, unit: &UnitRef, n: RevisionNum) -> StoreResult<Option<Revision>> {
        let row = sqlx::query(
            "SELECT r.number, r.digest, r.tombstone, r.manifests, r.documents, r.author, r.message, r.origin, r.created_at, r.source_revision
             FROM revisions r JOIN units u ON u.id = r.unit_id
             WHERE u.environment = $1 AND u.name = $2 AND r.number = $3",
        )
        .bind(unit.env.as_str())
        .bind(unit.name.as_str())
        .bind(i64::try_from(n.0).unwrap_or(i64::MAX))
        .fetch_optional(&self.readers)
        .await
        .map_err(db)?;
        row.as_ref()
            .map(|r| rows::revision(unit, r, true))
            .transpose()
    }

    async fn heads(&self, env: &EnvName) -> StoreResult<Vec<HeadRef>> {
        let rows = sqlx::query(
            "SELECT u.name, r.number, r.digest, r.tombstone
             FROM units u JOIN revisions r ON r.unit_id = u.id AND r.number = u.head
             WHERE u.environment = $1 ORDER BY u.name",
        )
        .bind(env.as_str())
        .fetch_all(&self.sessions)
        .await
        .map_err(db)?;
        rows.iter().map(rows::head).collect()
    }

    async fn record_acks(&self, acks: &[Ack]) -> StoreResult<()> {
        if acks.is_empty() {
            return Ok(());
        }
        // One ack per cluster and unit; joins make a row a no-op for a
        // cluster deleted meanwhile.
        let mut writes = Vec::new();
        for acks in acks.chunks(STATEMENT_ROWS) {
            let mut q = sqlx::query(sqlx::AssertSqlSafe(format!(
                "INSERT INTO unit_status (cluster, unit_id, acked)
             SELECT c.name, u.id, v.column1 FROM (VALUES {}) AS v
             JOIN clusters c ON c.name = v.column2
             JOIN units u ON u.environment = v.column3 AND u.name = v.column4
             WHERE true
             ON CONFLICT (cluster, unit_id) DO UPDATE SET acked = CASE
               WHEN excluded.acked > unit_status.acked THEN excluded.acked
               ELSE unit_status.acked END",
                self.backend.values(acks.len(), 4)
            )));
            for a in acks {
                q = q
                    .bind(int(a.revision.0)?)
                    .bind(a.cluster.as_str())
                    .bind(a.unit.env.as_str())
                    .bind(a.unit.name.as_str());
            }
            writes.push(q);
        }
        self.write_on_lane(writes).await
    }

    async fn record_seen(&self, seen: &[Seen]) -> StoreResult<()> {
        if seen.is_empty() {
            return Ok(());
        }
        let mut writes = Vec::new();
        for seen in seen.chunks(STATEMENT_ROWS) {
            let mut q = sqlx::query(sqlx::AssertSqlSafe(format!(
                "UPDATE clusters SET last_seen = v.column1, agent_version = v.column2
             FROM (VALUES {}) AS v
             WHERE clusters.name = v.column3 AND clusters.last_seen <= v.column1",
                self.backend.values(seen.len(), 3)
            )));
            for s in seen {
                q = q
                    .bind(s.at.0)
                    .bind(&s.agent_version)
                    .bind(s.cluster.as_str());
            }
            writes.push(q);
        }
        self.write_on_lane(writes).await
    }

    async fn record_sessions(
        &self,
        opened: &[Seen],
        closed: &[ClusterName],
        replace: bool,
        lease: Duration,
    ) -> StoreResult<()> {
        let me = self.origin.as_str();
        let now = self.backend.now_millis();
        let lease_ms = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX / 2);
        let mut writes = vec![
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "INSERT INTO replica_leases (replica, expires_at)
                 VALUES ($1, CASE WHEN $2 > 0 THEN {now} + $2 ELSE 0 END)
                 ON CONFLICT (replica) DO UPDATE SET expires_at = excluded.expires_at"
            )))
            .bind(me.to_owned())
            .bind(lease_ms),
        ];
        if replace {
            writes.push(
                sqlx::query("DELETE FROM agent_sessions WHERE replica = $1").bind(me.to_owned()),
            );
        }
        for closed in closed.chunks(STATEMENT_ROWS) {
            let mut q = sqlx::query(sqlx::AssertSqlSafe(format!(
                "DELETE FROM agent_sessions WHERE EXISTS (SELECT 1 FROM (VALUES {}) AS v
                 WHERE v.column1 = agent_sessions.replica AND v.column2 = agent_sessions.cluster)",
                self.backend.values(closed.len(), 2)
            )));
            for c in closed {
                q = q.bind(me.to_owned()).bind(c.as_str().to_owned());
            }
            writes.push(q);
        }
        for opened in opened.chunks(STATEMENT_ROWS) {
            let mut q = sqlx::query(sqlx::AssertSqlSafe(format!(
                "INSERT INTO agent_sessions (replica, cluster, agent_version, connected_at)
                 SELECT v.column1, v.column2, v.column3, v.column4 FROM (VALUES {}) AS v WHERE true
                 ON CONFLICT (replica, cluster) DO UPDATE SET
                   agent_version = excluded.agent_version, connected_at = excluded.connected_at",
                self.backend.values(opened.len(), 4)
            )));
            for s in opened {
                q = q
                    .bind(me.to_owned())
                    .bind(s.cluster.as_str().to_owned())
                    .bind(s.agent_version.clone())
                    .bind(s.at.0);
            }
            writes.push(q);
        }
        // Leases that ran out long ago (replicas that crashed) go, with
        // their sessions.
        let forget = i64::try_from(FORGET_LEASES_AFTER.as_millis()).unwrap_or(i64::MAX / 2);
        writes.push(
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "DELETE FROM agent_sessions WHERE replica IN
                 (SELECT replica FROM replica_leases WHERE expires_at < {now} - $1)"
            )))
            .bind(forget),
        );
        writes.push(
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "DELETE FROM replica_leases WHERE expires_at < {now} - $1"
            )))
            .bind(forget),
        );
        // Other replicas re-read sessions when some opened or closed, or
        // the lease ended (they re-read as leases run, too).
        if replace || !opened.is_empty() || !closed.is_empty() || lease.is_zero() {
            writes.extend(
                self.backend
                    .notifications([backend::sessions_payload(&self.origin)]),
            );
        }
        self.write_on_lane(writes).await
    }

    async fn sessions_elsewhere(&self) -> StoreResult<Vec<(EnvName, Seen)>> {
        let now = self.backend.now_millis();
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT s.cluster, c.environment, s.agent_version, s.connected_at
             FROM agent_sessions s
             JOIN replica_leases r ON r.replica = s.replica
             JOIN clusters c ON c.name = s.cluster
             WHERE s.replica <> $1 AND r.expires_at > {now}
             ORDER BY s.cluster, s.connected_at"
        )))
        .bind(self.origin.clone())
        .fetch_all(&self.readers)
        .await
        .map_err(db)?;
        rows.iter().map(rows::session).collect()
    }

    async fn record_statuses(&self, reports: &[StatusReport]) -> StoreResult<()> {
        if reports.is_empty() {
            return Ok(());
        }
        // One report per cluster and unit. A report of a revision says it
        // was received, too (of a revision the unit has: an agent's word
        // does not outrun the store). One older than the recorded one (a
        // lower revision, or the same one received earlier: a late flush
        // of the replica an agent left) changes nothing, unless the
        // recorded one is of a revision the unit did not have (never
        // counted as received: revision above acked), which never holds
        // the cell.
        let mut writes = Vec::new();
        for reports in reports.chunks(STATEMENT_ROWS) {
            let mut q = sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO unit_status (cluster, unit_id, acked, revision, phase, message, resources, updated_at, ready_since)
             SELECT c.name, u.id, CASE WHEN v.column1 <= u.head THEN v.column1 ELSE 0 END,
                    v.column1, v.column2, v.column3, v.column4, v.column5,
                    CASE WHEN v.column2 = 'Ready' THEN v.column5 ELSE 0 END
             FROM (VALUES {}) AS v
             JOIN clusters c ON c.name = v.column6
             JOIN units u ON u.environment = v.column7 AND u.name = v.column8
             WHERE true
             ON CONFLICT (cluster, unit_id) DO UPDATE SET
               ready_since = CASE
                 WHEN excluded.phase != 'Ready' THEN 0
                 WHEN unit_status.phase = 'Ready' AND unit_status.revision = excluded.revision
                   AND unit_status.ready_since > 0 THEN unit_status.ready_since
                 ELSE excluded.updated_at END,
               acked = CASE WHEN excluded.acked > unit_status.acked
                 THEN excluded.acked ELSE unit_status.acked END,
               revision = excluded.revision,
               phase = excluded.phase, message = excluded.message,
               resources = excluded.resources, updated_at = excluded.updated_at
             WHERE unit_status.revision > unit_status.acked
               OR unit_status.revision < excluded.revision
               OR (unit_status.revision = excluded.revision
                   AND unit_status.updated_at <= excluded.updated_at)",
            self.backend.values(reports.len(), 8)
        )));
            for r in reports {
                q = q
                    .bind(int(r.revision.0)?)
                    .bind(r.phase.as_str())
                    .bind(&r.message)
                    .bind(serde_json::to_string(&r.resources).map_err(corrupt)?)
                    .bind(r.observed_at.0)
                    .bind(r.cluster.as_str())
                    .bind(r.unit.env.as_str())
                    .bind(r.unit.name.as_str());
            }
            writes.push(q);
        }
        // Watchers of other replicas hear of them too.
        writes.extend(
            self.backend.notifications(
                reports
                    .iter()
                    .map(|r| backend::status_payload(&self.origin, &r.cluster, &r.unit)),
            ),
        );
        self.write_on_lane(writes).await
    }

    async fn statuses(
        &self,
        env: Option<&EnvName>,
        unit: Option<&UnitRef>,
        page: &Page,
    ) -> StoreResult<Vec<StatusCell>> {
        let limit = if page.limit > 0 {
            format!(" LIMIT {}", page.limit)
        } else {
            String::new()
        };
        let after = page.after.as_ref();
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {STATUS_COLUMNS}
             FROM unit_status s JOIN units u ON u.id = s.unit_id
             WHERE ($1 IS NULL OR u.environment = $1)
               AND ($2 IS NULL OR (u.environment = $2 AND u.name = $3))
               AND ($4 IS NULL OR u.environment > $4
                    OR (u.environment = $4 AND (u.name > $5 OR (u.name = $5 AND s.cluster > $6))))
             ORDER BY u.environment, u.name, s.cluster{limit}"
        )))
        .bind(env.map(EnvName::as_str))
        .bind(unit.map(|u| u.env.as_str()))
        .bind(unit.map(|u| u.name.as_str()))
        .bind(after.map(|(u, _)| u.env.as_str()))
        .bind(after.map(|(u, _)| u.name.as_str()))
        .bind(after.map(|(_, c)| c.as_str()))
        .fetch_all(&self.readers)
        .await
        .map_err(db)?;
        rows.iter().map(rows::status_cell).collect()
    }

    async fn cluster_statuses(&self, cluster: &ClusterName) -> StoreResult<Vec<StatusCell>> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {STATUS_COLUMNS}
             FROM unit_status s JOIN units u ON u.id = s.unit_id
             WHERE s.cluster = $1 ORDER BY u.environment, u.name"
        )))
        .bind(cluster.as_str())
        .fetch_all(&self.readers)
        .await
        .map_err(db)?;
        rows.iter().map(rows::status_cell).collect()
    }

    async fn phase_counts(
        &self,
        env: Option<&EnvName>,
    ) -> StoreResult<Vec<(ClusterName, Phase, u64)>> {
        let rows = sqlx::query(
            "SELECT s.cluster AS cluster,
                    CASE WHEN s.revision = u.head THEN s.phase ELSE 'Unknown' END AS phase,
                    COUNT(*) AS n
             FROM unit_status s JOIN units u ON u.id = s.unit_id
             WHERE $1 IS NULL OR u.environment = $1
             GROUP BY 1, 2 ORDER BY 1, 2",
        )
        .bind(env.map(EnvName::as_str))
        .fetch_all(&self.readers)
        .await
        .map_err(db)?;
        rows.iter().map(rows::phase_count).collect()
    }

    async fn unit_phase_counts(
        &self,
        env: Option<&EnvName>,
    ) -> StoreResult<Vec<(UnitRef, Option<Phase>, u64)>> {
        let rows = sqlx::query(
            "SELECT u.environment AS environment, u.name AS name,
                    CASE WHEN s.revision = u.head THEN s.phase END AS phase,
                    COUNT(*) AS n
             FROM unit_status s JOIN units u ON u.id = s.unit_id
             WHERE $1 IS NULL OR u.environment = $1
             GROUP BY 1, 2, 3 ORDER BY 1, 2, 3",
        )
        .bind(env.map(EnvName::as_str))
        .fetch_all(&self.readers)
        .await
        .map_err(db)?;
        rows.iter().map(rows::unit_phase_count).collect()
    }

    async fn set_environment_policy(
        &self,
        env: &EnvName,
        policy: EnvPolicy,
        audit: NewAudit,
    ) -> StoreResult<Environment> {
        let mut tx = self.writer.begin().await.map_err(db)?;
        let done = sqlx::query(
            "UPDATE environments SET required_approvals = $1, soak_seconds = $2, auto_promote = $3 WHERE name = $4",
        )
        .bind(i64::from(policy.required_approvals))
        .bind(i64::try_from(policy.soak_seconds).unwrap_or(i64::MAX))
        .bind(i64::from(policy.auto_promote))
        .bind(env.as_str())
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("environment {env}")));
        }
        insert_audit(&mut tx, &audit).await?;
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {ENV_COLUMNS} FROM environments WHERE name = $1"
        )))
        .bind(env.as_str())
        .fetch_one(&mut *tx)
        .await
        .map_err(db)?;
        let out = rows::environment(&row)?;
        tx.commit().await.map_err(db)?;
        Ok(out)
    }

    async fn set_overrides(
        &self,
        unit: &UnitRef,
        overrides: &[Override],
        audit: NewAudit,
    ) -> StoreResult<Unit> {
        let mut tx = self.writer.begin().await.map_err(db)?;
        let done =
            sqlx::query("UPDATE units SET overrides = $1 WHERE environment = $2 AND name = $3")
                .bind(serde_json::to_string(overrides).map_err(corrupt)?)
                .bind(unit.env.as_str())
                .bind(unit.name.as_str())
                .execute(&mut *tx)
                .await
                .map_err(db)?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("unit {unit}")));
        }
        insert_audit(&mut tx, &audit).await?;
        tx.commit().await.map_err(db)?;
        self.get_unit(unit)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("unit {unit}")))
    }

    async fn approve(
        &self,
        target: &EnvName,
        unit: &UnitRef,
        revision: RevisionNum,
        approver: &str,
        audit: NewAudit,
    ) -> StoreResult<Vec<String>> {
        let mut tx = self.writer.begin().await.map_err(db)?;
        let done = sqlx::query(
            "INSERT INTO approvals (target_env, unit_id, revision, approver, time)
             SELECT $1, u.id, $2, $3, $4 FROM units u
             JOIN revisions r ON r.unit_id = u.id AND r.number = $2
             WHERE u.environment = $5 AND u.name = $6",
        )
        .bind(target.as_str())
        .bind(i64::try_from(revision.0).unwrap_or(i64::MAX))
        .bind(approver)
        .bind(UnixMillis::now().0)
        .bind(unit.env.as_str())
        .bind(unit.name.as_str())
        .execute(&mut *tx)
        .await
        .map_err(already(|| {
            format!("an approval by {approver} of {unit}@{revision} for {target}")
        }))?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!(
                "unit {unit} revision {revision}"
            )));
        }
        insert_audit(&mut tx, &audit).await?;
        tx.commit().await.map_err(db)?;
        self.approvals(target, unit, revision).await
    }

    async fn approvals(
        &self,
        target: &EnvName,
        unit: &UnitRef,
        revision: RevisionNum,
    ) -> StoreResult<Vec<String>> {
        sqlx::query_scalar(
            "SELECT a.approver FROM approvals a JOIN units u ON u.id = a.unit_id
             WHERE a.target_env = $1 AND u.environment = $2 AND u.name = $3 AND a.revision = $4 ORDER BY a.time",
        )
        .bind(target.as_str())
        .bind(unit.env.as_str())
        .bind(unit.name.as_str())
        .bind(i64::try_from(revision.0).unwrap_or(i64::MAX))
        .fetch_all(&self.readers)
        .await
        .map_err(db)
    }

    async fn list_promotions(&self, limit: u32) -> StoreResult<Vec<Promotion>> {
        let rows = sqlx::query("SELECT * FROM promotions ORDER BY id DESC LIMIT $1")
            .bind(i64::from(limit))
            .fetch_all(&self.readers)
            .await
            .map_err(db)?;
        rows.iter().map(rows::promotion).collect()
    }

    async fn get_promotion(&self, id: u64) -> StoreResult<Option<Promotion>> {
        let row = sqlx::query("SELECT * FROM promotions WHERE id = $1")
            .bind(i64::try_from(id).unwrap_or(i64::MAX))
            .fetch_optional(&self.readers)
            .await
            .map_err(db)?;
        row.as_ref().map(rows::promotion).transpose()
    }

    async fn subscribe(&self) -> StoreResult<Option<AnnouncementStream>> {
        let Some(url) = self.url.clone() else {
            return Ok(None);
        };
        // Fails at start-up when the database does not take listeners.
        let listener = sqlx::postgres::PgListener::connect(&url)
            .await
            .map_err(db)?;
        let (tx, rx) = tokio::sync::mpsc::channel(4096);
        tokio::spawn(follow_announcements(url, listener, tx, self.origin.clone()));
        Ok(Some(Box::pin(tokio_stream::wrappers::ReceiverStream::new(
            rx,
        ))))
    }

    async fn is_leader(&self) -> StoreResult<bool> {
        if self.backend == Backend::Sqlite {
            return Ok(true);
        }
        // A session-level advisory lock on a connection of its own, held
        // for as long as that connection lives (re-entrant for it); a lost
        // connection loses the lock, and another replica takes over.
        let mut leader = self.leader.lock().await;
        if leader.is_none() {
            *leader = Some(self.writer.acquire().await.map_err(db)?.detach());
        }
        let conn = leader.as_mut().expect("a leader connection");
        match sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(LEADER_LOCK)
            .fetch_one(conn)
            .await
        {
            Ok(held) => Ok(held),
            Err(e) => {
                *leader = None;
                Err(db(e))
            }
        }
    }

    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1")
            .execute(&self.writer)
            .await
            .map(|_| ())
            .map_err(db)
    }

    async fn put_operation(&self, op: &SourceOperation) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO source_operations (id, source, unit, action, state, hub_revision, report, delivered, detail, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
             ON CONFLICT (id) DO UPDATE SET
               -- Never backwards: a reported operation stays reported (with
               -- its report), a delivered one delivered, a revision recorded.
               state = CASE WHEN source_operations.state = 'reported' THEN source_operations.state ELSE excluded.state END,
               report = CASE WHEN source_operations.state = 'reported' THEN source_operations.report ELSE excluded.report END,
               detail = CASE WHEN source_operations.state = 'reported' THEN source_operations.detail ELSE excluded.detail END,
               hub_revision = CASE WHEN excluded.hub_revision > source_operations.hub_revision
                                   THEN excluded.hub_revision ELSE source_operations.hub_revision END,
               delivered = CASE WHEN source_operations.delivered = 1 THEN 1 ELSE excluded.delivered END,
               updated_at = excluded.updated_at",
        )
        .bind(&op.id)
        .bind(&op.source)
        .bind(&op.unit)
        .bind(&op.action)
        .bind(&op.state)
        .bind(int(op.hub_revision.0)?)
        .bind(&op.report)
        .bind(i64::from(op.delivered))
        .bind(&op.detail)
        .bind(op.created_at.0)
        .bind(UnixMillis::now().0)
        .execute(&self.writer)
        .await
        .map_err(db)?;
        Ok(())
    }

    async fn decide_operation(&self, op: &SourceOperation) -> StoreResult<bool> {
        let done = sqlx::query(
            "INSERT INTO source_operations (id, source, unit, action, state, hub_revision, report, delivered, detail, created_at, updated_at)
             VALUES ($1, $2, $3, $4, 'reported', $5, $6, 0, $7, $8, $9)
             ON CONFLICT (id) DO UPDATE SET state = 'reported', report = excluded.report, updated_at = excluded.updated_at
             WHERE source_operations.state <> 'reported'",
        )
        .bind(&op.id)
        .bind(&op.source)
        .bind(&op.unit)
        .bind(&op.action)
        .bind(int(op.hub_revision.0)?)
        .bind(&op.report)
        .bind(&op.detail)
        .bind(op.created_at.0)
        .bind(UnixMillis::now().0)
        .execute(&self.writer)
        .await
        .map_err(db)?;
        Ok(done.rows_affected() == 1)
    }

    async fn get_operation(&self, id: &str) -> StoreResult<Option<SourceOperation>> {
        let row = sqlx::query("SELECT * FROM source_operations WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.readers)
            .await
            .map_err(db)?;
        row.as_ref().map(rows::source_operation).transpose()
    }

    async fn open_operations(&self, source: &str) -> StoreResult<Vec<SourceOperation>> {
        let rows = sqlx::query(
            "SELECT * FROM source_operations WHERE source = $1 AND delivered = 0 ORDER BY created_at, id",
        )
        .bind(source)
        .fetch_all(&self.readers)
        .await
        .map_err(db)?;
        rows.iter().map(rows::source_operation).collect()
    }

    async fn create_source(
        &self,
        src: &OciSource,
        auth: &OciAuth,
        audit: NewAudit,
    ) -> StoreResult<()> {
        let mut tx = self.writer.begin().await.map_err(db)?;
        if !environment_exists(&mut tx, &src.env).await? {
            return Err(StoreError::NotFound(format!("environment {}", src.env)));
        }
        let spec =
            serde_json::to_string(&src.spec).map_err(|e| corrupt(format!("source spec: {e}")))?;
        let status = serde_json::to_string(&src.status)
            .map_err(|e| corrupt(format!("source status: {e}")))?;
        sqlx::query(
            "INSERT INTO oci_sources (name, environment, spec, credentials, suspended, status, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(src.name.as_str())
        .bind(src.env.as_str())
        .bind(spec)
        .bind(rows::auth_json(auth))
        .bind(i64::from(src.suspended))
        .bind(status)
        .bind(src.created_at.0)
        .bind(src.created_at.0)
        .execute(&mut *tx)
        .await
        .map_err(already(|| format!("source {}", src.name)))?;
        insert_audit(&mut tx, &audit).await?;
        tx.commit().await.map_err(db)
    }

    async fn list_sources(&self) -> StoreResult<Vec<OciSource>> {
        let rows = sqlx::query("SELECT * FROM oci_sources ORDER BY name")
            .fetch_all(&self.readers)
            .await
            .map_err(db)?;
        rows.iter().map(rows::oci_source).collect()
    }

    async fn get_source(&self, name: &SourceName) -> StoreResult<Option<OciSource>> {
        let row = sqlx::query("SELECT * FROM oci_sources WHERE name = $1")
            .bind(name.as_str())
            .fetch_optional(&self.readers)
            .await
            .map_err(db)?;
        row.as_ref().map(rows::oci_source).transpose()
    }

    async fn source_auth(&self, name: &SourceName) -> StoreResult<OciAuth> {
        let text: Option<String> =
            sqlx::query_scalar("SELECT credentials FROM oci_sources WHERE name = $1")
                .bind(name.as_str())
                .fetch_optional(&self.readers)
                .await
                .map_err(db)?;
        rows::parse_auth(&text.ok_or_else(|| StoreError::NotFound(format!("source {name}")))?)
    }

    async fn set_source_suspended(
        &self,
        name: &SourceName,
        suspended: bool,
        audit: NewAudit,
    ) -> StoreResult<()> {
        self.source_write(
            "UPDATE oci_sources SET suspended = $1, updated_at = $2 WHERE name = $3",
            &[i64::from(suspended), UnixMillis::now().0],
            name,
            Some(&audit),
        )
        .await
    }

    async fn delete_source(&self, name: &SourceName, audit: NewAudit) -> StoreResult<()> {
        let mut tx = self.writer.begin().await.map_err(db)?;
        let done = sqlx::query("DELETE FROM oci_sources WHERE name = $1")
            .bind(name.as_str())
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("source {name}")));
        }
        sqlx::query("UPDATE units SET source = '' WHERE source = $1")
            .bind(name.owner())
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        insert_audit(&mut tx, &audit).await?;
        tx.commit().await.map_err(db)
    }

    async fn request_source_sync(
        &self,
        name: &SourceName,
        at: UnixMillis,
        allow_prune: bool,
        audit: NewAudit,
    ) -> StoreResult<()> {
        self.source_write(
            "UPDATE oci_sources SET sync_requested = $1, allow_prune = $2 WHERE name = $3",
            &[at.0, i64::from(allow_prune)],
            name,
            Some(&audit),
        )
        .await
    }

    async fn set_source_status(
        &self,
        name: &SourceName,
        status: &SourceStatus,
        prune_used: bool,
    ) -> StoreResult<()> {
        let text =
            serde_json::to_string(status).map_err(|e| corrupt(format!("source status: {e}")))?;
        let mut tx = self.writer.begin().await.map_err(db)?;
        // Never backwards: a late write of an older attempt (a former
        // leader) changes nothing.
        let attempt = status.last_attempt.map_or(0, |t| t.0);
        let done = sqlx::query(
            "UPDATE oci_sources SET status = $1, updated_at = $2, attempt_at = $3,
               allow_prune = CASE WHEN $4 = 1 THEN 0 ELSE allow_prune END
             WHERE name = $5 AND attempt_at <= $3",
        )
        .bind(text)
        .bind(UnixMillis::now().0)
        .bind(attempt)
        .bind(i64::from(prune_used))
        .bind(name.as_str())
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        if done.rows_affected() == 0 && self.get_source(name).await?.is_none() {
            return Err(StoreError::NotFound(format!("source {name}")));
        }
        tx.commit().await.map_err(db)
    }

    async fn get_state(&self, key: &str) -> StoreResult<Option<String>> {
        sqlx::query_scalar("SELECT value FROM hub_state WHERE key = $1")
            .bind(key)
            .fetch_optional(&self.readers)
            .await
            .map_err(db)
    }

    async fn put_state(&self, key: &str, value: &str) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO hub_state (key, value) VALUES ($1, $2)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        )
        .bind(key)
        .bind(value)
        .execute(&self.writer)
        .await
        .map_err(db)?;
        Ok(())
    }

    async fn append_audit(&self, entry: NewAudit) -> StoreResult<()> {
        let mut conn = self.writer.acquire().await.map_err(db)?;
        insert_audit(&mut conn, &entry).await
    }

    async fn list_audit(&self, limit: u32, target_prefix: &str) -> StoreResult<Vec<AuditEntry>> {
        let rows = sqlx::query(
            "SELECT id, time, actor, action, target, detail FROM audit
             WHERE substr(target, 1, length($1)) = $1 ORDER BY id DESC LIMIT $2",
        )
        .bind(target_prefix)
        .bind(i64::from(limit))
        .fetch_all(&self.readers)
        .await
        .map_err(db)?;
        rows.iter().map(rows::audit).collect()
    }
}

/// Forwards PostgreSQL announcements until the receiver goes away. A lost
/// connection is re-established (with backoff, never giving up), and a
/// `Resync` follows every reconnect: announcements sent meanwhile are lost.
async fn follow_announcements(
    url: String,
    mut listener: sqlx::postgres::PgListener,
    tx: tokio::sync::mpsc::Sender<Announcement>,
    origin: String,
) {
    let mut retry = Duration::from_millis(100);
    // After a reconnect: announced once listening again, so that nothing
    // announced between the resync and the `LISTEN` is missed.
    let mut resync_due = false;
    'connected: loop {
        if let Err(e) = listener.listen(CHANNEL).await {
            tracing::warn!(error = %e, "cannot listen for announcements; retrying");
        } else {
            retry = Duration::from_millis(100);
            if std::mem::take(&mut resync_due) && tx.send(Announcement::Resync).await.is_err() {
                return;
            }
            loop {
                let next = tokio::select! {
                    () = tx.closed() => return,
                    n = listener.try_recv() => n,
                };
                match next {
                    Ok(Some(n)) => {
                        let parsed = backend::parse_announcement(n.payload(), &origin);
                        if let Some(a) = parsed
                            && tx.send(a).await.is_err()
                        {
                            return;
                        }
                    }
                    // The connection was lost (the listener reconnects on
                    // the next call): what was announced meanwhile is gone.
                    Ok(None) => {
                        tracing::warn!("announcement listener lost its connection; resyncing");
                        if tx.send(Announcement::Resync).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "announcement listener failed; reconnecting");
                        break;
                    }
                }
            }
        }
        loop {
            tokio::select! {
                () = tx.closed() => return,
                () = tokio::time::sleep(retry) => {}
            }
            retry = (retry * 2).min(Duration::from_secs(5));
            match sqlx::postgres::PgListener::connect(&url).await {
                Ok(l) => {
                    listener = l;
                    resync_due = true;
                    continue 'connected;
                }
                Err(e) => tracing::warn!(error = %e, "cannot reconnect the announcement listener"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::store::testing::store;

    #[tokio::test]
    async fn operators_reads_do_not_queue_behind_the_sessions_reads() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir).await;
        let dev: EnvName = "dev".parse().unwrap();
        // Every connection the sessions read with is taken, as when ten
        // thousand agents open sessions at once.
        let mut held = Vec::new();
        for _ in 0..store.sessions.options().get_max_connections() {
            held.push(store.sessions.acquire().await.unwrap());
        }
        let reads = async {
            let envs = store.list_environments().await.unwrap();
            let token = store.operator_by_token(&TokenHash("none".into())).await;
            (envs, token.unwrap())
        };
        let (envs, token) = tokio::time::timeout(Duration::from_secs(5), reads)
            .await
            .expect("an operator's reads are answered while the sessions' wait");
        assert_eq!(envs.len(), 1);
        assert!(token.is_none());
        // The sessions' reads wait for their own connections.
        let waiting = tokio::time::timeout(Duration::from_millis(200), store.heads(&dev)).await;
        assert!(waiting.is_err(), "a session's read found a connection");
        drop(held);
        let heads = tokio::time::timeout(Duration::from_secs(5), store.heads(&dev))
            .await
            .expect("answered once a connection is free")
            .unwrap();
        assert!(heads.is_empty());
    }

    #[tokio::test]
    async fn credentials_in_force_follow_revocation_rotation_and_deletion() {
        use crate::auth::Credential;
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir).await;
        let dev: EnvName = "dev".parse().unwrap();
        let audit = || NewAudit {
            actor: crate::model::Actor::Hub,
            action: "test",
            target: String::new(),
            detail: String::new(),
        };
        let name = |n: &str| -> ClusterName { n.parse().unwrap() };
        let token = |n: &str| Credential::Token(TokenHash(format!("hash-{n}")));
        for n in [
            "kept",
            "revoked",
            "rotated",
            "deleted",
            "certified",
            "other",
        ] {
            let Credential::Token(hash) = token(n) else {
                unreachable!()
            };
            store
                .create_cluster(&name(n), &dev, &Default::default(), &hash, audit())
                .await
                .unwrap();
        }
        let cert = || Credential::Certificate("fp-certified".into());
        store
            .add_cluster_cert(
                &name("certified"),
                "fp-certified",
                UnixMillis(i64::MAX),
                audit(),
            )
            .await
            .unwrap();
        store
            .revoke_cluster(&name("revoked"), audit())
            .await
            .unwrap();
        store
            .set_cluster_token(&name("rotated"), &TokenHash("hash-new".into()), audit())
            .await
            .unwrap();
        store
            .delete_cluster(&name("deleted"), audit())
            .await
            .unwrap();
        let held = vec![
            (name("kept"), token("kept")),
            (name("revoked"), token("revoked")),
            (name("rotated"), token("rotated")),
            (name("deleted"), token("deleted")),
            (name("certified"), cert()),
            // Another cluster's certificate names that cluster, not this one.
            (name("other"), cert()),
            (name("unknown"), token("unknown")),
        ];
        let in_force = store.credentials_in_force(&held).await.unwrap();
        assert_eq!(
            in_force,
            [(name("kept"), token("kept")), (name("certified"), cert()),].into()
        );
        // The same cluster held twice (a stale session beside a live one):
        // each credential answers for itself.
        let twice = [
            (name("rotated"), token("rotated")),
            (
                name("rotated"),
                Credential::Token(TokenHash("hash-new".into())),
            ),
        ];
        let in_force = store.credentials_in_force(&twice).await.unwrap();
        assert_eq!(in_force, [twice[1].clone()].into());
        // Many sessions: more than one statement's rows.
        let many: Vec<_> = (0..STATEMENT_ROWS * 2 + 1)
            .map(|_| (name("kept"), token("kept")))
            .collect();
        let in_force = store.credentials_in_force(&many).await.unwrap();
        assert_eq!(in_force, [(name("kept"), token("kept"))].into());
        assert!(store.credentials_in_force(&[]).await.unwrap().is_empty());
    }
}
