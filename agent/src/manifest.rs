//! Parsing a revision's manifests into objects, stamping them with the
//! unit's identity, and ordering them for apply (CRDs and Namespaces first).

use serde_json::Value;

/// Labels and annotations the agent puts on every object it applies.
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const LABEL_UNIT: &str = "unitsync.dev/unit";
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

/// Parses multi-document YAML (already validated by the hub; checked again).
pub fn parse(text: &str) -> Result<Vec<Object>, ParseError> {
    let docs: Vec<Value> = serde_saphyr::from_multiple(text).map_err(|e| ParseError {
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

/// Adds the unit's labels and annotations to an object.
pub fn stamp(obj: &mut Object, unit: &str, environment: &str, revision: u64) {
    let meta = &mut obj.body["metadata"];
    meta["labels"][LABEL_MANAGED_BY] = Value::from("unitsync");
    meta["labels"][LABEL_UNIT] = Value::from(unit);
    meta["annotations"][ANNOTATION_UNIT] = Value::from(format!("{environment}/{unit}"));
    meta["annotations"][ANNOTATION_ENVIRONMENT] = Value::from(environment);
    meta["annotations"][ANNOTATION_REVISION] = Value::from(revision.to_string());
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
        stamp(&mut objs[2], "web", "dev", 3);
        assert_eq!(objs[2].annotation(ANNOTATION_UNIT), Some("dev/web"));
        assert_eq!(objs[2].body["metadata"]["labels"][LABEL_UNIT], "web");
        assert_eq!(objs[2].id(), "ConfigMap x/a");
    }
}
