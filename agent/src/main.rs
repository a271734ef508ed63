//! `unitsync-agent`: keeps one cluster in the state the hub assigns to it.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use tokio_util::sync::CancellationToken;
use unitsync_agent::config::{AgentConfig, KubeTarget};
use unitsync_agent::hub_client::HubConnection;
use unitsync_agent::reconcile::Tuning;

#[derive(Parser, Debug)]
#[command(
    name = "unitsync-agent",
    version,
    about = "unitsync agent: applies this cluster's units and reports status"
)]
struct Args {
    /// Hub gRPC endpoint.
    #[arg(long, env = "UNITSYNC_HUB", default_value = "https://127.0.0.1:7443")]
    hub: String,
    /// CA certificate (PEM) of the hub (default: the public web PKI roots).
    #[arg(long, env = "UNITSYNC_HUB_CA_FILE")]
    ca_file: Option<PathBuf>,
    /// File holding this cluster's agent token (e.g. a mounted Secret).
    #[arg(
        long,
        env = "UNITSYNC_AGENT_TOKEN_FILE",
        required_unless_present = "cert_file"
    )]
    token_file: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS, from `unitsync cluster certificate`.
    #[arg(long, env = "UNITSYNC_AGENT_CERT_FILE", requires = "key_file")]
    cert_file: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(long, env = "UNITSYNC_AGENT_KEY_FILE", requires = "cert_file")]
    key_file: Option<PathBuf>,
    /// Validity (seconds) of renewed client certificates; 0 = the hub's default.
    #[arg(long, default_value_t = 0)]
    cert_validity: u64,
    /// Kubeconfig file (default: KUBECONFIG or ~/.kube/config, else the
    /// in-cluster service account).
    #[arg(long, env = "UNITSYNC_KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Kubeconfig context (with --kubeconfig).
    #[arg(long, requires = "kubeconfig")]
    context: Option<String>,
    /// The agent's namespace (inventories are kept there).
    #[arg(
        long,
        env = "UNITSYNC_AGENT_NAMESPACE",
        default_value = "unitsync-system"
    )]
    namespace: String,
    /// Directory for the desired-state record.
    #[arg(
        long,
        env = "UNITSYNC_AGENT_STATE_DIR",
        default_value = "unitsync-agent-state"
    )]
    state_dir: PathBuf,
    /// Units applied at the same time.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Seconds between drift checks.
    #[arg(long, default_value_t = 30)]
    drift_interval: u64,
    /// Milliseconds between health checks while a unit is not Ready.
    #[arg(long, default_value_t = 2000)]
    health_interval_ms: u64,
    /// Largest share of a unit's objects one revision may prune.
    #[arg(long, default_value_t = 0.5)]
    max_prune_ratio: f64,
    /// Serve /healthz, /readyz (probes) and /metrics (Prometheus) on this
    /// address.
    #[arg(long, env = "UNITSYNC_AGENT_HEALTH_LISTEN")]
    health_listen: Option<std::net::SocketAddr>,
    /// Seconds between HTTP/2 pings to the hub; a connection whose ping goes
    /// unanswered this long again is dead (a silent partition is noticed
    /// within twice this).
    #[arg(long, default_value_t = 10)]
    hub_keepalive_seconds: u64,
    /// Only apply objects in these namespaces (namespaced RBAC installs).
    #[arg(long, value_delimiter = ',')]
    allowed_namespaces: Vec<String>,
}

/// SIGTERM (how Kubernetes stops a pod) or Ctrl-C.
async fn stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let _ = rustls::crypto::ring::default_provider().install_default();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("UNITSYNC_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let read = |p: &PathBuf, what: &str| {
        std::fs::read_to_string(p)
            .map_err(|e| format!("cannot read the {what} file {}: {e}", p.display()))
    };
    let token = match &args.token_file {
        Some(p) => match read(p, "token") {
            Ok(t) => t.trim().to_owned(),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(64);
            }
        },
        None => String::new(),
    };
    let identity = match (&args.cert_file, &args.key_file) {
        (Some(c), Some(k)) => match (read(c, "certificate"), read(k, "key")) {
            (Ok(c), Ok(k)) => Some((c, k)),
            (Err(e), _) | (_, Err(e)) => {
                eprintln!("error: {e}");
                return ExitCode::from(64);
            }
        },
        _ => None,
    };
    let ca_pem = match &args.ca_file {
        Some(p) => match std::fs::read_to_string(p) {
            Ok(c) => Some(c),
            Err(e) => {
                eprintln!("error: cannot read the CA file {}: {e}", p.display());
                return ExitCode::from(64);
            }
        },
        None => None,
    };
    let config = AgentConfig {
        hub: HubConnection {
            endpoint: args.hub,
            token,
            agent_version: env!("CARGO_PKG_VERSION").into(),
            ca_pem,
            identity,
            keepalive: Duration::from_secs(args.hub_keepalive_seconds.max(1)),
        },
        kube: match args.kubeconfig {
            Some(path) => KubeTarget::Kubeconfig {
                path,
                context: args.context,
            },
            None => KubeTarget::Infer,
        },
        namespace: args.namespace,
        state_dir: args.state_dir,
        tuning: Tuning {
            concurrency: args.concurrency,
            drift_interval: Duration::from_secs(args.drift_interval.max(1)),
            health_interval: Duration::from_millis(args.health_interval_ms.max(50)),
            max_prune_ratio: args.max_prune_ratio,
            ..Tuning::default()
        },
        crd_timeout: Duration::from_secs(60),
        cert_validity: Duration::from_secs(args.cert_validity),
        health_listen: args.health_listen,
        allowed_namespaces: args.allowed_namespaces,
    };
    if let Err(e) = config.validate() {
        eprintln!("error: {e}");
        return ExitCode::from(64);
    }
    let shutdown = CancellationToken::new();
    tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            stop_signal().await;
            tracing::info!("shutting down");
            shutdown.cancel();
        }
    });
    match unitsync_agent::run(config, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", unitsync_proto::ErrorChain(&e));
            ExitCode::FAILURE
        }
    }
}
