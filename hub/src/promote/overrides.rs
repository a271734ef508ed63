//! Overrides: dot paths into named documents, re-applied on every
//! promotion; a change of an overridden field upstream is a conflict,
//! never guessed.

use super::*;

/// Sets `path` (dot-separated; a number indexes a list) in a JSON object,
/// creating maps on the way (never list items).
fn set_path(doc: &mut Value, path: &str, value: Value) -> std::result::Result<(), String> {
    let parts: Vec<&str> = path.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(format!("the path {path:?} has an empty segment"));
    }
    let Some((last, parents)) = parts.split_last() else {
        return Err("empty path".into());
    };
    let mut cur = doc;
    for (i, p) in parents.iter().enumerate() {
        let at = &parts[..i];
        cur = match cur {
            Value::Object(m) => m
                .entry((*p).to_owned())
                .or_insert_with(|| Value::Object(Default::default())),
            Value::Array(items) => {
                let n = index(items.len(), p, at)?;
                &mut items[n]
            }
            _ => return Err(format!("{} is not a mapping or a list", shown(at))),
        };
    }
    let at = parents;
    match cur {
        Value::Object(m) => {
            m.insert((*last).to_owned(), value);
            Ok(())
        }
        Value::Array(items) => {
            let n = index(items.len(), last, at)?;
            items[n] = value;
            Ok(())
        }
        _ => Err(format!("{} is not a mapping or a list", shown(at))),
    }
}

/// The path so far, as a message names it.
fn shown(at: &[&str]) -> String {
    if at.is_empty() {
        "the document".to_owned()
    } else {
        at.join(".")
    }
}

/// `segment` as an index into the list at `at` of `len` items.
fn index(len: usize, segment: &str, at: &[&str]) -> std::result::Result<usize, String> {
    segment
        .parse::<usize>()
        .ok()
        .filter(|i| *i < len)
        .ok_or_else(|| {
            format!(
                "{} is a list of {len}: {segment:?} is not an index in it (0 to {})",
                shown(at),
                len.saturating_sub(1)
            )
        })
}

fn get_path<'a>(doc: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.')
        .filter(|p| !p.is_empty())
        .try_fold(doc, |cur, p| match cur {
            Value::Array(items) => p.parse::<usize>().ok().and_then(|i| items.get(i)),
            _ => cur.get(p),
        })
}

fn find_doc<'a>(docs: &'a mut [Value], o: &Override) -> Option<&'a mut Value> {
    docs.iter_mut().find(|d| {
        d["kind"] == o.kind.as_str()
            && d["metadata"]["name"] == o.name.as_str()
            && o.namespace
                .as_ref()
                .is_none_or(|ns| d["metadata"]["namespace"] == ns.as_str())
    })
}

fn parse_docs(text: &str) -> std::result::Result<Vec<Value>, String> {
    let docs: Vec<Value> =
        serde_saphyr::from_multiple_with_options(text, unitsync_proto::units::yaml_options())
            .map_err(|e| e.to_string())?;
    Ok(docs.into_iter().filter(|d| !d.is_null()).collect())
}

/// The upstream content with the downstream overrides applied. Without
/// overrides the text is kept byte for byte.
pub fn apply_overrides(unit: &UnitRef, text: &str, overrides: &[Override]) -> Result<String> {
    if overrides.is_empty() {
        return Ok(text.to_owned());
    }
    let bad = |m: String| HubError::InvalidArgument(format!("unit {unit}: {m}"));
    let mut docs = parse_docs(text).map_err(bad)?;
    for o in overrides {
        let doc = find_doc(&mut docs, o).ok_or_else(|| {
            bad(format!(
                "override of {} {} {}: the unit has no such object",
                o.kind, o.name, o.path
            ))
        })?;
        set_path(doc, &o.path, o.value.clone())
            .map_err(|m| bad(format!("override {} on {} {}: {m}", o.path, o.kind, o.name)))?;
    }
    let parts: Vec<String> = docs
        .iter()
        .map(|d| serde_saphyr::to_string(d).unwrap_or_default())
        .collect();
    Ok(parts.join("---\n"))
}

/// Overridden fields that the upstream changed between two revisions.
pub(super) fn override_conflicts(before: &str, after: &str, overrides: &[Override]) -> Vec<String> {
    let (Ok(mut b), Ok(mut a)) = (parse_docs(before), parse_docs(after)) else {
        return vec![];
    };
    let mut out = Vec::new();
    for o in overrides {
        let old = find_doc(&mut b, o).and_then(|d| get_path(d, &o.path).cloned());
        let new = find_doc(&mut a, o).and_then(|d| get_path(d, &o.path).cloned());
        if old != new {
            let show = |v: &Option<Value>| match v {
                None => "(unset)".to_owned(),
                // A Secret's values never reach a message.
                Some(_) if o.is_secret() => "\"***\"".to_owned(),
                Some(v) => v.to_string(),
            };
            out.push(format!(
                "{} {} {}: upstream changed it from {} to {}, overridden here as {}",
                o.kind,
                o.name,
                o.path,
                show(&old),
                show(&new),
                o.shown_value()
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_apply_and_conflicts_are_detected() {
        let unit: UnitRef = "staging/web".parse().unwrap();
        let text =
            "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\nspec:\n  replicas: 1\n";
        let o = Override {
            kind: "Deployment".into(),
            name: "web".into(),
            namespace: None,
            path: "spec.replicas".into(),
            value: serde_json::json!(3),
            reviewed_at: RevisionNum(0),
        };
        let out = apply_overrides(&unit, text, std::slice::from_ref(&o)).unwrap();
        assert!(out.contains("replicas: 3"), "{out}");
        assert_eq!(apply_overrides(&unit, text, &[]).unwrap(), text);
        let changed = text.replace("replicas: 1", "replicas: 2");
        assert_eq!(
            override_conflicts(text, &changed, std::slice::from_ref(&o)).len(),
            1
        );
        assert!(
            override_conflicts(
                text,
                &text.replace("web\n", "web\n  labels: {a: b}\n"),
                std::slice::from_ref(&o)
            )
            .is_empty()
        );
        let missing = Override {
            name: "nope".into(),
            ..o
        };
        assert!(apply_overrides(&unit, text, &[missing]).is_err());
    }

    #[test]
    fn a_number_in_a_path_indexes_a_list() {
        let unit: UnitRef = "staging/web".parse().unwrap();
        let text = "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\nspec:\n  template:\n    spec:\n      containers:\n        - name: web\n          image: web:1\n";
        let image = |path: &str| Override {
            kind: "Deployment".into(),
            name: "web".into(),
            namespace: None,
            path: path.into(),
            value: serde_json::json!("web:2"),
            reviewed_at: RevisionNum(0),
        };
        let o = image("spec.template.spec.containers.0.image");
        let out = apply_overrides(&unit, text, std::slice::from_ref(&o)).unwrap();
        assert!(
            out.contains("image: web:2") && !out.contains("web:1"),
            "{out}"
        );
        let later = text.replace("web:1", "web:1.1");
        assert_eq!(override_conflicts(text, &later, &[o]).len(), 1);
        let e = apply_overrides(
            &unit,
            text,
            &[image("spec.template.spec.containers.1.image")],
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("spec.template.spec.containers is a list of 1: \"1\" is not an index in it"),
            "{e}"
        );
        let e = apply_overrides(
            &unit,
            text,
            &[image("spec.template.spec.containers.web.image")],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("spec.template.spec.containers is a list"), "{e}");
    }

    #[test]
    fn conflicts_of_a_secret_never_show_its_values() {
        let before = "apiVersion: v1\nkind: Secret\nmetadata:\n  name: creds\nstringData:\n  password: old-value\n";
        let after = before.replace("old-value", "new-value");
        let o = Override {
            kind: "Secret".into(),
            name: "creds".into(),
            namespace: None,
            path: "stringData.password".into(),
            value: serde_json::json!("override-value"),
            reviewed_at: RevisionNum(0),
        };
        let c = override_conflicts(before, &after, std::slice::from_ref(&o));
        assert_eq!(c.len(), 1);
        for v in ["old-value", "new-value", "override-value"] {
            assert!(!c[0].contains(v), "{}", c[0]);
        }
        assert!(c[0].contains("***"), "{}", c[0]);
    }
}
