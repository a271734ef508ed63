//! Parsing a revision's manifests into objects, stamping them with the
//! unit's identity, and ordering them for apply (CRDs and Namespaces first).

use serde_json::Value;

/// Labels and annotations the agent puts on every object it applies.
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const LABEL_UNIT: &str = "unitsync.dev/unit";
/// On an inventory ConfigMap: the environment whose unit it records.
pub const LABEL_ENVIRONMENT: &str = "unitsync.dev/environment";
pub const ANNOTATION_UNIT: &str = "unitsync.dev/unit";
pub const ANNOTATION_ENVIRONMENT: &str = "unitsync.dev/environment";
/// The revision that last changed the object.
pub const ANNOTATION_REVISION: &str = "unitsync.dev/revision";
/// `disabled`: never prune this object.
pub const ANNOTATION_PRUNE: &str = "unitsync.dev/prune";
/// `report`: report drift on this object, do not heal it.
pub const ANNOTATION_DRIFT: &str = "unitsync.dev/drift";
/// `enabled`: take conflicting fields from other field managers.
pub const ANNOTATION_FORCE: &str = "unitsync.dev/force";

/// One object of a unit.
#[derive(Clone, Debug, PartialEq)]
pub struct Object {
    pub api_version: String,
    pub kind: String,
    pub namespace: Option<String>,
    pub name: String,
    pub body: Value,
}

impl Object {
    pub fn group(&self) -> &str {
        self.api_version.rsplit_once('/').map_or("", |(g, _)| g)
    }

    pub fn version(&self) -> &str {
        self.api_version
            .rsplit_once('/')
            .map_or(self.api_version.as_str(), |(_, v)| v)
    }

    /// `Deployment apps/web` style, for messages.
    pub fn id(&self) -> String {
        match &self.namespace {
            Some(ns) => format!("{} {ns}/{}", self.kind, self.name),
            None => format!("{} {}", self.kind, self.name),
        }
    }

    pub fn annotation(&self, key: &str) -> Option<&str> {
        self.body["metadata"]["annotations"][key].as_str()
    }

    /// Apply order: CRDs, then Namespaces, then everything else.
    fn rank(&self) -> u8 {
        match (self.group(), self.kind.as_str()) {
            ("apiextensions.k8s.io", "CustomResourceDefinition") => 0,
            ("", "Namespace") => 1,
            _ => 2,
        }
    }

    pub fn is_crd(&self) -> bool {
        self.rank() == 0
    }
}

#[derive(Debug, thiserror::Error)]
#[error("document {document}: {problem}")]
pub struct ParseError {
    pub document: usize,
    pub problem: String,
}

/// Parses multi-document YAML (already validated by the hub, with the
/// same budget; checked again).
pub fn parse(text: &str) -> Result<Vec<Object>, ParseError> {
    let docs: Vec<Value> =
        serde_saphyr::from_multiple_with_options(text, unitsync_proto::units::yaml_options())
            .map_err(|e| ParseError {
                document: 0,
                problem: e.to_string(),
            })?;
    let mut out = Vec::new();
    for (i, body) in docs.into_iter().enumerate() {
        if body.is_null() {
            continue;
        }
        let err = |problem: &str| ParseError {
            document: i + 1,
            problem: problem.to_owned(),
        };
        let api_version = body["apiVersion"]
            .as_str()
            .ok_or_else(|| err("apiVersion is missing"))?
            .to_owned();
        let kind = body["kind"]
            .as_str()
            .ok_or_else(|| err("kind is missing"))?
            .to_owned();
        if !body.is_object() {
            return Err(err("not a mapping"));
        }
        if !body["metadata"].is_object() {
            return Err(err("metadata is not a mapping"));
        }
        for field in ["labels", "annotations"] {
            match &body["metadata"][field] {
                Value::Null => {}
                Value::Object(m) if m.values().all(Value::is_string) => {}
                _ => {
                    return Err(ParseError {
                        document: i + 1,
                        problem: format!("metadata.{field} must map strings to strings"),
                    });
                }
            }
        }
        let name = body["metadata"]["name"]
            .as_str()
            .ok_or_else(|| err("metadata.name is missing"))?
            .to_owned();
        let namespace = body["metadata"]["namespace"]
            .as_str()
            .filter(|s| !s.is_empty())
            .map(str::to_owned);
        out.push(Object {
            api_version,
            kind,
            namespace,
            name,
            body,
        });
    }
    out.sort_by_key(Object::rank);
    Ok(out)
}

/// The string map at `metadata.<field>`, created when absent; `None` when
/// the object or the field is not a mapping.
fn string_map<'a>(
    body: &'a mut Value,
    field: &str,
) -> Option<&'a mut serde_json::Map<String, Value>> {
    let meta = body.as_object_mut()?.get_mut("metadata")?.as_object_mut()?;
    let v = meta
        .entry(field.to_owned())
        .or_insert_with(|| Value::Object(Default::default()));
    if v.is_null() {
        *v = Value::Object(Default::default());
    }
    v.as_object_mut()
}

/// Adds the unit's labels and annotations to an object (from [`parse`],
/// which checked their shape).
pub fn stamp(obj: &mut Object, unit: &str, environment: &str, revision: u64) -> Result<(), String> {
    let id = obj.id();
    let labels = string_map(&mut obj.body, "labels")
        .ok_or_else(|| format!("{id}: metadata.labels is not a mapping"))?;
    labels.insert(LABEL_MANAGED_BY.into(), Value::from("unitsync"));
    labels.insert(LABEL_UNIT.into(), Value::from(unit));
    let annotations = string_map(&mut obj.body, "annotations")
        .ok_or_else(|| format!("{id}: metadata.annotations is not a mapping"))?;
    annotations.insert(
        ANNOTATION_UNIT.into(),
        Value::from(format!("{environment}/{unit}")),
    );
    annotations.insert(ANNOTATION_ENVIRONMENT.into(), Value::from(environment));
    annotations.insert(
        ANNOTATION_REVISION.into(),
        Value::from(revision.to_string()),
    );
    Ok(())
}

/// Sets the revision annotation (drift compares with the revision that
/// last changed the live object).
pub fn set_revision(obj: &mut Object, revision: &str) {
    if let Some(a) = string_map(&mut obj.body, "annotations") {
        a.insert(ANNOTATION_REVISION.into(), Value::from(revision));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_orders_and_stamps() {
        let text = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a, namespace: x}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n---\napiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\nmetadata: {name: t.example.com}\n";
        let mut objs = parse(text).unwrap();
        let kinds: Vec<&str> = objs.iter().map(|o| o.kind.as_str()).collect();
        assert_eq!(
            kinds,
            ["CustomResourceDefinition", "Namespace", "ConfigMap"]
        );
        stamp(&mut objs[2], "web", "dev", 3).unwrap();
        assert_eq!(objs[2].annotation(ANNOTATION_UNIT), Some("dev/web"));
        assert_eq!(objs[2].body["metadata"]["labels"][LABEL_UNIT], "web");
        assert_eq!(objs[2].id(), "ConfigMap x/a");
    }

    #[test]
    fn labels_and_annotations_that_are_not_string_maps_are_refused() {
        for bad in [
            "metadata: {name: a, labels: x}",
            "metadata: {name: a, labels: [1]}",
            "metadata: {name: a, labels: {k: 1}}",
            "metadata: {name: a, annotations: x}",
            "metadata: x",
        ] {
            let text = format!("apiVersion: v1\nkind: ConfigMap\n{bad}\n");
            let e = parse(&text).unwrap_err();
            assert_eq!(e.document, 1, "{bad}");
        }
    }
}
