//! Applying objects with server-side apply, the Flux way: resolve the type
//! through discovery, refuse objects another unit owns, dry-run first and
//! write only what would change (so unchanged objects are not touched and
//! a changed Deployment's generation moves once), report field-manager
//! conflicts with their paths, and detect drift by the same comparison.

use std::collections::HashMap;
use std::time::Duration;

use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::discovery::{Discovery, Scope};
use serde_json::Value;
use tokio::sync::RwLock;

use crate::inventory::Entry;
use crate::manifest::{ANNOTATION_REVISION, ANNOTATION_UNIT, Object};

/// The field manager the agent applies with.
pub const FIELD_MANAGER: &str = "unitsync";

/// Why one object could not be applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApplyError {
    /// Kubernetes could not be reached (retry with backoff).
    Unreachable(String),
    /// The object or cluster refused it (fix the unit).
    Rejected(String),
    /// The cluster does not serve the object's type (yet): typically a CRD
    /// another unit is still installing. Retried, reported as Progressing.
    NotServed(String),
}

impl ApplyError {
    pub fn message(&self) -> &str {
        match self {
            ApplyError::Unreachable(m) | ApplyError::Rejected(m) | ApplyError::NotServed(m) => m,
        }
    }
}

fn classify(e: kube::Error) -> ApplyError {
    match e {
        kube::Error::Api(s) => ApplyError::Rejected(format!("{} ({})", s.message, s.reason)),
        other => ApplyError::Unreachable(format!("Kubernetes API unreachable: {other}")),
    }
}

pub struct Applier {
    client: kube::Client,
    /// Served kinds resolved so far: resource and whether namespaced.
    kinds: RwLock<HashMap<GroupVersionKind, (ApiResource, bool)>>,
    pub crd_timeout: Duration,
}

/// Strips what the server maintains, for comparing intent with reality.
fn comparable(v: &Value) -> Value {
    let mut c = v.clone();
    if let Some(m) = c["metadata"].as_object_mut() {
        for k in [
            "resourceVersion",
            "managedFields",
            "generation",
            "creationTimestamp",
            "uid",
        ] {
            m.remove(k);
        }
        if let Some(a) = m.get_mut("annotations").and_then(Value::as_object_mut) {
            a.remove(ANNOTATION_REVISION);
            if a.is_empty() {
                m.remove("annotations");
            }
        }
    }
    if let Some(o) = c.as_object_mut() {
        o.remove("status");
    }
    c
}

/// Leaf paths where two objects differ (`spec.replicas`, `data.x`).
pub fn differences(a: &Value, b: &Value) -> Vec<String> {
    let mut out = Vec::new();
    fn rec(a: &Value, b: &Value, path: &mut Vec<String>, out: &mut Vec<String>) {
        match (a, b) {
            (Value::Object(x), Value::Object(y)) => {
                let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
                keys.sort();
                keys.dedup();
                for k in keys {
                    path.push(k.clone());
                    rec(
                        x.get(k).unwrap_or(&Value::Null),
                        y.get(k).unwrap_or(&Value::Null),
                        path,
                        out,
                    );
                    path.pop();
                }
            }
            (x, y) if x != y => out.push(path.join(".")),
            _ => {}
        }
    }
    rec(&comparable(a), &comparable(b), &mut Vec::new(), &mut out);
    out
}

fn not_served(gvk: &GroupVersionKind) -> ApplyError {
    ApplyError::NotServed(format!(
        "waiting for the cluster to serve {} in {}",
        gvk.kind,
        gvk.api_version()
    ))
}

impl Applier {
    /// Reads the served kinds once (which also proves the API reachable).
    pub async fn new(client: kube::Client, crd_timeout: Duration) -> Result<Applier, ApplyError> {
        let discovery = Discovery::new(client.clone())
            .run()
            .await
            .map_err(classify)?;
        let mut kinds = HashMap::new();
        for group in discovery.groups() {
            for version in group.versions() {
                for (ar, caps) in group.versioned_resources(version) {
                    let gvk = GroupVersionKind::gvk(&ar.group, &ar.version, &ar.kind);
                    kinds.insert(gvk, (ar, caps.scope == Scope::Namespaced));
                }
            }
        }
        Ok(Applier {
            client,
            kinds: RwLock::new(kinds),
            crd_timeout,
        })
    }

    pub fn client(&self) -> &kube::Client {
        &self.client
    }

    /// The served resource of a kind and whether it is namespaced; a kind
    /// not seen yet (a new CRD) costs one request for its group version.
    async fn resolve(
        &self,
        group: &str,
        version: &str,
        kind: &str,
    ) -> Result<(ApiResource, bool), ApplyError> {
        let gvk = GroupVersionKind::gvk(group, version, kind);
        if let Some(found) = self.kinds.read().await.get(&gvk) {
            return Ok(found.clone());
        }
        match kube::discovery::pinned_kind(&self.client, &gvk).await {
            Ok((ar, caps)) => {
                let found = (ar, caps.scope == Scope::Namespaced);
                self.kinds.write().await.insert(gvk, found.clone());
                Ok(found)
            }
            Err(kube::Error::Api(s)) if s.code == 404 => Err(not_served(&gvk)),
            Err(kube::Error::Discovery(_)) => Err(not_served(&gvk)),
            Err(other) => Err(classify(other)),
        }
    }

    /// The served resource of a kind (for watching it).
    pub async fn resource(&self, group: &str, version: &str, kind: &str) -> Option<ApiResource> {
        self.resolve(group, version, kind)
            .await
            .ok()
            .map(|(ar, _)| ar)
    }

    async fn api_for(&self, obj: &Object) -> Result<Api<DynamicObject>, ApplyError> {
        self.api(
            obj.group(),
            obj.version(),
            &obj.kind,
            obj.namespace.as_deref(),
            &obj.id(),
        )
        .await
    }

    /// The API for an object, checking its scope.
    pub async fn api(
        &self,
        group: &str,
        version: &str,
        kind: &str,
        namespace: Option<&str>,
        id: &str,
    ) -> Result<Api<DynamicObject>, ApplyError> {
        let (ar, namespaced) = self.resolve(group, version, kind).await?;
        match (namespaced, namespace) {
            (true, Some(ns)) => Ok(Api::namespaced_with(self.client.clone(), ns, &ar)),
            (true, None) => Err(ApplyError::Rejected(format!(
                "{id} is namespaced but has no metadata.namespace"
            ))),
            (false, _) => Ok(Api::all_with(self.client.clone(), &ar)),
        }
    }

    /// Applies one stamped object; returns whether it changed and its uid.
    pub async fn apply(
        &self,
        obj: &Object,
        unit: &str,
        force: bool,
    ) -> Result<(bool, Entry), ApplyError> {
        let api = self.api_for(obj).await?;
        let mut body = obj.body.clone();
        let namespaced = obj.namespace.is_some() && api.resource_url().contains("/namespaces/");
        if !namespaced && let Some(m) = body["metadata"].as_object_mut() {
            m.remove("namespace");
        }
        let live = api.get_opt(&obj.name).await.map_err(classify)?;
        if let Some(owner) = live
            .as_ref()
            .and_then(|l| l.metadata.annotations.as_ref())
            .and_then(|a| a.get(ANNOTATION_UNIT))
            && owner != unit
        {
            return Err(ApplyError::Rejected(format!(
                "{} belongs to unit {owner}; unit {unit} will not take it over",
                obj.id()
            )));
        }
        let mut pp = PatchParams::apply(FIELD_MANAGER);
        pp.force = force;
        let mut dry = pp.clone();
        dry.dry_run = true;
        let planned = api
            .patch(&obj.name, &dry, &Patch::Apply(&body))
            .await
            .map_err(|e| conflict(e, obj))?;
        let entry = |o: &DynamicObject| Entry {
            group: obj.group().to_owned(),
            version: obj.version().to_owned(),
            kind: obj.kind.clone(),
            namespace: if namespaced {
                obj.namespace.clone().unwrap_or_default()
            } else {
                String::new()
            },
            name: obj.name.clone(),
            uid: o.metadata.uid.clone().unwrap_or_default(),
        };
        if let Some(live) = &live {
            let live_v = serde_json::to_value(live).unwrap_or_default();
            let planned_v = serde_json::to_value(&planned).unwrap_or_default();
            if differences(&live_v, &planned_v).is_empty() {
                return Ok((false, entry(live)));
            }
        }
        let applied = api
            .patch(&obj.name, &pp, &Patch::Apply(&body))
            .await
            .map_err(|e| conflict(e, obj))?;
        Ok((true, entry(&applied)))
    }

    /// Paths where the live object differs from what applying `obj` would
    /// make it (empty: no drift). `obj` is stamped with the live revision.
    pub async fn drift(&self, obj: &mut Object) -> Result<Vec<String>, ApplyError> {
        let api = self.api_for(obj).await?;
        let Some(live) = api.get_opt(&obj.name).await.map_err(classify)? else {
            return Ok(vec!["(object missing)".into()]);
        };
        // Compare with (and heal to) the revision that last changed it.
        if let Some(rev) = live
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(ANNOTATION_REVISION))
        {
            obj.body["metadata"]["annotations"][ANNOTATION_REVISION] = rev.as_str().into();
        }
        let mut pp = PatchParams::apply(FIELD_MANAGER);
        pp.dry_run = true;
        pp.force = true;
        let planned = api
            .patch(&obj.name, &pp, &Patch::Apply(&obj.body))
            .await
            .map_err(classify)?;
        Ok(differences(
            &serde_json::to_value(&live).unwrap_or_default(),
            &serde_json::to_value(&planned).unwrap_or_default(),
        ))
    }

    /// Waits until a CRD is Established and its kind is discoverable.
    pub async fn wait_established(&self, name: &str) -> Result<(), ApplyError> {
        let api = self
            .api(
                "apiextensions.k8s.io",
                "v1",
                "CustomResourceDefinition",
                None,
                name,
            )
            .await?;
        let deadline = tokio::time::Instant::now() + self.crd_timeout;
        loop {
            let crd = api.get(name).await.map_err(classify)?;
            let established = crd.data["status"]["conditions"]
                .as_array()
                .is_some_and(|c| {
                    c.iter()
                        .any(|c| c["type"] == "Established" && c["status"] == "True")
                });
            if established {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ApplyError::Rejected(format!(
                    "CustomResourceDefinition {name} was not established within {:?}",
                    self.crd_timeout
                )));
            }
            tracing::info!(crd = name, "waiting for the CRD to be established");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Live state of an inventory entry (`None`: gone).
    pub async fn get(&self, e: &Entry) -> Result<Option<Value>, ApplyError> {
        let ns = (!e.namespace.is_empty()).then_some(e.namespace.as_str());
        let api = match self.api(&e.group, &e.version, &e.kind, ns, &e.id()).await {
            Ok(a) => a,
            // The type is gone (CRD deleted): so is the object.
            Err(ApplyError::Rejected(_) | ApplyError::NotServed(_)) => return Ok(None),
            Err(u) => return Err(u),
        };
        let o = api.get_opt(&e.name).await.map_err(classify)?;
        Ok(
            o.filter(|o| e.uid.is_empty() || o.metadata.uid.as_deref() == Some(e.uid.as_str()))
                .map(|o| serde_json::to_value(o).unwrap_or_default()),
        )
    }

    /// Deletes an inventory entry (foreground), only if it is still the
    /// object that was applied: the uid precondition makes the API server
    /// refuse (409) a replacement; gone already (404, or its type) is done.
    pub async fn delete(&self, e: &Entry) -> Result<(), ApplyError> {
        let ns = (!e.namespace.is_empty()).then_some(e.namespace.as_str());
        let api = match self.api(&e.group, &e.version, &e.kind, ns, &e.id()).await {
            Ok(a) => a,
            Err(ApplyError::Rejected(_) | ApplyError::NotServed(_)) => return Ok(()),
            Err(other) => return Err(other),
        };
        let mut dp = DeleteParams::foreground();
        if !e.uid.is_empty() {
            dp.preconditions = Some(kube::api::Preconditions {
                uid: Some(e.uid.clone()),
                resource_version: None,
            });
        }
        match api.delete(&e.name, &dp).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => Ok(()),
            Err(other) => Err(classify(other)),
        }
    }

    /// Pods selected by a workload (for naming image-pull and crash-loop
    /// failures).
    pub async fn pods_of(&self, workload: &Value) -> Vec<Value> {
        let Some(labels) = workload["spec"]["selector"]["matchLabels"].as_object() else {
            return vec![];
        };
        let Some(ns) = workload["metadata"]["namespace"].as_str() else {
            return vec![];
        };
        let selector: Vec<String> = labels
            .iter()
            .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
            .collect();
        let pods: Api<DynamicObject> = Api::namespaced_with(
            self.client.clone(),
            ns,
            &ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("", "v1", "Pod"), "pods"),
        );
        pods.list(&ListParams::default().labels(&selector.join(",")))
            .await
            .map(|l| {
                l.items
                    .into_iter()
                    .map(|p| serde_json::to_value(p).unwrap_or_default())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Deployments (by namespace/name) that a HorizontalPodAutoscaler scales.
    pub async fn hpa_targets(&self, namespace: &str) -> Vec<String> {
        let hpas: Api<DynamicObject> = Api::namespaced_with(
            self.client.clone(),
            namespace,
            &ApiResource::from_gvk_with_plural(
                &GroupVersionKind::gvk("autoscaling", "v2", "HorizontalPodAutoscaler"),
                "horizontalpodautoscalers",
            ),
        );
        hpas.list(&ListParams::default())
            .await
            .map(|l| {
                l.items
                    .into_iter()
                    .filter(|h| h.data["spec"]["scaleTargetRef"]["kind"] == "Deployment")
                    .filter_map(|h| {
                        h.data["spec"]["scaleTargetRef"]["name"]
                            .as_str()
                            .map(|n| format!("{namespace}/{n}"))
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// A 409 from apply names the conflicting fields and their managers.
fn conflict(e: kube::Error, obj: &Object) -> ApplyError {
    match e {
        kube::Error::Api(s) if s.code == 409 && s.reason == "Conflict" => {
            let fields: Vec<String> = s
                .details
                .as_ref()
                .map(|d| {
                    d.causes
                        .iter()
                        .map(|c| format!("{} ({})", c.field, c.message))
                        .collect()
                })
                .unwrap_or_default();
            ApplyError::Rejected(format!(
                "{}: field manager conflict on {}; set the annotation unitsync.dev/force: enabled to take these fields",
                obj.id(),
                if fields.is_empty() {
                    s.message.clone()
                } else {
                    fields.join(", ")
                }
            ))
        }
        other => match classify(other) {
            ApplyError::Rejected(m) => ApplyError::Rejected(format!("{}: {m}", obj.id())),
            u => u,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn differences_ignore_server_fields() {
        let a = json!({"metadata": {"resourceVersion": "1", "annotations": {ANNOTATION_REVISION: "1"}}, "spec": {"replicas": 1, "x": {"y": 1}}, "status": {"a": 1}});
        let b = json!({"metadata": {"resourceVersion": "2", "annotations": {ANNOTATION_REVISION: "2"}}, "spec": {"replicas": 3, "x": {"y": 1}}, "status": {"a": 2}});
        assert_eq!(differences(&a, &b), ["spec.replicas"]);
        assert!(differences(&a, &a).is_empty());
    }
}
