//! `confighub-sim`: a ConfigHub-API-compatible server (`serve`), and a
//! small `cub` that drives it (`cub …`) the way the ConfigHub CLI does:
//! spaces, workers, units, `set-target`, `apply|destroy|refresh --wait`,
//! `cancel` and unit events. `serve` prints one JSON line on start:
//! `{"url", "operator_token"}`.

use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use serde_json::{Value, json};
use unitsync_tests::confighub_sim::cub::{Cub, Outcome};
use unitsync_tests::confighub_sim::{ConfigHubSim, Faults, SimOptions};

#[derive(Parser, Debug)]
#[command(
    name = "confighub-sim",
    about = "A ConfigHub-compatible API server for tests, and a small cub"
)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve the worker and operator APIs.
    Serve(Serve),
    /// Drive a ConfigHub as `cub` does.
    Cub(CubArgs),
}

#[derive(Parser, Debug)]
struct Serve {
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: std::net::SocketAddr,
    /// The operator token `cub` presents.
    #[arg(long, default_value = "chs_operator_token")]
    operator_token: String,
    /// Lifetime of a worker's lease without polls, seconds.
    #[arg(long, default_value_t = 15)]
    lease_ttl_seconds: u64,
    /// Heartbeats on event streams, seconds (0: none).
    #[arg(long, default_value_t = 10)]
    heartbeat_seconds: u64,
    /// Lifetime of worker JWTs, seconds (0: an hour).
    #[arg(long, default_value_t = 0)]
    jwt_ttl_seconds: u64,
    /// Share (0.0 to 1.0) of worker calls answered 503.
    #[arg(long, default_value_t = 0.0)]
    error_rate: f64,
    /// Latency added to worker calls, milliseconds.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// The OCI registry `release publish` pushes to (`HOST:PORT`, plain
    /// HTTP), as ConfigHub's OCI endpoint.
    #[arg(long)]
    oci_registry: Option<String>,
    /// A login for that registry, `USER:PASSWORD`.
    #[arg(long, env = "CONFIGHUB_SIM_OCI_LOGIN", hide_env_values = true)]
    oci_login: Option<String>,
}

#[derive(Parser, Debug)]
struct CubArgs {
    /// ConfigHub's URL.
    #[arg(long, env = "CONFIGHUB_URL")]
    url: String,
    /// The operator's token.
    #[arg(
        long,
        env = "CUB_TOKEN",
        default_value = "chs_operator_token",
        hide_env_values = true
    )]
    token: String,
    #[command(subcommand)]
    command: CubCommand,
}

#[derive(Subcommand, Debug)]
enum CubCommand {
    #[command(subcommand)]
    Space(SpaceCommand),
    #[command(subcommand)]
    Worker(WorkerCommand),
    #[command(subcommand)]
    Target(TargetCommand),
    #[command(subcommand)]
    Unit(UnitCommand),
    #[command(subcommand)]
    Release(ReleaseCommand),
}

#[derive(Subcommand, Debug)]
enum ReleaseCommand {
    /// Bundle the space's units and push them to the OCI endpoint.
    Publish { space: String },
}

#[derive(Subcommand, Debug)]
enum SpaceCommand {
    /// Create a space (an existing one is kept).
    Create { slug: String },
}

#[derive(Subcommand, Debug)]
enum WorkerCommand {
    /// Create a worker; prints it as JSON, with its `Secret`.
    Create {
        slug: String,
        #[arg(long)]
        space: String,
    },
    /// A worker as JSON, with its `Condition`.
    Get {
        slug: String,
        #[arg(long)]
        space: String,
    },
}

#[derive(Subcommand, Debug)]
enum TargetCommand {
    /// The space's targets.
    List {
        #[arg(long)]
        space: String,
    },
}

#[derive(Parser, Debug)]
struct Units {
    #[arg(long)]
    space: String,
    /// Units, comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    unit: Vec<String>,
}

#[derive(Parser, Debug)]
struct Run {
    #[command(flatten)]
    units: Units,
    /// Wait until the operations end (`--wait=false` only queues them).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    wait: bool,
    #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
    timeout: Duration,
    #[arg(long)]
    dry_run: bool,
}

#[derive(Subcommand, Debug)]
enum UnitCommand {
    /// Create a unit from a YAML file.
    Create {
        slug: String,
        file: std::path::PathBuf,
        #[arg(long)]
        space: String,
        #[arg(long)]
        target: Option<String>,
        /// Labels, `KEY=VALUE` (repeatable).
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
    },
    /// A new revision from a YAML file.
    Update {
        slug: String,
        file: std::path::PathBuf,
        #[arg(long)]
        space: String,
    },
    /// Point units at a target (`-` unsets it).
    SetTarget {
        target: String,
        #[command(flatten)]
        units: Units,
    },
    Apply(Run),
    Destroy(Run),
    Refresh(Run),
    /// Cancel the units' running operations.
    Cancel(Units),
    /// A unit as JSON (with `LatestUnitEvent`).
    Get {
        slug: String,
        #[arg(long)]
        space: String,
    },
    /// A unit's events, newest first.
    Events {
        slug: String,
        #[arg(long)]
        space: String,
        /// Print them as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    match args.command {
        Command::Serve(s) => serve(s).await,
        Command::Cub(c) => cub(c).await,
    }
}

async fn serve(a: Serve) -> anyhow::Result<()> {
    let sim = ConfigHubSim::start(
        a.listen,
        SimOptions {
            lease_ttl: Duration::from_secs(a.lease_ttl_seconds.max(1)),
            heartbeat: Duration::from_secs(a.heartbeat_seconds),
            operator_token: a.operator_token,
            registry: a.oci_registry.map(|host| unitsync_tests::registry::Pusher {
                host,
                ca_pem: None,
                login: a
                    .oci_login
                    .as_deref()
                    .and_then(|l| l.split_once(':'))
                    .map(|(u, p)| (u.to_owned(), p.to_owned())),
            }),
        },
    )
    .await?;
    sim.set_faults(Faults {
        error_rate: a.error_rate,
        latency_ms: a.latency_ms,
        jwt_ttl_seconds: a.jwt_ttl_seconds,
        ..Faults::default()
    });
    println!(
        "{}",
        json!({"url": sim.url(), "operator_token": sim.operator_token()})
    );
    tokio::signal::ctrl_c().await?;
    sim.stop();
    Ok(())
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("a label is KEY=VALUE, not {s:?}"))
}

fn print_json(v: &Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

async fn cub(a: CubArgs) -> anyhow::Result<()> {
    let cub = Cub::new(&a.url, &a.token);
    match a.command {
        CubCommand::Space(SpaceCommand::Create { slug }) => {
            cub.space_create(&slug).await?;
            println!("Successfully created space {slug}");
        }
        CubCommand::Worker(WorkerCommand::Create { slug, space }) => {
            print_json(&cub.worker_create(&space, &slug).await?)?;
        }
        CubCommand::Worker(WorkerCommand::Get { slug, space }) => {
            print_json(&cub.worker_get(&space, &slug).await?)?;
        }
        CubCommand::Target(TargetCommand::List { space }) => {
            println!("{:<28} {:<12} {:<16} WORKER", "SLUG", "HANDLE", "TOOLCHAIN");
            for t in cub.target_list(&space).await? {
                println!(
                    "{:<28} {:<12} {:<16} {}",
                    t["Slug"].as_str().unwrap_or_default(),
                    t["BridgeHandle"].as_str().unwrap_or_default(),
                    t["ToolchainType"].as_str().unwrap_or_default(),
                    t["BridgeWorkerID"].as_str().unwrap_or_default(),
                );
            }
        }
        CubCommand::Unit(u) => unit(&cub, u).await?,
        CubCommand::Release(ReleaseCommand::Publish { space }) => {
            let r = cub.release_publish(&space).await?;
            println!(
                "Published release {} of {space}: {} unit(s), manifest {}",
                r["ReleaseNum"],
                r["UnitCount"],
                r["ManifestDigest"].as_str().unwrap_or_default()
            );
        }
    }
    Ok(())
}

async fn unit(cub: &Cub, u: UnitCommand) -> anyhow::Result<()> {
    let read = |f: &std::path::Path| {
        std::fs::read_to_string(f).with_context(|| format!("read {}", f.display()))
    };
    match u {
        UnitCommand::Create {
            slug,
            file,
            space,
            target,
            labels,
        } => {
            let unit = cub
                .unit_create(&space, &slug, &read(&file)?, target.as_deref(), &labels)
                .await?;
            println!(
                "Successfully created unit {slug} (revision {})",
                unit["HeadRevisionNum"]
            );
        }
        UnitCommand::Update { slug, file, space } => {
            let unit = cub.unit_update(&space, &slug, &read(&file)?).await?;
            println!(
                "Successfully updated unit {slug} (revision {})",
                unit["HeadRevisionNum"]
            );
        }
        UnitCommand::SetTarget { target, units } => {
            for unit in &units.unit {
                cub.set_target(&units.space, unit, &target).await?;
                println!("Successfully set the target of unit {unit} to {target}");
            }
        }
        UnitCommand::Apply(r) => run(cub, "apply", r).await?,
        UnitCommand::Destroy(r) => run(cub, "destroy", r).await?,
        UnitCommand::Refresh(r) => run(cub, "refresh", r).await?,
        UnitCommand::Cancel(units) => {
            for unit in &units.unit {
                let canceled = cub.cancel(&units.space, unit).await?;
                let n = canceled.as_array().map_or(0, Vec::len);
                println!("unit {unit}: {n} operation(s) asked to cancel");
            }
        }
        UnitCommand::Get { slug, space } => print_json(&cub.unit_get(&space, &slug).await?)?,
        UnitCommand::Events { slug, space, json } => {
            let events = cub.events(&space, &slug).await?;
            if json {
                return print_json(&Value::Array(events));
            }
            println!(
                "{:<8} {:<18} {:<11} {:<26} MESSAGE",
                "ACTION", "RESULT", "STATUS", "CREATED"
            );
            for e in events {
                let text = |k: &str| e[k].as_str().unwrap_or_default().to_owned();
                let created = text("CreatedAt");
                println!(
                    "{:<8} {:<18} {:<11} {:<26} {}",
                    text("Action"),
                    text("Result"),
                    text("Status"),
                    created.get(..23).unwrap_or(&created),
                    text("Message").lines().next().unwrap_or_default(),
                );
            }
        }
    }
    Ok(())
}

/// Queues the action on every unit, then (with `--wait`) waits for all of
/// them; fails when any failed or did not finish.
async fn run(cub: &Cub, action: &str, r: Run) -> anyhow::Result<()> {
    let mut ops = Vec::new();
    for unit in &r.units.unit {
        let op = cub.queue(&r.units.space, unit, action, r.dry_run).await?;
        println!(
            "unit {unit}: {} queued as {}",
            op["Action"].as_str().unwrap_or(action),
            op["QueuedOperationID"].as_str().unwrap_or_default()
        );
        ops.push((unit.clone(), op));
    }
    if !r.wait {
        return Ok(());
    }
    let waits = ops
        .iter()
        .map(|(unit, op)| cub.wait(&r.units.space, unit, op, r.timeout));
    let mut failed = Vec::new();
    for (result, (unit, _)) in futures::future::join_all(waits).await.into_iter().zip(&ops) {
        match result {
            Ok(o) => {
                print_outcome(&o);
                if o.status() == "Failed" {
                    failed.push(unit.clone());
                }
            }
            Err(e) => {
                println!("unit {unit}: {e:#}");
                failed.push(unit.clone());
            }
        }
    }
    if !failed.is_empty() {
        bail!("{action} failed on unit(s) {}", failed.join(", "));
    }
    Ok(())
}

fn print_outcome(o: &Outcome) {
    println!(
        "unit {}: {} {}: {}",
        o.unit,
        o.status(),
        o.result(),
        o.message()
    );
    if let Some(statuses) = o.event["ResourceStatuses"].as_object() {
        for (resource, s) in statuses {
            println!(
                "    {resource:<56} {:<7} {:<10} {}",
                s["SyncStatus"].as_str().unwrap_or_default(),
                s["Readiness"].as_str().unwrap_or_default(),
                s["Message"].as_str().unwrap_or_default()
            );
        }
    }
}
