//! Discovery documents: `/version`, `/api`, `/apis`, the per-group and
//! per-version resource lists, and aggregated discovery (v2).

use http::{Response, header};
use serde_json::{Value, json};

use super::registry::{ResourceType, version_priority};
use super::server::{Body, Inner, json_response};
use super::store::State;

pub(super) fn discovery(inner: &Inner, segs: &[&str]) -> Option<Response<Body>> {
    let state = inner.state.lock().unwrap();
    let v = match segs {
        ["version"] => json!({
            "major": "1", "minor": "32", "gitVersion": "v1.32.0-kube-sim", "gitCommit": "kube-sim",
            "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z", "goVersion": "go1.23",
            "compiler": "gc", "platform": "linux/amd64"
        }),
        ["api"] => json!({
            "kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": inner.addr.to_string()}]
        }),
        ["api", "v1"] => json!({
            "kind": "APIResourceList", "groupVersion": "v1",
            "resources": state.types.iter().filter(|t| t.group.is_empty()).flat_map(ResourceType::discovery).collect::<Vec<_>>()
        }),
        ["apis"] => {
            let groups: Vec<Value> = groups(&state)
                .into_iter()
                .map(|(g, vs)| group_json(&g, &vs))
                .collect();
            json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
        }
        ["apis", g] => {
            let (name, vs) = groups(&state).into_iter().find(|(n, _)| n == g)?;
            let mut v = group_json(&name, &vs);
            v["kind"] = json!("APIGroup");
            v["apiVersion"] = json!("v1");
            v
        }
        ["apis", g, ver] => {
            let res: Vec<Value> = state
                .types
                .iter()
                .filter(|t| t.group == *g && t.version == *ver)
                .flat_map(ResourceType::discovery)
                .collect();
            if res.is_empty() {
                return None;
            }
            json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": format!("{g}/{ver}"), "resources": res})
        }
        _ => return None,
    };
    Some(json_response(200, &v))
}

/// Aggregated discovery (`/api`, `/apis` with the apidiscovery Accept type),
/// as kubectl 1.32 and `Discovery::run_aggregated` ask for it.
pub(super) fn aggregated_discovery(inner: &Inner, segs: &[&str]) -> Option<Response<Body>> {
    let state = inner.state.lock().unwrap();
    let group_items = |names: Vec<(String, Vec<String>)>| -> Vec<Value> {
        names
            .into_iter()
            .map(|(g, versions)| {
                let versions: Vec<Value> = versions
                    .iter()
                    .map(|v| {
                        let resources: Vec<Value> = state
                            .types
                            .iter()
                            .filter(|t| t.group == g && t.version == *v)
                            .map(ResourceType::aggregated)
                            .collect();
                        json!({"version": v, "freshness": "Current", "resources": resources})
                    })
                    .collect();
                json!({"metadata": {"name": g}, "versions": versions})
            })
            .collect()
    };
    let items = match segs {
        ["api"] => group_items(vec![(String::new(), vec!["v1".to_owned()])]),
        ["apis"] => group_items(groups(&state)),
        _ => return None,
    };
    let body = json!({"kind": "APIGroupDiscoveryList", "apiVersion": "apidiscovery.k8s.io/v2", "metadata": {}, "items": items});
    let mut r = json_response(200, &body);
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static(
            "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList",
        ),
    );
    r.headers_mut()
        .insert(header::VARY, http::HeaderValue::from_static("Accept"));
    Some(r)
}

pub(super) fn groups(state: &State) -> Vec<(String, Vec<String>)> {
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    for t in state.types.iter().filter(|t| !t.group.is_empty()) {
        match out.iter_mut().find(|(g, _)| *g == t.group) {
            Some((_, vs)) => {
                if !vs.contains(&t.version) {
                    vs.push(t.version.clone());
                }
            }
            None => out.push((t.group.clone(), vec![t.version.clone()])),
        }
    }
    for (_, vs) in &mut out {
        vs.sort_by_key(|v| std::cmp::Reverse(version_priority(v)));
    }
    out
}

pub(super) fn group_json(name: &str, versions: &[String]) -> Value {
    let vs: Vec<Value> = versions
        .iter()
        .map(|v| json!({"groupVersion": format!("{name}/{v}"), "version": v}))
        .collect();
    json!({"name": name, "versions": vs, "preferredVersion": vs[0]})
}
