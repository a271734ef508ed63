//! The in-memory object store with the API server's write semantics:
//! metadata (uid, cluster-wide resourceVersion, generation), optimistic
//! concurrency, server-side apply with managedFields, patches, finalizers
//! and deletion, and the event history that watches replay.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use serde_json::{Map, Value, json};
use tokio::sync::broadcast;

use super::errors::ApiError;
use super::fields::{self, FieldSet, Path};
use super::registry::{self, ResourceType};

/// Identity of a stored object.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Key {
    pub group: String,
    pub plural: String,
    pub namespace: String,
    pub name: String,
}

/// A change, as watches see it.
#[derive(Clone, Debug)]
pub(crate) struct Event {
    pub rv: u64,
    pub kind: &'static str,
    pub key: Key,
    pub object: Value,
}

/// Names of finalizers the store understands.
pub(crate) const FOREGROUND: &str = "foregroundDeletion";
pub(crate) const ORPHAN: &str = "orphan";
pub(crate) const CRD_CLEANUP: &str = "customresourcecleanup.apiextensions.k8s.io";

pub(crate) struct State {
    pub rv: u64,
    pub types: Vec<ResourceType>,
    pub objects: BTreeMap<Key, Value>,
    pub history: VecDeque<Event>,
    pub history_limit: usize,
    /// Events at or below this version are no longer retained.
    pub compacted: u64,
    pub events: broadcast::Sender<Arc<Event>>,
}

/// Write parameters common to all verbs.
#[derive(Clone, Debug, Default)]
pub(crate) struct WriteOpts {
    pub manager: String,
    pub dry_run: bool,
    pub force: bool,
    pub subresource: Option<String>,
}

pub(crate) fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

fn uuid() -> String {
    let b: [u8; 16] = rand::random();
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
        u16::from_be_bytes([b[4], b[5]]),
        u16::from_be_bytes([b[6], b[7]]) & 0x0fff,
        (u16::from_be_bytes([b[8], b[9]]) & 0x3fff) | 0x8000,
        u64::from_be_bytes([0, 0, b[10], b[11], b[12], b[13], b[14], b[15]])
    )
}

fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|p| {
            let b = p.as_bytes();
            !b.is_empty()
                && b[0].is_ascii_alphanumeric()
                && b[b.len() - 1].is_ascii_alphanumeric()
                && b.iter()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        })
        && !s.bytes().any(|c| c.is_ascii_uppercase())
}

const SUBDOMAIN_MSG: &str = "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')";

/// A managedFields entry.
#[derive(Clone, Debug)]
struct Managed {
    manager: String,
    operation: String,
    api_version: String,
    time: String,
    subresource: String,
    set: FieldSet,
}

fn read_managed(obj: &Value) -> Vec<Managed> {
    obj["metadata"]["managedFields"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| Managed {
                    manager: e["manager"].as_str().unwrap_or_default().into(),
                    operation: e["operation"].as_str().unwrap_or_default().into(),
                    api_version: e["apiVersion"].as_str().unwrap_or_default().into(),
                    time: e["time"].as_str().unwrap_or_default().into(),
                    subresource: e["subresource"].as_str().unwrap_or_default().into(),
                    set: fields::from_fields_v1(&e["fieldsV1"]),
                })
                .collect()
        })
        .unwrap_or_default()
}

fn write_managed(obj: &mut Value, mut entries: Vec<Managed>) {
    entries.retain(|e| !e.set.is_empty());
    entries.sort_by(|a, b| {
        (
            a.operation != "Apply",
            &a.time,
            &a.manager,
            &a.api_version,
            &a.subresource,
        )
            .cmp(&(
                b.operation != "Apply",
                &b.time,
                &b.manager,
                &b.api_version,
                &b.subresource,
            ))
    });
    let v: Vec<Value> = entries
        .iter()
        .map(|e| {
            let mut m = json!({
                "manager": e.manager,
                "operation": e.operation,
                "apiVersion": e.api_version,
                "time": e.time,
                "fieldsType": "FieldsV1",
                "fieldsV1": fields::to_fields_v1(&e.set),
            });
            if !e.subresource.is_empty() {
                m["subresource"] = json!(e.subresource);
            }
            m
        })
        .collect();
    if v.is_empty() {
        if let Some(m) = obj["metadata"].as_object_mut() {
            m.remove("managedFields");
        }
    } else {
        obj["metadata"]["managedFields"] = Value::Array(v);
    }
}

/// The object without server-maintained metadata, for no-op and
/// generation comparisons.
fn content(obj: &Value, keep_meta: bool) -> Value {
    let mut c = obj.clone();
    if let Some(m) = c["metadata"].as_object_mut() {
        for k in ["managedFields", "resourceVersion", "generation"] {
            m.remove(k);
        }
        if !keep_meta {
            c.as_object_mut().map(|o| o.remove("metadata"));
        }
    }
    c
}

fn spec_part(obj: &Value, deployment: bool) -> Value {
    let mut c = obj.clone();
    if let Some(o) = c.as_object_mut() {
        let ann = o
            .get("metadata")
            .and_then(|m| m.get("annotations"))
            .cloned();
        o.remove("metadata");
        o.remove("status");
        if deployment {
            o.insert("__annotations".into(), ann.unwrap_or(Value::Null));
        }
    }
    c
}

impl State {
    pub(crate) fn new(history_limit: usize) -> State {
        let (events, _) = broadcast::channel(65_536);
        State {
            rv: 1,
            types: registry::builtins(),
            objects: BTreeMap::new(),
            history: VecDeque::new(),
            history_limit,
            compacted: 0,
            events,
        }
    }

    pub(crate) fn find_type(
        &self,
        group: &str,
        version: &str,
        plural: &str,
    ) -> Option<ResourceType> {
        self.types
            .iter()
            .find(|t| t.group == group && t.version == version && t.plural == plural)
            .cloned()
    }

    pub(crate) fn type_of_key(&self, key: &Key) -> Option<ResourceType> {
        self.types
            .iter()
            .find(|t| t.group == key.group && t.plural == key.plural)
            .cloned()
    }

    fn record(&mut self, kind: &'static str, key: Key, object: Value) {
        let ev = Event {
            rv: self.rv,
            kind,
            key,
            object,
        };
        self.history.push_back(ev.clone());
        while self.history.len() > self.history_limit {
            if let Some(old) = self.history.pop_front() {
                self.compacted = old.rv;
            }
        }
        let _ = self.events.send(Arc::new(ev));
    }

    /// Drops history so that versions up to `rv` are gone (410 on watch).
    pub(crate) fn compact(&mut self) {
        self.history.clear();
        self.compacted = self.rv;
    }

    /// Stores a new or changed object, bumping the cluster-wide version.
    pub(crate) fn store(&mut self, key: Key, mut obj: Value) -> Value {
        self.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        let kind = if self.objects.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        self.objects.insert(key.clone(), obj.clone());
        self.record(kind, key, obj.clone());
        obj
    }

    /// Removes an object for good (a DELETED event at a new version).
    pub(crate) fn purge(&mut self, key: &Key) -> Option<Value> {
        let mut obj = self.objects.remove(key)?;
        self.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        self.record("DELETED", key.clone(), obj.clone());
        Some(obj)
    }

    fn check_namespace(&self, ty: &ResourceType, ns: &str, name: &str) -> Result<(), ApiError> {
        if !ty.namespaced {
            return Ok(());
        }
        let key = Key {
            group: String::new(),
            plural: "namespaces".into(),
            namespace: String::new(),
            name: ns.into(),
        };
        match self.objects.get(&key) {
            None => Err(ApiError::not_found("namespaces", "", ns)),
            Some(n) if n["metadata"]["deletionTimestamp"].is_string() => Err(ApiError::new(
                403,
                "Forbidden",
                format!("{} \"{name}\" is forbidden: unable to create new content in namespace {ns} because it is being terminated", ty.qualified()),
            )
            .with_details(json!({"name": name, "kind": ty.plural, "causes": [{"reason": "NamespaceTerminating", "message": format!("namespace {ns} is being terminated"), "field": "metadata.namespace"}]}))),
            Some(_) => Ok(()),
        }
    }

    pub(crate) fn key(ty: &ResourceType, ns: &str, name: &str) -> Key {
        Key {
            group: ty.group.clone(),
            plural: ty.plural.clone(),
            namespace: if ty.namespaced {
                ns.to_owned()
            } else {
                String::new()
            },
            name: name.to_owned(),
        }
    }

    pub(crate) fn get(&self, ty: &ResourceType, ns: &str, name: &str) -> Result<Value, ApiError> {
        self.objects
            .get(&Self::key(ty, ns, name))
            .map(|o| self.at_version(o, ty))
            .ok_or_else(|| ApiError::not_found(&ty.plural, &ty.group, name))
    }

    /// An object as served at a given version of its type.
    pub(crate) fn at_version(&self, obj: &Value, ty: &ResourceType) -> Value {
        let mut o = obj.clone();
        o["apiVersion"] = json!(ty.api_version());
        o
    }

    fn check_body(
        &self,
        ty: &ResourceType,
        ns: &str,
        body: &Value,
        url_name: Option<&str>,
    ) -> Result<(), ApiError> {
        let av = body["apiVersion"].as_str().unwrap_or_default();
        let kind = body["kind"].as_str().unwrap_or_default();
        if !av.is_empty() && (av != ty.api_version() || (!kind.is_empty() && kind != ty.kind)) {
            return Err(ApiError::bad_request(format!(
                "the API version in the data ({av}) does not match the expected API version ({})",
                ty.api_version()
            )));
        }
        if let Some(url) = url_name
            && let Some(n) = body["metadata"]["name"].as_str()
            && n != url
        {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({n}) does not match the name on the URL ({url})"
            )));
        }
        if ty.namespaced
            && let Some(bns) = body["metadata"]["namespace"].as_str()
            && !bns.is_empty()
            && bns != ns
        {
            return Err(ApiError::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }
        Ok(())
    }

    fn defaults(ty: &ResourceType, obj: &mut Value) {
        match (ty.group.as_str(), ty.kind.as_str()) {
            ("apps", "Deployment") => {
                let spec = &mut obj["spec"];
                if spec.get("replicas").is_none() {
                    spec["replicas"] = json!(1);
                }
                if spec.get("progressDeadlineSeconds").is_none() {
                    spec["progressDeadlineSeconds"] = json!(600);
                }
                if spec.get("revisionHistoryLimit").is_none() {
                    spec["revisionHistoryLimit"] = json!(10);
                }
            }
            ("apps", "StatefulSet") if obj["spec"].get("replicas").is_none() => {
                obj["spec"]["replicas"] = json!(1);
            }
            ("", "Service") => {
                if obj["spec"].get("type").is_none() {
                    obj["spec"]["type"] = json!("ClusterIP");
                }
                if obj["spec"]["clusterIP"].as_str().unwrap_or("").is_empty()
                    && obj["spec"]["type"] != "ExternalName"
                {
                    let n: u8 = rand::random::<u8>() % 250 + 2;
                    let m: u8 = rand::random::<u8>() % 250 + 2;
                    obj["spec"]["clusterIP"] = json!(format!("10.96.{n}.{m}"));
                }
            }
            ("", "Namespace") => {
                let name = obj["metadata"]["name"].clone();
                obj["metadata"]["labels"]["kubernetes.io/metadata.name"] = name;
                obj["spec"]["finalizers"] = json!(["kubernetes"]);
                if obj["status"]["phase"].is_null() {
                    obj["status"]["phase"] = json!("Active");
                }
            }
            ("", "PersistentVolumeClaim") if obj["status"]["phase"].is_null() => {
                obj["status"]["phase"] = json!("Pending");
            }
            _ => {}
        }
    }

    /// POST.
    pub(crate) fn create(
        &mut self,
        ty: &ResourceType,
        ns: &str,
        mut body: Value,
        opts: &WriteOpts,
    ) -> Result<Value, ApiError> {
        self.check_body(ty, ns, &body, None)?;
        if body["metadata"]["resourceVersion"]
            .as_str()
            .is_some_and(|s| !s.is_empty())
        {
            return Err(ApiError::new(
                500,
                "InternalError",
                "resourceVersion should not be set on objects to be created",
            ));
        }
        if body["metadata"]["name"].as_str().unwrap_or("").is_empty()
            && let Some(prefix) = body["metadata"]["generateName"].as_str()
        {
            const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
            let suffix: String = (0..5)
                .map(|_| ALPHABET[rand::random::<u8>() as usize % ALPHABET.len()] as char)
                .collect();
            body["metadata"]["name"] = json!(format!("{prefix}{suffix}"));
        }
        let name = body["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        if name.is_empty() {
            return Err(ApiError::invalid(
                &ty.qualified_kind(),
                "",
                "metadata.name",
                "FieldValueRequired",
                "Required value: name or generateName is required",
            ));
        }
        self.validate_name(ty, &name)?;
        self.check_namespace(ty, ns, &name)?;
        let key = Self::key(ty, ns, &name);
        if self.objects.contains_key(&key) {
            return Err(ApiError::already_exists(&ty.plural, &ty.group, &name));
        }
        let mut obj = body;
        self.init_object(ty, ns, &mut obj);
        let set = fields::leaves(&obj, ty.crd.is_none(), ty.status_subresource);
        write_managed(
            &mut obj,
            vec![Managed {
                manager: opts.manager.clone(),
                operation: "Update".into(),
                api_version: ty.api_version(),
                time: now_rfc3339(),
                subresource: String::new(),
                set,
            }],
        );
        if opts.dry_run {
            return Ok(obj);
        }
        let stored = self.store(key, obj);
        self.after_write(ty, &stored);
        Ok(self.at_version(&stored, ty))
    }

    fn validate_name(&self, ty: &ResourceType, name: &str) -> Result<(), ApiError> {
        if !is_dns_subdomain(name)
            || (ty.kind == "Namespace" && (name.len() > 63 || name.contains('.')))
        {
            return Err(ApiError::invalid(
                &ty.qualified_kind(),
                name,
                "metadata.name",
                "FieldValueInvalid",
                &format!("Invalid value: \"{name}\": {SUBDOMAIN_MSG}"),
            ));
        }
        Ok(())
    }

    fn init_object(&self, ty: &ResourceType, ns: &str, obj: &mut Value) {
        obj["apiVersion"] = json!(ty.api_version());
        obj["kind"] = json!(ty.kind);
        if ty.namespaced {
            obj["metadata"]["namespace"] = json!(ns);
        } else if let Some(m) = obj["metadata"].as_object_mut() {
            m.remove("namespace");
        }
        obj["metadata"]["uid"] = json!(uuid());
        obj["metadata"]["creationTimestamp"] = json!(now_rfc3339());
        if let Some(m) = obj["metadata"].as_object_mut() {
            m.remove("managedFields");
            m.remove("deletionTimestamp");
            m.remove("generation");
        }
        if ty.tracks_generation {
            obj["metadata"]["generation"] = json!(1);
        }
        if ty.status_subresource
            && ty.kind != "Namespace"
            && let Some(o) = obj.as_object_mut()
        {
            o.remove("status");
        }
        Self::defaults(ty, obj);
    }

    /// Side effects of a stored write (CRD registration is done by the
    /// controller once the CRD is established).
    fn after_write(&mut self, _ty: &ResourceType, _obj: &Value) {}

    /// Finishes an update of an existing object: status rules, generation,
    /// no-op detection, storage.
    fn finish_update(
        &mut self,
        ty: &ResourceType,
        key: Key,
        old: &Value,
        mut new: Value,
        opts: &WriteOpts,
    ) -> Result<Value, ApiError> {
        // Immutable identity.
        for f in [
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
        ] {
            match old["metadata"].get(f) {
                Some(v) => new["metadata"][f] = v.clone(),
                None => {
                    if let Some(m) = new["metadata"].as_object_mut() {
                        m.remove(f);
                    }
                }
            }
        }
        new["apiVersion"] = json!(ty.api_version());
        new["kind"] = json!(ty.kind);
        new["metadata"]["name"] = old["metadata"]["name"].clone();
        if ty.namespaced {
            new["metadata"]["namespace"] = old["metadata"]["namespace"].clone();
        }
        let status_write = opts.subresource.as_deref() == Some("status");
        if status_write {
            // Only status changes through /status.
            let status = new.get("status").cloned();
            let mut kept = old.clone();
            match status {
                Some(s) => kept["status"] = s,
                None => {
                    kept.as_object_mut().map(|o| o.remove("status"));
                }
            }
            kept["metadata"]["managedFields"] = new["metadata"]["managedFields"].clone();
            new = kept;
        } else if ty.status_subresource {
            match old.get("status") {
                Some(s) => new["status"] = s.clone(),
                None => {
                    new.as_object_mut().map(|o| o.remove("status"));
                }
            }
        }
        if old["metadata"]["deletionTimestamp"].is_string() {
            let old_f: Vec<Value> = old["metadata"]["finalizers"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let new_f: Vec<Value> = new["metadata"]["finalizers"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            if new_f.iter().any(|f| !old_f.contains(f)) {
                return Err(ApiError::invalid(
                    &ty.qualified_kind(),
                    key.name.as_str(),
                    "metadata.finalizers",
                    "FieldValueForbidden",
                    "Forbidden: no new finalizers can be added if the object is being deleted",
                ));
            }
        }
        if ty.kind == "CustomResourceDefinition" && old["spec"]["group"] != new["spec"]["group"] {
            return Err(ApiError::invalid(
                &ty.qualified_kind(),
                &key.name,
                "spec.group",
                "FieldValueInvalid",
                "Invalid value: field is immutable",
            ));
        }
        Self::defaults(ty, &mut new);
        let generation = old["metadata"]["generation"].as_i64().unwrap_or(0);
        if ty.tracks_generation {
            let dep = ty.kind == "Deployment";
            let changed = !status_write && spec_part(old, dep) != spec_part(&new, dep);
            new["metadata"]["generation"] =
                json!(if changed { generation + 1 } else { generation });
        }
        // No-op: nothing but managedFields timestamps changed.
        let unchanged = content(old, true) == content(&new, true) && managed_sets_equal(old, &new);
        if unchanged {
            return Ok(self.at_version(old, ty));
        }
        if opts.dry_run {
            return Ok(new);
        }
        // Removing the last finalizer of a deleting object deletes it.
        if new["metadata"]["deletionTimestamp"].is_string()
            && new["metadata"]["finalizers"]
                .as_array()
                .is_none_or(Vec::is_empty)
        {
            self.objects.insert(key.clone(), new);
            let gone = self.purge(&key).unwrap_or_default();
            return Ok(self.at_version(&gone, ty));
        }
        let stored = self.store(key, new);
        Ok(self.at_version(&stored, ty))
    }

    /// Records a non-apply write by `manager`: changed fields move to it,
    /// removed fields leave everyone.
    fn track_update(ty: &ResourceType, old: &Value, new: &mut Value, opts: &WriteOpts) {
        let builtin = ty.crd.is_none();
        let drop_status = ty.status_subresource && opts.subresource.is_none();
        let old_set = fields::leaves(old, builtin, drop_status);
        let new_set = fields::leaves(new, builtin, drop_status);
        let changed: FieldSet = new_set
            .iter()
            .filter(|p| fields::get(old, p) != fields::get(new, p) || !old_set.contains(*p))
            .cloned()
            .collect();
        let removed: FieldSet = old_set.difference(&new_set).cloned().collect();
        // A body with `managedFields: [{}]` clears them.
        let clear = new["metadata"]["managedFields"]
            .as_array()
            .is_some_and(|a| a.len() == 1 && a[0].as_object().is_some_and(Map::is_empty));
        let mut entries = if clear { vec![] } else { read_managed(old) };
        let sub = opts.subresource.clone().unwrap_or_default();
        for e in &mut entries {
            e.set
                .retain(|p| !changed.contains(p) && !removed.contains(p));
        }
        if !changed.is_empty() {
            let av = ty.api_version();
            match entries.iter_mut().find(|e| {
                e.manager == opts.manager
                    && e.operation == "Update"
                    && e.api_version == av
                    && e.subresource == sub
            }) {
                Some(e) => {
                    e.set.extend(changed);
                    e.time = now_rfc3339();
                }
                None => entries.push(Managed {
                    manager: opts.manager.clone(),
                    operation: "Update".into(),
                    api_version: av,
                    time: now_rfc3339(),
                    subresource: sub,
                    set: changed,
                }),
            }
        }
        write_managed(new, entries);
    }

    /// PUT (main endpoint or /status).
    pub(crate) fn replace(
        &mut self,
        ty: &ResourceType,
        ns: &str,
        name: &str,
        body: Value,
        opts: &WriteOpts,
    ) -> Result<Value, ApiError> {
        self.check_body(ty, ns, &body, Some(name))?;
        let key = Self::key(ty, ns, name);
        let old = self
            .objects
            .get(&key)
            .cloned()
            .ok_or_else(|| ApiError::not_found(&ty.plural, &ty.group, name))?;
        // An empty resourceVersion on PUT means an unconditional update.
        let wanted = body["metadata"]["resourceVersion"]
            .as_str()
            .filter(|rv| !rv.is_empty());
        check_resource_version(ty, name, wanted, &old)?;
        let mut new = body;
        new["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"].clone();
        Self::track_update(ty, &old, &mut new, opts);
        self.finish_update(ty, key, &old, new, opts)
    }

    /// PATCH with a merge, strategic-merge or JSON patch.
    pub(crate) fn patch(
        &mut self,
        ty: &ResourceType,
        ns: &str,
        name: &str,
        content_type: &str,
        body: &Value,
        opts: &WriteOpts,
    ) -> Result<Value, ApiError> {
        if opts.force {
            return Err(ApiError::invalid(
                "PatchOptions.meta.k8s.io",
                "",
                "force",
                "FieldValueForbidden",
                "Forbidden: may not be specified for non-apply patch",
            ));
        }
        let key = Self::key(ty, ns, name);
        let old = self
            .objects
            .get(&key)
            .cloned()
            .ok_or_else(|| ApiError::not_found(&ty.plural, &ty.group, name))?;
        let mut new = old.clone();
        match content_type {
            "application/merge-patch+json" => merge_patch(&mut new, body),
            "application/strategic-merge-patch+json" => {
                if ty.crd.is_some() {
                    return Err(ApiError::new(
                        415,
                        "UnsupportedMediaType",
                        "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml".to_string(),
                    ));
                }
                strategic_patch(&mut new, body, &mut vec![], "");
            }
            "application/json-patch+json" => json_patch(&mut new, body)?,
            other => {
                return Err(ApiError::new(
                    415,
                    "UnsupportedMediaType",
                    format!(
                        "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml, application/strategic-merge-patch+json (got {other})"
                    ),
                ));
            }
        }
        check_resource_version(ty, name, body["metadata"]["resourceVersion"].as_str(), &old)?;
        Self::track_update(ty, &old, &mut new, opts);
        self.finish_update(ty, key, &old, new, opts)
    }

    /// Server-side apply. Returns the object and whether it was created.
    pub(crate) fn apply(
        &mut self,
        ty: &ResourceType,
        ns: &str,
        name: &str,
        config: Value,
        opts: &WriteOpts,
    ) -> Result<(Value, bool), ApiError> {
        if opts.manager.is_empty() {
            return Err(ApiError::new(422, "Invalid", "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch").with_details(json!({
                "group": "meta.k8s.io", "kind": "PatchOptions",
                "causes": [{"reason": "FieldValueRequired", "message": "Required value: is required for apply patch", "field": "fieldManager"}]
            })));
        }
        if opts.manager.len() > 128 {
            return Err(ApiError::invalid(
                "PatchOptions.meta.k8s.io",
                "",
                "fieldManager",
                "FieldValueTooLong",
                "Too long: may not be more than 128 bytes",
            ));
        }
        let av = config["apiVersion"].as_str().unwrap_or_default();
        let kind = config["kind"].as_str().unwrap_or_default();
        if av != ty.api_version() || kind != ty.kind {
            let (g, v) = av.rsplit_once('/').unwrap_or(("", av));
            return Err(ApiError::bad_request(format!(
                "invalid object type: {g}/{v}, Kind={kind}"
            )));
        }
        if config["metadata"].get("managedFields").is_some() {
            return Err(ApiError::bad_request("metadata.managedFields must be nil"));
        }
        self.check_body(ty, ns, &config, Some(name))?;
        let builtin = ty.crd.is_none();
        let on_status = opts.subresource.as_deref() == Some("status");
        let drop_status = ty.status_subresource && !on_status;
        let new_set = fields::leaves(&config, builtin, drop_status);
        let sub = opts.subresource.clone().unwrap_or_default();
        let key = Self::key(ty, ns, name);
        let Some(live) = self.objects.get(&key).cloned() else {
            // Create on apply.
            if on_status {
                return Err(ApiError::not_found(&ty.plural, &ty.group, name));
            }
            if config["metadata"]["uid"].is_string() {
                return Err(ApiError::new(
                    409,
                    "Conflict",
                    format!(
                        "uid mismatch: the provided object specified uid {}, and no existing object was found",
                        config["metadata"]["uid"].as_str().unwrap_or_default()
                    ),
                ));
            }
            self.validate_name(ty, name)?;
            self.check_namespace(ty, ns, name)?;
            let mut obj = config;
            obj["metadata"]["name"] = json!(name);
            self.init_object(ty, ns, &mut obj);
            write_managed(
                &mut obj,
                vec![Managed {
                    manager: opts.manager.clone(),
                    operation: "Apply".into(),
                    api_version: ty.api_version(),
                    time: now_rfc3339(),
                    subresource: sub,
                    set: new_set,
                }],
            );
            if opts.dry_run {
                return Ok((obj, true));
            }
            let stored = self.store(key, obj);
            return Ok((self.at_version(&stored, ty), true));
        };
        check_resource_version(
            ty,
            name,
            config["metadata"]["resourceVersion"].as_str(),
            &live,
        )?;
        let mut entries = read_managed(&live);
        // Conflicts: fields another manager owns that this apply would set
        // to a different value.
        let mut conflicts: BTreeMap<String, Vec<Path>> = BTreeMap::new();
        for e in &entries {
            if e.manager == opts.manager && e.operation == "Apply" && e.subresource == sub {
                continue;
            }
            for p in e.set.intersection(&new_set) {
                if matches!(p.last(), Some(fields::Pe::Key(_))) {
                    continue;
                }
                if fields::get(&live, p) != fields::get(&config, p) {
                    let label = match (e.operation.as_str(), e.subresource.as_str()) {
                        ("Apply", "") => format!("\"{}\"", e.manager),
                        ("Apply", s) => format!("\"{}\" with subresource \"{s}\"", e.manager),
                        (_, "") => format!("\"{}\" using {}", e.manager, e.api_version),
                        (_, s) => format!(
                            "\"{}\" using {} with subresource \"{s}\"",
                            e.manager, e.api_version
                        ),
                    };
                    conflicts.entry(label).or_default().push(p.clone());
                }
            }
        }
        if !conflicts.is_empty() && !opts.force {
            return Err(conflict_error(&conflicts));
        }
        if opts.force {
            let taken: FieldSet = conflicts.values().flatten().cloned().collect();
            for e in &mut entries {
                if !(e.manager == opts.manager && e.operation == "Apply" && e.subresource == sub) {
                    e.set.retain(|p| !taken.contains(p));
                }
            }
        }
        let mut merged = live.clone();
        let mut cfg = config.clone();
        if let Some(m) = cfg["metadata"].as_object_mut() {
            for k in ["resourceVersion", "uid", "creationTimestamp", "generation"] {
                m.remove(k);
            }
        }
        if drop_status {
            cfg.as_object_mut().map(|o| o.remove("status"));
        }
        fields::merge(&mut merged, &cfg, &mut vec![], "", builtin);
        // Removal of fields this manager applied before and left out now.
        let previous: FieldSet = entries
            .iter()
            .find(|e| e.manager == opts.manager && e.operation == "Apply" && e.subresource == sub)
            .map(|e| e.set.clone())
            .unwrap_or_default();
        let others: FieldSet = entries
            .iter()
            .filter(|e| {
                !(e.manager == opts.manager && e.operation == "Apply" && e.subresource == sub)
            })
            .flat_map(|e| e.set.iter().cloned())
            .collect();
        let mut dropped: Vec<&Path> = previous
            .iter()
            .filter(|p| !new_set.contains(*p) && !others.contains(*p))
            .collect();
        // Deepest first, so items go before their parents are checked.
        dropped.sort_by_key(|p| std::cmp::Reverse(p.len()));
        for p in dropped {
            // A list item still holding fields someone else owns stays.
            let held = others.iter().any(|o| o.len() > p.len() && o.starts_with(p));
            if !held {
                fields::remove(&mut merged, p);
                fields::prune_empty(&mut merged, p);
            }
        }
        entries.retain(|e| {
            !(e.manager == opts.manager && e.operation == "Apply" && e.subresource == sub)
        });
        let unchanged_set = previous == new_set;
        let time = if unchanged_set {
            read_managed(&live)
                .into_iter()
                .find(|e| {
                    e.manager == opts.manager && e.operation == "Apply" && e.subresource == sub
                })
                .map(|e| e.time)
                .unwrap_or_else(now_rfc3339)
        } else {
            now_rfc3339()
        };
        entries.push(Managed {
            manager: opts.manager.clone(),
            operation: "Apply".into(),
            api_version: ty.api_version(),
            time,
            subresource: sub,
            set: new_set,
        });
        write_managed(&mut merged, entries);
        let out = self.finish_update(ty, key, &live, merged, opts)?;
        Ok((out, false))
    }

    /// DELETE: finalizers, propagation policy, preconditions.
    pub(crate) fn delete(
        &mut self,
        ty: &ResourceType,
        ns: &str,
        name: &str,
        options: &Value,
        dry_run: bool,
    ) -> Result<Value, ApiError> {
        let key = Self::key(ty, ns, name);
        let obj = self
            .objects
            .get(&key)
            .cloned()
            .ok_or_else(|| ApiError::not_found(&ty.plural, &ty.group, name))?;
        if ty.kind == "Namespace" && ["default", "kube-system", "kube-public"].contains(&name) {
            return Err(ApiError::new(
                403,
                "Forbidden",
                format!("namespaces \"{name}\" is forbidden: this namespace may not be deleted"),
            )
            .with_details(json!({"name": name, "kind": "namespaces"})));
        }
        let pre = &options["preconditions"];
        if let Some(uid) = pre["uid"].as_str()
            && Some(uid) != obj["metadata"]["uid"].as_str()
        {
            return Err(ApiError::conflict(
                &ty.kind,
                "",
                name,
                &format!(
                    "the UID in the precondition ({uid}) does not match the UID in record ({}). The object might have been deleted and then recreated",
                    obj["metadata"]["uid"].as_str().unwrap_or_default()
                ),
            ));
        }
        if let Some(rv) = pre["resourceVersion"].as_str()
            && Some(rv) != obj["metadata"]["resourceVersion"].as_str()
        {
            return Err(ApiError::conflict(
                &ty.kind,
                "",
                name,
                &format!(
                    "the ResourceVersion in the precondition ({rv}) does not match the ResourceVersion in record ({}). The object might have been modified",
                    obj["metadata"]["resourceVersion"]
                        .as_str()
                        .unwrap_or_default()
                ),
            ));
        }
        if dry_run {
            return Ok(self.at_version(&obj, ty));
        }
        if obj["metadata"]["deletionTimestamp"].is_string() {
            if ty.kind == "Namespace" {
                return Err(ApiError::new(
                    409,
                    "Conflict",
                    "The system is ensuring all content is removed from this namespace.  Upon completion, this namespace will automatically be purged by the system.",
                ));
            }
            return Ok(self.at_version(&obj, ty));
        }
        let mut finalizers: Vec<String> = obj["metadata"]["finalizers"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|f| f.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        match options["propagationPolicy"].as_str() {
            Some("Foreground") => finalizers.push(FOREGROUND.into()),
            Some("Orphan") => finalizers.push(ORPHAN.into()),
            _ => {}
        }
        if options["orphanDependents"].as_bool() == Some(true)
            && !finalizers.iter().any(|f| f == ORPHAN)
        {
            finalizers.push(ORPHAN.into());
        }
        if ty.kind == "CustomResourceDefinition" {
            finalizers.push(CRD_CLEANUP.into());
        }
        let namespace_kind = ty.kind == "Namespace";
        if finalizers.is_empty() && !namespace_kind {
            let gone = self.purge(&key).unwrap_or_default();
            if ["Namespace", "Service", "Pod", "ServiceAccount"].contains(&ty.kind.as_str()) {
                return Ok(self.at_version(&gone, ty));
            }
            let mut details =
                json!({"name": name, "kind": ty.plural, "uid": gone["metadata"]["uid"]});
            if !ty.group.is_empty() {
                details["group"] = json!(ty.group);
            }
            return Ok(
                json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "details": details}),
            );
        }
        let mut marked = obj.clone();
        finalizers.dedup();
        if !finalizers.is_empty() {
            marked["metadata"]["finalizers"] = json!(finalizers);
        }
        marked["metadata"]["deletionTimestamp"] = json!(now_rfc3339());
        marked["metadata"]["deletionGracePeriodSeconds"] = json!(0);
        if ty.tracks_generation {
            marked["metadata"]["generation"] =
                json!(obj["metadata"]["generation"].as_i64().unwrap_or(0) + 1);
        }
        if namespace_kind {
            marked["status"]["phase"] = json!("Terminating");
        }
        if ty.kind == "CustomResourceDefinition" {
            set_condition(
                &mut marked,
                "Terminating",
                "True",
                "InstanceDeletionInProgress",
                "CustomResource deletion is in progress",
            );
        }
        let stored = self.store(key, marked);
        Ok(self.at_version(&stored, ty))
    }

    /// Objects of a type (optionally one namespace), in namespace/name order.
    pub(crate) fn list(&self, ty: &ResourceType, ns: Option<&str>) -> Vec<Value> {
        self.objects
            .iter()
            .filter(|(k, _)| {
                k.group == ty.group && k.plural == ty.plural && ns.is_none_or(|n| k.namespace == n)
            })
            .map(|(_, v)| self.at_version(v, ty))
            .collect()
    }
}

/// The optimistic-concurrency precondition: a write naming a
/// resourceVersion succeeds only against that version (409 otherwise).
fn check_resource_version(
    ty: &ResourceType,
    name: &str,
    wanted: Option<&str>,
    live: &Value,
) -> Result<(), ApiError> {
    match wanted {
        Some(rv)
            if rv
                != live["metadata"]["resourceVersion"]
                    .as_str()
                    .unwrap_or_default() =>
        {
            Err(ApiError::conflict(
                &ty.qualified(),
                "",
                name,
                "the object has been modified; please apply your changes to the latest version and try again",
            ))
        }
        _ => Ok(()),
    }
}

fn managed_sets_equal(a: &Value, b: &Value) -> bool {
    let strip = |v: &Value| -> Vec<(String, String, String, FieldSet)> {
        read_managed(v)
            .into_iter()
            .map(|e| (e.manager, e.operation, e.subresource, e.set))
            .collect()
    };
    strip(a) == strip(b)
}

pub(crate) fn set_condition(obj: &mut Value, ty: &str, status: &str, reason: &str, message: &str) {
    let now = now_rfc3339();
    let conds = obj["status"]["conditions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let mut out: Vec<Value> = Vec::new();
    let mut found = false;
    for c in conds {
        if c["type"] == ty {
            found = true;
            let transition = if c["status"] == status {
                c["lastTransitionTime"].clone()
            } else {
                json!(now)
            };
            out.push(json!({"type": ty, "status": status, "reason": reason, "message": message, "lastTransitionTime": transition}));
        } else {
            out.push(c);
        }
    }
    if !found {
        out.push(json!({"type": ty, "status": status, "reason": reason, "message": message, "lastTransitionTime": now}));
    }
    obj["status"]["conditions"] = Value::Array(out);
}

fn conflict_error(conflicts: &BTreeMap<String, Vec<Path>>) -> ApiError {
    let total: usize = conflicts.values().map(Vec::len).sum();
    let mut causes = Vec::new();
    let message = if total == 1 {
        let (m, paths) = conflicts.iter().next().expect("one conflict");
        let p = fields::display(&paths[0]);
        causes.push(json!({"reason": "FieldManagerConflict", "message": format!("conflict with {m}"), "field": p}));
        format!("Apply failed with 1 conflict: conflict with {m}: {p}")
    } else {
        let mut parts = Vec::new();
        for (m, paths) in conflicts {
            let mut lines = vec![format!("conflicts with {m}:")];
            for p in paths {
                let d = fields::display(p);
                lines.push(format!("- {d}"));
                causes.push(json!({"reason": "FieldManagerConflict", "message": format!("conflict with {m}"), "field": d}));
            }
            parts.push(lines.join("\n"));
        }
        format!("Apply failed with {total} conflicts: {}", parts.join("\n"))
    };
    ApiError::new(409, "Conflict", message).with_details(json!({"causes": causes}))
}

/// RFC 7386.
pub(crate) fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let t = target.as_object_mut().expect("object");
    for (k, v) in p {
        if v.is_null() {
            t.remove(k);
        } else {
            merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

/// Strategic merge patch for the basic cases: maps merge, `null` deletes,
/// list-maps merge by key, other lists are replaced.
fn strategic_patch(target: &mut Value, patch: &Value, names: &mut Vec<String>, field: &str) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            names.push(field.to_owned());
            for (k, v) in p {
                if k.starts_with("$") {
                    continue;
                }
                if v.is_null() {
                    t.remove(k);
                } else if let Some(tv) = t.get_mut(k) {
                    strategic_patch(tv, v, names, k);
                } else {
                    t.insert(k.clone(), v.clone());
                }
            }
            names.pop();
        }
        (t @ Value::Array(_), Value::Array(_)) => fields::merge(t, patch, names, field, true),
        (t, p) => *t = p.clone(),
    }
}

fn pointer_parts(p: &str) -> Result<Vec<String>, ApiError> {
    if p.is_empty() {
        return Ok(vec![]);
    }
    let rest = p
        .strip_prefix('/')
        .ok_or_else(|| ApiError::bad_request(format!("invalid JSON pointer {p:?}")))?;
    Ok(rest
        .split('/')
        .map(|s| s.replace("~1", "/").replace("~0", "~"))
        .collect())
}

fn pointer_insert(
    doc: &mut Value,
    path: &str,
    value: Value,
    replace: bool,
) -> Result<(), ApiError> {
    let parts = pointer_parts(path)?;
    let Some((last, parent)) = parts.split_last() else {
        *doc = value;
        return Ok(());
    };
    let mut cur = doc;
    for p in parent {
        cur = match cur {
            Value::Object(m) => m.get_mut(p),
            Value::Array(a) => p.parse::<usize>().ok().and_then(|i| a.get_mut(i)),
            _ => None,
        }
        .ok_or_else(|| ApiError::new(422, "Invalid", format!("doc is missing path: {path}")))?;
    }
    match cur {
        Value::Object(m) => {
            if replace && !m.contains_key(last) {
                return Err(ApiError::new(
                    422,
                    "Invalid",
                    format!("doc is missing key: {path}"),
                ));
            }
            m.insert(last.clone(), value);
        }
        Value::Array(a) => {
            if last == "-" {
                a.push(value);
            } else {
                let i: usize = last.parse().map_err(|_| {
                    ApiError::new(422, "Invalid", format!("invalid index in {path}"))
                })?;
                if replace {
                    *a.get_mut(i).ok_or_else(|| {
                        ApiError::new(422, "Invalid", format!("doc is missing path: {path}"))
                    })? = value;
                } else if i <= a.len() {
                    a.insert(i, value);
                } else {
                    return Err(ApiError::new(
                        422,
                        "Invalid",
                        format!("index out of range in {path}"),
                    ));
                }
            }
        }
        _ => {
            return Err(ApiError::new(
                422,
                "Invalid",
                format!("doc is missing path: {path}"),
            ));
        }
    }
    Ok(())
}

fn pointer_remove(doc: &mut Value, path: &str) -> Result<Value, ApiError> {
    let parts = pointer_parts(path)?;
    let Some((last, parent)) = parts.split_last() else {
        return Err(ApiError::new(
            422,
            "Invalid",
            "cannot remove the whole document",
        ));
    };
    let mut cur = doc;
    for p in parent {
        cur = match cur {
            Value::Object(m) => m.get_mut(p),
            Value::Array(a) => p.parse::<usize>().ok().and_then(|i| a.get_mut(i)),
            _ => None,
        }
        .ok_or_else(|| ApiError::new(422, "Invalid", format!("doc is missing path: {path}")))?;
    }
    let missing = || ApiError::new(422, "Invalid", format!("doc is missing path: {path}"));
    match cur {
        Value::Object(m) => m.remove(last).ok_or_else(missing),
        Value::Array(a) => {
            let i: usize = last.parse().map_err(|_| missing())?;
            if i < a.len() {
                Ok(a.remove(i))
            } else {
                Err(missing())
            }
        }
        _ => Err(missing()),
    }
}

/// RFC 6902.
fn json_patch(doc: &mut Value, ops: &Value) -> Result<(), ApiError> {
    let ops = ops
        .as_array()
        .ok_or_else(|| ApiError::bad_request("a JSON patch must be a list of operations"))?;
    for op in ops {
        let path = op["path"].as_str().unwrap_or_default();
        match op["op"].as_str().unwrap_or_default() {
            "add" => pointer_insert(doc, path, op["value"].clone(), false)?,
            "replace" => pointer_insert(doc, path, op["value"].clone(), true)?,
            "remove" => {
                pointer_remove(doc, path)?;
            }
            "test" => {
                if doc.pointer(path) != Some(&op["value"]) {
                    return Err(ApiError::new(
                        422,
                        "Invalid",
                        format!("testing value {path} failed"),
                    ));
                }
            }
            "move" => {
                let v = pointer_remove(doc, op["from"].as_str().unwrap_or_default())?;
                pointer_insert(doc, path, v, false)?;
            }
            "copy" => {
                let v = doc
                    .pointer(op["from"].as_str().unwrap_or_default())
                    .cloned()
                    .ok_or_else(|| ApiError::new(422, "Invalid", "copy source missing"))?;
                pointer_insert(doc, path, v, false)?;
            }
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown JSON patch operation {other:?}"
                )));
            }
        }
    }
    Ok(())
}
