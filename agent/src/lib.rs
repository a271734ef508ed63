//! unitsync agent: keeps one cluster in the state the hub assigns to it.
//!
//! - [`hub_client`]: the session with the hub (version vector, durable
//!   record then ack, status back, reconnect with backoff);
//! - [`desired`]: the durable record of desired state per unit;
//! - [`reconcile`]: one worker per unit: apply, inventory, prune, health,
//!   drift;
//! - [`apply`], [`inventory`], [`health`], [`manifest`], [`drift`] (watchers
//!   that wake a unit's worker): the pieces.

pub mod apply;
pub mod config;
pub mod desired;
pub mod drift;
pub mod health;
pub mod hub_client;
pub mod inventory;
pub mod manifest;
pub mod metrics;
pub mod reconcile;
pub mod status;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::apply::Applier;
use crate::config::{AgentConfig, KubeTarget};
use crate::desired::{DesiredStore, FileStore};
use crate::hub_client::{HubClient, HubEvent, StatusQueue};
use crate::inventory::InventoryStore;
use crate::metrics::AgentMetrics;
use crate::reconcile::Reconciler;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("invalid configuration")]
    Config(#[from] config::ConfigError),
    #[error("cannot build a Kubernetes client")]
    Kube(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("cannot open the desired-state record")]
    Record(#[source] desired::RecordError),
    #[error("cannot serve health endpoints on {0}")]
    Health(std::net::SocketAddr, #[source] std::io::Error),
}

pub async fn kube_client(target: &KubeTarget) -> Result<kube::Client, RunError> {
    let boxed = |e: Box<dyn std::error::Error + Send + Sync>| RunError::Kube(e);
    let config = match target {
        KubeTarget::Infer => kube::Config::infer()
            .await
            .map_err(|e| boxed(Box::new(e)))?,
        KubeTarget::Kubeconfig { path, context } => {
            let kc = kube::config::Kubeconfig::read_from(path).map_err(|e| boxed(Box::new(e)))?;
            let opts = kube::config::KubeConfigOptions {
                context: context.clone(),
                ..Default::default()
            };
            kube::Config::from_custom_kubeconfig(kc, &opts)
                .await
                .map_err(|e| boxed(Box::new(e)))?
        }
    };
    // kube's default retries a 503 fifteen times over minutes, which would
    // stall a unit's worker; the agent has its own backoff, so transient
    // 429/503/504 answers get three quick retries here and then count as
    // failures the worker reports and retries.
    let mut config = config;
    config.default_retry = false;
    let policy = kube::client::retry::RetryPolicy::new(
        std::time::Duration::from_millis(50),
        std::time::Duration::from_secs(1),
        3,
        true,
    )
    .map_err(|e| boxed(Box::new(e)))?;
    Ok(kube::client::ClientBuilder::try_from(config)
        .map_err(|e| boxed(Box::new(e)))?
        .with_layer(&tower::buffer::BufferLayer::new(1024))
        .with_layer(&tower::retry::RetryLayer::new(policy))
        .build())
}

/// `/healthz` (the process runs) and `/readyz` (the Kubernetes API answered
/// discovery) for the Deployment's probes.
async fn serve_health(
    addr: std::net::SocketAddr,
    ready: Arc<std::sync::atomic::AtomicBool>,
    metrics: Arc<AgentMetrics>,
    stop: CancellationToken,
) -> Result<(), RunError> {
    use axum::http::StatusCode;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| RunError::Health(addr, e))?;
    let app = axum::Router::new()
        .route("/healthz", axum::routing::get(|| async { "ok\n" }))
        .route(
            "/readyz",
            axum::routing::get(move || {
                let ready = ready.clone();
                async move {
                    if ready.load(std::sync::atomic::Ordering::Relaxed) {
                        (StatusCode::OK, "ready\n")
                    } else {
                        (
                            StatusCode::SERVICE_UNAVAILABLE,
                            "waiting for the Kubernetes API\n",
                        )
                    }
                }
            }),
        )
        .route(
            "/metrics",
            axum::routing::get(move || {
                let metrics = metrics.clone();
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        metrics.encode(),
                    )
                }
            }),
        );
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await;
    });
    Ok(())
}

/// The units with an inventory in the cluster, tried a few times (a blip
/// must not skip the recovery); none if it still fails.
async fn found_units(
    inventory: &InventoryStore,
    shutdown: &CancellationToken,
) -> Vec<crate::inventory::FoundUnit> {
    let mut backoff = unitsync_proto::backoff::Backoff::default();
    for attempt in 1..=5 {
        match inventory.units().await {
            Ok(units) => return units,
            Err(e) => {
                tracing::warn!(attempt, error = %e, "listing the units' inventories failed");
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(backoff.next_delay()) => {}
        }
    }
    tracing::warn!("could not list the units' inventories; only the record counts");
    Vec::new()
}

/// Runs the agent until `shutdown`.
pub async fn run(config: AgentConfig, shutdown: CancellationToken) -> Result<(), RunError> {
    config.validate()?;
    let client = kube_client(&config.kube).await?;
    let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let metrics = Arc::new(AgentMetrics::new());
    if let Some(addr) = config.health_listen {
        serve_health(addr, ready.clone(), metrics.clone(), shutdown.clone()).await?;
    }
    std::fs::create_dir_all(&config.state_dir).map_err(|e| {
        RunError::Record(desired::RecordError::Write {
            path: config.state_dir.display().to_string(),
            source: e,
        })
    })?;
    let desired: Arc<dyn DesiredStore> =
        Arc::new(FileStore::open(&config.state_dir.join("desired")).map_err(RunError::Record)?);
    // Discovery needs the API server; keep trying while it is down.
    let applier = loop {
        match Applier::new(
            client.clone(),
            config.crd_timeout,
            config.allowed_namespaces.clone(),
        )
        .await
        {
            Ok(a) => break Arc::new(a),
            Err(e) => {
                tracing::warn!(
                    error = e.message(),
                    "cannot reach the Kubernetes API; retrying"
                );
                tokio::select! {
                    () = shutdown.cancelled() => return Ok(()),
                    () = tokio::time::sleep(std::time::Duration::from_secs(2)) => {}
                }
            }
        }
    };
    let inventory = InventoryStore::new(client, &config.namespace, applier.own_writes());
    // Best effort: a least-privilege install creates it up front, and every
    // inventory write re-creates it if it goes missing.
    if let Err(e) = inventory.ensure_namespace().await {
        tracing::warn!(namespace = %config.namespace, error = %e, "cannot create the agent namespace");
    }
    // Units whose objects are in the cluster though the record (a lost
    // state directory) does not hold them: the hub says what they should be.
    let found = found_units(&inventory, &shutdown).await;
    ready.store(true, std::sync::atomic::Ordering::Relaxed);
    let statuses = Arc::new(StatusQueue::default());
    let reconciler = Reconciler::new(
        reconcile::Parts {
            applier,
            inventory,
            desired: desired.clone(),
            statuses: statuses.clone(),
            tuning: config.tuning.clone(),
            allowed_namespaces: config.allowed_namespaces.clone(),
            metrics: metrics.clone(),
        },
        shutdown.clone(),
    );
    // Keep enforcing what was recorded, whether or not the hub answers.
    reconciler.sync_with_record();
    let (events_tx, mut events) = tokio::sync::mpsc::unbounded_channel();
    let mut conn = config.hub.clone();
    // A certificate renewed by an earlier run is newer than the installed one.
    let (crt, key) = (
        config.state_dir.join("tls.crt"),
        config.state_dir.join("tls.key"),
    );
    if conn.identity.is_some()
        && let (Ok(c), Ok(k)) = (std::fs::read_to_string(&crt), std::fs::read_to_string(&key))
    {
        conn.identity = Some((c, k));
    }
    let hub = HubClient::new(conn, desired, statuses, events_tx)
        .with_renewal(config.cert_validity, Some(config.state_dir.clone()))
        .with_found(found);
    let pump = {
        let reconciler = reconciler.clone();
        async move {
            while let Some(e) = events.recv().await {
                match e {
                    HubEvent::Desired(u) => reconciler.desired(u),
                    HubEvent::Connected {
                        cluster,
                        environment,
                    } => {
                        tracing::info!(%cluster, %environment, "connected to the hub");
                        metrics.hub_connected.set(1);
                        metrics.hub_sessions.inc();
                        // Whatever a previous session recorded is applied.
                        reconciler.sync_with_record();
                    }
                    // hub_client logs notices.
                    HubEvent::Disconnected => {
                        metrics.hub_connected.set(0);
                    }
                    HubEvent::Notice(_) => {}
                }
            }
        }
    };
    let run = async move { hub.run(shutdown).await };
    tokio::join!(run, pump);
    Ok(())
}
