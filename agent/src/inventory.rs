//! Per-unit inventory: what the agent applied (GVK, namespace, name, uid),
//! kept in a ConfigMap in the agent's namespace so it survives restarts.
//! Prune works only from it: nothing outside an inventory is ever deleted.
//!
//! The inventory is written ahead of an apply (the union of what was there
//! and what is about to be applied; entries not applied yet have no uid)
//! and shrunk after prune, so an interrupted apply leaves no object outside
//! every inventory. A missing agent namespace is re-created on save; an
//! unreadable inventory is an error, never an empty one. Each inventory is
//! labelled with its unit's environment, and one of another environment
//! (another agent's, in a namespace two agents were given) is refused,
//! never applied over, pruned from or destroyed.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, Patch, PatchParams};
use serde::{Deserialize, Serialize};

use crate::manifest::{LABEL_ENVIRONMENT, LABEL_MANAGED_BY, LABEL_UNIT};

/// One applied object.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Entry {
    pub group: String,
    pub version: String,
    pub kind: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace: String,
    pub name: String,
    #[serde(default)]
    pub uid: String,
}

impl Entry {
    /// The entry of an object of a unit (uid unknown yet).
    pub fn of(obj: &crate::manifest::Object) -> Entry {
        Entry {
            group: obj.group().into(),
            version: obj.version().into(),
            kind: obj.kind.clone(),
            namespace: obj.namespace.clone().unwrap_or_default(),
            name: obj.name.clone(),
            uid: String::new(),
        }
    }

    /// Whether `applied` (an entry with its uid, as applied) is the object
    /// this entry names: same key, or a cluster-scoped object whose
    /// document named a namespace anyway.
    pub fn names(&self, applied: &Entry) -> bool {
        self.group == applied.group
            && self.kind == applied.kind
            && self.name == applied.name
            && (self.namespace == applied.namespace || applied.namespace.is_empty())
    }

    /// Identity without version and uid.
    pub fn key(&self) -> (String, String, String, String) {
        (
            self.group.clone(),
            self.kind.clone(),
            self.namespace.clone(),
            self.name.clone(),
        )
    }

    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    pub fn id(&self) -> String {
        if self.namespace.is_empty() {
            format!("{} {}", self.kind, self.name)
        } else {
            format!("{} {}/{}", self.kind, self.namespace, self.name)
        }
    }
}

/// The inventory record of one unit.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Inventory {
    pub revision: u64,
    pub entries: Vec<Entry>,
}

impl Inventory {
    /// Adds `e` unless an entry names the same object (an entry with a uid
    /// wins over one without).
    pub fn merge(&mut self, e: Entry) {
        match self.entries.iter_mut().find(|x| x.key() == e.key()) {
            Some(x) if x.uid.is_empty() => *x = e,
            Some(_) => {}
            None => self.entries.push(e),
        }
    }
}

/// Why an inventory could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    #[error("Kubernetes API unreachable: {0}")]
    Unreachable(#[source] kube::Error),
    /// The ConfigMap exists but does not hold an inventory: nothing of the
    /// unit may be pruned until it is repaired or deleted (then membership
    /// is recovered from the objects' labels).
    #[error(
        "the inventory ConfigMap {namespace}/{name} is corrupt ({problem}); nothing of the unit is applied or pruned until it is repaired, or deleted (the agent then recovers membership from the objects' labels)"
    )]
    Corrupt {
        namespace: String,
        name: String,
        problem: String,
    },
    /// The ConfigMap records a unit of another environment: another agent's
    /// (two agents given one namespace). It is left alone.
    #[error(
        "the inventory ConfigMap {namespace}/{name} records {theirs}/{unit}, not {ours}/{unit}: another agent keeps its inventories in {namespace} (give each agent a namespace of its own: agent install --namespace), or this cluster was in {theirs} before; nothing of it is applied over or pruned"
    )]
    OtherEnvironment {
        namespace: String,
        name: String,
        unit: String,
        ours: String,
        theirs: String,
    },
}

/// A unit whose inventory is in the cluster.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct FoundUnit {
    pub unit: String,
    /// Its environment (empty for inventories written before they were
    /// labelled with it).
    pub environment: String,
}

pub struct InventoryStore {
    api: Api<ConfigMap>,
    namespaces: Api<k8s_openapi::api::core::v1::Namespace>,
    namespace: String,
    /// When this process last wrote each unit's inventory, and its uid.
    written: std::sync::Mutex<std::collections::HashMap<String, Written>>,
    own: std::sync::Arc<crate::drift::OwnWrites>,
}

/// An inventory this process wrote.
struct Written {
    /// When (the unit's objects are written after it).
    at: tokio::time::Instant,
    /// The ConfigMap's uid, once the write succeeded: forgotten from the
    /// record of own writes when the inventory goes, even if someone else
    /// deleted it first.
    uid: Option<String>,
}

/// Inventory ConfigMaps are named this and the unit's name.
const CM_PREFIX: &str = "unitsync-inventory-";

fn cm_name(unit: &str) -> String {
    format!("{CM_PREFIX}{unit}")
}

impl InventoryStore {
    pub fn new(
        client: kube::Client,
        namespace: &str,
        own: std::sync::Arc<crate::drift::OwnWrites>,
    ) -> InventoryStore {
        InventoryStore {
            api: Api::namespaced(client.clone(), namespace),
            namespaces: Api::all(client),
            namespace: namespace.to_owned(),
            written: Default::default(),
            own,
        }
    }

    /// When this process last wrote the unit's inventory, if it did.
    pub fn last_written(&self, unit: &str) -> Option<tokio::time::Instant> {
        self.written().get(unit).map(|w| w.at)
    }

    fn written(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, Written>> {
        self.written
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The units with an inventory in the cluster.
    pub async fn units(&self) -> Result<Vec<FoundUnit>, InventoryError> {
        let lp = kube::api::ListParams::default().labels(&format!("{LABEL_MANAGED_BY}=unitsync"));
        let list = self
            .api
            .list(&lp)
            .await
            .map_err(InventoryError::Unreachable)?;
        Ok(list
            .items
            .into_iter()
            .filter(|cm| {
                cm.metadata
                    .name
                    .as_deref()
                    .is_some_and(|n| n.starts_with(CM_PREFIX))
            })
            .filter_map(|cm| {
                let labels = cm.metadata.labels?;
                Some(FoundUnit {
                    unit: labels.get(LABEL_UNIT)?.clone(),
                    environment: labels.get(LABEL_ENVIRONMENT).cloned().unwrap_or_default(),
                })
            })
            .collect())
    }

    /// The inventory of `unit` of `environment`; `None` when it has none (a
    /// new unit, or one whose inventory was lost).
    pub async fn load(
        &self,
        unit: &str,
        environment: &str,
    ) -> Result<Option<Inventory>, InventoryError> {
        let name = cm_name(unit);
        let Some(cm) = self
            .api
            .get_opt(&name)
            .await
            .map_err(InventoryError::Unreachable)?
        else {
            return Ok(None);
        };
        if let Some(theirs) = cm
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(LABEL_ENVIRONMENT))
            .filter(|theirs| theirs.as_str() != environment)
        {
            return Err(InventoryError::OtherEnvironment {
                namespace: self.namespace.clone(),
                name,
                unit: unit.to_owned(),
                ours: environment.to_owned(),
                theirs: theirs.clone(),
            });
        }
        let corrupt = |problem: String| InventoryError::Corrupt {
            namespace: self.namespace.clone(),
            name: name.clone(),
            problem,
        };
        let data = cm.data.unwrap_or_default();
        let text = data
            .get("inventory")
            .ok_or_else(|| corrupt("no inventory key".into()))?;
        serde_json::from_str(text)
            .map(Some)
            .map_err(|e| corrupt(e.to_string()))
    }

    /// Writes the unit's inventory, re-creating the agent namespace when it
    /// was deleted (a restored cluster, an accident).
    pub async fn save(
        &self,
        unit: &str,
        environment: &str,
        inv: &Inventory,
    ) -> Result<(), InventoryError> {
        match self.write(unit, environment, inv).await {
            Err(kube::Error::Api(s)) if s.code == 404 => {
                tracing::warn!(namespace = %self.namespace, "the agent namespace is gone; re-creating it");
                self.ensure_namespace().await?;
                self.write(unit, environment, inv)
                    .await
                    .map_err(InventoryError::Unreachable)
            }
            other => other.map_err(InventoryError::Unreachable),
        }
    }

    /// Creates the agent namespace if it is missing.
    pub async fn ensure_namespace(&self) -> Result<(), InventoryError> {
        let ns = serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": self.namespace}});
        match self
            .namespaces
            .patch(
                &self.namespace,
                &PatchParams::apply(crate::apply::FIELD_MANAGER),
                &Patch::Apply(ns),
            )
            .await
        {
            Ok(_) => Ok(()),
            // A namespaced install grants nothing on namespaces: the
            // install created it.
            Err(kube::Error::Api(s)) if s.code == 403 => {
                tracing::debug!(namespace = %self.namespace, "may not manage the agent namespace; leaving it to the install");
                Ok(())
            }
            Err(e) => Err(InventoryError::Unreachable(e)),
        }
    }

    async fn write(
        &self,
        unit: &str,
        environment: &str,
        inv: &Inventory,
    ) -> Result<(), kube::Error> {
        // The time before the write (its objects follow it); the uid once
        // it succeeded.
        let at = tokio::time::Instant::now();
        self.written()
            .entry(unit.to_owned())
            .and_modify(|w| w.at = at)
            .or_insert(Written { at, uid: None });
        let mut data = BTreeMap::new();
        data.insert(
            "inventory".to_owned(),
            serde_json::to_string(inv).unwrap_or_default(),
        );
        let cm = serde_json::json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": cm_name(unit),
                "labels": {LABEL_MANAGED_BY: "unitsync", LABEL_UNIT: unit, LABEL_ENVIRONMENT: environment},
            },
            "data": data,
        });
        let written = self
            .api
            .patch(
                &cm_name(unit),
                &PatchParams::apply(crate::apply::FIELD_MANAGER).force(),
                &Patch::Apply(cm),
            )
            .await?;
        // Its own write must not wake the unit's drift check.
        self.own.record(
            crate::drift::qualified_kind("", "ConfigMap"),
            &written.metadata,
        );
        let replaced = self
            .written()
            .get_mut(unit)
            .and_then(|w| std::mem::replace(&mut w.uid, written.metadata.uid.clone()));
        // Recreated (someone deleted it): the old object is gone for good.
        if let Some(old) = replaced.filter(|old| Some(old) != written.metadata.uid.as_ref()) {
            self.own.forget_uid(&old);
        }
        Ok(())
    }

    pub async fn delete(&self, unit: &str) -> Result<(), InventoryError> {
        let deleted = match self.api.delete(&cm_name(unit), &Default::default()).await {
            Ok(deleted) => deleted.either(|cm| cm.metadata.uid, |s| s.details.map(|d| d.uid)),
            Err(kube::Error::Api(s)) if s.code == 404 => None,
            Err(e) => return Err(InventoryError::Unreachable(e)),
        };
        let wrote = self.written().get_mut(unit).and_then(|w| w.uid.take());
        for uid in deleted.iter().chain(wrote.iter()) {
            self.own.forget_uid(uid);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(ns: &str, name: &str, uid: &str) -> Entry {
        Entry {
            group: String::new(),
            version: "v1".into(),
            kind: "ConfigMap".into(),
            namespace: ns.into(),
            name: name.into(),
            uid: uid.into(),
        }
    }

    #[test]
    fn merging_keeps_one_entry_per_object_and_prefers_known_uids() {
        let mut inv = Inventory::default();
        inv.merge(entry("a", "x", ""));
        inv.merge(entry("a", "x", "u1"));
        inv.merge(entry("a", "x", ""));
        inv.merge(entry("a", "y", ""));
        assert_eq!(
            inv.entries,
            vec![entry("a", "x", "u1"), entry("a", "y", "")]
        );
        assert!(entry("stray", "x", "").names(&entry("", "x", "u")));
        assert!(!entry("a", "x", "").names(&entry("b", "x", "u")));
    }
}
