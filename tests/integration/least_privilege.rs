//! The agent with only what `unitsync agent install --export` grants it: the
//! exported Roles, ClusterRoles and bindings are applied to kube-sim, and the
//! agent runs as the install's service account, so kube-sim's RBAC allows
//! its requests as a real API server would (`403 Forbidden` for anything
//! else). Each test does the agent's whole job: apply, heal drift through
//! the watch, prune, and destroy, also after its inventory is lost.

use std::time::Duration;

use serde_json::{Value, json};
use unitsync_proto::v1 as pb;
use unitsync_tests::cluster::TestCluster;
use unitsync_tests::processes::bin;
use unitsync_tests::{TestHub, until, within};

use super::agent::wait_phase;

/// The install's manifests for `cluster`, with the `unitsync` binary.
fn install(cluster: &str, extra: &[&str]) -> Vec<Value> {
    let out = std::process::Command::new(bin("unitsync"))
        .args(["agent", "install", cluster, "--export"])
        .args(["--hub", "https://hub.example.com:7443"])
        .args(extra)
        .output()
        .expect("run unitsync agent install");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_saphyr::from_multiple::<Value>(&String::from_utf8_lossy(&out.stdout))
        .expect("YAML")
        .into_iter()
        .filter(|d| !d.is_null())
        .collect()
}

/// A hub, and a cluster whose agent (not started) runs with only what the
/// install grants; `apps` exists.
async fn setup(extra: &[&str]) -> (TestHub, TestCluster) {
    let hub = TestHub::start().await;
    hub.create_env("dev").await;
    let token = hub.create_cluster("dev-1", "dev").await;
    let mut cluster = TestCluster::new(&hub.endpoint(), hub.ca(), &token).await;
    cluster
        .apply_json(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "apps"}}))
        .await;
    for doc in install("dev-1", extra) {
        // The workload is this test's agent itself.
        if doc["kind"] != "Deployment" {
            cluster.apply_json(doc).await;
        }
    }
    cluster.run_as("unitsync-system", "unitsync-agent");
    // Drift must be found through the watch: the periodic check is an hour away.
    cluster.config.tuning.drift_interval = Duration::from_secs(3600);
    (hub, cluster)
}

fn config_map(name: &str, value: &str) -> String {
    format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\n  namespace: apps\ndata:\n  value: \"{value}\"\n"
    )
}

const DEPLOYMENT: &str = "apiVersion: apps/v1
kind: Deployment
metadata:
  name: api
  namespace: apps
spec:
  replicas: 1
  selector:
    matchLabels: {app: api}
  template:
    metadata:
      labels: {app: api}
    spec:
      containers:
        - name: api
          image: registry.example.com/api:1
";

fn unit(docs: &[String]) -> String {
    docs.join("---\n")
}

async fn drift_is_healed_through_the_watch(cluster: &TestCluster) {
    let cms = cluster.api("v1", "ConfigMap", "configmaps", Some("apps"));
    within(
        "edit",
        cms.patch(
            "a",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"data": {"value": "edited"}})),
        ),
    )
    .await
    .expect("edit");
    until("the edit undone through the watch", || async {
        cluster.object("v1", "configmaps", "apps", "a").unwrap()["data"]["value"] == "1"
    })
    .await;
}

async fn delete_inventory(cluster: &TestCluster) {
    let cms = cluster.api("v1", "ConfigMap", "configmaps", Some("unitsync-system"));
    within(
        "delete the inventory",
        cms.delete("unitsync-inventory-app", &Default::default()),
    )
    .await
    .expect("delete");
}

/// Apply, heal, prune and destroy, with the inventory lost before the prune
/// and before the destroy (membership then comes from the labels).
async fn the_whole_job(hub: &TestHub, cluster: &TestCluster) {
    let v1 = unit(&[
        config_map("a", "1"),
        config_map("b", "1"),
        DEPLOYMENT.into(),
    ]);
    hub.put("dev/app", &v1).await.unwrap();
    wait_phase(hub, "dev/app", 1, pb::Phase::Ready).await;
    drift_is_healed_through_the_watch(cluster).await;

    delete_inventory(cluster).await;
    let v2 = unit(&[config_map("a", "1"), DEPLOYMENT.into()]);
    hub.put("dev/app", &v2).await.unwrap();
    wait_phase(hub, "dev/app", 2, pb::Phase::Ready).await;
    assert!(
        cluster.object("v1", "configmaps", "apps", "b").is_none(),
        "b is pruned although the inventory was lost"
    );

    delete_inventory(cluster).await;
    hub.destroy("dev/app").await.unwrap();
    wait_phase(hub, "dev/app", 3, pb::Phase::Destroyed).await;
    for (api_version, plural, name) in
        [("v1", "configmaps", "a"), ("apps/v1", "deployments", "api")]
    {
        assert!(
            cluster.object(api_version, plural, "apps", name).is_none(),
            "{plural}/{name} is deleted when the unit reads Destroyed"
        );
    }
}

#[tokio::test]
async fn the_default_install_grants_the_agent_its_whole_job() {
    let (hub, mut cluster) = setup(&[]).await;
    cluster.start_agent();
    the_whole_job(&hub, &cluster).await;
}

#[tokio::test]
async fn a_namespaced_install_grants_the_agent_its_whole_job_in_its_namespaces() {
    let (hub, mut cluster) = setup(&["--rbac", "namespaced", "--namespaces", "apps"]).await;
    cluster.config.allowed_namespaces = vec!["apps".into()];
    cluster.start_agent();
    the_whole_job(&hub, &cluster).await;
}

#[tokio::test]
async fn an_object_outside_a_namespaced_install_fails_the_unit_naming_it() {
    let (hub, mut cluster) = setup(&["--rbac", "namespaced", "--namespaces", "apps"]).await;
    cluster.config.allowed_namespaces = vec!["apps".into()];
    cluster
        .apply_json(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "web"}}))
        .await;
    cluster.start_agent();
    let elsewhere = DEPLOYMENT.replace("namespace: apps", "namespace: web");
    hub.put("dev/app", &unit(&[config_map("a", "1"), elsewhere]))
        .await
        .unwrap();
    let message = wait_phase(&hub, "dev/app", 1, pb::Phase::Failed).await;
    assert!(
        message
            .contains("Deployment web/api is outside the namespaces this agent may change (apps)"),
        "{message}"
    );
    assert!(cluster.object("v1", "configmaps", "apps", "a").is_some());
    // What was refused was never the agent's: dropping it, and destroying
    // the unit, finish although the agent may not even read it.
    hub.put("dev/app", &config_map("a", "1")).await.unwrap();
    wait_phase(&hub, "dev/app", 2, pb::Phase::Ready).await;
    hub.destroy("dev/app").await.unwrap();
    wait_phase(&hub, "dev/app", 3, pb::Phase::Destroyed).await;
    assert!(cluster.object("v1", "configmaps", "apps", "a").is_none());
}

#[tokio::test]
async fn the_messagewall_example_needs_only_the_default_install_and_its_crossplane_role() {
    let (hub, mut cluster) = setup(&[]).await;
    let extension = include_str!("../../deploy/kubernetes/agent-crossplane-aws.yaml");
    for doc in serde_saphyr::from_multiple::<Value>(extension).expect("YAML") {
        cluster.apply_json(doc).await;
    }
    cluster.start_agent();
    let example: Vec<String> = [
        include_str!("../../deploy/examples/messagewall/crds.yaml"),
        include_str!("../../deploy/examples/messagewall/dynamodb.yaml"),
        include_str!("../../deploy/examples/messagewall/eventbridge.yaml"),
        include_str!("../../deploy/examples/messagewall/function-url.yaml"),
        include_str!("../../deploy/examples/messagewall/iam.yaml"),
        include_str!("../../deploy/examples/messagewall/lambda.yaml"),
        include_str!("../../deploy/examples/messagewall/s3.yaml"),
        include_str!("../../deploy/examples/messagewall/web.yaml"),
    ]
    .map(str::to_owned)
    .into();
    hub.put("dev/messagewall", &unit(&example)).await.unwrap();
    wait_phase(&hub, "dev/messagewall", 1, pb::Phase::Ready).await;
    hub.destroy("dev/messagewall").await.unwrap();
    wait_phase(&hub, "dev/messagewall", 2, pb::Phase::Destroyed).await;
    assert!(
        cluster
            .object("apps/v1", "deployments", "messagewall", "web")
            .is_none()
    );
}
