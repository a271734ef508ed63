//! The hub as one ConfigHub worker for every cluster: each environment is
//! a ConfigHub Target (`unitsync-<env>`, BridgeHandle = the environment);
//! an Apply on it commits a revision of `<env>/<UnitSlug>` through the same
//! [`Hub`] operations the CLI uses, waits until every cluster of the
//! environment reports it, and answers with progress and then exactly one
//! terminal report, rolled up across clusters. Operations are recorded in
//! the store before they act, so a hub killed mid-operation reports each
//! exactly once after restart (or another replica does, once it holds the
//! lease).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use unitsync_proto::backoff::{Backoff, BackoffPolicy};

use super::client::{Client, ClientError, Polled};
use super::verdict::{Verdict, judge, rollup};
use super::wire::{
    self, ActionResult, AvailableTarget, BridgeWorkerEventRequest, BridgeWorkerInfo,
    BridgeWorkerPayload, EventLogEntry, EventMessage, ResourceStatus, SupportedConfigType,
    TargetCreate, WorkerEventRequest, WorkerInfo, action, result, status,
};
use super::{ConfigHubConfig, Transport};
use crate::control::{Hub, SourceCommit};
use crate::error::{ErrorChain, HubError};
use crate::metrics::OperationLabels;
use crate::model::{
    Actor, EnvName, Phase, RevisionNum, Role, SourceOperation, UnitName, UnitRef, UnixMillis,
};
use crate::store::Page;

/// States of a recorded operation.
const RUNNING: &str = "running";
const REPORTED: &str = "reported";

/// How long progress reports are apart at least.
const PROGRESS_EVERY: Duration = Duration::from_secs(2);
/// How often an operation re-reads status without a change notice (other
/// replicas' agents, missed notices).
const RECHECK: Duration = Duration::from_secs(1);
/// Where the last handled `release.published` cursor is kept.
const RELEASE_CURSOR: &str = "confighub.release_cursor";
/// How often recorded but undelivered reports are sent again.
const REDELIVER_EVERY: Duration = Duration::from_secs(30);
/// How long a shutdown waits for the poll in flight.
const SHUTDOWN_POLL: Duration = Duration::from_secs(5);
/// How soon a new environment is offered as a target.
const REGISTRATION_CHECK: Duration = Duration::from_secs(2);

/// What a worker needs to resume an operation (kept with it in the store).
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
struct Detail {
    unit_id: String,
    space_id: String,
    space_slug: String,
    unit_slug: String,
    revision_num: i64,
    environment: String,
    dry_run: bool,
    started_at: String,
    /// Seconds the operation may wait for the clusters.
    wait_seconds: u64,
    /// When it started (the wait deadline counts from here, across
    /// restarts and reconnects).
    #[serde(default)]
    started_ms: i64,
    /// ConfigHub's labels of the unit.
    #[serde(default)]
    labels: BTreeMap<String, String>,
    /// The manifests, until they are committed.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    data: String,
}

/// One operation being carried out.
struct Running {
    unit: String,
    action: String,
    detail: Detail,
    cancel: CancellationToken,
    /// Set by whoever decides the terminal report first.
    decided: AtomicBool,
}

/// The work done under one lease (or one stream): its operations stop
/// when it ends, and whoever holds the lease next resumes them from the
/// store, so two replicas never carry out the same operation.
#[derive(Clone)]
struct Shift {
    stop: CancellationToken,
    tasks: TaskTracker,
}

impl Shift {
    fn new(parent: &CancellationToken) -> Shift {
        Shift {
            stop: parent.child_token(),
            tasks: TaskTracker::new(),
        }
    }

    /// Stops its operations between steps and waits until they have.
    async fn end(&self) {
        self.tasks.close();
        self.stop.cancel();
        self.tasks.wait().await;
    }
}

/// How reports reach ConfigHub.
#[derive(Clone, Debug)]
enum Channel {
    LongPoll,
    Stream { base: String },
}

pub struct Worker {
    hub: Arc<Hub>,
    config: ConfigHubConfig,
    client: Client,
    /// `confighub:<worker id>`: the owner of the units it creates, and the
    /// key of its operations.
    source: String,
    /// Operations of this process, from start until their terminal report
    /// is delivered (or handed back).
    running: Mutex<HashMap<String, Arc<Running>>>,
    shift: Mutex<Shift>,
    commit_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    channel: std::sync::RwLock<Channel>,
    /// Woken on `release.published` (OCI sources listen).
    releases: tokio::sync::broadcast::Sender<EventLogEntry>,
}

impl Worker {
    pub fn new(hub: Arc<Hub>, config: ConfigHubConfig) -> Result<Arc<Worker>, ClientError> {
        let client = Client::new(
            &config.url,
            &config.worker_id,
            config.secret.expose(),
            config.ca_pem.as_deref(),
        )?;
        Ok(Arc::new(Worker {
            source: format!("confighub:{}", config.worker_id),
            hub,
            client,
            config,
            running: Mutex::default(),
            shift: Mutex::new(Shift::new(&CancellationToken::new())),
            commit_locks: Mutex::default(),
            channel: std::sync::RwLock::new(Channel::LongPoll),
            releases: tokio::sync::broadcast::channel(64).0,
        }))
    }

    /// `release.published` events ConfigHub announced (wake-up hints).
    pub fn releases(&self) -> tokio::sync::broadcast::Receiver<EventLogEntry> {
        self.releases.subscribe()
    }

    fn actor(&self) -> Actor {
        Actor::Source(self.source.clone())
    }

    fn lock_running(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Running>>> {
        self.running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Forgets a running operation (if `r` is still the one recorded).
    fn forget(&self, id: &str, r: &Arc<Running>) {
        let mut running = self.lock_running();
        if running.get(id).is_some_and(|x| Arc::ptr_eq(x, r)) {
            running.remove(id);
        }
    }

    /// One commit at a time per unit (a newer operation's commit waits for
    /// an older one's, which checks first that it was not ended).
    async fn commit_lock(&self, unit: &UnitRef) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = self
            .commit_locks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(unit.to_string())
            .or_default()
            .clone();
        lock.lock_owned().await
    }

    fn shift(&self) -> Shift {
        self.shift
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Starts the work of a new lease or stream.
    fn begin_shift(&self, shutdown: &CancellationToken) -> Shift {
        let shift = Shift::new(shutdown);
        *self
            .shift
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = shift.clone();
        shift
    }

    /// Runs the worker until `shutdown` (on the configured transport),
    /// with the `release.published` event cursor beside it.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let events = self.clone().follow_releases(shutdown.clone());
        let work = async {
            match self.config.transport {
                Transport::LongPoll => self.long_poll(shutdown).await,
                Transport::Http2Stream => self.stream(shutdown).await,
            }
        };
        tokio::join!(work, events);
        self.hub.metrics.confighub_connected.set(0);
    }

    /// Follows ConfigHub's `release.published` events (a server-side
    /// cursor; no lease) and hands them to release sources as wake-up hints.
    async fn follow_releases(self: Arc<Self>, shutdown: CancellationToken) {
        let mut retry = retry(Duration::from_secs(2), Duration::from_secs(60));
        loop {
            // One replica follows (a cursor is one bookmark on ConfigHub).
            if !self.hub.is_leader().await {
                if sleep_or_stop(Duration::from_secs(5), &shutdown).await {
                    return;
                }
                continue;
            }
            // From the last event handled, across restarts (the server's
            // bookmark starts at the tail for a new cursor).
            let from_cursor = self
                .hub
                .hub_state(RELEASE_CURSOR)
                .await
                .ok()
                .flatten()
                .and_then(|v| v.parse::<i64>().ok());
            let body = wire::CursorPollRequest {
                event_types: vec!["release.published".into()],
                from_cursor,
                timeout_seconds: 30,
            };
            let polled = tokio::select! {
                () = shutdown.cancelled() => return,
                p = self.client.poll_events("unitsync-releases", &body) => p,
            };
            match polled {
                Ok(events) => {
                    let mut last = from_cursor.unwrap_or(0);
                    let mut new = 0;
                    let got = !events.is_empty();
                    for m in events
                        .into_iter()
                        .filter(|m| m.event == wire::event::EVENT_LOG)
                    {
                        if let Ok(entry) = serde_json::from_value::<EventLogEntry>(m.data) {
                            // Handled already (a server counting from_cursor
                            // inclusively sends it again).
                            if from_cursor.is_some_and(|f| entry.cursor_id <= f) {
                                continue;
                            }
                            new += 1;
                            last = last.max(entry.cursor_id);
                            let _ = self.releases.send(entry);
                        }
                    }
                    if got && new == 0 && sleep_or_stop(Duration::from_secs(1), &shutdown).await {
                        return;
                    }
                    retry.reset();
                    if Some(last) != from_cursor
                        && last > 0
                        && let Err(e) = self
                            .hub
                            .set_hub_state(RELEASE_CURSOR, &last.to_string())
                            .await
                    {
                        tracing::warn!(error = %ErrorChain(&e), "cannot record the ConfigHub event cursor");
                    }
                }
                Err(e) if e.status() == Some(404) => {
                    tracing::info!(
                        "this ConfigHub has no event cursors; release events are not followed"
                    );
                    return;
                }
                Err(e) => {
                    if e.status().is_some_and(|s| (400..500).contains(&s)) {
                        tracing::warn!(error = %e, "ConfigHub refused the release event poll");
                    } else {
                        tracing::debug!(error = %e, "polling ConfigHub's release events failed");
                    }
                    if sleep_or_stop(retry.next_delay(), &shutdown).await {
                        return;
                    }
                }
            }
        }
    }

    // --- what the worker offers ---

    async fn environments(&self) -> Vec<EnvName> {
        let all = self
            .hub
            .list_environments()
            .await
            .map(|v| v.into_iter().map(|e| e.name).collect::<Vec<_>>())
            .unwrap_or_default();
        match &self.config.environments {
            Some(only) => all.into_iter().filter(|e| only.contains(e)).collect(),
            None => all,
        }
    }

    fn info(envs: &[EnvName]) -> WorkerInfo {
        WorkerInfo {
            bridge_worker_info: BridgeWorkerInfo {
                supported_config_types: vec![SupportedConfigType {
                    provider_type: "Kubernetes".into(),
                    toolchain_type: "Kubernetes/YAML".into(),
                    live_state_type: "Kubernetes/YAML".into(),
                    available_targets: envs
                        .iter()
                        .map(|e| AvailableTarget {
                            bridge_handle: e.to_string(),
                            name: target_slug(e),
                        })
                        .collect(),
                }],
            },
            function_worker_info: wire::FunctionWorkerInfo::default(),
        }
    }

    /// Registers what the worker provides (long poll: ProvidedInfo, then
    /// one target per environment, best effort).
    async fn register(&self, envs: &[EnvName]) -> Result<(), ClientError> {
        self.client.register(&Self::info(envs)).await?;
        for e in envs {
            let t = TargetCreate {
                slug: target_slug(e),
                display_name: format!("unitsync {e}"),
                bridge_handle: e.to_string(),
                bridge_worker_id: self.config.worker_id.clone(),
                provider_type: "Kubernetes".into(),
                toolchain_type: "Kubernetes/YAML".into(),
                live_state_type: "Kubernetes/YAML".into(),
                parameters: "null".into(),
            };
            if let Err(e) = self.client.upsert_target(&t).await {
                tracing::warn!(target = %t.slug, error = %e, "cannot create the ConfigHub target");
            }
        }
        Ok(())
    }

    // --- transports ---

    async fn long_poll(self: &Arc<Self>, shutdown: CancellationToken) {
        *self
            .channel
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Channel::LongPoll;
        let mut backoff = retry(Duration::from_secs(2), Duration::from_secs(30));
        let mut registered: Option<Vec<EnvName>> = None;
        loop {
            if shutdown.is_cancelled() {
                return;
            }
            let lease = match self.client.claim().await {
                Ok(l) => l,
                Err(e) => {
                    match e.status() {
                        Some(409) => tracing::debug!("another replica holds the ConfigHub lease"),
                        Some(s) if (400..500).contains(&s) && s != 401 => {
                            tracing::error!(error = %e, "ConfigHub refused the worker's lease; check the worker id and secret")
                        }
                        _ => {
                            tracing::warn!(error = %e, "cannot claim the ConfigHub lease; retrying")
                        }
                    }
                    if sleep_or_stop(backoff.next_delay(), &shutdown).await {
                        return;
                    }
                    continue;
                }
            };
            backoff.reset();
            self.hub.metrics.confighub_connected.set(1);
            tracing::info!(worker = %self.config.worker_id, "holding the ConfigHub lease");
            let envs = self.environments().await;
            if registered.as_ref() != Some(&envs) {
                match self.register(&envs).await {
                    Ok(()) => registered = Some(envs),
                    Err(e) => {
                        tracing::error!(error = %e, "cannot register with ConfigHub; retrying");
                        let _ = self.client.release(&lease.claim_token).await;
                        self.hub.metrics.confighub_connected.set(0);
                        if sleep_or_stop(backoff.next_delay(), &shutdown).await {
                            return;
                        }
                        continue;
                    }
                }
            }
            let shift = self.begin_shift(&shutdown);
            self.resume().await;
            let lease_over = shutdown.child_token();
            let ttl = Duration::from_secs(u64::try_from(lease.ttl_seconds).unwrap_or(0).max(1));
            let polling = async {
                let stop = self
                    .poll_while_held(&lease.claim_token, ttl, &shutdown)
                    .await;
                lease_over.cancel();
                stop
            };
            let (stop, (), ()) = tokio::join!(
                polling,
                self.keep_registered(&mut registered, &lease_over),
                self.redeliver(&lease_over),
            );
            shift.end().await;
            if stop {
                return;
            }
            self.hub.metrics.confighub_connected.set(0);
        }
    }

    /// Polls while the lease is ours; true when the hub shuts down. The
    /// lease counts as lost when no poll succeeded for most of its TTL
    /// (ConfigHub may have given it to another replica meanwhile).
    async fn poll_while_held(
        self: &Arc<Self>,
        claim: &str,
        ttl: Duration,
        shutdown: &CancellationToken,
    ) -> bool {
        let mut last_ok = tokio::time::Instant::now();
        let fence = ttl.mul_f64(0.8);
        loop {
            let started = tokio::time::Instant::now();
            let mut poll = std::pin::pin!(self.client.poll(claim));
            let polled = tokio::select! {
                () = shutdown.cancelled() => {
                    // Release first (ConfigHub shows the worker gone at
                    // once), then take what the poll in flight brings: it
                    // was dequeued for us. The next holder resumes it.
                    if let Err(e) = self.client.release(claim).await {
                        tracing::warn!(error = %e, "releasing the ConfigHub lease failed");
                    }
                    if let Ok(Ok(Polled::Events(events))) = tokio::time::timeout(SHUTDOWN_POLL, &mut poll).await {
                        for e in events {
                            self.dispatch(e).await;
                        }
                    }
                    return true;
                }
                p = &mut poll => p,
            };
            match polled {
                Ok(Polled::Nothing) => {
                    last_ok = tokio::time::Instant::now();
                    // A proxy answering at once must not make a hot loop.
                    if started.elapsed() < Duration::from_secs(1)
                        && sleep_or_stop(Duration::from_secs(1), shutdown).await
                    {
                        let _ = self.client.release(claim).await;
                        return true;
                    }
                }
                Ok(Polled::Events(events)) => {
                    last_ok = tokio::time::Instant::now();
                    for e in events {
                        self.dispatch(e).await;
                    }
                }
                Ok(Polled::LeaseLost) => {
                    tracing::warn!("the ConfigHub lease was lost; claiming it again");
                    return false;
                }
                Err(e) if e.status().is_some_and(|s| s < 500 && s != 429) => {
                    tracing::warn!(error = %e, "polling ConfigHub failed; claiming again");
                    return false;
                }
                Err(e) => {
                    if last_ok.elapsed() >= fence {
                        tracing::warn!(error = %e, "no poll succeeded for most of the lease's lifetime; it may be another replica's now");
                        return false;
                    }
                    tracing::warn!(error = %e, "polling ConfigHub failed; retrying");
                    if sleep_or_stop(Duration::from_secs(2), shutdown).await {
                        let _ = self.client.release(claim).await;
                        return true;
                    }
                }
            }
        }
    }

    /// While the lease (or stream) lasts, sends again the terminal reports
    /// ConfigHub has not taken yet and starts recorded operations nobody
    /// runs (the SDK's status queue retries forever, too).
    async fn redeliver(self: &Arc<Self>, over: &CancellationToken) {
        loop {
            if sleep_or_stop(REDELIVER_EVERY, over).await {
                return;
            }
            self.resume().await;
        }
    }

    /// While the lease is held, offers new environments as targets soon
    /// after they are created.
    async fn keep_registered(
        &self,
        registered: &mut Option<Vec<EnvName>>,
        lease_over: &CancellationToken,
    ) {
        loop {
            if sleep_or_stop(REGISTRATION_CHECK, lease_over).await {
                return;
            }
            let envs = self.environments().await;
            if registered.as_ref() != Some(&envs) {
                match self.register(&envs).await {
                    Ok(()) => *registered = Some(envs),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot update the ConfigHub registration")
                    }
                }
            }
        }
    }

    async fn stream(self: &Arc<Self>, shutdown: CancellationToken) {
        let mut backoff = retry(Duration::from_secs(1), Duration::from_secs(60));
        loop {
            if shutdown.is_cancelled() {
                return;
            }
            // One replica of a shared store streams.
            if !self.hub.is_leader().await {
                if sleep_or_stop(Duration::from_secs(5), &shutdown).await {
                    return;
                }
                continue;
            }
            let base = self.client.stream_base().await;
            *self
                .channel
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner) =
                Channel::Stream { base: base.clone() };
            if let Err(e) = self.client.me(&base).await {
                tracing::error!(error = %e, "ConfigHub does not know this worker (a 404 usually means a wrong secret)");
                if sleep_or_stop(backoff.next_delay(), &shutdown).await {
                    return;
                }
                continue;
            }
            let envs = self.environments().await;
            let events = match self.client.stream(&base, &Self::info(&envs)).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot open the ConfigHub stream; retrying");
                    if sleep_or_stop(backoff.next_delay(), &shutdown).await {
                        return;
                    }
                    continue;
                }
            };
            self.hub.metrics.confighub_connected.set(1);
            tracing::info!(worker = %self.config.worker_id, "ConfigHub stream open");
            let shift = self.begin_shift(&shutdown);
            self.resume().await;
            let opened = tokio::time::Instant::now();
            let mut events = std::pin::pin!(events);
            let mut check = tokio::time::interval(REGISTRATION_CHECK);
            let mut redeliver = tokio::time::interval(REDELIVER_EVERY);
            redeliver.tick().await;
            check.tick().await;
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => {
                        shift.end().await;
                        return;
                    }
                    _ = check.tick() => {
                        // New environments need a new WorkerInfo: reconnect.
                        if self.environments().await != envs {
                            tracing::info!("environments changed; re-registering with ConfigHub");
                            break;
                        }
                        if !self.hub.is_leader().await {
                            tracing::warn!("another replica leads now; closing the ConfigHub stream");
                            break;
                        }
                    }
                    _ = redeliver.tick() => self.resume().await,
                    e = events.next() => match e {
                        Some(Ok(m)) => self.dispatch(m).await,
                        Some(Err(e)) => {
                            tracing::warn!(error = %e, "the ConfigHub stream broke; reconnecting");
                            break;
                        }
                        None => {
                            tracing::info!("the ConfigHub stream ended; reconnecting");
                            break;
                        }
                    }
                }
            }
            shift.end().await;
            self.hub.metrics.confighub_connected.set(0);
            if opened.elapsed() > Duration::from_secs(60) {
                backoff.reset();
            }
            if sleep_or_stop(backoff.next_delay(), &shutdown).await {
                return;
            }
        }
    }

    // --- events ---

    async fn dispatch(self: &Arc<Self>, m: EventMessage) {
        match m.event.as_str() {
            wire::event::WORKER => {
                let w: WorkerEventRequest = serde_json::from_value(m.data).unwrap_or_default();
                let on_stream = matches!(
                    *self
                        .channel
                        .read()
                        .unwrap_or_else(std::sync::PoisonError::into_inner),
                    Channel::Stream { .. }
                );
                if w.action == action::HEARTBEAT && on_stream {
                    let this = self.clone();
                    self.shift()
                        .tasks
                        .spawn(async move { this.heartbeat().await });
                }
            }
            wire::event::BRIDGE_WORKER => {
                match serde_json::from_value::<BridgeWorkerEventRequest>(m.data) {
                    Ok(req) => self.on_operation(req).await,
                    Err(e) => {
                        tracing::warn!(error = %e, "skipping an undecodable ConfigHub operation")
                    }
                }
            }
            wire::event::EVENT_LOG => {
                if let Ok(entry) = serde_json::from_value::<EventLogEntry>(m.data) {
                    let _ = self.releases.send(entry);
                }
            }
            other => tracing::debug!(event = other, "ignoring a ConfigHub event"),
        }
    }

    /// Heartbeat reply (stream transport only).
    async fn heartbeat(&self) {
        let now = wire::rfc3339(SystemTime::now());
        let r = ActionResult {
            unit_id: wire::NIL_UUID.into(),
            space_id: wire::NIL_UUID.into(),
            queued_operation_id: wire::NIL_UUID.into(),
            action: action::HEARTBEAT.into(),
            result: result::NONE.into(),
            status: status::COMPLETED.into(),
            started_at: now.clone(),
            terminated_at: Some(now),
            ..Default::default()
        };
        if let Err(e) = self.send(&r, 1, &self.shift().stop).await {
            tracing::debug!(error = %e, "heartbeat reply failed");
        }
    }

    async fn on_operation(self: &Arc<Self>, req: BridgeWorkerEventRequest) {
        let p = req.payload;
        let id = p.queued_operation_id.clone();
        // The SDK refuses operations without an ID; so does the hub (the
        // ID keys the durable record).
        if !uuid::Uuid::parse_str(&id).is_ok_and(|u| !u.is_nil()) {
            tracing::warn!(action = %req.action, "skipping a ConfigHub operation without a valid QueuedOperationID");
            return;
        }
        match req.action.as_str() {
            action::CANCEL => self.cancel(&id),
            action::APPLY
            | action::DESTROY
            | action::REFRESH
            | action::IMPORT
            | action::FINALIZE => {
                if self.lock_running().contains_key(&id) {
                    return;
                }
                match self.hub.get_operation(&id).await {
                    // Delivered again (a reconnect): already handled.
                    Ok(Some(op)) if op.delivered => return,
                    Ok(Some(op)) => {
                        self.resume_one(op).await;
                        return;
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(op = %id, error = %ErrorChain(&e), "cannot look up a ConfigHub operation");
                        return;
                    }
                }
                self.start(req.action, p).await;
            }
            other => {
                // The SDK's answer to an action it does not know.
                let r = ActionResult {
                    unit_id: p.unit_id,
                    space_id: p.space_id,
                    queued_operation_id: id,
                    revision_num: p.revision_num,
                    action: other.to_owned(),
                    result: result::NONE.into(),
                    status: status::NONE.into(),
                    message: format!("unknown operation name: {other}"),
                    started_at: wire::rfc3339(SystemTime::now()),
                    ..Default::default()
                };
                let this = self.clone();
                self.shift().tasks.spawn(async move {
                    if let Err(e) = this.send(&r, 3, &this.shift().stop).await {
                        tracing::warn!(error = %e, "reporting an unknown action failed");
                    }
                });
            }
        }
    }

    /// Records a new operation, supersedes a running one of the same unit,
    /// and starts it.
    async fn start(self: &Arc<Self>, act: String, p: BridgeWorkerPayload) {
        let environment = if p.bridge_handle.is_empty() {
            // Older servers leave it out: only a hub offering one
            // environment knows which (otherwise the Apply fails, naming why).
            match self.environments().await.as_slice() {
                [only] => only.to_string(),
                _ => String::new(),
            }
        } else {
            p.bridge_handle.clone()
        };
        let detail = Detail {
            unit_id: p.unit_id.clone(),
            space_id: p.space_id.clone(),
            space_slug: p.space_slug.clone(),
            unit_slug: p.unit_slug.clone(),
            revision_num: p.revision_num,
            environment: environment.clone(),
            dry_run: p.dry_run,
            started_at: wire::rfc3339(SystemTime::now()),
            started_ms: UnixMillis::now().0,
            wait_seconds: wait_timeout(&p, self.config.wait_timeout).as_secs(),
            labels: p.unit_labels.clone(),
            data: String::from_utf8_lossy(&p.data.0).into_owned(),
        };
        let op = SourceOperation {
            id: p.queued_operation_id.clone(),
            source: self.source.clone(),
            unit: format!("{environment}/{}", p.unit_slug),
            action: act,
            state: RUNNING.into(),
            hub_revision: RevisionNum(0),
            report: String::new(),
            delivered: false,
            detail: serde_json::to_string(&detail).unwrap_or_default(),
            created_at: UnixMillis::now(),
        };
        if let Err(e) = self.hub.put_operation(&op).await {
            // Not recorded: do not act. ConfigHub delivers it again later.
            tracing::error!(op = %op.id, error = %ErrorChain(&e), "cannot record a ConfigHub operation");
            return;
        }
        if matches!(op.action.as_str(), action::APPLY | action::DESTROY) {
            self.supersede(&op.unit, &op.id);
        }
        self.spawn(op, detail);
    }

    fn spawn(self: &Arc<Self>, op: SourceOperation, detail: Detail) {
        let shift = self.shift();
        if shift.stop.is_cancelled() {
            // Between leases: the next holder resumes it from the store.
            return;
        }
        let running = Arc::new(Running {
            unit: op.unit.clone(),
            action: op.action.clone(),
            detail,
            cancel: CancellationToken::new(),
            decided: AtomicBool::new(false),
        });
        self.lock_running().insert(op.id.clone(), running.clone());
        let this = self.clone();
        shift.tasks.spawn(async move {
            let outcome = tokio::select! {
                () = shift.stop.cancelled() => {
                    this.forget(&op.id, &running);
                    return;
                }
                o = this.decide(&op, &running) => o,
            };
            this.finish(op, running, outcome, &shift.stop).await;
        });
    }

    /// A newer Apply or Destroy of a unit ends the one running: `Aborted`.
    fn supersede(self: &Arc<Self>, unit: &str, newer: &str) {
        let older: Vec<(String, Arc<Running>)> = self
            .lock_running()
            .iter()
            .filter(|(id, r)| {
                r.unit == unit
                    && *id != newer
                    && matches!(r.action.as_str(), action::APPLY | action::DESTROY)
            })
            .map(|(id, r)| (id.clone(), r.clone()))
            .collect();
        for (id, r) in older {
            let ended = self.end(
                &id,
                &r,
                status::ABORTED,
                &format!("Operation overridden by newer operation {newer}"),
            );
            if ended {
                tracing::info!(op = %id, %newer, "superseded");
            }
        }
    }

    /// `Cancel`: the running operation ends `Canceled` (nothing is reported
    /// for the Cancel event itself).
    fn cancel(self: &Arc<Self>, id: &str) {
        let found = self.lock_running().get(id).cloned();
        match found {
            Some(r) => {
                self.end(
                    id,
                    &r,
                    status::CANCELED,
                    "Operation cancelled by user request",
                );
            }
            None => tracing::info!(op = %id, "cancel of an operation not running here"),
        }
    }

    /// Ends a running operation from outside (supersede, cancel).
    fn end(self: &Arc<Self>, id: &str, r: &Arc<Running>, st: &str, message: &str) -> bool {
        if r.decided.swap(true, Ordering::SeqCst) {
            return false;
        }
        r.cancel.cancel();
        let report = self.result(id, &r.action, &r.detail, result::NONE, st, message);
        let this = self.clone();
        let id = id.to_owned();
        let r = r.clone();
        let shift = self.shift();
        shift.tasks.spawn(async move {
            this.deliver(&id, &r.unit, &r.action, report, &shift.stop)
                .await;
            this.forget(&id, &r);
        });
        true
    }

    // --- carrying operations out ---

    fn result(
        &self,
        id: &str,
        act: &str,
        d: &Detail,
        res: &str,
        st: &str,
        message: &str,
    ) -> ActionResult {
        // As the SDK: TerminatedAt on every report with a result except
        // ApplyWaitFailed, and on the Canceled/Aborted endings (no result).
        let terminated = if res == result::NONE {
            status::is_terminal(st)
        } else {
            res != result::APPLY_WAIT_FAILED
        };
        ActionResult {
            unit_id: d.unit_id.clone(),
            space_id: d.space_id.clone(),
            queued_operation_id: id.to_owned(),
            revision_num: d.revision_num,
            action: act.to_owned(),
            result: res.to_owned(),
            status: st.to_owned(),
            message: message.to_owned(),
            started_at: d.started_at.clone(),
            terminated_at: terminated.then(|| wire::rfc3339(SystemTime::now())),
            ..Default::default()
        }
        .bounded()
    }

    /// Carries an operation out, up to its outcome.
    async fn decide(&self, op: &SourceOperation, r: &Running) -> Outcome {
        match op.action.as_str() {
            action::APPLY => self.apply(op, r).await,
            action::DESTROY => self.destroy(op, r).await,
            action::REFRESH => self.refresh(op, r).await,
            action::IMPORT => Outcome::failed(
                result::IMPORT_FAILED,
                "unitsync does not import live resources into ConfigHub; apply the unit instead",
            ),
            _ => Outcome::done(result::NONE, "nothing to finalize"),
        }
    }

    /// Reports the outcome, unless a cancel or a newer operation ended it
    /// first (that ending was reported instead).
    async fn finish(
        &self,
        op: SourceOperation,
        r: Arc<Running>,
        outcome: Outcome,
        stop: &CancellationToken,
    ) {
        if r.decided.swap(true, Ordering::SeqCst) {
            return;
        }
        let mut report = self.result(
            &op.id,
            &op.action,
            &r.detail,
            outcome.result,
            outcome.status,
            &outcome.message,
        );
        report.resource_statuses = outcome.resources;
        report.error_messages = outcome.errors;
        report.data = wire::Bytes(outcome.data);
        if let Some(b) = outcome.bridge {
            report.bridge_state = wire::Bytes(b.to_string().into_bytes());
        }
        self.deliver(&op.id, &op.unit, &op.action, report, stop)
            .await;
        self.forget(&op.id, &r);
    }

    /// Records the terminal report durably, then sends it (retried; kept
    /// for the next connection when ConfigHub is away).
    async fn deliver(
        &self,
        id: &str,
        unit: &str,
        act: &str,
        report: ActionResult,
        stop: &CancellationToken,
    ) {
        self.hub
            .metrics
            .confighub_operations
            .get_or_create(&OperationLabels {
                action: act.to_owned(),
                result: if report.result == result::NONE {
                    report.status.clone()
                } else {
                    report.result.clone()
                },
            })
            .inc();
        let text = serde_json::to_string(&report).unwrap_or_default();
        let mut op = match self.hub.get_operation(id).await {
            Ok(Some(op)) => op,
            _ => SourceOperation {
                id: id.to_owned(),
                source: self.source.clone(),
                unit: unit.to_owned(),
                action: act.to_owned(),
                state: RUNNING.into(),
                hub_revision: RevisionNum(0),
                report: String::new(),
                delivered: false,
                detail: "{}".into(),
                created_at: UnixMillis::now(),
            },
        };
        op.state = REPORTED.into();
        op.report = text;
        match self.hub.decide_operation(&op).await {
            Ok(true) => self.send_recorded(op, &report, stop).await,
            // Another replica (or an earlier run) decided it: its report
            // is the one ConfigHub gets.
            Ok(false) => tracing::info!(op = %id, "this operation's ending was recorded already"),
            Err(e) => {
                // Not recorded: not sent either; whoever resumes it decides.
                tracing::error!(op = %id, error = %ErrorChain(&e), "cannot record a ConfigHub report");
            }
        }
    }

    async fn send_recorded(
        &self,
        mut op: SourceOperation,
        report: &ActionResult,
        stop: &CancellationToken,
    ) {
        match self.send(report, 15, stop).await {
            Ok(()) => {}
            Err(e) if e.is_retryable() => {
                // Kept: sent again when the worker (re)connects.
                tracing::warn!(op = %op.id, error = %e, "the terminal report did not reach ConfigHub yet");
                return;
            }
            Err(e) if report.result == result::APPLY_STUCK => {
                // A server that does not know ApplyStuck: say it the SDK's way.
                tracing::warn!(op = %op.id, error = %e, "ConfigHub refused ApplyStuck; reporting ApplyWaitFailed");
                let mut fallback = report.clone();
                fallback.result = result::APPLY_WAIT_FAILED.into();
                fallback.terminated_at = None;
                if let Err(e) = self.send(&fallback, 15, stop).await {
                    tracing::error!(op = %op.id, error = %e, "ConfigHub refused the terminal report");
                    if e.is_retryable() {
                        return;
                    }
                }
            }
            Err(e) => {
                tracing::error!(op = %op.id, error = %e, "ConfigHub refused the terminal report")
            }
        }
        op.delivered = true;
        if let Err(e) = self.hub.put_operation(&op).await {
            tracing::warn!(op = %op.id, error = %ErrorChain(&e), "cannot mark a ConfigHub report delivered");
        }
    }

    /// Sends one report with the SDK's retry policy (1 s to 30 s, x2,
    /// +-50 %, at most `tries`, 5 minutes in all; 409 and 5xx retried),
    /// giving up between tries when `stop` (the report stays recorded).
    async fn send(
        &self,
        report: &ActionResult,
        tries: u32,
        stop: &CancellationToken,
    ) -> Result<(), ClientError> {
        let mut retry = retry(Duration::from_secs(1), Duration::from_secs(30));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
        let mut n = 0;
        loop {
            let channel = self
                .channel
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone();
            let r = match &channel {
                Channel::LongPoll => self.client.report(report).await,
                Channel::Stream { base } => self.client.report_stream(base, report).await,
            };
            n += 1;
            match r {
                Ok(()) => return Ok(()),
                Err(e) if !e.is_retryable() || n >= tries => return Err(e),
                Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
                Err(e) => {
                    self.hub.metrics.confighub_report_retries.inc();
                    if sleep_or_stop(retry.next_delay(), stop).await {
                        return Err(e);
                    }
                }
            }
        }
    }

    /// A progress report (best effort: a lost one is superseded by the
    /// next).
    async fn progress(&self, op: &SourceOperation, run: &Running, res: &str, message: &str) {
        // Never after the ending (a cancel or a newer operation).
        if run.decided.load(Ordering::SeqCst) {
            return;
        }
        let mut r = self.result(
            &op.id,
            &op.action,
            &run.detail,
            res,
            status::PROGRESSING,
            message,
        );
        if res == result::NONE {
            r.terminated_at = None;
        }
        if let Err(e) = self.send(&r, 2, &self.shift().stop).await {
            tracing::debug!(op = %op.id, error = %e, "progress report failed");
        }
    }

    /// Re-reads the operations not yet reported (after a restart, or when
    /// this replica takes the lease over) and finishes each.
    async fn resume(self: &Arc<Self>) {
        let ops = match self.hub.open_operations(&self.source).await {
            Ok(o) => o,
            Err(e) => {
                tracing::warn!(error = %ErrorChain(&e), "cannot read the open ConfigHub operations");
                return;
            }
        };
        for op in ops {
            self.resume_one(op).await;
        }
    }

    async fn resume_one(self: &Arc<Self>, op: SourceOperation) {
        if self.lock_running().contains_key(&op.id) {
            return;
        }
        if op.state == REPORTED {
            let Ok(report) = serde_json::from_str::<ActionResult>(&op.report) else {
                return;
            };
            let shift = self.shift();
            if shift.stop.is_cancelled() {
                return;
            }
            tracing::info!(op = %op.id, "sending a recorded terminal report");
            // Decided already: a cancel or a newer operation leaves it be.
            let r = Arc::new(Running {
                unit: op.unit.clone(),
                action: op.action.clone(),
                detail: Detail::default(),
                cancel: CancellationToken::new(),
                decided: AtomicBool::new(true),
            });
            self.lock_running().insert(op.id.clone(), r.clone());
            let this = self.clone();
            shift.tasks.spawn(async move {
                let id = op.id.clone();
                this.send_recorded(op, &report, &shift.stop).await;
                this.forget(&id, &r);
            });
            return;
        }
        let detail: Detail = serde_json::from_str(&op.detail).unwrap_or_default();
        tracing::info!(op = %op.id, unit = %op.unit, action = %op.action, "resuming a ConfigHub operation");
        self.spawn(op, detail);
    }

    // --- Apply, Destroy, Refresh ---

    fn unit_ref(&self, d: &Detail) -> Result<UnitRef, String> {
        if d.environment.is_empty() {
            return Err("the operation names no target environment (no BridgeHandle) and this hub offers several; use a ConfigHub that sends BridgeHandle, or offer one environment".into());
        }
        let env: EnvName = d
            .environment
            .parse()
            .map_err(|e: crate::model::NameError| format!("target: {e}"))?;
        if !self
            .config
            .environments
            .as_ref()
            .is_none_or(|only| only.contains(&env))
        {
            return Err(format!("environment {env} is not offered to ConfigHub"));
        }
        let name: UnitName = d.unit_slug.parse().map_err(|e: crate::model::NameError| {
            format!("ConfigHub unit slug: {e} (unitsync unit names are DNS-1123 labels)")
        })?;
        Ok(UnitRef { env, name })
    }

    async fn apply(&self, op: &SourceOperation, r: &Running) -> Outcome {
        let d = &r.detail;
        let unit = match self.unit_ref(d) {
            Ok(u) => u,
            Err(m) => return Outcome::failed(result::APPLY_FAILED, m),
        };
        let origin = format!(
            "confighub {}/{}@{} unit {} op {}",
            d.space_slug, d.unit_slug, d.revision_num, d.unit_id, op.id
        );
        let mut revision = op.hub_revision;
        if revision.0 == 0 {
            // Committed before a restart? The origin names the operation.
            revision = self.committed_by(&unit, &op.id).await;
        }
        if revision.0 == 0 {
            if d.data.is_empty() {
                return Outcome::failed(
                    result::APPLY_FAILED,
                    "the operation carries no configuration data",
                );
            }
            if d.dry_run {
                return match self.hub.validate(&unit, d.data.clone()).await {
                    Ok((v, _)) => Outcome::done(
                        result::APPLY_COMPLETED,
                        format!(
                            "dry run: {unit} is valid ({} objects); nothing was committed",
                            v.documents()
                        ),
                    ),
                    Err(e) => failed_validation(&e),
                };
            }
            let guard = self.commit_lock(&unit).await;
            if r.cancel.is_cancelled() {
                return Outcome::done(result::NONE, "ended before committing");
            }
            let committed = self
                .hub
                .commit_from_source(SourceCommit {
                    source: owner(d),
                    actor: self.actor(),
                    unit: unit.clone(),
                    manifests: d.data.clone(),
                    // ConfigHub's unit labels select units for promotion.
                    labels: Some(d.labels.clone()),
                    origin,
                    message: format!(
                        "ConfigHub {}/{} revision {}",
                        d.space_slug, d.unit_slug, d.revision_num
                    ),
                })
                .await;
            match committed {
                Ok(rev) => revision = rev.number,
                Err(e) => return failed_validation(&e),
            }
            let mut recorded = op.clone();
            recorded.hub_revision = revision;
            // The manifests are in the store now.
            let mut light = d.clone();
            light.data.clear();
            recorded.detail = serde_json::to_string(&light).unwrap_or_default();
            if let Err(e) = self.hub.put_operation(&recorded).await {
                tracing::warn!(op = %op.id, error = %ErrorChain(&e), "cannot record the committed revision");
            }
            drop(guard);
        }
        self.progress(
            op,
            r,
            result::APPLY_SYNCED,
            &format!("committed as {unit} revision {revision}; waiting for every cluster of {} to report it Ready", unit.env),
        )
        .await;
        self.wait(op, r, &unit, revision, Phase::Ready)
            .await
            .with_bridge(&unit, revision)
    }

    async fn destroy(&self, op: &SourceOperation, r: &Running) -> Outcome {
        let d = &r.detail;
        let unit = match self.unit_ref(d) {
            Ok(u) => u,
            Err(m) => return Outcome::failed(result::DESTROY_FAILED, m),
        };
        let mut revision = op.hub_revision;
        if revision.0 == 0 {
            revision = self.committed_by(&unit, &op.id).await;
        }
        if revision.0 == 0 && d.dry_run {
            let what = match self
                .hub
                .get_unit(&unit, false, Role::Admin, &Page::ALL)
                .await
            {
                Ok(v) if !v.unit.destroyed => {
                    format!("dry run: would destroy {unit} (revision {})", v.unit.head)
                }
                _ => format!("dry run: {unit} has nothing to destroy"),
            };
            return Outcome::done(
                result::DESTROY_COMPLETED,
                format!("{what}; nothing was committed"),
            );
        }
        if revision.0 == 0 {
            let guard = self.commit_lock(&unit).await;
            if r.cancel.is_cancelled() {
                return Outcome::done(result::NONE, "ended before committing");
            }
            let destroyed = self
                .hub
                .destroy_from_source(
                    &owner(d),
                    self.actor(),
                    unit.clone(),
                    format!("confighub {}/{} op {}", d.space_slug, d.unit_slug, op.id),
                    format!("ConfigHub destroy of {}/{}", d.space_slug, d.unit_slug),
                )
                .await;
            match destroyed {
                Ok(Some(rev)) => revision = rev.number,
                Ok(None) => {
                    return Outcome::done(
                        result::DESTROY_COMPLETED,
                        format!("{unit} has nothing to destroy"),
                    );
                }
                Err(e) => return Outcome::failed(result::DESTROY_FAILED, e.to_string()),
            }
            let mut recorded = op.clone();
            recorded.hub_revision = revision;
            if let Err(e) = self.hub.put_operation(&recorded).await {
                tracing::warn!(op = %op.id, error = %ErrorChain(&e), "cannot record the committed revision");
            }
            drop(guard);
        }
        self.progress(
            op,
            r,
            result::NONE,
            &format!(
                "committed the destroy of {unit} as revision {revision}; waiting for every cluster"
            ),
        )
        .await;
        self.wait(op, r, &unit, revision, Phase::Destroyed)
            .await
            .with_bridge(&unit, revision)
    }

    async fn refresh(&self, _op: &SourceOperation, r: &Running) -> Outcome {
        let unit = match self.unit_ref(&r.detail) {
            Ok(u) => u,
            Err(m) => return Outcome::failed(result::REFRESH_FAILED, m),
        };
        let view = match self
            .hub
            .get_unit(&unit, false, Role::Admin, &Page::ALL)
            .await
        {
            Ok(v) => v,
            Err(e) => return Outcome::failed(result::REFRESH_FAILED, e.to_string()),
        };
        let mut drifted = Vec::new();
        for c in &view.cells {
            for res in c
                .status
                .resources
                .iter()
                .filter(|r| !r.drifted_fields.is_empty())
            {
                drifted.push(format!(
                    "{}: {} {}{} drifted at {}",
                    c.cluster,
                    res.kind,
                    if res.namespace.is_empty() {
                        String::new()
                    } else {
                        format!("{}/", res.namespace)
                    },
                    res.name,
                    res.drifted_fields.join(", ")
                ));
            }
        }
        let mut o = if drifted.is_empty() {
            Outcome::done(
                result::REFRESH_AND_NO_DRIFT,
                "Live state matches - no drift detected",
            )
        } else {
            let mut o = Outcome::done(
                result::REFRESH_AND_DRIFTED,
                format!("drift: {}", drifted.join("; ")),
            );
            // The configuration stays ConfigHub's: hand back what it sent,
            // unchanged (the agents heal or report the drift).
            o.data = r.detail.data.clone().into_bytes();
            o
        };
        o.resources = rollup(&view.cells, view.unit.head);
        o
    }

    /// The revision an earlier run of this operation committed, if any.
    async fn committed_by(&self, unit: &UnitRef, op: &str) -> RevisionNum {
        let needle = format!("op {op}");
        match self.hub.unit_history(unit).await {
            Ok(revs) => revs
                .iter()
                .rev()
                .find(|r| r.origin.ends_with(&needle))
                .map_or(RevisionNum(0), |r| r.number),
            Err(_) => RevisionNum(0),
        }
    }

    /// Waits until every cluster of the unit's environment reports
    /// `revision` in `want` (Ready, or Destroyed); a failure, a stuck
    /// resource or the wait timeout ends it otherwise.
    async fn wait(
        &self,
        op: &SourceOperation,
        r: &Running,
        unit: &UnitRef,
        revision: RevisionNum,
        want: Phase,
    ) -> Outcome {
        let d = &r.detail;
        let destroy = want == Phase::Destroyed;
        let (done, failed, timed_out) = if destroy {
            (
                result::DESTROY_COMPLETED,
                result::DESTROY_FAILED,
                result::DESTROY_WAIT_FAILED,
            )
        } else {
            (
                result::APPLY_COMPLETED,
                result::APPLY_FAILED,
                result::APPLY_WAIT_FAILED,
            )
        };
        // From the operation's start, across restarts and reconnects.
        let elapsed =
            Duration::from_millis(u64::try_from(UnixMillis::now().0 - d.started_ms).unwrap_or(0));
        let deadline = tokio::time::Instant::now()
            + Duration::from_secs(d.wait_seconds.max(1)).saturating_sub(if d.started_ms > 0 {
                elapsed
            } else {
                Duration::ZERO
            });
        let mut changes = self.hub.subscribe();
        let mut last_said = String::new();
        let mut last_progress = tokio::time::Instant::now() - PROGRESS_EVERY;
        loop {
            let clusters = match self.hub.list_clusters(Some(&unit.env)).await {
                Ok(c) => c.into_iter().map(|(c, _)| c.name).collect::<Vec<_>>(),
                Err(e) => return Outcome::failed(failed, e.to_string()),
            };
            let cells = match self.hub.unit_cells(unit).await {
                Ok(cells) => cells,
                Err(e) => return Outcome::failed(failed, e.to_string()),
            };
            let verdict = judge(&clusters, &cells, revision, want);
            let resources = rollup(&cells, revision);
            match &verdict {
                Verdict::Done => {
                    let mut o = Outcome::done(
                        done,
                        format!(
                            "{unit} revision {revision} {} in all {} cluster(s) of {}",
                            if destroy { "destroyed" } else { "Ready" },
                            clusters.len(),
                            unit.env
                        ),
                    );
                    o.resources = resources;
                    return o;
                }
                Verdict::Failed(problems) => {
                    let mut o =
                        Outcome::failed(failed, format!("failed in {}", problems.join("; ")));
                    o.errors = problems.clone();
                    o.resources = resources;
                    return o;
                }
                Verdict::Stuck(problems) if !destroy => {
                    let mut o = Outcome::failed(
                        self.config.stuck_result.as_str(),
                        format!("stuck in {}", problems.join("; ")),
                    );
                    o.errors = problems.clone();
                    o.resources = resources;
                    return o;
                }
                Verdict::Waiting(summary) | Verdict::Stuck(summary) => {
                    let said = summary.join("; ");
                    if said != last_said && last_progress.elapsed() >= PROGRESS_EVERY {
                        self.progress(op, r, result::NONE, &said).await;
                        last_said = said;
                        last_progress = tokio::time::Instant::now();
                    }
                }
            }
            if tokio::time::Instant::now() >= deadline {
                let mut o = Outcome::failed(
                    timed_out,
                    format!(
                        "not {} in every cluster within {}s: {last_said}",
                        if destroy { "destroyed" } else { "Ready" },
                        d.wait_seconds
                    ),
                );
                o.resources = resources;
                return o;
            }
            // Until a status changes (or a while passes: other replicas'
            // agents, missed notices), the deadline, or an end from outside.
            let recheck = tokio::time::Instant::now() + RECHECK;
            loop {
                tokio::select! {
                    () = r.cancel.cancelled() => return Outcome::done(result::NONE, "ended"),
                    () = tokio::time::sleep_until(deadline.min(recheck)) => break,
                    c = changes.recv() => match c {
                        Ok(e) if !e.touches(unit) => {}
                        Ok(_) | Err(RecvError::Lagged(_)) => break,
                        Err(RecvError::Closed) => {
                            tokio::time::sleep_until(deadline.min(recheck)).await;
                            break;
                        }
                    },
                }
            }
        }
    }
}

/// How an operation ended.
struct Outcome {
    status: &'static str,
    result: &'static str,
    message: String,
    resources: BTreeMap<String, ResourceStatus>,
    errors: Vec<String>,
    /// What the hub made of it, for ConfigHub to keep (`BridgeState`).
    bridge: Option<serde_json::Value>,
    /// Configuration data to hand back (`Data`).
    data: Vec<u8>,
}

impl Outcome {
    fn with_bridge(mut self, unit: &UnitRef, revision: RevisionNum) -> Outcome {
        self.bridge =
            Some(serde_json::json!({"Unit": unit.to_string(), "HubRevision": revision.0}));
        self
    }

    fn done(result: &'static str, message: impl Into<String>) -> Outcome {
        Outcome {
            status: status::COMPLETED,
            result,
            message: message.into(),
            resources: BTreeMap::new(),
            errors: vec![],
            bridge: None,
            data: vec![],
        }
    }

    fn failed(result: &'static str, message: impl Into<String>) -> Outcome {
        let message = message.into();
        Outcome {
            status: status::FAILED,
            result,
            errors: vec![message.clone()],
            message,
            resources: BTreeMap::new(),
            bridge: None,
            data: vec![],
        }
    }
}

fn failed_validation(e: &HubError) -> Outcome {
    Outcome::failed(result::APPLY_FAILED, e.to_string())
}

/// The wait timeout an operation asks for (`TargetOptions.WaitTimeout`, or
/// the target parameters' `WaitTimeout`, as Go durations), else `default`.
/// The SDK's "forever" (87600h) means the default here: something must
/// eventually answer.
fn wait_timeout(p: &BridgeWorkerPayload, default: Duration) -> Duration {
    let from_params = || {
        let v: serde_json::Value = serde_json::from_slice(&p.target_params.0).ok()?;
        v["WaitTimeout"].as_str().map(str::to_owned)
    };
    p.target_options
        .get("WaitTimeout")
        .cloned()
        .or_else(from_params)
        .and_then(|s| humantime::parse_duration(&s).ok())
        .filter(|d| *d > Duration::ZERO && *d < Duration::from_secs(365 * 24 * 3600))
        .unwrap_or(default)
}

/// The owner of the units an operation's space feeds: a ConfigHub space
/// owns its units (the same slug from another space is refused).
fn owner(d: &Detail) -> String {
    let space = if d.space_slug.is_empty() {
        &d.space_id
    } else {
        &d.space_slug
    };
    format!("confighub:{space}")
}

/// The target slug of an environment.
pub fn target_slug(env: &EnvName) -> String {
    format!("unitsync-{env}")
}

/// Sleeps unless stopped first; true when stopped.
async fn sleep_or_stop(d: Duration, stop: &CancellationToken) -> bool {
    tokio::select! {
        () = stop.cancelled() => true,
        () = tokio::time::sleep(d) => false,
    }
}

/// The worker's retry policy: the agents' backoff (`unitsync_proto`), x2
/// with +-50 % jitter from `initial`, capped, no short first window.
fn retry(initial: Duration, cap: Duration) -> Backoff {
    Backoff::new(BackoffPolicy {
        first_window: Duration::ZERO,
        initial,
        multiplier: 2.0,
        jitter: 0.5,
        max: cap,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_timeouts_come_from_the_target_and_never_mean_forever() {
        let mut p = BridgeWorkerPayload::default();
        let d = Duration::from_secs(600);
        assert_eq!(wait_timeout(&p, d), d);
        p.target_options
            .insert("WaitTimeout".into(), "2m30s".into());
        assert_eq!(wait_timeout(&p, d), Duration::from_secs(150));
        p.target_options
            .insert("WaitTimeout".into(), "87600h0m0s".into());
        assert_eq!(wait_timeout(&p, d), d);
    }
}
