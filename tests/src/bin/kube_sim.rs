//! `kube-sim`: runs a simulated Kubernetes API server and writes a
//! kubeconfig for it, for the quick start, the fault suite and for poking
//! at it with kubectl. Faults can be set at start (`--latency-ms`,
//! `--error-rate`) and changed while it runs through the control endpoint
//! (`--control ADDR`: `GET`/`PUT /faults`, `POST /drop-watches`, `POST
//! /reset`, `GET /writes`). On start it prints one JSON line to standard
//! output: `{"url", "kubeconfig", "control"}`.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use unitsync_tests::kube_sim::{KubeSim, SimOptions};

#[derive(Parser, Debug)]
#[command(
    name = "kube-sim",
    about = "A Kubernetes-API-compatible in-memory server for tests"
)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: std::net::SocketAddr,
    /// Where to write the kubeconfig.
    #[arg(long)]
    kubeconfig: PathBuf,
    /// Context and cluster name in the kubeconfig.
    #[arg(long, default_value = "kube-sim")]
    name: String,
    /// Require this bearer token (written into the kubeconfig).
    #[arg(long)]
    token: Option<String>,
    /// Serve plain HTTP instead of HTTPS.
    #[arg(long)]
    no_tls: bool,
    /// Milliseconds before workloads report their rollout done.
    #[arg(long, default_value_t = 500)]
    rollout_delay_ms: u64,
    /// Milliseconds before custom resources report Ready.
    #[arg(long, default_value_t = 500)]
    cr_delay_ms: u64,
    /// Milliseconds before new CRDs are Established.
    #[arg(long, default_value_t = 200)]
    crd_delay_ms: u64,
    /// Latency added to every request, in milliseconds.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Share of requests (0.0 to 1.0) answered 503 ServiceUnavailable.
    #[arg(long, default_value_t = 0.0)]
    error_rate: f64,
    /// Serve the control endpoint (plain HTTP) on this address.
    #[arg(long)]
    control: Option<std::net::SocketAddr>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = Args::parse();
    let sim = KubeSim::start_on(
        args.listen,
        SimOptions {
            tls: !args.no_tls,
            token: args.token,
            rollout_delay: Duration::from_millis(args.rollout_delay_ms),
            cr_delay: Duration::from_millis(args.cr_delay_ms),
            crd_delay: Duration::from_millis(args.crd_delay_ms),
            ..SimOptions::default()
        },
    )
    .await?;
    sim.faults()
        .set_latency(Duration::from_millis(args.latency_ms));
    sim.faults().set_error_rate(args.error_rate);
    let control = match args.control {
        Some(addr) => Some(format!("http://{}", sim.serve_control(addr).await?)),
        None => None,
    };
    let tmp = args.kubeconfig.with_extension("tmp");
    std::fs::write(&tmp, sim.kubeconfig(&args.name))?;
    std::fs::rename(&tmp, &args.kubeconfig)?;
    eprintln!(
        "kube-sim serving {} (kubeconfig {})",
        sim.url(),
        args.kubeconfig.display()
    );
    let ready = serde_json::json!({
        "url": sim.url(),
        "kubeconfig": args.kubeconfig,
        "control": control,
    });
    println!("{ready}");
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
    }
    Ok(())
}
