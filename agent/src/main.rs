//! `unitsync-agent`: connects to the hub and records this cluster's desired
//! state. (Applying it to Kubernetes arrives with the agent issue; until
//! then the agent reports nothing but acknowledgements.)

use std::path::PathBuf;
use std::sync::Arc;

use clap::Parser;
use tokio_util::sync::CancellationToken;
use unitsync_agent::desired::FileStore;
use unitsync_agent::hub_client::{HubClient, HubConnection, HubEvent, StatusQueue};

#[derive(Parser, Debug)]
#[command(name = "unitsync-agent", version, about = "unitsync agent")]
struct Args {
    /// Hub gRPC endpoint.
    #[arg(long, env = "UNITSYNC_HUB", default_value = "http://127.0.0.1:7443")]
    hub: String,
    /// File holding this cluster's agent token.
    #[arg(long, env = "UNITSYNC_AGENT_TOKEN_FILE")]
    token_file: PathBuf,
    /// Directory for the agent's desired-state record.
    #[arg(
        long,
        env = "UNITSYNC_AGENT_STATE_DIR",
        default_value = "unitsync-agent-state"
    )]
    state_dir: PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("UNITSYNC_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let token = std::fs::read_to_string(&args.token_file)
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot read the token file {}: {e}",
                args.token_file.display()
            )
        })?
        .trim()
        .to_owned();
    std::fs::create_dir_all(&args.state_dir)?;
    let desired = Arc::new(FileStore::open(&args.state_dir.join("desired.json"))?);
    let (events_tx, mut events) = tokio::sync::mpsc::unbounded_channel();
    let client = HubClient::new(
        HubConnection {
            endpoint: args.hub,
            token,
            agent_version: env!("CARGO_PKG_VERSION").into(),
        },
        desired,
        Arc::new(StatusQueue::default()),
        events_tx,
    );
    let shutdown = CancellationToken::new();
    tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            let _ = tokio::signal::ctrl_c().await;
            shutdown.cancel();
        }
    });
    tokio::spawn(async move {
        while let Some(e) = events.recv().await {
            match e {
                HubEvent::Connected {
                    cluster,
                    environment,
                } => {
                    tracing::info!(%cluster, %environment, "connected to the hub");
                }
                HubEvent::Desired(u) => {
                    tracing::info!(unit = %u.unit, revision = u.revision, tombstone = u.tombstone, "desired state recorded");
                }
                HubEvent::Notice(n) => tracing::warn!(notice = %n, "hub notice"),
            }
        }
    });
    client.run(shutdown).await;
    Ok(())
}
