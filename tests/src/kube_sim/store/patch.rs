//! Patch formats: JSON merge patch (RFC 7386) and JSON patch (RFC 6902)
//! from the `json-patch` crate, and strategic merge patch (maps merge,
//! `null` deletes, list-maps merge by key, other lists are replaced).

use serde_json::Value;

use crate::kube_sim::errors::ApiError;
use crate::kube_sim::fields;

/// RFC 7386.
pub(super) fn merge_patch(target: &mut Value, patch: &Value) {
    json_patch::merge(target, patch);
}

/// Strategic merge patch for the basic cases: maps merge, `null` deletes,
/// list-maps merge by key, other lists are replaced.
pub(super) fn strategic_patch(
    target: &mut Value,
    patch: &Value,
    names: &mut Vec<String>,
    field: &str,
) {
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

/// RFC 6902: a list of operations, applied all or none (a failed
/// operation or `test` is 422, as the API server answers).
pub(super) fn json_patch(doc: &mut Value, ops: &Value) -> Result<(), ApiError> {
    let ops: json_patch::Patch = serde_json::from_value(ops.clone())
        .map_err(|e| ApiError::bad_request(format!("invalid JSON patch: {e}")))?;
    json_patch::patch(doc, &ops).map_err(|e| ApiError::new(422, "Invalid", e.to_string()))
}
