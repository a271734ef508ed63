//! `kube-sim`: runs a simulated Kubernetes API server and writes a
//! kubeconfig for it, for the quick start and for poking at it with kubectl.

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
    let tmp = args.kubeconfig.with_extension("tmp");
    std::fs::write(&tmp, sim.kubeconfig(&args.name))?;
    std::fs::rename(&tmp, &args.kubeconfig)?;
    eprintln!(
        "kube-sim serving {} (kubeconfig {})",
        sim.url(),
        args.kubeconfig.display()
    );
    tokio::signal::ctrl_c().await?;
    Ok(())
}
