//! Applying objects with server-side apply, the Flux way: resolve the type
//! through discovery, refuse objects another unit owns, dry-run first and
//! write only what would change (so unchanged objects are not touched and
//! a changed Deployment's generation moves once), report field-manager
//! conflicts with their paths, and detect drift by the same comparison.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::discovery::{Discovery, Scope};
use serde_json::Value;
use tokio::sync::RwLock;

use crate::inventory::Entry;
use crate::manifest::{ANNOTATION_REVISION, ANNOTATION_UNIT, LABEL_MANAGED_BY, Object};

/// The field manager the agent applies with.
pub const FIELD_MANAGER: &str = "unitsync";

/// The field manager holding a workload's `spec.replicas` the agent handed
/// over when an autoscaler took the workload on (see
/// [`Applier::hand_over_replicas`]).
pub const REPLICAS_HANDOFF: &str = "unitsync-replicas-handoff";

/// Workloads an autoscaler scales through `spec.replicas`.
pub const SCALED_KINDS: [&str; 2] = ["Deployment", "StatefulSet"];

/// A workload as autoscalers name it: `KIND/NAMESPACE/NAME`.
pub fn scaled_key(kind: &str, namespace: &str, name: &str) -> String {
    format!("{kind}/{namespace}/{name}")
}

/// The workload a HorizontalPodAutoscaler (its body, in `namespace`)
/// scales, when it is one of [`SCALED_KINDS`].
pub fn scale_target(hpa: &Value, namespace: &str) -> Option<String> {
    let target = &hpa["spec"]["scaleTargetRef"];
    let kind = target["kind"].as_str()?;
    SCALED_KINDS
        .contains(&kind)
        .then(|| scaled_key(kind, namespace, target["name"].as_str().unwrap_or("")))
}

/// How a live object differs from what applying it would make it.
#[derive(Debug, PartialEq)]
pub enum ObjectDrift {
    /// It is gone.
    Missing,
    /// These fields were changed by someone else.
    Fields(Vec<String>),
}

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
    /// Served kinds with a `status` subresource (a controller reports).
    with_status: RwLock<std::collections::HashSet<GroupVersionKind>>,
    /// Versions inventory entries were recorded at that are no longer
    /// served, and the version their objects are addressed at instead.
    moved: RwLock<HashMap<GroupVersionKind, String>>,
    /// One listable version per served group and kind, for recovering a
    /// unit's membership from labels.
    scan_types: RwLock<HashMap<(String, String), (ApiResource, bool)>>,
    /// The last membership scan and when it started, shared by units that
    /// lost (or never had) an inventory at about the same time.
    scanned: tokio::sync::Mutex<Option<(tokio::time::Instant, Arc<Membership>)>>,
    pub crd_timeout: Duration,
    /// The namespaces the agent may change (empty: the whole cluster).
    namespaces: Vec<String>,
    /// What this agent wrote (its own writes wake no drift check).
    own: Arc<crate::drift::OwnWrites>,
}

/// Where to list or watch a type for the agent's objects: the whole
/// cluster, or each allowed namespace when the agent is confined to some (a
/// namespaced install's Roles allow nothing at the cluster scope, so a
/// cluster-wide list of a namespaced type is refused); nowhere for a
/// cluster-scoped type then (a confined agent applies none).
pub fn scoped_apis(
    client: &kube::Client,
    ar: &ApiResource,
    namespaced: bool,
    namespaces: &[String],
) -> Vec<Api<DynamicObject>> {
    match (namespaced, namespaces.is_empty()) {
        (_, true) => vec![Api::all_with(client.clone(), ar)],
        (true, false) => namespaces
            .iter()
            .map(|ns| Api::namespaced_with(client.clone(), ns, ar))
            .collect(),
        (false, false) => Vec::new(),
    }
}

/// Objects carrying `unitsync.dev/unit` annotations, by that annotation
/// (`ENV/UNIT`).
pub type Membership = HashMap<String, Vec<Entry>>;

/// How long a membership scan is reused.
const SCAN_REUSE: Duration = Duration::from_secs(5);

/// Whether a field is the server's (or the revision stamp), not part of
/// what was applied: `status`, and in `metadata` the server-set fields.
fn ignored(path: &[&str], key: &str) -> bool {
    match path {
        [] => key == "status",
        ["metadata"] => matches!(
            key,
            "resourceVersion" | "managedFields" | "generation" | "creationTimestamp" | "uid"
        ),
        ["metadata", "annotations"] => key == ANNOTATION_REVISION,
        _ => false,
    }
}

/// An empty map and a missing field are the same (annotations that only
/// held the revision stamp).
fn is_nothing(v: Option<&Value>) -> bool {
    v.is_none_or(|v| v.is_null() || v.as_object().is_some_and(serde_json::Map::is_empty))
}

fn diff_into<'a>(
    a: Option<&'a Value>,
    b: Option<&'a Value>,
    path: &mut Vec<&'a str>,
    out: &mut Vec<String>,
) {
    match (a, b) {
        (Some(Value::Object(x)), Some(Value::Object(y))) => {
            let mut keys: Vec<&'a String> = x.keys().chain(y.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                if ignored(path, k) {
                    continue;
                }
                path.push(k);
                diff_into(x.get(k.as_str()), y.get(k.as_str()), path, out);
                path.pop();
            }
        }
        (Some(Value::Object(x)), other) | (other, Some(Value::Object(x)))
            if is_nothing(other) && x.keys().all(|k| ignored(path, k)) => {}
        (x, y) if is_nothing(x) && is_nothing(y) => {}
        (x, y) if x != y => out.push(path.join(".")),
        _ => {}
    }
}

/// Leaf paths where two objects differ (`spec.replicas`, `data.x`),
/// without copying either (a unit may hold megabytes).
pub fn differences(a: &Value, b: &Value) -> Vec<String> {
    let mut out = Vec::new();
    diff_into(Some(a), Some(b), &mut Vec::new(), &mut out);
    out
}

/// The same for two objects as the API returned them: the metadata
/// (small) compared as JSON, the rest in place.
pub fn object_differences(a: &DynamicObject, b: &DynamicObject) -> Vec<String> {
    let meta = |o: &DynamicObject| serde_json::json!({"metadata": serde_json::to_value(&o.metadata).unwrap_or_default()});
    let mut out = differences(&meta(a), &meta(b));
    out.extend(differences(&a.data, &b.data));
    out
}

fn not_served(gvk: &GroupVersionKind) -> ApplyError {
    ApplyError::NotServed(format!(
        "waiting for the cluster to serve {} in {}",
        gvk.kind,
        gvk.api_version()
    ))
}

/// Whether a served type has a `status` subresource.
fn reports_status(caps: &kube::discovery::ApiCapabilities) -> bool {
    caps.subresources
        .iter()
        .any(|(sub, _)| sub.plural == "status")
}

/// A bare 404 (no `NotFound` status): the path is not served (a version
/// of a type that stopped being served), which says nothing of the object.
fn unserved_path(s: &kube::core::Status) -> bool {
    s.code == 404 && s.reason != "NotFound"
}

impl Applier {
    /// Reads the served kinds once (which also proves the API reachable).
    /// `namespaces`: those the agent may change (empty: any).
    pub async fn new(
        client: kube::Client,
        crd_timeout: Duration,
        namespaces: Vec<String>,
    ) -> Result<Applier, ApplyError> {
        let discovery = Discovery::new(client.clone())
            .run()
            .await
            .map_err(classify)?;
        let mut kinds = HashMap::new();
        let mut with_status = std::collections::HashSet::new();
        let mut scan_types = HashMap::new();
        for group in discovery.groups() {
            for version in group.versions() {
                for (ar, caps) in group.versioned_resources(version) {
                    let gvk = GroupVersionKind::gvk(&ar.group, &ar.version, &ar.kind);
                    if reports_status(&caps) {
                        with_status.insert(gvk.clone());
                    }
                    kinds.insert(gvk, (ar, caps.scope == Scope::Namespaced));
                }
            }
            for (ar, caps) in group.recommended_resources() {
                if caps.supports_operation(kube::discovery::verbs::LIST) {
                    scan_types.insert(
                        (ar.group.clone(), ar.kind.clone()),
                        (ar, caps.scope == Scope::Namespaced),
                    );
                }
            }
        }
        Ok(Applier {
            client,
            kinds: RwLock::new(kinds),
            with_status: RwLock::new(with_status),
            moved: RwLock::default(),
            scan_types: RwLock::new(scan_types),
            scanned: tokio::sync::Mutex::new(None),
            crd_timeout,
            namespaces,
            own: Arc::default(),
        })
    }

    /// What this agent wrote, shared with the drift watch and the
    /// inventory.
    pub fn own_writes(&self) -> Arc<crate::drift::OwnWrites> {
        self.own.clone()
    }

    /// Every object carrying a unit annotation, by unit (`ENV/UNIT`),
    /// across all served listable types: how a unit whose inventory is
    /// missing finds its objects. A scan that started after `not_before`
    /// (and a few seconds ago at most) is reused, so units created together
    /// share one scan; pass the time the caller last wrote the unit's
    /// objects, so a scan older than them never hides them. An agent
    /// confined to some namespaces lists namespaced types in each of them.
    /// Types the agent may not list (403) cannot hold objects it created
    /// and are skipped; any other failure fails the scan (an incomplete
    /// membership must not look complete).
    pub async fn membership(
        &self,
        not_before: Option<tokio::time::Instant>,
    ) -> Result<Arc<Membership>, ApplyError> {
        let mut cached = self.scanned.lock().await;
        if let Some((started, m)) = cached.as_ref()
            && started.elapsed() < SCAN_REUSE
            && not_before.is_none_or(|t| *started > t)
        {
            return Ok(m.clone());
        }
        let started = tokio::time::Instant::now();
        let types: Vec<(ApiResource, bool)> =
            self.scan_types.read().await.values().cloned().collect();
        let mut out = Membership::new();
        let lp = ListParams::default().labels(&format!("{LABEL_MANAGED_BY}=unitsync"));
        for (ar, namespaced) in types {
            let mut items = Vec::new();
            for api in scoped_apis(&self.client, &ar, namespaced, &self.namespaces) {
                match api.list(&lp).await {
                    Ok(l) => items.extend(l.items),
                    Err(kube::Error::Api(s)) if (403..=405).contains(&s.code) => {}
                    Err(e) => return Err(classify(e)),
                }
            }
            for o in items {
                let Some(unit) = o
                    .metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(ANNOTATION_UNIT))
                else {
                    continue;
                };
                out.entry(unit.clone()).or_default().push(Entry {
                    group: ar.group.clone(),
                    version: ar.version.clone(),
                    kind: ar.kind.clone(),
                    namespace: if namespaced {
                        o.metadata.namespace.clone().unwrap_or_default()
                    } else {
                        String::new()
                    },
                    name: o.metadata.name.clone().unwrap_or_default(),
                    uid: o.metadata.uid.clone().unwrap_or_default(),
                });
            }
        }
        let m = Arc::new(out);
        *cached = Some((started, m.clone()));
        Ok(m)
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
                if reports_status(&caps) {
                    self.with_status.write().await.insert(gvk.clone());
                }
                let found = (ar, caps.scope == Scope::Namespaced);
                if caps.supports_operation(kube::discovery::verbs::LIST) {
                    self.scan_types
                        .write()
                        .await
                        .entry((found.0.group.clone(), found.0.kind.clone()))
                        .or_insert_with(|| found.clone());
                }
                self.kinds.write().await.insert(gvk, found.clone());
                Ok(found)
            }
            Err(kube::Error::Api(s)) if s.code == 404 => Err(not_served(&gvk)),
            Err(kube::Error::Discovery(_)) => Err(not_served(&gvk)),
            Err(other) => Err(classify(other)),
        }
    }

    /// The served resource of a kind (for watching it).
    /// What health needs to know of an entry's type.
    pub async fn type_info(&self, e: &Entry) -> crate::health::TypeInfo {
        let gvk = GroupVersionKind::gvk(&e.group, &e.version, &e.kind);
        crate::health::TypeInfo {
            reports_status: self.with_status.read().await.contains(&gvk),
        }
    }

    pub async fn resource(
        &self,
        group: &str,
        version: &str,
        kind: &str,
    ) -> Option<(ApiResource, bool)> {
        self.resolve(group, version, kind).await.ok()
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
        let namespaced = obj.namespace.is_some() && api.resource_url().contains("/namespaces/");
        // A copy only when the namespace must go (cluster-scoped objects,
        // small); a unit may hold megabytes.
        let stripped;
        let body = if !namespaced && obj.body["metadata"].get("namespace").is_some() {
            let mut b = obj.body.clone();
            if let Some(m) = b["metadata"].as_object_mut() {
                m.remove("namespace");
            }
            stripped = b;
            &stripped
        } else {
            &obj.body
        };
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
        let planned = match api.patch(&obj.name, &dry, &Patch::Apply(body)).await {
            // Replicas the agent handed over while an autoscaler scaled the
            // workload: its own again now that the unit sets them.
            Err(kube::Error::Api(s)) if !force && only_handed_over(&s) => {
                pp.force = true;
                dry.force = true;
                api.patch(&obj.name, &dry, &Patch::Apply(body))
                    .await
                    .map_err(|e| conflict(e, obj))?
            }
            r => r.map_err(|e| conflict(e, obj))?,
        };
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
        if let Some(live) = &live
            && object_differences(live, &planned).is_empty()
        {
            // Unchanged: as it stands, it is what the agent would write (a
            // status change of this generation is not someone's edit).
            self.own.record(
                crate::drift::qualified_kind(obj.group(), &obj.kind),
                &live.metadata,
            );
            return Ok((false, entry(live)));
        }
        // Only one copy of a large object at a time.
        drop(live);
        drop(planned);
        let applied = api
            .patch(&obj.name, &pp, &Patch::Apply(body))
            .await
            .map_err(|e| conflict(e, obj))?;
        self.own.record(
            crate::drift::qualified_kind(obj.group(), &obj.kind),
            &applied.metadata,
        );
        Ok((true, entry(&applied)))
    }

    /// Hands `spec.replicas` of a workload over to a manager of its own
    /// before the agent stops applying it (an autoscaler scales it now):
    /// applied without it, a field only the agent owned would be removed,
    /// and the workload scaled to its default of 1 until the autoscaler
    /// acted (Kubernetes' "transferring ownership"). Nothing to do when
    /// the agent does not own the field.
    pub async fn hand_over_replicas(&self, obj: &Object) -> Result<(), ApplyError> {
        let api = self.api_for(obj).await?;
        let Some(live) = api.get_opt(&obj.name).await.map_err(classify)? else {
            return Ok(());
        };
        let owns_replicas = |manager: &str| {
            live.metadata.managed_fields.iter().flatten().any(|m| {
                m.manager.as_deref() == Some(manager)
                    && m.operation.as_deref() == Some("Apply")
                    && m.fields_v1
                        .as_ref()
                        .is_some_and(|f| f.0["f:spec"].get("f:replicas").is_some())
            })
        };
        // Handed over already (the agent's entry lasts until it next
        // writes the object): nothing to write again.
        let due = owns_replicas(FIELD_MANAGER) && !owns_replicas(REPLICAS_HANDOFF);
        let Some(replicas) = live.data["spec"]["replicas"].as_i64().filter(|_| due) else {
            return Ok(());
        };
        let body = serde_json::json!({
            "apiVersion": obj.body["apiVersion"],
            "kind": obj.kind,
            "metadata": {"name": obj.name, "namespace": obj.namespace},
            "spec": {"replicas": replicas},
        });
        match api
            .patch(
                &obj.name,
                &PatchParams::apply(REPLICAS_HANDOFF),
                &Patch::Apply(body),
            )
            .await
        {
            Ok(written) => {
                self.own.record(
                    crate::drift::qualified_kind(obj.group(), &obj.kind),
                    &written.metadata,
                );
                Ok(())
            }
            // Someone else holds another value: the field stays theirs.
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
            Err(e) => Err(classify(e)),
        }
    }

    /// How the live object differs from what applying `obj` would make it
    /// (`None`: it does not). `obj` is stamped with the live revision.
    pub async fn drift(&self, obj: &mut Object) -> Result<Option<ObjectDrift>, ApplyError> {
        let api = self.api_for(obj).await?;
        let Some(live) = api.get_opt(&obj.name).await.map_err(classify)? else {
            return Ok(Some(ObjectDrift::Missing));
        };
        // Compare with (and heal to) the revision that last changed it.
        if let Some(rev) = live
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(ANNOTATION_REVISION))
        {
            crate::manifest::set_revision(obj, rev);
        }
        let mut pp = PatchParams::apply(FIELD_MANAGER);
        pp.dry_run = true;
        pp.force = true;
        let planned = api
            .patch(&obj.name, &pp, &Patch::Apply(&obj.body))
            .await
            .map_err(classify)?;
        let paths = object_differences(&live, &planned);
        Ok((!paths.is_empty()).then_some(ObjectDrift::Fields(paths)))
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

    /// The API of an inventory entry's type (`None`: the type is gone, and
    /// its objects with it). An object outlives a version of its type: when
    /// the recorded version is not served (any more: `recheck` looks again,
    /// after its path answered a bare 404), the version the group serves
    /// the kind at addresses the same object (remembered). Any other
    /// failure is an error, never "gone".
    async fn entry_api(
        &self,
        e: &Entry,
        recheck: bool,
    ) -> Result<Option<Api<DynamicObject>>, ApplyError> {
        let ns = (!e.namespace.is_empty()).then_some(e.namespace.as_str());
        let gvk = GroupVersionKind::gvk(&e.group, &e.version, &e.kind);
        if recheck {
            self.moved.write().await.remove(&gvk);
        }
        let version = self.moved.read().await.get(&gvk).cloned();
        let version = version.unwrap_or_else(|| e.version.clone());
        if recheck {
            let at = GroupVersionKind::gvk(&e.group, &version, &e.kind);
            self.kinds.write().await.remove(&at);
        }
        match self.api(&e.group, &version, &e.kind, ns, &e.id()).await {
            Ok(api) => return Ok(Some(api)),
            Err(ApplyError::NotServed(_)) => {}
            Err(other) => return Err(other),
        }
        let Some(served) = self.served_version(&e.group, &e.kind).await? else {
            return Ok(None);
        };
        if served == version {
            // Discovery disagrees with itself (a CRD changing): try later.
            return Err(not_served(&gvk));
        }
        let api = self.api(&e.group, &served, &e.kind, ns, &e.id()).await?;
        self.moved.write().await.insert(gvk, served);
        Ok(Some(api))
    }

    /// The version a group serves a kind at now (its preferred one), if
    /// any; core kinds are served at `v1` for good.
    async fn served_version(&self, group: &str, kind: &str) -> Result<Option<String>, ApplyError> {
        if group.is_empty() {
            return Ok(None);
        }
        match kube::discovery::group(&self.client, group).await {
            Ok(g) => Ok(g.recommended_kind(kind).map(|(ar, _)| ar.version)),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(None),
            Err(kube::Error::Discovery(_)) => Ok(None),
            Err(other) => Err(classify(other)),
        }
    }

    /// Live state of an inventory entry (`None`: gone).
    pub async fn get(&self, e: &Entry) -> Result<Option<Value>, ApplyError> {
        self.read(e, false).await
    }

    /// [`Applier::get`]; with `forbidden_is_absent`, an object the agent may
    /// not read (403) reads as none.
    async fn read(
        &self,
        e: &Entry,
        forbidden_is_absent: bool,
    ) -> Result<Option<Value>, ApplyError> {
        let mut recheck = false;
        let o = loop {
            let Some(api) = self.entry_api(e, recheck).await? else {
                // The type is gone (CRD deleted): so is the object.
                return Ok(None);
            };
            match api.get_opt(&e.name).await {
                Ok(o) => break o,
                Err(kube::Error::Api(s)) if unserved_path(&s) && !recheck => recheck = true,
                Err(kube::Error::Api(s)) if forbidden_is_absent && s.code == 403 => break None,
                Err(other) => return Err(classify(other)),
            }
        };
        Ok(
            o.filter(|o| e.uid.is_empty() || o.metadata.uid.as_deref() == Some(e.uid.as_str()))
                .map(|o| serde_json::to_value(o).unwrap_or_default()),
        )
    }

    /// The live object of an entry written ahead of its apply (no uid
    /// known), if it exists and belongs to `unit` (`ENV/UNIT`): only then
    /// may it be pruned. One the agent may not read (its apply was refused,
    /// or never allowed) was not created by it.
    pub async fn owned(&self, e: &Entry, unit: &str) -> Result<Option<Entry>, ApplyError> {
        let Some(live) = self.read(e, true).await? else {
            return Ok(None);
        };
        if live["metadata"]["annotations"][ANNOTATION_UNIT] != unit {
            return Ok(None);
        }
        Ok(Some(Entry {
            uid: live["metadata"]["uid"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            ..e.clone()
        }))
    }

    /// Deletes an inventory entry (foreground), only if it is still the
    /// object that was applied: the uid precondition makes the API server
    /// refuse (409) a replacement; gone already (404, or its type) is done.
    /// An entry without a uid is never deleted (see [`Applier::owned`]).
    pub async fn delete(&self, e: &Entry) -> Result<(), ApplyError> {
        if e.uid.is_empty() {
            return Ok(());
        }
        let mut dp = DeleteParams::foreground();
        dp.preconditions = Some(kube::api::Preconditions {
            uid: Some(e.uid.clone()),
            resource_version: None,
        });
        let mut recheck = false;
        loop {
            // No API: its type is gone, and the object with it.
            let Some(api) = self.entry_api(e, recheck).await? else {
                break;
            };
            match api.delete(&e.name, &dp).await {
                Ok(_) => break,
                Err(kube::Error::Api(s)) if unserved_path(&s) && !recheck => recheck = true,
                // Gone, or (409: the precondition) replaced by another.
                Err(kube::Error::Api(s))
                    if !unserved_path(&s) && (s.code == 404 || s.code == 409) =>
                {
                    break;
                }
                Err(other) => return Err(classify(other)),
            }
        }
        self.own.forget_uid(&e.uid);
        Ok(())
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
        let lp = ListParams::default().labels(&selector.join(","));
        let values = |l: kube::core::ObjectList<DynamicObject>| -> Vec<Value> {
            l.items
                .into_iter()
                .map(|p| serde_json::to_value(p).unwrap_or_default())
                .collect()
        };
        let found = pods.list(&lp).await.map(values).unwrap_or_default();
        // Which revision a pod is of matters only when one is failing.
        if workload["kind"] != "Deployment" || !crate::health::any_stuck(&found) {
            return found;
        }
        // Only the current revision's pods speak for it.
        let replica_sets: Api<DynamicObject> = Api::namespaced_with(
            self.client.clone(),
            ns,
            &ApiResource::from_gvk_with_plural(
                &GroupVersionKind::gvk("apps", "v1", "ReplicaSet"),
                "replicasets",
            ),
        );
        let sets = replica_sets.list(&lp).await.map(values).unwrap_or_default();
        crate::health::current_pods(found, &sets)
    }

    /// Deployments (by namespace/name) that a HorizontalPodAutoscaler scales.
    /// A failed list is an error: guessing "no autoscaler" would fight one.
    pub async fn hpa_targets(&self, namespace: &str) -> Result<Vec<String>, ApplyError> {
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
                    .filter_map(|h| scale_target(&h.data, namespace))
                    .collect()
            })
            .or_else(|e| match e {
                // No autoscaling API at all: nothing can scale Deployments.
                kube::Error::Api(s) if s.code == 404 => Ok(vec![]),
                e => Err(match classify(e) {
                    ApplyError::Rejected(m) => ApplyError::Unreachable(format!(
                        "cannot list HorizontalPodAutoscalers in {namespace}: {m}"
                    )),
                    other => other,
                }),
            })
    }
}

/// Whether an apply conflicts only with the agent's own replicas handoff.
fn only_handed_over(s: &kube::core::Status) -> bool {
    let manager = format!("\"{REPLICAS_HANDOFF}\"");
    s.code == 409
        && s.details.as_ref().is_some_and(|d| {
            !d.causes.is_empty() && d.causes.iter().all(|c| c.message.contains(&manager))
        })
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
