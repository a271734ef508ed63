//! kube-sim conformance: the real `kube` client (and `kubectl`) against
//! kube-sim, asserting the documented behaviour of kube-apiserver 1.32 for
//! everything the agent relies on, including the error cases.

use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use kube::api::{
    Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams, WatchEvent,
    WatchParams,
};
use kube::core::{ApiResource, GroupVersionKind};
use kube::discovery::Discovery;
use serde_json::{Value, json};
use unitsync_tests::kube_sim::{FAIL_ANNOTATION, KubeSim, SimOptions};
use unitsync_tests::{until, within};

fn init() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

async fn sim() -> (KubeSim, kube::Client) {
    init();
    let sim = KubeSim::start(SimOptions::default())
        .await
        .expect("kube-sim starts");
    let client = within("client", sim.client()).await.expect("client");
    (sim, client)
}

fn api(
    client: &kube::Client,
    gvk: (&str, &str, &str),
    plural: &str,
    ns: Option<&str>,
) -> Api<DynamicObject> {
    let ar = ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(gvk.0, gvk.1, gvk.2), plural);
    match ns {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &ar),
        None => Api::all_with(client.clone(), &ar),
    }
}

fn cms(client: &kube::Client, ns: &str) -> Api<DynamicObject> {
    api(client, ("", "v1", "ConfigMap"), "configmaps", Some(ns))
}

fn obj(v: Value) -> DynamicObject {
    serde_json::from_value(v).expect("object")
}

async fn apply(
    api: &Api<DynamicObject>,
    manager: &str,
    v: Value,
    force: bool,
) -> Result<DynamicObject, kube::Error> {
    let name = v["metadata"]["name"].as_str().unwrap().to_owned();
    let mut pp = PatchParams::apply(manager);
    pp.force = force;
    within("apply", api.patch(&name, &pp, &Patch::Apply(v))).await
}

async fn namespace(client: &kube::Client, name: &str) {
    let nss = api(client, ("", "v1", "Namespace"), "namespaces", None);
    apply(
        &nss,
        "test",
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}),
        false,
    )
    .await
    .unwrap();
}

fn api_err(e: kube::Error) -> kube::core::Status {
    match e {
        kube::Error::Api(s) => *s,
        other => panic!("expected an API error, got {other:?}"),
    }
}

fn cm(name: &str, data: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": "apps"}, "data": data})
}

#[tokio::test]
async fn discovery_lists_builtin_kinds_with_names_scopes_and_verbs() {
    let (_sim, client) = sim().await;
    let v = within("version", client.apiserver_version()).await.unwrap();
    assert_eq!((v.major.as_str(), v.minor.as_str()), ("1", "32"));
    let d = within("discovery", Discovery::new(client.clone()).run())
        .await
        .unwrap();
    let find = |g: &str, k: &str| {
        d.groups()
            .flat_map(|g| g.recommended_resources())
            .find(|(ar, _)| ar.group == g && ar.kind == k)
    };
    for (g, k, plural, namespaced) in [
        ("", "Namespace", "namespaces", false),
        ("", "ConfigMap", "configmaps", true),
        ("apps", "Deployment", "deployments", true),
        (
            "rbac.authorization.k8s.io",
            "ClusterRole",
            "clusterroles",
            false,
        ),
        (
            "apiextensions.k8s.io",
            "CustomResourceDefinition",
            "customresourcedefinitions",
            false,
        ),
        (
            "autoscaling",
            "HorizontalPodAutoscaler",
            "horizontalpodautoscalers",
            true,
        ),
        (
            "policy",
            "PodDisruptionBudget",
            "poddisruptionbudgets",
            true,
        ),
        (
            "networking.k8s.io",
            "NetworkPolicy",
            "networkpolicies",
            true,
        ),
    ] {
        let (ar, caps) = find(g, k).unwrap_or_else(|| panic!("{g}/{k} discovered"));
        assert_eq!(ar.plural, plural);
        assert_eq!(
            caps.scope == kube::discovery::Scope::Namespaced,
            namespaced,
            "{k}"
        );
        assert!(caps.supports_operation(kube::discovery::verbs::PATCH));
        assert!(caps.supports_operation(kube::discovery::verbs::WATCH));
    }
    // Aggregated discovery (apidiscovery.k8s.io/v2) gives the same picture.
    let agg = within(
        "aggregated discovery",
        Discovery::new(client.clone()).run_aggregated(),
    )
    .await
    .unwrap();
    let (ar, caps) = agg
        .groups()
        .flat_map(|g| g.recommended_resources())
        .find(|(ar, _)| ar.group == "apps" && ar.kind == "Deployment")
        .expect("deployments in aggregated discovery");
    assert_eq!(
        (
            ar.plural.as_str(),
            caps.scope == kube::discovery::Scope::Namespaced
        ),
        ("deployments", true)
    );
    assert!(
        agg.groups()
            .flat_map(|g| g.recommended_resources())
            .any(|(ar, _)| ar.group.is_empty() && ar.kind == "ConfigMap")
    );
    // The raw list carries short names and the status subresource.
    let raw: Value = within(
        "raw discovery",
        client.request(
            http::Request::get("/apis/apps/v1")
                .body(Vec::new())
                .unwrap(),
        ),
    )
    .await
    .unwrap();
    let deploy = raw["resources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "deployments")
        .unwrap();
    assert_eq!(deploy["shortNames"], json!(["deploy"]));
    assert!(
        raw["resources"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["name"] == "deployments/status")
    );
}

#[tokio::test]
async fn scope_rules_and_error_statuses() {
    let (_sim, client) = sim().await;
    // A namespaced object in a missing namespace: NotFound on the namespace.
    let e = api_err(apply(&cms(&client, "nope"), "unitsync", json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "a", "namespace": "nope"}}), false).await.unwrap_err());
    assert_eq!(
        (e.code, e.reason.as_str(), e.message.as_str()),
        (404, "NotFound", "namespaces \"nope\" not found")
    );
    namespace(&client, "apps").await;
    // Missing object.
    let e = api_err(
        within("get", cms(&client, "apps").get("missing"))
            .await
            .unwrap_err(),
    );
    assert_eq!(
        (e.code, e.reason.as_str(), e.message.as_str()),
        (404, "NotFound", "configmaps \"missing\" not found")
    );
    // Invalid name: 422 with the real message.
    let e = api_err(
        within(
            "create",
            cms(&client, "apps").create(&PostParams::default(), &obj(cm("Bad_Name", json!({})))),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!((e.code, e.reason.as_str()), (422, "Invalid"));
    assert!(e.message.starts_with("ConfigMap \"Bad_Name\" is invalid: metadata.name: Invalid value: \"Bad_Name\": a lowercase RFC 1123 subdomain"), "{}", e.message);
    // Already exists.
    within(
        "create",
        cms(&client, "apps").create(&PostParams::default(), &obj(cm("a", json!({})))),
    )
    .await
    .unwrap();
    let e = api_err(
        within(
            "create again",
            cms(&client, "apps").create(&PostParams::default(), &obj(cm("a", json!({})))),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!(
        (e.code, e.reason.as_str(), e.message.as_str()),
        (409, "AlreadyExists", "configmaps \"a\" already exists")
    );
    // Cluster-scoped kinds have no namespaced path: plain 404 page.
    let raw = within(
        "raw",
        client.request_text(
            http::Request::get("/api/v1/namespaces/apps/namespaces/x")
                .body(Vec::new())
                .unwrap(),
        ),
    )
    .await;
    assert!(raw.is_err());
    // Apply without fieldManager is 422 (kube-apiserver enforces it, not clients).
    let req = http::Request::patch("/api/v1/namespaces/apps/configmaps/a")
        .header("content-type", "application/apply-patch+yaml")
        .body(serde_json::to_vec(&cm("a", json!({}))).unwrap())
        .unwrap();
    let e = api_err(
        within("apply without manager", client.request::<Value>(req))
            .await
            .unwrap_err(),
    );
    assert_eq!(e.code, 422);
    assert_eq!(
        e.message,
        "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch"
    );
    // Deleting protected namespaces is forbidden.
    let nss = api(&client, ("", "v1", "Namespace"), "namespaces", None);
    let e = api_err(
        within(
            "delete default",
            nss.delete("default", &DeleteParams::default()),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!((e.code, e.reason.as_str()), (403, "Forbidden"));
}

#[tokio::test]
async fn metadata_generation_and_optimistic_concurrency() {
    let (_sim, client) = sim().await;
    namespace(&client, "apps").await;
    let cms = cms(&client, "apps");
    let a = apply(&cms, "unitsync", cm("a", json!({"k": "1"})), false)
        .await
        .unwrap();
    let uid = a.metadata.uid.clone().unwrap();
    assert_eq!(uid.len(), 36);
    assert!(a.metadata.creation_timestamp.is_some());
    assert_eq!(
        a.metadata.generation, None,
        "ConfigMaps do not track generation"
    );
    let rv1: u64 = a
        .metadata
        .resource_version
        .clone()
        .unwrap()
        .parse()
        .unwrap();
    // Re-applying the same configuration is a no-op: same resourceVersion.
    let again = apply(&cms, "unitsync", cm("a", json!({"k": "1"})), false)
        .await
        .unwrap();
    assert_eq!(again.metadata.resource_version, a.metadata.resource_version);
    // Versions increase across objects (one cluster-wide counter).
    let b = apply(&cms, "unitsync", cm("b", json!({})), false)
        .await
        .unwrap();
    assert!(b.metadata.resource_version.unwrap().parse::<u64>().unwrap() > rv1);
    // A PUT with a stale resourceVersion conflicts.
    let mut stale = a.clone();
    stale.data["data"] = json!({"k": "2"});
    within("update", cms.replace("a", &PostParams::default(), &stale))
        .await
        .unwrap();
    let e = api_err(
        within(
            "stale update",
            cms.replace("a", &PostParams::default(), &stale),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!((e.code, e.reason.as_str()), (409, "Conflict"));
    assert!(e.message.contains("the object has been modified; please apply your changes to the latest version and try again"));

    // Deployments: generation 1, bumped once per spec change, not on a no-op.
    let deps = api(
        &client,
        ("apps", "v1", "Deployment"),
        "deployments",
        Some("apps"),
    );
    let d = |image: &str| {
        json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web", "namespace": "apps"},
        "spec": {"selector": {"matchLabels": {"app": "web"}}, "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"name": "app", "image": image}]}}}})
    };
    let generation = |image: &'static str| {
        let deps = &deps;
        async move {
            apply(deps, "unitsync", d(image), false)
                .await
                .unwrap()
                .metadata
                .generation
        }
    };
    assert_eq!(generation("nginx:1").await, Some(1));
    assert_eq!(
        generation("nginx:1").await,
        Some(1),
        "no change, same generation"
    );
    assert_eq!(generation("nginx:2").await, Some(2));
}

/// Server-side apply field ownership: "Conflicts" and "Merge strategy" of
/// https://kubernetes.io/docs/reference/using-api/server-side-apply/ .
#[tokio::test]
async fn server_side_apply_ownership_removal_and_conflicts() {
    let (_sim, client) = sim().await;
    namespace(&client, "apps").await;
    let cms = cms(&client, "apps");
    let created = apply(
        &cms,
        "unitsync",
        cm("a", json!({"x": "1", "y": "2"})),
        false,
    )
    .await
    .unwrap();
    let mf = created.metadata.managed_fields.clone().unwrap();
    assert_eq!(mf.len(), 1);
    assert_eq!(
        (mf[0].manager.as_deref(), mf[0].operation.as_deref()),
        (Some("unitsync"), Some("Apply"))
    );
    let fields = serde_json::to_value(&mf[0].fields_v1).unwrap();
    assert_eq!(fields, json!({"f:data": {"f:x": {}, "f:y": {}}}));

    // "If a field is removed from the configuration by the only manager
    // that owns it, the field is removed" (Merge strategy).
    let a = apply(&cms, "unitsync", cm("a", json!({"x": "1"})), false)
        .await
        .unwrap();
    assert_eq!(a.data["data"], json!({"x": "1"}));

    // Another applier setting the same value shares ownership: no conflict.
    apply(&cms, "other", cm("a", json!({"x": "1"})), false)
        .await
        .unwrap();
    // Removing it from unitsync's config keeps it: "other" still owns it.
    let a = apply(&cms, "unitsync", cm("a", json!({"z": "3"})), false)
        .await
        .unwrap();
    assert_eq!(a.data["data"], json!({"x": "1", "z": "3"}));

    // A different value owned by another manager is a 409 naming field and manager.
    let e = api_err(
        apply(
            &cms,
            "unitsync",
            cm("a", json!({"x": "9", "z": "3"})),
            false,
        )
        .await
        .unwrap_err(),
    );
    assert_eq!((e.code, e.reason.as_str()), (409, "Conflict"));
    assert_eq!(
        e.message,
        "Apply failed with 1 conflict: conflict with \"other\": .data.x"
    );
    let causes = e.details.unwrap().causes;
    assert_eq!(causes.len(), 1);
    assert_eq!(
        (causes[0].reason.as_str(), causes[0].field.as_str()),
        ("FieldManagerConflict", ".data.x")
    );

    // An Update manager (kubectl edit, a controller) conflicts the same way.
    let patch = Patch::Merge(json!({"data": {"z": "edited"}}));
    within(
        "merge patch",
        cms.patch(
            "a",
            &PatchParams {
                field_manager: Some("editor".into()),
                ..PatchParams::default()
            },
            &patch,
        ),
    )
    .await
    .unwrap();
    let e = api_err(
        apply(&cms, "unitsync", cm("a", json!({"z": "3"})), false)
            .await
            .unwrap_err(),
    );
    assert!(
        e.message
            .contains("conflict with \"editor\" using v1: .data.z"),
        "{}",
        e.message
    );

    // force takes the fields over.
    let a = apply(&cms, "unitsync", cm("a", json!({"x": "9", "z": "3"})), true)
        .await
        .unwrap();
    assert_eq!(a.data["data"], json!({"x": "9", "z": "3"}));
    let owners: Vec<(String, Value)> = a
        .metadata
        .managed_fields
        .unwrap()
        .into_iter()
        .map(|m| {
            (
                m.manager.unwrap(),
                serde_json::to_value(m.fields_v1).unwrap(),
            )
        })
        .collect();
    let unitsync = owners.iter().find(|(m, _)| m == "unitsync").unwrap();
    assert_eq!(unitsync.1, json!({"f:data": {"f:x": {}, "f:z": {}}}));
    assert!(
        owners
            .iter()
            .all(|(m, f)| m == "unitsync" || f.pointer("/f:data/f:x").is_none()),
        "{owners:?}"
    );

    // List-map merging: containers are keyed by name.
    let deps = api(
        &client,
        ("apps", "v1", "Deployment"),
        "deployments",
        Some("apps"),
    );
    let d = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web", "namespace": "apps"},
        "spec": {"selector": {"matchLabels": {"app": "web"}}, "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"name": "app", "image": "nginx:1"}]}}}});
    apply(&deps, "unitsync", d, false).await.unwrap();
    let sidecar = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web", "namespace": "apps"},
        "spec": {"template": {"spec": {"containers": [{"name": "sidecar", "image": "envoy"}]}}}});
    let merged = apply(&deps, "mesh", sidecar, false).await.unwrap();
    let names: Vec<&str> = merged.data["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
    let conflict = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web", "namespace": "apps"},
        "spec": {"template": {"spec": {"containers": [{"name": "app", "image": "nginx:2"}]}}}});
    let e = api_err(apply(&deps, "mesh", conflict, false).await.unwrap_err());
    assert!(
        e.message
            .contains(".spec.template.spec.containers[name=\"app\"].image"),
        "{}",
        e.message
    );

    // dryRun=All stores nothing.
    let before = within("get", cms.get("a")).await.unwrap();
    let mut pp = PatchParams::apply("unitsync");
    pp.dry_run = true;
    let dry = within(
        "dry run",
        cms.patch(
            "a",
            &pp,
            &Patch::Apply(cm("a", json!({"x": "9", "z": "3", "new": "v"}))),
        ),
    )
    .await
    .unwrap();
    assert_eq!(dry.data["data"]["new"], "v");
    assert_eq!(
        within("get", cms.get("a"))
            .await
            .unwrap()
            .metadata
            .resource_version,
        before.metadata.resource_version
    );
}

#[tokio::test]
async fn json_patch_strategic_patch_and_finalizers() {
    let (_sim, client) = sim().await;
    namespace(&client, "apps").await;
    let cms = cms(&client, "apps");
    apply(&cms, "unitsync", cm("a", json!({"x": "1"})), false)
        .await
        .unwrap();
    let req = http::Request::patch("/api/v1/namespaces/apps/configmaps/a")
        .header("content-type", "application/json-patch+json")
        .body(serde_json::to_vec(&json!([{"op": "add", "path": "/data/y", "value": "2"}, {"op": "remove", "path": "/data/x"}])).unwrap())
        .unwrap();
    let r: Value = within("json patch", client.request(req)).await.unwrap();
    assert_eq!(r["data"], json!({"y": "2"}));
    // A failed `test` rejects the whole patch (422), the earlier operation
    // included.
    let failing = json!([{"op": "add", "path": "/data/w", "value": "9"}, {"op": "test", "path": "/data/y", "value": "nope"}]);
    let e = api_err(
        within(
            "failing json patch",
            cms.patch(
                "a",
                &PatchParams::default(),
                &Patch::<Value>::Json(serde_json::from_value(failing).unwrap()),
            ),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!(e.code, 422, "{e:?}");
    let after = within("get", cms.get("a")).await.unwrap();
    assert_eq!(
        after.data["data"],
        json!({"y": "2"}),
        "nothing of the patch applied"
    );
    let r = within(
        "strategic",
        cms.patch(
            "a",
            &PatchParams::default(),
            &Patch::Strategic(json!({"data": {"z": "3", "y": null}})),
        ),
    )
    .await
    .unwrap();
    assert_eq!(r.data["data"], json!({"z": "3"}));

    // Finalizers hold deletion: deletionTimestamp set, object still there.
    apply(&cms, "unitsync", json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "f", "namespace": "apps", "finalizers": ["example.com/hold"]}}), false).await.unwrap();
    let d = within("delete", cms.delete("f", &DeleteParams::default()))
        .await
        .unwrap();
    let held = d
        .left()
        .expect("the object comes back while finalizers remain");
    assert!(held.metadata.deletion_timestamp.is_some());
    assert!(within("get", cms.get_opt("f")).await.unwrap().is_some());
    // New finalizers cannot be added while deleting.
    let e = api_err(
        within(
            "add finalizer",
            cms.patch(
                "f",
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"finalizers": ["example.com/hold", "more"]}})),
            ),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!(e.code, 422);
    within(
        "clear finalizers",
        cms.patch(
            "f",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": null}})),
        ),
    )
    .await
    .unwrap();
    assert!(within("get", cms.get_opt("f")).await.unwrap().is_none());
}

#[tokio::test]
async fn deletion_propagation_and_garbage_collection() {
    let (_sim, client) = sim().await;
    namespace(&client, "apps").await;
    let cms = cms(&client, "apps");
    let owner_of = |name: &str, owner: &DynamicObject| {
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": "apps", "ownerReferences": [{
            "apiVersion": "v1", "kind": "ConfigMap", "name": owner.metadata.name, "uid": owner.metadata.uid, "blockOwnerDeletion": true}]}})
    };
    // Background: owner goes at once, dependents follow.
    let o = apply(&cms, "t", cm("bg-owner", json!({})), false)
        .await
        .unwrap();
    apply(&cms, "t", owner_of("bg-dep", &o), false)
        .await
        .unwrap();
    within(
        "delete",
        cms.delete("bg-owner", &DeleteParams::background()),
    )
    .await
    .unwrap();
    until("background dependent collected", || async {
        cms.get_opt("bg-dep").await.unwrap().is_none()
    })
    .await;

    // Foreground: the owner waits with foregroundDeletion until dependents are gone.
    let o = apply(&cms, "t", cm("fg-owner", json!({})), false)
        .await
        .unwrap();
    apply(&cms, "t", owner_of("fg-dep", &o), false)
        .await
        .unwrap();
    let d = within(
        "delete",
        cms.delete("fg-owner", &DeleteParams::foreground()),
    )
    .await
    .unwrap();
    let marked = d.left().expect("owner returned while deleting");
    assert!(
        marked
            .metadata
            .finalizers
            .unwrap()
            .contains(&"foregroundDeletion".to_owned())
    );
    until("foreground owner gone after dependents", || async {
        cms.get_opt("fg-owner").await.unwrap().is_none()
            && cms.get_opt("fg-dep").await.unwrap().is_none()
    })
    .await;

    // Orphan: the dependent stays, without the owner reference.
    let o = apply(&cms, "t", cm("or-owner", json!({})), false)
        .await
        .unwrap();
    apply(&cms, "t", owner_of("or-dep", &o), false)
        .await
        .unwrap();
    within("delete", cms.delete("or-owner", &DeleteParams::orphan()))
        .await
        .unwrap();
    until("orphaned dependent kept", || async {
        cms.get_opt("or-owner").await.unwrap().is_none()
            && cms
                .get_opt("or-dep")
                .await
                .unwrap()
                .is_some_and(|d| d.metadata.owner_references.unwrap_or_default().is_empty())
    })
    .await;

    // Deleting a namespace removes its content, then the namespace.
    let nss = api(&client, ("", "v1", "Namespace"), "namespaces", None);
    within("delete ns", nss.delete("apps", &DeleteParams::default()))
        .await
        .unwrap();
    until("namespace and content gone", || async {
        nss.get_opt("apps").await.unwrap().is_none()
    })
    .await;
    assert!(
        within("list", cms.list(&ListParams::default()))
            .await
            .unwrap()
            .items
            .is_empty()
    );
}

#[tokio::test]
async fn list_selectors_pagination_and_watch() {
    let (sim, client) = sim().await;
    namespace(&client, "apps").await;
    let cms = cms(&client, "apps");
    for (i, tier) in ["front", "back", "front", "db", "front"].iter().enumerate() {
        let mut c = cm(&format!("c{i}"), json!({}));
        c["metadata"]["labels"] = json!({"tier": tier, "n": i.to_string()});
        apply(&cms, "t", c, false).await.unwrap();
    }
    let names = |l: kube::core::ObjectList<DynamicObject>| {
        l.items
            .into_iter()
            .map(|o| o.metadata.name.unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        names(
            cms.list(&ListParams::default().labels("tier=front"))
                .await
                .unwrap()
        ),
        ["c0", "c2", "c4"]
    );
    assert_eq!(
        names(
            cms.list(&ListParams::default().labels("tier in (back,db)"))
                .await
                .unwrap()
        ),
        ["c1", "c3"]
    );
    assert_eq!(
        names(
            cms.list(&ListParams::default().labels("tier notin (front),n>2"))
                .await
                .unwrap()
        ),
        ["c3"]
    );
    assert_eq!(
        names(
            cms.list(&ListParams::default().fields("metadata.name=c2"))
                .await
                .unwrap()
        ),
        ["c2"]
    );
    let e = api_err(
        cms.list(&ListParams::default().fields("data.x=1"))
            .await
            .unwrap_err(),
    );
    assert_eq!(
        (e.code, e.message.as_str()),
        (400, "field label not supported: data.x")
    );

    // limit/continue.
    let page1 = cms.list(&ListParams::default().limit(2)).await.unwrap();
    let token = page1.metadata.continue_.clone().unwrap();
    assert_eq!(names(page1), ["c0", "c1"]);
    let page2 = cms
        .list(&ListParams::default().limit(2).continue_token(&token))
        .await
        .unwrap();
    assert_eq!(names(page2), ["c2", "c3"]);
    let e = api_err(
        cms.list(&ListParams::default().limit(2).continue_token("bogus!"))
            .await
            .unwrap_err(),
    );
    assert_eq!(e.code, 400);

    // watch from a version: only later changes, in order.
    let rv = cms
        .list(&ListParams::default())
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    let mut stream = cms
        .watch(&WatchParams::default().labels("tier=front"), &rv)
        .await
        .unwrap()
        .boxed();
    apply(&cms, "t", json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c0", "namespace": "apps", "labels": {"tier": "front"}}, "data": {"v": "2"}}), false).await.unwrap();
    // Leaving the selector reads as DELETED for this watch.
    within(
        "relabel",
        cms.patch(
            "c2",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"tier": "back"}}})),
        ),
    )
    .await
    .unwrap();
    let ev = within("event 1", stream.try_next()).await.unwrap().unwrap();
    assert!(
        matches!(&ev, WatchEvent::Modified(o) if o.metadata.name.as_deref() == Some("c0")),
        "{ev:?}"
    );
    let ev = within("event 2", stream.try_next()).await.unwrap().unwrap();
    assert!(
        matches!(&ev, WatchEvent::Deleted(o) if o.metadata.name.as_deref() == Some("c2")),
        "{ev:?}"
    );

    // A watch from a compacted version: a 200 stream with one ERROR 410.
    sim.compact();
    let mut stream = cms
        .watch(&WatchParams::default(), &rv)
        .await
        .unwrap()
        .boxed();
    let ev = within("expired", stream.try_next()).await.unwrap().unwrap();
    match ev {
        WatchEvent::Error(e) => {
            assert_eq!((e.code, e.reason.as_str()), (410, "Expired"));
            assert!(
                e.message
                    .starts_with(&format!("too old resource version: {rv} (")),
                "{}",
                e.message
            );
        }
        other => panic!("expected ERROR 410, got {other:?}"),
    }
    // An old continue token is 410 too.
    let e = api_err(
        cms.list(&ListParams::default().limit(2).continue_token(&token))
            .await
            .unwrap_err(),
    );
    assert_eq!((e.code, e.reason.as_str()), (410, "Expired"));
}

#[tokio::test]
async fn kube_runtime_watcher_recovers_from_410_and_dropped_watches() {
    let (sim, client) = sim().await;
    namespace(&client, "apps").await;
    let cms = cms(&client, "apps");
    let store = std::sync::Arc::new(std::sync::Mutex::new(std::collections::BTreeMap::<
        String,
        String,
    >::new()));
    let s = store.clone();
    let w = kube::runtime::watcher(cms.clone(), kube::runtime::watcher::Config::default());
    let task = tokio::spawn(async move {
        let mut w = std::pin::pin!(w);
        while let Some(ev) = w.next().await {
            match ev {
                Ok(
                    kube::runtime::watcher::Event::Apply(o)
                    | kube::runtime::watcher::Event::InitApply(o),
                ) => {
                    s.lock().unwrap().insert(
                        o.metadata.name.clone().unwrap(),
                        o.data["data"]["v"].as_str().unwrap_or("").to_owned(),
                    );
                }
                Ok(kube::runtime::watcher::Event::Delete(o)) => {
                    s.lock().unwrap().remove(&o.metadata.name.unwrap());
                }
                _ => {}
            }
        }
    });
    apply(&cms, "t", cm("a", json!({"v": "1"})), false)
        .await
        .unwrap();
    until("watcher sees a=1", || async {
        store.lock().unwrap().get("a").map(String::as_str) == Some("1")
    })
    .await;
    sim.faults().drop_watches();
    sim.compact();
    apply(&cms, "t", cm("a", json!({"v": "2"})), false)
        .await
        .unwrap();
    apply(&cms, "t", cm("b", json!({"v": "1"})), false)
        .await
        .unwrap();
    until("watcher recovers and sees a=2, b=1", || async {
        let s = store.lock().unwrap();
        s.get("a").map(String::as_str) == Some("2") && s.get("b").map(String::as_str) == Some("1")
    })
    .await;
    task.abort();
}

fn crd() -> Value {
    json!({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "tables.dynamodb.aws.upbound.io"},
        "spec": {"group": "dynamodb.aws.upbound.io", "scope": "Cluster",
            "names": {"kind": "Table", "plural": "tables", "singular": "table", "listKind": "TableList", "categories": ["crossplane", "managed"]},
            "versions": [{"name": "v1beta1", "served": true, "storage": true, "subresources": {"status": {}},
                "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}}]}
    })
}

#[tokio::test]
async fn crds_register_after_established_and_custom_resources_get_conditions() {
    let (_sim, client) = sim().await;
    let crds = api(
        &client,
        ("apiextensions.k8s.io", "v1", "CustomResourceDefinition"),
        "customresourcedefinitions",
        None,
    );
    apply(&crds, "unitsync", crd(), false).await.unwrap();
    until("CRD established", || async {
        crds.get("tables.dynamodb.aws.upbound.io")
            .await
            .unwrap()
            .data["status"]["conditions"]
            .as_array()
            .is_some_and(|c| {
                c.iter()
                    .any(|c| c["type"] == "Established" && c["status"] == "True")
            })
    })
    .await;
    let d = Discovery::new(client.clone()).run().await.unwrap();
    assert!(
        d.groups()
            .flat_map(|g| g.recommended_resources())
            .any(|(ar, _)| ar.kind == "Table" && ar.plural == "tables")
    );

    let tables = api(
        &client,
        ("dynamodb.aws.upbound.io", "v1beta1", "Table"),
        "tables",
        None,
    );
    let t = |name: &str, fail: Option<&str>| {
        let mut v = json!({"apiVersion": "dynamodb.aws.upbound.io/v1beta1", "kind": "Table", "metadata": {"name": name}, "spec": {"forProvider": {"region": "us-east-1"}}});
        if let Some(f) = fail {
            v["metadata"]["annotations"] = json!({FAIL_ANNOTATION: f});
        }
        v
    };
    let created = apply(&tables, "unitsync", t("messages", None), false)
        .await
        .unwrap();
    assert_eq!(created.metadata.generation, Some(1));
    until("Synced and Ready", || async {
        let o = tables.get("messages").await.unwrap();
        let c = o.data["status"]["conditions"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        o.data["status"]["observedGeneration"] == 1
            && c.iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
            && c.iter()
                .any(|c| c["type"] == "Synced" && c["status"] == "True")
    })
    .await;
    apply(
        &tables,
        "unitsync",
        t("broken", Some("cannot create table: AccessDenied")),
        false,
    )
    .await
    .unwrap();
    until("Ready=False with the reason", || async {
        tables.get("broken").await.unwrap().data["status"]["conditions"]
            .as_array()
            .is_some_and(|c| {
                c.iter().any(|c| {
                    c["type"] == "Ready"
                        && c["status"] == "False"
                        && c["message"] == "cannot create table: AccessDenied"
                })
            })
    })
    .await;
    // Status on the main endpoint is ignored when a status subresource exists.
    let mut with_status = t("messages", None);
    with_status["status"] = json!({"conditions": []});
    let o = apply(&tables, "unitsync", with_status, false)
        .await
        .unwrap();
    assert!(
        o.data["status"]["conditions"]
            .as_array()
            .is_some_and(|c| !c.is_empty())
    );

    // Deleting the CRD removes its objects and the resource.
    within(
        "delete crd",
        crds.delete("tables.dynamodb.aws.upbound.io", &DeleteParams::default()),
    )
    .await
    .unwrap();
    until("CRD gone", || async {
        crds.get_opt("tables.dynamodb.aws.upbound.io")
            .await
            .unwrap()
            .is_none()
    })
    .await;
    assert!(
        tables.list(&ListParams::default()).await.is_err(),
        "the resource is no longer served"
    );
}

#[tokio::test]
async fn simulated_controllers_roll_out_and_fail_like_real_ones() {
    init();
    let sim = KubeSim::start(SimOptions {
        rollout_delay: Duration::from_millis(50),
        ..SimOptions::default()
    })
    .await
    .unwrap();
    let client = sim.client().await.unwrap();
    namespace(&client, "apps").await;
    let deps = api(
        &client,
        ("apps", "v1", "Deployment"),
        "deployments",
        Some("apps"),
    );
    let d = |name: &str, fail: Option<&str>, deadline: u32| {
        let mut v = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "namespace": "apps"},
            "spec": {"replicas": 2, "progressDeadlineSeconds": deadline, "selector": {"matchLabels": {"app": name}},
                "template": {"metadata": {"labels": {"app": name}}, "spec": {"containers": [{"name": "app", "image": "example.com/app:1"}]}}}});
        if let Some(f) = fail {
            v["metadata"]["annotations"] = json!({FAIL_ANNOTATION: f});
        }
        v
    };
    apply(&deps, "unitsync", d("good", None, 600), false)
        .await
        .unwrap();
    until("rolled out", || async {
        let s = deps.get("good").await.unwrap().data["status"].clone();
        s["observedGeneration"] == 1
            && s["readyReplicas"] == 2
            && s["availableReplicas"] == 2
            && s["conditions"].as_array().is_some_and(|c| {
                c.iter()
                    .any(|c| c["type"] == "Progressing" && c["reason"] == "NewReplicaSetAvailable")
            })
    })
    .await;
    apply(
        &deps,
        "unitsync",
        d("pull", Some("ImagePullBackOff"), 1),
        false,
    )
    .await
    .unwrap();
    until(
        "ImagePullBackOff pod, then ProgressDeadlineExceeded",
        || async {
            let s = deps.get("pull").await.unwrap().data["status"].clone();
            s["conditions"].as_array().is_some_and(|c| {
                c.iter().any(|c| {
                    c["type"] == "Progressing"
                        && c["status"] == "False"
                        && c["reason"] == "ProgressDeadlineExceeded"
                })
            })
        },
    )
    .await;
    let pods = api(&client, ("", "v1", "Pod"), "pods", Some("apps"));
    let pod = pods
        .list(&ListParams::default().labels("app=pull"))
        .await
        .unwrap()
        .items
        .pop()
        .unwrap();
    assert_eq!(
        pod.data["status"]["containerStatuses"][0]["state"]["waiting"]["reason"],
        "ImagePullBackOff"
    );

    let jobs = api(&client, ("batch", "v1", "Job"), "jobs", Some("apps"));
    let job = |name: &str, fail: Option<&str>| {
        let mut v = json!({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name, "namespace": "apps"},
            "spec": {"backoffLimit": 1, "template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "busybox"}]}}}});
        if let Some(f) = fail {
            v["metadata"]["annotations"] = json!({FAIL_ANNOTATION: f});
        }
        v
    };
    apply(&jobs, "unitsync", job("ok", None), false)
        .await
        .unwrap();
    apply(
        &jobs,
        "unitsync",
        job("bad", Some("BackoffLimitExceeded")),
        false,
    )
    .await
    .unwrap();
    until("jobs finish", || async {
        has_condition(&jobs, "ok", "Complete").await && has_condition(&jobs, "bad", "Failed").await
    })
    .await;
    let nss = api(&client, ("", "v1", "Namespace"), "namespaces", None);
    assert_eq!(
        nss.get("apps").await.unwrap().data["status"]["phase"],
        "Active"
    );
}

#[tokio::test]
async fn tls_tokens_and_faults() {
    init();
    let sim = KubeSim::start(SimOptions {
        token: Some("s3cret-token".into()),
        ..SimOptions::default()
    })
    .await
    .unwrap();
    let client = sim.client().await.unwrap();
    namespace(&client, "apps").await;
    // The same cluster with a wrong token: 401.
    let mut kc: kube::config::Kubeconfig = serde_saphyr::from_str(&sim.kubeconfig("x")).unwrap();
    kc.auth_infos[0].auth_info.as_mut().unwrap().token = Some("wrong".to_owned().into());
    let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .unwrap();
    let bad = kube::Client::try_from(cfg).unwrap();
    let e = api_err(
        within(
            "list with a bad token",
            cms(&bad, "apps").list(&ListParams::default()),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!((e.code, e.reason.as_str()), (401, "Unauthorized"));

    // Down: requests fail; back up: they work again.
    sim.faults().set_down(true);
    assert!(
        within(
            "list while down",
            cms(&client, "apps").list(&ListParams::default())
        )
        .await
        .is_err()
    );
    sim.faults().set_down(false);
    until("API server back", || async {
        cms(&client, "apps")
            .list(&ListParams::default())
            .await
            .is_ok()
    })
    .await;
    // Error rate 100 %: every answer is 503, which kube retries with
    // backoff, so nothing succeeds; at 50 % the retries get through.
    sim.faults().set_error_rate(1.0);
    let r = tokio::time::timeout(
        Duration::from_secs(2),
        cms(&client, "apps").list(&ListParams::default()),
    )
    .await;
    assert!(
        !matches!(r, Ok(Ok(_))),
        "nothing succeeds while every answer is 503"
    );
    sim.faults().set_error_rate(0.5);
    within(
        "list at 50 % errors",
        cms(&client, "apps").list(&ListParams::default()),
    )
    .await
    .unwrap();
    sim.faults().set_error_rate(0.0);
    sim.faults().set_latency(Duration::from_millis(30));
    let t = std::time::Instant::now();
    within(
        "slow list",
        cms(&client, "apps").list(&ListParams::default()),
    )
    .await
    .unwrap();
    assert!(t.elapsed() >= Duration::from_millis(30));
}

/// A client acting as the service account `ns/name` (kube-sim's RBAC).
async fn service_account(sim: &KubeSim, ns: &str, name: &str) -> kube::Client {
    let kc: kube::config::Kubeconfig =
        serde_saphyr::from_str(&sim.service_account_kubeconfig(ns, name)).unwrap();
    let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .unwrap();
    kube::Client::try_from(cfg).unwrap()
}

/// Applies an RBAC object (Role, RoleBinding, ClusterRole or
/// ClusterRoleBinding) as the cluster's administrator.
async fn grant(admin: &kube::Client, doc: Value) {
    let kind = doc["kind"].as_str().unwrap().to_owned();
    let plural = format!("{}s", kind.to_lowercase());
    let ns = doc["metadata"]["namespace"].as_str().map(str::to_owned);
    let api = api(
        admin,
        ("rbac.authorization.k8s.io", "v1", &kind),
        &plural,
        ns.as_deref(),
    );
    apply(&api, "test", doc, false).await.unwrap();
}

#[tokio::test]
async fn rbac_allows_a_service_account_only_what_its_bindings_grant() {
    let (sim, admin) = sim().await;
    namespace(&admin, "apps").await;
    namespace(&admin, "other").await;
    let agent = service_account(&sim, "system", "agent").await;
    let subject = json!([{"kind": "ServiceAccount", "name": "agent", "namespace": "system"}]);

    // Nothing bound: the API server's 403, naming user, verb, resource and scope.
    let e = api_err(
        within("list", cms(&agent, "apps").list(&ListParams::default()))
            .await
            .unwrap_err(),
    );
    assert_eq!((e.code, e.reason.as_str()), (403, "Forbidden"));
    assert_eq!(
        e.message,
        "configmaps is forbidden: User \"system:serviceaccount:system:agent\" cannot list resource \"configmaps\" in API group \"\" in the namespace \"apps\""
    );
    // Discovery is open to everyone.
    within("discovery", Discovery::new(agent.clone()).run())
        .await
        .expect("discovery");

    // A Role bound in `apps` grants there, not elsewhere nor cluster-wide.
    grant(&admin, json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
               "metadata": {"name": "config", "namespace": "apps"},
               "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list", "watch", "patch"]}]})).await;
    grant(&admin, json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
               "metadata": {"name": "config", "namespace": "apps"},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "config"},
               "subjects": subject})).await;
    // A server-side apply that would create the object needs `create` too.
    let e = api_err(
        apply(
            &cms(&agent, "apps"),
            "agent",
            cm("c", json!({"a": "1"})),
            false,
        )
        .await
        .unwrap_err(),
    );
    assert_eq!(
        e.message,
        "configmaps \"c\" is forbidden: User \"system:serviceaccount:system:agent\" cannot create resource \"configmaps\" in API group \"\" in the namespace \"apps\""
    );
    apply(
        &cms(&admin, "apps"),
        "test",
        cm("c", json!({"b": "0"})),
        false,
    )
    .await
    .unwrap();
    apply(
        &cms(&agent, "apps"),
        "agent",
        cm("c", json!({"a": "1"})),
        false,
    )
    .await
    .expect("apply (patch) of an existing object allowed in apps");
    within("list", cms(&agent, "apps").list(&ListParams::default()))
        .await
        .expect("list allowed in apps");
    let e = api_err(
        within(
            "delete",
            cms(&agent, "apps").delete("c", &DeleteParams::default()),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!(
        e.message,
        "configmaps \"c\" is forbidden: User \"system:serviceaccount:system:agent\" cannot delete resource \"configmaps\" in API group \"\" in the namespace \"apps\""
    );
    for denied in [
        api(&agent, ("", "v1", "ConfigMap"), "configmaps", None),
        cms(&agent, "other"),
    ] {
        let e = api_err(
            within("list", denied.list(&ListParams::default()))
                .await
                .unwrap_err(),
        );
        assert_eq!(e.code, 403, "{}", e.message);
    }
    let all = api(&agent, ("", "v1", "ConfigMap"), "configmaps", None);
    let e = api_err(
        within("list", all.list(&ListParams::default()))
            .await
            .unwrap_err(),
    );
    assert!(e.message.ends_with("at the cluster scope"), "{}", e.message);

    // A Namespace's own requests are in it: a Role there may grant them.
    let namespaces = api(&agent, ("", "v1", "Namespace"), "namespaces", None);
    assert_eq!(
        api_err(within("get", namespaces.get("apps")).await.unwrap_err()).code,
        403
    );
    grant(&admin, json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
               "metadata": {"name": "config", "namespace": "apps"},
               "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list", "watch", "patch"]},
                         {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["get"]}]})).await;
    within("get", namespaces.get("apps"))
        .await
        .expect("get of its own namespace allowed");
    // Authorization comes before routing: an unserved type is forbidden.
    let unserved = api(
        &agent,
        ("example.com", "v1", "Widget"),
        "widgets",
        Some("apps"),
    );
    assert_eq!(
        api_err(
            within("list", unserved.list(&ListParams::default()))
                .await
                .unwrap_err()
        )
        .code,
        403
    );

    // An aggregated ClusterRole holds the rules of the roles it selects
    // (aggregated ones too), including ones labelled after it was bound.
    grant(&admin, json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
               "metadata": {"name": "agent"},
               "aggregationRule": {"clusterRoleSelectors": [{"matchLabels": {"example.com/aggregate-to-agent": "true"}}]},
               "rules": []})).await;
    grant(&admin, json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
               "metadata": {"name": "agent"},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "agent"},
               "subjects": subject})).await;
    assert_eq!(
        api_err(
            within("list", all.list(&ListParams::default()))
                .await
                .unwrap_err()
        )
        .code,
        403,
        "nothing aggregated yet"
    );
    for role in [
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
               "metadata": {"name": "reader", "labels": {"example.com/aggregate-to-agent": "true"}},
               "aggregationRule": {"clusterRoleSelectors": [{"matchLabels": {"example.com/aggregate-to-reader": "true"}}]},
               "rules": []}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
               "metadata": {"name": "read-config", "labels": {"example.com/aggregate-to-reader": "true"}},
               "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["list"]}]}),
    ] {
        grant(&admin, role).await;
    }
    within("list", all.list(&ListParams::default()))
        .await
        .expect("list allowed cluster-wide through the aggregated role");

    // cluster-admin exists, as in every cluster, and grants everything.
    grant(&admin, json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
               "metadata": {"name": "agent-admin"},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
               "subjects": subject})).await;
    within(
        "delete",
        cms(&agent, "apps").delete("c", &DeleteParams::default()),
    )
    .await
    .expect("delete allowed as cluster-admin");
}

#[tokio::test]
async fn kubectl_works_against_kube_sim() {
    init();
    let sim = KubeSim::start(SimOptions {
        rollout_delay: Duration::from_millis(50),
        ..SimOptions::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kc = dir.path().join("kubeconfig");
    std::fs::write(&kc, sim.kubeconfig("sim")).unwrap();
    let manifests = dir.path().join("m.yaml");
    std::fs::write(
        &manifests,
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: apps\n---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: c1\n  namespace: apps\ndata:\n  a: \"1\"\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web, namespace: apps}\nspec:\n  selector: {matchLabels: {app: web}}\n  template:\n    metadata: {labels: {app: web}}\n    spec:\n      containers: [{name: app, image: nginx}]\n",
    )
    .unwrap();
    let kubectl = |args: &[&str]| {
        let mut c = std::process::Command::new("kubectl");
        c.arg("--kubeconfig")
            .arg(&kc)
            .arg("--cache-dir")
            .arg(dir.path().join("cache"))
            .args(args);
        async move {
            let out = within(
                "kubectl",
                tokio::task::spawn_blocking(move || c.output().unwrap()),
            )
            .await
            .unwrap();
            (
                out.status.success(),
                String::from_utf8_lossy(&out.stdout).into_owned()
                    + &String::from_utf8_lossy(&out.stderr),
            )
        }
    };
    let (ok, out) = kubectl(&[
        "apply",
        "--server-side",
        "--validate=false",
        "-f",
        manifests.to_str().unwrap(),
    ])
    .await;
    assert!(ok, "{out}");
    assert!(out.contains("configmap/c1 serverside-applied"), "{out}");
    let (ok, out) = kubectl(&["get", "configmap", "c1", "-n", "apps", "-o", "yaml"]).await;
    assert!(
        ok && out.contains("a: \"1\"") && out.contains("resourceVersion"),
        "{out}"
    );
    let (ok, out) = kubectl(&["get", "configmaps", "-n", "apps"]).await;
    assert!(ok && out.contains("c1"), "{out}");
    let (ok, out) = kubectl(&[
        "wait",
        "--for=condition=Available",
        "deployment/web",
        "-n",
        "apps",
        "--timeout=20s",
    ])
    .await;
    assert!(ok, "{out}");
    let (ok, out) = kubectl(&["delete", "configmap", "c1", "-n", "apps"]).await;
    assert!(ok && out.contains("deleted"), "{out}");
    let (ok, out) = kubectl(&["get", "configmap", "c1", "-n", "apps"]).await;
    assert!(!ok && out.contains("NotFound"), "{out}");
    assert!(sim.object("v1", "configmaps", "apps", "c1").is_none());
}

async fn has_condition(api: &Api<DynamicObject>, name: &str, ty: &str) -> bool {
    api.get(name).await.unwrap().data["status"]["conditions"]
        .as_array()
        .is_some_and(|c| c.iter().any(|c| c["type"] == ty && c["status"] == "True"))
}

#[tokio::test]
async fn watch_bookmarks_and_initial_events() {
    init();
    let sim = KubeSim::start(SimOptions {
        bookmark_interval: Duration::from_millis(100),
        ..SimOptions::default()
    })
    .await
    .unwrap();
    let client = sim.client().await.unwrap();
    namespace(&client, "apps").await;
    let cms = cms(&client, "apps");
    apply(&cms, "t", cm("a", json!({})), false).await.unwrap();
    let rv = within("list", cms.list(&ListParams::default()))
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    // Bookmarks only when asked for, carrying the current version.
    let wp = WatchParams {
        bookmarks: true,
        ..WatchParams::default()
    };
    let mut stream = within("watch", cms.watch(&wp, &rv)).await.unwrap().boxed();
    let ev = within("bookmark", stream.try_next())
        .await
        .unwrap()
        .unwrap();
    match ev {
        WatchEvent::Bookmark(b) => assert!(
            b.metadata.resource_version.parse::<u64>().unwrap() >= rv.parse::<u64>().unwrap()
        ),
        other => panic!("expected a bookmark, got {other:?}"),
    }
    // sendInitialEvents: ADDED for every object, then the end-of-initial-events bookmark.
    let wp = WatchParams::streaming_lists();
    let mut stream = within("watch list", cms.watch(&wp, "0"))
        .await
        .unwrap()
        .boxed();
    let first = within("initial", stream.try_next()).await.unwrap().unwrap();
    assert!(
        matches!(&first, WatchEvent::Added(o) if o.metadata.name.as_deref() == Some("a")),
        "{first:?}"
    );
    let second = within("end", stream.try_next()).await.unwrap().unwrap();
    match second {
        WatchEvent::Bookmark(b) => assert_eq!(
            b.metadata
                .annotations
                .get("k8s.io/initial-events-end")
                .map(String::as_str),
            Some("true")
        ),
        other => panic!("expected the initial-events-end bookmark, got {other:?}"),
    }
}

#[tokio::test]
async fn statefulsets_daemonsets_and_pvcs_report_progress() {
    init();
    let sim = KubeSim::start(SimOptions {
        rollout_delay: Duration::from_millis(50),
        ..SimOptions::default()
    })
    .await
    .unwrap();
    let client = sim.client().await.unwrap();
    namespace(&client, "apps").await;
    let pod = json!({"metadata": {"labels": {"app": "x"}}, "spec": {"containers": [{"name": "c", "image": "busybox"}]}});
    let sts = api(
        &client,
        ("apps", "v1", "StatefulSet"),
        "statefulsets",
        Some("apps"),
    );
    apply(&sts, "t", json!({"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "db", "namespace": "apps"},
        "spec": {"replicas": 3, "serviceName": "db", "selector": {"matchLabels": {"app": "x"}}, "template": pod}}), false).await.unwrap();
    let ds = api(
        &client,
        ("apps", "v1", "DaemonSet"),
        "daemonsets",
        Some("apps"),
    );
    apply(&ds, "t", json!({"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": "agent", "namespace": "apps"},
        "spec": {"selector": {"matchLabels": {"app": "x"}}, "template": pod}}), false).await.unwrap();
    let pvcs = api(
        &client,
        ("", "v1", "PersistentVolumeClaim"),
        "persistentvolumeclaims",
        Some("apps"),
    );
    apply(&pvcs, "t", json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "data", "namespace": "apps"},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}), false).await.unwrap();
    until("StatefulSet rolled out", || async {
        let s = sts.get("db").await.unwrap().data["status"].clone();
        s["observedGeneration"] == 1
            && s["readyReplicas"] == 3
            && s["currentRevision"] == s["updateRevision"]
    })
    .await;
    until("DaemonSet rolled out", || async {
        let s = ds.get("agent").await.unwrap().data["status"].clone();
        s["observedGeneration"] == 1 && s["numberReady"] == s["desiredNumberScheduled"]
    })
    .await;
    until("PVC bound", || async {
        pvcs.get("data").await.unwrap().data["status"]["phase"] == "Bound"
    })
    .await;
}

/// DELETE with a uid precondition (what the agent's prune sends): a
/// recreated object of the same name is refused with 409 and kept.
#[tokio::test]
async fn delete_preconditions_protect_a_recreated_object() {
    let (_sim, client) = sim().await;
    namespace(&client, "apps").await;
    let cms = cms(&client, "apps");
    let old = apply(&cms, "unitsync", cm("a", json!({"k": "1"})), false)
        .await
        .unwrap();
    within("delete", cms.delete("a", &DeleteParams::default()))
        .await
        .unwrap();
    let new = apply(&cms, "someone-else", cm("a", json!({"k": "2"})), false)
        .await
        .unwrap();
    assert_ne!(old.metadata.uid, new.metadata.uid);
    let mut dp = DeleteParams::foreground();
    dp.preconditions = Some(kube::api::Preconditions {
        uid: old.metadata.uid.clone(),
        resource_version: None,
    });
    let e = match within("stale delete", cms.delete("a", &dp)).await {
        Err(kube::Error::Api(s)) => s,
        other => panic!("expected a refusal, got {other:?}"),
    };
    assert_eq!((e.code, e.reason.as_str()), (409, "Conflict"));
    assert!(
        e.message.contains("does not match the UID in record"),
        "{}",
        e.message
    );
    assert!(
        within("still there", cms.get_opt("a"))
            .await
            .unwrap()
            .is_some()
    );
    dp.preconditions = Some(kube::api::Preconditions {
        uid: new.metadata.uid.clone(),
        resource_version: None,
    });
    within("current delete", cms.delete("a", &dp))
        .await
        .unwrap();
    until("gone", || async {
        cms.get_opt("a").await.unwrap().is_none()
    })
    .await;
}

#[tokio::test]
async fn the_binary_takes_faults_from_flags_and_from_its_control_endpoint() {
    use unitsync_tests::processes::SimProcess;
    let dir = tempfile::tempdir().unwrap();
    let sim = within(
        "kube-sim starts",
        SimProcess::start(dir.path(), "flaky", &["--error-rate", "1.0"]),
    )
    .await
    .unwrap();
    let client = within("client", sim.client()).await.unwrap();
    let cms: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        "default",
        &ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("", "v1", "ConfigMap"),
            "configmaps",
        ),
    );
    match within("a failing request", cms.get_opt("x")).await {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 503),
        other => panic!("expected 503 ServiceUnavailable, got {other:?}"),
    }
    // Clear the faults; then fail only reads of one object.
    sim.faults(json!({"fail": [{"method": "GET", "path": "/configmaps/x"}]}))
        .await
        .unwrap();
    let cm = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x", "namespace": "default"}});
    within(
        "create",
        cms.patch("x", &PatchParams::apply("test"), &Patch::Apply(cm)),
    )
    .await
    .unwrap();
    assert!(within("a failing read", cms.get_opt("x")).await.is_err());
    sim.faults(json!({})).await.unwrap();
    assert!(within("read", cms.get_opt("x")).await.unwrap().is_some());
    assert_eq!(
        sim.writes().await.unwrap().get("v1/configmaps/default/x"),
        Some(&1),
        "one write counted"
    );
    sim.reset().await.unwrap();
    assert!(
        within("read after reset", cms.get_opt("x"))
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test]
async fn size_limits_of_objects_and_request_bodies() {
    let (_sim, client) = sim().await;
    namespace(&client, "apps").await;
    let api = cms(&client, "apps");
    let limit = 1024 * 1024;
    // At the limit (keys count): created; one byte more: 422 on create,
    // apply and update, naming the whole object as the API server does.
    let at = "x".repeat(limit - 1);
    within(
        "create at the limit",
        api.create(&PostParams::default(), &obj(cm("fits", json!({"k": at})))),
    )
    .await
    .expect("a ConfigMap of 1 MiB is accepted");
    let over = "x".repeat(limit);
    let too_long = r#"ConfigMap "over" is invalid: []: Too long: must have at most 1048576 bytes"#;
    let e = api_err(
        within(
            "create over",
            api.create(
                &PostParams::default(),
                &obj(cm("over", json!({"k": over.clone()}))),
            ),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!(
        (e.code, e.reason.as_str(), e.message.as_str()),
        (422, "Invalid", too_long)
    );
    let e = api_err(
        within(
            "apply over",
            apply(&api, "m", cm("over", json!({"k": over.clone()})), false),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!((e.code, e.message.as_str()), (422, too_long));
    let e = api_err(
        within(
            "update over",
            api.replace(
                "fits",
                &PostParams::default(),
                &obj(cm("fits", json!({"k": at.clone(), "k2": "y"}))),
            ),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!(
        (e.code, e.message.as_str()),
        (
            422,
            r#"ConfigMap "fits" is invalid: []: Too long: must have at most 1048576 bytes"#
        )
    );
    // A body past 3 MiB is refused before it is read as an object.
    let huge = "x".repeat(3 * 1024 * 1024);
    let e = api_err(
        within(
            "create huge",
            api.create(&PostParams::default(), &obj(cm("huge", json!({"k": huge})))),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!(
        (e.code, e.reason.as_str(), e.message.as_str()),
        (
            413,
            "RequestEntityTooLarge",
            "Request entity too large: limit is 3145728"
        )
    );
    assert!(within("get", api.get_opt("over")).await.unwrap().is_none());
}
