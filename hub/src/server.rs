//! Starting and stopping a hub: store, admin credential, TLS, gRPC and HTTP
//! listeners, the feedback writer, the automatic-promotion loop and, on a
//! shared store, the subscription to other replicas' commits. Used by
//! `unitsync serve` and by tests.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::auth::{OPERATOR_TOKEN_PREFIX, Secret};
use crate::config::{Config, ConfigError};
use crate::control::Hub;
use crate::store::{SqlStore, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("invalid configuration")]
    Config(#[from] ConfigError),
    #[error("cannot prepare data directory {path}")]
    DataDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open the store")]
    Store(#[source] StoreError),
    #[error("cannot listen on {addr}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the hub's threads")]
    Threads(#[source] std::io::Error),
    #[error("cannot set up TLS")]
    Tls(#[from] crate::tls::TlsError),
}

/// A hub running in this process.
pub struct RunningHub {
    pub grpc_addr: SocketAddr,
    pub http_addr: Option<SocketAddr>,
    /// The admin operator token (as in `admin.token`).
    pub admin_token: String,
    /// The CA clients trust (generated TLS), PEM.
    pub ca_pem: Option<String>,
    pub hub: Arc<Hub>,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
    /// A hub dropped without `shutdown` stops too.
    _stop_when_dropped: tokio_util::sync::DropGuard,
}

impl RunningHub {
    /// Stops accepting, ends sessions, flushes feedback, and waits.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        self.wait().await;
    }

    /// Waits until the hub stops (after a shutdown request). Stopping
    /// cannot fail: what it could not finish (a last feedback write, say)
    /// it logs.
    pub async fn wait(self) {
        if let Err(e) = self.task.await
            && e.is_panic()
        {
            std::panic::resume_unwind(e.into_panic());
        }
    }

    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StartError + '_ {
    move |source| StartError::DataDir {
        path: path.display().to_string(),
        source,
    }
}

/// Reads the admin token, generating it (mode 0600) on first start.
fn admin_token(path: &Path) -> Result<Secret, StartError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::read_to_string(path) {
        Ok(s) if !s.trim().is_empty() => return Ok(Secret::from_string(s.trim().to_owned())),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(path)(e)),
    }
    let secret = Secret::generate(OPERATOR_TOKEN_PREFIX);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err(path))?;
    writeln!(f, "{}", secret.expose()).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))?;
    tracing::info!(path = %path.display(), "generated the admin token");
    Ok(secret)
}

/// Connections the kernel queues for a listener until the hub accepts
/// them (Linux caps it at `net.core.somaxconn`, 4096 by default). Past the
/// queue a client's SYN is dropped and it retries a second later: with the
/// default of 1,024, agents reconnecting together after a restart and any
/// operator's CLI among them waited whole seconds.
const LISTEN_BACKLOG: u32 = 65_535;

/// A listener on `addr` with room for a reconnect storm's connections
/// ([`LISTEN_BACKLOG`]).
fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Moves a bound listener to `lane`'s reactor: its sockets and wake-ups
/// are the lane's from then on.
fn listener_on(lane: &crate::lane::Lane, listener: TcpListener) -> std::io::Result<TcpListener> {
    let listener = listener.into_std()?;
    let _on_lane = lane.handle().enter();
    TcpListener::from_std(listener)
}

/// Starts a hub and returns once it listens.
pub async fn start(config: Config) -> Result<RunningHub, StartError> {
    config.validate()?;
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&config.data_dir)
            .map_err(io_err(&config.data_dir))?;
    }
    let store: Arc<dyn Store> = match &config.database_url {
        Some(url) => Arc::new(SqlStore::postgres(url).await.map_err(StartError::Store)?),
        None => Arc::new(
            SqlStore::sqlite(&config.database_path())
                .await
                .map_err(StartError::Store)?,
        ),
    };
    let admin = admin_token(&config.admin_token_path())?;
    let (tls, ca) = crate::tls::prepare(&config.data_dir, &config.tls)?;
    if tls.is_none() {
        tracing::warn!(
            "TLS IS OFF: --insecure-plaintext sends tokens and manifests in clear text; for development only"
        );
    }
    store
        .install_admin_token(&admin.hash())
        .await
        .map_err(StartError::Store)?;

    let grpc_listener = bind(config.listen).map_err(|source| StartError::Listen {
        addr: config.listen,
        source,
    })?;
    let grpc_addr = grpc_listener
        .local_addr()
        .map_err(|source| StartError::Listen {
            addr: config.listen,
            source,
        })?;
    let http_listener = match config.http_listen {
        Some(addr) => Some(bind(addr).map_err(|source| StartError::Listen { addr, source })?),
        None => None,
    };
    let http_addr = http_listener.as_ref().and_then(|l| l.local_addr().ok());

    let hub = Hub::new(store.clone(), config.tuning.clone(), ca).map_err(StartError::Threads)?;
    let shutdown = CancellationToken::new();
    // From here on, a start that fails (or a hub dropped without
    // `shutdown`) stops whatever was started: what runs on the hub's lanes
    // holds the hub, and would otherwise outlive it.
    let stop_when_dropped = shutdown.clone().drop_guard();
    // Connections are accepted on a lane of their own and sent home by
    // their first call (see `grpc::listener`).
    let accept = crate::lane::Lane::new("hub-accept").map_err(StartError::Threads)?;
    let grpc_listener =
        listener_on(&accept, grpc_listener).map_err(|source| StartError::Listen {
            addr: grpc_addr,
            source,
        })?;
    // OCI sources (the leader of a shared store runs them).
    let oci =
        crate::source::oci::Runner::new(hub.clone(), crate::source::oci::ArtifactLimits::default());
    let oci_task = tokio::spawn(oci.clone().run(shutdown.clone()));
    // The ConfigHub worker, when configured: a source acting through `Hub`.
    let worker = match &config.confighub {
        Some(ch) => {
            hub.claim_environments(crate::control::EnvClaim {
                by: "ConfigHub".into(),
                envs: ch.environments.clone(),
                hint: "promote the unit in ConfigHub instead (`cub unit update --upgrade` on the downstream unit, then `cub unit apply`)".into(),
            });
            let w = crate::source::confighub::Worker::new(hub.clone(), ch.clone())
                .map_err(|e| StartError::Config(ConfigError::Invalid(e.to_string())))?;
            tracing::info!(url = %ch.url, worker = %ch.worker_id, transport = ?ch.transport, "ConfigHub worker starting");
            // ConfigHub's release announcements wake the sources following
            // that space.
            let mut releases = w.releases();
            let oci = oci.clone();
            let stop = shutdown.clone();
            tokio::spawn(async move {
                loop {
                    let entry = tokio::select! {
                        () = stop.cancelled() => return,
                        e = releases.recv() => e,
                    };
                    match entry {
                        Ok(e) => {
                            if let Some(space) = e.payload.get("SpaceSlug").and_then(|s| s.as_str())
                            {
                                oci.release_published(space).await;
                            }
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    }
                }
            });
            Some(tokio::spawn(w.run(shutdown.clone())))
        }
        None => None,
    };
    let feedback_stop = CancellationToken::new();
    let feedback_stopped = feedback_stop.clone().drop_guard();
    // On the control lane: its waits and wake-ups do not queue behind the
    // fan-out, so reports reach the store (and `--wait`) while the
    // sessions' runtime is busy; its statements run on the store's lane.
    let feedback = hub
        .control
        .spawn(hub.feedback.clone().run(store, feedback_stop.clone()));

    tokio::spawn(
        hub.clone()
            .auto_promote_loop(config.tuning.auto_promote_interval, shutdown.clone()),
    );
    tokio::spawn(crate::grpc::agent::recheck_credentials(
        hub.clone(),
        shutdown.clone(),
    ));
    // What other hubs sharing the store announce: their commits reach our
    // agents, their agents' statuses and sessions our views and watchers;
    // and ours theirs.
    let sharing = match hub.store.subscribe().await.map_err(StartError::Store)? {
        Some(announcements) => {
            tokio::spawn(hub.clone().follow_replicas(announcements, shutdown.clone()));
            Some(tokio::spawn(hub.clone().share_sessions(shutdown.clone())))
        }
        None => None,
    };
    // Statuses recorded from now on are never older than those recorded
    // (read once listening: what other replicas record later is announced).
    let latest = hub
        .store
        .latest_status_time()
        .await
        .map_err(StartError::Store)?;
    let ahead = hub.status_clock.not_before(latest);
    if ahead > Duration::from_secs(60) {
        tracing::warn!(
            ahead_seconds = ahead.as_secs(),
            "a status in the store is later than this hub's clock: status times (and soak) run that far ahead; check the clocks of the hubs sharing the store"
        );
    }

    if let Some(listener) = http_listener {
        let https = match (&tls, config.http_tls) {
            (Some(t), true) => Some(t.https_config()?),
            _ => None,
        };
        let app = crate::http::app(hub.clone(), https.is_some(), shutdown.clone());
        let stop = shutdown.clone();
        // Served on the control lane, like operators' gRPC calls: probes,
        // metrics and the dashboard answer while the sessions' runtime is
        // busy fanning out.
        let listener =
            listener_on(&hub.control, listener).map_err(|source| StartError::Listen {
                addr: http_addr.unwrap_or(config.listen),
                source,
            })?;
        hub.control.spawn(async move {
            if let Err(e) = crate::http::serve(listener, app, https, stop).await {
                tracing::error!(error = %e, "HTTP server failed");
            }
        });
    }

    let (agent, admin_svc) = crate::grpc::services(&hub, shutdown.clone());
    let routes = tonic::service::Routes::new(agent).add_service(admin_svc);
    let ca_pem = tls.as_ref().and_then(|t| t.ca_pem.clone());
    // Agents may present a client certificate from the hub CA (mutual
    // TLS) or a bearer token.
    let grpc_tls = match &tls {
        Some(t) => Some(t.grpc_config(hub.ca_pem())?),
        None => None,
    };
    // HTTP/2 pings every third of a heartbeat, dead after another third:
    // a silent partition ends the session within the heartbeat window.
    let settings = crate::grpc::listener::Settings {
        keepalive: (config.tuning.heartbeat / 3).max(Duration::from_millis(500)),
        max_concurrent_streams: 256,
    };
    let stop = shutdown.clone();
    let hub_for_task = hub.clone();
    let hub_for_stop = hub.clone();
    let homes = crate::grpc::listener::Homes {
        sessions: hub.sessions().clone(),
        control: hub.control.handle().clone(),
    };
    let listening = accept.spawn(async move {
        crate::grpc::listener::serve(
            grpc_listener,
            routes,
            grpc_tls,
            settings,
            homes,
            async move {
                stop.cancelled().await;
                hub_for_stop.fanout.disconnect_all();
            },
        )
        .await;
    });
    let task = tokio::spawn(async move {
        // Dropped with the runtime, this task still stops the writer.
        let _feedback_stopped = feedback_stopped;
        let _ = listening.await;
        // Every connection is closed: nothing runs on the accept lane.
        drop(accept);
        // The ConfigHub worker releases its lease first thing.
        if let Some(w) = worker {
            let _ = tokio::time::timeout(Duration::from_secs(10), w).await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), oci_task).await;
        // Other replicas stop counting this one's sessions at once.
        if let Some(sharing) = sharing {
            let _ = tokio::time::timeout(Duration::from_secs(10), sharing).await;
        }
        // Stop the feedback writer only after the sessions are gone, so
        // their last acks and statuses are flushed.
        hub_for_task.fanout.disconnect_all();
        feedback_stop.cancel();
        let _ = feedback.await;
    });
    tracing::info!(%grpc_addr, http = ?http_addr, data_dir = %config.data_dir.display(), "hub listening");
    Ok(RunningHub {
        grpc_addr,
        http_addr,
        admin_token: admin.expose().to_owned(),
        ca_pem,
        hub,
        _stop_when_dropped: stop_when_dropped,
        shutdown,
        task,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_listener_queues_a_storm_of_connections_before_they_are_accepted() {
        // Past the default queue (1,024): each connection holds a file.
        const CONNECTIONS: usize = 1_500;
        // The kernel caps the backlog (`somaxconn`, 4,096 since Linux 5.4).
        let somaxconn: usize = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        if somaxconn < CONNECTIONS {
            eprintln!("skipped: net.core.somaxconn is {somaxconn}, under {CONNECTIONS}");
            return;
        }
        let limit = rlimit::increase_nofile_limit(4 * CONNECTIONS as u64).unwrap();
        assert!(limit > CONNECTIONS as u64 + 100, "open-file limit {limit}");
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        // Nothing accepts: every connection waits in the kernel's queue. A
        // connection past a full queue would not complete for a second
        // (its SYN dropped), then not at all.
        let connect = async {
            let mut open = Vec::with_capacity(CONNECTIONS);
            for _ in 0..CONNECTIONS {
                open.push(tokio::net::TcpStream::connect(addr).await.unwrap());
            }
            open
        };
        let open = tokio::time::timeout(Duration::from_secs(10), connect)
            .await
            .expect("every connection was queued");
        assert_eq!(open.len(), CONNECTIONS);
        drop(listener);
    }
}
