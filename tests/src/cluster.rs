//! A simulated cluster with a real agent: kube-sim plus `unitsync-agent`
//! (in-process, the library the binary runs), connected to a test hub.

use std::time::Duration;

use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use unitsync_agent::config::{AgentConfig, KubeTarget};
use unitsync_agent::hub_client::HubConnection;
use unitsync_agent::reconcile::Tuning;

use crate::kube_sim::{KubeSim, SimOptions};
use crate::wait::within;

/// Installs the ring crypto provider once per process.
pub fn init_crypto() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

pub struct TestCluster {
    pub sim: KubeSim,
    pub client: kube::Client,
    pub dir: TempDir,
    pub config: AgentConfig,
    agent: Option<(CancellationToken, JoinHandle<()>)>,
}

/// Agent tuning for tests: fast health and drift checks.
pub fn fast_tuning() -> Tuning {
    Tuning {
        health_interval: Duration::from_millis(100),
        drift_interval: Duration::from_millis(400),
        ..Tuning::default()
    }
}

impl TestCluster {
    /// A kube-sim cluster with the agent namespace, and an agent config for
    /// `hub_endpoint` with `token` (not started).
    pub async fn new(hub_endpoint: &str, hub_ca: Option<&str>, token: &str) -> TestCluster {
        Self::with_sim(
            hub_endpoint,
            hub_ca,
            token,
            SimOptions {
                rollout_delay: Duration::from_millis(50),
                cr_delay: Duration::from_millis(50),
                crd_delay: Duration::from_millis(50),
                ..SimOptions::default()
            },
        )
        .await
    }

    /// [`TestCluster::new`] with the simulator tuned as given.
    pub async fn with_sim(
        hub_endpoint: &str,
        hub_ca: Option<&str>,
        token: &str,
        options: SimOptions,
    ) -> TestCluster {
        init_crypto();
        let sim = KubeSim::start(options).await.expect("kube-sim");
        let client = within("kube client", sim.client()).await.expect("client");
        let dir = tempfile::tempdir().expect("temp dir");
        let kubeconfig = dir.path().join("kubeconfig");
        std::fs::write(&kubeconfig, sim.kubeconfig("sim")).expect("kubeconfig");
        let c = TestCluster {
            sim,
            client,
            config: AgentConfig {
                hub: HubConnection {
                    endpoint: hub_endpoint.into(),
                    token: token.into(),
                    agent_version: "test".into(),
                    ca_pem: hub_ca.map(str::to_owned),
                    identity: None,
                    keepalive: HubConnection::DEFAULT_KEEPALIVE,
                },
                kube: KubeTarget::Kubeconfig {
                    path: kubeconfig,
                    context: None,
                },
                namespace: "unitsync-system".into(),
                state_dir: dir.path().join("state"),
                tuning: fast_tuning(),
                crd_timeout: Duration::from_secs(10),
                cert_validity: Duration::ZERO,
                health_listen: None,
                allowed_namespaces: Vec::new(),
            },
            dir,
            agent: None,
        };
        c.apply_json(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "unitsync-system"}})).await;
        c
    }

    pub fn start_agent(&mut self) {
        assert!(self.agent.is_none(), "agent already running");
        let stop = CancellationToken::new();
        let task = tokio::spawn({
            let config = self.config.clone();
            let stop = stop.clone();
            async move {
                if let Err(e) = unitsync_agent::run(config, stop).await {
                    panic!("agent failed: {e}");
                }
            }
        });
        self.agent = Some((stop, task));
    }

    /// Runs the agent as the service account `namespace/name`: its requests
    /// are then allowed only by the RBAC objects in the cluster (what an
    /// install's Roles and bindings grant), as a real API server allows an
    /// in-cluster agent's.
    pub fn run_as(&mut self, namespace: &str, name: &str) {
        assert!(self.agent.is_none(), "the agent is running");
        let path = self.dir.path().join("service-account.kubeconfig");
        std::fs::write(&path, self.sim.service_account_kubeconfig(namespace, name))
            .expect("kubeconfig");
        self.config.kube = KubeTarget::Kubeconfig {
            path,
            context: None,
        };
    }

    /// Loses the stopped agent's state directory (a replaced pod whose
    /// state was an `emptyDir`).
    pub fn forget_state(&self) {
        assert!(self.agent.is_none(), "the agent is running");
        match std::fs::remove_dir_all(&self.config.state_dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => panic!("removing the state directory: {e}"),
        }
    }

    pub async fn stop_agent(&mut self) {
        if let Some((stop, task)) = self.agent.take() {
            stop.cancel();
            within("agent stops", task).await.expect("agent task");
        }
    }

    pub fn api(
        &self,
        api_version: &str,
        kind: &str,
        plural: &str,
        namespace: Option<&str>,
    ) -> Api<DynamicObject> {
        let (g, v) = api_version.rsplit_once('/').unwrap_or(("", api_version));
        let ar = ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(g, v, kind), plural);
        match namespace {
            Some(ns) => Api::namespaced_with(self.client.clone(), ns, &ar),
            None => Api::all_with(self.client.clone(), &ar),
        }
    }

    /// Reads an object straight from the simulator (no client round trip).
    pub fn object(
        &self,
        api_version: &str,
        plural: &str,
        namespace: &str,
        name: &str,
    ) -> Option<Value> {
        self.sim.object(api_version, plural, namespace, name)
    }

    /// Applies an object as another field manager (`someone-else`).
    pub async fn apply_json(&self, v: Value) {
        self.apply_as("test-setup", v).await;
    }

    pub async fn apply_as(&self, manager: &str, v: Value) {
        let api_version = v["apiVersion"].as_str().expect("apiVersion");
        let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
        let gvk = GroupVersionKind::gvk(group, version, v["kind"].as_str().expect("kind"));
        let discovery = within(
            "discovery",
            kube::discovery::Discovery::new(self.client.clone()).run(),
        )
        .await
        .expect("discovery");
        let (ar, _) = discovery.resolve_gvk(&gvk).expect("a served kind");
        let name = v["metadata"]["name"].as_str().expect("name").to_owned();
        let api: Api<DynamicObject> = match v["metadata"]["namespace"].as_str() {
            Some(ns) => Api::namespaced_with(self.client.clone(), ns, &ar),
            None => Api::all_with(self.client.clone(), &ar),
        };
        within(
            "apply",
            api.patch(
                &name,
                &PatchParams::apply(manager).force(),
                &Patch::Apply(v),
            ),
        )
        .await
        .expect("apply");
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        if let Some((stop, _)) = &self.agent {
            stop.cancel();
        }
    }
}
