//! Simulated controllers: what a real cluster's control plane does after a
//! write, so that health logic has something true to observe. CRDs become
//! Established and served; namespaces finalize; the garbage collector
//! follows ownerReferences and deletion propagation; workloads roll out
//! (or fail the way real ones do); custom resources get Crossplane-style
//! `Synced`/`Ready` conditions.
//!
//! Failures are requested per object with the annotation
//! `kube-sim.unitsync.dev/fail`: on a Deployment `ProgressDeadlineExceeded`,
//! `ImagePullBackOff` or `CrashLoopBackOff`; on a Job `BackoffLimitExceeded`;
//! on a custom resource any message (it becomes `Ready=False`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::registry::{self, ResourceType};
use super::server::Inner;
use super::store::{
    CRD_CLEANUP, FOREGROUND, Key, ORPHAN, State, WriteOpts, now_rfc3339, set_condition,
};

pub const FAIL_ANNOTATION: &str = "kube-sim.unitsync.dev/fail";

/// When each object's generation (or creation) was last seen changing, and
/// the earliest moment a delayed reaction falls due.
#[derive(Default)]
struct Seen {
    changed: HashMap<Key, (i64, Instant)>,
    due: Option<Instant>,
}

impl Seen {
    /// How long ago the object's generation last changed.
    fn since_change(&mut self, key: &Key, obj: &Value) -> Duration {
        let generation = obj["metadata"]["generation"].as_i64().unwrap_or(0);
        let e = self
            .changed
            .entry(key.clone())
            .or_insert((generation, Instant::now()));
        if e.0 != generation {
            *e = (generation, Instant::now());
        }
        e.1.elapsed()
    }

    /// Whether `delay` has passed since the object changed; if not, the
    /// controllers run again when it has.
    fn passed(&mut self, key: &Key, obj: &Value, delay: Duration) -> bool {
        let since = self.since_change(key, obj);
        if since >= delay {
            return true;
        }
        self.wake_in(delay - since);
        false
    }

    fn wake_in(&mut self, d: Duration) {
        let at = Instant::now() + d;
        self.due = Some(self.due.map_or(at, |x| x.min(at)));
    }
}

/// Runs the controllers when something changed (a write, a control-endpoint
/// reset) or a delayed reaction falls due, never on a fixed tick: tests and
/// benchmarks measure unitsync, not the simulator.
pub(crate) async fn run(inner: Arc<Inner>, stop: CancellationToken) {
    let mut seen = Seen::default();
    loop {
        seen.due = None;
        {
            let mut state = inner.state.lock().unwrap();
            let o = &inner.options;
            // Until quiet: one controller's write may concern another.
            for _ in 0..8 {
                let before = state.rv;
                crds(&mut state, &mut seen, o.crd_delay);
                namespaces(&mut state);
                garbage_collect(&mut state);
                workloads(&mut state, &mut seen, o.rollout_delay, o.cr_delay);
                if state.rv == before {
                    break;
                }
            }
            seen.changed.retain(|k, _| state.objects.contains_key(k));
        }
        let due = seen.due.map_or_else(
            || tokio::time::Instant::now() + Duration::from_secs(3600),
            tokio::time::Instant::from_std,
        );
        tokio::select! {
            () = inner.changed.notified() => {}
            () = tokio::time::sleep_until(due) => {}
            () = stop.cancelled() => return,
        }
    }
}

fn controller() -> WriteOpts {
    WriteOpts {
        manager: "kube-controller-manager".into(),
        subresource: Some("status".into()),
        ..WriteOpts::default()
    }
}

fn write_status(state: &mut State, key: &Key, mut obj: Value, status: Value) {
    let Some(ty) = state.type_of_key(key) else {
        return;
    };
    obj["status"] = status;
    // Written at the version the controller addresses (an object of a
    // type served at several versions may have been read at another).
    obj["apiVersion"] = json!(ty.api_version());
    if !ty.status_subresource {
        let opts = WriteOpts {
            manager: "kube-controller-manager".into(),
            ..WriteOpts::default()
        };
        let _ = state.replace(&ty, &key.namespace, &key.name, obj, &opts);
        return;
    }
    let _ = state.replace(&ty, &key.namespace, &key.name, obj, &controller());
}

fn crds(state: &mut State, seen: &mut Seen, delay: Duration) {
    let keys: Vec<Key> = state
        .objects
        .keys()
        .filter(|k| k.plural == "customresourcedefinitions")
        .cloned()
        .collect();
    for key in keys {
        let Some(crd) = state.objects.get(&key).cloned() else {
            continue;
        };
        let name = key.name.clone();
        if crd["metadata"]["deletionTimestamp"].is_string() {
            // Delete every instance, stop serving, drop the finalizer.
            let served = registry::from_crd(&crd);
            if let Some(t) = served.first() {
                let instances: Vec<Key> = state
                    .objects
                    .keys()
                    .filter(|k| k.group == t.group && k.plural == t.plural)
                    .cloned()
                    .collect();
                for k in instances {
                    state.purge(&k);
                }
            }
            state
                .types
                .retain(|t| t.crd.as_deref() != Some(name.as_str()));
            remove_finalizer(state, &key, CRD_CLEANUP);
            continue;
        }
        let established = crd["status"]["conditions"].as_array().is_some_and(|c| {
            c.iter()
                .any(|c| c["type"] == "Established" && c["status"] == "True")
        });
        let generation = crd["metadata"]["generation"].as_i64().unwrap_or(0);
        let current = crd["status"]["observedGeneration"].as_i64() == Some(generation);
        if established && current {
            continue;
        }
        if !established && !seen.passed(&key, &crd, delay) {
            continue;
        }
        let mut status = crd["status"].clone();
        if !status.is_object() {
            status = json!({});
        }
        let mut holder = json!({"status": status});
        set_condition(
            &mut holder,
            "NamesAccepted",
            "True",
            "NoConflicts",
            "no conflicts found",
        );
        set_condition(
            &mut holder,
            "Established",
            "True",
            "InitialNamesAccepted",
            "the initial names have been accepted",
        );
        let mut status = holder["status"].take();
        status["acceptedNames"] = crd["spec"]["names"].clone();
        status["storedVersions"] = json!(
            crd["spec"]["versions"]
                .as_array()
                .map(|vs| vs
                    .iter()
                    .filter(|v| v["storage"] == true)
                    .map(|v| v["name"].clone())
                    .collect::<Vec<_>>())
                .unwrap_or_default()
        );
        status["observedGeneration"] = json!(generation);
        write_status(state, &key, crd.clone(), status);
        state
            .types
            .retain(|t| t.crd.as_deref() != Some(name.as_str()));
        let types: Vec<ResourceType> = registry::from_crd(&crd);
        state.types.extend(types);
    }
}

fn remove_finalizer(state: &mut State, key: &Key, finalizer: &str) {
    let Some(mut obj) = state.objects.get(key).cloned() else {
        return;
    };
    let Some(ty) = state.type_of_key(key) else {
        return;
    };
    let list: Vec<Value> = obj["metadata"]["finalizers"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|f| f != finalizer)
        .collect();
    if list.is_empty() {
        state.purge(key);
        return;
    }
    obj["metadata"]["finalizers"] = Value::Array(list);
    let opts = WriteOpts {
        manager: "kube-controller-manager".into(),
        ..WriteOpts::default()
    };
    let _ = state.replace(&ty, &key.namespace, &key.name, obj, &opts);
}

fn namespaces(state: &mut State) {
    let terminating: Vec<Key> = state
        .objects
        .iter()
        .filter(|(k, v)| {
            k.plural == "namespaces"
                && k.group.is_empty()
                && v["metadata"]["deletionTimestamp"].is_string()
        })
        .map(|(k, _)| k.clone())
        .collect();
    for ns_key in terminating {
        let contents: Vec<Key> = state
            .objects
            .keys()
            .filter(|k| k.namespace == ns_key.name)
            .cloned()
            .collect();
        if contents.is_empty() {
            state.purge(&ns_key);
            continue;
        }
        for k in contents {
            let Some(ty) = state.type_of_key(&k) else {
                continue;
            };
            let deleting = state
                .objects
                .get(&k)
                .is_some_and(|o| o["metadata"]["deletionTimestamp"].is_string());
            if !deleting {
                let _ = state.delete(
                    &ty,
                    &k.namespace,
                    &k.name,
                    &json!({"propagationPolicy": "Background"}),
                    false,
                );
            }
        }
    }
}

fn garbage_collect(state: &mut State) {
    let uids: HashMap<String, Key> = state
        .objects
        .iter()
        .filter_map(|(k, v)| {
            v["metadata"]["uid"]
                .as_str()
                .map(|u| (u.to_owned(), k.clone()))
        })
        .collect();
    // Owners being deleted with a propagation finalizer.
    let owners: Vec<(Key, String, bool, bool)> = state
        .objects
        .iter()
        .filter(|(_, v)| v["metadata"]["deletionTimestamp"].is_string())
        .filter_map(|(k, v)| {
            let f = v["metadata"]["finalizers"].as_array()?;
            let fg = f.iter().any(|x| x == FOREGROUND);
            let or = f.iter().any(|x| x == ORPHAN);
            (fg || or).then(|| {
                (
                    k.clone(),
                    v["metadata"]["uid"].as_str().unwrap_or_default().to_owned(),
                    fg,
                    or,
                )
            })
        })
        .collect();
    for (owner, uid, foreground, orphan) in owners {
        let dependents: Vec<Key> = state
            .objects
            .iter()
            .filter(|(k, v)| {
                *k != &owner
                    && v["metadata"]["ownerReferences"]
                        .as_array()
                        .is_some_and(|refs| refs.iter().any(|r| r["uid"] == uid.as_str()))
            })
            .map(|(k, _)| k.clone())
            .collect();
        if orphan {
            for d in dependents {
                strip_owner(state, &d, &uid);
            }
            remove_finalizer(state, &owner, ORPHAN);
        } else if foreground {
            if dependents.is_empty() {
                remove_finalizer(state, &owner, FOREGROUND);
            }
            for d in dependents {
                let Some(ty) = state.type_of_key(&d) else {
                    continue;
                };
                let deleting = state
                    .objects
                    .get(&d)
                    .is_some_and(|o| o["metadata"]["deletionTimestamp"].is_string());
                if !deleting {
                    let _ = state.delete(
                        &ty,
                        &d.namespace,
                        &d.name,
                        &json!({"propagationPolicy": "Foreground"}),
                        false,
                    );
                }
            }
        }
    }
    // Dependents whose owners are all gone.
    let orphans: Vec<Key> = state
        .objects
        .iter()
        .filter(|(_, v)| !v["metadata"]["deletionTimestamp"].is_string())
        .filter(|(k, v)| {
            let Some(refs) = v["metadata"]["ownerReferences"].as_array() else {
                return false;
            };
            !refs.is_empty()
                && refs.iter().all(|r| {
                    let owner = r["uid"].as_str().and_then(|u| uids.get(u));
                    // Cross-namespace owners count as absent.
                    owner.is_none_or(|o| !o.namespace.is_empty() && o.namespace != k.namespace)
                })
        })
        .map(|(k, _)| k.clone())
        .collect();
    for k in orphans {
        let Some(ty) = state.type_of_key(&k) else {
            continue;
        };
        let _ = state.delete(
            &ty,
            &k.namespace,
            &k.name,
            &json!({"propagationPolicy": "Background"}),
            false,
        );
    }
}

fn strip_owner(state: &mut State, key: &Key, uid: &str) {
    let Some(mut obj) = state.objects.get(key).cloned() else {
        return;
    };
    let Some(ty) = state.type_of_key(key) else {
        return;
    };
    let refs: Vec<Value> = obj["metadata"]["ownerReferences"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|r| r["uid"] != uid)
        .collect();
    obj["metadata"]["ownerReferences"] = Value::Array(refs);
    let opts = WriteOpts {
        manager: "kube-controller-manager".into(),
        ..WriteOpts::default()
    };
    let _ = state.replace(&ty, &key.namespace, &key.name, obj, &opts);
}

fn fail_mode(obj: &Value) -> Option<String> {
    obj["metadata"]["annotations"][FAIL_ANNOTATION]
        .as_str()
        .map(str::to_owned)
}

fn workloads(state: &mut State, seen: &mut Seen, rollout: Duration, cr_delay: Duration) {
    let keys: Vec<Key> = state.objects.keys().cloned().collect();
    for key in keys {
        let Some(obj) = state.objects.get(&key).cloned() else {
            continue;
        };
        if obj["metadata"]["deletionTimestamp"].is_string() {
            continue;
        }
        let generation = obj["metadata"]["generation"].as_i64().unwrap_or(0);
        let observed = obj["status"]["observedGeneration"].as_i64();
        let Some(ty) = state.type_of_key(&key) else {
            continue;
        };
        match (ty.group.as_str(), ty.kind.as_str()) {
            ("apps", "Deployment") => deployment(state, seen, &key, obj, rollout),
            ("apps", "StatefulSet") | ("apps", "DaemonSet") if observed != Some(generation) => {
                if !seen.passed(&key, &obj, rollout) {
                    continue;
                }
                let n = obj["spec"]["replicas"].as_i64().unwrap_or(1);
                let status = if ty.kind == "StatefulSet" {
                    json!({"observedGeneration": generation, "replicas": n, "readyReplicas": n, "currentReplicas": n, "updatedReplicas": n, "availableReplicas": n, "currentRevision": format!("{}-1", key.name), "updateRevision": format!("{}-1", key.name)})
                } else {
                    json!({"observedGeneration": generation, "desiredNumberScheduled": 1, "currentNumberScheduled": 1, "updatedNumberScheduled": 1, "numberAvailable": 1, "numberReady": 1, "numberMisscheduled": 0})
                };
                write_status(state, &key, obj, status);
            }
            ("batch", "Job")
                if obj["status"]["completionTime"].is_null()
                    && obj["status"]["conditions"].is_null() =>
            {
                if !seen.passed(&key, &obj, rollout) {
                    continue;
                }
                let now = now_rfc3339();
                let mut holder = json!({"status": {"startTime": now}});
                if fail_mode(&obj).is_some() {
                    holder["status"]["failed"] =
                        json!(obj["spec"]["backoffLimit"].as_i64().unwrap_or(6) + 1);
                    set_condition(
                        &mut holder,
                        "Failed",
                        "True",
                        "BackoffLimitExceeded",
                        "Job has reached the specified backoff limit",
                    );
                } else {
                    holder["status"]["succeeded"] = json!(1);
                    holder["status"]["completionTime"] = json!(now);
                    set_condition(&mut holder, "Complete", "True", "", "");
                }
                write_status(state, &key, obj, holder["status"].take());
            }
            ("", "PersistentVolumeClaim") if obj["status"]["phase"] != "Bound" => {
                if !seen.passed(&key, &obj, rollout) {
                    continue;
                }
                write_status(
                    state,
                    &key,
                    obj.clone(),
                    json!({"phase": "Bound", "accessModes": obj["spec"]["accessModes"], "capacity": obj["spec"]["resources"]["requests"]}),
                );
            }
            _ if ty.crd.is_some() && observed != Some(generation) => {
                if !seen.passed(&key, &obj, cr_delay) {
                    continue;
                }
                let mut holder = json!({"status": obj["status"].clone()});
                if !holder["status"].is_object() {
                    holder["status"] = json!({});
                }
                match fail_mode(&obj) {
                    Some(msg) => {
                        set_condition(&mut holder, "Synced", "False", "ReconcileError", &msg);
                        set_condition(&mut holder, "Ready", "False", "ReconcileError", &msg);
                    }
                    None => {
                        set_condition(&mut holder, "Synced", "True", "ReconcileSuccess", "");
                        set_condition(&mut holder, "Ready", "True", "Available", "");
                    }
                }
                holder["status"]["observedGeneration"] = json!(generation);
                write_status(state, &key, obj, holder["status"].take());
            }
            _ => {}
        }
    }
}

fn deployment(state: &mut State, seen: &mut Seen, key: &Key, obj: Value, rollout: Duration) {
    let generation = obj["metadata"]["generation"].as_i64().unwrap_or(0);
    let elapsed = seen.since_change(key, &obj);
    let replicas = obj["spec"]["replicas"].as_i64().unwrap_or(1);
    let deadline = Duration::from_secs(
        obj["spec"]["progressDeadlineSeconds"]
            .as_u64()
            .unwrap_or(600),
    );
    let hash = format!("{:x}", generation * 2654435761 % 0xffffff);
    let rs = format!("{}-{hash}", key.name);
    replica_set(state, key, &obj, &rs, &hash, generation);
    let mut holder = json!({"status": obj["status"].clone()});
    if !holder["status"].is_object() {
        holder["status"] = json!({});
    }
    let current = holder["status"].clone();
    match fail_mode(&obj) {
        None => {
            let count = |field: &str| current[field].as_i64().unwrap_or(0);
            if current["observedGeneration"].as_i64() == Some(generation)
                && count("updatedReplicas") == replicas
                && count("readyReplicas") == replicas
            {
                return;
            }
            if elapsed < rollout {
                seen.wake_in(rollout - elapsed);
                // The controller observes a new generation at once (a new
                // ReplicaSet, none of its pods updated yet); the rollout
                // takes its time, the old pods serving meanwhile.
                if current["observedGeneration"].as_i64() != Some(generation) {
                    holder["status"]["observedGeneration"] = json!(generation);
                    holder["status"]["updatedReplicas"] = json!(0);
                    set_condition(
                        &mut holder,
                        "Progressing",
                        "True",
                        "ReplicaSetUpdated",
                        &format!("ReplicaSet \"{rs}\" is progressing."),
                    );
                    write_status(state, key, obj, holder["status"].take());
                }
                return;
            }
            // The new revision's pods replaced the old ones.
            old_pods(state, key, &hash);
            holder["status"] = json!({"observedGeneration": generation, "replicas": replicas, "updatedReplicas": replicas, "readyReplicas": replicas, "availableReplicas": replicas, "conditions": current["conditions"].clone()});
            if replicas == 0 {
                holder["status"] = json!({"observedGeneration": generation, "conditions": current["conditions"].clone()});
            }
            set_condition(
                &mut holder,
                "Available",
                "True",
                "MinimumReplicasAvailable",
                "Deployment has minimum availability.",
            );
            set_condition(
                &mut holder,
                "Progressing",
                "True",
                "NewReplicaSetAvailable",
                &format!("ReplicaSet \"{rs}\" has successfully progressed."),
            );
        }
        Some(mode) => {
            let exceeded = mode == "ProgressDeadlineExceeded" || elapsed >= deadline;
            if !exceeded {
                seen.wake_in(deadline - elapsed);
            }
            holder["status"] = json!({"observedGeneration": generation, "replicas": replicas, "updatedReplicas": replicas, "unavailableReplicas": replicas, "conditions": current["conditions"].clone()});
            set_condition(
                &mut holder,
                "Available",
                "False",
                "MinimumReplicasUnavailable",
                "Deployment does not have minimum availability.",
            );
            if exceeded {
                set_condition(
                    &mut holder,
                    "Progressing",
                    "False",
                    "ProgressDeadlineExceeded",
                    &format!("ReplicaSet \"{rs}\" has timed out progressing."),
                );
            } else {
                set_condition(
                    &mut holder,
                    "Progressing",
                    "True",
                    "ReplicaSetUpdated",
                    &format!("ReplicaSet \"{rs}\" is progressing."),
                );
            }
            if mode == "ImagePullBackOff" || mode == "CrashLoopBackOff" {
                pods(state, key, &obj, &mode, &rs, &hash);
            }
            let same = current.get("conditions") == holder["status"].get("conditions")
                && current["observedGeneration"] == holder["status"]["observedGeneration"];
            if same {
                return;
            }
        }
    }
    write_status(state, key, obj, holder["status"].take());
}

/// The ReplicaSet of a Deployment's generation (its pod template), as the
/// controller names, labels (`pod-template-hash`) and numbers it
/// (`deployment.kubernetes.io/revision`), created once.
fn replica_set(state: &mut State, key: &Key, deploy: &Value, rs: &str, hash: &str, revision: i64) {
    let Some(ty) = state.find_type("apps", "v1", "replicasets") else {
        return;
    };
    if state.get(&ty, &key.namespace, rs).is_ok() {
        return;
    }
    let mut labels = deploy["spec"]["selector"]["matchLabels"].clone();
    if !labels.is_object() {
        labels = json!({});
    }
    labels["pod-template-hash"] = json!(hash);
    let mut template = deploy["spec"]["template"].clone();
    template["metadata"]["labels"]["pod-template-hash"] = json!(hash);
    let set = json!({
        "apiVersion": "apps/v1", "kind": "ReplicaSet",
        "metadata": {"name": rs, "labels": labels.clone(),
            "annotations": {"deployment.kubernetes.io/revision": revision.to_string()},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "Deployment", "name": key.name, "uid": deploy["metadata"]["uid"], "controller": true, "blockOwnerDeletion": true}]},
        "spec": {"replicas": deploy["spec"]["replicas"].clone(), "selector": {"matchLabels": labels}, "template": template},
    });
    let opts = WriteOpts {
        manager: "kube-controller-manager".into(),
        ..WriteOpts::default()
    };
    if let Err(e) = state.create(&ty, &key.namespace, set, &opts) {
        tracing::warn!(
            replica_set = rs,
            error = e.message,
            "kube-sim could not create a ReplicaSet"
        );
    }
}

/// Removes the pods of a Deployment's earlier revisions (its ReplicaSets
/// other than the one of `hash`), as a finished rollout scales them down.
fn old_pods(state: &mut State, key: &Key, hash: &str) {
    let prefix = format!("{}-", key.name);
    let stale: Vec<Key> = state
        .objects
        .iter()
        .filter(|(k, o)| {
            k.group.is_empty()
                && k.plural == "pods"
                && k.namespace == key.namespace
                && o["metadata"]["ownerReferences"][0]["kind"] == "ReplicaSet"
                && o["metadata"]["ownerReferences"][0]["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with(&prefix))
                && o["metadata"]["labels"]["pod-template-hash"] != hash
        })
        .map(|(k, _)| k.clone())
        .collect();
    for k in stale {
        state.purge(&k);
    }
}

/// Pods of a failing Deployment's revision, showing why (as `kubectl get
/// pods` would), owned by its ReplicaSet.
fn pods(state: &mut State, key: &Key, deploy: &Value, mode: &str, rs: &str, hash: &str) {
    let Some(ty) = state.find_type("", "v1", "pods") else {
        return;
    };
    let name = format!("{rs}-pod");
    if state.get(&ty, &key.namespace, &name).is_ok() {
        return;
    }
    let image = deploy["spec"]["template"]["spec"]["containers"][0]["image"].clone();
    let (reason, message) = if mode == "ImagePullBackOff" {
        (
            "ImagePullBackOff",
            format!("Back-off pulling image {image}"),
        )
    } else {
        (
            "CrashLoopBackOff",
            "back-off 5m0s restarting failed container".to_owned(),
        )
    };
    let mut labels = deploy["spec"]["selector"]["matchLabels"].clone();
    if !labels.is_object() {
        labels = json!({});
    }
    labels["pod-template-hash"] = json!(hash);
    let rs_ty = state.find_type("apps", "v1", "replicasets");
    let owner_uid = rs_ty
        .and_then(|t| state.get(&t, &key.namespace, rs).ok())
        .map(|o| o["metadata"]["uid"].clone())
        .unwrap_or_default();
    let pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": labels, "ownerReferences": [{
            "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": rs, "uid": owner_uid, "controller": true, "blockOwnerDeletion": true
        }]},
        "spec": deploy["spec"]["template"]["spec"].clone(),
    });
    let opts = WriteOpts {
        manager: "kube-controller-manager".into(),
        ..WriteOpts::default()
    };
    if let Ok(created) = state.create(&ty, &key.namespace, pod, &opts) {
        let status = json!({"phase": "Pending", "containerStatuses": [{"name": deploy["spec"]["template"]["spec"]["containers"][0]["name"], "ready": false, "restartCount": if mode == "CrashLoopBackOff" { 5 } else { 0 }, "image": image, "state": {"waiting": {"reason": reason, "message": message}}}]});
        let pkey = State::key(&ty, &key.namespace, &name);
        write_status(state, &pkey, created, status);
    }
}
