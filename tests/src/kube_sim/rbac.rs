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

/// What a request asks to do, in RBAC's terms.
#[derive(Debug)]
pub(crate) struct Attributes<'a> {
    pub verb: &'a str,
    pub group: &'a str,
    /// The plural, without the subresource.
    pub resource: &'a str,
    pub subresource: Option<&'a str>,
    /// Empty: the cluster scope.
    pub namespace: &'a str,
    pub name: Option<&'a str>,
}

impl Attributes<'_> {
    /// The verb of a request to a resource: `get`, `list` and `watch` for
    /// reads, `deletecollection` for a DELETE without a name.
    pub(crate) fn verb(method: &http::Method, named: bool, watch: bool) -> &'static str {
        match (method.as_str(), named) {
            ("GET" | "HEAD", _) if watch => "watch",
            ("GET" | "HEAD", true) => "get",
            ("GET" | "HEAD", false) => "list",
            ("POST", _) => "create",
            ("PUT", _) => "update",
            ("PATCH", _) => "patch",
            ("DELETE", true) => "delete",
            ("DELETE", false) => "deletecollection",
            _ => "unknown",
        }
    }

    fn full_resource(&self) -> String {
        match self.subresource {
            Some(s) => format!("{}/{s}", self.resource),
            None => self.resource.to_owned(),
        }
    }
}

/// Whether one PolicyRule allows the request.
fn allows(rule: &Value, a: &Attributes<'_>) -> bool {
    let has = |field: &str, want: &dyn Fn(&str) -> bool| {
        rule[field]
            .as_array()
            .is_some_and(|v| v.iter().filter_map(Value::as_str).any(want))
    };
    let resource = a.full_resource();
    let names_ok = match rule["resourceNames"].as_array() {
        Some(names) if !names.is_empty() => a.name.is_some_and(|n| names.iter().any(|x| x == n)),
        _ => true,
    };
    has("verbs", &|v| v == "*" || v == a.verb)
        && has("apiGroups", &|g| g == "*" || g == a.group)
        && has("resources", &|r| {
            r == "*"
                || r == resource
                || a.subresource
                    .is_some_and(|s| r == format!("{}/*", a.resource) || r == format!("*/{s}"))
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
/// namespace, or a ClusterRole (an aggregated one holds the rules of the
/// ClusterRoles its selectors match).
fn rules(state: &State, role_ref: &Value, binding_namespace: &str) -> Vec<Value> {
    let name = role_ref["name"].as_str().unwrap_or_default();
    let find = |plural: &str, ns: &str| {
        state
            .find_type(GROUP, "v1", plural)
            .and_then(|ty| state.get(&ty, ns, name).ok())
    };
    let role = match role_ref["kind"].as_str() {
        Some("Role") if !binding_namespace.is_empty() => find("roles", binding_namespace),
        Some("ClusterRole") => find("clusterroles", ""),
        _ => None,
    };
    let Some(role) = role else {
        return Vec::new();
    };
    let Some(selectors) = role["aggregationRule"]["clusterRoleSelectors"].as_array() else {
        return role["rules"].as_array().cloned().unwrap_or_default();
    };
    let selectors: Vec<LabelSelector> = selectors.iter().filter_map(selector).collect();
    let Some(ty) = state.find_type(GROUP, "v1", "clusterroles") else {
        return Vec::new();
    };
    state
        .list(&ty, None)
        .iter()
        .filter(|r| r["metadata"]["name"] != role["metadata"]["name"])
        .filter(|r| {
            let labels = r["metadata"]["labels"].as_object();
            selectors.iter().any(|s| s.matches(labels))
        })
        .flat_map(|r| r["rules"].as_array().cloned().unwrap_or_default())
        .collect()
}

/// Allowed, or the API server's 403 for it.
pub(crate) fn authorize(state: &State, who: &Account, a: &Attributes<'_>) -> Result<(), ApiError> {
    let bindings = |plural: &str, ns: Option<&str>| {
        state
            .find_type(GROUP, "v1", plural)
            .map(|ty| state.list(&ty, ns))
            .unwrap_or_default()
    };
    let mut granted = bindings("clusterrolebindings", None);
    if !a.namespace.is_empty() {
        granted.extend(bindings("rolebindings", Some(a.namespace)));
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
        a.resource.to_owned()
    } else {
        format!("{}.{}", a.resource, a.group)
    };
    let subject = match a.name {
        Some(n) => format!("{qualified} \"{n}\""),
        None => qualified,
    };
    let scope = if a.namespace.is_empty() {
        "at the cluster scope".to_owned()
    } else {
        format!("in the namespace \"{}\"", a.namespace)
    };
    let mut details = json!({"kind": a.resource});
    if let Some(n) = a.name {
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

    fn attrs<'a>(verb: &'a str, resource: &'a str, sub: Option<&'a str>) -> Attributes<'a> {
        Attributes {
            verb,
            group: "apps",
            resource,
            subresource: sub,
            namespace: "web",
            name: Some("api"),
        }
    }

    #[test]
    fn rules_match_verbs_groups_resources_subresources_and_names() {
        let rule =
            json!({"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get", "patch"]});
        assert!(allows(&rule, &attrs("get", "deployments", None)));
        assert!(!allows(&rule, &attrs("delete", "deployments", None)));
        assert!(!allows(&rule, &attrs("get", "statefulsets", None)));
        assert!(
            !allows(&rule, &attrs("get", "deployments", Some("scale"))),
            "a subresource is its own resource"
        );
        let sub = json!({"apiGroups": ["*"], "resources": ["deployments/*"], "verbs": ["*"]});
        assert!(allows(&sub, &attrs("update", "deployments", Some("scale"))));
        assert!(!allows(&sub, &attrs("update", "deployments", None)));
        let named = json!({"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get"], "resourceNames": ["api"]});
        assert!(allows(&named, &attrs("get", "deployments", None)));
        let mut other = attrs("get", "deployments", None);
        other.name = Some("db");
        assert!(!allows(&named, &other));
        other.name = None;
        assert!(!allows(&named, &other), "resourceNames never match a list");
    }

    #[test]
    fn verbs_follow_the_method_and_whether_an_object_is_named() {
        use http::Method;
        assert_eq!(Attributes::verb(&Method::GET, false, true), "watch");
        assert_eq!(Attributes::verb(&Method::GET, false, false), "list");
        assert_eq!(Attributes::verb(&Method::GET, true, false), "get");
        assert_eq!(Attributes::verb(&Method::PATCH, true, false), "patch");
        assert_eq!(
            Attributes::verb(&Method::DELETE, false, false),
            "deletecollection"
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
