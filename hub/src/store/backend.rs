//! What differs between the SQL backends, and nothing else: connecting
//! (SQLite pragmas, PostgreSQL timeouts), migrations and how their version
//! is tracked, the locks a commit takes (PostgreSQL replicas serialize on
//! per-unit advisory locks and row locks; SQLite has one writer), and the
//! announcement of a commit to other replicas (`NOTIFY`).

use std::time::Duration;

use sqlx::Connection;
use sqlx::any::AnyPoolOptions;
use sqlx::{AnyConnection, AnyPool};

use super::StoreResult;
use super::rows::{corrupt, db};
use crate::model::{Digest, RevisionNum, UnitRef};

/// SQLite migrations, applied in order; the index + 1 is the schema
/// version (`PRAGMA user_version`).
const SQLITE_MIGRATIONS: &[&str] = &[
    include_str!("../../migrations/0001_initial.sql"),
    include_str!("../../migrations/0002_promotion.sql"),
    include_str!("../../migrations/0003_cluster_certificates.sql"),
    include_str!("../../migrations/0004_sources.sql"),
    include_str!("../../migrations/0005_cluster_seen.sql"),
];

/// PostgreSQL migrations (version tracked in `schema_version`). The same
/// model as the SQLite ones: a test compares the resulting schemas.
const POSTGRES_MIGRATIONS: &[&str] = &[
    include_str!("../../migrations/postgres/0001_schema.sql"),
    include_str!("../../migrations/postgres/0002_sources.sql"),
    include_str!("../../migrations/postgres/0003_cluster_seen.sql"),
];

/// The channel commits are announced on (PostgreSQL).
pub(super) const CHANNEL: &str = "unitsync_revisions";

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

    /// PostgreSQL: announces commits to every replica (delivered when the
    /// transaction commits), one statement per 8,000 of them.
    pub(super) async fn announce<'a>(
        self,
        tx: &mut AnyConnection,
        revisions: impl Iterator<Item = (&'a UnitRef, RevisionNum)>,
    ) -> StoreResult<()> {
        if self == Backend::Sqlite {
            return Ok(());
        }
        let payloads: Vec<String> = revisions
            .map(|(unit, number)| format!("{unit}:{number}"))
            .collect();
        for payloads in payloads.chunks(MAX_LIST) {
            let mut q = sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT pg_notify('{CHANNEL}', v.column1::text) FROM (VALUES {}) AS v",
                self.values(payloads.len(), 1)
            )));
            for p in payloads {
                q = q.bind(p.as_str());
            }
            q.execute(&mut *tx).await.map_err(db)?;
        }
        Ok(())
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
