//! Rendering of CLI results as tables (for people) or JSON/YAML (for
//! scripts). The views are the CLI's own serializable shapes of the API's
//! messages.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use comfy_table::Table;
use serde::Serialize;
use unitsync_proto::v1 as pb;

use super::Format;

pub(super) fn time(t: Option<&prost_types::Timestamp>) -> String {
    let Some(t) = t else { return String::new() };
    let secs = u64::try_from(t.seconds).unwrap_or(0);
    let st: SystemTime = UNIX_EPOCH + Duration::from_secs(secs);
    humantime::format_rfc3339_seconds(st).to_string()
}

pub(super) fn phase(v: i32) -> &'static str {
    crate::grpc::convert::phase_from_pb(v).as_str()
}

fn sync(v: i32) -> &'static str {
    crate::grpc::convert::sync_name(v)
}

fn health(v: i32) -> &'static str {
    crate::grpc::convert::health_name(v)
}

#[derive(Serialize)]
pub(super) struct EnvView {
    pub name: String,
    pub position: u32,
    pub required_approvals: u32,
    pub soak_seconds: u64,
    pub auto_promote: bool,
    pub created: String,
}

impl From<&pb::Environment> for EnvView {
    fn from(e: &pb::Environment) -> Self {
        let p = e.policy.unwrap_or_default();
        Self {
            name: e.name.clone(),
            position: e.position,
            required_approvals: p.required_approvals,
            soak_seconds: p.soak_seconds,
            auto_promote: p.auto_promote,
            created: time(e.created_at.as_ref()),
        }
    }
}

#[derive(Serialize)]
pub(super) struct ClusterView {
    pub name: String,
    pub environment: String,
    pub labels: BTreeMap<String, String>,
    pub connected: bool,
    pub agent_version: String,
    /// Now while connected, else when the last session closed.
    pub last_seen: String,
    pub revoked: bool,
    pub certificate_expires: String,
    pub created: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

impl From<&pb::Cluster> for ClusterView {
    fn from(c: &pb::Cluster) -> Self {
        Self {
            name: c.name.clone(),
            environment: c.environment.clone(),
            labels: c.labels.clone().into_iter().collect(),
            connected: c.connected,
            agent_version: c.agent_version.clone(),
            last_seen: time(c.last_seen.as_ref()),
            revoked: c.revoked,
            certificate_expires: time(c.certificate_expires.as_ref()),
            created: time(c.created_at.as_ref()),
            token: None,
        }
    }
}

#[derive(Serialize)]
pub(super) struct UnitView {
    pub unit: String,
    pub head_revision: u64,
    pub destroyed: bool,
    pub labels: BTreeMap<String, String>,
    pub updated: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub upstream: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub overrides: Vec<String>,
    #[serde(skip_serializing_if = "is_zero")]
    pub promoted_from_revision: u64,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub source: String,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl From<&pb::Unit> for UnitView {
    fn from(u: &pb::Unit) -> Self {
        Self {
            unit: u.unit.clone(),
            head_revision: u.head_revision,
            destroyed: u.destroyed,
            labels: u.labels.clone().into_iter().collect(),
            updated: time(u.updated_at.as_ref()),
            upstream: u.upstream.clone(),
            overrides: u
                .overrides
                .iter()
                .map(|o| format!("{} {} {}={}", o.kind, o.name, o.path, o.value_json))
                .collect(),
            promoted_from_revision: u.promoted_from_revision,
            source: u.source.clone(),
        }
    }
}

#[derive(Serialize)]
pub(super) struct RevisionView {
    pub unit: String,
    pub revision: u64,
    pub digest: String,
    pub tombstone: bool,
    pub documents: u32,
    pub author: String,
    pub message: String,
    pub origin: String,
    pub created: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub manifests: String,
}

impl From<&pb::Revision> for RevisionView {
    fn from(r: &pb::Revision) -> Self {
        Self {
            unit: r.unit.clone(),
            revision: r.number,
            digest: r.digest.clone(),
            tombstone: r.tombstone,
            documents: r.documents,
            author: r.author.clone(),
            message: r.message.clone(),
            origin: r.origin.clone(),
            created: time(r.created_at.as_ref()),
            manifests: r.manifests.clone(),
        }
    }
}

#[derive(Serialize)]
pub(super) struct ResourceView {
    pub api_version: String,
    pub kind: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub namespace: String,
    pub name: String,
    pub sync: &'static str,
    pub health: &'static str,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub message: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub drifted_fields: Vec<String>,
}

#[derive(Serialize)]
pub(super) struct CellView {
    pub cluster: String,
    pub unit: String,
    pub acked_revision: u64,
    pub revision: u64,
    pub phase: &'static str,
    pub message: String,
    pub connected: bool,
    pub updated: String,
    pub resources: Vec<ResourceView>,
}

impl From<&pb::ClusterUnitStatus> for CellView {
    fn from(c: &pb::ClusterUnitStatus) -> Self {
        Self {
            cluster: c.cluster.clone(),
            unit: c.unit.clone(),
            acked_revision: c.acked_revision,
            revision: c.revision,
            phase: phase(c.phase),
            message: c.message.clone(),
            connected: c.connected,
            updated: time(c.updated_at.as_ref()),
            resources: c
                .resources
                .iter()
                .map(|r| ResourceView {
                    api_version: r.api_version.clone(),
                    kind: r.kind.clone(),
                    namespace: r.namespace.clone(),
                    name: r.name.clone(),
                    sync: sync(r.sync),
                    health: health(r.health),
                    message: r.message.clone(),
                    drifted_fields: r.drifted_fields.clone(),
                })
                .collect(),
        }
    }
}

#[derive(Serialize)]
pub(super) struct PromotionView {
    pub id: u64,
    pub time: String,
    pub actor: String,
    pub from: String,
    pub to: String,
    pub automatic: bool,
    pub forced: bool,
    pub reason: String,
    pub units: Vec<String>,
}

impl From<&pb::Promotion> for PromotionView {
    fn from(p: &pb::Promotion) -> Self {
        Self {
            id: p.id,
            time: time(p.time.as_ref()),
            actor: p.actor.clone(),
            from: p.from.clone(),
            to: p.to.clone(),
            automatic: p.automatic,
            forced: p.forced,
            reason: p.reason.clone(),
            units: p
                .items
                .iter()
                .map(|i| {
                    format!(
                        "{}@{} -> {}@{}",
                        i.source_unit, i.source_revision, i.target_unit, i.target_revision
                    )
                })
                .collect(),
        }
    }
}

#[derive(Serialize)]
pub(super) struct AuditView {
    pub id: u64,
    pub time: String,
    pub actor: String,
    pub action: String,
    pub target: String,
    pub detail: String,
}

impl From<&pb::AuditEntry> for AuditView {
    fn from(a: &pb::AuditEntry) -> Self {
        Self {
            id: a.id,
            time: time(a.time.as_ref()),
            actor: a.actor.clone(),
            action: a.action.clone(),
            target: a.target.clone(),
            detail: a.detail.clone(),
        }
    }
}

pub(super) fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut t = Table::new();
    t.load_preset(comfy_table::presets::NOTHING);
    t.set_header(header.iter().map(|h| h.to_uppercase()));
    for r in rows {
        t.add_row(r);
    }
    // comfy-table pads the first column with a space; trim line starts.
    t.to_string()
        .lines()
        .map(|l| {
            l.trim_end()
                .strip_prefix(' ')
                .unwrap_or(l.trim_end())
                .to_owned()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Prints a value as JSON or YAML; `None` for the table format.
pub(super) fn structured<T: Serialize>(format: Format, value: &T) -> Option<String> {
    match format {
        Format::Table => None,
        Format::Json => Some(serde_json::to_string_pretty(value).unwrap_or_default()),
        Format::Yaml => Some(serde_saphyr::to_string(value).unwrap_or_default()),
    }
}

pub(super) fn labels(l: &BTreeMap<String, String>) -> String {
    l.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}
