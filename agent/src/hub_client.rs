//! The agent's side of the hub stream.
//!
//! A session sends `Hello` with the version vector read from the
//! [`DesiredStore`], records every update durably, acknowledges it at once
//! (acks and heartbeats travel on a priority lane, never behind status
//! reports), hands it to the applier, and sends status reports from a
//! coalescing queue. [`HubClient::run`] reconnects with the shared backoff
//! policy; the desired state survives any number of reconnects. With a
//! client certificate it renews it from a locally signed CSR before expiry.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::Channel;
use unitsync_proto::backoff::Backoff;
use unitsync_proto::dial::{self, Role};
use unitsync_proto::v1 as pb;

use crate::inventory::FoundUnit;
use unitsync_proto::v1::agent_message::Msg as AgentMsg;
use unitsync_proto::v1::hub_message::Msg as HubMsg;

use crate::desired::{DesiredStore, DesiredUnit, RecordError};

/// How to reach the hub.
#[derive(Clone)]
pub struct HubConnection {
    /// e.g. `http://127.0.0.1:7443`.
    pub endpoint: String,
    /// The cluster's bearer token.
    pub token: String,
    pub agent_version: String,
    /// CA certificate (PEM) to trust for an `https://` hub; `None` uses the
    /// public web PKI roots.
    pub ca_pem: Option<String>,
    /// Client certificate and key (PEM) for mutual TLS; with it the token
    /// may be empty.
    pub identity: Option<(String, String)>,
    /// HTTP/2 ping interval, and how long an unanswered ping may take before
    /// the connection counts as dead (a silent partition is noticed within
    /// twice this).
    pub keepalive: Duration,
}

impl HubConnection {
    /// Pings every 10 s, dead after 10 s more: well within the hub's
    /// default 30 s heartbeat window.
    pub const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(10);
}

impl std::fmt::Debug for HubConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubConnection")
            .field("endpoint", &self.endpoint)
            .field("token", &"<redacted>")
            .field("agent_version", &self.agent_version)
            .field(
                "identity",
                &self.identity.as_ref().map(|_| "<client certificate>"),
            )
            .field("keepalive", &self.keepalive)
            .finish()
    }
}

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("cannot dial the hub")]
    Dial(#[source] dial::DialError),
    #[error("the token cannot be sent as a header")]
    Token,
    #[error("cannot connect to the hub")]
    Connect(#[source] tonic::transport::Error),
    /// The hub refused or ended the session (auth, version, load, revoked).
    #[error("the hub refused the session: {}", .0.message())]
    Refused(tonic::Status),
    #[error("the stream broke")]
    Stream(#[source] tonic::Status),
    #[error("no heartbeat from the hub")]
    Silent,
    #[error("the hub closed the stream")]
    Closed,
    #[error("recording desired state failed")]
    Record(#[source] RecordError),
    #[error("certificate renewal failed: {0}")]
    Renew(String),
}

impl SessionError {
    /// Errors that retrying cannot fix without operator action are still
    /// retried (a token may be re-issued), but logged louder.
    pub fn is_auth(&self) -> bool {
        matches!(self, SessionError::Refused(s) if matches!(s.code(), tonic::Code::Unauthenticated | tonic::Code::PermissionDenied))
    }
}

use crate::health::Health;
use crate::status::{Phase, SyncState};
pub use crate::status::{ResourceReport, StatusUpdate};

fn phase_pb(p: Phase) -> pb::Phase {
    match p {
        Phase::Applying => pb::Phase::Applying,
        Phase::Applied => pb::Phase::Applied,
        Phase::Progressing => pb::Phase::Progressing,
        Phase::Ready => pb::Phase::Ready,
        Phase::Degraded => pb::Phase::Degraded,
        Phase::Failed => pb::Phase::Failed,
        Phase::Drifted => pb::Phase::Drifted,
        Phase::Destroyed => pb::Phase::Destroyed,
        Phase::Superseded => pb::Phase::Superseded,
        Phase::Unknown => pb::Phase::Unknown,
    }
}

fn sync_pb(s: SyncState) -> pb::SyncState {
    match s {
        SyncState::Synced => pb::SyncState::Synced,
        SyncState::OutOfSync => pb::SyncState::OutOfSync,
        SyncState::Failed => pb::SyncState::Failed,
        SyncState::Pruned => pb::SyncState::Pruned,
    }
}

fn health_pb(h: Option<Health>) -> pb::Health {
    match h {
        None => pb::Health::Unspecified,
        Some(Health::Ready) => pb::Health::Ready,
        Some(Health::InProgress) => pb::Health::InProgress,
        Some(Health::Terminating) => pb::Health::Terminating,
        Some(Health::Failed) => pb::Health::Failed,
        Some(Health::Stuck) => pb::Health::Stuck,
    }
}

/// The wire's form of a status.
fn status_pb(u: &StatusUpdate) -> pb::StatusReport {
    pb::StatusReport {
        unit: u.unit.clone(),
        revision: u.revision,
        phase: phase_pb(u.phase).into(),
        message: u.message.clone(),
        resources: u
            .resources
            .iter()
            .map(|r| pb::ResourceStatus {
                api_version: r.api_version.clone(),
                kind: r.kind.clone(),
                namespace: r.namespace.clone(),
                name: r.name.clone(),
                sync: sync_pb(r.sync).into(),
                health: health_pb(r.health).into(),
                message: r.message.clone(),
                drifted_fields: r.drifted_fields.clone(),
            })
            .collect(),
        observed_at: Some(std::time::SystemTime::now().into()),
    }
}

/// Latest status per unit not yet sent; survives reconnects, so status
/// produced while the hub is away is delivered after (coalesced).
#[derive(Default)]
pub struct StatusQueue {
    pending: Mutex<BTreeMap<String, StatusUpdate>>,
    /// Each unit's latest report taken for sending, and when: those taken
    /// in the last moments of a session may never have arrived (a silent
    /// partition, a hub killed before writing them), and a unit reports
    /// again only when its status changes.
    sent: Mutex<BTreeMap<String, (std::time::Instant, StatusUpdate)>>,
    notify: Notify,
}

impl StatusQueue {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, StatusUpdate>> {
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn push(&self, s: StatusUpdate) {
        self.lock().insert(s.unit.clone(), s);
        self.notify.notify_one();
    }

    fn lock_sent(
        &self,
    ) -> std::sync::MutexGuard<'_, BTreeMap<String, (std::time::Instant, StatusUpdate)>> {
        self.sent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Takes the pending reports for sending (and notes when).
    fn take(&self) -> Vec<StatusUpdate> {
        let taken: Vec<StatusUpdate> = std::mem::take(&mut *self.lock()).into_values().collect();
        let now = std::time::Instant::now();
        let mut sent = self.lock_sent();
        for s in &taken {
            sent.insert(s.unit.clone(), (now, s.clone()));
        }
        taken
    }

    /// A session ended: the reports taken since `since` go out again with
    /// the next one (unless a newer one is queued by then); older ones
    /// arrived.
    fn resend_since(&self, since: std::time::Instant) {
        let sent = std::mem::take(&mut *self.lock_sent());
        let mut p = self.lock();
        for (unit, (at, s)) in sent {
            if at >= since {
                p.entry(unit).or_insert(s);
            }
        }
    }

    /// Puts unsent reports back unless a newer one arrived meanwhile.
    fn restore(&self, unsent: Vec<StatusUpdate>) {
        let mut p = self.lock();
        for s in unsent {
            p.entry(s.unit.clone()).or_insert(s);
        }
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What the session learned from the hub.
#[derive(Clone, Debug)]
pub enum HubEvent {
    Connected {
        cluster: String,
        environment: String,
    },
    /// A session the hub welcomed ended; the agent reconnects.
    Disconnected,
    /// A new desired revision or tombstone, already recorded and acked.
    Desired(DesiredUnit),
    Notice(String),
}

/// The agent's hub client: one at a time per agent.
pub struct HubClient {
    conn: HubConnection,
    /// The client certificate in use (renewed before expiry).
    identity: std::sync::RwLock<Option<(String, String)>>,
    /// Validity to ask for when renewing (zero: the hub's default).
    renew_validity: Duration,
    /// Where renewed certificates are written (`tls.crt`, `tls.key`).
    persist: Option<std::path::PathBuf>,
    desired: Arc<dyn DesiredStore>,
    statuses: Arc<StatusQueue>,
    events: mpsc::UnboundedSender<HubEvent>,
    /// Units found in the cluster (their inventories) that the record
    /// does not hold, until the hub has said what they should be.
    found: std::sync::Mutex<std::collections::BTreeSet<FoundUnit>>,
}

/// Keepalive sent by the agent when the hub gives none.
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(30);

impl HubClient {
    pub fn new(
        conn: HubConnection,
        desired: Arc<dyn DesiredStore>,
        statuses: Arc<StatusQueue>,
        events: mpsc::UnboundedSender<HubEvent>,
    ) -> HubClient {
        HubClient {
            identity: std::sync::RwLock::new(conn.identity.clone()),
            renew_validity: Duration::ZERO,
            persist: None,
            conn,
            desired,
            statuses,
            events,
            found: std::sync::Mutex::default(),
        }
    }

    /// Units found in the cluster that the record does not hold (a lost
    /// state directory): the hello says it holds them at revision 0, so the
    /// hub sends what they should be, a destroy included (a unit it does
    /// not hold and whose head is a destroy is otherwise in sync).
    #[must_use]
    pub fn with_found(self, units: impl IntoIterator<Item = FoundUnit>) -> HubClient {
        self.lock_found().extend(units);
        self
    }

    fn lock_found(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeSet<FoundUnit>> {
        self.found
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Renew the client certificate with this validity, keeping renewed
    /// certificates in `persist` (a directory) when given.
    #[must_use]
    pub fn with_renewal(
        mut self,
        validity: Duration,
        persist: Option<std::path::PathBuf>,
    ) -> HubClient {
        self.renew_validity = validity;
        self.persist = persist;
        self
    }

    fn identity(&self) -> Option<(String, String)> {
        self.identity
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Renews the client certificate from a fresh key and CSR; returns the
    /// new certificate's expiry.
    pub async fn renew_certificate(&self) -> Result<std::time::SystemTime, SessionError> {
        let key = rcgen::KeyPair::generate().map_err(|e| SessionError::Renew(e.to_string()))?;
        let csr = rcgen::CertificateParams::new(Vec::<String>::new())
            .and_then(|p| p.serialize_request(&key))
            .and_then(|c| c.pem())
            .map_err(|e| SessionError::Renew(e.to_string()))?;
        let channel = self.channel().await?;
        let mut client = pb::agent_service_client::AgentServiceClient::new(channel);
        let mut request = tonic::Request::new(pb::RenewCertificateRequest {
            csr_pem: csr,
            validity_seconds: self.renew_validity.as_secs(),
        });
        if !self.conn.token.is_empty() {
            let auth: MetadataValue<Ascii> = format!("Bearer {}", self.conn.token)
                .parse()
                .map_err(|_| SessionError::Token)?;
            request
                .metadata_mut()
                .insert(unitsync_proto::AUTHORIZATION, auth);
        }
        let r = client
            .renew_certificate(request)
            .await
            .map_err(SessionError::Refused)?
            .into_inner();
        let not_after = r
            .not_after
            .and_then(|t| std::time::SystemTime::try_from(t).ok())
            .ok_or_else(|| SessionError::Renew("the hub sent no expiry".into()))?;
        let key_pem = key.serialize_pem();
        if let Some(dir) = &self.persist {
            crate::desired::write_private(&dir.join("tls.key"), &key_pem)
                .map_err(SessionError::Record)?;
            crate::desired::write_private(&dir.join("tls.crt"), &r.certificate_pem)
                .map_err(SessionError::Record)?;
        }
        *self
            .identity
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            Some((r.certificate_pem, key_pem));
        Ok(not_after)
    }

    /// Keeps the client certificate fresh: renews at start (the installed
    /// certificate's expiry is unknown) and then when a third of the
    /// validity is left. A live session is not interrupted.
    async fn renew_loop(&self, shutdown: &CancellationToken) {
        if self.identity().is_none() {
            return;
        }
        let mut backoff = Backoff::default();
        let mut next = tokio::time::Instant::now();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep_until(next) => {}
            }
            match self.renew_certificate().await {
                Ok(not_after) => {
                    backoff.reset();
                    let left = not_after
                        .duration_since(std::time::SystemTime::now())
                        .unwrap_or_default();
                    next = tokio::time::Instant::now() + left * 2 / 3;
                    tracing::info!(renew_in = ?(left * 2 / 3), "client certificate renewed");
                }
                Err(e) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %unitsync_proto::ErrorChain(&e), retry_in = ?delay, "certificate renewal failed");
                    next = tokio::time::Instant::now() + delay;
                }
            }
        }
    }

    /// Keeps a session open until `shutdown`, reconnecting with backoff,
    /// and the client certificate (if any) renewed.
    pub async fn run(&self, shutdown: CancellationToken) {
        tokio::join!(self.session_loop(&shutdown), self.renew_loop(&shutdown));
    }

    async fn session_loop(&self, shutdown: &CancellationToken) {
        let mut backoff = Backoff::default();
        loop {
            let mut welcomed = false;
            let result = tokio::select! {
                r = self.session(shutdown, &mut welcomed) => r,
                () = shutdown.cancelled() => return,
            };
            if shutdown.is_cancelled() {
                return;
            }
            // A session the hub welcomed was healthy: the next outage starts
            // from the short first window again (a hub restart costs
            // milliseconds, not seconds).
            if welcomed {
                backoff.reset();
                let _ = self.events.send(HubEvent::Disconnected);
            }
            let delay = backoff.next_delay();
            match &result {
                Err(e) if e.is_auth() => {
                    tracing::error!(error = %e, retry_in = ?delay, "hub refused the agent's credential")
                }
                Err(e) => {
                    tracing::warn!(error = %unitsync_proto::ErrorChain(e), retry_in = ?delay, "hub session ended")
                }
                Ok(()) => {}
            }
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = shutdown.cancelled() => return,
            }
        }
    }

    async fn channel(&self) -> Result<Channel, SessionError> {
        let identity = self.identity();
        let (endpoint, dialer) = dial::prepare(
            &self.conn.endpoint,
            Role::Agent,
            self.conn.ca_pem.as_deref(),
            identity
                .as_ref()
                .map(|(cert, key)| (cert.as_str(), key.as_str())),
        )
        .map_err(SessionError::Dial)?;
        endpoint
            .connect_timeout(Duration::from_secs(20))
            .http2_keep_alive_interval(self.conn.keepalive)
            .keep_alive_timeout(self.conn.keepalive)
            .keep_alive_while_idle(true)
            .connect_with_connector(dialer)
            .await
            .map_err(SessionError::Connect)
    }

    /// One session, until it breaks or `shutdown`; `welcomed` is set once
    /// the hub answered the Hello.
    pub async fn session(
        &self,
        shutdown: &CancellationToken,
        welcomed: &mut bool,
    ) -> Result<(), SessionError> {
        let auth: Option<MetadataValue<Ascii>> = if self.conn.token.is_empty() {
            None
        } else {
            Some(
                format!("Bearer {}", self.conn.token)
                    .parse()
                    .map_err(|_| SessionError::Token)?,
            )
        };
        let channel = self.channel().await?;
        let mut client = pb::agent_service_client::AgentServiceClient::new(channel)
            .max_decoding_message_size(unitsync_proto::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(unitsync_proto::MAX_MESSAGE_BYTES);

        // Priority lane (hello, acks, heartbeats) and status lane, merged
        // with a bias towards the priority lane.
        let (prio_tx, prio_rx) = mpsc::channel::<pb::AgentMessage>(256);
        let (status_tx, status_rx) = mpsc::channel::<pb::AgentMessage>(1);
        let outbound = futures::stream::select_with_strategy(
            tokio_stream::wrappers::ReceiverStream::new(prio_rx),
            tokio_stream::wrappers::ReceiverStream::new(status_rx),
            |(): &mut ()| futures::stream::PollNext::Left,
        );

        let mut held: Vec<pb::HeldUnit> = self
            .desired
            .load()
            .into_iter()
            .map(|u| pb::HeldUnit {
                unit: u.unit,
                revision: u.revision,
                digest: u.digest,
                // Only a found unit's is told: what the record holds is
                // this agent's, whatever the environment.
                environment: String::new(),
            })
            .collect();
        let found: Vec<FoundUnit> = {
            let found = self.lock_found();
            found
                .iter()
                .filter(|f| !held.iter().any(|h| h.unit == f.unit))
                .cloned()
                .collect()
        };
        held.extend(found.into_iter().map(|f| pb::HeldUnit {
            unit: f.unit,
            revision: 0,
            digest: String::new(),
            environment: f.environment,
        }));

        let hello = pb::AgentMessage {
            msg: Some(AgentMsg::Hello(pb::Hello {
                protocol_version: unitsync_proto::PROTOCOL_VERSION,
                agent_version: self.conn.agent_version.clone(),
                units: held,
            })),
        };
        // The lane is empty: this cannot fail.
        let _ = prio_tx.try_send(hello);

        let mut request = tonic::Request::new(outbound);
        if let Some(auth) = auth {
            request
                .metadata_mut()
                .insert(unitsync_proto::AUTHORIZATION, auth);
        }
        let mut inbound = client
            .session(request)
            .await
            .map_err(SessionError::Refused)?
            .into_inner();

        let mut heartbeat = DEFAULT_HEARTBEAT;
        let mut last_heard = Instant::now();
        let mut ticker = tokio::time::interval(heartbeat);
        ticker.tick().await;
        let mut in_flight: Vec<StatusUpdate> = Vec::new();
        let result = loop {
            tokio::select! {
                () = shutdown.cancelled() => break Ok(()),
                _ = ticker.tick() => {
                    if last_heard.elapsed() > heartbeat * 3 {
                        break Err(SessionError::Silent);
                    }
                    let hb = pb::AgentMessage { msg: Some(AgentMsg::Heartbeat(pb::Heartbeat { sent_at: Some(std::time::SystemTime::now().into()) })) };
                    if prio_tx.send(hb).await.is_err() {
                        break Err(SessionError::Closed);
                    }
                }
                // Status reports go out one at a time when the lane is free.
                permit = status_tx.reserve(), if !self.statuses.is_empty() || !in_flight.is_empty() => {
                    let Ok(permit) = permit else { break Err(SessionError::Closed) };
                    if in_flight.is_empty() {
                        in_flight = self.statuses.take();
                    }
                    if let Some(s) = in_flight.pop() {
                        permit.send(pb::AgentMessage { msg: Some(AgentMsg::Status(status_pb(&s))) });
                    }
                }
                () = self.statuses.notify.notified(), if in_flight.is_empty() => {}
                msg = inbound.message() => {
                    last_heard = Instant::now();
                    let msg = match msg {
                        Ok(Some(pb::HubMessage { msg: Some(m) })) => m,
                        Ok(Some(_)) => continue,
                        Ok(None) => break Err(SessionError::Closed),
                        Err(s) => break Err(SessionError::Stream(s)),
                    };
                    match msg {
                        HubMsg::Welcome(w) => {
                            *welcomed = true;
                            heartbeat = Duration::from_secs(u64::from(w.heartbeat_interval_seconds.max(1)));
                            ticker = tokio::time::interval(heartbeat);
                            ticker.tick().await;
                            let _ = self.events.send(HubEvent::Connected { cluster: w.cluster, environment: w.environment });
                        }
                        HubMsg::Update(u) => {
                            if let Err(e) = self.on_update(u, &prio_tx).await {
                                break Err(e);
                            }
                        }
                        HubMsg::Heartbeat(_) => {}
                        HubMsg::Notice(n) => {
                            tracing::warn!(notice = %n.message, "hub notice");
                            let _ = self.events.send(HubEvent::Notice(n.message));
                        }
                    }
                }
            }
        };
        self.statuses.restore(in_flight);
        // What the session sent in its last moments (within a keepalive
        // timeout of its end, three keepalive intervals) may be lost.
        let window = self.conn.keepalive.saturating_mul(3);
        self.statuses.resend_since(
            std::time::Instant::now()
                .checked_sub(window)
                .unwrap_or_else(std::time::Instant::now),
        );
        result
    }
}

impl HubClient {
    /// One update from the hub: record it durably, hand it to the applier,
    /// then acknowledge it. Recorded means it will be applied, whatever
    /// happens to the session next, so the hand-over comes before the ack
    /// (which fails when the session just died).
    async fn on_update(
        &self,
        u: pb::UnitUpdate,
        prio: &mpsc::Sender<pb::AgentMessage>,
    ) -> Result<(), SessionError> {
        let desired = DesiredUnit {
            unit: u.unit,
            environment: u.environment,
            revision: u.revision,
            digest: u.digest,
            tombstone: u.tombstone,
            manifests: u.manifests.into(),
        };
        // Not recorded: no ack; the resync of the next session sends it again.
        self.desired
            .record(desired.clone())
            .await
            .map_err(SessionError::Record)?;
        self.lock_found().retain(|f| f.unit != desired.unit);
        let ack = pb::Ack {
            unit: desired.unit.clone(),
            revision: desired.revision,
        };
        let _ = self.events.send(HubEvent::Desired(desired));
        prio.send(pb::AgentMessage {
            msg: Some(AgentMsg::Ack(ack)),
        })
        .await
        .map_err(|_| SessionError::Closed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::MemoryStore;

    fn report(unit: &str, revision: u64, phase: crate::status::Phase) -> StatusUpdate {
        StatusUpdate {
            unit: unit.into(),
            revision,
            phase,
            message: String::new(),
            resources: vec![],
        }
    }

    /// Reports taken in the last moments of a session that broke may never
    /// have arrived, and a unit reports again only when its status changes:
    /// they go out again with the next session (a final Ready lost with a
    /// session left the hub showing Applied for good); older ones arrived.
    #[test]
    fn reports_sent_as_a_session_ended_go_out_again() {
        use crate::status::Phase;
        let q = StatusQueue::default();
        q.push(report("old", 1, Phase::Ready));
        assert_eq!(q.take().len(), 1, "sent long before the end");
        let end_window = std::time::Instant::now();
        q.push(report("web", 2, Phase::Ready));
        q.push(report("gone", 1, Phase::Destroyed));
        assert_eq!(q.take().len(), 2, "sent as the session broke");
        // A report queued meanwhile is newer: it stays.
        q.push(report("web", 3, Phase::Applied));
        q.resend_since(end_window);
        assert_eq!(
            q.take(),
            [
                report("gone", 1, Phase::Destroyed),
                report("web", 3, Phase::Applied)
            ]
        );
    }

    /// The session died between recording an update and acknowledging it
    /// (a hub killed right after a commit): the revision is still handed to
    /// the applier. Before the fix the update was recorded, listed in the
    /// next Hello (so never offered again) and never applied.
    #[tokio::test]
    async fn a_recorded_update_is_applied_even_when_its_ack_cannot_be_sent() {
        let desired = Arc::new(MemoryStore::default());
        let (events, mut rx) = mpsc::unbounded_channel();
        let client = HubClient::new(
            HubConnection {
                endpoint: "http://127.0.0.1:1".into(),
                token: "t".into(),
                agent_version: "test".into(),
                ca_pem: None,
                identity: None,
                keepalive: HubConnection::DEFAULT_KEEPALIVE,
            },
            desired.clone(),
            Arc::default(),
            events,
        );
        // The session's outbound stream is gone.
        let (prio, closed) = mpsc::channel(1);
        drop(closed);
        let update = pb::UnitUpdate {
            unit: "web".into(),
            revision: 7,
            digest: "d".into(),
            environment: "dev".into(),
            manifests: "kind: ConfigMap".into(),
            ..Default::default()
        };
        let r = client.on_update(update, &prio).await;
        assert!(matches!(r, Err(SessionError::Closed)), "{r:?}");
        assert_eq!(desired.load()[0].revision, 7, "recorded");
        match rx.try_recv() {
            Ok(HubEvent::Desired(u)) => assert_eq!(u.revision, 7),
            other => panic!("the recorded revision was not handed to the applier: {other:?}"),
        }
    }
}
