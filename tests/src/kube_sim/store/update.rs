//! Updating existing objects (PUT and PATCH): optimistic concurrency,
//! status-subresource rules, generation, no-op detection, and the
//! managedFields bookkeeping of non-apply writes.

use serde_json::{Map, Value, json};

use super::managed::{Managed, managed_sets_equal, read_managed, write_managed};
use super::patch::{json_patch, merge_patch, strategic_patch};
use super::*;
use crate::kube_sim::errors::ApiError;
use crate::kube_sim::fields::{self, FieldSet};
use crate::kube_sim::registry::ResourceType;

/// The object without server-maintained metadata, for no-op and
/// generation comparisons.
pub(super) fn content(obj: &Value, keep_meta: bool) -> Value {
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

pub(super) fn spec_part(obj: &Value, deployment: bool) -> Value {
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

/// The optimistic-concurrency precondition: a write naming a
/// resourceVersion succeeds only against that version (409 otherwise).
pub(super) fn check_resource_version(
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

impl State {
    /// Side effects of a stored write (CRD registration is done by the
    /// controller once the CRD is established).
    pub(super) fn after_write(&mut self, _ty: &ResourceType, _obj: &Value) {}

    /// Finishes an update of an existing object: status rules, generation,
    /// no-op detection, storage.
    pub(super) fn finish_update(
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
        Self::validate_size(ty, &key.name, &new)?;
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
    pub(super) fn track_update(ty: &ResourceType, old: &Value, new: &mut Value, opts: &WriteOpts) {
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
}
