//! Per-unit inventory: what the agent applied (GVK, namespace, name, uid),
//! kept in a ConfigMap in the agent's namespace so it survives restarts.
//! Prune works only from it: nothing outside an inventory is ever deleted.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, Patch, PatchParams};
use serde::{Deserialize, Serialize};

use crate::manifest::{LABEL_MANAGED_BY, LABEL_UNIT};

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

pub struct InventoryStore {
    api: Api<ConfigMap>,
}

fn cm_name(unit: &str) -> String {
    format!("unitsync-inventory-{unit}")
}

impl InventoryStore {
    pub fn new(client: kube::Client, namespace: &str) -> InventoryStore {
        InventoryStore {
            api: Api::namespaced(client, namespace),
        }
    }

    pub async fn load(&self, unit: &str) -> Result<Option<Inventory>, kube::Error> {
        let Some(cm) = self.api.get_opt(&cm_name(unit)).await? else {
            return Ok(None);
        };
        let data = cm.data.unwrap_or_default();
        let inv = data
            .get("inventory")
            .and_then(|s| serde_json::from_str(s).ok());
        Ok(inv)
    }

    pub async fn save(&self, unit: &str, inv: &Inventory) -> Result<(), kube::Error> {
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
                "labels": {LABEL_MANAGED_BY: "unitsync", LABEL_UNIT: unit},
            },
            "data": data,
        });
        self.api
            .patch(
                &cm_name(unit),
                &PatchParams::apply(crate::apply::FIELD_MANAGER).force(),
                &Patch::Apply(cm),
            )
            .await?;
        Ok(())
    }

    pub async fn delete(&self, unit: &str) -> Result<(), kube::Error> {
        match self.api.delete(&cm_name(unit), &Default::default()).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
            Err(e) => Err(e),
        }
    }
}
