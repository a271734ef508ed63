//! managedFields entries: reading and writing them on objects, and
//! comparing the field sets of two versions.

use serde_json::{Value, json};

use crate::kube_sim::fields::{self, FieldSet};

/// A managedFields entry.
#[derive(Clone, Debug)]
pub(super) struct Managed {
    pub(super) manager: String,
    pub(super) operation: String,
    pub(super) api_version: String,
    pub(super) time: String,
    pub(super) subresource: String,
    pub(super) set: FieldSet,
}

pub(super) fn read_managed(obj: &Value) -> Vec<Managed> {
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

pub(super) fn write_managed(obj: &mut Value, mut entries: Vec<Managed>) {
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

pub(super) fn managed_sets_equal(a: &Value, b: &Value) -> bool {
    let strip = |v: &Value| -> Vec<(String, String, String, FieldSet)> {
        read_managed(v)
            .into_iter()
            .map(|e| (e.manager, e.operation, e.subresource, e.set))
            .collect()
    };
    strip(a) == strip(b)
}
