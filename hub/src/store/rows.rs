//! Row mapping of the SQL store: rows expose typed columns through
//! [`Columns`], and the records are built once here.

use std::str::FromStr;
use std::sync::Arc;

use super::{Operator, Seen, StoreError, StoreResult};
use crate::model::{
    AuditEntry, Cluster, Digest, EnvName, EnvPolicy, Environment, HeadRef, Labels, Phase,
    Promotion, ResourceState, Revision, RevisionNum, Role, StatusCell, Unit, UnitName, UnitRef,
    UnitStatus, UnixMillis,
};

/// Typed column access, implemented for each database's row type.
pub(super) trait Columns {
    fn int(&self, col: &str) -> StoreResult<i64>;
    fn text(&self, col: &str) -> StoreResult<String>;
    fn opt_text(&self, col: &str) -> StoreResult<Option<String>>;
}

pub(super) fn db(e: sqlx::Error) -> StoreError {
    StoreError::Database(Box::new(e))
}

pub(super) fn is_unique_violation(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .is_some_and(|d| d.is_unique_violation())
}

pub(super) fn corrupt(what: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(what.to_string())
}

macro_rules! columns_for {
    ($row:ty) => {
        impl Columns for $row {
            fn int(&self, col: &str) -> StoreResult<i64> {
                sqlx::Row::try_get(self, col).map_err(db)
            }
            fn text(&self, col: &str) -> StoreResult<String> {
                sqlx::Row::try_get(self, col).map_err(db)
            }
            fn opt_text(&self, col: &str) -> StoreResult<Option<String>> {
                sqlx::Row::try_get(self, col).map_err(db)
            }
        }
    };
}

columns_for!(sqlx::any::AnyRow);

pub(super) fn labels_json(l: &Labels) -> String {
    serde_json::to_string(l).unwrap_or_else(|_| "{}".into())
}

fn parse_labels(s: &str) -> StoreResult<Labels> {
    serde_json::from_str(s).map_err(|e| corrupt(format!("labels: {e}")))
}

pub(super) fn parse<T: FromStr>(s: &str, what: &str) -> StoreResult<T>
where
    T::Err: std::fmt::Display,
{
    s.parse().map_err(|e| corrupt(format!("{what}: {e}")))
}

pub(super) fn num(v: i64) -> RevisionNum {
    RevisionNum(u64::try_from(v).unwrap_or(0))
}

fn count<T: TryFrom<i64> + Default>(v: i64) -> T {
    T::try_from(v).unwrap_or_default()
}

pub(super) const ENV_COLUMNS: &str =
    "name, position, created_at, required_approvals, soak_seconds, auto_promote";

pub(super) fn environment(row: &impl Columns) -> StoreResult<Environment> {
    Ok(Environment {
        name: parse(&row.text("name")?, "environment name")?,
        position: count(row.int("position")?),
        created_at: UnixMillis(row.int("created_at")?),
        policy: EnvPolicy {
            required_approvals: count(row.int("required_approvals")?),
            soak_seconds: count(row.int("soak_seconds")?),
            auto_promote: row.int("auto_promote")? != 0,
        },
    })
}

pub(super) fn cluster(row: &impl Columns) -> StoreResult<Cluster> {
    Ok(Cluster {
        name: parse(&row.text("name")?, "cluster name")?,
        environment: parse(&row.text("environment")?, "environment name")?,
        labels: parse_labels(&row.text("labels")?)?,
        created_at: UnixMillis(row.int("created_at")?),
        revoked: row.int("revoked")? != 0,
        last_seen: UnixMillis(row.int("last_seen")?),
        agent_version: row.text("agent_version")?,
        cert_expires: Some(UnixMillis(row.int("cert_expires")?)).filter(|t| t.0 > 0),
    })
}

/// An agent session another replica holds, with its cluster's environment.
pub(super) fn session(row: &impl Columns) -> StoreResult<(EnvName, Seen)> {
    Ok((
        parse(&row.text("environment")?, "environment name")?,
        Seen {
            cluster: parse(&row.text("cluster")?, "cluster name")?,
            agent_version: row.text("agent_version")?,
            at: UnixMillis(row.int("connected_at")?),
        },
    ))
}

/// A unit's address from its `environment` and `name` columns.
pub(super) fn unit_ref(row: &impl Columns) -> StoreResult<UnitRef> {
    Ok(UnitRef {
        env: parse(&row.text("environment")?, "environment name")?,
        name: parse(&row.text("name")?, "unit name")?,
    })
}

pub(super) fn unit(row: &impl Columns) -> StoreResult<Unit> {
    Ok(Unit {
        unit: unit_ref(row)?,
        labels: parse_labels(&row.text("labels")?)?,
        head: num(row.int("head")?),
        destroyed: row.int("destroyed")? != 0,
        created_at: UnixMillis(row.int("created_at")?),
        updated_at: UnixMillis(row.int("updated_at")?),
        upstream: row
            .opt_text("upstream")?
            .map(|u| parse::<UnitRef>(&u, "upstream unit"))
            .transpose()?,
        overrides: serde_json::from_str(&row.text("overrides")?)
            .map_err(|e| corrupt(format!("overrides: {e}")))?,
        head_source: num(row.int("head_source")?),
        source: row.text("source")?,
    })
}

pub(super) fn source_operation(row: &impl Columns) -> StoreResult<crate::model::SourceOperation> {
    Ok(crate::model::SourceOperation {
        id: row.text("id")?,
        source: row.text("source")?,
        unit: row.text("unit")?,
        action: row.text("action")?,
        state: row.text("state")?,
        hub_revision: num(row.int("hub_revision")?),
        report: row.text("report")?,
        delivered: row.int("delivered")? != 0,
        detail: row.text("detail")?,
        created_at: UnixMillis(row.int("created_at")?),
    })
}

/// Credentials as stored (the only place a secret is written out).
#[derive(serde::Serialize, serde::Deserialize, Default)]
struct StoredAuth {
    #[serde(default)]
    kind: String,
    #[serde(default)]
    username: String,
    #[serde(default)]
    secret: String,
}

pub(super) fn auth_json(a: &crate::model::OciAuth) -> String {
    use crate::model::OciAuth;
    let stored = match a {
        OciAuth::Anonymous => StoredAuth::default(),
        OciAuth::Basic { username, password } => StoredAuth {
            kind: "basic".into(),
            username: username.clone(),
            secret: password.expose().to_owned(),
        },
        OciAuth::Bearer { token } => StoredAuth {
            kind: "bearer".into(),
            username: String::new(),
            secret: token.expose().to_owned(),
        },
    };
    serde_json::to_string(&stored).unwrap_or_else(|_| "{}".into())
}

pub(super) fn parse_auth(s: &str) -> StoreResult<crate::model::OciAuth> {
    use crate::auth::Secret;
    use crate::model::OciAuth;
    let a: StoredAuth =
        serde_json::from_str(s).map_err(|e| corrupt(format!("source credentials: {e}")))?;
    Ok(match a.kind.as_str() {
        "basic" => OciAuth::Basic {
            username: a.username,
            password: Secret::from_string(a.secret),
        },
        "bearer" => OciAuth::Bearer {
            token: Secret::from_string(a.secret),
        },
        _ => OciAuth::Anonymous,
    })
}

pub(super) fn oci_source(row: &impl Columns) -> StoreResult<crate::model::OciSource> {
    let name = row.text("name")?;
    let when = |ms: i64| (ms > 0).then_some(UnixMillis(ms));
    Ok(crate::model::OciSource {
        name: parse(&name, "source name")?,
        env: parse(&row.text("environment")?, "environment name")?,
        spec: serde_json::from_str(&row.text("spec")?)
            .map_err(|e| corrupt(format!("source {name} spec: {e}")))?,
        suspended: row.int("suspended")? != 0,
        status: serde_json::from_str(&row.text("status")?)
            .map_err(|e| corrupt(format!("source {name} status: {e}")))?,
        sync_requested: when(row.int("sync_requested")?),
        allow_prune: row.int("allow_prune")? != 0,
        created_at: UnixMillis(row.int("created_at")?),
    })
}

pub(super) fn revision(
    unit: &UnitRef,
    row: &impl Columns,
    with_content: bool,
) -> StoreResult<Revision> {
    Ok(Revision {
        unit: unit.clone(),
        number: num(row.int("number")?),
        digest: Digest::from_hex(&row.text("digest")?).ok_or_else(|| corrupt("revision digest"))?,
        tombstone: row.int("tombstone")? != 0,
        manifests: if with_content {
            Arc::from(row.text("manifests")?)
        } else {
            Arc::from("")
        },
        documents: count(row.int("documents")?),
        author: row.text("author")?,
        message: row.text("message")?,
        origin: row.text("origin")?,
        created_at: UnixMillis(row.int("created_at")?),
        source_revision: num(row.int("source_revision")?),
    })
}

pub(super) fn head(row: &impl Columns) -> StoreResult<HeadRef> {
    Ok(HeadRef {
        unit: parse::<UnitName>(&row.text("name")?, "unit name")?,
        number: num(row.int("number")?),
        digest: Digest::from_hex(&row.text("digest")?).ok_or_else(|| corrupt("revision digest"))?,
        tombstone: row.int("tombstone")? != 0,
    })
}

pub(super) fn status_cell(row: &impl Columns) -> StoreResult<StatusCell> {
    let resources: Vec<ResourceState> = serde_json::from_str(&row.text("resources")?)
        .map_err(|e| corrupt(format!("resources: {e}")))?;
    Ok(StatusCell {
        cluster: parse(&row.text("cluster")?, "cluster name")?,
        unit: unit_ref(row)?,
        status: UnitStatus {
            acked: num(row.int("acked")?),
            revision: num(row.int("revision")?),
            phase: Phase::parse(&row.text("phase")?),
            message: row.text("message")?,
            resources,
            updated_at: UnixMillis(row.int("updated_at")?),
            ready_since: UnixMillis(row.int("ready_since")?),
        },
    })
}

pub(super) fn operator(row: &impl Columns) -> StoreResult<Operator> {
    Ok(Operator {
        name: row.text("name")?,
        role: Role::parse(&row.text("role")?).ok_or_else(|| corrupt("operator role"))?,
    })
}

pub(super) fn audit(row: &impl Columns) -> StoreResult<AuditEntry> {
    Ok(AuditEntry {
        id: count(row.int("id")?),
        time: UnixMillis(row.int("time")?),
        actor: row.text("actor")?,
        action: row.text("action")?,
        target: row.text("target")?,
        detail: row.text("detail")?,
    })
}

pub(super) fn promotion(row: &impl Columns) -> StoreResult<Promotion> {
    Ok(Promotion {
        id: count(row.int("id")?),
        time: UnixMillis(row.int("time")?),
        actor: row.text("actor")?,
        from: row.text("from_env")?,
        to: row.text("to_env")?,
        automatic: row.int("automatic")? != 0,
        forced: row.int("forced")? != 0,
        reason: row.text("reason")?,
        items: serde_json::from_str(&row.text("items")?)
            .map_err(|e| corrupt(format!("promotion items: {e}")))?,
    })
}

/// A `(cluster, phase, units)` row of [`super::Store::phase_counts`].
pub(super) fn phase_count(
    row: &impl Columns,
) -> StoreResult<(crate::model::ClusterName, crate::model::Phase, u64)> {
    Ok((
        parse(&row.text("cluster")?, "cluster name")?,
        crate::model::Phase::parse(&row.text("phase")?),
        u64::try_from(row.int("n")?).unwrap_or(0),
    ))
}

/// A `(unit, phase at the head or none, clusters)` row of
/// [`super::Store::unit_phase_counts`].
pub(super) fn unit_phase_count(
    row: &impl Columns,
) -> StoreResult<(crate::model::UnitRef, Option<crate::model::Phase>, u64)> {
    let unit = unit_ref(row)?;
    let phase = row
        .opt_text("phase")?
        .map(|p| crate::model::Phase::parse(&p));
    Ok((unit, phase, u64::try_from(row.int("n")?).unwrap_or(0)))
}

/// A count or number as the databases store it.
pub(super) fn int(n: u64) -> StoreResult<i64> {
    i64::try_from(n).map_err(|_| corrupt("number out of range"))
}
