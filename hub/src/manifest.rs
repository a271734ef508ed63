//! Manifest validation at the hub: a unit's multi-document YAML is checked
//! against hard caps and the Kubernetes object shape before anything is
//! stored. Every rejection names the unit, the document and the field.

use std::collections::HashMap;
use std::fmt;

use serde_json::Value;

use crate::model::{Digest, UnitRef, check_dns1123_label, check_dns1123_subdomain};

/// Hard caps on one unit's manifests. Tuning knobs with neutral defaults.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    pub max_bytes: usize,
    pub max_documents: usize,
    pub max_depth: usize,
    /// Alias (`*ref`) uses allowed in one document.
    pub max_aliases: usize,
    /// Parser events allowed in one document; bounds alias expansion.
    pub max_nodes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_bytes: 4 * 1024 * 1024,
            max_documents: 1_000,
            max_depth: 64,
            max_aliases: 1_000,
            max_nodes: 250_000,
        }
    }
}

/// A rejected unit: where and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ManifestError {
    pub unit: String,
    /// 1-based document index within the stream.
    pub document: Option<usize>,
    /// 1-based line of the document's first line in the stream.
    pub line: Option<usize>,
    /// Field path within the document, e.g. `metadata.name`.
    pub field: Option<String>,
    pub problem: String,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unit {}", self.unit)?;
        if let Some(d) = self.document {
            write!(f, ", document {d}")?;
            if let Some(l) = self.line {
                write!(f, " (line {l})")?;
            }
        }
        if let Some(field) = &self.field {
            write!(f, ", field {field}")?;
        }
        write!(f, ": {}", self.problem)
    }
}

/// A valid unit's manifests, with what the hub records about them.
#[derive(Clone, Debug, PartialEq)]
pub struct Validated {
    pub digest: Digest,
    pub objects: Vec<ObjectId>,
}

impl Validated {
    /// How many documents (objects) the unit has.
    pub fn documents(&self) -> u32 {
        u32::try_from(self.objects.len()).unwrap_or(u32::MAX)
    }
}

/// The identity of one object in a unit.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ObjectId {
    pub api_version: String,
    pub kind: String,
    pub namespace: Option<String>,
    pub name: String,
}

impl ObjectId {
    /// API group (empty for the core group).
    pub fn group(&self) -> &str {
        self.api_version
            .rsplit_once('/')
            .map_or("", |(group, _)| group)
    }
}

impl fmt::Display for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.kind, self.name)?;
        if let Some(ns) = &self.namespace {
            write!(f, " in namespace {ns}")?;
        }
        Ok(())
    }
}

/// One document of the stream, as split at `---` markers.
struct RawDocument<'a> {
    index: usize,
    line: usize,
    text: &'a str,
}

/// Splits a YAML stream at document markers (`---` or `...` at column 0).
/// Documents holding only comments or blank lines are skipped but counted
/// for the index, so indexes match what an editor shows.
fn split_documents(text: &str) -> Vec<RawDocument<'_>> {
    // (start offset, first line) of every document in the stream.
    let mut bounds = vec![(0usize, 1usize)];
    let mut ends = Vec::new();
    let mut offset = 0usize;
    for (n, line) in text.split_inclusive('\n').enumerate() {
        let bare = line.trim_end_matches(['\n', '\r']);
        let marker = ["---", "..."].iter().any(|m| {
            bare.strip_prefix(m)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t']))
        });
        if marker {
            ends.push(offset);
            // Content after `--- ` on the same line belongs to the next document.
            bounds.push((offset + 3, n + 1));
        }
        offset += line.len();
    }
    ends.push(text.len());
    let mut docs = Vec::new();
    let mut index = 0usize;
    for (i, ((start, line), end)) in bounds.into_iter().zip(ends).enumerate() {
        let body = &text[start.min(end)..end];
        let has_content = body.lines().any(|l| {
            let t = l.trim();
            !t.is_empty() && !t.starts_with('#') && !t.starts_with('%')
        });
        // The empty stretch before a leading `---` is not a document.
        if i == 0 && !has_content {
            continue;
        }
        index += 1;
        if has_content {
            docs.push(RawDocument {
                index,
                line,
                text: body,
            });
        }
    }
    docs
}

/// The documents of a YAML stream as (index, first line, text), split at
/// `---`/`...` markers; indexes count as an editor does (1-based, empty
/// documents included in the count, not returned).
pub fn documents(text: &str) -> Vec<(usize, usize, &str)> {
    split_documents(text)
        .into_iter()
        .map(|d| (d.index, d.line, d.text))
        .collect()
}

/// Validates a unit's manifests. `Ok` means the text may be stored as is.
pub fn validate(unit: &UnitRef, text: &str, limits: &Limits) -> Result<Validated, ManifestError> {
    let err =
        |document: Option<(usize, usize)>, field: Option<&str>, problem: String| ManifestError {
            unit: unit.to_string(),
            document: document.map(|d| d.0),
            line: document.map(|d| d.1),
            field: field.map(str::to_owned),
            problem,
        };
    if text.len() > limits.max_bytes {
        return Err(err(
            None,
            None,
            format!(
                "manifests are {} bytes, over the limit of {} bytes",
                text.len(),
                limits.max_bytes
            ),
        ));
    }
    let docs = split_documents(text);
    if docs.is_empty() {
        return Err(err(
            None,
            None,
            "no documents: a unit needs at least one object (use destroy to remove a unit)".into(),
        ));
    }
    if docs.len() > limits.max_documents {
        return Err(err(
            None,
            None,
            format!(
                "{} documents, over the limit of {}",
                docs.len(),
                limits.max_documents
            ),
        ));
    }
    let mut budget = serde_saphyr::Budget::default();
    budget.max_depth = limits.max_depth;
    budget.max_aliases = limits.max_aliases;
    budget.max_nodes = limits.max_nodes;
    budget.max_events = limits.max_nodes.saturating_mul(2);
    budget.max_documents = 1;
    let mut options = serde_saphyr::Options::default();
    options.budget = Some(budget);
    let mut seen: HashMap<(String, String, Option<String>, String), usize> = HashMap::new();
    let mut objects = Vec::with_capacity(docs.len());
    for doc in &docs {
        let at = Some((doc.index, doc.line));
        let value: Value =
            serde_saphyr::from_str_with_options(doc.text, options.clone()).map_err(|e| {
                err(
                    at,
                    None,
                    format!("not valid YAML: {}", one_line(&e.to_string())),
                )
            })?;
        let depth = depth_of(&value);
        if depth > limits.max_depth {
            return Err(err(
                at,
                None,
                format!(
                    "nesting depth {depth} is over the limit of {}",
                    limits.max_depth
                ),
            ));
        }
        let Value::Object(map) = &value else {
            return Err(err(
                at,
                None,
                format!(
                    "expected a Kubernetes object (a mapping), found {}",
                    kind_of(&value)
                ),
            ));
        };
        let api_version =
            required_string(map.get("apiVersion")).map_err(|p| err(at, Some("apiVersion"), p))?;
        let kind = required_string(map.get("kind")).map_err(|p| err(at, Some("kind"), p))?;
        let Some(Value::Object(meta)) = map.get("metadata") else {
            return Err(err(
                at,
                Some("metadata"),
                "required mapping is missing".into(),
            ));
        };
        let name =
            required_string(meta.get("name")).map_err(|p| err(at, Some("metadata.name"), p))?;
        check_dns1123_subdomain(&name).map_err(|why| {
            err(
                at,
                Some("metadata.name"),
                format!("invalid value {:?}: {why}", prefix(&name)),
            )
        })?;
        let namespace = match meta.get("namespace") {
            None | Some(Value::Null) => None,
            Some(Value::String(ns)) => {
                check_dns1123_label(ns).map_err(|why| {
                    err(
                        at,
                        Some("metadata.namespace"),
                        format!("invalid value {:?}: {why}", prefix(ns)),
                    )
                })?;
                Some(ns.clone())
            }
            Some(other) => {
                return Err(err(
                    at,
                    Some("metadata.namespace"),
                    format!("expected a string, found {}", kind_of(other)),
                ));
            }
        };
        // Labels and annotations map strings to strings (Kubernetes
        // refuses anything else, and agents stamp their own into them).
        for field in ["labels", "annotations"] {
            match meta.get(field) {
                None | Some(Value::Null) => {}
                Some(Value::Object(m)) => {
                    if let Some((k, v)) = m.iter().find(|(_, v)| !v.is_string()) {
                        return Err(err(
                            at,
                            Some(&format!("metadata.{field}.{}", prefix(k))),
                            format!("expected a string value, found {}", kind_of(v)),
                        ));
                    }
                }
                Some(other) => {
                    return Err(err(
                        at,
                        Some(&format!("metadata.{field}")),
                        format!("expected a mapping of strings, found {}", kind_of(other)),
                    ));
                }
            }
        }
        if let Some((field, total)) = data_size(&api_version, &kind, map)
            && total > MAX_DATA_BYTES
        {
            return Err(err(
                at,
                Some(field),
                format!(
                    "{kind} {name} holds {total} bytes of data; Kubernetes holds at most {MAX_DATA_BYTES} in one (split it)"
                ),
            ));
        }
        let id = ObjectId {
            api_version,
            kind,
            namespace,
            name,
        };
        let key = (
            id.group().to_owned(),
            id.kind.clone(),
            id.namespace.clone(),
            id.name.clone(),
        );
        if let Some(first) = seen.insert(key, doc.index) {
            return Err(err(
                at,
                Some("metadata.name"),
                format!("{id} is already defined by document {first}"),
            ));
        }
        objects.push(id);
    }
    // Each document passed; the agents parse the stream as a whole, with a
    // budget of their own: a unit they cannot parse is refused here, not
    // failed on every cluster.
    serde_saphyr::from_multiple_with_options::<serde::de::IgnoredAny>(
        text,
        unitsync_proto::units::yaml_options(),
    )
    .map_err(|e| {
        err(
            None,
            None,
            format!(
                "over what agents parse in one unit ({}); split it into several units",
                one_line(&e.to_string())
            ),
        )
    })?;
    Ok(Validated {
        digest: Digest::of(text.as_bytes()),
        objects,
    })
}

fn required_string(v: Option<&Value>) -> Result<String, String> {
    match v {
        None | Some(Value::Null) => Err("required value is missing".into()),
        Some(Value::String(s)) if s.is_empty() => Err("required value is empty".into()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(format!("expected a string, found {}", kind_of(other))),
    }
}

/// What a reader without the admin role sees of a unit: Secret `data` and
/// `stringData` values replaced by `"***"` (keys kept, so a diff still says
/// which key changed); every other document exactly as stored.
pub fn mask_secrets(text: &str) -> String {
    let docs = split_documents(text);
    if docs.is_empty() {
        return text.to_owned();
    }
    let mut out = Vec::with_capacity(docs.len());
    for doc in docs {
        let parsed: Option<Value> = serde_saphyr::from_str(doc.text).ok();
        match parsed {
            Some(mut v) if v["kind"] == "Secret" => {
                for field in ["data", "stringData"] {
                    if let Some(m) = v.get_mut(field).and_then(Value::as_object_mut) {
                        for val in m.values_mut() {
                            *val = Value::from("***");
                        }
                    } else if v.get(field).is_some_and(|x| !x.is_null()) {
                        v[field] = Value::from("***");
                    }
                }
                out.push(serde_saphyr::to_string(&v).unwrap_or_default());
            }
            // A Secret-looking document that does not parse is withheld.
            None if doc.text.contains("Secret") => out.push("# (document withheld)\n".into()),
            _ => out.push(doc.text.trim_start_matches('\n').to_owned()),
        }
    }
    out.join("---\n")
}

/// At most the first 40 characters of a value, for error messages (a
/// rejected value may be huge, or a secret).
pub fn prefix(s: &str) -> String {
    const MAX: usize = 40;
    match s.char_indices().nth(MAX) {
        None => s.to_owned(),
        Some((cut, _)) => format!("{}…", &s[..cut]),
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a sequence",
        Value::Object(_) => "a mapping",
    }
}

fn depth_of(v: &Value) -> usize {
    // Iterative, so a deep value cannot overflow the stack.
    let mut max = 0;
    let mut stack = vec![(v, 1usize)];
    while let Some((v, d)) = stack.pop() {
        max = max.max(d);
        match v {
            Value::Array(items) => stack.extend(items.iter().map(|i| (i, d + 1))),
            Value::Object(map) => stack.extend(map.values().map(|i| (i, d + 1))),
            _ => {}
        }
    }
    max
}

/// The most data the API server keeps in one ConfigMap or Secret (keys
/// and values, base64 counted decoded).
const MAX_DATA_BYTES: usize = 1024 * 1024;

/// A ConfigMap's or Secret's data size, with the field to name.
fn data_size(
    api_version: &str,
    kind: &str,
    object: &serde_json::Map<String, Value>,
) -> Option<(&'static str, usize)> {
    let size = |field: &str, encoded: bool| -> usize {
        object.get(field).and_then(Value::as_object).map_or(0, |m| {
            m.iter()
                .map(|(k, v)| {
                    let v = v.as_str().unwrap_or_default();
                    let padding = v.bytes().rev().take_while(|b| *b == b'=').count();
                    k.len()
                        + if encoded {
                            (v.len() / 4 * 3).saturating_sub(padding)
                        } else {
                            v.len()
                        }
                })
                .sum()
        })
    };
    match (api_version, kind) {
        ("v1", "ConfigMap") => Some(("data", size("data", false) + size("binaryData", true))),
        ("v1", "Secret") => Some(("data", size("data", true) + size("stringData", false))),
        _ => None,
    }
}

/// The parser's message without the source excerpt it appends: manifests
/// may hold secret values, and errors must never echo them.
fn one_line(s: &str) -> String {
    let first = s
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("");
    first.strip_prefix("error: ").unwrap_or(first).to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit() -> UnitRef {
        "dev/web".parse().unwrap()
    }

    fn check(text: &str) -> Result<Validated, ManifestError> {
        validate(&unit(), text, &Limits::default())
    }

    #[test]
    fn a_config_map_or_secret_over_the_api_server_s_data_limit_is_refused() {
        let big = "x".repeat(1024 * 1024);
        let cm = format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: big\ndata:\n  blob: {big}\n"
        );
        let small = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: small\n";
        let e = check(&format!("{small}---\n{cm}")).unwrap_err();
        assert_eq!((e.document, e.field.as_deref()), (Some(2), Some("data")));
        assert!(
            e.problem.contains("ConfigMap big holds 1048580 bytes"),
            "{e}"
        );
        // Just under: accepted (base64 counts decoded).
        let fits = "x".repeat(1024 * 1024 - 4);
        check(&format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: fits\ndata:\n  blob: {fits}\n"
        ))
        .unwrap();
        let encoded = "QUJD".repeat(350_000);
        let e = check(&format!(
            "apiVersion: v1\nkind: Secret\nmetadata:\n  name: s\ndata:\n  k: {encoded}\n"
        ))
        .unwrap_err();
        assert!(e.problem.contains("Secret s holds 1050001 bytes"), "{e}");
    }

    #[test]
    fn a_unit_agents_cannot_parse_as_a_whole_is_refused() {
        let objects: String = (0..1_000)
            .map(|i| format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: c{i}\n  namespace: default\n---\n"))
            .collect();
        check(&objects).expect("1,000 objects, the document limit");
        // Every document passes, but the stream has more documents (empty
        // ones count) than an agent's parser takes.
        let with_empty = format!("{objects}{}", "# nothing here\n---\n".repeat(30));
        let e = check(&with_empty).unwrap_err();
        assert!(
            e.problem.contains("over what agents parse in one unit"),
            "{e}"
        );
        assert_eq!(e.document, None);
    }

    const CM: &str =
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: a\n  namespace: web\ndata:\n  k: v\n";

    #[test]
    fn accepts_multi_document_streams() {
        let text = format!(
            "---\n{CM}---\n# comment only\n---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: web\n"
        );
        let v = check(&text).unwrap();
        assert_eq!(v.objects.len(), 2);
        assert_eq!(v.objects[1].kind, "Namespace");
        assert_eq!(v.digest, Digest::of(text.as_bytes()));
    }

    #[test]
    fn names_document_and_field() {
        let text =
            format!("{CM}---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: Bad_Name\n");
        let e = check(&text).unwrap_err();
        assert_eq!(e.document, Some(2));
        assert_eq!(e.line, Some(8));
        assert_eq!(e.field.as_deref(), Some("metadata.name"));
        let msg = e.to_string();
        assert!(
            msg.starts_with(
                "unit dev/web, document 2 (line 8), field metadata.name: invalid value \"Bad_Name\""
            ),
            "{msg}"
        );
    }

    #[test]
    fn missing_fields() {
        let cases = [
            ("kind: ConfigMap\nmetadata:\n  name: a\n", "apiVersion"),
            ("apiVersion: v1\nmetadata:\n  name: a\n", "kind"),
            ("apiVersion: v1\nkind: ConfigMap\n", "metadata"),
            (
                "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  labels: {}\n",
                "metadata.name",
            ),
            (
                "apiVersion: 1\nkind: ConfigMap\nmetadata:\n  name: a\n",
                "apiVersion",
            ),
            (
                "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: a\n  namespace: Not_Ok\n",
                "metadata.namespace",
            ),
        ];
        for (text, field) in cases {
            let e = check(text).unwrap_err();
            assert_eq!(e.field.as_deref(), Some(field), "{text}: {e}");
            assert_eq!(e.document, Some(1));
        }
    }

    #[test]
    fn rejects_non_objects_and_bad_yaml() {
        let e = check("- a\n- b\n").unwrap_err();
        assert!(e.problem.contains("found a sequence"), "{e}");
        let e = check("apiVersion: v1\nkind: [unclosed\n").unwrap_err();
        assert!(e.problem.starts_with("not valid YAML"), "{e}");
        // The message never quotes the document (it may hold secrets).
        let e = check("apiVersion: v1\nkind: Secret\nstringData:\n  password: s3cr3t-canary [\n")
            .unwrap_err();
        assert!(!e.to_string().contains("s3cr3t-canary"), "{e}");
        let e = check("# nothing\n").unwrap_err();
        assert!(e.problem.starts_with("no documents"), "{e}");
    }

    #[test]
    fn rejects_duplicates_by_group_kind_namespace_name() {
        // Same object under another version of the same group is the same object.
        let text = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: a, namespace: ns}\n---\napiVersion: apps/v1beta1\nkind: Deployment\nmetadata: {name: a, namespace: ns}\n";
        let e = check(text).unwrap_err();
        assert_eq!(e.document, Some(2));
        assert!(e.problem.contains("already defined by document 1"), "{e}");
        // Other namespace: fine.
        let text = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: a, namespace: ns}\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: a, namespace: other}\n";
        assert!(check(text).is_ok());
    }

    #[test]
    fn caps() {
        let limits = Limits {
            max_bytes: 100,
            ..Limits::default()
        };
        let big = format!("{CM}data:\n  x: \"{}\"\n", "y".repeat(200));
        let e = validate(&unit(), &big, &limits).unwrap_err();
        assert!(e.problem.contains("over the limit of 100 bytes"), "{e}");

        let limits = Limits {
            max_documents: 2,
            ..Limits::default()
        };
        let three = [CM, CM, CM].join("---\n");
        let e = validate(&unit(), &three, &limits).unwrap_err();
        assert!(
            e.problem.contains("3 documents, over the limit of 2"),
            "{e}"
        );

        let mut deep =
            String::from("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: a\ndata: ");
        deep.push_str(&"[".repeat(100));
        deep.push_str(&"]".repeat(100));
        deep.push('\n');
        let e = check(&deep).unwrap_err();
        assert_eq!(e.document, Some(1));
        assert!(
            e.problem.contains("depth") || e.problem.contains("nest"),
            "{e}"
        );
    }

    #[test]
    fn alias_bomb_is_refused() {
        let mut text = String::from(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: a\nx0: &a0 [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n",
        );
        for i in 1..10 {
            let p = i - 1;
            text.push_str(&format!(
                "x{i}: &a{i} [*a{p},*a{p},*a{p},*a{p},*a{p},*a{p},*a{p},*a{p},*a{p}]\n"
            ));
        }
        let e = check(&text).unwrap_err();
        assert_eq!(e.document, Some(1));
    }

    #[test]
    fn document_marker_rules() {
        // `---` inside a block scalar at column > 0 is content, not a marker.
        let text = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: a\ndata:\n  f: |\n    ---\n    x\n";
        assert_eq!(check(text).unwrap().objects.len(), 1);
        // Content on the marker line.
        let text = "--- {apiVersion: v1, kind: ConfigMap, metadata: {name: a}}\n--- {apiVersion: v1, kind: ConfigMap, metadata: {name: b}}\n";
        assert_eq!(check(text).unwrap().objects.len(), 2);
    }

    #[test]
    fn labels_and_annotations_must_map_strings_to_strings() {
        let unit: UnitRef = "dev/web".parse().unwrap();
        for (doc, field) in [
            ("metadata:\n  name: a\n  labels: x\n", "metadata.labels"),
            ("metadata:\n  name: a\n  labels: [a]\n", "metadata.labels"),
            (
                "metadata:\n  name: a\n  labels:\n    k: 1\n",
                "metadata.labels.k",
            ),
            (
                "metadata:\n  name: a\n  annotations: x\n",
                "metadata.annotations",
            ),
            (
                "metadata:\n  name: a\n  annotations:\n    k: {a: b}\n",
                "metadata.annotations.k",
            ),
        ] {
            let text = format!("{CM}---\napiVersion: v1\nkind: ConfigMap\n{doc}");
            let e = validate(&unit, &text, &Limits::default()).unwrap_err();
            assert_eq!(e.document, Some(2), "{doc}");
            assert_eq!(e.field.as_deref(), Some(field), "{doc}");
            assert!(e.to_string().starts_with("unit dev/web, document 2"), "{e}");
        }
    }

    mod properties {
        use proptest::prelude::*;

        use super::*;

        fn yamlish() -> impl Strategy<Value = String> {
            let line = prop_oneof![
                Just("---".to_owned()),
                Just("apiVersion: v1".to_owned()),
                Just("kind: ConfigMap".to_owned()),
                Just("kind: Secret".to_owned()),
                Just("metadata:".to_owned()),
                Just("  name: a".to_owned()),
                Just("  namespace: b".to_owned()),
                Just("  labels: x".to_owned()),
                Just("  annotations: {k: 1}".to_owned()),
                Just("data: {x: &a [1, *a]}".to_owned()),
                "[ -~]{0,30}",
            ];
            prop::collection::vec(line, 0..30).prop_map(|l| l.join("\n"))
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            /// Validation never panics; a rejection names the unit; masking
            /// never panics either.
            #[test]
            fn validation_never_panics(text in yamlish()) {
                let unit: UnitRef = "dev/web".parse().unwrap();
                match validate(&unit, &text, &Limits::default()) {
                    Ok(v) => prop_assert!(!v.objects.is_empty()),
                    Err(e) => prop_assert!(e.to_string().starts_with("unit dev/web")),
                }
                let _ = mask_secrets(&text);
            }

            #[test]
            fn arbitrary_text_never_panics(text in "\\PC{0,300}") {
                let unit: UnitRef = "dev/web".parse().unwrap();
                let _ = validate(&unit, &text, &Limits::default());
                let _ = mask_secrets(&text);
            }
        }
    }
}
