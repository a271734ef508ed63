//! Field sets for server-side apply: which fields of an object a manager
//! owns, serialized as `fieldsV1` tries, and the merge/removal rules of
//! structured-merge-diff that the agent relies on.
//!
//! Lists are atomic unless the type declares them a list-map (built-in
//! keys such as `containers` by `name`) or a set (`finalizers`), as
//! <https://kubernetes.io/docs/reference/using-api/server-side-apply/#merge-strategy>
//! describes.

use std::collections::BTreeSet;

use serde_json::{Map, Value, json};

use super::registry::list_keys;

/// One step of a field path.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Pe {
    /// `f:<name>`
    Field(String),
    /// `k:<compact JSON of the key fields>`
    Key(String),
    /// `v:<JSON value>` (set member)
    Value(String),
}

pub(crate) type Path = Vec<Pe>;
pub(crate) type FieldSet = BTreeSet<Path>;

/// Fields never tracked in managedFields.
fn ignored_top(field: &str) -> bool {
    field == "apiVersion" || field == "kind"
}

fn ignored_meta(field: &str) -> bool {
    matches!(
        field,
        "name"
            | "namespace"
            | "uid"
            | "resourceVersion"
            | "generation"
            | "creationTimestamp"
            | "managedFields"
            | "deletionTimestamp"
            | "deletionGracePeriodSeconds"
            | "selfLink"
    )
}

fn key_of(item: &Value, keys: &[&str]) -> Option<String> {
    let mut m = Map::new();
    for k in keys {
        let v = match item.get(*k) {
            Some(v) => v.clone(),
            // Defaulted key fields (protocol) count with their default.
            None if *k == "protocol" => json!("TCP"),
            None => return None,
        };
        m.insert((*k).to_owned(), v);
    }
    Some(serde_json::to_string(&Value::Object(m)).unwrap_or_default())
}

/// The leaf set of an object (what an apply of it would own).
pub(crate) fn leaves(obj: &Value, builtin: bool, drop_status: bool) -> FieldSet {
    let mut out = FieldSet::new();
    let Some(map) = obj.as_object() else {
        return out;
    };
    for (k, v) in map {
        if ignored_top(k) || (drop_status && k == "status") {
            continue;
        }
        let mut path = vec![Pe::Field(k.clone())];
        if k == "metadata" {
            if let Some(meta) = v.as_object() {
                for (mk, mv) in meta {
                    if ignored_meta(mk) {
                        continue;
                    }
                    path.push(Pe::Field(mk.clone()));
                    walk(
                        mv,
                        &mut path,
                        &mut vec!["metadata".into()],
                        builtin,
                        &mut out,
                    );
                    path.pop();
                }
            }
            continue;
        }
        walk(v, &mut path, &mut vec![], builtin, &mut out);
    }
    out
}

fn walk(v: &Value, path: &mut Path, names: &mut Vec<String>, builtin: bool, out: &mut FieldSet) {
    let field = match path.last() {
        Some(Pe::Field(f)) => f.clone(),
        _ => String::new(),
    };
    match v {
        Value::Object(m) if !m.is_empty() => {
            names.push(field);
            for (k, child) in m {
                path.push(Pe::Field(k.clone()));
                walk(child, path, names, builtin, out);
                path.pop();
            }
            names.pop();
        }
        Value::Array(items) => match list_keys(builtin, names, &field) {
            Some(keys) if keys.is_empty() => {
                for item in items {
                    path.push(Pe::Value(serde_json::to_string(item).unwrap_or_default()));
                    out.insert(path.clone());
                    path.pop();
                }
            }
            Some(keys) => {
                names.push(field);
                for item in items {
                    let Some(k) = key_of(item, &keys) else {
                        continue;
                    };
                    path.push(Pe::Key(k));
                    out.insert(path.clone());
                    if let Some(m) = item.as_object() {
                        for (ik, iv) in m {
                            path.push(Pe::Field(ik.clone()));
                            walk(iv, path, names, builtin, out);
                            path.pop();
                        }
                    }
                    path.pop();
                }
                names.pop();
            }
            None => {
                out.insert(path.clone());
            }
        },
        _ => {
            out.insert(path.clone());
        }
    }
}

/// Serializes a field set as a `fieldsV1` trie.
pub(crate) fn to_fields_v1(set: &FieldSet) -> Value {
    let mut root = Map::new();
    for path in set {
        let mut node = &mut root;
        for (i, pe) in path.iter().enumerate() {
            let key = match pe {
                Pe::Field(f) => format!("f:{f}"),
                Pe::Key(k) => format!("k:{k}"),
                Pe::Value(v) => format!("v:{v}"),
            };
            let entry = node.entry(key).or_insert_with(|| json!({}));
            let last = i == path.len() - 1;
            let child = entry.as_object_mut().expect("trie nodes are objects");
            if last
                && set
                    .iter()
                    .any(|p| p.len() > path.len() && p.starts_with(path))
            {
                child.insert(".".into(), json!({}));
            }
            node = child;
        }
    }
    Value::Object(root)
}

/// Parses a `fieldsV1` trie.
pub(crate) fn from_fields_v1(v: &Value) -> FieldSet {
    let mut out = FieldSet::new();
    fn rec(v: &Value, path: &mut Path, out: &mut FieldSet) {
        let Some(m) = v.as_object() else { return };
        if (m.is_empty() || m.contains_key(".")) && !path.is_empty() {
            out.insert(path.clone());
        }
        for (k, child) in m {
            let pe = if let Some(f) = k.strip_prefix("f:") {
                Pe::Field(f.to_owned())
            } else if let Some(x) = k.strip_prefix("k:") {
                Pe::Key(x.to_owned())
            } else if let Some(x) = k.strip_prefix("v:") {
                Pe::Value(x.to_owned())
            } else {
                continue;
            };
            path.push(pe);
            rec(child, path, out);
            path.pop();
        }
    }
    rec(v, &mut Vec::new(), &mut out);
    out
}

/// `.spec.template.spec.containers[name="nginx"].image`
pub(crate) fn display(path: &Path) -> String {
    let mut s = String::new();
    for pe in path {
        match pe {
            Pe::Field(f) => {
                s.push('.');
                s.push_str(f);
            }
            Pe::Key(k) => {
                let m: Map<String, Value> = serde_json::from_str(k).unwrap_or_default();
                let parts: Vec<String> = m.iter().map(|(k, v)| format!("{k}={v}")).collect();
                s.push('[');
                s.push_str(&parts.join(","));
                s.push(']');
            }
            Pe::Value(v) => {
                s.push_str(&format!("[={v}]"));
            }
        }
    }
    s
}

fn matches_key(item: &Value, key: &str) -> bool {
    let Ok(Value::Object(want)) = serde_json::from_str::<Value>(key) else {
        return false;
    };
    want.iter().all(|(k, v)| match item.get(k) {
        Some(x) => x == v,
        None => k == "protocol" && v == "TCP",
    })
}

/// The value at a path, if present.
pub(crate) fn get<'a>(obj: &'a Value, path: &Path) -> Option<&'a Value> {
    let mut cur = obj;
    for pe in path {
        cur = match pe {
            Pe::Field(f) => cur.get(f)?,
            Pe::Key(k) => cur.as_array()?.iter().find(|i| matches_key(i, k))?,
            Pe::Value(v) => {
                let want: Value = serde_json::from_str(v).ok()?;
                cur.as_array()?.iter().find(|i| **i == want)?
            }
        };
    }
    Some(cur)
}

/// Removes the value at a path (a field, list item or set member).
pub(crate) fn remove(obj: &mut Value, path: &Path) {
    let Some((last, parent)) = path.split_last() else {
        return;
    };
    let mut cur = obj;
    for pe in parent {
        let next = match pe {
            Pe::Field(f) => cur.get_mut(f),
            Pe::Key(k) => cur
                .as_array_mut()
                .and_then(|a| a.iter_mut().find(|i| matches_key(i, k))),
            Pe::Value(_) => None,
        };
        match next {
            Some(n) => cur = n,
            None => return,
        }
    }
    match last {
        Pe::Field(f) => {
            if let Some(m) = cur.as_object_mut() {
                m.remove(f);
            }
        }
        Pe::Key(k) => {
            if let Some(a) = cur.as_array_mut() {
                a.retain(|i| !matches_key(i, k));
            }
        }
        Pe::Value(v) => {
            if let (Some(a), Ok(want)) = (cur.as_array_mut(), serde_json::from_str::<Value>(v)) {
                a.retain(|i| *i != want);
            }
        }
    }
}

/// Drops maps and lists left empty by removals under `path`'s ancestors.
pub(crate) fn prune_empty(obj: &mut Value, path: &Path) {
    for len in (1..path.len()).rev() {
        let prefix: Path = path[..len].to_vec();
        let empty = match get(obj, &prefix) {
            Some(Value::Object(m)) => m.is_empty(),
            _ => false,
        };
        if empty && !matches!(prefix.last(), Some(Pe::Key(_))) {
            remove(obj, &prefix);
        }
    }
}

/// Merges an applied configuration into the live object: maps per key,
/// list-maps and sets per item, everything else replaced.
pub(crate) fn merge(
    live: &mut Value,
    config: &Value,
    names: &mut Vec<String>,
    field: &str,
    builtin: bool,
) {
    match (live, config) {
        (Value::Object(l), Value::Object(c)) => {
            names.push(field.to_owned());
            for (k, cv) in c {
                match l.get_mut(k) {
                    Some(lv) => merge(lv, cv, names, k, builtin),
                    None => {
                        l.insert(k.clone(), cv.clone());
                    }
                }
            }
            names.pop();
        }
        (l @ Value::Array(_), Value::Array(c)) => match list_keys(builtin, names, field) {
            Some(keys) if keys.is_empty() => {
                let la = l.as_array_mut().expect("array");
                for item in c {
                    if !la.contains(item) {
                        la.push(item.clone());
                    }
                }
            }
            Some(keys) => {
                let la = std::mem::take(l.as_array_mut().expect("array"));
                let mut out = Vec::new();
                let mut rest: Vec<Value> = la;
                names.push(field.to_owned());
                for ci in c {
                    let k = key_of(ci, &keys);
                    let pos = k
                        .as_ref()
                        .and_then(|k| rest.iter().position(|li| matches_key(li, k)));
                    match pos {
                        Some(p) => {
                            let mut li = rest.remove(p);
                            merge(&mut li, ci, names, "", builtin);
                            out.push(li);
                        }
                        None => out.push(ci.clone()),
                    }
                }
                names.pop();
                out.extend(rest);
                *l = Value::Array(out);
            }
            None => *l = Value::Array(c.clone()),
        },
        (l, c) => *l = c.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaves_and_trie_round_trip() {
        let obj = json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "d", "labels": {"app": "web"}},
            "spec": {"replicas": 2, "template": {"spec": {"containers": [
                {"name": "app", "image": "nginx", "ports": [{"containerPort": 80}], "args": ["a", "b"]}
            ]}}}
        });
        let set = leaves(&obj, true, true);
        let shown: Vec<String> = set.iter().map(display).collect();
        assert!(
            shown.contains(&".spec.template.spec.containers[name=\"app\"].image".to_owned()),
            "{shown:?}"
        );
        assert!(shown.contains(&".spec.template.spec.containers[name=\"app\"].args".to_owned()));
        assert!(shown.contains(&".spec.template.spec.containers[name=\"app\"].ports[containerPort=80,protocol=\"TCP\"].containerPort".to_owned()), "{shown:?}");
        assert!(shown.contains(&".metadata.labels.app".to_owned()));
        let trie = to_fields_v1(&set);
        assert!(
            trie["f:spec"]["f:template"]["f:spec"]["f:containers"]["k:{\"name\":\"app\"}"]["."]
                .is_object()
        );
        assert_eq!(from_fields_v1(&trie), set);
    }

    #[test]
    fn merge_list_maps_by_key() {
        let mut live = json!({"spec": {"containers": [{"name": "a", "image": "x", "extra": 1}, {"name": "b", "image": "y"}]}});
        let cfg = json!({"spec": {"containers": [{"name": "b", "image": "z"}]}});
        merge(&mut live, &cfg, &mut vec![], "", true);
        assert_eq!(
            live["spec"]["containers"],
            json!([{"name": "b", "image": "z"}, {"name": "a", "image": "x", "extra": 1}])
        );
    }
}
