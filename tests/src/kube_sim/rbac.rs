//! RBAC authorization, as the API server's RBAC authorizer decides it for
//! a service account: a token minted by
//! [`KubeSim::service_account_kubeconfig`](super::KubeSim::service_account_kubeconfig)
//! acts as `system:serviceaccount:NS:NAME` (groups `system:serviceaccounts`,
//! `system:serviceaccounts:NS`, `system:authenticated`), and each of its
//! requests is allowed only by a rule of a Role or ClusterRole bound to it
//! in the cluster's own RBAC objects; aggregated ClusterRoles hold the rules
//! of the ClusterRoles their selectors match (what the controller manager
//! writes into them). Any other token acts as a cluster administrator.
//! Discovery is open to every caller, as `system:discovery` makes it.

use serde_json::{Value, json};

use super::errors::ApiError;
use super::selector::LabelSelector;
use super::store::State;

const GROUP: &str = "rbac.authorization.k8s.io";

/// A service account the simulator minted a token for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Account {
    pub namespace: String,
    pub name: String,
}

impl Account {
    fn user(&self) -> String {
        format!("system:serviceaccount:{}:{}", self.namespace, self.name)
    }

    fn groups(&self) -> [String; 3] {
        [
            "system:serviceaccounts".to_owned(),
            format!("system:serviceaccounts:{}", self.namespace),
            "system:authenticated".to_owned(),
        ]
    }

    /// Whether a binding's subject names this account.
    fn is(&self, subject: &Value, binding_namespace: &str) -> bool {
        let name = subject["name"].as_str().unwrap_or_default();
        match subject["kind"].as_str() {
            Some("ServiceAccount") => {
                let ns = subject["namespace"].as_str().unwrap_or(binding_namespace);
                name == self.name && ns == self.namespace
            }
            Some("User") => name == self.user(),
            Some("Group") => self.groups().iter().any(|g| g == name),
            _ => false,
        }
    }
}

/// What a request asks to do, in RBAC's terms (the API server's
/// `RequestInfo`, read from the path alone: whether the type is served
/// does not matter, so an unserved type is forbidden before it is unknown).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Attributes {
    pub verb: &'static str,
    pub group: String,
    /// The plural, without the subresource.
    pub resource: String,
    pub subresource: Option<String>,
    /// Empty: the cluster scope. A Namespace's own requests are in it.
    pub namespace: String,
    pub name: Option<String>,
}

impl Attributes {
    /// A request to `rest` (what follows `/api/v1` or `/apis/GROUP/VERSION`)
    /// of `group`, with its query.
    pub(crate) fn of(
        method: &http::Method,
        group: &str,
        rest: &[&str],
        q: &std::collections::BTreeMap<String, String>,
    ) -> Attributes {
        let (namespace, parts): (String, Vec<&str>) = match rest {
            ["namespaces", ns, next, tail @ ..] if !matches!(*next, "status" | "finalize") => (
                (*ns).to_owned(),
                std::iter::once(*next).chain(tail.iter().copied()).collect(),
            ),
            ["namespaces", ns, ..] => ((*ns).to_owned(), rest.to_vec()),
            _ => (String::new(), rest.to_vec()),
        };
        let named = parts.len() > 1;
        let verb = match (method.as_str(), named) {
            ("GET" | "HEAD", true) => "get",
            ("GET" | "HEAD", false) if q.get("watch").is_some_and(|w| w == "true" || w == "1") => {
                "watch"
            }
            ("GET" | "HEAD", false) => "list",
            ("POST", _) => "create",
            ("PUT", _) => "update",
            ("PATCH", _) => "patch",
            ("DELETE", true) => "delete",
            ("DELETE", false) => "deletecollection",
            _ => "unknown",
        };
        // A list or watch of one object by name is about that object.
        let name = if named {
            parts.get(1).map(|s| (*s).to_owned())
        } else {
            q.get("fieldSelector")
                .and_then(|f| f.split(',').find_map(|r| r.strip_prefix("metadata.name=")))
                .map(str::to_owned)
        };
        Attributes {
            verb,
            group: group.to_owned(),
            resource: parts.first().map(|s| (*s).to_owned()).unwrap_or_default(),
            subresource: parts.get(2).map(|s| (*s).to_owned()),
            namespace,
            name,
        }
    }

    /// The same request with another verb (an apply that creates is also a
    /// create).
    pub(crate) fn as_verb(&self, verb: &'static str) -> Attributes {
        Attributes {
            verb,
            ..self.clone()
        }
    }

    fn full_resource(&self) -> String {
        match &self.subresource {
            Some(s) => format!("{}/{s}", self.resource),
            None => self.resource.clone(),
        }
    }
}

/// Whether one PolicyRule allows the request.
fn allows(rule: &Value, a: &Attributes) -> bool {
    let has = |field: &str, want: &dyn Fn(&str) -> bool| {
        rule[field]
            .as_array()
            .is_some_and(|v| v.iter().filter_map(Value::as_str).any(want))
    };
    let resource = a.full_resource();
    let names_ok = match rule["resourceNames"].as_array() {
        Some(names) if !names.is_empty() => a
            .name
            .as_ref()
            .is_some_and(|n| names.iter().any(|x| x == n.as_str())),
        _ => true,
    };
    has("verbs", &|v| v == "*" || v == a.verb)
        && has("apiGroups", &|g| g == "*" || g == a.group)
        // `*`, the resource (with its subresource), or `*/SUBRESOURCE`.
        && has("resources", &|r| {
            r == "*"
                || r == resource
                || a
                    .subresource
                    .as_ref()
                    .is_some_and(|s| r.strip_prefix("*/") == Some(s.as_str()))
        })
        && names_ok
}

/// A label selector object (`matchLabels`, `matchExpressions`) as the
/// selector syntax the simulator parses.
fn selector(s: &Value) -> Option<LabelSelector> {
    let mut parts: Vec<String> = s["matchLabels"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
        .collect();
    for e in s["matchExpressions"].as_array().into_iter().flatten() {
        let key = e["key"].as_str()?;
        let values = e["values"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect::<Vec<_>>()
            .join(",");
        parts.push(match e["operator"].as_str()? {
            "In" => format!("{key} in ({values})"),
            "NotIn" => format!("{key} notin ({values})"),
            "Exists" => key.to_owned(),
            "DoesNotExist" => format!("!{key}"),
            _ => return None,
        });
    }
    LabelSelector::parse(&parts.join(",")).ok()
}

/// The rules a binding's `roleRef` grants: a Role in the binding's
/// namespace, or a ClusterRole.
fn rules(state: &State, role_ref: &Value, binding_namespace: &str) -> Vec<Value> {
    let name = role_ref["name"].as_str().unwrap_or_default();
    let find = |plural: &str, ns: &str| {
        state
            .find_type(GROUP, "v1", plural)
            .and_then(|ty| state.get(&ty, ns, name).ok())
    };
    match role_ref["kind"].as_str() {
        Some("Role") if !binding_namespace.is_empty() => find("roles", binding_namespace)
            .and_then(|r| r["rules"].as_array().cloned())
            .unwrap_or_default(),
        Some("ClusterRole") => find("clusterroles", "")
            .map(|r| cluster_role_rules(state, &r, &mut Vec::new()))
            .unwrap_or_default(),
        _ => Vec::new(),
    }
}

/// A ClusterRole's rules; an aggregated one's are those of the ClusterRoles
/// its selectors match, aggregated ones among them included (`seen`: the
/// roles on the way, so that a cycle ends).
fn cluster_role_rules(state: &State, role: &Value, seen: &mut Vec<String>) -> Vec<Value> {
    let Some(selectors) = role["aggregationRule"]["clusterRoleSelectors"].as_array() else {
        return role["rules"].as_array().cloned().unwrap_or_default();
    };
    seen.push(
        role["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    );
    let selectors: Vec<LabelSelector> = selectors.iter().filter_map(selector).collect();
    let Some(ty) = state.find_type(GROUP, "v1", "clusterroles") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for r in state.list(&ty, None) {
        let name = r["metadata"]["name"].as_str().unwrap_or_default();
        let labels = r["metadata"]["labels"].as_object();
        if !seen.iter().any(|s| s == name) && selectors.iter().any(|s| s.matches(labels)) {
            out.extend(cluster_role_rules(state, &r, seen));
        }
    }
    out
}

/// Allowed, or the API server's 403 for it.
pub(crate) fn authorize(state: &State, who: &Account, a: &Attributes) -> Result<(), ApiError> {
    let bindings = |plural: &str, ns: Option<&str>| {
        state
            .find_type(GROUP, "v1", plural)
            .map(|ty| state.list(&ty, ns))
            .unwrap_or_default()
    };
    let mut granted = bindings("clusterrolebindings", None);
    if !a.namespace.is_empty() {
        granted.extend(bindings("rolebindings", Some(&a.namespace)));
    }
    let allowed = granted.iter().any(|b| {
        let ns = b["metadata"]["namespace"].as_str().unwrap_or_default();
        b["subjects"]
            .as_array()
            .is_some_and(|s| s.iter().any(|s| who.is(s, ns)))
            && rules(state, &b["roleRef"], ns).iter().any(|r| allows(r, a))
    });
    if allowed {
        return Ok(());
    }
    let qualified = if a.group.is_empty() {
        a.resource.clone()
    } else {
        format!("{}.{}", a.resource, a.group)
    };
    let subject = match &a.name {
        Some(n) => format!("{qualified} \"{n}\""),
        None => qualified,
    };
    let scope = if a.namespace.is_empty() {
        "at the cluster scope".to_owned()
    } else {
        format!("in the namespace \"{}\"", a.namespace)
    };
    let mut details = json!({"kind": a.resource});
    if let Some(n) = &a.name {
        details["name"] = json!(n);
    }
    if !a.group.is_empty() {
        details["group"] = json!(a.group);
    }
    Err(ApiError::new(
        403,
        "Forbidden",
        format!(
            "{subject} is forbidden: User \"{}\" cannot {} resource \"{}\" in API group \"{}\" {scope}",
            who.user(),
            a.verb,
            a.full_resource(),
            a.group
        ),
    )
    .with_details(details))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Method;
    use std::collections::BTreeMap;

    fn attrs(method: Method, path: &str, query: &[(&str, &str)]) -> Attributes {
        let rest: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        let q: BTreeMap<String, String> = query
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Attributes::of(&method, "apps", &rest, &q)
    }

    #[test]
    fn request_attributes_follow_the_path_method_and_query() {
        let a = attrs(Method::PATCH, "namespaces/web/deployments/api/status", &[]);
        assert_eq!(
            (a.verb, a.namespace.as_str(), a.resource.as_str()),
            ("patch", "web", "deployments")
        );
        assert_eq!(
            (a.name.as_deref(), a.subresource.as_deref()),
            (Some("api"), Some("status"))
        );
        let a = attrs(Method::GET, "deployments", &[("watch", "true")]);
        assert_eq!((a.verb, a.namespace.as_str()), ("watch", ""));
        let a = attrs(
            Method::GET,
            "namespaces/web/deployments",
            &[("fieldSelector", "metadata.name=api")],
        );
        assert_eq!((a.verb, a.name.as_deref()), ("list", Some("api")));
        let a = attrs(
            Method::GET,
            "namespaces/web/deployments/api",
            &[("watch", "1")],
        );
        assert_eq!(a.verb, "get", "a named GET is a get");
        let a = attrs(Method::DELETE, "namespaces/web/deployments", &[]);
        assert_eq!(a.verb, "deletecollection");
        // A Namespace's own requests are in that namespace.
        let a = attrs(Method::GET, "namespaces/web", &[]);
        assert_eq!(
            (a.resource.as_str(), a.namespace.as_str(), a.name.as_deref()),
            ("namespaces", "web", Some("web"))
        );
        let a = attrs(Method::PUT, "namespaces/web/finalize", &[]);
        assert_eq!(
            (a.resource.as_str(), a.subresource.as_deref()),
            ("namespaces", Some("finalize"))
        );
    }

    #[test]
    fn rules_match_verbs_groups_resources_subresources_and_names() {
        let mut a = attrs(Method::GET, "namespaces/web/deployments/api", &[]);
        let rule =
            json!({"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get", "patch"]});
        assert!(allows(&rule, &a));
        assert!(!allows(&rule, &a.as_verb("delete")));
        let other_kind =
            json!({"apiGroups": ["apps"], "resources": ["statefulsets"], "verbs": ["get"]});
        assert!(!allows(&other_kind, &a));
        let scale = attrs(Method::GET, "namespaces/web/deployments/api/scale", &[]);
        assert!(!allows(&rule, &scale), "a subresource is its own resource");
        let any_scale = json!({"apiGroups": ["*"], "resources": ["*/scale"], "verbs": ["*"]});
        assert!(allows(&any_scale, &scale));
        assert!(!allows(&any_scale, &a));
        let all_subs = json!({"apiGroups": ["*"], "resources": ["deployments/*"], "verbs": ["*"]});
        assert!(!allows(&all_subs, &scale), "RBAC has no RESOURCE/* form");
        let named = json!({"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get", "list"], "resourceNames": ["api"]});
        assert!(allows(&named, &a));
        a.name = Some("db".into());
        assert!(!allows(&named, &a));
        let list = attrs(Method::GET, "namespaces/web/deployments", &[]);
        assert!(
            !allows(&named, &list),
            "resourceNames never match a whole list"
        );
    }

    #[test]
    fn selectors_cover_labels_and_expressions() {
        let s = selector(&json!({"matchLabels": {"a": "1"}, "matchExpressions": [{"key": "b", "operator": "In", "values": ["x", "y"]}]})).unwrap();
        let labels = json!({"a": "1", "b": "y"});
        assert!(s.matches(labels.as_object()));
        let labels = json!({"a": "1", "b": "z"});
        assert!(!s.matches(labels.as_object()));
    }
}
