//! A simulated agent: the real session client ([`HubClient`]) with an
//! in-memory desired-state record, optionally reporting `Ready` (or
//! `Destroyed`) for every revision it receives, as a healthy cluster would.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use unitsync_agent::desired::{DesiredStore, DesiredUnit, MemoryStore};
use unitsync_agent::hub_client::{
    HubClient, HubConnection, HubEvent, SessionError, StatusQueue, StatusUpdate,
};

use crate::wait::within;

pub struct SimAgent {
    pub conn: HubConnection,
    pub desired: Arc<MemoryStore>,
    pub statuses: Arc<StatusQueue>,
    /// Every update received, in order, across sessions.
    received: Arc<Mutex<Vec<DesiredUnit>>>,
    notices: Arc<Mutex<Vec<String>>>,
    /// Sessions welcomed so far.
    connections: Arc<std::sync::atomic::AtomicU64>,
    auto_ready: bool,
    renew_validity: std::time::Duration,
    running: Option<(CancellationToken, JoinHandle<()>)>,
}

impl SimAgent {
    pub fn new(endpoint: &str, ca: Option<&str>, token: &str) -> SimAgent {
        SimAgent {
            conn: HubConnection {
                endpoint: endpoint.into(),
                token: token.into(),
                agent_version: "sim".into(),
                ca_pem: ca.map(str::to_owned),
                identity: None,
                keepalive: HubConnection::DEFAULT_KEEPALIVE,
            },
            desired: Arc::default(),
            statuses: Arc::default(),
            received: Arc::default(),
            notices: Arc::default(),
            connections: Arc::default(),
            auto_ready: false,
            renew_validity: std::time::Duration::ZERO,
            running: None,
        }
    }

    /// Authenticate with a client certificate (mutual TLS).
    #[must_use]
    pub fn with_identity(mut self, cert_pem: &str, key_pem: &str) -> SimAgent {
        self.conn.identity = Some((cert_pem.to_owned(), key_pem.to_owned()));
        self
    }

    /// Ask for renewed client certificates of this validity.
    #[must_use]
    pub fn with_renewal(mut self, validity: std::time::Duration) -> SimAgent {
        self.renew_validity = validity;
        self
    }

    /// Report `Ready` (or `Destroyed`) for every received revision.
    #[must_use]
    pub fn auto_ready(mut self) -> SimAgent {
        self.auto_ready = true;
        self
    }

    /// A session client of this agent (to call it directly).
    pub fn hub_client(&self) -> HubClient {
        self.client().0
    }

    fn client(&self) -> (HubClient, tokio::sync::mpsc::UnboundedReceiver<HubEvent>) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let client = HubClient::new(
            self.conn.clone(),
            self.desired.clone(),
            self.statuses.clone(),
            tx,
        )
        .with_renewal(self.renew_validity, None);
        (client, rx)
    }

    /// Runs the reconnecting client in the background.
    pub fn start(&mut self) {
        assert!(self.running.is_none(), "already running");
        let (client, mut events) = self.client();
        let stop = CancellationToken::new();
        let received = self.received.clone();
        let notices = self.notices.clone();
        let connections = self.connections.clone();
        let statuses = self.statuses.clone();
        let desired = self.desired.clone();
        let auto_ready = self.auto_ready;
        let run_stop = stop.clone();
        let task = tokio::spawn(async move {
            let pump = async {
                while let Some(e) = events.recv().await {
                    match e {
                        HubEvent::Desired(u) => {
                            if auto_ready {
                                statuses.push(StatusUpdate {
                                    unit: u.unit.clone(),
                                    revision: u.revision,
                                    phase: if u.tombstone {
                                        unitsync_agent::status::Phase::Destroyed
                                    } else {
                                        unitsync_agent::status::Phase::Ready
                                    },
                                    message: String::new(),
                                    resources: Vec::new(),
                                });
                                if u.tombstone {
                                    let _ = desired.forget(&u.unit, u.revision).await;
                                }
                            }
                            received.lock().unwrap().push(u);
                        }
                        HubEvent::Notice(n) => notices.lock().unwrap().push(n),
                        HubEvent::Connected { .. } => {
                            connections.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        }
                        HubEvent::Disconnected => {}
                    }
                }
            };
            // The client owns the event sender: dropping it ends the pump.
            let run = async move { client.run(run_stop).await };
            tokio::join!(run, pump);
        });
        self.running = Some((stop, task));
    }

    /// Stops the background client (the session ends).
    pub async fn stop(&mut self) {
        if let Some((stop, task)) = self.running.take() {
            stop.cancel();
            within("sim agent stop", task).await.expect("agent task");
        }
    }

    /// One session attempt in the foreground, until it ends or `stop`.
    pub async fn session_once(&self, stop: &CancellationToken) -> Result<(), SessionError> {
        let (client, _events) = self.client();
        client.session(stop, &mut false).await
    }

    /// Sessions the hub welcomed so far (reconnects included).
    pub fn connections(&self) -> u64 {
        self.connections.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn report(&self, status: StatusUpdate) {
        self.statuses.push(status);
    }

    /// The recorded desired state: unit -> (revision, tombstone).
    pub fn held(&self) -> BTreeMap<String, (u64, bool)> {
        self.desired
            .load()
            .into_iter()
            .map(|u| (u.unit, (u.revision, u.tombstone)))
            .collect()
    }

    pub fn received(&self) -> Vec<DesiredUnit> {
        self.received.lock().unwrap().clone()
    }

    pub fn clear_received(&self) {
        self.received.lock().unwrap().clear();
    }

    pub fn notices(&self) -> Vec<String> {
        self.notices.lock().unwrap().clone()
    }
}

impl Drop for SimAgent {
    fn drop(&mut self) {
        if let Some((stop, _)) = &self.running {
            stop.cancel();
        }
    }
}
