//! `fault-suite`: fault injection against the real binaries (`unitsync
//! serve`, `unitsync-agent`, `kube-sim`, the `unitsync` CLI), each scenario
//! on a fresh fleet, every commit and every object state recorded and
//! checked by the history checker (no acknowledged commit lost, no revision
//! reused, every cluster converged, no object back to an older revision).
//! Prints per scenario its convergence time and the checker's verdict;
//! exits non-zero on any violation. Part of the test command.
//!
//! ```text
//! cargo build --workspace --bins && ./target/debug/fault-suite [SCENARIO...]
//! ```

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use unitsync_proto::v1 as pb;
use unitsync_tests::fault_proxy::Mode;
use unitsync_tests::fleet::{ClusterSpec, ENV, Fleet, configmaps};
use unitsync_tests::history::{Objects, Verdict, cluster_state};

#[derive(Parser)]
#[command(
    name = "fault-suite",
    about = "Fault injection against the real unitsync binaries"
)]
struct Args {
    /// Scenarios to run (default: all).
    scenarios: Vec<String>,
}

/// What a scenario reports.
struct Outcome {
    /// Time from the end of the fault to convergence.
    converged: Duration,
    verdict: Verdict,
    note: String,
}

const CONVERGE: Duration = Duration::from_secs(120);

fn cluster(name: &str) -> ClusterSpec<'_> {
    ClusterSpec {
        name,
        sim_args: &[],
    }
}

/// Hub SIGKILLed (and restarted) twice during a 300-commit burst from 8
/// parallel committers with large units.
async fn hub_kill_during_burst() -> anyhow::Result<Outcome> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let fleet = Fleet::start(&[cluster("c1"), cluster("c2"), cluster("c3")]).await?;
    let committed = AtomicUsize::new(0);
    let committers = futures::future::try_join_all((0..8).map(|w| {
        let (fleet, committed) = (&fleet, &committed);
        async move {
            let unit = format!("burst-{w}");
            for i in 0..38 {
                let text = configmaps(&unit, "cm", 20, 1024, &format!("{w}-{i}"));
                fleet.commit(&unit, &text).await?;
                committed.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(())
        }
    }));
    let killer = async {
        for at in [100, 200] {
            while committed.load(Ordering::Relaxed) < at {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            fleet.hub.kill().await;
            fleet.hub.restart().await?;
        }
        anyhow::Ok(())
    };
    let (c, k) = tokio::join!(committers, killer);
    c?;
    k?;
    // Then the last revision of each unit, the hub killed right after each
    // commit (while the agents record it): nothing supersedes these, so
    // each must be applied as is.
    for w in 0..8 {
        let unit = format!("burst-{w}");
        fleet
            .commit(
                &unit,
                &configmaps(&unit, "cm", 20, 1024, &format!("{w}-last")),
            )
            .await?;
        fleet.hub.kill().await;
        fleet.hub.restart().await?;
    }
    let start = Instant::now();
    fleet.converge(CONVERGE).await?;
    Ok(Outcome {
        converged: start.elapsed(),
        verdict: fleet.check().await?,
        note: format!(
            "{} commits acknowledged, hub SIGKILLed twice mid-burst and right after each unit's last commit",
            fleet.history.commits().len()
        ),
    })
}

/// An agent cut off by a silent partition while units are destroyed and
/// updated: nothing is deleted during the cut, everything converges after.
async fn partition() -> anyhow::Result<Outcome> {
    let fleet = Fleet::start(&[cluster("c1"), cluster("c2")]).await?;
    fleet
        .commit("gone", &configmaps("gone", "cm", 5, 64, "1"))
        .await?;
    fleet
        .commit("kept", &configmaps("kept", "cm", 5, 64, "1"))
        .await?;
    fleet.converge(CONVERGE).await?;
    fleet.member("c1").proxy.set(Mode::Blackhole);
    fleet.destroy("gone").await?;
    fleet
        .commit("kept", &configmaps("kept", "cm", 5, 64, "2"))
        .await?;
    fleet
        .commit("kept", &configmaps("kept", "cm", 4, 64, "3"))
        .await?;
    // c2 converges while c1 is cut off; c1 keeps everything meanwhile.
    let expected = fleet.expected().await?;
    let start = Instant::now();
    loop {
        if Fleet::converged(&expected, &cluster_state(&fleet.member("c2").client).await?) {
            break;
        }
        if start.elapsed() > CONVERGE {
            bail!("c2 did not converge during the partition");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Hold the cut past the hub's dead-link detection (3 s heartbeat), so
    // both sides give the connection up and the agent has to reconnect.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let cut = cluster_state(&fleet.member("c1").client).await?;
    let mut verdict_extra = Vec::new();
    if cut.get(&format!("{ENV}/gone")).map_or(0, BTreeMap::len) != 5 {
        verdict_extra.push("objects were deleted during the partition".to_owned());
    }
    fleet.member("c1").proxy.set(Mode::Pass);
    let start = Instant::now();
    fleet.converge(CONVERGE).await?;
    let converged = start.elapsed();
    let mut verdict = fleet.check().await?;
    verdict.problems.extend(verdict_extra);
    Ok(Outcome {
        converged,
        verdict,
        note: "c1 partitioned while a unit was destroyed and another updated twice".into(),
    })
}

/// An agent SIGKILLed in the middle of applying a 200-object unit, then a
/// revision dropping objects, then a destroy: no orphans.
async fn agent_kill_mid_apply() -> anyhow::Result<Outcome> {
    let mut fleet = Fleet::start(&[ClusterSpec {
        name: "c1",
        sim_args: &["--latency-ms", "5"],
    }])
    .await?;
    fleet
        .commit("big", &configmaps("big", "cm", 200, 64, "1"))
        .await?;
    let client = fleet.member("c1").client.clone();
    wait_objects(&client, "big", 30).await?;
    fleet.member_mut("c1").agent.kill().await;
    // Revision 2 drops the first 20 objects: created before the kill.
    let v2 = configmaps("big", "cm", 200, 64, "2")
        .split("---\n")
        .enumerate()
        .filter(|(i, _)| *i == 0 || *i > 20)
        .map(|(_, d)| d)
        .collect::<Vec<_>>()
        .join("---\n");
    fleet.commit("big", &v2).await?;
    fleet.member_mut("c1").agent.restart()?;
    let start = Instant::now();
    fleet.converge(CONVERGE).await?;
    fleet.destroy("big").await?;
    fleet.converge(CONVERGE).await?;
    Ok(Outcome {
        converged: start.elapsed(),
        verdict: fleet.check().await?,
        note: "killed after 30+ of 200 objects; revision 2 drops 20 applied ones; then destroyed"
            .into(),
    })
}

/// A revision superseding an apply half way: the first revision's objects
/// are pruned, none orphaned.
async fn supersede_mid_apply() -> anyhow::Result<Outcome> {
    let fleet = Fleet::start(&[ClusterSpec {
        name: "c1",
        sim_args: &["--latency-ms", "5"],
    }])
    .await?;
    fleet
        .commit("swap", &configmaps("swap", "first", 200, 64, "1"))
        .await?;
    wait_objects(&fleet.member("c1").client, "swap", 30).await?;
    fleet
        .commit("swap", &configmaps("swap", "second", 100, 64, "2"))
        .await?;
    let start = Instant::now();
    fleet.converge(CONVERGE).await?;
    Ok(Outcome {
        converged: start.elapsed(),
        verdict: fleet.check().await?,
        note: "200-object revision superseded after 30+ objects by 100 others".into(),
    })
}

/// The cluster restored empty (inventories and agent namespace gone):
/// everything re-created, and the hub never reads Ready while objects are
/// missing (after the agent had a moment to notice).
async fn cluster_restored_empty() -> anyhow::Result<Outcome> {
    let fleet = Fleet::start(&[cluster("c1")]).await?;
    let c = fleet
        .commit("app", &configmaps("app", "cm", 10, 64, "1"))
        .await?;
    fleet.converge(CONVERGE).await?;
    fleet.member("c1").sim.reset().await?;
    let start = Instant::now();
    let expected: Objects = fleet.expected().await?[&c.unit].clone().unwrap_or_default();
    let mut admin = fleet.admin().await?;
    let mut dishonest = Vec::new();
    loop {
        let d = admin
            .get_unit(pb::GetUnitRequest {
                unit: c.unit.clone(),
                include_manifests: false,
                ..Default::default()
            })
            .await?
            .into_inner();
        let cell = d.clusters.first().cloned().unwrap_or_default();
        let have = cluster_state(&fleet.member("c1").client)
            .await?
            .remove(&c.unit)
            .unwrap_or_default();
        let ready = cell.phase == i32::from(pb::Phase::Ready) && cell.revision == c.revision;
        if ready && have == expected {
            break;
        }
        // The agent gets a second to notice; after that Ready must be true.
        if ready && start.elapsed() > Duration::from_secs(1) && have != expected {
            dishonest.push(format!(
                "Ready at {:?} with {} of {} objects present",
                start.elapsed(),
                have.len(),
                expected.len()
            ));
        }
        if start.elapsed() > CONVERGE {
            bail!("not re-created");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let converged = start.elapsed();
    let mut verdict = fleet.check().await?;
    verdict.problems.extend(dishonest.into_iter().take(3));
    // The inventory is back too, listing every object (else the next
    // revision or a destroy would miss them).
    let inventories: kube::Api<k8s_openapi::api::core::v1::ConfigMap> =
        kube::Api::namespaced(fleet.member("c1").client.clone(), "unitsync-system");
    let listed = inventories
        .get_opt("unitsync-inventory-app")
        .await?
        .and_then(|cm| cm.data?.get("inventory").cloned())
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .map_or(0, |v| v["entries"].as_array().map_or(0, Vec::len));
    if listed != expected.len() + 1 {
        verdict.problems.push(format!(
            "the inventory lists {listed} objects, not {} (the ConfigMaps and their namespace)",
            expected.len() + 1
        ));
    }
    Ok(Outcome {
        converged,
        verdict,
        note: "objects, inventory and agent namespace wiped".into(),
    })
}

/// 20 % of API requests fail (503) with 20 ms of latency in one cluster
/// while units change.
async fn flaky_api() -> anyhow::Result<Outcome> {
    let fleet = Fleet::start(&[
        ClusterSpec {
            name: "c1",
            sim_args: &["--error-rate", "0.2", "--latency-ms", "20"],
        },
        cluster("c2"),
    ])
    .await?;
    for i in 0..10 {
        for unit in ["f1", "f2", "f3"] {
            fleet
                .commit(unit, &configmaps(unit, "cm", 5, 64, &i.to_string()))
                .await?;
        }
    }
    let start = Instant::now();
    fleet.converge(CONVERGE).await?;
    let converged = start.elapsed();
    // Heal, so the final reads are not themselves flaky.
    fleet.member("c1").sim.faults(serde_json::json!({})).await?;
    Ok(Outcome {
        converged,
        verdict: fleet.check().await?,
        note: "30 commits while c1 answers 20 % of requests with 503".into(),
    })
}

/// One cluster with a slow API server does not delay the others.
async fn slow_cluster() -> anyhow::Result<Outcome> {
    let fleet = Fleet::start(&[
        ClusterSpec {
            name: "slow",
            sim_args: &["--latency-ms", "200"],
        },
        cluster("fast1"),
        cluster("fast2"),
    ])
    .await?;
    fleet
        .commit("app", &configmaps("app", "cm", 10, 64, "1"))
        .await?;
    let start = Instant::now();
    let expected = fleet.expected().await?;
    let mut done: BTreeMap<String, Duration> = BTreeMap::new();
    while done.len() < fleet.members.len() {
        for m in &fleet.members {
            if !done.contains_key(&m.name)
                && Fleet::converged(&expected, &cluster_state(&m.client).await?)
            {
                done.insert(m.name.clone(), start.elapsed());
            }
        }
        if start.elapsed() > CONVERGE {
            bail!("not converged: {done:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut verdict = fleet.check().await?;
    if done["fast1"].max(done["fast2"]) >= done["slow"] {
        verdict
            .problems
            .push("the fast clusters waited for the slow one".into());
    }
    Ok(Outcome {
        converged: done["slow"],
        verdict,
        note: format!(
            "fast clusters {} ms and {} ms, slow cluster (200 ms per request) {} ms",
            done["fast1"].as_millis(),
            done["fast2"].as_millis(),
            done["slow"].as_millis()
        ),
    })
}

/// Waits until a unit's namespace holds at least `n` ConfigMaps.
async fn wait_objects(client: &kube::Client, unit: &str, n: usize) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        let have = cluster_state(client)
            .await?
            .get(&format!("{ENV}/{unit}"))
            .map_or(0, BTreeMap::len);
        if have >= n {
            return Ok(());
        }
        if start.elapsed() > CONVERGE {
            bail!("{unit}: only {have} objects applied");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = Args::parse();
    type Scenario = fn() -> futures::future::BoxFuture<'static, anyhow::Result<Outcome>>;
    let all: Vec<(&str, Scenario)> = vec![
        (
            "hub-kill-during-burst",
            || Box::pin(hub_kill_during_burst()),
        ),
        ("partition", || Box::pin(partition())),
        ("agent-kill-mid-apply", || Box::pin(agent_kill_mid_apply())),
        ("supersede-mid-apply", || Box::pin(supersede_mid_apply())),
        ("cluster-restored-empty", || {
            Box::pin(cluster_restored_empty())
        }),
        ("flaky-api", || Box::pin(flaky_api())),
        ("slow-cluster", || Box::pin(slow_cluster())),
    ];
    let mut failed = false;
    println!("{:<24} {:>12}  verdict", "scenario", "converged");
    for (name, run) in all {
        if !args.scenarios.is_empty() && !args.scenarios.iter().any(|s| s == name) {
            continue;
        }
        let started = Instant::now();
        let r = tokio::time::timeout(Duration::from_secs(300), run())
            .await
            .context("scenario timed out")
            .and_then(|r| r);
        match r {
            Ok(o) => {
                failed |= !o.verdict.ok();
                println!(
                    "{name:<24} {:>9} ms  {}  [{}; {:.1} s in all]",
                    o.converged.as_millis(),
                    o.verdict,
                    o.note,
                    started.elapsed().as_secs_f64()
                );
            }
            Err(e) => {
                failed = true;
                println!("{name:<24} {:>12}  error: {e:#}", "-");
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
