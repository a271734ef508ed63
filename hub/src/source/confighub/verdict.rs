//! What ConfigHub hears about an operation, from the clusters' statuses:
//! the verdict on one revision across an environment's clusters (done,
//! failed, stuck or still waiting, naming the clusters), and each
//! resource's status rolled up across them (worst first).

use std::collections::BTreeMap;

use super::wire::{self, ResourceStatus, readiness};
use crate::model::{ClusterName, Phase, RevisionNum, StatusCell};

/// Where the clusters of an environment stand on one revision.
#[derive(Debug, PartialEq)]
pub(super) enum Verdict {
    Done,
    Failed(Vec<String>),
    Stuck(Vec<String>),
    Waiting(Vec<String>),
}

pub(super) fn judge(
    clusters: &[ClusterName],
    cells: &[StatusCell],
    revision: RevisionNum,
    want: Phase,
) -> Verdict {
    if clusters.is_empty() {
        return Verdict::Waiting(vec!["the environment has no clusters yet".into()]);
    }
    let mut failed = Vec::new();
    let mut stuck = Vec::new();
    let mut waiting = Vec::new();
    for c in clusters {
        let cell = cells.iter().find(|x| x.cluster == *c);
        let line = |s: &crate::model::UnitStatus| {
            if s.message.is_empty() {
                format!("{c}: {}", s.phase.as_str())
            } else {
                format!("{c}: {} {}", s.phase.as_str(), s.message)
            }
        };
        match cell.map(|x| &x.status) {
            Some(s) if s.revision == revision && s.phase == want => {}
            Some(s) if s.revision == revision && s.phase == Phase::Failed => failed.push(line(s)),
            Some(s) if s.revision == revision && s.phase == Phase::Degraded => stuck.push(line(s)),
            Some(s) if s.revision == revision => waiting.push(line(s)),
            Some(s) if s.acked >= revision => waiting.push(format!("{c}: received")),
            Some(s) if s.revision > revision => {
                waiting.push(format!("{c}: already on revision {}", s.revision))
            }
            _ => waiting.push(format!("{c}: pending")),
        }
    }
    if !failed.is_empty() {
        Verdict::Failed(failed)
    } else if !stuck.is_empty() && waiting.is_empty() {
        Verdict::Stuck(stuck)
    } else if !waiting.is_empty() || !stuck.is_empty() {
        waiting.extend(stuck);
        Verdict::Waiting(waiting)
    } else {
        Verdict::Done
    }
}

/// Per-resource status rolled up across clusters (worst wins; the message
/// names the clusters that are not Ready).
pub(super) fn rollup(
    cells: &[StatusCell],
    revision: RevisionNum,
) -> BTreeMap<String, ResourceStatus> {
    fn rank(r: &str) -> u8 {
        match r {
            readiness::READY => 0,
            readiness::IN_PROGRESS => 1,
            readiness::UNKNOWN => 2,
            readiness::TERMINATING => 3,
            readiness::STUCK => 4,
            _ => 5,
        }
    }
    let mut out: BTreeMap<String, (ResourceStatus, Vec<String>)> = BTreeMap::new();
    for c in cells.iter().filter(|c| c.status.revision == revision) {
        let updated = wire::rfc3339(c.status.updated_at.to_system_time());
        for res in &c.status.resources {
            let key = wire::resource_key(&res.api_version, &res.kind, &res.namespace, &res.name);
            let ready = match res.health.as_str() {
                "Ready" => readiness::READY,
                "InProgress" => readiness::IN_PROGRESS,
                "Stuck" => readiness::STUCK,
                "Failed" => readiness::FAILED,
                "Terminating" => readiness::TERMINATING,
                _ => readiness::UNKNOWN,
            };
            let sync = match res.sync.as_str() {
                "Synced" | "Pruned" => wire::sync::SYNCED,
                "Failed" => wire::sync::FAILED,
                _ => wire::sync::PENDING,
            };
            let entry = out.entry(key).or_insert_with(|| {
                (
                    ResourceStatus {
                        sync_status: sync.into(),
                        readiness: ready.into(),
                        message: String::new(),
                        updated_at: updated.clone(),
                    },
                    Vec::new(),
                )
            });
            if rank(ready) > rank(&entry.0.readiness) {
                entry.0.readiness = ready.into();
            }
            if sync == wire::sync::FAILED
                || (sync == wire::sync::PENDING && entry.0.sync_status == wire::sync::SYNCED)
            {
                entry.0.sync_status = sync.into();
            }
            if ready != readiness::READY {
                entry.1.push(if res.message.is_empty() {
                    format!("{}: {ready}", c.cluster)
                } else {
                    format!("{}: {ready} {}", c.cluster, res.message)
                });
            }
            entry.0.updated_at = entry.0.updated_at.clone().max(updated.clone());
        }
    }
    out.into_iter()
        .map(|(k, (mut s, notes))| {
            s.message = notes.join("; ");
            (k, s)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ResourceState, UnitStatus};

    fn cell(cluster: &str, revision: u64, phase: Phase, message: &str) -> StatusCell {
        StatusCell {
            cluster: cluster.parse().unwrap(),
            unit: "dev/web".parse().unwrap(),
            status: UnitStatus {
                revision: RevisionNum(revision),
                acked: RevisionNum(revision),
                phase,
                message: message.into(),
                resources: vec![ResourceState {
                    api_version: "apps/v1".into(),
                    kind: "Deployment".into(),
                    namespace: "web".into(),
                    name: "web".into(),
                    sync: "Synced".into(),
                    health: if phase == Phase::Ready {
                        "Ready"
                    } else {
                        "InProgress"
                    }
                    .into(),
                    message: message.into(),
                    drifted_fields: vec![],
                }],
                ..Default::default()
            },
        }
    }

    #[test]
    fn the_verdict_needs_every_cluster_and_names_the_failing_ones() {
        let clusters: Vec<ClusterName> = ["a", "b"].iter().map(|c| c.parse().unwrap()).collect();
        let r = RevisionNum(3);
        assert_eq!(
            judge(
                &clusters,
                &[cell("a", 3, Phase::Ready, "")],
                r,
                Phase::Ready
            ),
            Verdict::Waiting(vec!["b: pending".into()])
        );
        let both = [
            cell("a", 3, Phase::Ready, ""),
            cell("b", 3, Phase::Ready, ""),
        ];
        assert_eq!(judge(&clusters, &both, r, Phase::Ready), Verdict::Done);
        let failing = [
            cell("a", 3, Phase::Ready, ""),
            cell("b", 3, Phase::Failed, "boom"),
        ];
        assert_eq!(
            judge(&clusters, &failing, r, Phase::Ready),
            Verdict::Failed(vec!["b: Failed boom".into()])
        );
        assert!(matches!(
            judge(&[], &both, r, Phase::Ready),
            Verdict::Waiting(_)
        ));
    }

    #[test]
    fn resource_statuses_roll_up_worst_first_and_name_the_clusters() {
        let cells = [
            cell("a", 3, Phase::Ready, ""),
            cell("b", 3, Phase::Progressing, "rolling out"),
        ];
        let r = rollup(&cells, RevisionNum(3));
        let s = &r["apps/v1/Deployment#web/web"];
        assert_eq!(s.readiness, readiness::IN_PROGRESS);
        assert_eq!(s.message, "b: InProgress rolling out");
    }
}
