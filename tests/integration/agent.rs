//! The agent end to end: a real hub, kube-sim clusters and the real agent
//! library, as `unitsync-agent` runs it.

use serde_json::json;
use unitsync_proto::v1 as pb;
use unitsync_tests::cluster::TestCluster;
use unitsync_tests::kube_sim::FAIL_ANNOTATION;
use unitsync_tests::{TestHub, configmap, until, within};

const CRDS: &str = include_str!("../../deploy/examples/messagewall/crds.yaml");
const DYNAMODB: &str = include_str!("../../deploy/examples/messagewall/dynamodb.yaml");
const WEB: &str = include_str!("../../deploy/examples/messagewall/web.yaml");

async fn setup() -> (TestHub, TestCluster) {
    setup_with(|_| {}).await
}

/// As [`setup`], the agent configured by `configure` first.
async fn setup_with(
    configure: impl FnOnce(&mut unitsync_agent::config::AgentConfig),
) -> (TestHub, TestCluster) {
    let hub = TestHub::start().await;
    hub.create_env("dev").await;
    let token = hub.create_cluster("dev-1", "dev").await;
    let mut cluster = TestCluster::new(&hub.endpoint(), hub.ca(), &token).await;
    configure(&mut cluster.config);
    cluster.start_agent();
    (hub, cluster)
}

/// As [`setup`], but the periodic drift check would only come after an
/// hour: only what the watches tell the agent checks drift.
async fn setup_watch_only() -> (TestHub, TestCluster) {
    setup_with(|c| c.tuning.drift_interval = std::time::Duration::from_secs(3600)).await
}

/// The hub's record of `unit` in the cluster: (revision, phase, message).
async fn status(hub: &TestHub, unit: &str) -> Option<(u64, pb::Phase, String)> {
    let d = hub.unit(unit).await.ok()?;
    let c = d.clusters.into_iter().next()?;
    Some((
        c.revision,
        pb::Phase::try_from(c.phase).unwrap_or(pb::Phase::Unspecified),
        c.message,
    ))
}

pub(super) async fn wait_phase(
    hub: &TestHub,
    unit: &str,
    revision: u64,
    phase: pb::Phase,
) -> String {
    let mut last = None;
    let waited = tokio::time::timeout(unitsync_tests::wait::DEADLINE, async {
        loop {
            let s = status(hub, unit).await;
            if let Some((r, p, m)) = &s
                && *r == revision
                && *p == phase
            {
                return m.clone();
            }
            last = s;
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await;
    match waited {
        Ok(m) => m,
        Err(_) => panic!("{unit}@{revision} never reached {phase:?}; last status {last:?}"),
    }
}

/// The messagewall example without its ConfigMap (and the Deployment's
/// reference to it).
fn without_web_config(web: &str) -> String {
    web.split("---\n")
        .filter(|d| !d.contains("kind: ConfigMap"))
        .collect::<Vec<_>>()
        .join("---\n")
        .replace(
            "          envFrom:\n            - configMapRef:\n                name: web-config\n",
            "",
        )
}

fn assert_web_config_pruned(cluster: &TestCluster) {
    assert!(
        cluster
            .object("v1", "configmaps", "messagewall", "web-config")
            .is_none(),
        "pruned"
    );
}

/// Edits the messagewall example's ConfigMap behind the agent's back.
async fn drift_web_config(cluster: &TestCluster) {
    let cms = cluster.api("v1", "ConfigMap", "configmaps", Some("messagewall"));
    within(
        "edit",
        cms.patch(
            "web-config",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"data": {"API_URL": "x"}})),
        ),
    )
    .await
    .unwrap();
}

/// Waits until the agent has restored the ConfigMap `drift_web_config` edits.
async fn until_web_config_healed(cluster: &TestCluster, what: &str) {
    until(what, || async {
        cluster
            .object("v1", "configmaps", "messagewall", "web-config")
            .unwrap()["data"]["API_URL"]
            == "https://api.messagewall.example.com"
    })
    .await;
}

#[tokio::test]
async fn applies_a_multi_kind_unit_with_crds_and_reports_ready() {
    let (hub, cluster) = setup().await;
    let unit = format!("{CRDS}---\n{DYNAMODB}---\n{WEB}");
    hub.put("dev/messagewall", &unit).await.unwrap();
    wait_phase(&hub, "dev/messagewall", 1, pb::Phase::Ready).await;
    let table = cluster
        .object(
            "dynamodb.aws.upbound.io/v1beta1",
            "tables",
            "",
            "messagewall-messages",
        )
        .expect("table applied");
    assert_eq!(
        table["metadata"]["annotations"]["unitsync.dev/unit"],
        "dev/messagewall"
    );
    assert_eq!(
        table["metadata"]["annotations"]["unitsync.dev/environment"],
        "dev"
    );
    assert_eq!(
        table["metadata"]["annotations"]["unitsync.dev/revision"],
        "1"
    );
    assert_eq!(
        table["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "unitsync"
    );
    let managers: Vec<&str> = table["metadata"]["managedFields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["manager"].as_str().unwrap())
        .collect();
    assert!(managers.contains(&"unitsync"));
    let deploy = cluster
        .object("apps/v1", "deployments", "messagewall", "web")
        .expect("deployment applied");
    assert_eq!(deploy["status"]["readyReplicas"], 2);
    // Per-resource status reached the hub.
    let d = hub.unit("dev/messagewall").await.unwrap();
    let res = &d.clusters[0].resources;
    assert!(
        res.iter()
            .any(|r| r.kind == "Table" && r.health == i32::from(pb::Health::Ready)),
        "{res:?}"
    );
    assert_eq!(res.len(), 6 + 1 + 4);
}

#[tokio::test]
async fn update_prunes_removed_objects_and_changes_others_in_place() {
    let (hub, cluster) = setup().await;
    hub.put("dev/web", WEB).await.unwrap();
    wait_phase(&hub, "dev/web", 1, pb::Phase::Ready).await;
    let before = cluster
        .object("apps/v1", "deployments", "messagewall", "web")
        .unwrap();
    assert_eq!(before["metadata"]["generation"], 1);
    let svc_uid = cluster
        .object("v1", "services", "messagewall", "web")
        .unwrap()["metadata"]["uid"]
        .clone();
    // Revision 2: the ConfigMap is gone, the Deployment's image changes.
    let v2 = without_web_config(&WEB.replace("web:1.0.0", "web:1.1.0"));
    hub.put("dev/web", &v2).await.unwrap();
    wait_phase(&hub, "dev/web", 2, pb::Phase::Ready).await;
    assert_web_config_pruned(&cluster);
    let after = cluster
        .object("apps/v1", "deployments", "messagewall", "web")
        .unwrap();
    assert_eq!(
        after["metadata"]["uid"], before["metadata"]["uid"],
        "updated in place"
    );
    assert_eq!(after["metadata"]["generation"], 2, "generation bumped once");
    assert_eq!(
        after["spec"]["template"]["spec"]["containers"][0]["image"],
        "registry.example.com/messagewall/web:1.1.0"
    );
    // The unchanged Service was not rewritten.
    let svc = cluster
        .object("v1", "services", "messagewall", "web")
        .unwrap();
    assert_eq!(svc["metadata"]["uid"], svc_uid);
    assert_eq!(
        cluster.sim.writes("v1", "services", "messagewall", "web"),
        1,
        "the unchanged Service was written once, at creation"
    );
    assert_eq!(
        svc["metadata"]["annotations"]["unitsync.dev/revision"], "1",
        "unchanged objects keep the revision that last changed them"
    );
}

/// A revision that replaces an object with one that cannot be applied
/// keeps the old one until every object applies: nothing is pruned after
/// a partial apply.
#[tokio::test]
async fn nothing_is_pruned_while_an_object_of_the_revision_fails() {
    let (hub, cluster) = setup().await;
    cluster
        .apply_json(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "apps"}}))
        .await;
    let unit = |names: &[&str]| {
        names
            .iter()
            .map(|n| configmap(n, "1"))
            .collect::<Vec<_>>()
            .join("---\n")
    };
    hub.put("dev/cfg", &unit(&["a", "c", "d"])).await.unwrap();
    wait_phase(&hub, "dev/cfg", 1, pb::Phase::Ready).await;
    cluster
        .sim
        .faults()
        .fail("PATCH", "/api/v1/namespaces/apps/configmaps/b");
    hub.put("dev/cfg", &unit(&["b", "c", "d"])).await.unwrap();
    let failed = wait_phase(&hub, "dev/cfg", 2, pb::Phase::Failed).await;
    assert!(failed.contains("ConfigMap apps/b"), "{failed}");
    assert!(
        failed.contains("kept until every object applies"),
        "{failed}"
    );
    assert!(
        cluster.object("v1", "configmaps", "apps", "a").is_some(),
        "the replaced object stays while its replacement fails"
    );
    // Once it applies, the pass completes and prunes.
    cluster.sim.faults().clear_failures();
    wait_phase(&hub, "dev/cfg", 2, pb::Phase::Ready).await;
    assert!(cluster.object("v1", "configmaps", "apps", "a").is_none());
    assert!(cluster.object("v1", "configmaps", "apps", "b").is_some());
}

/// Units destroyed together: the Namespace of one waits for the other's
/// objects to go, then goes too (it is not kept for what was leaving).
#[tokio::test]
async fn a_namespace_is_deleted_when_the_units_it_holds_go_with_it() {
    let (hub, cluster) = setup().await;
    let namespace = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: together\n";
    hub.put("dev/platform", namespace).await.unwrap();
    wait_phase(&hub, "dev/platform", 1, pb::Phase::Ready).await;
    // A finalizer holds the other unit's object while it is deleted.
    let held = configmap("web", "1").replace(
        "  namespace: apps\n",
        "  namespace: together\n  finalizers: [example.com/hold]\n",
    );
    hub.put("dev/web", &held).await.unwrap();
    wait_phase(&hub, "dev/web", 1, pb::Phase::Ready).await;
    hub.destroy("dev/web").await.unwrap();
    until("web's object is being deleted", || async {
        cluster
            .object("v1", "configmaps", "together", "web")
            .is_some_and(|o| !o["metadata"]["deletionTimestamp"].is_null())
    })
    .await;
    hub.destroy("dev/platform").await.unwrap();
    until("platform waits for it", || async {
        hub.unit("dev/platform").await.is_ok_and(|d| {
            d.clusters
                .first()
                .is_some_and(|c| c.revision == 2 && c.message.contains("waiting for them"))
        })
    })
    .await;
    let cms = cluster.api("v1", "ConfigMap", "configmaps", Some("together"));
    within(
        "release",
        cms.patch(
            "web",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"metadata": {"finalizers": null}})),
        ),
    )
    .await
    .unwrap();
    let done = wait_phase(&hub, "dev/platform", 2, pb::Phase::Destroyed).await;
    assert_eq!(done, "all objects deleted");
    wait_phase(&hub, "dev/web", 2, pb::Phase::Destroyed).await;
    assert!(cluster.object("v1", "namespaces", "", "together").is_none());
}

/// A Namespace (or CRD) of one unit that holds another unit's objects is
/// not deleted with it: the namespace controller would take them along.
#[tokio::test]
async fn a_namespace_holding_another_unit_s_objects_is_kept() {
    let (hub, cluster) = setup().await;
    let namespace = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shared\n";
    let platform = format!(
        "{namespace}---\n{}",
        configmap("base", "1").replace("apps", "shared")
    );
    hub.put("dev/platform", &platform).await.unwrap();
    wait_phase(&hub, "dev/platform", 1, pb::Phase::Ready).await;
    hub.put("dev/web", &configmap("web", "1").replace("apps", "shared"))
        .await
        .unwrap();
    wait_phase(&hub, "dev/web", 1, pb::Phase::Ready).await;
    hub.destroy("dev/platform").await.unwrap();
    let done = wait_phase(&hub, "dev/platform", 2, pb::Phase::Destroyed).await;
    assert!(
        done.contains("Namespace shared") && done.contains("holds objects of dev/web"),
        "{done}"
    );
    assert!(
        cluster
            .object("v1", "configmaps", "shared", "base")
            .is_none()
    );
    assert!(cluster.object("v1", "namespaces", "", "shared").is_some());
    assert!(
        cluster
            .object("v1", "configmaps", "shared", "web")
            .is_some(),
        "the other unit's object stays"
    );
    wait_phase(&hub, "dev/web", 1, pb::Phase::Ready).await;
    // The same when the Namespace leaves a unit that goes on.
    let infra = |with_namespace: bool| {
        let mut docs = vec![
            configmap("a", "1").replace("apps", "team"),
            configmap("b", "1").replace("apps", "team"),
        ];
        if with_namespace {
            docs.insert(0, namespace.replace("shared", "team"));
        }
        docs.join("---\n")
    };
    hub.put("dev/infra", &infra(true)).await.unwrap();
    wait_phase(&hub, "dev/infra", 1, pb::Phase::Ready).await;
    hub.put("dev/api", &configmap("api", "1").replace("apps", "team"))
        .await
        .unwrap();
    wait_phase(&hub, "dev/api", 1, pb::Phase::Ready).await;
    hub.put("dev/infra", &infra(false)).await.unwrap();
    wait_phase(&hub, "dev/infra", 2, pb::Phase::Ready).await;
    assert!(cluster.object("v1", "namespaces", "", "team").is_some());
    assert!(cluster.object("v1", "configmaps", "team", "api").is_some());
}

/// An object deleted and created again under its name (`kubectl replace
/// --force`) faster than a drift check: the agent follows the new object
/// (it read it missing for good, and a later revision left it behind).
#[tokio::test]
async fn an_object_replaced_under_its_name_is_followed() {
    let (hub, cluster) = setup().await;
    hub.put("dev/web", WEB).await.unwrap();
    wait_phase(&hub, "dev/web", 1, pb::Phase::Ready).await;
    let cms = cluster.api("v1", "ConfigMap", "configmaps", Some("messagewall"));
    let mut again = within("get", cms.get("web-config")).await.unwrap();
    again.metadata.uid = None;
    again.metadata.resource_version = None;
    again.metadata.managed_fields = None;
    again.metadata.creation_timestamp = None;
    within("delete", cms.delete("web-config", &Default::default()))
        .await
        .unwrap();
    let created = within("create", cms.create(&Default::default(), &again))
        .await
        .unwrap();
    let uid = created.metadata.uid.unwrap();
    until("the inventory names the new object", || async {
        cluster
            .object(
                "v1",
                "configmaps",
                "unitsync-system",
                "unitsync-inventory-web",
            )
            .is_some_and(|cm| {
                cm["data"]["inventory"]
                    .as_str()
                    .unwrap_or("")
                    .contains(&uid)
            })
    })
    .await;
    wait_phase(&hub, "dev/web", 1, pb::Phase::Ready).await;
    // A revision without it prunes it.
    hub.put("dev/web", &without_web_config(WEB)).await.unwrap();
    wait_phase(&hub, "dev/web", 2, pb::Phase::Ready).await;
    assert_web_config_pruned(&cluster);
}

#[tokio::test]
async fn destroy_deletes_everything_and_reports_destroyed() {
    let (hub, cluster) = setup().await;
    hub.put("dev/web", WEB).await.unwrap();
    wait_phase(&hub, "dev/web", 1, pb::Phase::Ready).await;
    hub.destroy("dev/web").await.unwrap();
    wait_phase(&hub, "dev/web", 2, pb::Phase::Destroyed).await;
    assert!(
        cluster
            .object("apps/v1", "deployments", "messagewall", "web")
            .is_none()
    );
    assert!(
        cluster
            .object("v1", "namespaces", "", "messagewall")
            .is_none()
    );
    assert!(
        cluster
            .object(
                "v1",
                "configmaps",
                "unitsync-system",
                "unitsync-inventory-web"
            )
            .is_none(),
        "inventory removed"
    );
}

#[tokio::test]
async fn an_object_owned_by_another_unit_is_a_conflict_not_a_takeover() {
    let (hub, cluster) = setup().await;
    let cm = |v: &str| {
        format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: shared\n  namespace: unitsync-system\ndata:\n  v: \"{v}\"\n"
        )
    };
    hub.put("dev/first", &cm("first")).await.unwrap();
    wait_phase(&hub, "dev/first", 1, pb::Phase::Ready).await;
    hub.put("dev/second", &cm("second")).await.unwrap();
    let msg = wait_phase(&hub, "dev/second", 1, pb::Phase::Failed).await;
    assert!(
        msg.contains("belongs to unit dev/first")
            && msg.contains("unit dev/second will not take it over"),
        "{msg}"
    );
    assert_eq!(
        cluster
            .object("v1", "configmaps", "unitsync-system", "shared")
            .unwrap()["data"]["v"],
        "first"
    );
}

#[tokio::test]
async fn field_manager_conflicts_are_reported_with_paths_and_not_forced() {
    let (hub, cluster) = setup().await;
    cluster
        .apply_as("platform-team", json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "settings", "namespace": "unitsync-system"}, "data": {"level": "high"}}))
        .await;
    let unit = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: settings\n  namespace: unitsync-system\ndata:\n  level: low\n";
    hub.put("dev/settings", unit).await.unwrap();
    let msg = wait_phase(&hub, "dev/settings", 1, pb::Phase::Failed).await;
    assert!(
        msg.contains("field manager conflict on .data.level (conflict with \"platform-team\")"),
        "{msg}"
    );
    assert_eq!(
        cluster
            .object("v1", "configmaps", "unitsync-system", "settings")
            .unwrap()["data"]["level"],
        "high"
    );
    // Opting in takes the field.
    let forced = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: settings\n  namespace: unitsync-system\n  annotations:\n    unitsync.dev/force: enabled\ndata:\n  level: low\n";
    hub.put("dev/settings", forced).await.unwrap();
    wait_phase(&hub, "dev/settings", 2, pb::Phase::Ready).await;
    assert_eq!(
        cluster
            .object("v1", "configmaps", "unitsync-system", "settings")
            .unwrap()["data"]["level"],
        "low"
    );
}

#[tokio::test]
async fn drift_is_healed_or_reported_only() {
    let (hub, cluster) = setup().await;
    let unit = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: apps\n---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: healed\n  namespace: apps\ndata:\n  v: \"1\"\n---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: watched\n  namespace: apps\n  annotations:\n    unitsync.dev/drift: report\ndata:\n  v: \"1\"\n";
    hub.put("dev/cfg", unit).await.unwrap();
    wait_phase(&hub, "dev/cfg", 1, pb::Phase::Ready).await;
    let cms = cluster.api("v1", "ConfigMap", "configmaps", Some("apps"));
    let edit = kube::api::Patch::Merge(json!({"data": {"v": "edited"}}));
    within(
        "edit",
        cms.patch("healed", &kube::api::PatchParams::default(), &edit),
    )
    .await
    .unwrap();
    within(
        "edit",
        cms.patch("watched", &kube::api::PatchParams::default(), &edit),
    )
    .await
    .unwrap();
    until("healed restored", || async {
        cluster
            .object("v1", "configmaps", "apps", "healed")
            .unwrap()["data"]["v"]
            == "1"
    })
    .await;
    until("drift reported with paths", || async {
        hub.unit("dev/cfg").await.unwrap().clusters[0]
            .resources
            .iter()
            .any(|r| r.name == "watched" && r.drifted_fields.contains(&"data.v".to_owned()))
            || status(&hub, "dev/cfg").await.is_some_and(|(_, p, m)| {
                p == pb::Phase::Drifted && m.contains("ConfigMap apps/watched drifted at data.v")
            })
    })
    .await;
    // Report-only: left as edited.
    assert_eq!(
        cluster
            .object("v1", "configmaps", "apps", "watched")
            .unwrap()["data"]["v"],
        "edited"
    );
}

/// A drift heal the API server refuses leaves the unit Drifted, naming
/// why, not Ready.
#[tokio::test]
async fn a_drift_heal_that_fails_is_reported() {
    let (hub, cluster) = setup().await;
    hub.put("dev/web", WEB).await.unwrap();
    wait_phase(&hub, "dev/web", 1, pb::Phase::Ready).await;
    // The heal is the forced write (the drift check's dry run is not).
    cluster
        .sim
        .faults()
        .fail("PATCH", "configmaps/web-config?&force=true");
    drift_web_config(&cluster).await;
    let m = wait_phase(&hub, "dev/web", 1, pb::Phase::Drifted).await;
    assert!(
        m.contains("ConfigMap messagewall/web-config drifted at data.API_URL (not healed:"),
        "{m}"
    );
    cluster.sim.faults().clear_failures();
    until_web_config_healed(&cluster, "healed once the API server takes it").await;
    wait_phase(&hub, "dev/web", 1, pb::Phase::Ready).await;
}

#[tokio::test]
async fn hpa_owned_replicas_are_left_to_the_autoscaler() {
    let (hub, cluster) = setup().await;
    let unit = format!(
        "{WEB}---\napiVersion: autoscaling/v2\nkind: HorizontalPodAutoscaler\nmetadata:\n  name: web\n  namespace: messagewall\nspec:\n  scaleTargetRef: {{apiVersion: apps/v1, kind: Deployment, name: web}}\n  minReplicas: 2\n  maxReplicas: 10\n"
    );
    hub.put("dev/web", &unit).await.unwrap();
    wait_phase(&hub, "dev/web", 1, pb::Phase::Ready).await;
    // The autoscaler scales up; the agent leaves it.
    let deps = cluster.api("apps/v1", "Deployment", "deployments", Some("messagewall"));
    let scale = kube::api::Patch::Merge(json!({"spec": {"replicas": 5}}));
    within(
        "scale",
        deps.patch(
            "web",
            &kube::api::PatchParams {
                field_manager: Some("hpa-controller".into()),
                ..Default::default()
            },
            &scale,
        ),
    )
    .await
    .unwrap();
    // Another revision and a few drift checks later, replicas stay at 5.
    hub.put(
        "dev/web",
        &unit.replace("API_URL: https://api", "API_URL: https://v2.api"),
    )
    .await
    .unwrap();
    wait_phase(&hub, "dev/web", 2, pb::Phase::Ready).await;
    // Nothing to wait on here: the point is that nothing happens. Give the
    // agent several drift checks (400 ms apart) and watch events to act.
    tokio::time::sleep(std::time::Duration::from_millis(1000)).await;
    assert_eq!(
        cluster
            .object("apps/v1", "deployments", "messagewall", "web")
            .unwrap()["spec"]["replicas"],
        5
    );
}

/// An autoscaler added to a Deployment the agent applied with replicas:
/// the agent stops applying replicas without the field being removed
/// (which would scale the Deployment to 1 until the autoscaler acts).
#[tokio::test]
async fn adding_an_autoscaler_hands_replicas_over_without_scaling_down() {
    let (hub, cluster) = setup().await;
    hub.put("dev/web", WEB).await.unwrap();
    wait_phase(&hub, "dev/web", 1, pb::Phase::Ready).await;
    let replicas = || {
        cluster
            .object("apps/v1", "deployments", "messagewall", "web")
            .unwrap()["spec"]["replicas"]
            .clone()
    };
    assert_eq!(replicas(), 2);
    let hpa = "apiVersion: autoscaling/v2\nkind: HorizontalPodAutoscaler\nmetadata:\n  name: web\n  namespace: messagewall\nspec:\n  scaleTargetRef: {apiVersion: apps/v1, kind: Deployment, name: web}\n  minReplicas: 2\n  maxReplicas: 10\n";
    hub.put("dev/web", &format!("{WEB}---\n{hpa}"))
        .await
        .unwrap();
    wait_phase(&hub, "dev/web", 2, pb::Phase::Ready).await;
    assert_eq!(replicas(), 2, "replicas kept at the last applied value");
    let owners: Vec<String> = cluster
        .object("apps/v1", "deployments", "messagewall", "web")
        .unwrap()["metadata"]["managedFields"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["fieldsV1"]["f:spec"].get("f:replicas").is_some())
        .map(|m| m["manager"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        owners.iter().any(|m| m == "unitsync-replicas-handoff"),
        "handed over: {owners:?}"
    );
    // A later change is applied without replicas: they stay.
    hub.put(
        "dev/web",
        &format!("{WEB}---\n{hpa}").replace("API_URL: https://api", "API_URL: https://v2.api"),
    )
    .await
    .unwrap();
    wait_phase(&hub, "dev/web", 3, pb::Phase::Ready).await;
    assert_eq!(replicas(), 2);
    // A StatefulSet's autoscaler is left its replicas too.
    let sts = "apiVersion: apps/v1\nkind: StatefulSet\nmetadata:\n  name: db\n  namespace: messagewall\nspec:\n  replicas: 1\n  serviceName: db\n  selector: {matchLabels: {app: db}}\n  template:\n    metadata: {labels: {app: db}}\n    spec:\n      containers: [{name: db, image: db:1}]\n";
    let db_hpa = hpa
        .replace("name: web\n  namespace", "name: db\n  namespace")
        .replace("kind: Deployment, name: web", "kind: StatefulSet, name: db");
    hub.put(
        "dev/web",
        &format!("{WEB}---\n{hpa}---\n{sts}---\n{db_hpa}"),
    )
    .await
    .unwrap();
    wait_phase(&hub, "dev/web", 4, pb::Phase::Ready).await;
    let sets = cluster.api(
        "apps/v1",
        "StatefulSet",
        "statefulsets",
        Some("messagewall"),
    );
    within(
        "scale",
        sets.patch(
            "db",
            &kube::api::PatchParams {
                field_manager: Some("hpa-controller".into()),
                ..Default::default()
            },
            &kube::api::Patch::Merge(json!({"spec": {"replicas": 3}})),
        ),
    )
    .await
    .unwrap();
    hub.put(
        "dev/web",
        &format!("{WEB}---\n{hpa}---\n{sts}---\n{db_hpa}")
            .replace("maxReplicas: 10", "maxReplicas: 12"),
    )
    .await
    .unwrap();
    wait_phase(&hub, "dev/web", 5, pb::Phase::Ready).await;
    assert_eq!(
        cluster
            .object("apps/v1", "statefulsets", "messagewall", "db")
            .unwrap()["spec"]["replicas"],
        3
    );
    // Without the autoscaler, the unit's replicas are its own again (the
    // handoff does not hold them against it).
    hub.put("dev/web", WEB).await.unwrap();
    wait_phase(&hub, "dev/web", 6, pb::Phase::Ready).await;
    hub.put("dev/web", &WEB.replace("replicas: 2", "replicas: 4"))
        .await
        .unwrap();
    wait_phase(&hub, "dev/web", 7, pb::Phase::Ready).await;
    assert_eq!(replicas(), 4);
}

#[tokio::test]
async fn a_deployment_that_never_becomes_ready_is_stuck_with_the_reason() {
    let (hub, _cluster) = setup().await;
    let unit = WEB.replace("  name: web\n  namespace: messagewall\nspec:\n  replicas: 2", &format!("  name: web\n  namespace: messagewall\n  annotations:\n    {FAIL_ANNOTATION}: ImagePullBackOff\nspec:\n  replicas: 2\n  progressDeadlineSeconds: 1"));
    assert!(unit.contains(FAIL_ANNOTATION));
    hub.put("dev/web", &unit).await.unwrap();
    let msg = wait_phase(&hub, "dev/web", 1, pb::Phase::Degraded).await;
    assert!(
        msg.contains("Deployment messagewall/web: Stuck")
            && (msg.contains("ImagePullBackOff") || msg.contains("ProgressDeadlineExceeded")),
        "{msg}"
    );
}

#[tokio::test]
async fn restart_resumes_without_rewriting_unchanged_objects() {
    let (hub, mut cluster) = setup().await;
    hub.put("dev/web", WEB).await.unwrap();
    wait_phase(&hub, "dev/web", 1, pb::Phase::Ready).await;
    let writes = |c: &TestCluster| c.sim.writes("apps/v1", "deployments", "messagewall", "web");
    let before = writes(&cluster);
    assert_eq!(before, 1, "created once");
    cluster.stop_agent().await;
    cluster.start_agent();
    // The restarted agent resyncs (nothing to send) and re-checks: Ready again.
    until("agent reconnected", || async {
        hub.admin()
            .await
            .get_cluster(pb::GetClusterRequest {
                name: "dev-1".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .connected
    })
    .await;
    hub.put(
        "dev/other",
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: other\n  namespace: unitsync-system\n",
    )
    .await
    .unwrap();
    wait_phase(&hub, "dev/other", 1, pb::Phase::Ready).await;
    assert_eq!(
        writes(&cluster),
        before,
        "the unchanged Deployment was not written again (not even a no-op apply)"
    );
}

/// After a restart the agent writes nothing that is unchanged, and still
/// knows those objects as its own: a status change of one (same
/// generation) is not taken for someone's edit (a drift check: a read and
/// a dry-run apply of every object of the unit).
#[tokio::test]
async fn after_a_restart_status_changes_are_not_taken_for_edits() {
    let (hub, mut cluster) = setup_watch_only().await;
    hub.put("dev/web", WEB).await.unwrap();
    wait_phase(&hub, "dev/web", 1, pb::Phase::Ready).await;
    let dry_runs = |c: &TestCluster| {
        c.sim
            .dry_runs("apps/v1", "deployments", "messagewall", "web")
    };
    let before = dry_runs(&cluster);
    cluster.stop_agent().await;
    cluster.start_agent();
    until("the restarted agent checked the Deployment", || async {
        dry_runs(&cluster) > before
    })
    .await;
    let checked = dry_runs(&cluster);
    // The Deployment's controller reports (a status change).
    let deps = cluster.api("apps/v1", "Deployment", "deployments", Some("messagewall"));
    within(
        "status",
        deps.patch_status(
            "web",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"status": {"unavailableReplicas": 1}})),
        ),
    )
    .await
    .unwrap();
    // Nothing to wait on: the point is that nothing happens. A drift
    // check would follow an edit within its 100 ms settle time.
    tokio::time::sleep(std::time::Duration::from_millis(1000)).await;
    assert_eq!(
        dry_runs(&cluster),
        checked,
        "no drift check for a status change"
    );
}

#[tokio::test]
async fn hub_outage_leaves_the_cluster_alone_and_status_arrives_after() {
    let (mut hub, cluster) = setup().await;
    hub.put("dev/web", WEB).await.unwrap();
    wait_phase(&hub, "dev/web", 1, pb::Phase::Ready).await;
    hub.stop().await;
    // While the hub is away the agent keeps enforcing: drift is healed.
    drift_web_config(&cluster).await;
    until_web_config_healed(&cluster, "healed during the outage").await;
    assert!(
        cluster
            .object("apps/v1", "deployments", "messagewall", "web")
            .is_some(),
        "nothing deleted because of the outage"
    );
    hub.restart().await;
    until("agent back", || async {
        hub.admin()
            .await
            .get_cluster(pb::GetClusterRequest {
                name: "dev-1".into(),
            })
            .await
            .is_ok_and(|c| c.into_inner().connected)
    })
    .await;
    let rev = hub
        .put("dev/web", &WEB.replace("replicas: 2", "replicas: 3"))
        .await
        .unwrap();
    wait_phase(&hub, "dev/web", rev.number, pb::Phase::Ready).await;
}

#[tokio::test]
async fn api_server_down_reads_unknown_never_ready_and_recovers() {
    let (hub, cluster) = setup().await;
    hub.put("dev/web", WEB).await.unwrap();
    wait_phase(&hub, "dev/web", 1, pb::Phase::Ready).await;
    cluster.sim.faults().set_down(true);
    // Without any new revision, a Ready unit stops reading Ready.
    let msg = wait_phase(&hub, "dev/web", 1, pb::Phase::Unknown).await;
    assert!(msg.contains("unreachable"), "{msg}");
    hub.put("dev/web", &WEB.replace("replicas: 2", "replicas: 3"))
        .await
        .unwrap();
    let msg = wait_phase(&hub, "dev/web", 2, pb::Phase::Unknown).await;
    assert!(msg.contains("unreachable"), "{msg}");
    cluster.sim.faults().set_down(false);
    wait_phase(&hub, "dev/web", 2, pb::Phase::Ready).await;
    assert_eq!(
        cluster
            .object("apps/v1", "deployments", "messagewall", "web")
            .unwrap()["spec"]["replicas"],
        3
    );
}

#[tokio::test]
async fn a_revision_that_would_prune_most_of_a_unit_is_refused() {
    let (hub, cluster) = setup().await;
    let cms: String = (0..6)
        .map(|i| format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: c{i}\n  namespace: unitsync-system\n"))
        .collect::<Vec<_>>()
        .join("---\n");
    hub.put("dev/many", &cms).await.unwrap();
    wait_phase(&hub, "dev/many", 1, pb::Phase::Ready).await;
    hub.put(
        "dev/many",
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: c0\n  namespace: unitsync-system\n",
    )
    .await
    .unwrap();
    let msg = wait_phase(&hub, "dev/many", 2, pb::Phase::Failed).await;
    assert!(msg.contains("refusing to prune 5 of 6 objects"), "{msg}");
    assert!(
        cluster
            .object("v1", "configmaps", "unitsync-system", "c5")
            .is_some(),
        "nothing pruned"
    );
    // An explicit destroy removes them all.
    hub.destroy("dev/many").await.unwrap();
    wait_phase(&hub, "dev/many", 3, pb::Phase::Destroyed).await;
    assert!(
        cluster
            .object("v1", "configmaps", "unitsync-system", "c5")
            .is_none()
    );
}

#[tokio::test]
async fn drift_is_noticed_through_the_watch_without_waiting_for_the_periodic_check() {
    let (hub, cluster) = setup_watch_only().await;
    hub.put("dev/web", WEB).await.unwrap();
    wait_phase(&hub, "dev/web", 1, pb::Phase::Ready).await;
    drift_web_config(&cluster).await;
    until_web_config_healed(&cluster, "healed via the watch").await;
    until("the heal is reported", || async {
        status(&hub, "dev/web").await.is_some_and(|(r, p, m)| {
            r == 1
                && p == pb::Phase::Ready
                && m.contains(
                    "healed drift: ConfigMap messagewall/web-config drifted at data.API_URL",
                )
        })
    })
    .await;
}

#[tokio::test]
async fn restart_mid_apply_finishes_the_unit_without_rewriting_what_was_applied() {
    let (hub, mut cluster) = setup().await;
    // A slow API server, so the restart lands in the middle of the apply.
    cluster
        .sim
        .faults()
        .set_latency(std::time::Duration::from_millis(40));
    let unit: String = (0..20)
        .map(|i| format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: c{i:02}\n  namespace: unitsync-system\ndata:\n  v: \"{i}\"\n"))
        .collect::<Vec<_>>()
        .join("---\n");
    hub.put("dev/many", &unit).await.unwrap();
    until("part of the unit applied", || async {
        (0..20)
            .filter(|i| {
                cluster
                    .object("v1", "configmaps", "unitsync-system", &format!("c{i:02}"))
                    .is_some()
            })
            .count()
            >= 3
    })
    .await;
    cluster.stop_agent().await;
    let applied: Vec<(String, u64)> = (0..20)
        .filter_map(|i| {
            let name = format!("c{i:02}");
            cluster
                .object("v1", "configmaps", "unitsync-system", &name)
                .map(|_| {
                    let w = cluster
                        .sim
                        .writes("v1", "configmaps", "unitsync-system", &name);
                    (name, w)
                })
        })
        .collect();
    assert!(
        applied.len() < 20,
        "the restart came before the end of the apply"
    );
    cluster.sim.faults().set_latency(std::time::Duration::ZERO);
    cluster.start_agent();
    wait_phase(&hub, "dev/many", 1, pb::Phase::Ready).await;
    for i in 0..20 {
        assert!(
            cluster
                .object("v1", "configmaps", "unitsync-system", &format!("c{i:02}"))
                .is_some(),
            "c{i:02} applied"
        );
    }
    for (name, writes) in applied {
        assert_eq!(writes, 1, "{name} written once before the restart");
        assert_eq!(
            cluster
                .sim
                .writes("v1", "configmaps", "unitsync-system", &name),
            writes,
            "{name} was not written again after the restart"
        );
    }
}

#[tokio::test]
async fn a_cluster_scoped_object_naming_a_namespace_is_applied_and_kept() {
    let (hub, cluster) = setup().await;
    let role = |verb: &str| {
        format!(
            "apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\nmetadata:\n  name: reader\n  namespace: stray\nrules:\n- apiGroups: [\"\"]\n  resources: [\"configmaps\"]\n  verbs: [\"{verb}\"]\n"
        )
    };
    let rules = || {
        cluster
            .object("rbac.authorization.k8s.io/v1", "clusterroles", "", "reader")
            .map(|o| o["rules"][0]["verbs"][0].clone())
    };
    hub.put("dev/rbac", &role("get")).await.unwrap();
    wait_phase(&hub, "dev/rbac", 1, pb::Phase::Ready).await;
    assert_eq!(
        rules(),
        Some(json!("get")),
        "applied and not pruned as leaving"
    );
    hub.put("dev/rbac", &role("list")).await.unwrap();
    wait_phase(&hub, "dev/rbac", 2, pb::Phase::Ready).await;
    assert_eq!(
        rules(),
        Some(json!("list")),
        "updated in place, still there"
    );
}

/// A hub and a running agent serving its metrics at the returned address.
pub(crate) async fn agent_with_metrics() -> (TestHub, TestCluster, std::net::SocketAddr) {
    let addr: std::net::SocketAddr =
        format!("127.0.0.1:{}", unitsync_tests::processes::free_port())
            .parse()
            .unwrap();
    let (hub, cluster) = setup_with(|c| c.health_listen = Some(addr)).await;
    (hub, cluster, addr)
}

/// The agent's metrics text (empty until it serves them).
pub(crate) async fn agent_metrics(addr: std::net::SocketAddr) -> String {
    unitsync_tests::processes::http_get(addr, "/metrics")
        .await
        .map(|(_, body)| body)
        .unwrap_or_default()
}

#[tokio::test]
async fn agent_metrics_count_passes_drift_and_the_session() {
    let (hub, cluster, addr) = agent_with_metrics().await;
    let metrics = || agent_metrics(addr);
    until("agent connected", || async {
        metrics().await.contains("unitsync_agent_hub_connected 1")
    })
    .await;
    hub.put("dev/web", WEB).await.unwrap();
    wait_phase(&hub, "dev/web", 1, pb::Phase::Ready).await;
    drift_web_config(&cluster).await;
    until_web_config_healed(&cluster, "healed").await;
    until("passes and healed drift counted", || async {
        let m = metrics().await;
        sample(&m, "unitsync_agent_passes_total{result=\"applied\"}") >= 1.0
            && sample(&m, "unitsync_agent_drift_healed_total") >= 1.0
    })
    .await;
    let m = metrics().await;
    assert_eq!(sample(&m, "unitsync_agent_units"), 1.0, "{m}");
    assert_eq!(sample(&m, "unitsync_agent_hub_sessions_total"), 1.0, "{m}");
    assert_eq!(
        sample(
            &m,
            "unitsync_agent_pass_duration_seconds_count{result=\"applied\"}"
        ),
        sample(&m, "unitsync_agent_passes_total{result=\"applied\"}"),
        "{m}"
    );
    assert!(
        sample(&m, "unitsync_agent_drift_detected_total") >= 1.0,
        "{m}"
    );
    assert_eq!(
        sample(&m, "unitsync_agent_passes_total{result=\"failed\"}"),
        0.0,
        "{m}"
    );
}

/// How many objects the agent's record of its own writes holds.
async fn tracked_objects(addr: std::net::SocketAddr) -> f64 {
    sample(&agent_metrics(addr).await, "unitsync_agent_tracked_objects")
}

/// None tracked, and the endpoint answers (a missing series reads 0).
async fn nothing_tracked(addr: std::net::SocketAddr) -> bool {
    agent_metrics(addr)
        .await
        .contains("\nunitsync_agent_tracked_objects 0\n")
}

/// The Secret of `dev/key`, holding `value`.
fn key_secret(value: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: key\n  namespace: unitsync-system\nstringData:\n  k: {value}\n"
    )
}

/// Commits `dev/key`, a unit without ConfigMaps (so no watch of that type
/// sees its inventory go: the agent must let go of what it deletes
/// itself), and waits until the agent remembers the Secret and the
/// inventory.
async fn secret_unit_remembered(hub: &TestHub, addr: std::net::SocketAddr) {
    hub.put("dev/key", &key_secret("v")).await.unwrap();
    wait_phase(hub, "dev/key", 1, pb::Phase::Ready).await;
    until("the secret and the inventory remembered", || async {
        tracked_objects(addr).await >= 2.0
    })
    .await;
}

/// Deletes `dev/key`'s inventory behind the agent's back; returns the
/// ConfigMaps of its namespace.
async fn delete_key_inventory(
    cluster: &TestCluster,
) -> kube::Api<k8s_openapi::api::core::v1::ConfigMap> {
    let configmaps = kube::Api::namespaced(cluster.client.clone(), "unitsync-system");
    within(
        "delete the inventory",
        configmaps.delete("unitsync-inventory-key", &Default::default()),
    )
    .await
    .unwrap();
    configmaps
}

#[tokio::test]
async fn the_agent_forgets_the_objects_it_no_longer_manages() {
    let (hub, _cluster, addr) = agent_with_metrics().await;
    secret_unit_remembered(&hub, addr).await;
    hub.destroy("dev/key").await.unwrap();
    until("nothing remembered once the secret's unit is gone", || {
        nothing_tracked(addr)
    })
    .await;
    hub.put("dev/web", WEB).await.unwrap();
    wait_phase(&hub, "dev/web", 1, pb::Phase::Ready).await;
    let objects = WEB.matches("\nkind:").count() + usize::from(WEB.starts_with("kind:"));
    until("the unit's objects remembered", || async {
        tracked_objects(addr).await >= objects as f64
    })
    .await;
    // Destroyed: its objects (and its inventory) are deleted, and the
    // record of the agent's writes lets go of them.
    hub.destroy("dev/web").await.unwrap();
    until("nothing remembered once the unit is gone", || {
        nothing_tracked(addr)
    })
    .await;
}

#[tokio::test]
async fn the_agent_forgets_an_inventory_someone_else_deleted() {
    let (hub, cluster, addr) = agent_with_metrics().await;
    secret_unit_remembered(&hub, addr).await;
    // Someone deletes the inventory; the agent's own delete then finds it
    // gone (404) and must still let go of it.
    delete_key_inventory(&cluster).await;
    hub.destroy("dev/key").await.unwrap();
    until("nothing remembered once the unit is gone", || {
        nothing_tracked(addr)
    })
    .await;
}

#[tokio::test]
async fn the_agent_forgets_an_inventory_it_had_to_write_again() {
    let (hub, cluster, addr) = agent_with_metrics().await;
    secret_unit_remembered(&hub, addr).await;
    // Someone deletes the inventory; the next revision writes it again (a
    // new object, a new uid): the old one must not stay remembered.
    let configmaps = delete_key_inventory(&cluster).await;
    hub.put("dev/key", &key_secret("v2")).await.unwrap();
    wait_phase(&hub, "dev/key", 2, pb::Phase::Ready).await;
    until("the inventory written again", || async {
        configmaps
            .get_opt("unitsync-inventory-key")
            .await
            .unwrap()
            .is_some()
    })
    .await;
    hub.destroy("dev/key").await.unwrap();
    until("nothing remembered once the unit is gone", || {
        nothing_tracked(addr)
    })
    .await;
}

/// A sample's value in a Prometheus text exposition (0 when absent).
pub(crate) fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// A CRD serving `v1beta1` and `v1` of `Widget` (only `v1` when
/// `beta_served` is false), applied behind the agent's back.
async fn widgets_crd(cluster: &TestCluster, beta_served: bool) {
    let schema = json!({"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}});
    cluster
        .apply_json(json!({
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            "metadata": {"name": "widgets.example.com"},
            "spec": {
                "group": "example.com",
                "scope": "Namespaced",
                "names": {"kind": "Widget", "plural": "widgets", "singular": "widget"},
                "versions": [
                    {"name": "v1beta1", "served": beta_served, "storage": false, "schema": schema, "subresources": {"status": {}}},
                    {"name": "v1", "served": true, "storage": true, "schema": schema, "subresources": {"status": {}}},
                ],
            },
        }))
        .await;
    let beta = cluster.api("example.com/v1beta1", "Widget", "widgets", Some("default"));
    until("the CRD's versions served as asked", || async {
        let served = match beta.list(&Default::default()).await {
            Ok(_) => true,
            Err(kube::Error::Api(s)) if s.code == 404 => false,
            Err(e) => panic!("listing widgets: {e}"),
        };
        served == beta_served
    })
    .await;
}

fn widget(name: &str) -> String {
    format!(
        "apiVersion: example.com/v1beta1\nkind: Widget\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  size: 1\n"
    )
}

fn config(name: &str) -> String {
    format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\n  namespace: default\ndata:\n  a: \"1\"\n"
    )
}

/// An object outlives a version of its type: once `v1beta1` is no longer
/// served, pruning or destroying what was applied as `v1beta1` deletes it
/// through `v1` (the unit was stuck before: "not pruning …: 404 page not
/// found", and the destroy never finished).
#[tokio::test]
async fn objects_of_a_version_no_longer_served_are_still_pruned_and_destroyed() {
    let (hub, cluster) = setup().await;
    widgets_crd(&cluster, true).await;
    let configs = ["a", "b", "c"].map(config).join("---\n");
    hub.put("dev/app", &format!("{configs}---\n{}", widget("pruned")))
        .await
        .unwrap();
    hub.put(
        "dev/other",
        &format!("{}---\n{}", config("d"), widget("destroyed")),
    )
    .await
    .unwrap();
    wait_phase(&hub, "dev/app", 1, pb::Phase::Ready).await;
    wait_phase(&hub, "dev/other", 1, pb::Phase::Ready).await;
    widgets_crd(&cluster, false).await;
    let exists = |name: &str| {
        cluster
            .object("example.com/v1", "widgets", "default", name)
            .is_some()
    };
    assert!(exists("pruned") && exists("destroyed"));
    hub.put("dev/app", &configs).await.unwrap();
    wait_phase(&hub, "dev/app", 2, pb::Phase::Ready).await;
    assert!(!exists("pruned"), "the Widget left the unit but still runs");
    hub.destroy("dev/other").await.unwrap();
    wait_phase(&hub, "dev/other", 2, pb::Phase::Destroyed).await;
    assert!(
        !exists("destroyed"),
        "the unit read Destroyed with its Widget running"
    );
}

/// A unit destroyed while its agent was down with its state lost (a pod
/// replaced, its `emptyDir` gone) is destroyed when the agent comes back:
/// it finds the unit's inventory in the cluster (its objects stayed
/// running, and the hub showed the old Ready cell, before).
#[tokio::test]
async fn a_unit_destroyed_while_the_agent_lost_its_state_is_destroyed_on_return() {
    let (hub, mut cluster) = setup().await;
    hub.put("dev/web", &config("web")).await.unwrap();
    wait_phase(&hub, "dev/web", 1, pb::Phase::Ready).await;
    cluster.stop_agent().await;
    cluster.forget_state();
    hub.destroy("dev/web").await.unwrap();
    cluster.start_agent();
    wait_phase(&hub, "dev/web", 2, pb::Phase::Destroyed).await;
    assert!(
        cluster
            .object("v1", "configmaps", "default", "web")
            .is_none(),
        "the destroyed unit's object still runs"
    );
}

/// Two agents given one namespace (a second install into the same cluster
/// replaced the first's Deployment): the newcomer finds the other's
/// inventories, and neither destroys a unit its environment lacks nor
/// applies over a unit of the same name; it says why instead. With
/// `unlabelled`, dev's inventories predate the environment label: the
/// objects' own annotations still keep them from being deleted.
async fn another_environment_s_units_are_left_alone(unlabelled: bool) {
    let hub = TestHub::start().await;
    hub.create_env("dev").await;
    hub.create_env("staging").await;
    let dev = hub.create_cluster("dev-1", "dev").await;
    let staging = hub.create_cluster("staging-1", "staging").await;
    let mut cluster = TestCluster::new(&hub.endpoint(), hub.ca(), &dev).await;
    cluster.start_agent();
    hub.put("dev/web", &config("web")).await.unwrap();
    hub.put("dev/db", &config("db")).await.unwrap();
    wait_phase(&hub, "dev/web", 1, pb::Phase::Ready).await;
    wait_phase(&hub, "dev/db", 1, pb::Phase::Ready).await;

    cluster.stop_agent().await;
    if unlabelled {
        let cms = cluster.api("v1", "ConfigMap", "configmaps", Some("unitsync-system"));
        for unit in ["web", "db"] {
            within(
                "unlabel",
                cms.patch(
                    &format!("unitsync-inventory-{unit}"),
                    &kube::api::PatchParams::default(),
                    &kube::api::Patch::Merge(
                        json!({"metadata": {"labels": {"unitsync.dev/environment": null}}}),
                    ),
                ),
            )
            .await
            .expect("unlabel");
        }
    }
    cluster.forget_state();
    cluster.config.hub.token = staging;
    cluster.start_agent();
    hub.put(
        "staging/web",
        &config("web").replace("a: \"1\"", "a: \"2\""),
    )
    .await
    .unwrap();
    let message = wait_phase(&hub, "staging/web", 1, pb::Phase::Failed).await;
    let why = if unlabelled {
        "belongs to unit dev/web"
    } else {
        "records dev/web, not staging/web"
    };
    assert!(message.contains(why), "{message}");
    // A unit staging has no such thing as: dev's, not a destroy.
    hub.put("staging/canary", &config("canary")).await.unwrap();
    wait_phase(&hub, "staging/canary", 1, pb::Phase::Ready).await;
    // Destroying staging's unit of the same name destroys nothing of dev's.
    hub.destroy("staging/web").await.unwrap();
    wait_phase(&hub, "staging/web", 2, pb::Phase::Destroyed).await;
    for name in ["web", "db"] {
        let cm = cluster
            .object("v1", "configmaps", "default", name)
            .unwrap_or_else(|| panic!("dev's {name} is still there"));
        assert_eq!(cm["data"]["a"], "1", "dev's {name} unchanged");
    }
}

#[tokio::test]
async fn an_agent_finding_another_environment_s_inventories_leaves_them_alone() {
    another_environment_s_units_are_left_alone(false).await;
}

#[tokio::test]
async fn another_environment_s_objects_are_never_deleted_even_through_an_unlabelled_inventory() {
    another_environment_s_units_are_left_alone(true).await;
}

/// Kinds that report nothing are Ready once applied: an Ingress and a
/// NetworkPolicy (Kubernetes' own), and a custom resource of a type
/// without a status subresource (no controller will report one); a custom
/// resource whose type has one waits for its controller's report.
#[tokio::test]
async fn objects_with_nothing_to_report_are_ready() {
    let (hub, cluster) = setup().await;
    cluster
        .apply_json(json!({
            "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": "servicemonitors.monitoring.example.com"},
            "spec": {"group": "monitoring.example.com", "scope": "Namespaced",
                "names": {"plural": "servicemonitors", "singular": "servicemonitor", "kind": "ServiceMonitor"},
                "versions": [{"name": "v1", "served": true, "storage": true,
                    "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}}]}
        }))
        .await;
    let unit = "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: deny-all
  namespace: default
spec:
  podSelector: {}
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata:
  name: web
  namespace: default
spec:
  rules:
    - host: web.example.com
---
apiVersion: monitoring.example.com/v1
kind: ServiceMonitor
metadata:
  name: web
  namespace: default
spec:
  endpoints: [{port: http}]
";
    hub.put("dev/edge", unit).await.unwrap();
    wait_phase(&hub, "dev/edge", 1, pb::Phase::Ready).await;
}

/// A revision that fixes a stuck Deployment is never reported stuck for
/// what the previous one's pods still show while its rollout runs: only
/// the pods of the current ReplicaSet speak for it.
#[tokio::test]
async fn a_rollout_fixing_a_stuck_deployment_is_progressing_then_ready() {
    let hub = TestHub::start().await;
    hub.create_env("dev").await;
    let token = hub.create_cluster("dev-1", "dev").await;
    let options = unitsync_tests::kube_sim::SimOptions {
        rollout_delay: std::time::Duration::from_secs(1),
        ..unitsync_tests::kube_sim::SimOptions::default()
    };
    let mut cluster = TestCluster::with_sim(&hub.endpoint(), hub.ca(), &token, options).await;
    cluster.start_agent();
    let broken = WEB.replace(
        "  name: web\n  namespace: messagewall\nspec:\n",
        &format!("  name: web\n  namespace: messagewall\n  annotations:\n    {FAIL_ANNOTATION}: ImagePullBackOff\nspec:\n"),
    );
    assert!(broken.contains(FAIL_ANNOTATION));
    hub.put("dev/web", &broken).await.unwrap();
    let msg = wait_phase(&hub, "dev/web", 1, pb::Phase::Degraded).await;
    assert!(msg.contains("ImagePullBackOff"), "{msg}");
    // The fix: a new image, no failure.
    hub.put("dev/web", &WEB.replace("web:1.0.0", "web:1.0.1"))
        .await
        .unwrap();
    let seen = std::sync::Mutex::new(Vec::new());
    until("revision 2 Ready", || async {
        if let Some((2, phase, message)) = status(&hub, "dev/web").await {
            seen.lock().unwrap().push((phase, message));
            return phase == pb::Phase::Ready;
        }
        false
    })
    .await;
    let seen = seen.into_inner().unwrap();
    assert!(
        seen.iter().all(|(p, _)| *p != pb::Phase::Degraded),
        "revision 2 was reported {seen:?}"
    );
    assert!(
        seen.iter().any(|(p, _)| *p == pb::Phase::Progressing),
        "the rollout was seen running: {seen:?}"
    );
}

/// A Job with `ttlSecondsAfterFinished` is deleted by the cluster once it
/// finished: the unit stays Ready and the Job is not run again (re-created)
/// before the next revision.
#[tokio::test]
async fn a_finished_job_removed_by_its_ttl_is_not_run_again() {
    let (hub, cluster) = setup().await;
    let job = "apiVersion: batch/v1
kind: Job
metadata:
  name: migrate
  namespace: default
spec:
  ttlSecondsAfterFinished: 0
  template:
    spec:
      restartPolicy: Never
      containers:
        - name: migrate
          image: registry.example.com/migrate:1
";
    hub.put("dev/migrations", job).await.unwrap();
    wait_phase(&hub, "dev/migrations", 1, pb::Phase::Ready).await;
    // The TTL controller's part.
    let jobs = cluster.api("batch/v1", "Job", "jobs", Some("default"));
    within(
        "delete the job",
        jobs.delete("migrate", &Default::default()),
    )
    .await
    .expect("delete");
    until("the job reported finished and removed", || async {
        hub.unit("dev/migrations").await.is_ok_and(|d| {
            d.clusters.iter().any(|c| {
                c.phase == i32::from(pb::Phase::Ready)
                    && c.message
                        == "Job default/migrate finished and was removed (ttlSecondsAfterFinished)"
            })
        })
    })
    .await;
    // Several periodic drift checks (every 400 ms here) later, still gone.
    let recreated = tokio::time::timeout(std::time::Duration::from_secs(2), async {
        loop {
            if cluster
                .object("batch/v1", "jobs", "default", "migrate")
                .is_some()
            {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(recreated.is_err(), "the finished Job was run again");
    assert_eq!(
        cluster.sim.writes("batch/v1", "jobs", "default", "migrate"),
        2,
        "its creation and the TTL controller's delete, nothing since"
    );
}
