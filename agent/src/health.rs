//! Health of applied objects, kstatus-style rules per kind plus a `Stuck`
//! state for failures that will not fix themselves (image pulls, crash
//! loops, progress deadlines), and the roll-up to a unit phase.

use serde_json::Value;

/// Health of one resource.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Health {
    Ready,
    InProgress,
    Terminating,
    Failed,
    Stuck,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Ready => "Ready",
            Health::InProgress => "InProgress",
            Health::Terminating => "Terminating",
            Health::Failed => "Failed",
            Health::Stuck => "Stuck",
        }
    }
}

/// A resource's health and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assessment {
    pub health: Health,
    pub message: String,
}

fn a(health: Health, message: impl Into<String>) -> Assessment {
    Assessment {
        health,
        message: message.into(),
    }
}

fn condition<'a>(obj: &'a Value, ty: &str) -> Option<&'a Value> {
    obj["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == ty)
}

fn is_true(obj: &Value, ty: &str) -> bool {
    condition(obj, ty).is_some_and(|c| c["status"] == "True")
}

fn int(v: &Value) -> i64 {
    v.as_i64().unwrap_or(0)
}

/// What is known of a live object's type besides the object.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TypeInfo {
    /// It serves a `status` subresource: a controller is expected to report
    /// (a custom resource of a type without one, such as a ServiceMonitor,
    /// has nothing to wait for).
    pub reports_status: bool,
}

/// Assesses one live object. `pods` are the pods selected by a workload
/// (used to name image-pull and crash-loop failures).
pub fn assess(obj: &Value, pods: &[Value], ty: TypeInfo) -> Assessment {
    if obj["metadata"]["deletionTimestamp"].is_string() {
        return a(Health::Terminating, "being deleted");
    }
    let api_version = obj["apiVersion"].as_str().unwrap_or("");
    let group = api_version.rsplit_once('/').map_or("", |(g, _)| g);
    let kind = obj["kind"].as_str().unwrap_or("");
    let generation = obj["metadata"]["generation"].as_i64();
    let observed = obj["status"]["observedGeneration"].as_i64();
    let spec_replicas = obj["spec"]["replicas"].as_i64().unwrap_or(1);
    let status = &obj["status"];
    match (group, kind) {
        ("apps", "Deployment") => {
            // A new generation first: what the controller said of the
            // previous one (its deadline, its pods) is not about this one.
            if generation.is_some() && observed != generation {
                return a(
                    Health::InProgress,
                    "waiting for the controller to observe the new generation",
                );
            }
            if let Some(c) = condition(obj, "Progressing")
                && c["reason"] == "ProgressDeadlineExceeded"
            {
                return a(
                    Health::Stuck,
                    format!(
                        "ProgressDeadlineExceeded: {}",
                        c["message"].as_str().unwrap_or("")
                    ),
                );
            }
            if let Some(m) = stuck_pod(pods) {
                return a(Health::Stuck, m);
            }
            let updated = int(&status["updatedReplicas"]);
            let ready = int(&status["readyReplicas"]);
            let available = int(&status["availableReplicas"]);
            let replicas = int(&status["replicas"]);
            if updated < spec_replicas
                || ready < spec_replicas
                || available < spec_replicas
                || replicas > spec_replicas
            {
                return a(
                    Health::InProgress,
                    format!("{ready}/{spec_replicas} replicas ready, {updated} updated"),
                );
            }
            if spec_replicas > 0 && !is_true(obj, "Available") {
                return a(Health::InProgress, "not Available yet");
            }
            a(
                Health::Ready,
                format!("{ready}/{spec_replicas} replicas ready"),
            )
        }
        ("apps", "StatefulSet") => {
            if generation.is_some() && observed != generation {
                return a(
                    Health::InProgress,
                    "waiting for the controller to observe the new generation",
                );
            }
            if let Some(m) = stuck_pod(pods) {
                return a(Health::Stuck, m);
            }
            let ready = int(&status["readyReplicas"]);
            let in_progress = || {
                a(
                    Health::InProgress,
                    format!("{ready}/{spec_replicas} replicas ready"),
                )
            };
            if ready < spec_replicas {
                return in_progress();
            }
            // Scaling down: the pods above the new count are still going.
            let replicas = int(&status["replicas"]);
            if replicas > spec_replicas {
                return a(
                    Health::InProgress,
                    format!("scaling down: {replicas} pods, {spec_replicas} wanted"),
                );
            }
            // As kstatus reads it: pods of an `OnDelete` set update when
            // deleted; a partitioned rollout updates those above it only.
            let strategy = &obj["spec"]["updateStrategy"];
            if strategy["type"] == "OnDelete" {
                return a(
                    Health::Ready,
                    format!("{ready}/{spec_replicas} replicas ready (updated on delete)"),
                );
            }
            let partition = int(&strategy["rollingUpdate"]["partition"]);
            if partition > 0 {
                let updated = int(&status["updatedReplicas"]);
                let want = (spec_replicas - partition).max(0);
                if updated < want {
                    return a(
                        Health::InProgress,
                        format!("partitioned rollout: {updated}/{want} replicas updated"),
                    );
                }
                return a(
                    Health::Ready,
                    format!(
                        "{ready}/{spec_replicas} replicas ready; partitioned rollout complete ({updated} updated)"
                    ),
                );
            }
            if int(&status["currentReplicas"]) < spec_replicas
                || status["currentRevision"] != status["updateRevision"]
            {
                return in_progress();
            }
            a(
                Health::Ready,
                format!("{ready}/{spec_replicas} replicas ready"),
            )
        }
        ("apps", "DaemonSet") => {
            if let Some(m) = stuck_pod(pods) {
                return a(Health::Stuck, m);
            }
            if observed.is_none() || observed != generation {
                return a(
                    Health::InProgress,
                    "waiting for the controller to observe the new generation",
                );
            }
            let desired = status["desiredNumberScheduled"].as_i64();
            match desired {
                Some(d)
                    if int(&status["numberAvailable"]) >= d
                        && int(&status["numberReady"]) >= d
                        && int(&status["updatedNumberScheduled"]) >= d =>
                {
                    a(Health::Ready, format!("{d} pods ready"))
                }
                _ => a(Health::InProgress, "pods not all ready"),
            }
        }
        ("batch", "Job") => {
            if is_true(obj, "Failed") {
                let c = condition(obj, "Failed").cloned().unwrap_or_default();
                return a(
                    Health::Failed,
                    format!(
                        "{}: {}",
                        c["reason"].as_str().unwrap_or("Failed"),
                        c["message"].as_str().unwrap_or("")
                    ),
                );
            }
            if is_true(obj, "Complete") {
                return a(Health::Ready, "complete");
            }
            // Applied suspended (a queue admits it later): nothing to wait
            // for, and nothing failed.
            if obj["spec"]["suspend"] == true {
                return a(Health::Ready, "suspended; runs once resumed");
            }
            a(Health::InProgress, "running")
        }
        ("apiextensions.k8s.io", "CustomResourceDefinition") => {
            if condition(obj, "NamesAccepted").is_some_and(|c| c["status"] == "False") {
                return a(Health::Failed, "names not accepted");
            }
            if is_true(obj, "Established") {
                return a(Health::Ready, "established");
            }
            // Refused for anything but still being installed.
            if let Some(c) = condition(obj, "Established")
                && c["status"] == "False"
                && c["reason"] != "Installing"
            {
                return a(
                    Health::Failed,
                    format!(
                        "not established: {}: {}",
                        c["reason"].as_str().unwrap_or(""),
                        c["message"].as_str().unwrap_or("")
                    ),
                );
            }
            a(Health::InProgress, "not established yet")
        }
        ("", "Namespace") => match status["phase"].as_str() {
            Some("Active") => a(Health::Ready, "active"),
            Some(p) => a(Health::InProgress, p),
            None => a(Health::InProgress, "no phase yet"),
        },
        ("", "PersistentVolumeClaim") => match status["phase"].as_str() {
            Some("Bound") => a(Health::Ready, "bound"),
            Some("Lost") => a(Health::Failed, "volume lost"),
            _ => a(Health::InProgress, "not bound yet"),
        },
        ("", "Service") => {
            if obj["spec"]["type"] == "LoadBalancer"
                && status["loadBalancer"]["ingress"]
                    .as_array()
                    .is_none_or(Vec::is_empty)
            {
                return a(Health::InProgress, "waiting for a load balancer address");
            }
            a(Health::Ready, "")
        }
        _ => generic(obj, group, ty, generation, observed),
    }
}

/// A group of Kubernetes itself (`apps`, `networking.k8s.io`, ...): its
/// kinds without rules above have nothing to report (an Ingress, a
/// NetworkPolicy, a webhook configuration).
fn built_in(group: &str) -> bool {
    !group.contains('.') || group.ends_with(".k8s.io")
}

/// Custom resources (Crossplane and friends) and kinds without rules of
/// their own: observedGeneration (of the status or of its conditions), then
/// `Stalled`, `Ready`/`Synced` conditions; a custom resource of a type that
/// reports status waits for its first report.
fn generic(
    obj: &Value,
    group: &str,
    ty: TypeInfo,
    generation: Option<i64>,
    observed: Option<i64>,
) -> Assessment {
    let conditions = obj["status"]["conditions"].as_array();
    let has_conditions = conditions.is_some_and(|c| !c.is_empty());
    // Controllers that record the generation on each condition only
    // (Crossplane's, many others): a condition of an older one is stale.
    let stale_condition = generation.is_some_and(|g| {
        conditions.into_iter().flatten().any(|c| {
            matches!(c["type"].as_str(), Some("Ready" | "Synced" | "Stalled"))
                && c["observedGeneration"].as_i64().is_some_and(|o| o != g)
        })
    });
    let stale_status = matches!((generation, observed), (Some(g), Some(o)) if g != o);
    if stale_status || stale_condition {
        return a(
            Health::InProgress,
            "waiting for the controller to observe the new generation",
        );
    }
    if is_true(obj, "Stalled") {
        let c = condition(obj, "Stalled").cloned().unwrap_or_default();
        return a(
            Health::Stuck,
            c["message"].as_str().unwrap_or("stalled").to_owned(),
        );
    }
    for ty in ["Synced", "Ready"] {
        if let Some(c) = condition(obj, ty)
            && c["status"] == "False"
        {
            let reason = c["reason"].as_str().unwrap_or("");
            let msg = format!(
                "{ty}=False {reason}: {}",
                c["message"].as_str().unwrap_or("")
            );
            let health = if reason.contains("Error") || reason.contains("Failed") {
                Health::Failed
            } else {
                Health::InProgress
            };
            return a(health, msg);
        }
    }
    if ty.reports_status && !built_in(group) && !has_conditions && observed.is_none() {
        // A custom resource whose controller has not reported yet.
        return a(Health::InProgress, "no status reported yet");
    }
    if condition(obj, "Ready").is_some() && !is_true(obj, "Ready") {
        return a(Health::InProgress, "Ready is not True yet");
    }
    a(Health::Ready, "")
}

/// The pods of a Deployment's current revision: those of its newest
/// ReplicaSet (highest `deployment.kubernetes.io/revision`), by the
/// `pod-template-hash` label they share; all of them when the ReplicaSets
/// say nothing. An old revision's failing pods, on their way out during a
/// rollout that fixes them, do not make the new one Stuck.
pub fn current_pods(pods: Vec<Value>, replica_sets: &[Value]) -> Vec<Value> {
    let revision = |rs: &Value| {
        rs["metadata"]["annotations"]["deployment.kubernetes.io/revision"]
            .as_str()
            .and_then(|r| r.parse::<u64>().ok())
    };
    let Some(hash) = replica_sets
        .iter()
        .filter_map(|rs| Some((revision(rs)?, rs)))
        .max_by_key(|(r, _)| *r)
        .and_then(|(_, rs)| rs["metadata"]["labels"]["pod-template-hash"].as_str())
    else {
        return pods;
    };
    pods.into_iter()
        .filter(|p| p["metadata"]["labels"]["pod-template-hash"] == hash)
        .collect()
}

/// Whether any of `pods` is failing in a way that will not fix itself.
pub fn any_stuck(pods: &[Value]) -> bool {
    stuck_pod(pods).is_some()
}

/// A pod failing in a way that will not fix itself; one being deleted is
/// on its way out and says nothing.
fn stuck_pod(pods: &[Value]) -> Option<String> {
    for p in pods
        .iter()
        .filter(|p| !p["metadata"]["deletionTimestamp"].is_string())
    {
        for cs in p["status"]["containerStatuses"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let reason = cs["state"]["waiting"]["reason"].as_str().unwrap_or("");
            if matches!(
                reason,
                "ImagePullBackOff"
                    | "ErrImagePull"
                    | "CrashLoopBackOff"
                    | "CreateContainerConfigError"
                    | "InvalidImageName"
            ) {
                return Some(format!(
                    "pod {} container {}: {reason}: {}",
                    p["metadata"]["name"].as_str().unwrap_or(""),
                    cs["name"].as_str().unwrap_or(""),
                    cs["state"]["waiting"]["message"].as_str().unwrap_or("")
                ));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn deployments() {
        let d = |status: Value| json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"generation": 2}, "spec": {"replicas": 2}, "status": status});
        assert_eq!(
            assess(
                &d(json!({"observedGeneration": 1})),
                &[],
                TypeInfo::default()
            )
            .health,
            Health::InProgress
        );
        let ready = json!({"observedGeneration": 2, "replicas": 2, "updatedReplicas": 2, "readyReplicas": 2, "availableReplicas": 2,
            "conditions": [{"type": "Available", "status": "True"}, {"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable"}]});
        assert_eq!(
            assess(&d(ready), &[], TypeInfo::default()).health,
            Health::Ready
        );
        let stuck = json!({"observedGeneration": 2, "conditions": [{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded", "message": "timed out"}]});
        let s = assess(&d(stuck), &[], TypeInfo::default());
        assert_eq!(s.health, Health::Stuck);
        assert!(s.message.contains("ProgressDeadlineExceeded"));
        let pod = json!({"metadata": {"name": "p"}, "status": {"containerStatuses": [{"name": "app", "state": {"waiting": {"reason": "ImagePullBackOff", "message": "Back-off pulling image x"}}}]}});
        let s = assess(
            &d(json!({"observedGeneration": 2})),
            &[pod],
            TypeInfo::default(),
        );
        assert_eq!(s.health, Health::Stuck);
        assert!(s.message.contains("ImagePullBackOff"));
    }

    /// A partitioned rollout (a canary) is done once the replicas above
    /// the partition are updated; an `OnDelete` StatefulSet once its pods
    /// are ready (its pods update when deleted). Both stayed in progress
    /// for good, blocking promotions.
    #[test]
    fn statefulsets_with_a_partition_or_on_delete() {
        let sts = |strategy: Value, status: Value| json!({"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"generation": 2}, "spec": {"replicas": 3, "updateStrategy": strategy}, "status": status});
        let partition = json!({"type": "RollingUpdate", "rollingUpdate": {"partition": 2}});
        let canary = json!({"observedGeneration": 2, "replicas": 3, "readyReplicas": 3, "currentReplicas": 2, "updatedReplicas": 1, "currentRevision": "db-1", "updateRevision": "db-2"});
        assert_eq!(
            assess(
                &sts(partition.clone(), canary.clone()),
                &[],
                TypeInfo::default()
            )
            .health,
            Health::Ready
        );
        let mut not_yet = canary.clone();
        not_yet["updatedReplicas"] = json!(0);
        assert_eq!(
            assess(&sts(partition, not_yet), &[], TypeInfo::default()).health,
            Health::InProgress
        );
        let on_delete = json!({"type": "OnDelete"});
        assert_eq!(
            assess(
                &sts(on_delete.clone(), canary.clone()),
                &[],
                TypeInfo::default()
            )
            .health,
            Health::Ready
        );
        let mut unready = canary.clone();
        unready["readyReplicas"] = json!(2);
        assert_eq!(
            assess(&sts(on_delete, unready), &[], TypeInfo::default()).health,
            Health::InProgress
        );
        // A plain rolling update still waits for every replica's revision.
        assert_eq!(
            assess(
                &sts(json!({"type": "RollingUpdate"}), canary),
                &[],
                TypeInfo::default()
            )
            .health,
            Health::InProgress
        );
    }

    #[test]
    fn custom_resources_and_simple_kinds() {
        let cr = |conds: Value| json!({"apiVersion": "s3.aws.upbound.io/v1beta1", "kind": "Bucket", "metadata": {"generation": 1}, "status": {"observedGeneration": 1, "conditions": conds}});
        assert_eq!(assess(&cr(json!([{"type": "Ready", "status": "True"}, {"type": "Synced", "status": "True"}])), &[], TypeInfo::default()).health, Health::Ready);
        assert_eq!(assess(&cr(json!([{"type": "Synced", "status": "False", "reason": "ReconcileError", "message": "denied"}])), &[], TypeInfo::default()).health, Health::Failed);
        // The controller observed the generation and reports no conditions.
        assert_eq!(
            assess(&cr(json!([])), &[], TypeInfo::default()).health,
            Health::Ready
        );
        assert_eq!(
            assess(
                &json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {}}),
                &[],
                TypeInfo::default()
            )
            .health,
            Health::Ready
        );
        assert_eq!(assess(&json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {}, "status": {"phase": "Active"}}), &[], TypeInfo::default()).health, Health::Ready);
        assert_eq!(assess(&json!({"apiVersion": "batch/v1", "kind": "Job", "metadata": {}, "status": {"conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]}}), &[], TypeInfo::default()).health, Health::Failed);
        assert_eq!(assess(&json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"deletionTimestamp": "x"}}), &[], TypeInfo::default()).health, Health::Terminating);
    }

    #[test]
    fn a_suspended_job_is_ready_and_a_refused_crd_failed() {
        let job = json!({"apiVersion": "batch/v1", "kind": "Job", "metadata": {}, "spec": {"suspend": true}, "status": {}});
        let s = assess(&job, &[], TypeInfo::default());
        assert_eq!(
            (s.health, s.message.as_str()),
            (Health::Ready, "suspended; runs once resumed")
        );
        let crd = |reason: &str| {
            json!({"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition", "metadata": {},
            "status": {"conditions": [{"type": "Established", "status": "False", "reason": reason, "message": "m"}]}})
        };
        assert_eq!(
            assess(&crd("Installing"), &[], TypeInfo::default()).health,
            Health::InProgress
        );
        assert_eq!(
            assess(&crd("NotAllowed"), &[], TypeInfo::default()).health,
            Health::Failed
        );
    }

    #[test]
    fn a_statefulset_scaling_down_is_ready_once_the_extra_pods_are_gone() {
        let sts = |replicas: i64| {
            json!({"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"generation": 2},
            "spec": {"replicas": 3}, "status": {"observedGeneration": 2, "replicas": replicas, "readyReplicas": replicas,
            "currentReplicas": replicas, "updatedReplicas": replicas, "currentRevision": "r1", "updateRevision": "r1"}})
        };
        assert_eq!(
            assess(&sts(5), &[], TypeInfo::default()).health,
            Health::InProgress
        );
        assert_eq!(
            assess(&sts(3), &[], TypeInfo::default()).health,
            Health::Ready
        );
    }

    #[test]
    fn a_rollout_fixing_a_stuck_revision_is_not_stuck() {
        let failing = |name: &str, hash: &str| {
            json!({"metadata": {"name": name, "labels": {"app": "web", "pod-template-hash": hash}},
            "status": {"containerStatuses": [{"name": "web", "state": {"waiting": {"reason": "ImagePullBackOff"}}}]}})
        };
        let rs = |hash: &str, revision: &str| json!({"metadata": {"labels": {"pod-template-hash": hash}, "annotations": {"deployment.kubernetes.io/revision": revision}}});
        let pods = vec![failing("web-old-1", "old")];
        // The old revision's pod is not the new revision's.
        assert!(current_pods(pods.clone(), &[rs("old", "1"), rs("new", "2")]).is_empty());
        assert_eq!(current_pods(pods.clone(), &[rs("old", "1")]).len(), 1);
        assert_eq!(
            current_pods(pods.clone(), &[]).len(),
            1,
            "nothing known: all"
        );
        // The controller has not observed the new generation: its old
        // deadline and pods say nothing of it.
        let d = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"generation": 2},
            "spec": {"replicas": 1},
            "status": {"observedGeneration": 1, "conditions": [{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded"}]}});
        assert_eq!(
            assess(&d, &pods, TypeInfo::default()).health,
            Health::InProgress
        );
        // A pod being deleted is on its way out.
        let mut leaving = failing("web-old-1", "old");
        leaving["metadata"]["deletionTimestamp"] = json!("2026-12-02T00:00:00Z");
        let observed = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"generation": 2},
            "spec": {"replicas": 1}, "status": {"observedGeneration": 2, "replicas": 2, "updatedReplicas": 1}});
        assert_eq!(
            assess(&observed, &[leaving], TypeInfo::default()).health,
            Health::InProgress
        );
    }

    #[test]
    fn objects_that_report_nothing_are_ready_unless_their_controller_will() {
        let reports = TypeInfo {
            reports_status: true,
        };
        let bucket = json!({"apiVersion": "s3.aws.upbound.io/v1beta1", "kind": "Bucket", "metadata": {"generation": 1}});
        // A custom resource whose type reports status: not yet.
        assert_eq!(assess(&bucket, &[], reports).health, Health::InProgress);
        // One of a type without a status subresource has nothing to wait for.
        let monitor = json!({"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor", "metadata": {"generation": 1}});
        assert_eq!(
            assess(&monitor, &[], TypeInfo::default()).health,
            Health::Ready
        );
        // Kinds of Kubernetes itself without rules of their own.
        for (api_version, kind, status) in [
            (
                "networking.k8s.io/v1",
                "Ingress",
                json!({"loadBalancer": {}}),
            ),
            ("networking.k8s.io/v1", "NetworkPolicy", json!(null)),
            (
                "admissionregistration.k8s.io/v1",
                "ValidatingWebhookConfiguration",
                json!(null),
            ),
        ] {
            let o = json!({"apiVersion": api_version, "kind": kind, "metadata": {"generation": 1}, "status": status});
            assert_eq!(assess(&o, &[], reports).health, Health::Ready, "{kind}");
        }
        // A Ready condition recorded for an older generation is stale.
        let changed = json!({"apiVersion": "s3.aws.upbound.io/v1beta1", "kind": "Bucket", "metadata": {"generation": 2},
            "status": {"conditions": [{"type": "Ready", "status": "True", "observedGeneration": 1}]}});
        assert_eq!(assess(&changed, &[], reports).health, Health::InProgress);
        let caught_up = json!({"apiVersion": "s3.aws.upbound.io/v1beta1", "kind": "Bucket", "metadata": {"generation": 2},
            "status": {"conditions": [{"type": "Ready", "status": "True", "observedGeneration": 2}]}});
        assert_eq!(assess(&caught_up, &[], reports).health, Health::Ready);
    }
}
