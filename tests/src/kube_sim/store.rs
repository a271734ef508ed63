//! The in-memory object store with the API server's write semantics:
//! metadata (uid, cluster-wide resourceVersion, generation), optimistic
//! concurrency, server-side apply with managedFields, patches, finalizers
//! and deletion, and the event history that watches replay.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use serde_json::{Value, json};
use tokio::sync::broadcast;

use super::errors::ApiError;
use super::registry::{self, ResourceType};

mod apply;
mod create;
mod delete;
mod managed;
mod patch;
mod update;

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
