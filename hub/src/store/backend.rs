//! What differs between the SQL backends, and nothing else: connecting
//! (SQLite pragmas, PostgreSQL timeouts), migrations and how their version
//! is tracked, the locks a commit takes (PostgreSQL replicas serialize on
//! per-unit advisory locks and row locks; SQLite has one writer), and the
//! announcements replicas make to each other (`NOTIFY`): commits, statuses
//! and clusters created or deleted.

use std::time::Duration;

use sqlx::Connection;
use sqlx::any::AnyPoolOptions;
use sqlx::{AnyConnection, AnyPool};

use super::rows::{corrupt, db};
use super::{Announcement, StoreResult};
use crate::model::{ClusterName, Digest, EnvName, RevisionNum, UnitRef};

/// A statement with owned arguments.
pub(super) type Statement = sqlx::query::Query<'static, sqlx::Any, sqlx::any::AnyArguments>;

/// SQLite migrations, applied in order; the index + 1 is the schema
/// version (`PRAGMA user_version`).
const SQLITE_MIGRATIONS: &[&str] = &[
    include_str!("../../migrations/0001_initial.sql"),
    include_str!("../../migrations/0002_promotion.sql"),
    include_str!("../../migrations/0003_cluster_certificates.sql"),
    include_str!("../../migrations/0004_sources.sql"),
    include_str!("../../migrations/0005_cluster_seen.sql"),
    include_str!("../../migrations/0006_sessions.sql"),
];

/// PostgreSQL migrations (version tracked in `schema_version`). The same
/// model as the SQLite ones: a test compares the resulting schemas.
const POSTGRES_MIGRATIONS: &[&str] = &[
    include_str!("../../migrations/postgres/0001_schema.sql"),
    include_str!("../../migrations/postgres/0002_sources.sql"),
    include_str!("../../migrations/postgres/0003_cluster_seen.sql"),
    include_str!("../../migrations/postgres/0004_sessions.sql"),
];

/// The channel replicas announce on (PostgreSQL): a commit as
/// `ENV/UNIT:NUMBER`; a status recorded as `status:ORIGIN:CLUSTER:ENV/UNIT`,
/// clusters of an environment created or deleted as
/// `clusters:ORIGIN:ENV`, agent sessions opened or closed as
/// `sessions:ORIGIN` and a cluster's credential revoked, rotated or deleted
/// as `credentials:ORIGIN:CLUSTER`, which the replica `ORIGIN` (the store that made
/// them) ignores. Older replicas ignore what they cannot parse.
pub(super) const CHANNEL: &str = "unitsync_revisions";

/// A revision committed (by any replica).
pub(super) fn revision_payload(unit: &UnitRef, number: RevisionNum) -> String {
    format!("{unit}:{number}")
}

/// A status recorded by the store `origin`.
pub(super) fn status_payload(origin: &str, cluster: &ClusterName, unit: &UnitRef) -> String {
    format!("status:{origin}:{cluster}:{unit}")
}

/// Clusters of `env` created or deleted by the store `origin`.
pub(super) fn clusters_payload(origin: &str, env: &EnvName) -> String {
    format!("clusters:{origin}:{env}")
}

/// A cluster's credential revoked, rotated or deleted by the store `origin`.
pub(super) fn credentials_payload(origin: &str, cluster: &ClusterName) -> String {
    format!("credentials:{origin}:{cluster}")
}

/// Agent sessions opened or closed on the store `origin`'s hub.
pub(super) fn sessions_payload(origin: &str) -> String {
    format!("sessions:{origin}")
}

/// What a payload announces, unless the store `own` made it (or it is not
/// understood).
pub(super) fn parse_announcement(payload: &str, own: &str) -> Option<Announcement> {
    if let Some(rest) = payload.strip_prefix("status:") {
        let (origin, rest) = rest.split_once(':')?;
        let (cluster, unit) = rest.split_once(':')?;
        return (origin != own)
            .then(|| {
                Some(Announcement::Status(
                    cluster.parse().ok()?,
                    unit.parse().ok()?,
                ))
            })
            .flatten();
    }
    if let Some(rest) = payload.strip_prefix("credentials:") {
        let (origin, cluster) = rest.split_once(':')?;
        return (origin != own)
            .then(|| Some(Announcement::Credentials(cluster.parse().ok()?)))
            .flatten();
    }
    if let Some(origin) = payload.strip_prefix("sessions:") {
        return (origin != own).then_some(Announcement::Sessions);
    }
    if let Some(rest) = payload.strip_prefix("clusters:") {
        let (origin, env) = rest.split_once(':')?;
        return (origin != own)
            .then(|| Some(Announcement::Clusters(env.parse().ok()?)))
            .flatten();
    }
    let (unit, number) = payload.rsplit_once(':')?;
    Some(Announcement::Revision(
        unit.parse().ok()?,
        RevisionNum(number.parse().ok()?),
    ))
}

/// Advisory-lock class of unit locks (the leader lock uses the single-key
/// space, which never meets the two-key one).
const UNIT_LOCK_CLASS: i32 = 0x756e_6974;

/// Values per lock or announcement statement (PostgreSQL takes up to
/// 65,535 parameters).
const MAX_LIST: usize = 8_000;

/// The leader lock's key (PostgreSQL).
pub(super) const LEADER_LOCK: i64 = 7_274_757;

/// Longest a statement may run on PostgreSQL before it fails (a stuck
/// lock or a dead server surfaces as an error, not a hung commit).
const STATEMENT_TIMEOUT: &str = "SET statement_timeout = 30000";

/// How long a caller waits for a pooled connection.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    /// The row lock a commit takes on the unit it changes.
    pub(super) fn for_update(self) -> &'static str {
        match self {
            Backend::Sqlite => "",
            Backend::Postgres => " FOR UPDATE",
        }
    }

    /// `rows` rows of `cols` placeholders for a `VALUES` list: `($1, $2),
    /// ($3, $4)`; on SQLite anonymous ones, `(?, ?), (?, ?)` (SQLite looks a
    /// numbered parameter's name up by a linear scan, which sqlx does for
    /// every parameter: quadratic in a long list).
    /// The database's clock in Unix milliseconds, as an SQL expression
    /// (one clock for every replica).
    pub(super) fn now_millis(self) -> &'static str {
        match self {
            Backend::Sqlite => "CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)",
            Backend::Postgres => "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)",
        }
    }

    pub(super) fn values(self, rows: usize, cols: usize) -> String {
        (0..rows)
            .map(|r| {
                let row: Vec<String> = (1..=cols)
                    .map(|c| match self {
                        Backend::Sqlite => "?".to_owned(),
                        Backend::Postgres => format!("${}", r * cols + c),
                    })
                    .collect();
                format!("({})", row.join(", "))
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// PostgreSQL: a transaction-scoped lock per unit, in one global order,
    /// so that replicas committing overlapping units wait for each other
    /// (no lost revision number, no deadlock; units not created yet are
    /// covered too). One statement per 8,000 keys takes them, in key order (PostgreSQL
    /// evaluates a volatile function of the select list after its sort).
    /// SQLite: its single writer already serializes.
    pub(super) async fn lock_units<'a>(
        self,
        tx: &mut AnyConnection,
        units: impl Iterator<Item = &'a UnitRef>,
    ) -> StoreResult<()> {
        if self == Backend::Sqlite {
            return Ok(());
        }
        let mut keys: Vec<i32> = units
            .map(|u| {
                let d = Digest::of(u.to_string().as_bytes());
                i32::from_be_bytes([d.0[0], d.0[1], d.0[2], d.0[3]])
            })
            .collect();
        keys.sort_unstable();
        keys.dedup();
        for keys in keys.chunks(MAX_LIST) {
            let mut q = sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT pg_advisory_xact_lock({UNIT_LOCK_CLASS}, v.column1::int4) FROM (VALUES {}) AS v ORDER BY v.column1",
                self.values(keys.len(), 1)
            )));
            for key in keys {
                q = q.bind(*key);
            }
            q.execute(&mut *tx).await.map_err(db)?;
        }
        Ok(())
    }

    /// PostgreSQL: announces `payloads` to every replica, in `tx`
    /// (delivered when it commits); see [`Backend::notifications`].
    pub(super) async fn announce(
        self,
        tx: &mut AnyConnection,
        payloads: impl IntoIterator<Item = String>,
    ) -> StoreResult<()> {
        for q in self.notifications(payloads) {
            q.execute(&mut *tx).await.map_err(db)?;
        }
        Ok(())
    }

    /// PostgreSQL: the statements announcing `payloads` on [`CHANNEL`]
    /// (delivered when their transaction commits), one per 8,000. None on
    /// SQLite, one hub per file: the payloads are not even made.
    pub(super) fn notifications(
        self,
        payloads: impl IntoIterator<Item = String>,
    ) -> Vec<Statement> {
        if self == Backend::Sqlite {
            return Vec::new();
        }
        let payloads: Vec<String> = payloads.into_iter().collect();
        payloads
            .chunks(MAX_LIST)
            .map(|payloads| {
                let mut q = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "SELECT pg_notify('{CHANNEL}', v.column1::text) FROM (VALUES {}) AS v",
                    self.values(payloads.len(), 1)
                )));
                for p in payloads {
                    q = q.bind(p.clone());
                }
                q
            })
            .collect()
    }

    /// Applies the migrations this database has not seen; refuses a
    /// database newer than this hub.
    pub(super) async fn migrate(self, conn: &mut AnyConnection) -> StoreResult<()> {
        let (migrations, mut tx) = match self {
            Backend::Sqlite => (SQLITE_MIGRATIONS, conn.begin().await.map_err(db)?),
            Backend::Postgres => {
                sqlx::raw_sql(
                    "CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)",
                )
                .execute(&mut *conn)
                .await
                .map_err(db)?;
                let mut tx = conn.begin().await.map_err(db)?;
                // One hub migrates at a time.
                sqlx::raw_sql("LOCK TABLE schema_version IN EXCLUSIVE MODE")
                    .execute(&mut *tx)
                    .await
                    .map_err(db)?;
                (POSTGRES_MIGRATIONS, tx)
            }
        };
        let version: i64 = match self {
            Backend::Sqlite => sqlx::query_scalar("PRAGMA user_version"),
            Backend::Postgres => {
                sqlx::query_scalar("SELECT COALESCE(MAX(version), 0) FROM schema_version")
            }
        }
        .fetch_one(&mut *tx)
        .await
        .map_err(db)?;
        let known = migrations.len() as i64;
        if version > known {
            return Err(corrupt(format!(
                "database schema version {version} is newer than this hub ({known}); upgrade the hub"
            )));
        }
        for (i, sql) in migrations
            .iter()
            .enumerate()
            .skip(usize::try_from(version).unwrap_or(0))
        {
            sqlx::raw_sql(sqlx::AssertSqlSafe(*sql))
                .execute(&mut *tx)
                .await
                .map_err(db)?;
            let v = i64::try_from(i + 1).unwrap_or(i64::MAX);
            match self {
                // PRAGMA takes no bind parameters; the value is our own integer.
                Backend::Sqlite => {
                    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("PRAGMA user_version = {v}")))
                        .execute(&mut *tx)
                        .await
                }
                Backend::Postgres => {
                    sqlx::query("INSERT INTO schema_version (version) VALUES ($1)")
                        .bind(v)
                        .execute(&mut *tx)
                        .await
                }
            }
            .map_err(db)?;
        }
        tx.commit().await.map_err(db)
    }
}

/// A store's connection pools.
pub(super) struct Pools {
    pub writer: AnyPool,
    /// Reads of operators, the dashboard, promotion and sources.
    pub readers: AnyPool,
    /// Agent sessions' reads (the credential at the session's start and
    /// at each periodic re-check, the heads; also `reoffer_heads`): after
    /// a hub restart ten thousand sessions make two each within seconds,
    /// and an operator's reads must not queue behind them. SQLite: 4
    /// connections, `readers` 2 (was one pool of 4); PostgreSQL: 4 and 6
    /// (was 8), with the writer's 4 fourteen per replica.
    pub sessions: AnyPool,
}

/// Writer and reader pools of a SQLite file: WAL, `synchronous=FULL` (an
/// acknowledged write survives power loss), foreign keys; one writer
/// connection (SQLite has one writer anyway, so transactions never fail on
/// lock upgrades), readers read-only.
pub(super) async fn sqlite(path: &std::path::Path) -> StoreResult<Pools> {
    sqlx::any::install_default_drivers();
    let url = |mode: &str| format!("sqlite://{}?mode={mode}", path.display());
    let writer = AnyPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .after_connect(|conn, _| {
            Box::pin(async move {
                sqlx::raw_sql(
                    "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON; PRAGMA busy_timeout = 10000;",
                )
                .execute(&mut *conn)
                .await?;
                Ok(())
            })
        })
        .connect(&url("rwc"))
        .await
        .map_err(db)?;
    // The file exists now (the writer created it).
    let ro = url("ro");
    let readers = |size| {
        AnyPoolOptions::new()
            .max_connections(size)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .after_connect(|conn, _| {
                Box::pin(async move {
                    sqlx::raw_sql("PRAGMA foreign_keys = ON; PRAGMA busy_timeout = 10000;")
                        .execute(&mut *conn)
                        .await?;
                    Ok(())
                })
            })
            .connect(&ro)
    };
    Ok(Pools {
        writer,
        readers: readers(2).await.map_err(db)?,
        sessions: readers(4).await.map_err(db)?,
    })
}

/// Writer and reader pools of a PostgreSQL database. Pools reconnect by
/// themselves after the server restarts; every connection has a statement
/// timeout.
pub(super) async fn postgres(url: &str) -> StoreResult<Pools> {
    sqlx::any::install_default_drivers();
    let pool = |size| {
        AnyPoolOptions::new()
            .max_connections(size)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .test_before_acquire(true)
            .after_connect(|conn, _| {
                Box::pin(async move {
                    sqlx::raw_sql(STATEMENT_TIMEOUT).execute(&mut *conn).await?;
                    Ok(())
                })
            })
    };
    Ok(Pools {
        writer: pool(4).connect(url).await.map_err(db)?,
        readers: pool(6).connect(url).await.map_err(db)?,
        sessions: pool(4).connect(url).await.map_err(db)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn announcements_parse_and_a_replica_ignores_its_own() {
        let unit: UnitRef = "dev/web".parse().unwrap();
        let cluster: ClusterName = "dev-1".parse().unwrap();
        let env: EnvName = "dev".parse().unwrap();
        assert_eq!(revision_payload(&unit, RevisionNum(7)), "dev/web:7");
        assert_eq!(
            parse_announcement("dev/web:7", "me"),
            Some(Announcement::Revision(unit.clone(), RevisionNum(7)))
        );
        let status = status_payload("them", &cluster, &unit);
        assert_eq!(
            parse_announcement(&status, "me"),
            Some(Announcement::Status(cluster.clone(), unit.clone()))
        );
        assert_eq!(parse_announcement(&status, "them"), None);
        let clusters = clusters_payload("them", &env);
        assert_eq!(
            parse_announcement(&clusters, "me"),
            Some(Announcement::Clusters(env))
        );
        assert_eq!(parse_announcement(&clusters, "them"), None);
        let sessions = sessions_payload("them");
        assert_eq!(
            parse_announcement(&sessions, "me"),
            Some(Announcement::Sessions)
        );
        assert_eq!(parse_announcement(&sessions, "them"), None);
        let credentials = credentials_payload("them", &cluster);
        assert_eq!(
            parse_announcement(&credentials, "me"),
            Some(Announcement::Credentials(cluster.clone()))
        );
        assert_eq!(parse_announcement(&credentials, "them"), None);
        assert_eq!(parse_announcement("status:garbage", "me"), None);
        assert_eq!(parse_announcement("dev/web:x", "me"), None);
    }
}
