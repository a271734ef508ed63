//! Fan-out benchmark: N agents (real gRPC clients over loopback, one
//! process) against a real hub (`unitsync serve`, temp SQLite store, its own
//! process), K revisions committed; then the same clients against a bare
//! tonic broadcast server (no store, no protocol logic) in the same run.
//!
//! Prints commit->delivered latency p50/p99/max, deliveries per second,
//! server CPU and RSS, commit round trips and the time until every agent
//! holds every unit's last revision (the hub coalesces: an agent that is
//! behind gets the latest revision, not each one; the bare server sends
//! every message) for both, and the ratios; and how long a new connection
//! making one call (as each CLI run does) takes meanwhile. `--report` has
//! every agent also report each revision Ready and follows the hub's
//! `WatchStatus`: commit -> Ready (that revision or a later one) in every
//! cluster at the hub (the bare server drains the reports).
//! `--storm`
//! instead SIGKILLs and restarts the hub under N real session clients
//! (`--tls` with every agent's TLS handshake). Figures, not assertions.
//!
//! Run: `cargo run --release -p unitsync-tests --bin fanout-bench -- --agents 1000 --revisions 200`

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};
use clap::Parser;
use futures::Stream;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};
use unitsync_proto::dial;
use unitsync_proto::v1 as pb;
use unitsync_proto::v1::agent_message::Msg as AgentMsg;
use unitsync_proto::v1::hub_message::Msg as HubMsg;

#[derive(Parser, Debug, Clone)]
struct Args {
    /// Simulated agents (each its own cluster, token and TCP connection).
    #[arg(long, default_value_t = 1_000)]
    agents: usize,
    /// Revisions committed during the measurement.
    #[arg(long, default_value_t = 200)]
    revisions: usize,
    /// Units the revisions are spread over (round robin).
    #[arg(long, default_value_t = 10)]
    units: usize,
    /// Pace of the latency phase: one revision every this many milliseconds.
    #[arg(long, default_value_t = 20)]
    interval_ms: u64,
    /// Bytes of payload in each revision (one ConfigMap).
    #[arg(long, default_value_t = 512)]
    payload_bytes: usize,
    /// Only run the hub (skip the bare baseline).
    #[arg(long)]
    hub_only: bool,
    /// Each agent also reports every revision it receives Ready (as a real
    /// agent does once it is applied; here at once), and the hub's
    /// `WatchStatus` is followed: prints commit → Ready (that revision or
    /// a later one) in every cluster at the hub.
    #[arg(long, conflicts_with = "storm")]
    report: bool,
    /// Reconnect storm instead: the agents (the real session client, with
    /// its backoff) hold `--units` units; the hub is SIGKILLed and
    /// restarted; prints the time until every agent is back and resynced,
    /// the hub's CPU and RSS meanwhile, and how long an operator's new
    /// connection and call took meanwhile (one every 100 ms).
    #[arg(long)]
    storm: bool,
    /// With `--storm`: the hub serves TLS (its generated CA, as it does by
    /// default) and the agents verify it, so the storm includes every
    /// agent's TLS handshake.
    #[arg(long, requires = "storm")]
    tls: bool,
    /// Internal: serve the bare baseline on this address.
    #[arg(long, hide = true)]
    serve_baseline: Option<String>,
}

#[derive(Default, Clone)]
struct Figures {
    name: &'static str,
    latencies_us: Vec<u64>,
    deliveries: u64,
    expected: u64,
    elapsed: Duration,
    rss_kib: u64,
    peak_rss_kib: u64,
    /// Server CPU time spent during the phase, in seconds.
    server_cpu: f64,
    /// Commit round trips (PutUnit), sorted, in microseconds.
    commits_us: Vec<u64>,
    /// A new connection and one call (ListEnvironments) every 100 ms, as
    /// a CLI run makes, sorted, in microseconds.
    fresh_us: Vec<u64>,
    /// Agents holding every unit's last revision at the end (the hub
    /// coalesces: an agent behind gets the latest, not every revision);
    /// `None` for the bare server, which numbers nothing and delivers all.
    converged: Option<usize>,
    agents: usize,
    /// With `--report`, for the hub: commit → Ready in every cluster at
    /// the hub, sorted, in microseconds, and how many commits never got
    /// there (the hub coalesces: a later revision of the unit counts).
    ready: Option<(Vec<u64>, usize)>,
}

impl Figures {
    fn pct(&self, p: f64) -> f64 {
        percentile_ms(&self.latencies_us, p)
    }

    fn rate(&self) -> f64 {
        self.deliveries as f64 / self.elapsed.as_secs_f64()
    }

    fn print(&self) {
        println!(
            "{:<11} deliveries {:>8}/{:<8} p50 {:>8.2} ms  p99 {:>8.2} ms  max {:>8.2} ms  {:>10.0} deliveries/s  server CPU {:>4.2} cores  RSS {:>7.1} MiB (peak {:.1} MiB)",
            self.name,
            self.deliveries,
            self.expected,
            self.pct(0.50),
            self.pct(0.99),
            self.pct(1.0),
            self.rate(),
            self.server_cpu / self.elapsed.as_secs_f64(),
            self.rss_kib as f64 / 1024.0,
            self.peak_rss_kib as f64 / 1024.0,
        );
        println!(
            "{:<11} commits    {:>8}          p50 {:>8.2} ms  p99 {:>8.2} ms  max {:>8.2} ms  (PutUnit round trip)",
            "",
            self.commits_us.len(),
            percentile_ms(&self.commits_us, 0.50),
            percentile_ms(&self.commits_us, 0.99),
            percentile_ms(&self.commits_us, 1.0),
        );
        if self.fresh_us.is_empty() {
            println!(
                "{:<11} new conn.         0          (the phase ended before the first one, made 100 ms in)",
                ""
            );
        } else {
            println!(
                "{:<11} new conn.  {:>8}          p50 {:>8.2} ms  p99 {:>8.2} ms  max {:>8.2} ms  (connect + one call, as a CLI run)",
                "",
                self.fresh_us.len(),
                percentile_ms(&self.fresh_us, 0.50),
                percentile_ms(&self.fresh_us, 0.99),
                percentile_ms(&self.fresh_us, 1.0),
            );
        }
        let held = match self.converged {
            Some(n) => format!("{n}/{} agents hold every unit's last revision", self.agents),
            None => format!("{}/{} deliveries", self.deliveries, self.expected),
        };
        println!(
            "{:<11} converged  {held} {:.0} ms after the first commit",
            "",
            self.elapsed.as_secs_f64() * 1000.0
        );
        if let Some((ready_us, missing)) = &self.ready {
            println!(
                "{:<11} ready      {:>8}/{:<8} p50 {:>8.2} ms  p99 {:>8.2} ms  max {:>8.2} ms  (commit -> Ready in all {} clusters at the hub, over WatchStatus)",
                "",
                ready_us.len(),
                ready_us.len() + missing,
                percentile_ms(ready_us, 0.50),
                percentile_ms(ready_us, 0.99),
                percentile_ms(ready_us, 1.0),
                self.agents,
            );
        }
    }
}

/// The `p` percentile of sorted microseconds, in milliseconds.
fn percentile_ms(sorted_us: &[u64], p: f64) -> f64 {
    if sorted_us.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted_us.len() as f64 - 1.0) * p).round() as usize;
    sorted_us[i] as f64 / 1000.0
}

fn proc_status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn manifests(unit: usize, rev: usize, payload_bytes: usize) -> String {
    format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: u{unit}\n  namespace: bench\ndata:\n  revision: \"{rev}\"\n  payload: \"{}\"\n",
        "x".repeat(payload_bytes)
    )
}

/// What every agent task shares.
#[derive(Default)]
struct Collector {
    latencies: std::sync::Mutex<Vec<u64>>,
    deliveries: AtomicU64,
    last: std::sync::Mutex<Option<Instant>>,
}

impl Collector {
    fn reset(&self) {
        self.latencies.lock().unwrap().clear();
        self.deliveries.store(0, Ordering::Relaxed);
        *self.last.lock().unwrap() = None;
    }
}

type Session = (mpsc::Sender<pb::AgentMessage>, Streaming<pb::HubMessage>);

async fn open_session(endpoint: &str, token: &str) -> anyhow::Result<Session> {
    let channel = tonic::transport::Endpoint::from_shared(endpoint.to_owned())?
        .tcp_nodelay(true)
        .connect()
        .await?;
    let mut client = pb::agent_service_client::AgentServiceClient::new(channel);
    let (tx, rx) = mpsc::channel(64);
    tx.send(pb::AgentMessage {
        msg: Some(AgentMsg::Hello(pb::Hello {
            protocol_version: unitsync_proto::PROTOCOL_VERSION,
            agent_version: "bench".into(),
            units: vec![],
        })),
    })
    .await?;
    let mut req = Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse()?);
    let inbound = client.session(req).await?.into_inner();
    Ok((tx, inbound))
}

/// The latest revision an agent received, per unit.
type Held = Arc<std::sync::Mutex<HashMap<String, u64>>>;

/// One simulated agent: connect, hello, then receive and ack until `stop`.
async fn agent(
    endpoint: String,
    token: String,
    collector: Arc<Collector>,
    held: Held,
    ready: mpsc::Sender<Result<(), String>>,
    mut stop: tokio::sync::watch::Receiver<bool>,
    report: bool,
) -> anyhow::Result<()> {
    // Like a real agent, retry a refused or reset connection with backoff.
    let mut backoff = unitsync_proto::backoff::Backoff::default();
    let mut attempt = 0;
    let (tx, mut inbound) = loop {
        match open_session(&endpoint, &token).await {
            Ok(s) => break s,
            Err(e) if attempt >= 8 => return Err(e),
            Err(_) => {
                attempt += 1;
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
    };
    let mut signalled = false;
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            m = inbound.next() => {
                let Some(m) = m else { break };
                match m?.msg {
                    Some(HubMsg::Welcome(_)) if !signalled => {
                        signalled = true;
                        let _ = ready.send(Ok(())).await;
                    }
                    Some(HubMsg::Update(u)) => {
                        let now = SystemTime::now();
                        if let Some(at) = u.committed_at {
                            let at: SystemTime = at.try_into().unwrap_or(now);
                            let us = now.duration_since(at).unwrap_or_default().as_micros() as u64;
                            collector.latencies.lock().unwrap().push(us);
                        }
                        collector.deliveries.fetch_add(1, Ordering::Relaxed);
                        {
                            let mut held = held.lock().unwrap();
                            match held.get_mut(&u.unit) {
                                Some(r) => *r = (*r).max(u.revision),
                                None => {
                                    held.insert(u.unit.clone(), u.revision);
                                }
                            }
                        }
                        *collector.last.lock().unwrap() = Some(Instant::now());
                        let status = report.then(|| pb::StatusReport {
                            unit: u.unit.clone(),
                            revision: u.revision,
                            phase: pb::Phase::Ready as i32,
                            observed_at: Some(SystemTime::now().into()),
                            ..Default::default()
                        });
                        let _ = tx
                            .send(pb::AgentMessage { msg: Some(AgentMsg::Ack(pb::Ack { unit: u.unit, revision: u.revision })) })
                            .await;
                        if let Some(status) = status {
                            let _ = tx.send(pb::AgentMessage { msg: Some(AgentMsg::Status(status)) }).await;
                        }
                    }
                    _ => {}
                }
            }
        }
    }
    Ok(())
}

/// Connected agents of one server.
struct Fleet {
    collector: Arc<Collector>,
    held: Vec<Held>,
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

async fn connect_fleet(
    name: &str,
    endpoint: &str,
    tokens: &[String],
    report: bool,
) -> anyhow::Result<Fleet> {
    let collector = Arc::new(Collector::default());
    let (ready_tx, mut ready_rx) = mpsc::channel(tokens.len().max(1));
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::new();
    let held: Vec<Held> = tokens.iter().map(|_| Held::default()).collect();
    for (i, t) in tokens.iter().enumerate() {
        let ready = ready_tx.clone();
        let run = agent(
            endpoint.to_owned(),
            t.clone(),
            collector.clone(),
            held[i].clone(),
            ready.clone(),
            stop_rx.clone(),
            report,
        );
        tasks.push(tokio::spawn(async move {
            let r = run.await;
            if let Err(e) = &r {
                let _ = ready.send(Err(format!("{e:#}"))).await;
            }
            r
        }));
        if i % 250 == 249 {
            // Pace connection set-up a little so the accept queue keeps up.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    drop(ready_tx);
    for _ in 0..tokens.len() {
        match tokio::time::timeout(Duration::from_secs(300), ready_rx.recv()).await {
            Ok(Some(Ok(()))) => {}
            Ok(Some(Err(e))) => bail!("an agent failed to connect: {e}"),
            Ok(None) => bail!("agents ended before connecting"),
            Err(_) => bail!("agents did not all connect within 300 s"),
        }
    }
    eprintln!("{name}: {} agents connected", tokens.len());
    Ok(Fleet {
        collector,
        held,
        stop,
        tasks,
    })
}

impl Fleet {
    async fn close(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// Commits `args.revisions` revisions (paced by `interval`, or as fast as
/// the server takes them) and waits until deliveries stop.
#[allow(clippy::too_many_arguments)]
async fn phase(
    name: &'static str,
    args: &Args,
    fleet: &Fleet,
    endpoint: &str,
    admin_token: &str,
    agents: usize,
    interval: Option<Duration>,
    server_pid: u32,
    watch: bool,
) -> anyhow::Result<Figures> {
    let collector = &fleet.collector;
    collector.reset();
    let watching = match watch {
        true => Some(follow_ready(endpoint, admin_token).await?),
        false => None,
    };
    let start = Instant::now();
    let cpu_before = cpu_seconds(server_pid);
    // The committing pipelines run on a thread of their own (as separate
    // CI jobs would), so that their round trips do not queue behind this
    // process's agents.
    let (endpoint, token, load) = (endpoint.to_owned(), admin_token.to_owned(), args.clone());
    let committer = tokio::task::spawn_blocking(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(commit_revisions(&endpoint, &token, &load, interval, start))
    });
    let Committed {
        round_trips: mut commits_us,
        made,
        last,
        fresh: mut fresh_us,
    } = committer.await??;
    commits_us.sort_unstable();
    fresh_us.sort_unstable();
    let expected = (agents * args.revisions) as u64;
    // Wait until deliveries stop growing (coalescing may deliver fewer).
    let mut last_seen = 0;
    let mut quiet_since = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let d = collector.deliveries.load(Ordering::Relaxed);
        if d >= expected {
            break;
        }
        if d != last_seen {
            last_seen = d;
            quiet_since = Instant::now();
        } else if quiet_since.elapsed() > Duration::from_secs(5) {
            break;
        }
    }
    let end = collector.last.lock().unwrap().unwrap_or_else(Instant::now);
    let server_cpu = cpu_seconds(server_pid) - cpu_before;
    // The bare server numbers nothing (every revision is 0).
    let converged = last.values().any(|n| *n > 0).then(|| {
        fleet
            .held
            .iter()
            .filter(|held| {
                let held = held.lock().unwrap();
                last.iter()
                    .all(|(unit, n)| held.get(&format!("u{unit}")).is_some_and(|h| h >= n))
            })
            .count()
    });
    let ready = match watching {
        Some((log, stop)) => {
            // Until every commit is Ready everywhere, or no status has
            // come for 5 s.
            let mut figures = ready_figures(&log, &made, agents);
            let (mut count, mut quiet_since) = (0, Instant::now());
            while figures.1 > 0 && quiet_since.elapsed() < Duration::from_secs(5) {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let now: usize = log.lock().unwrap().values().map(Vec::len).sum();
                if now != count {
                    (count, quiet_since) = (now, Instant::now());
                    figures = ready_figures(&log, &made, agents);
                }
            }
            drop(stop);
            Some(figures)
        }
        None => None,
    };
    let mut latencies = std::mem::take(&mut *collector.latencies.lock().unwrap());
    latencies.sort_unstable();
    Ok(Figures {
        name,
        deliveries: collector.deliveries.load(Ordering::Relaxed),
        expected,
        latencies_us: latencies,
        elapsed: end.saturating_duration_since(start),
        rss_kib: proc_status_kib(server_pid, "VmRSS:"),
        peak_rss_kib: proc_status_kib(server_pid, "VmHWM:"),
        server_cpu,
        commits_us,
        fresh_us,
        converged,
        agents,
        ready,
    })
}

/// Each cluster's Ready revisions of each unit (by its name in the
/// environment), as the hub's `WatchStatus` showed them, and when.
type ReadyLog = Arc<std::sync::Mutex<HashMap<(String, String), Vec<(u64, Instant)>>>>;

/// Follows the hub's `WatchStatus` of the `bench` environment into a log,
/// once its snapshot is complete (changes only from there on), until the
/// returned sender is dropped. It runs on a thread of its own, so that
/// the time an event is seen does not include a wait behind this
/// process's agents.
async fn follow_ready(
    endpoint: &str,
    token: &str,
) -> anyhow::Result<(ReadyLog, tokio::sync::oneshot::Sender<()>)> {
    let log = ReadyLog::default();
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (endpoint, token, kept) = (endpoint.to_owned(), token.to_owned(), log.clone());
    std::thread::spawn(move || {
        let follow = async move {
            let mut stream = match subscribe_status(&endpoint, &token).await {
                Ok(stream) => stream,
                Err(e) => {
                    let _ = started_tx.send(Err(e));
                    return;
                }
            };
            let _ = started_tx.send(Ok(()));
            let events = async {
                loop {
                    let event = match stream.message().await {
                        Ok(Some(event)) => event,
                        Ok(None) => break,
                        Err(e) => {
                            eprintln!("status watcher: WatchStatus failed: {e}");
                            break;
                        }
                    };
                    let now = Instant::now();
                    let mut log = kept.lock().unwrap();
                    for cell in event.cells {
                        if cell.phase == pb::Phase::Ready as i32 {
                            let unit = cell.unit.rsplit('/').next().unwrap_or_default();
                            log.entry((cell.cluster, unit.to_owned()))
                                .or_default()
                                .push((cell.revision, now));
                        }
                    }
                }
            };
            tokio::select! {
                () = events => {}
                _ = stopped => {}
            }
        };
        match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(runtime) => runtime.block_on(follow),
            Err(e) => eprintln!("status watcher: {e}"),
        }
    });
    started_rx.await.context("the status watcher ended")??;
    Ok((log, stop))
}

/// `WatchStatus` of the `bench` environment, its snapshot read.
async fn subscribe_status(
    endpoint: &str,
    token: &str,
) -> anyhow::Result<Streaming<pb::StatusEvent>> {
    let mut admin = connect_admin(endpoint).await?;
    let request = pb::WatchStatusRequest {
        environment: "bench".into(),
        unit: String::new(),
    };
    let mut stream = admin
        .watch_status(authed(request, token)?)
        .await?
        .into_inner();
    loop {
        let event = tokio::time::timeout(Duration::from_secs(60), stream.message())
            .await
            .context("no WatchStatus snapshot within 60 s")??
            .context("WatchStatus ended before its snapshot")?;
        if event.snapshot_complete {
            return Ok(stream);
        }
    }
}

/// For each commit, how long from sending it until all `clusters` showed
/// it, or a later revision of its unit, Ready (the hub coalesces: an agent
/// that is behind gets only the latest), sorted, in µs; and how many
/// commits did not get there.
fn ready_figures(
    log: &ReadyLog,
    made: &[(usize, u64, Instant)],
    clusters: usize,
) -> (Vec<u64>, usize) {
    let log = log.lock().unwrap();
    let mut by_unit: HashMap<&str, Vec<&Vec<(u64, Instant)>>> = HashMap::new();
    for ((_, unit), seen) in log.iter() {
        by_unit.entry(unit.as_str()).or_default().push(seen);
    }
    let (mut ready_us, mut missing) = (Vec::new(), 0);
    for (unit, number, at) in made {
        let everywhere = by_unit
            .get(format!("u{unit}").as_str())
            .filter(|seen| seen.len() == clusters)
            .and_then(|seen| {
                seen.iter()
                    .map(|s| s.iter().find(|(r, _)| r >= number).map(|(_, t)| *t))
                    .collect::<Option<Vec<Instant>>>()
            })
            .and_then(|times| times.into_iter().max());
        match everywhere {
            Some(t) => ready_us.push(t.saturating_duration_since(*at).as_micros() as u64),
            None => missing += 1,
        }
    }
    ready_us.sort_unstable();
    (ready_us, missing)
}

/// Commits `args.revisions` revisions over `args.units` units: one every
/// `interval` from `start`, or (no interval) as fast as the server takes
/// them, each unit's revisions one after the other and the units side by
/// side (as independent pipelines publish them). Returns the round trips
/// (µs) and the last revision number committed to each unit. Meanwhile,
/// every 100 ms, a new connection makes one call (as each CLI run does).
async fn commit_revisions(
    endpoint: &str,
    token: &str,
    args: &Args,
    interval: Option<Duration>,
    start: Instant,
) -> anyhow::Result<Committed> {
    let (revisions, units) = (args.revisions, args.units);
    let admin = connect_admin(endpoint).await?;
    let put = |r: usize| {
        let unit = r % units;
        authed(
            pb::PutUnitRequest {
                unit: format!("bench/u{unit}"),
                manifests: manifests(unit, r, args.payload_bytes),
                message: String::new(),
                mode: 0,
                labels: Default::default(),
            },
            token,
        )
    };
    let commits = std::sync::Mutex::new(Vec::with_capacity(revisions));
    let made = std::sync::Mutex::new(Vec::with_capacity(revisions));
    let last = std::sync::Mutex::new(HashMap::new());
    let timed = |r: usize, at: Instant, number: u64| {
        commits
            .lock()
            .unwrap()
            .push(at.elapsed().as_micros() as u64);
        made.lock().unwrap().push((r % units, number, at));
        let mut last = last.lock().unwrap();
        let n = last.entry(r % units).or_insert(0);
        *n = number.max(*n);
    };
    let fresh = std::sync::Mutex::new(Vec::new());
    let fresh_calls = async {
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if let Some(us) = operator_call_us(endpoint, None, token).await {
                fresh.lock().unwrap().push(us);
            }
        }
    };
    let commits_made = async {
        match interval {
            Some(i) => {
                let mut admin = admin.clone();
                for r in 0..revisions {
                    tokio::time::sleep_until((start + i * r as u32).into()).await;
                    let t = Instant::now();
                    let committed = admin.put_unit(put(r)?).await?;
                    timed(r, t, committed.get_ref().number);
                }
            }
            None => {
                let pipelines = (0..units).map(|unit| {
                    let mut admin = admin.clone();
                    let (put, timed) = (&put, &timed);
                    async move {
                        for r in (unit..revisions).step_by(units) {
                            let t = Instant::now();
                            let committed = admin.put_unit(put(r)?).await?;
                            timed(r, t, committed.get_ref().number);
                        }
                        anyhow::Ok(())
                    }
                });
                for r in futures::future::join_all(pipelines).await {
                    r?;
                }
            }
        }
        anyhow::Ok(())
    };
    tokio::select! {
        made = commits_made => made?,
        _ = fresh_calls => {}
    }
    Ok(Committed {
        round_trips: commits.into_inner().unwrap(),
        made: made.into_inner().unwrap(),
        last: last.into_inner().unwrap(),
        fresh: fresh.into_inner().unwrap(),
    })
}

/// What a phase's committer saw.
struct Committed {
    round_trips: Vec<u64>,
    /// Each commit: its unit, its revision number and when it was sent.
    made: Vec<(usize, u64, Instant)>,
    last: HashMap<usize, u64>,
    /// A new connection and one call, in µs.
    fresh: Vec<u64>,
}

/// Both phases against one server.
async fn measure(
    names: [&'static str; 2],
    args: &Args,
    endpoint: &str,
    admin_token: &str,
    tokens: &[String],
    server_pid: u32,
    watch: bool,
) -> anyhow::Result<[Figures; 2]> {
    let fleet = connect_fleet(names[0], endpoint, tokens, args.report).await?;
    let interval = Duration::from_millis(args.interval_ms);
    let paced = phase(
        names[0],
        args,
        &fleet,
        endpoint,
        admin_token,
        tokens.len(),
        Some(interval),
        server_pid,
        watch,
    )
    .await?;
    let burst = phase(
        names[1],
        args,
        &fleet,
        endpoint,
        admin_token,
        tokens.len(),
        None,
        server_pid,
        watch,
    )
    .await?;
    fleet.close().await;
    Ok([paced, burst])
}

fn authed<T>(msg: T, token: &str) -> anyhow::Result<Request<T>> {
    let mut r = Request::new(msg);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse()?);
    Ok(r)
}

fn sibling_binary(name: &str) -> anyhow::Result<std::path::PathBuf> {
    let exe = std::env::current_exe()?;
    let p = exe.parent().context("no parent")?.join(name);
    if !p.exists() {
        bail!(
            "{} is missing: build it first (cargo build --release --bins)",
            p.display()
        );
    }
    Ok(p)
}

fn free_addr() -> anyhow::Result<std::net::SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn connect_admin(
    endpoint: &str,
) -> anyhow::Result<pb::hub_service_client::HubServiceClient<tonic::transport::Channel>> {
    connect_admin_with(endpoint, None).await
}

/// An admin client, trusting `ca` (PEM) when the endpoint is TLS.
async fn connect_admin_with(
    endpoint: &str,
    ca: Option<&str>,
) -> anyhow::Result<pb::hub_service_client::HubServiceClient<tonic::transport::Channel>> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match connect_hub(endpoint, ca).await {
            Ok(c) => return Ok(pb::hub_service_client::HubServiceClient::new(c)),
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => return Err(e),
        }
    }
}

/// The hub at `endpoint`, trusting `ca` (PEM) when given (TLS), dialed as
/// the CLI dials it (naming the operator's role in the handshake).
async fn connect_hub(
    endpoint: &str,
    ca: Option<&str>,
) -> anyhow::Result<tonic::transport::Channel> {
    let (target, dialer) = dial::prepare(endpoint, dial::Role::Operator, ca, None)?;
    Ok(target.connect_with_connector(dialer).await?)
}

/// An operator's new connection (TLS when `ca` is given) and one call:
/// how long it took, or `None` if it failed (the hub not up yet).
async fn operator_call_us(endpoint: &str, ca: Option<&str>, token: &str) -> Option<u64> {
    let start = Instant::now();
    let call = async {
        let mut client =
            pb::hub_service_client::HubServiceClient::new(connect_hub(endpoint, ca).await.ok()?);
        client
            .list_environments(authed(pb::ListEnvironmentsRequest::default(), token).ok()?)
            .await
            .ok()
    };
    tokio::time::timeout(Duration::from_secs(60), call)
        .await
        .ok()??;
    Some(start.elapsed().as_micros() as u64)
}

/// A hub process for the benchmark, its admin client and `agents`
/// registered clusters (their tokens).
struct BenchHub {
    child: Child,
    endpoint: String,
    admin: pb::hub_service_client::HubServiceClient<tonic::transport::Channel>,
    admin_token: String,
    tokens: Vec<String>,
    /// The hub's data directory and address (a restart reuses both).
    dir: tempfile::TempDir,
    addr: std::net::SocketAddr,
    /// The CA agents trust (TLS only).
    ca: Option<String>,
}

/// Starts `unitsync serve` (plaintext unless `tls`: like the bare
/// baseline, so that the comparison is about the hub's logic, not TLS)
/// and registers the environment `bench` with `agents` clusters.
async fn start_bench_hub(agents: usize, label: &str, tls: bool) -> anyhow::Result<BenchHub> {
    let dir = tempfile::tempdir()?;
    let addr = free_addr()?;
    let child = Child(hub_command(dir.path(), addr, agents, tls)?);
    // Written by the hub once it has started.
    let token_path = dir.path().join("admin.token");
    let ca_path = dir.path().join("ca.crt");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(token_path.exists() && (!tls || ca_path.exists())) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ca = if tls {
        Some(std::fs::read_to_string(&ca_path)?)
    } else {
        None
    };
    let endpoint = format!("{}://{addr}", if tls { "https" } else { "http" });
    let mut admin = connect_admin_with(&endpoint, ca.as_deref()).await?;
    let admin_token = std::fs::read_to_string(&token_path)?.trim().to_owned();
    admin
        .create_environment(authed(
            pb::CreateEnvironmentRequest {
                name: "bench".into(),
                after: String::new(),
                policy: None,
            },
            &admin_token,
        )?)
        .await?;
    eprintln!("{label}: registering {agents} clusters");
    let mut tokens = Vec::with_capacity(agents);
    for i in 0..agents {
        let req = authed(
            pb::CreateClusterRequest {
                name: format!("c{i}"),
                environment: "bench".into(),
                labels: Default::default(),
            },
            &admin_token,
        )?;
        tokens.push(admin.create_cluster(req).await?.into_inner().token);
    }
    Ok(BenchHub {
        child,
        endpoint,
        admin,
        admin_token,
        tokens,
        dir,
        addr,
        ca,
    })
}

async fn run_hub(args: &Args) -> anyhow::Result<[Figures; 2]> {
    let BenchHub {
        child,
        endpoint,
        admin: _,
        admin_token,
        tokens,
        // Kept until the measurement ends: the hub's store lives there.
        dir: _dir,
        addr: _,
        ca: _,
    } = start_bench_hub(args.agents, "hub", false).await?;
    measure(
        ["hub paced", "hub burst"],
        args,
        &endpoint,
        &admin_token,
        &tokens,
        child.0.id(),
        args.report,
    )
    .await
}

async fn run_baseline(args: &Args) -> anyhow::Result<[Figures; 2]> {
    let addr = free_addr()?;
    let child = Child(
        std::process::Command::new(std::env::current_exe()?)
            .arg("--serve-baseline")
            .arg(addr.to_string())
            .spawn()?,
    );
    let endpoint = format!("http://{addr}");
    connect_admin(&endpoint).await?;
    let tokens = vec![String::from("none"); args.agents];
    measure(
        ["bare paced", "bare burst"],
        args,
        &endpoint,
        "none",
        &tokens,
        child.0.id(),
        false,
    )
    .await
}

// === the bare baseline server ===

/// Broadcasts every published update to every stream; nothing else.
#[derive(Clone)]
struct Bare {
    tx: broadcast::Sender<Arc<pb::UnitUpdate>>,
}

type Out = Pin<Box<dyn Stream<Item = Result<pb::HubMessage, Status>> + Send>>;

#[tonic::async_trait]
impl pb::agent_service_server::AgentService for Bare {
    async fn renew_certificate(
        &self,
        _: Request<pb::RenewCertificateRequest>,
    ) -> Result<Response<pb::RenewCertificateResponse>, Status> {
        Err(Status::unimplemented("bare"))
    }

    type SessionStream = Out;

    async fn session(
        &self,
        req: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Out>, Status> {
        let mut inbound = req.into_inner();
        let mut rx = self.tx.subscribe();
        let (out_tx, out_rx) = mpsc::channel(16);
        let _ = out_tx
            .send(Ok(pb::HubMessage {
                msg: Some(HubMsg::Welcome(pb::Welcome::default())),
            }))
            .await;
        tokio::spawn(async move { while let Some(Ok(_)) = inbound.next().await {} });
        tokio::spawn(async move {
            while let Ok(u) = rx.recv().await {
                if out_tx
                    .send(Ok(pb::HubMessage {
                        msg: Some(HubMsg::Update((*u).clone())),
                    }))
                    .await
                    .is_err()
                {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(out_rx),
        )))
    }
}

#[tonic::async_trait]
impl pb::hub_service_server::HubService for Bare {
    async fn put_unit(
        &self,
        req: Request<pb::PutUnitRequest>,
    ) -> Result<Response<pb::Revision>, Status> {
        let r = req.into_inner();
        let _ = self.tx.send(Arc::new(pb::UnitUpdate {
            unit: r.unit,
            revision: 1,
            manifests: r.manifests,
            committed_at: Some(SystemTime::now().into()),
            ..Default::default()
        }));
        Ok(Response::new(pb::Revision::default()))
    }
    async fn create_environment(
        &self,
        _: Request<pb::CreateEnvironmentRequest>,
    ) -> Result<Response<pb::Environment>, Status> {
        Err(Status::unimplemented("bare"))
    }
    async fn list_environments(
        &self,
        _: Request<pb::ListEnvironmentsRequest>,
    ) -> Result<Response<pb::ListEnvironmentsResponse>, Status> {
        Ok(Response::new(pb::ListEnvironmentsResponse::default()))
    }
    async fn create_cluster(
        &self,
        _: Request<pb::CreateClusterRequest>,
    ) -> Result<Response<pb::CreateClusterResponse>, Status> {
        Err(Status::unimplemented("bare"))
    }
    async fn list_clusters(
        &self,
        _: Request<pb::ListClustersRequest>,
    ) -> Result<Response<pb::ListClustersResponse>, Status> {
        Err(Status::unimplemented("bare"))
    }
    async fn get_cluster(
        &self,
        _: Request<pb::GetClusterRequest>,
    ) -> Result<Response<pb::Cluster>, Status> {
        Err(Status::unimplemented("bare"))
    }
    async fn delete_cluster(
        &self,
        _: Request<pb::DeleteClusterRequest>,
    ) -> Result<Response<pb::DeleteClusterResponse>, Status> {
        Err(Status::unimplemented("bare"))
    }
    async fn destroy_unit(
        &self,
        _: Request<pb::DestroyUnitRequest>,
    ) -> Result<Response<pb::Revision>, Status> {
        Err(Status::unimplemented("bare"))
    }
    async fn get_unit(
        &self,
        _: Request<pb::GetUnitRequest>,
    ) -> Result<Response<pb::UnitDetail>, Status> {
        Err(Status::unimplemented("bare"))
    }
    async fn list_units(
        &self,
        _: Request<pb::ListUnitsRequest>,
    ) -> Result<Response<pb::ListUnitsResponse>, Status> {
        Err(Status::unimplemented("bare"))
    }
    async fn unit_history(
        &self,
        _: Request<pb::UnitHistoryRequest>,
    ) -> Result<Response<pb::UnitHistoryResponse>, Status> {
        Err(Status::unimplemented("bare"))
    }
    async fn get_revision(
        &self,
        _: Request<pb::GetRevisionRequest>,
    ) -> Result<Response<pb::Revision>, Status> {
        Err(Status::unimplemented("bare"))
    }
    async fn get_status(
        &self,
        _: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::StatusMatrix>, Status> {
        Err(Status::unimplemented("bare"))
    }
    async fn list_audit(
        &self,
        _: Request<pb::ListAuditRequest>,
    ) -> Result<Response<pb::ListAuditResponse>, Status> {
        Err(Status::unimplemented("bare"))
    }
    async fn set_environment_policy(
        &self,
        _: Request<pb::SetEnvironmentPolicyRequest>,
    ) -> Result<Response<pb::Environment>, Status> {
        Err(Status::unimplemented("bare"))
    }
    async fn link_unit(
        &self,
        _: Request<pb::LinkUnitRequest>,
    ) -> Result<Response<pb::Revision>, Status> {
        Err(Status::unimplemented("bare"))
    }
    async fn set_overrides(
        &self,
        _: Request<pb::SetOverridesRequest>,
    ) -> Result<Response<pb::Unit>, Status> {
        Err(Status::unimplemented("bare"))
    }
    async fn promote(
        &self,
        _: Request<pb::PromoteRequest>,
    ) -> Result<Response<pb::PromoteResponse>, Status> {
        Err(Status::unimplemented("bare"))
    }
    async fn approve(
        &self,
        _: Request<pb::ApproveRequest>,
    ) -> Result<Response<pb::ApproveResponse>, Status> {
        Err(Status::unimplemented("bare"))
    }
    async fn rollback_unit(
        &self,
        _: Request<pb::RollbackUnitRequest>,
    ) -> Result<Response<pb::Revision>, Status> {
        Err(Status::unimplemented("bare"))
    }
    async fn rollback_promotion(
        &self,
        _: Request<pb::RollbackPromotionRequest>,
    ) -> Result<Response<pb::PromoteResponse>, Status> {
        Err(Status::unimplemented("bare"))
    }
    async fn list_promotions(
        &self,
        _: Request<pb::ListPromotionsRequest>,
    ) -> Result<Response<pb::ListPromotionsResponse>, Status> {
        Err(Status::unimplemented("bare"))
    }
    async fn create_operator(
        &self,
        _: Request<pb::CreateOperatorRequest>,
    ) -> Result<Response<pb::CreateOperatorResponse>, Status> {
        Err(Status::unimplemented("bare"))
    }
    async fn rotate_operator_token(
        &self,
        _: Request<pb::RotateOperatorTokenRequest>,
    ) -> Result<Response<pb::CreateOperatorResponse>, Status> {
        Err(Status::unimplemented("bare"))
    }
    async fn create_source(
        &self,
        _: Request<pb::CreateSourceRequest>,
    ) -> Result<Response<pb::Source>, Status> {
        Err(Status::unimplemented("bare"))
    }
    async fn list_sources(
        &self,
        _: Request<pb::ListSourcesRequest>,
    ) -> Result<Response<pb::ListSourcesResponse>, Status> {
        Err(Status::unimplemented("bare"))
    }
    async fn get_source(
        &self,
        _: Request<pb::GetSourceRequest>,
    ) -> Result<Response<pb::Source>, Status> {
        Err(Status::unimplemented("bare"))
    }
    async fn set_source_suspended(
        &self,
        _: Request<pb::SetSourceSuspendedRequest>,
    ) -> Result<Response<pb::Source>, Status> {
        Err(Status::unimplemented("bare"))
    }
    async fn delete_source(
        &self,
        _: Request<pb::DeleteSourceRequest>,
    ) -> Result<Response<pb::DeleteSourceResponse>, Status> {
        Err(Status::unimplemented("bare"))
    }
    async fn sync_source(
        &self,
        _: Request<pb::SyncSourceRequest>,
    ) -> Result<Response<pb::SyncSourceResponse>, Status> {
        Err(Status::unimplemented("bare"))
    }
    type WatchStatusStream =
        tokio_stream::wrappers::ReceiverStream<Result<pb::StatusEvent, Status>>;
    async fn watch_status(
        &self,
        _: Request<pb::WatchStatusRequest>,
    ) -> Result<Response<Self::WatchStatusStream>, Status> {
        Err(Status::unimplemented("bare"))
    }
    async fn issue_cluster_token(
        &self,
        _: Request<pb::IssueClusterTokenRequest>,
    ) -> Result<Response<pb::CreateClusterResponse>, Status> {
        Err(Status::unimplemented("bare"))
    }
    async fn issue_cluster_certificate(
        &self,
        _: Request<pb::IssueClusterCertificateRequest>,
    ) -> Result<Response<pb::ClusterCertificate>, Status> {
        Err(Status::unimplemented("bare"))
    }
    async fn revoke_cluster(
        &self,
        _: Request<pb::RevokeClusterRequest>,
    ) -> Result<Response<pb::RevokeClusterResponse>, Status> {
        Err(Status::unimplemented("bare"))
    }
}

async fn serve_baseline(addr: &str) -> anyhow::Result<()> {
    let (tx, _) = broadcast::channel(100_000);
    let bare = Bare { tx };
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_service(pb::agent_service_server::AgentServiceServer::new(
            bare.clone(),
        ))
        .add_service(pb::hub_service_server::HubServiceServer::new(bare))
        .serve(addr.parse()?)
        .await?;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let limit = rlimit::increase_nofile_limit(u64::MAX).unwrap_or(0);
    if let Some(addr) = &args.serve_baseline {
        return serve_baseline(addr).await;
    }
    let needed = args.agents as u64 + 256;
    if limit < needed {
        bail!(
            "open-file limit is {limit}, {needed} needed for {} agents; raise the hard limit (ulimit -Hn)",
            args.agents
        );
    }
    println!(
        "fan-out benchmark: {} agents, {} revisions over {} units; paced phase one revision per {} ms, then a burst; open-file limit {limit}",
        args.agents, args.revisions, args.units, args.interval_ms
    );
    if args.storm {
        return run_storm(&args).await;
    }
    let [hub_paced, hub_burst] = run_hub(&args).await?;
    hub_paced.print();
    hub_burst.print();
    if args.hub_only {
        return Ok(());
    }
    let [bare_paced, bare_burst] = run_baseline(&args).await?;
    bare_paced.print();
    bare_burst.print();
    println!(
        "ratio hub/bare (paced): p50 {:.2}x  p99 {:.2}x   (burst) deliveries/s {:.2}x  converged {:.2}x as fast   RSS {:.2}x",
        hub_paced.pct(0.5) / bare_paced.pct(0.5),
        hub_paced.pct(0.99) / bare_paced.pct(0.99),
        hub_burst.rate() / bare_burst.rate(),
        bare_burst.elapsed.as_secs_f64() / hub_burst.elapsed.as_secs_f64(),
        hub_burst.rss_kib as f64 / bare_burst.rss_kib.max(1) as f64,
    );
    Ok(())
}

fn hub_command(
    dir: &std::path::Path,
    addr: std::net::SocketAddr,
    agents: usize,
    tls: bool,
) -> anyhow::Result<std::process::Child> {
    let mut command = std::process::Command::new(sibling_binary("unitsync")?);
    command.args(["serve", "--no-http", "--listen", &addr.to_string()]);
    if !tls {
        command.arg("--insecure-plaintext");
    }
    Ok(command
        .arg("--max-sessions")
        .arg((agents + 100).to_string())
        .arg("--data-dir")
        .arg(dir)
        .env("UNITSYNC_LOG", "warn")
        .spawn()?)
}

/// CPU seconds (user + system) of a process.
fn cpu_seconds(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let f: Vec<String> = s
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .map(str::to_owned)
                .collect();
            Some((f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?) / 100.0)
        })
        .unwrap_or(0.0)
}

async fn run_storm(args: &Args) -> anyhow::Result<()> {
    use unitsync_tests::SimAgent;
    let BenchHub {
        mut child,
        endpoint,
        mut admin,
        admin_token,
        tokens,
        dir,
        addr,
        ca,
    } = start_bench_hub(args.agents, "storm", args.tls).await?;
    for u in 0..args.units {
        let req = authed(
            pb::PutUnitRequest {
                unit: format!("bench/u{u}"),
                manifests: manifests(u, 1, args.payload_bytes),
                message: String::new(),
                mode: pb::PutMode::Unspecified.into(),
                labels: Default::default(),
            },
            &admin_token,
        )?;
        admin.put_unit(req).await?;
    }
    eprintln!("storm: starting {} agents", args.agents);
    let mut agents: Vec<SimAgent> = Vec::with_capacity(args.agents);
    for (i, t) in tokens.iter().enumerate() {
        let mut a = SimAgent::new(&endpoint, ca.as_deref(), t);
        a.start();
        agents.push(a);
        if i % 250 == 249 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let want = args.units;
    let wait_all =
        |what: &'static str, agents: &Vec<SimAgent>, pred: &dyn Fn(&SimAgent) -> bool| {
            let deadline = Instant::now() + Duration::from_secs(600);
            loop {
                if agents.iter().all(pred) {
                    return Ok(());
                }
                if Instant::now() > deadline {
                    bail!("storm: {what} timed out");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        };
    tokio::task::block_in_place(|| {
        wait_all("first connections", &agents, &|a: &SimAgent| {
            a.connections() >= 1 && a.held().len() >= want
        })
    })?;
    eprintln!("storm: every agent holds {want} units; killing the hub");
    let _ = child.0.kill();
    let _ = child.0.wait();
    let killed = Instant::now();
    child = Child(hub_command(dir.path(), addr, args.agents, args.tls)?);
    let pid = child.0.id();
    // An operator meanwhile: a new connection and one call every 100 ms,
    // from a thread of its own (as a CLI run elsewhere would be).
    let probing = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let prober = {
        let (probing, endpoint, token, ca) = (
            probing.clone(),
            endpoint.clone(),
            admin_token.clone(),
            ca.clone(),
        );
        std::thread::spawn(move || -> anyhow::Result<Vec<u64>> {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(async {
                    let mut took = Vec::new();
                    while probing.load(Ordering::Relaxed) {
                        if let Some(us) = operator_call_us(&endpoint, ca.as_deref(), &token).await {
                            took.push(us);
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Ok(took)
                })
        })
    };
    let started = Instant::now();
    // Sample the hub while the agents come back.
    let sampling = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let peak_rss = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (sampling, peak_rss) = (sampling.clone(), peak_rss.clone());
        std::thread::spawn(move || {
            while sampling.load(Ordering::Relaxed) {
                peak_rss.fetch_max(proc_status_kib(pid, "VmRSS:"), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    tokio::task::block_in_place(|| {
        wait_all("reconnections", &agents, &|a: &SimAgent| {
            a.connections() >= 2
        })
    })?;
    let back = killed.elapsed();
    let cpu = cpu_seconds(pid);
    sampling.store(false, Ordering::Relaxed);
    probing.store(false, Ordering::Relaxed);
    let _ = sampler.join();
    let mut operator_us = prober
        .join()
        .map_err(|_| anyhow::anyhow!("the operator probe panicked"))??;
    operator_us.sort_unstable();
    let held_ok = agents.iter().all(|a| a.held().len() >= want);
    println!(
        "storm: meanwhile an operator's new connection and one call: {} answered, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms (a call fails while the hub is down; the first counted is after its restart)",
        operator_us.len(),
        percentile_ms(&operator_us, 0.50),
        percentile_ms(&operator_us, 0.99),
        percentile_ms(&operator_us, 1.0),
    );
    println!(
        "storm: {} agents holding {want} units each{}; hub SIGKILLed and restarted at once: all agents back and resynced {:.2} s after the kill ({:.2} s after the restart); hub CPU {:.1} s, peak RSS {:.0} MiB meanwhile; every agent still holds its units: {held_ok}",
        args.agents,
        if args.tls { " (TLS)" } else { "" },
        back.as_secs_f64(),
        back.saturating_sub(started - killed).as_secs_f64(),
        cpu,
        peak_rss.load(Ordering::Relaxed) as f64 / 1024.0,
    );
    for mut a in agents {
        a.stop().await;
    }
    drop(child);
    Ok(())
}
