//! End-to-end benchmark: the real binaries (`unitsync serve`, N `kube-sim`
//! clusters, N `unitsync-agent`s), one unit of one ConfigMap committed K
//! times. It prints what users wait for: commit → applied in every
//! cluster (seen by a watch on each cluster), commit → Ready at the hub
//! (seen over `WatchStatus`), `unit update --wait` (the CLI process, end to
//! end), revisions per second one agent applies when commits arrive
//! back to back, and hub and agent RSS and CPU. Figures, not assertions.
//!
//! Run: `cargo build --release --bins && ./target/release/e2e-bench --clusters 3`

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::time::Instant;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};
use unitsync_proto::v1 as pb;
use unitsync_proto::v1::hub_service_client::HubServiceClient;
use unitsync_tests::hub::{Admin, BearerAuth};
use unitsync_tests::processes::{AgentProcess, HubProcess, SimProcess, cli, cli_with_input};

#[derive(Parser, Debug)]
#[command(
    name = "e2e-bench",
    about = "unitsync end to end: commit to applied, to Ready, --wait, throughput"
)]
struct Args {
    /// Clusters (a kube-sim and an agent each).
    #[arg(long, default_value_t = 3)]
    clusters: usize,
    /// Commits measured one at a time.
    #[arg(long, default_value_t = 50)]
    commits: usize,
    /// `unit update --wait` runs measured.
    #[arg(long, default_value_t = 10)]
    waits: usize,
    /// Commits sent back to back for the throughput figure.
    #[arg(long, default_value_t = 300)]
    burst: usize,
    /// Size of the large unit (ConfigMaps of 1,000 KiB each) for the agent
    /// memory figure, MiB (0: skip).
    #[arg(long, default_value_t = 3)]
    large_mib: usize,
}

/// When each value of the benchmark ConfigMap was first seen, per cluster.
type Seen = Arc<Mutex<BTreeMap<String, Vec<Instant>>>>;
/// When each revision was first Ready in every cluster, at the hub.
type Ready = Arc<Mutex<BTreeMap<u64, Instant>>>;

fn pct(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let i = ((s.len() as f64 - 1.0) * p).round() as usize;
    s[i.min(s.len() - 1)]
}

fn summary(name: &str, v: &[f64]) -> String {
    format!(
        "{name:<44} p50 {:>8.1} ms   p99 {:>8.1} ms   max {:>8.1} ms   (n={})",
        pct(v, 0.5),
        pct(v, 0.99),
        pct(v, 1.0),
        v.len()
    )
}

fn cm(name: &str, value: &str) -> String {
    format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\n  namespace: bench\ndata:\n  value: \"{value}\"\n"
    )
}

/// A line of /proc/PID/status in KiB (`VmRSS`, `VmHWM`).
fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(0)
}

/// RSS (KiB) and CPU seconds of a process, from /proc.
fn usage(pid: u32) -> (u64, f64) {
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(0);
    let cpu = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // Fields after the command name (which may hold spaces).
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            let utime: f64 = f.get(11)?.parse().ok()?;
            let stime: f64 = f.get(12)?.parse().ok()?;
            Some((utime + stime) / 100.0)
        })
        .unwrap_or(0.0);
    (rss, cpu)
}

async fn admin(hub: &HubProcess) -> anyhow::Result<Admin> {
    let ca = std::fs::read_to_string(hub.ca_file())?;
    let token = std::fs::read_to_string(hub.data_dir.join("admin.token"))?;
    let channel = Channel::from_shared(hub.endpoint())?
        .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)))?
        .connect()
        .await?;
    Ok(HubServiceClient::with_interceptor(
        channel,
        BearerAuth::new(&token)?,
    ))
}

/// Records, per cluster, when each value of `name` first appears.
fn watch_cluster(client: kube::Client, name: &'static str, seen: Seen) {
    tokio::spawn(async move {
        let api: Api<ConfigMap> = Api::namespaced(client, "bench");
        let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
        let mut stream = std::pin::pin!(watcher::watcher(api, config).default_backoff());
        while let Some(ev) = stream.next().await {
            let now = Instant::now();
            let objs = match ev {
                Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) => vec![o],
                _ => continue,
            };
            for o in objs {
                if let Some(v) = o.data.as_ref().and_then(|d| d.get("value")) {
                    seen.lock().unwrap().entry(v.clone()).or_default().push(now);
                }
            }
        }
    });
}

/// Records when each revision of `unit` is Ready in all `clusters`.
async fn watch_ready(
    mut admin: Admin,
    unit: &str,
    clusters: usize,
    ready: Ready,
) -> anyhow::Result<()> {
    let mut stream = admin
        .watch_status(pb::WatchStatusRequest {
            environment: String::new(),
            unit: unit.to_owned(),
        })
        .await?
        .into_inner();
    tokio::spawn(async move {
        let mut cells: BTreeMap<String, (u64, i32)> = BTreeMap::new();
        while let Ok(Some(ev)) = stream.message().await {
            let now = Instant::now();
            for c in ev.cells {
                cells.insert(c.cluster, (c.revision, c.phase));
            }
            if cells.len() < clusters {
                continue;
            }
            let revs: Vec<u64> = cells.values().map(|(r, _)| *r).collect();
            let rev = revs[0];
            if revs.iter().all(|r| *r == rev)
                && cells.values().all(|(_, p)| *p == pb::Phase::Ready as i32)
            {
                ready.lock().unwrap().entry(rev).or_insert(now);
            }
        }
    });
    Ok(())
}

async fn until<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> anyhow::Result<T> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out: {what}");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = Args::parse();
    let n = args.clusters;
    let dir = tempfile::tempdir()?;
    let hub = HubProcess::start(&dir.path().join("hub"), 30).await?;
    hub.cli(&["env", "create", "dev"]).await?;
    let mut sims = Vec::new();
    let mut agents = Vec::new();
    for i in 0..n {
        let name = format!("c{i}");
        let sim = SimProcess::start(dir.path(), &name, &[]).await?;
        let created = hub
            .cli(&["cluster", "create", &name, "--env", "dev", "-o", "json"])
            .await?;
        let token: serde_json::Value = serde_json::from_str(&created)?;
        let token_file = dir.path().join(format!("{name}.token"));
        std::fs::write(&token_file, token["token"].as_str().context("token")?)?;
        let client = sim.client().await?;
        let ns: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
        ns.patch(
            "bench",
            &PatchParams::apply("e2e-bench"),
            &Patch::Apply(serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "bench"}})),
        )
        .await?;
        let agent = AgentProcess::start(
            &hub.endpoint(),
            &hub.ca_file(),
            &token_file,
            &sim.kubeconfig,
            &dir.path().join(format!("{name}-agent")),
            &[],
        )
        .await?;
        sims.push((sim, client));
        agents.push(agent);
    }
    let mut admin = admin(&hub).await?;
    // Every agent connected.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let cs = admin
            .list_clusters(pb::ListClustersRequest {
                environment: "dev".into(),
            })
            .await?
            .into_inner()
            .clusters;
        if cs.iter().filter(|c| c.connected).count() == n {
            break;
        }
        if Instant::now() > deadline {
            bail!("agents did not connect");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "e2e-bench: {n} cluster(s), one ConfigMap per revision; {} commits one at a time, {} `--wait` runs, {} back to back",
        args.commits, args.waits, args.burst
    );

    // Latency, one commit at a time.
    let seen: Seen = Arc::default();
    let ready: Ready = Arc::default();
    for (_, client) in &sims {
        watch_cluster(client.clone(), "lat", seen.clone());
    }
    watch_ready(admin.clone(), "dev/lat", n, ready.clone()).await?;
    let (mut commit_ms, mut applied_ms, mut ready_ms) = (vec![], vec![], vec![]);
    for k in 0..=args.commits {
        let value = format!("v{k}");
        let t0 = Instant::now();
        let rev = admin
            .put_unit(pb::PutUnitRequest {
                unit: "dev/lat".into(),
                manifests: cm("lat", &value),
                message: String::new(),
                mode: pb::PutMode::Unspecified.into(),
                labels: Default::default(),
            })
            .await?
            .into_inner()
            .number;
        let committed = Instant::now();
        let applied = until("applied everywhere", || {
            let s = seen.lock().unwrap();
            let t = s.get(&value)?;
            (t.len() >= n).then(|| *t.iter().max().unwrap())
        })
        .await?;
        let r = until("Ready at the hub", || {
            ready.lock().unwrap().get(&rev).copied()
        })
        .await?;
        // The first commit creates the unit (and warms caches): not counted.
        if k > 0 {
            commit_ms.push((committed - t0).as_secs_f64() * 1e3);
            applied_ms.push((applied - committed).as_secs_f64() * 1e3);
            ready_ms.push((r - committed).as_secs_f64() * 1e3);
        }
    }

    // `unit update --wait`, the CLI process end to end.
    let (mut wait_ms, mut wait_over_ms) = (vec![], vec![]);
    let endpoint = hub.endpoint();
    for k in 0..args.waits {
        let value = format!("w{k}");
        let t0 = Instant::now();
        let out = cli_with_input(
            &hub.data_dir,
            &endpoint,
            &[
                "unit", "update", "dev/lat", "-f", "-", "--wait", "-o", "json",
            ],
            &cm("lat", &value),
        )
        .await?;
        let done = Instant::now();
        let rev: serde_json::Value = serde_json::Deserializer::from_str(&out)
            .into_iter::<serde_json::Value>()
            .next()
            .and_then(Result::ok)
            .unwrap_or_default();
        wait_ms.push((done - t0).as_secs_f64() * 1e3);
        if let Some(r) = rev["revision"]
            .as_u64()
            .and_then(|r| ready.lock().unwrap().get(&r).copied())
        {
            wait_over_ms.push((done.saturating_duration_since(r)).as_secs_f64() * 1e3);
        }
    }
    // The CLI's own start-up (TLS, token), for reference.
    let t0 = Instant::now();
    for _ in 0..args.waits {
        cli(&hub.data_dir, &endpoint, &["env", "list"]).await?;
    }
    let cli_start_ms = t0.elapsed().as_secs_f64() * 1e3 / args.waits.max(1) as f64;

    // Throughput: commits back to back to one unit.
    let burst_seen: Seen = Arc::default();
    for (_, client) in &sims {
        watch_cluster(client.clone(), "burst", burst_seen.clone());
    }
    // Sixteen in flight at a time: as fast as the hub commits.
    let t0 = Instant::now();
    let commits = futures::stream::iter(1..=args.burst)
        .map(|k| {
            let mut admin = admin.clone();
            async move {
                let value = format!("b{k}");
                let r = admin
                    .put_unit(pb::PutUnitRequest {
                        unit: "dev/burst".into(),
                        manifests: cm("burst", &value),
                        message: String::new(),
                        mode: pb::PutMode::Unspecified.into(),
                        labels: Default::default(),
                    })
                    .await
                    .map(|r| r.into_inner().number);
                (value, r)
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
    let sent = t0.elapsed();
    let mut last = (0, String::new());
    for (value, r) in commits {
        let number = r?;
        if number > last.0 {
            last = (number, value);
        }
    }
    let last = last.1;
    let finished = until("the last burst revision everywhere", || {
        let s = burst_seen.lock().unwrap();
        let t = s.get(&last)?;
        (t.len() >= n).then(|| *t.iter().max().unwrap())
    })
    .await?;
    let applied_distinct = burst_seen
        .lock()
        .unwrap()
        .values()
        .filter(|t| !t.is_empty())
        .count();
    let span = (finished - t0).as_secs_f64();

    // A large unit: what the agent holds while applying it and after.
    let mut large = None;
    if args.large_mib > 0 {
        let pid = agents[0].pid().context("agent pid")?;
        let before = status_kib(pid, "VmRSS:");
        // ConfigMaps of 1,000 KiB (the API server takes at most 1 MiB of
        // data per ConfigMap), as many as the size asks for.
        let payload = "x".repeat(1000 << 10);
        let text: String = (0..args.large_mib)
            .map(|i| {
                format!(
                    "---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: large-{i}\n  namespace: bench\ndata:\n  blob: \"{payload}\"\n"
                )
            })
            .collect();
        let rev = admin
            .put_unit(pb::PutUnitRequest {
                unit: "dev/large".into(),
                manifests: text,
                message: String::new(),
                mode: pb::PutMode::Unspecified.into(),
                labels: Default::default(),
            })
            .await?
            .into_inner()
            .number;
        let large_ready: Ready = Arc::default();
        watch_ready(admin.clone(), "dev/large", n, large_ready.clone()).await?;
        until("the large unit Ready", || {
            large_ready.lock().unwrap().get(&rev).copied()
        })
        .await?;
        let peak = status_kib(pid, "VmHWM:");
        // Idle: the drift check runs, then nothing.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let after = status_kib(pid, "VmRSS:");
        large = Some((before, peak, after));
    }

    let (hub_rss, hub_cpu) = hub.pid().await.map(usage).unwrap_or((0, 0.0));
    let agent_usage: Vec<(u64, f64)> = agents
        .iter()
        .filter_map(AgentProcess::pid)
        .map(usage)
        .collect();
    let agent_rss_max = agent_usage.iter().map(|u| u.0).max().unwrap_or(0);
    let agent_rss_avg =
        agent_usage.iter().map(|u| u.0).sum::<u64>() / agent_usage.len().max(1) as u64;
    let agent_cpu_avg =
        agent_usage.iter().map(|u| u.1).sum::<f64>() / agent_usage.len().max(1) as f64;

    println!();
    println!("{}", summary("commit (PutUnit round trip)", &commit_ms));
    println!(
        "{}",
        summary("commit -> applied in every cluster", &applied_ms)
    );
    println!(
        "{}",
        summary("commit -> Ready at the hub (WatchStatus)", &ready_ms)
    );
    println!(
        "{}",
        summary("`unit update --wait` (CLI process)", &wait_ms)
    );
    println!(
        "{}",
        summary("  of which after Ready at the hub", &wait_over_ms)
    );
    println!(
        "{:<44} {cli_start_ms:>8.1} ms per run (`unitsync env list`)",
        "  CLI start-up, TLS and one call"
    );
    println!(
        "{:<44} {} commits in {:.2} s ({:.0}/s); last applied everywhere after {:.2} s: {:.0} revisions/s per agent ({} distinct revisions applied, the rest coalesced)",
        "back-to-back commits to one unit",
        args.burst,
        sent.as_secs_f64(),
        args.burst as f64 / sent.as_secs_f64(),
        span,
        args.burst as f64 / span,
        applied_distinct
    );
    println!(
        "{:<44} hub {:.0} MiB, {:.1} s CPU; agents {:.0} MiB avg, {:.0} MiB max, {:.1} s CPU avg",
        "resources at the end",
        hub_rss as f64 / 1024.0,
        hub_cpu,
        agent_rss_avg as f64 / 1024.0,
        agent_rss_max as f64 / 1024.0,
        agent_cpu_avg
    );
    if let Some((before, peak, after)) = large {
        let size = (args.large_mib << 10) as f64;
        println!(
            "{:<44} RSS before {:.0} MiB, peak {:.0} MiB ({:.1}x the unit over the start), idle after {:.0} MiB",
            format!("agent with a {} MiB unit", args.large_mib),
            before as f64 / 1024.0,
            peak as f64 / 1024.0,
            (peak.saturating_sub(before)) as f64 / size,
            after as f64 / 1024.0
        );
    }
    drop(agents);
    drop(sims);
    hub.kill().await;
    Ok(())
}
