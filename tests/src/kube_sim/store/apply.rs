//! Server-side apply: field ownership per manager, conflicts (409 with the
//! API server's message and causes), force, and what leaves an applied
//! configuration.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::managed::{Managed, read_managed, write_managed};
use super::update::check_resource_version;
use super::{State, WriteOpts, now_rfc3339};
use crate::kube_sim::errors::ApiError;
use crate::kube_sim::fields::{self, FieldSet, Path};
use crate::kube_sim::registry::ResourceType;

impl State {
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
            Self::validate_size(ty, name, &config)?;
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
}

pub(super) fn conflict_error(conflicts: &BTreeMap<String, Vec<Path>>) -> ApiError {
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
