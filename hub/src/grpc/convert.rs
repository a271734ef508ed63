//! Conversions between prost messages and domain types. Prost types stop here.

use std::time::{Duration, UNIX_EPOCH};

use unitsync_proto::v1 as pb;

use crate::control::Connection;
use crate::error::{HubError, Result};
use crate::fanout::Delivery;
use crate::model::Override;
use crate::model::{
    AuditEntry, Cluster, EnvPolicy, Environment, Phase, ResourceState, Revision, StatusCell, Unit,
    UnitStatus, UnixMillis,
};

pub fn timestamp(t: UnixMillis) -> Option<prost_types::Timestamp> {
    let t = UNIX_EPOCH + Duration::from_millis(u64::try_from(t.0).unwrap_or(0));
    Some(t.into())
}

pub fn parse<T: std::str::FromStr<Err = crate::model::NameError>>(s: &str) -> Result<T> {
    s.parse().map_err(HubError::from)
}

pub fn phase_to_pb(p: Phase) -> pb::Phase {
    match p {
        Phase::Unknown => pb::Phase::Unknown,
        Phase::Applying => pb::Phase::Applying,
        Phase::Applied => pb::Phase::Applied,
        Phase::Progressing => pb::Phase::Progressing,
        Phase::Ready => pb::Phase::Ready,
        Phase::Degraded => pb::Phase::Degraded,
        Phase::Failed => pb::Phase::Failed,
        Phase::Drifted => pb::Phase::Drifted,
        Phase::Destroyed => pb::Phase::Destroyed,
        Phase::Superseded => pb::Phase::Superseded,
    }
}

/// Unknown enum values (from a newer agent) read as `Unknown`.
pub fn phase_from_pb(v: i32) -> Phase {
    match pb::Phase::try_from(v).unwrap_or(pb::Phase::Unspecified) {
        pb::Phase::Unspecified | pb::Phase::Unknown => Phase::Unknown,
        pb::Phase::Applying => Phase::Applying,
        pb::Phase::Applied => Phase::Applied,
        pb::Phase::Progressing => Phase::Progressing,
        pb::Phase::Ready => Phase::Ready,
        pb::Phase::Degraded => Phase::Degraded,
        pb::Phase::Failed => Phase::Failed,
        pb::Phase::Drifted => Phase::Drifted,
        pb::Phase::Destroyed => Phase::Destroyed,
        pb::Phase::Superseded => Phase::Superseded,
    }
}

pub fn sync_name(v: i32) -> &'static str {
    match pb::SyncState::try_from(v).unwrap_or(pb::SyncState::Unspecified) {
        pb::SyncState::Unspecified => "Unknown",
        pb::SyncState::Synced => "Synced",
        pb::SyncState::OutOfSync => "OutOfSync",
        pb::SyncState::Failed => "Failed",
        pb::SyncState::Pruned => "Pruned",
    }
}

fn sync_value(s: &str) -> i32 {
    match s {
        "Synced" => pb::SyncState::Synced,
        "OutOfSync" => pb::SyncState::OutOfSync,
        "Failed" => pb::SyncState::Failed,
        "Pruned" => pb::SyncState::Pruned,
        _ => pb::SyncState::Unspecified,
    }
    .into()
}

pub fn health_name(v: i32) -> &'static str {
    match pb::Health::try_from(v).unwrap_or(pb::Health::Unspecified) {
        pb::Health::Unspecified => "Unknown",
        pb::Health::Ready => "Ready",
        pb::Health::InProgress => "InProgress",
        pb::Health::Failed => "Failed",
        pb::Health::Stuck => "Stuck",
        pb::Health::Terminating => "Terminating",
    }
}

fn health_value(s: &str) -> i32 {
    match s {
        "Ready" => pb::Health::Ready,
        "InProgress" => pb::Health::InProgress,
        "Failed" => pb::Health::Failed,
        "Stuck" => pb::Health::Stuck,
        "Terminating" => pb::Health::Terminating,
        _ => pb::Health::Unspecified,
    }
    .into()
}

pub fn resource_from_pb(r: pb::ResourceStatus) -> ResourceState {
    ResourceState {
        sync: sync_name(r.sync).into(),
        health: health_name(r.health).into(),
        api_version: r.api_version,
        kind: r.kind,
        namespace: r.namespace,
        name: r.name,
        message: r.message,
        drifted_fields: r.drifted_fields,
    }
}

pub fn resource_to_pb(r: &ResourceState) -> pb::ResourceStatus {
    pb::ResourceStatus {
        api_version: r.api_version.clone(),
        kind: r.kind.clone(),
        namespace: r.namespace.clone(),
        name: r.name.clone(),
        sync: sync_value(&r.sync),
        health: health_value(&r.health),
        message: r.message.clone(),
        drifted_fields: r.drifted_fields.clone(),
    }
}

pub fn environment(e: &Environment) -> pb::Environment {
    pb::Environment {
        name: e.name.to_string(),
        position: e.position,
        created_at: timestamp(e.created_at),
        policy: Some(pb::EnvironmentPolicy {
            required_approvals: e.policy.required_approvals,
            soak_seconds: e.policy.soak_seconds,
            auto_promote: e.policy.auto_promote,
        }),
    }
}

pub fn env_policy(p: pb::EnvironmentPolicy) -> EnvPolicy {
    EnvPolicy {
        required_approvals: p.required_approvals,
        soak_seconds: p.soak_seconds,
        auto_promote: p.auto_promote,
    }
}

pub fn cluster(c: &Cluster, session: Option<&Connection>) -> pb::Cluster {
    pb::Cluster {
        name: c.name.to_string(),
        environment: c.environment.to_string(),
        labels: c.labels.clone().into_iter().collect(),
        created_at: timestamp(c.created_at),
        connected: session.is_some(),
        last_seen: match session {
            Some(_) => timestamp(UnixMillis::now()),
            None if c.last_seen.0 > 0 => timestamp(c.last_seen),
            None => None,
        },
        agent_version: match session {
            Some(s) => s.agent_version.clone(),
            None => c.agent_version.clone(),
        },
        revoked: c.revoked,
        certificate_expires: c.cert_expires.and_then(timestamp),
    }
}

pub fn unit(u: &Unit) -> pb::Unit {
    pb::Unit {
        unit: u.unit.to_string(),
        labels: u.labels.clone().into_iter().collect(),
        head_revision: u.head.0,
        destroyed: u.destroyed,
        created_at: timestamp(u.created_at),
        updated_at: timestamp(u.updated_at),
        upstream: u
            .upstream
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
        overrides: u.overrides.iter().map(override_to_pb).collect(),
        promoted_from_revision: u.head_source.0,
        source: u.source.clone(),
    }
}

pub fn override_to_pb(o: &Override) -> pb::Override {
    pb::Override {
        kind: o.kind.clone(),
        name: o.name.clone(),
        namespace: o.namespace.clone().unwrap_or_default(),
        path: o.path.clone(),
        value_json: o.value.to_string(),
    }
}

pub fn override_from_pb(o: pb::Override) -> Result<Override> {
    let value = serde_json::from_str(&o.value_json).map_err(|e| {
        HubError::InvalidArgument(format!(
            "override {} of {} {}: value is not JSON: {e}",
            o.path, o.kind, o.name
        ))
    })?;
    if o.kind.is_empty() || o.name.is_empty() || o.path.is_empty() {
        return Err(HubError::InvalidArgument(
            "an override needs kind, name and path".into(),
        ));
    }
    if o.path.split('.').any(str::is_empty) {
        return Err(HubError::InvalidArgument(format!(
            "override {:?} of {} {}: a path is field names and list indexes joined by dots (spec.template.spec.containers.0.image)",
            o.path, o.kind, o.name
        )));
    }
    Ok(Override {
        kind: o.kind,
        name: o.name,
        namespace: (!o.namespace.is_empty()).then_some(o.namespace),
        path: o.path,
        value,
        // Stamped when the overrides are set.
        reviewed_at: crate::model::RevisionNum(0),
    })
}

pub fn promotion_item(i: &crate::promote::PlanItem) -> pb::PromotionItem {
    pb::PromotionItem {
        source_unit: i.source.to_string(),
        source_revision: i.source_revision.0,
        target_unit: i.target.to_string(),
        target_revision: i.committed.0,
        diff: i.diff.clone(),
        gates: i
            .gates
            .iter()
            .map(|g| pb::GateResult {
                gate: g.name.into(),
                passed: g.passed,
                detail: g.detail.clone(),
            })
            .collect(),
        skipped: i.skipped.clone().unwrap_or_default(),
    }
}

pub fn promotion(p: &crate::model::Promotion) -> pb::Promotion {
    pb::Promotion {
        id: p.id,
        time: timestamp(p.time),
        actor: p.actor.clone(),
        from: p.from.clone(),
        to: p.to.clone(),
        automatic: p.automatic,
        forced: p.forced,
        reason: p.reason.clone(),
        items: p
            .items
            .iter()
            .map(|i| pb::PromotionItem {
                source_unit: i.source_unit.clone(),
                source_revision: i.source_revision,
                target_unit: i.target_unit.clone(),
                target_revision: i.target_revision,
                ..Default::default()
            })
            .collect(),
    }
}

pub fn revision(r: &Revision) -> pb::Revision {
    pb::Revision {
        unit: r.unit.to_string(),
        number: r.number.0,
        digest: r.digest.to_hex(),
        tombstone: r.tombstone,
        manifests: r.manifests.to_string(),
        author: r.author.clone(),
        message: r.message.clone(),
        origin: r.origin.clone(),
        created_at: timestamp(r.created_at),
        documents: r.documents,
    }
}

pub fn status_cell(c: &StatusCell, connected: bool) -> pb::ClusterUnitStatus {
    let UnitStatus {
        acked,
        revision,
        phase,
        message,
        resources,
        updated_at,
        ready_since: _,
    } = &c.status;
    pb::ClusterUnitStatus {
        cluster: c.cluster.to_string(),
        unit: c.unit.to_string(),
        acked_revision: acked.0,
        revision: revision.0,
        phase: phase_to_pb(*phase).into(),
        message: message.clone(),
        resources: resources.iter().map(resource_to_pb).collect(),
        updated_at: timestamp(*updated_at),
        connected,
    }
}

pub fn audit(a: &AuditEntry) -> pb::AuditEntry {
    pb::AuditEntry {
        id: a.id,
        time: timestamp(a.time),
        actor: a.actor.clone(),
        action: a.action.clone(),
        target: a.target.clone(),
        detail: a.detail.clone(),
    }
}

/// A delivery as its sessions send it: encoded on first use, then shared.
pub fn encoded_update(d: &Delivery) -> bytes::Bytes {
    d.wire
        .get_or_init(|| unitsync_proto::outgoing::encode_update(&update(d)))
        .clone()
}

pub fn update(d: &Delivery) -> pb::UnitUpdate {
    pb::UnitUpdate {
        unit: d.unit.to_string(),
        revision: d.revision.0,
        digest: d.digest.map(|x| x.to_hex()).unwrap_or_default(),
        tombstone: d.tombstone,
        manifests: if d.tombstone {
            String::new()
        } else {
            d.manifests.to_string()
        },
        environment: d.env.to_string(),
        committed_at: Some(d.committed_at.into()),
    }
}

/// A page of the status matrix: units, clusters (with their sessions) and
/// cells (connected or not).
pub fn status_view(
    v: &crate::control::StatusView,
) -> (Vec<pb::Unit>, Vec<pb::Cluster>, Vec<pb::ClusterUnitStatus>) {
    (
        v.units.iter().map(unit).collect(),
        v.clusters
            .iter()
            .map(|(c, s)| cluster(c, s.as_ref()))
            .collect(),
        v.cells
            .iter()
            .map(|c| status_cell(c, v.connected.contains(&c.cluster)))
            .collect(),
    )
}

/// A source as operators see it (never its credentials).
pub fn source(s: &crate::model::OciSource, auth_kind: &str, username: &str) -> pb::Source {
    use crate::model::OciRef;
    let (tag, semver, digest) = match &s.spec.reference {
        OciRef::Tag(t) => (t.clone(), String::new(), String::new()),
        OciRef::Semver(r) => (String::new(), r.clone(), String::new()),
        OciRef::Digest(d) => (String::new(), String::new(), d.clone()),
    };
    let st = &s.status;
    pb::Source {
        name: s.name.to_string(),
        environment: s.env.to_string(),
        url: s.spec.url.clone(),
        tag,
        semver,
        digest,
        interval_seconds: s.spec.interval_seconds,
        mode: s.spec.mode.as_str().into(),
        layer_media_type: s.spec.layer_media_type.clone(),
        insecure_hosts: s.spec.insecure_hosts.clone(),
        has_ca: !s.spec.ca_pem.is_empty(),
        auth: auth_kind.into(),
        username: username.into(),
        suspended: s.suspended,
        status: Some(pb::SourceStatus {
            last_digest: st.last_digest.clone(),
            last_revision: st.last_revision.clone(),
            last_attempt: st.last_attempt.and_then(timestamp),
            last_success: st.last_success.and_then(timestamp),
            last_error: st.last_error.clone(),
            last_result: st.last_result.clone(),
            next_check: if s.suspended {
                None
            } else {
                st.next_check.and_then(timestamp)
            },
            units: st.units.clone(),
            metadata: st.metadata.clone().into_iter().collect(),
        }),
        created_at: timestamp(s.created_at),
    }
}

/// A new source from the wire: exactly one reference, a known mode, the
/// credentials (write-only).
pub fn source_from_pb(
    r: pb::CreateSourceRequest,
) -> Result<(crate::model::OciSource, crate::model::OciAuth)> {
    use crate::auth::Secret;
    use crate::model::{OciAuth, OciRef, OciSource, OciSpec, SourceStatus};
    let s = r
        .source
        .ok_or_else(|| HubError::InvalidArgument("the request carries no source".into()))?;
    let name: crate::model::SourceName = parse(&s.name)?;
    let bad = |m: String| HubError::InvalidArgument(format!("source {name}: {m}"));
    let reference = match (s.tag.is_empty(), s.semver.is_empty(), s.digest.is_empty()) {
        (_, _, false) => OciRef::Digest(s.digest),
        (_, false, true) => OciRef::Semver(s.semver),
        (false, true, true) => OciRef::Tag(s.tag),
        (true, true, true) => OciRef::Tag("latest".into()),
    };
    let mode = if s.mode.is_empty() {
        crate::model::SourceMode::Artifact
    } else {
        s.mode.parse().map_err(bad)?
    };
    let auth = match (
        s.username.is_empty(),
        r.password.is_empty(),
        r.bearer_token.is_empty(),
    ) {
        (true, true, true) => OciAuth::Anonymous,
        (false, false, true) => OciAuth::Basic {
            username: s.username,
            password: Secret::from_string(r.password),
        },
        (true, true, false) => OciAuth::Bearer {
            token: Secret::from_string(r.bearer_token),
        },
        _ => {
            return Err(bad(
                "give a username with a password, or a bearer token, or neither".into(),
            ));
        }
    };
    Ok((
        OciSource {
            name: name.clone(),
            env: parse(&s.environment)?,
            spec: OciSpec {
                url: s.url,
                reference,
                interval_seconds: if s.interval_seconds == 0 {
                    60
                } else {
                    s.interval_seconds
                },
                mode,
                layer_media_type: s.layer_media_type,
                insecure_hosts: s.insecure_hosts,
                ca_pem: r.ca_pem,
            },
            suspended: s.suspended,
            status: SourceStatus::default(),
            sync_requested: None,
            allow_prune: false,
            created_at: UnixMillis::now(),
        },
        auth,
    ))
}

#[cfg(test)]
mod tests {

    #[test]
    fn an_override_path_with_an_empty_segment_is_refused_naming_it() {
        let o = |path: &str| pb::Override {
            kind: "Deployment".into(),
            name: "web".into(),
            namespace: String::new(),
            path: path.into(),
            value_json: "1".into(),
        };
        for bad in [".", "spec..replicas", "spec.replicas."] {
            let e = override_from_pb(o(bad)).unwrap_err().to_string();
            assert!(
                e.contains(&format!("override {bad:?} of Deployment web")),
                "{e}"
            );
        }
        override_from_pb(o("spec.template.spec.containers.0.image")).unwrap();
    }

    use proptest::prelude::*;
    use prost::Message;

    use super::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

        /// Whatever bytes a peer sends, decoding and conversion end in a
        /// value or a clean error, never a panic.
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            if let Ok(m) = pb::AgentMessage::decode(bytes.as_slice())
                && let Some(pb::agent_message::Msg::Status(s)) = m.msg
            {
                let _ = phase_from_pb(s.phase);
                for r in s.resources {
                    let _ = resource_from_pb(r);
                }
            }
            let _ = pb::HubMessage::decode(bytes.as_slice());
            if let Ok(o) = pb::Override::decode(bytes.as_slice()) {
                let _ = override_from_pb(o);
            }
            let _ = pb::PutUnitRequest::decode(bytes.as_slice());
            let _ = pb::PromoteRequest::decode(bytes.as_slice());
        }
    }
}
