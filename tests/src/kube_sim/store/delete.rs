//! Deleting objects: preconditions, finalizers, propagation policy
//! (foreground, background, orphan) and deletion timestamps.

use serde_json::{Value, json};

use super::*;
use crate::kube_sim::errors::ApiError;
use crate::kube_sim::registry::ResourceType;

impl State {
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
}
