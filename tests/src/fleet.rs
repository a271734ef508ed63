//! A fleet of real processes for the fault suite: `unitsync serve`, and per
//! cluster a `kube-sim` and an `unitsync-agent` that dials the hub through
//! its own [`FaultProxy`]. Commits go through the `unitsync` CLI (what an
//! operator runs) and are recorded in a [`History`]; reads use the hub's
//! gRPC API; every cluster is watched from the start.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tempfile::TempDir;
use tokio_util::sync::CancellationToken;
use unitsync_proto::v1 as pb;
use unitsync_proto::v1::hub_service_client::HubServiceClient;

use crate::fault_proxy::FaultProxy;
use crate::history::{Commit, History, HubRevision, Objects, Verdict, cluster_state, objects_of};
use crate::hub::{Admin, BearerAuth};
use crate::processes::{AgentProcess, HubProcess, SimProcess, cli, cli_with_input};

/// The environment every fleet unit lives in.
pub const ENV: &str = "dev";

pub struct Member {
    pub name: String,
    pub sim: SimProcess,
    pub agent: AgentProcess,
    pub proxy: FaultProxy,
    pub client: kube::Client,
}

pub struct Fleet {
    pub dir: TempDir,
    pub hub: HubProcess,
    pub members: Vec<Member>,
    pub history: Arc<History>,
    /// Units committed so far (`ENV/NAME`).
    units: std::sync::Mutex<Vec<String>>,
    stop: CancellationToken,
}

/// kube-sim arguments per cluster (faults at start).
pub struct ClusterSpec<'a> {
    pub name: &'a str,
    pub sim_args: &'a [&'a str],
}

impl Fleet {
    /// A hub (3 s heartbeat) and one kube-sim + agent per spec.
    pub async fn start(clusters: &[ClusterSpec<'_>]) -> anyhow::Result<Fleet> {
        let dir = tempfile::tempdir()?;
        let hub = HubProcess::start(&dir.path().join("hub"), 3).await?;
        hub.cli(&["env", "create", ENV]).await?;
        let history = Arc::new(History::default());
        let stop = CancellationToken::new();
        let mut members = Vec::new();
        for spec in clusters {
            let out = hub
                .cli(&["cluster", "create", spec.name, "--env", ENV, "-o", "json"])
                .await?;
            let v: serde_json::Value = serde_json::from_str(&out)?;
            let token = v["token"].as_str().context("agent token")?;
            let token_file = dir.path().join(format!("{}.token", spec.name));
            std::fs::write(&token_file, token)?;
            let sim = SimProcess::start(dir.path(), spec.name, spec.sim_args).await?;
            let proxy = FaultProxy::start(hub.grpc).await;
            let agent = AgentProcess::start(
                &proxy.url(true),
                &hub.ca_file(),
                &token_file,
                &sim.kubeconfig,
                &dir.path().join(format!("{}-state", spec.name)),
                &["--health-interval-ms", "200", "--drift-interval", "5"],
            )
            .await?;
            let client = sim.client().await?;
            history.watch(spec.name, client.clone(), stop.clone());
            members.push(Member {
                name: spec.name.to_owned(),
                sim,
                agent,
                proxy,
                client,
            });
        }
        Ok(Fleet {
            dir,
            hub,
            members,
            history,
            units: Default::default(),
            stop,
        })
    }

    pub fn member(&self, name: &str) -> &Member {
        self.members
            .iter()
            .find(|m| m.name == name)
            .expect("a fleet member")
    }

    pub fn member_mut(&mut self, name: &str) -> &mut Member {
        self.members
            .iter_mut()
            .find(|m| m.name == name)
            .expect("a fleet member")
    }

    /// A gRPC admin client (reads).
    pub async fn admin(&self) -> anyhow::Result<Admin> {
        admin_client(&self.hub.endpoint(), &self.hub.data_dir).await
    }

    fn remember(&self, unit: &str) {
        let mut units = self.units.lock().unwrap();
        if !units.iter().any(|u| u == unit) {
            units.push(unit.to_owned());
        }
    }

    /// Commits `manifests` as the next revision of `ENV/name` through the
    /// CLI; records it when the CLI reports success. Retries while the hub
    /// is away (an unacknowledged attempt is not recorded: it may or may
    /// not have committed).
    pub async fn commit(&self, name: &str, manifests: &str) -> anyhow::Result<Commit> {
        let unit = format!("{ENV}/{name}");
        self.remember(&unit);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let r = cli_with_input(
                &self.hub.data_dir,
                &self.hub.endpoint(),
                &[
                    "unit",
                    "update",
                    &unit,
                    "-f",
                    "-",
                    "-m",
                    "fault suite",
                    "-o",
                    "json",
                ],
                manifests,
            )
            .await;
            let r = match r {
                Err(e) if e.to_string().contains("not found") => {
                    cli_with_input(
                        &self.hub.data_dir,
                        &self.hub.endpoint(),
                        &[
                            "unit",
                            "create",
                            &unit,
                            "-f",
                            "-",
                            "-m",
                            "fault suite",
                            "-o",
                            "json",
                        ],
                        manifests,
                    )
                    .await
                }
                other => other,
            };
            match r {
                Ok(out) => return self.record(&unit, &out),
                Err(e) if Instant::now() > deadline => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// Destroys `ENV/name` through the CLI (recorded like a commit).
    pub async fn destroy(&self, name: &str) -> anyhow::Result<Commit> {
        let unit = format!("{ENV}/{name}");
        let out = cli(
            &self.hub.data_dir,
            &self.hub.endpoint(),
            &["unit", "destroy", &unit, "-o", "json"],
        )
        .await?;
        self.record(&unit, &out)
    }

    fn record(&self, unit: &str, out: &str) -> anyhow::Result<Commit> {
        let v: serde_json::Value = serde_json::from_str(out).context("CLI JSON")?;
        let c = Commit {
            unit: unit.to_owned(),
            revision: v["revision"].as_u64().context("revision")?,
            digest: v["digest"].as_str().context("digest")?.to_owned(),
        };
        self.history.commit(c.clone());
        Ok(c)
    }

    /// Every unit's head content as the hub has it (`None`: destroyed).
    pub async fn expected(&self) -> anyhow::Result<BTreeMap<String, Option<Objects>>> {
        let mut admin = self.admin().await?;
        let mut out = BTreeMap::new();
        let units = self.units.lock().unwrap().clone();
        for unit in units {
            let d = admin
                .get_unit(pb::GetUnitRequest {
                    unit: unit.clone(),
                    include_manifests: true,
                    ..Default::default()
                })
                .await?
                .into_inner();
            let head = d.head.unwrap_or_default();
            out.insert(unit, (!head.tombstone).then(|| objects_of(&head.manifests)));
        }
        Ok(out)
    }

    /// What every cluster runs, per unit.
    pub async fn state(&self) -> anyhow::Result<BTreeMap<String, BTreeMap<String, Objects>>> {
        let mut out = BTreeMap::new();
        for m in &self.members {
            out.insert(m.name.clone(), cluster_state(&m.client).await?);
        }
        Ok(out)
    }

    /// Whether `cluster` runs every unit's head.
    pub fn converged(
        expected: &BTreeMap<String, Option<Objects>>,
        state: &BTreeMap<String, Objects>,
    ) -> bool {
        expected.iter().all(|(unit, want)| {
            let have = state.get(unit);
            match want {
                None => have.is_none_or(BTreeMap::is_empty),
                Some(w) => have == Some(w),
            }
        })
    }

    /// Waits until every cluster runs every unit's head; returns how long
    /// it took.
    pub async fn converge(&self, within: Duration) -> anyhow::Result<Duration> {
        let start = Instant::now();
        loop {
            let expected = self.expected().await?;
            // A flaky cluster (the flaky-api scenario) fails some reads:
            // that is "not yet", not an error of the system under test.
            if let Ok(state) = self.state().await
                && state.values().all(|s| Self::converged(&expected, s))
            {
                return Ok(start.elapsed());
            }
            if start.elapsed() > within {
                bail!("not converged after {within:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Runs the history checker over everything recorded so far.
    pub async fn check(&self) -> anyhow::Result<Verdict> {
        let mut admin = self.admin().await?;
        let mut hub = BTreeMap::new();
        let units = self.units.lock().unwrap().clone();
        for unit in units {
            let revs = admin
                .unit_history(pb::UnitHistoryRequest { unit: unit.clone() })
                .await?
                .into_inner()
                .revisions
                .into_iter()
                .map(|r| HubRevision {
                    number: r.number,
                    digest: r.digest,
                    tombstone: r.tombstone,
                })
                .collect();
            hub.insert(unit, revs);
        }
        let expected = self.expected().await?;
        let state = self.state().await?;
        Ok(self.history.check(&hub, &expected, &state))
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// An admin client of a hub, from its data directory (`admin.token`,
/// `ca.crt`).
pub async fn admin_client(endpoint: &str, data_dir: &std::path::Path) -> anyhow::Result<Admin> {
    let ca = std::fs::read_to_string(data_dir.join("ca.crt"))?;
    let token = std::fs::read_to_string(data_dir.join("admin.token"))?;
    let channel = tonic::transport::Channel::from_shared(endpoint.to_owned())?
        .tls_config(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(ca)),
        )?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await?;
    Ok(HubServiceClient::with_interceptor(
        channel,
        BearerAuth::new(&token)?,
    ))
}

/// A namespace and `count` ConfigMaps `{prefix}-NNN` in it with `bytes` of
/// data each, marked with `mark` (so each revision differs).
pub fn configmaps(namespace: &str, prefix: &str, count: usize, bytes: usize, mark: &str) -> String {
    let filler = "x".repeat(bytes);
    let mut docs = vec![format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {namespace}\n"
    )];
    docs.extend((0..count).map(|i| {
        format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {prefix}-{i:03}\n  namespace: {namespace}\ndata:\n  mark: \"{mark}\"\n  filler: \"{filler}\"\n"
        )
    }));
    docs.join("---\n")
}
