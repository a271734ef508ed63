//! The agent under faults (issue "Agent correctness under faults"): each
//! test reproduces a defect found by fault injection and failed before its
//! fix. Real hub, kube-sim clusters and the real agent library.

use std::time::Duration;

use serde_json::json;
use unitsync_hub::control::Tuning;
use unitsync_proto::v1 as pb;
use unitsync_tests::cluster::TestCluster;
use unitsync_tests::fault_proxy::{FaultProxy, Mode};
use unitsync_tests::{TestHub, until, within};

const WEB: &str = include_str!("../../deploy/examples/messagewall/web.yaml");

async fn setup() -> (TestHub, TestCluster) {
    let hub = TestHub::start().await;
    hub.create_env("dev").await;
    let token = hub.create_cluster("dev-1", "dev").await;
    let mut cluster = TestCluster::new(&hub.endpoint(), hub.ca(), &token).await;
    cluster.start_agent();
    (hub, cluster)
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

/// Waits until `unit` is at `revision` in `phase` and the message passes
/// `check`; returns the message.
async fn wait_for(
    hub: &TestHub,
    unit: &str,
    revision: u64,
    phase: pb::Phase,
    check: impl Fn(&str) -> bool,
) -> String {
    let mut last = None;
    let waited = tokio::time::timeout(unitsync_tests::wait::DEADLINE, async {
        loop {
            let s = status(hub, unit).await;
            if let Some((r, p, m)) = &s
                && *r == revision
                && *p == phase
                && check(m)
            {
                return m.clone();
            }
            last = s;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    match waited {
        Ok(m) => m,
        Err(_) => panic!("{unit}@{revision} never reached {phase:?}; last status {last:?}"),
    }
}

async fn wait_phase(hub: &TestHub, unit: &str, revision: u64, phase: pb::Phase) -> String {
    wait_for(hub, unit, revision, phase, |_| true).await
}

/// `count` ConfigMaps named `{prefix}NN` in namespace `apps` (with the
/// namespace itself first).
fn configmaps(prefix: &str, count: usize) -> String {
    let mut docs = vec!["apiVersion: v1\nkind: Namespace\nmetadata:\n  name: apps\n".to_owned()];
    docs.extend((0..count).map(|i| {
        format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {prefix}{i:02}\n  namespace: apps\ndata:\n  v: \"{i}\"\n")
    }));
    docs.join("---\n")
}

fn count_of(cluster: &TestCluster, prefix: &str, count: usize) -> usize {
    (0..count)
        .filter(|i| {
            cluster
                .object("v1", "configmaps", "apps", &format!("{prefix}{i:02}"))
                .is_some()
        })
        .count()
}

/// How many entries a unit's inventory lists.
fn inventory_entries(cluster: &TestCluster, unit: &str) -> usize {
    let cm = inventory(cluster, unit).expect("the inventory exists");
    let inv: serde_json::Value =
        serde_json::from_str(cm["data"]["inventory"].as_str().unwrap()).unwrap();
    inv["entries"].as_array().map_or(0, Vec::len)
}

fn inventory(cluster: &TestCluster, unit: &str) -> Option<serde_json::Value> {
    cluster.object(
        "v1",
        "configmaps",
        "unitsync-system",
        &format!("unitsync-inventory-{unit}"),
    )
}

#[tokio::test]
async fn an_interrupted_apply_leaves_no_orphans_once_the_unit_is_destroyed() {
    let (hub, mut cluster) = setup().await;
    cluster.sim.faults().set_latency(Duration::from_millis(30));
    hub.put("dev/many", &configmaps("c", 30)).await.unwrap();
    until("part of the unit applied", || async {
        count_of(&cluster, "c", 30) >= 5
    })
    .await;
    cluster.stop_agent().await;
    let created = count_of(&cluster, "c", 30);
    assert!(created < 30, "stopped mid-apply ({created} of 30)");
    cluster.sim.faults().set_latency(Duration::ZERO);
    hub.destroy("dev/many").await.unwrap();
    cluster.start_agent();
    wait_phase(&hub, "dev/many", 2, pb::Phase::Destroyed).await;
    assert_eq!(
        count_of(&cluster, "c", 30),
        0,
        "every object the interrupted apply created is deleted"
    );
}

#[tokio::test]
async fn a_revision_superseding_an_apply_midway_leaves_no_orphans() {
    let (hub, cluster) = setup().await;
    cluster.sim.faults().set_latency(Duration::from_millis(30));
    hub.put("dev/many", &configmaps("c", 30)).await.unwrap();
    until("part of the unit applied", || async {
        count_of(&cluster, "c", 30) >= 5
    })
    .await;
    hub.put("dev/many", &configmaps("d", 3)).await.unwrap();
    cluster.sim.faults().set_latency(Duration::ZERO);
    wait_phase(&hub, "dev/many", 2, pb::Phase::Ready).await;
    assert_eq!(count_of(&cluster, "d", 3), 3);
    assert_eq!(
        count_of(&cluster, "c", 30),
        0,
        "objects of the superseded apply are pruned"
    );
}

#[tokio::test]
async fn a_deleted_agent_namespace_is_recreated_and_destroy_still_finds_every_object() {
    let (hub, cluster) = setup().await;
    hub.put("dev/cfg", &configmaps("c", 3)).await.unwrap();
    wait_phase(&hub, "dev/cfg", 1, pb::Phase::Ready).await;
    let uid = |c: &TestCluster| {
        c.object("v1", "namespaces", "", "unitsync-system")
            .map(|n| n["metadata"]["uid"].clone())
    };
    let before = uid(&cluster);
    let namespaces = cluster.api("v1", "Namespace", "namespaces", None);
    within(
        "delete the agent namespace",
        namespaces.delete("unitsync-system", &Default::default()),
    )
    .await
    .unwrap();
    // The agent may notice (its inventory is gone) and re-create it at once.
    until("the namespace was deleted", || async {
        uid(&cluster) != before
    })
    .await;
    // A new revision applies (the namespace and inventory come back).
    let v2 = configmaps("c", 3).replace("v: \"1\"", "v: \"one\"");
    hub.put("dev/cfg", &v2).await.unwrap();
    wait_phase(&hub, "dev/cfg", 2, pb::Phase::Ready).await;
    assert!(inventory(&cluster, "cfg").is_some(), "inventory re-created");
    // Lose the inventory again, then destroy: every object still goes.
    let cms = cluster.api("v1", "ConfigMap", "configmaps", Some("unitsync-system"));
    within(
        "delete the inventory",
        cms.delete("unitsync-inventory-cfg", &Default::default()),
    )
    .await
    .unwrap();
    hub.destroy("dev/cfg").await.unwrap();
    wait_phase(&hub, "dev/cfg", 3, pb::Phase::Destroyed).await;
    assert_eq!(count_of(&cluster, "c", 3), 0, "nothing orphaned");
    assert!(cluster.object("v1", "namespaces", "", "apps").is_none());
}

#[tokio::test]
async fn a_corrupt_inventory_is_reported_and_nothing_is_pruned_until_it_is_repaired() {
    let (hub, cluster) = setup().await;
    hub.put("dev/cfg", &configmaps("c", 3)).await.unwrap();
    wait_phase(&hub, "dev/cfg", 1, pb::Phase::Ready).await;
    cluster
        .apply_as(
            "someone",
            json!({"apiVersion": "v1", "kind": "ConfigMap",
                   "metadata": {"name": "unitsync-inventory-cfg", "namespace": "unitsync-system"},
                   "data": {"inventory": "{not json"}}),
        )
        .await;
    // Revision 2 drops c02.
    hub.put("dev/cfg", &configmaps("c", 2)).await.unwrap();
    let msg = wait_phase(&hub, "dev/cfg", 2, pb::Phase::Failed).await;
    assert!(
        msg.contains("inventory ConfigMap unitsync-system/unitsync-inventory-cfg is corrupt"),
        "{msg}"
    );
    assert!(
        cluster.object("v1", "configmaps", "apps", "c02").is_some(),
        "nothing pruned while the inventory is unreadable"
    );
    // Deleting the corrupt inventory lets the agent recover membership from
    // the objects' labels and finish the revision.
    let cms = cluster.api("v1", "ConfigMap", "configmaps", Some("unitsync-system"));
    within(
        "delete the corrupt inventory",
        cms.delete("unitsync-inventory-cfg", &Default::default()),
    )
    .await
    .unwrap();
    wait_phase(&hub, "dev/cfg", 2, pb::Phase::Ready).await;
    assert!(
        cluster.object("v1", "configmaps", "apps", "c02").is_none(),
        "pruned once membership was recovered"
    );
}

#[tokio::test]
async fn a_cluster_restored_empty_is_rebuilt_with_its_inventory() {
    let (hub, cluster) = setup().await;
    hub.put("dev/cfg", &configmaps("c", 3)).await.unwrap();
    wait_phase(&hub, "dev/cfg", 1, pb::Phase::Ready).await;
    cluster.sim.reset();
    until("objects and inventory re-created", || async {
        count_of(&cluster, "c", 3) == 3 && inventory(&cluster, "cfg").is_some()
    })
    .await;
    wait_phase(&hub, "dev/cfg", 1, pb::Phase::Ready).await;
    assert_eq!(inventory_entries(&cluster, "cfg"), 4);
}

#[tokio::test]
async fn a_deleted_object_is_recreated_only_once_its_inventory_is_written() {
    let (hub, cluster, metrics) = crate::agent::agent_with_metrics().await;
    hub.put("dev/cfg", &configmaps("c", 3)).await.unwrap();
    wait_phase(&hub, "dev/cfg", 1, pb::Phase::Ready).await;
    // The inventory can be neither read nor written (a restored cluster
    // whose agent namespace is not back yet, an API server in trouble),
    // and one of the unit's objects is deleted.
    cluster.sim.faults().fail("", "unitsync-inventory-cfg");
    let apps = cluster.api("v1", "ConfigMap", "configmaps", Some("apps"));
    within("delete c00", apps.delete("c00", &Default::default()))
        .await
        .unwrap();
    // Counted from the delete on: passes that failed before it prove
    // nothing about what the agent does with it.
    let unfinished = unfinished_passes(metrics).await;
    // A drift heal would re-create it outside any inventory (a crash
    // then orphans it for good): it comes back through a full pass only,
    // which writes the inventory first. The agent tries twice, and fails.
    until("two unfinished passes, or c00 back", || async {
        count_of(&cluster, "c", 3) == 3 || unfinished_passes(metrics).await >= unfinished + 2.0
    })
    .await;
    assert!(
        count_of(&cluster, "c", 3) < 3,
        "c00 was re-created while its inventory could not be written"
    );
    cluster.sim.faults().clear_failures();
    until("c00 back with its inventory", || async {
        count_of(&cluster, "c", 3) == 3
    })
    .await;
    wait_phase(&hub, "dev/cfg", 1, pb::Phase::Ready).await;
    assert_eq!(inventory_entries(&cluster, "cfg"), 4);
}

/// The agent's passes that did not finish (failed, or the API server did
/// not answer), from its metrics endpoint.
async fn unfinished_passes(metrics: std::net::SocketAddr) -> f64 {
    let page = crate::agent::agent_metrics(metrics).await;
    ["failed", "unknown"]
        .iter()
        .map(|result| {
            crate::agent::sample(
                &page,
                &format!("unitsync_agent_passes_total{{result=\"{result}\"}}"),
            )
        })
        .sum()
}

#[tokio::test]
async fn what_changed_while_the_watch_was_away_is_healed_when_it_re_lists() {
    let hub = TestHub::start().await;
    hub.create_env("dev").await;
    let token = hub.create_cluster("dev-1", "dev").await;
    let mut cluster = TestCluster::new(&hub.endpoint(), hub.ca(), &token).await;
    // Only the watch can notice in time: the periodic check is far away.
    cluster.config.tuning.drift_interval = Duration::from_secs(120);
    cluster.start_agent();
    hub.put("dev/cfg", &configmaps("c", 3)).await.unwrap();
    wait_phase(&hub, "dev/cfg", 1, pb::Phase::Ready).await;
    // The agent's watches drop and cannot come back for a while; an
    // object goes meanwhile, and the history it would resume from is
    // compacted (its watch gets 410 Gone and re-lists).
    cluster.sim.faults().fail("GET", "watch=true");
    cluster.sim.faults().drop_watches();
    let apps = cluster.api("v1", "ConfigMap", "configmaps", Some("apps"));
    within("delete c00", apps.delete("c00", &Default::default()))
        .await
        .unwrap();
    cluster.sim.compact();
    cluster.sim.faults().clear_failures();
    until("c00 re-created after the re-list", || async {
        count_of(&cluster, "c", 3) == 3
    })
    .await;
}

#[tokio::test]
async fn a_conflicting_object_does_not_stop_drift_healing_of_the_rest() {
    let (hub, cluster) = setup().await;
    let cm = |name: &str, v: &str| {
        format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\n  namespace: unitsync-system\ndata:\n  v: \"{v}\"\n"
        )
    };
    hub.put("dev/first", &cm("shared", "first")).await.unwrap();
    wait_phase(&hub, "dev/first", 1, pb::Phase::Ready).await;
    hub.put(
        "dev/second",
        &format!("{}---\n{}", cm("shared", "second"), cm("mine", "1")),
    )
    .await
    .unwrap();
    let msg = wait_phase(&hub, "dev/second", 1, pb::Phase::Failed).await;
    assert!(msg.contains("belongs to unit dev/first"), "{msg}");
    assert!(
        cluster
            .object("v1", "configmaps", "unitsync-system", "mine")
            .is_some()
    );
    // Someone edits the object that did apply: it is healed anyway.
    let cms = cluster.api("v1", "ConfigMap", "configmaps", Some("unitsync-system"));
    within(
        "edit",
        cms.patch(
            "mine",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"data": {"v": "edited"}})),
        ),
    )
    .await
    .unwrap();
    until("the applied object is healed", || async {
        cluster
            .object("v1", "configmaps", "unitsync-system", "mine")
            .unwrap()["data"]["v"]
            == "1"
    })
    .await;
    assert_eq!(
        cluster
            .object("v1", "configmaps", "unitsync-system", "shared")
            .unwrap()["data"]["v"],
        "first",
        "the other unit's object is not taken"
    );
}

#[tokio::test]
async fn a_kind_the_cluster_does_not_serve_fails_after_a_bounded_wait_with_every_error() {
    let hub = TestHub::start().await;
    hub.create_env("dev").await;
    let token = hub.create_cluster("dev-1", "dev").await;
    let mut cluster = TestCluster::new(&hub.endpoint(), hub.ca(), &token).await;
    cluster.config.crd_timeout = Duration::from_secs(1);
    cluster.start_agent();
    let widget = "apiVersion: example.com/v1\nkind: Widget\nmetadata:\n  name: w\n  namespace: default\n---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: fine\n  namespace: default\n";
    hub.put("dev/widgets", widget).await.unwrap();
    // First it waits (a CRD may be on its way), then it fails.
    wait_for(&hub, "dev/widgets", 1, pb::Phase::Progressing, |m| {
        m.contains("waiting for the cluster to serve Widget in example.com/v1")
    })
    .await;
    let msg = wait_phase(&hub, "dev/widgets", 1, pb::Phase::Failed).await;
    assert!(
        msg.contains("the cluster does not serve Widget in example.com/v1 (not served after 1s)"),
        "{msg}"
    );
    assert!(
        cluster
            .object("v1", "configmaps", "default", "fine")
            .is_some(),
        "the rest of the unit is applied"
    );
    // With another error in the unit, both are reported.
    let both =
        format!("{widget}---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: no-namespace\n");
    hub.put("dev/widgets", &both).await.unwrap();
    let msg = wait_phase(&hub, "dev/widgets", 2, pb::Phase::Failed).await;
    assert!(msg.contains("does not serve Widget"), "{msg}");
    assert!(
        msg.contains("ConfigMap no-namespace is namespaced but has no metadata.namespace"),
        "{msg}"
    );
}

#[tokio::test]
async fn a_failed_read_never_prunes_a_prune_protected_object() {
    let (hub, cluster) = setup().await;
    let keep = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: keep\n  namespace: apps\n  annotations:\n    unitsync.dev/prune: disabled\n";
    hub.put("dev/cfg", &format!("{}---\n{keep}", configmaps("c", 2)))
        .await
        .unwrap();
    wait_phase(&hub, "dev/cfg", 1, pb::Phase::Ready).await;
    // Reading `keep` fails; deleting it would not.
    cluster
        .sim
        .faults()
        .fail("GET", "/namespaces/apps/configmaps/keep");
    hub.put("dev/cfg", &configmaps("c", 2)).await.unwrap();
    let msg = wait_phase(&hub, "dev/cfg", 2, pb::Phase::Failed).await;
    assert!(
        msg.contains("not pruning ConfigMap apps/keep: cannot check whether it is prune-protected"),
        "{msg}"
    );
    assert!(cluster.object("v1", "configmaps", "apps", "keep").is_some());
    cluster.sim.faults().clear_failures();
    wait_phase(&hub, "dev/cfg", 2, pb::Phase::Ready).await;
    assert!(
        cluster.object("v1", "configmaps", "apps", "keep").is_some(),
        "prune-protected: kept"
    );
}

#[tokio::test]
async fn autoscalers_that_cannot_be_listed_are_not_fought() {
    let (hub, cluster) = setup().await;
    // An autoscaler someone else manages scales the Deployment.
    cluster
        .apply_json(
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "messagewall"}}),
        )
        .await;
    cluster
        .apply_as(
            "platform",
            json!({"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
                   "metadata": {"name": "web", "namespace": "messagewall"},
                   "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web"},
                            "minReplicas": 2, "maxReplicas": 10}}),
        )
        .await;
    hub.put("dev/web", WEB).await.unwrap();
    wait_phase(&hub, "dev/web", 1, pb::Phase::Ready).await;
    let deployments = cluster.api("apps/v1", "Deployment", "deployments", Some("messagewall"));
    within(
        "scale",
        deployments.patch(
            "web",
            &kube::api::PatchParams {
                field_manager: Some("hpa-controller".into()),
                ..Default::default()
            },
            &kube::api::Patch::Merge(json!({"spec": {"replicas": 5}})),
        ),
    )
    .await
    .unwrap();
    // Listing autoscalers fails from now on; then something drifts, so a
    // drift check runs over every object of the unit.
    cluster
        .sim
        .faults()
        .fail("GET", "/horizontalpodautoscalers");
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
    wait_for(&hub, "dev/web", 1, pb::Phase::Ready, |m| {
        m.contains("healed drift: ConfigMap messagewall/web-config")
    })
    .await;
    assert_eq!(
        cluster
            .object("apps/v1", "deployments", "messagewall", "web")
            .unwrap()["spec"]["replicas"],
        5,
        "the Deployment is not healed while its autoscalers are unknown"
    );
}

#[tokio::test]
async fn a_silent_partition_is_noticed_within_the_heartbeat_window_and_healed_promptly() {
    // A 12 s heartbeat: HTTP/2 pings every 4 s, dead after 4 s more. Before
    // the fix the hub held a silent connection for 3 heartbeats (36 s) and
    // pinged every 30 s with a 20 s timeout.
    let hub = TestHub::start_with(Tuning {
        heartbeat: Duration::from_secs(12),
        ..Tuning::default()
    })
    .await;
    hub.create_env("dev").await;
    let token = hub.create_cluster("dev-1", "dev").await;
    let proxy = FaultProxy::start(hub.addr).await;
    let mut cluster = TestCluster::new(&proxy.url(true), hub.ca(), &token).await;
    cluster.config.hub.keepalive = Duration::from_secs(2);
    cluster.start_agent();
    let connected = || async {
        hub.admin()
            .await
            .get_cluster(pb::GetClusterRequest {
                name: "dev-1".into(),
            })
            .await
            .is_ok_and(|c| c.into_inner().connected)
    };
    until("connected", connected).await;
    proxy.set(Mode::Blackhole);
    until("the hub notices the silent partition", || async {
        !connected().await
    })
    .await;
    hub.put("dev/cfg", &configmaps("c", 1)).await.unwrap();
    proxy.set(Mode::Pass);
    until("reconnected after the partition", connected).await;
    wait_phase(&hub, "dev/cfg", 1, pb::Phase::Ready).await;
}

#[tokio::test]
async fn sigterm_stops_the_agent_binary_cleanly() {
    use unitsync_tests::processes::{AgentProcess, SimProcess};
    let hub = TestHub::start().await;
    hub.create_env("dev").await;
    let token = hub.create_cluster("dev-1", "dev").await;
    let dir = tempfile::tempdir().unwrap();
    let (ca, token_file) = (dir.path().join("ca.crt"), dir.path().join("token"));
    std::fs::write(&ca, hub.ca().unwrap()).unwrap();
    std::fs::write(&token_file, token).unwrap();
    let sim = within("kube-sim", SimProcess::start(dir.path(), "c1", &[]))
        .await
        .unwrap();
    let mut agent = AgentProcess::start(
        &hub.endpoint(),
        &ca,
        &token_file,
        &sim.kubeconfig,
        &dir.path().join("state"),
        &[],
    )
    .await
    .unwrap();
    until("the agent connected", || async {
        hub.admin()
            .await
            .get_cluster(pb::GetClusterRequest {
                name: "dev-1".into(),
            })
            .await
            .is_ok_and(|c| c.into_inner().connected)
    })
    .await;
    // How Kubernetes stops a pod: the agent shuts down and exits 0.
    let status = within("the agent exits", agent.terminate())
        .await
        .expect("an exit status");
    assert!(status.success(), "exit after SIGTERM: {status:?}");
}
