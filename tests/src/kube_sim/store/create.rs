//! Creating objects: name and namespace checks, body validation, the
//! defaults the API server fills in, and new metadata (uid, timestamps).

use serde_json::{Value, json};

use super::managed::{Managed, write_managed};
use super::*;
use crate::kube_sim::errors::ApiError;
use crate::kube_sim::fields;
use crate::kube_sim::registry::ResourceType;

/// The length of base64 text once decoded.
fn decoded_len(b64: &str) -> usize {
    let padding = b64.bytes().rev().take_while(|&c| c == b'=').count();
    (b64.len() / 4 * 3).saturating_sub(padding)
}

pub(super) fn uuid() -> String {
    let b: [u8; 16] = rand::random();
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
        u16::from_be_bytes([b[4], b[5]]),
        u16::from_be_bytes([b[6], b[7]]) & 0x0fff,
        (u16::from_be_bytes([b[8], b[9]]) & 0x3fff) | 0x8000,
        u64::from_be_bytes([0, 0, b[10], b[11], b[12], b[13], b[14], b[15]])
    )
}

pub(super) fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|p| {
            let b = p.as_bytes();
            !b.is_empty()
                && b[0].is_ascii_alphanumeric()
                && b[b.len() - 1].is_ascii_alphanumeric()
                && b.iter()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        })
        && !s.bytes().any(|c| c.is_ascii_uppercase())
}

pub(super) const SUBDOMAIN_MSG: &str = "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')";

impl State {
    pub(super) fn check_body(
        &self,
        ty: &ResourceType,
        ns: &str,
        body: &Value,
        url_name: Option<&str>,
    ) -> Result<(), ApiError> {
        let av = body["apiVersion"].as_str().unwrap_or_default();
        let kind = body["kind"].as_str().unwrap_or_default();
        if !av.is_empty() && (av != ty.api_version() || (!kind.is_empty() && kind != ty.kind)) {
            return Err(ApiError::bad_request(format!(
                "the API version in the data ({av}) does not match the expected API version ({})",
                ty.api_version()
            )));
        }
        if let Some(url) = url_name
            && let Some(n) = body["metadata"]["name"].as_str()
            && n != url
        {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({n}) does not match the name on the URL ({url})"
            )));
        }
        if ty.namespaced
            && let Some(bns) = body["metadata"]["namespace"].as_str()
            && !bns.is_empty()
            && bns != ns
        {
            return Err(ApiError::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }
        Ok(())
    }

    pub(super) fn defaults(ty: &ResourceType, obj: &mut Value) {
        match (ty.group.as_str(), ty.kind.as_str()) {
            ("apps", "Deployment") => {
                let spec = &mut obj["spec"];
                if spec.get("replicas").is_none() {
                    spec["replicas"] = json!(1);
                }
                if spec.get("progressDeadlineSeconds").is_none() {
                    spec["progressDeadlineSeconds"] = json!(600);
                }
                if spec.get("revisionHistoryLimit").is_none() {
                    spec["revisionHistoryLimit"] = json!(10);
                }
            }
            ("apps", "StatefulSet") if obj["spec"].get("replicas").is_none() => {
                obj["spec"]["replicas"] = json!(1);
            }
            ("", "Service") => {
                if obj["spec"].get("type").is_none() {
                    obj["spec"]["type"] = json!("ClusterIP");
                }
                if obj["spec"]["clusterIP"].as_str().unwrap_or("").is_empty()
                    && obj["spec"]["type"] != "ExternalName"
                {
                    let n: u8 = rand::random::<u8>() % 250 + 2;
                    let m: u8 = rand::random::<u8>() % 250 + 2;
                    obj["spec"]["clusterIP"] = json!(format!("10.96.{n}.{m}"));
                }
            }
            ("", "Namespace") => {
                let name = obj["metadata"]["name"].clone();
                obj["metadata"]["labels"]["kubernetes.io/metadata.name"] = name;
                obj["spec"]["finalizers"] = json!(["kubernetes"]);
                if obj["status"]["phase"].is_null() {
                    obj["status"]["phase"] = json!("Active");
                }
            }
            ("", "PersistentVolumeClaim") if obj["status"]["phase"].is_null() => {
                obj["status"]["phase"] = json!("Pending");
            }
            _ => {}
        }
    }

    /// POST.
    pub(crate) fn create(
        &mut self,
        ty: &ResourceType,
        ns: &str,
        mut body: Value,
        opts: &WriteOpts,
    ) -> Result<Value, ApiError> {
        self.check_body(ty, ns, &body, None)?;
        if body["metadata"]["resourceVersion"]
            .as_str()
            .is_some_and(|s| !s.is_empty())
        {
            return Err(ApiError::new(
                500,
                "InternalError",
                "resourceVersion should not be set on objects to be created",
            ));
        }
        if body["metadata"]["name"].as_str().unwrap_or("").is_empty()
            && let Some(prefix) = body["metadata"]["generateName"].as_str()
        {
            const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
            let suffix: String = (0..5)
                .map(|_| ALPHABET[rand::random::<u8>() as usize % ALPHABET.len()] as char)
                .collect();
            body["metadata"]["name"] = json!(format!("{prefix}{suffix}"));
        }
        let name = body["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        if name.is_empty() {
            return Err(ApiError::invalid(
                &ty.qualified_kind(),
                "",
                "metadata.name",
                "FieldValueRequired",
                "Required value: name or generateName is required",
            ));
        }
        self.validate_name(ty, &name)?;
        self.check_namespace(ty, ns, &name)?;
        let key = Self::key(ty, ns, &name);
        if self.objects.contains_key(&key) {
            return Err(ApiError::already_exists(&ty.plural, &ty.group, &name));
        }
        Self::validate_size(ty, &name, &body)?;
        let mut obj = body;
        self.init_object(ty, ns, &mut obj);
        let set = fields::leaves(&obj, ty.crd.is_none(), ty.status_subresource);
        write_managed(
            &mut obj,
            vec![Managed {
                manager: opts.manager.clone(),
                operation: "Update".into(),
                api_version: ty.api_version(),
                time: now_rfc3339(),
                subresource: String::new(),
                set,
            }],
        );
        if opts.dry_run {
            return Ok(obj);
        }
        let stored = self.store(key, obj);
        self.after_write(ty, &stored);
        Ok(self.at_version(&stored, ty))
    }

    /// ConfigMaps and Secrets hold at most 1 MiB of data (keys and values,
    /// `binaryData` and Secret `data` decoded), as the API server's
    /// validation says; past it, 422 naming the whole object (`[]`) or the
    /// Secret's `data`.
    pub(super) fn validate_size(
        ty: &ResourceType,
        name: &str,
        obj: &Value,
    ) -> Result<(), ApiError> {
        const MAX: usize = 1024 * 1024;
        let size = |field: &str, encoded: bool| -> usize {
            obj[field].as_object().map_or(0, |m| {
                m.iter()
                    .map(|(k, v)| {
                        let v = v.as_str().unwrap_or_default();
                        k.len() + if encoded { decoded_len(v) } else { v.len() }
                    })
                    .sum()
            })
        };
        let (total, field) = match (ty.group.as_str(), ty.kind.as_str()) {
            ("", "ConfigMap") => (size("data", false) + size("binaryData", true), "[]"),
            ("", "Secret") => (size("data", true) + size("stringData", false), "data"),
            _ => return Ok(()),
        };
        if total > MAX {
            return Err(ApiError::invalid(
                &ty.qualified_kind(),
                name,
                field,
                "FieldValueTooLong",
                &format!("Too long: must have at most {MAX} bytes"),
            ));
        }
        Ok(())
    }

    pub(super) fn validate_name(&self, ty: &ResourceType, name: &str) -> Result<(), ApiError> {
        if !is_dns_subdomain(name)
            || (ty.kind == "Namespace" && (name.len() > 63 || name.contains('.')))
        {
            return Err(ApiError::invalid(
                &ty.qualified_kind(),
                name,
                "metadata.name",
                "FieldValueInvalid",
                &format!("Invalid value: \"{name}\": {SUBDOMAIN_MSG}"),
            ));
        }
        Ok(())
    }

    pub(super) fn init_object(&self, ty: &ResourceType, ns: &str, obj: &mut Value) {
        obj["apiVersion"] = json!(ty.api_version());
        obj["kind"] = json!(ty.kind);
        if ty.namespaced {
            obj["metadata"]["namespace"] = json!(ns);
        } else if let Some(m) = obj["metadata"].as_object_mut() {
            m.remove("namespace");
        }
        obj["metadata"]["uid"] = json!(uuid());
        obj["metadata"]["creationTimestamp"] = json!(now_rfc3339());
        if let Some(m) = obj["metadata"].as_object_mut() {
            m.remove("managedFields");
            m.remove("deletionTimestamp");
            m.remove("generation");
        }
        if ty.tracks_generation {
            obj["metadata"]["generation"] = json!(1);
        }
        if ty.status_subresource
            && ty.kind != "Namespace"
            && let Some(o) = obj.as_object_mut()
        {
            o.remove("status");
        }
        Self::defaults(ty, obj);
    }
}
