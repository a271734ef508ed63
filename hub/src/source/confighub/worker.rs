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

mod connection;
mod operations;

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
    /// While it commits (`Some`): an ending asked for meanwhile (a cancel,
    /// a newer operation), held until the commit is done, so the report
    /// says what the commit did.
    committing: std::sync::Mutex<Option<Option<(&'static str, String)>>>,
    /// Held while a report is sent: an ending decided from outside waits
    /// for a progress report in flight, so it is never overtaken by one.
    reporting: tokio::sync::Mutex<()>,
}

/// What asking a running operation to end did.
#[derive(Debug, PartialEq, Eq)]
enum Ending {
    /// Decided now: report it.
    Decided,
    /// It is committing: held until the commit is done.
    Held,
    /// Something else decided it first.
    Already,
}

impl Running {
    fn new(unit: String, action: String, detail: Detail, decided: bool) -> Running {
        Running {
            unit,
            action,
            detail,
            cancel: CancellationToken::new(),
            decided: AtomicBool::new(decided),
            committing: std::sync::Mutex::default(),
            reporting: tokio::sync::Mutex::default(),
        }
    }

    fn lock_committing(&self) -> std::sync::MutexGuard<'_, Option<Option<(&'static str, String)>>> {
        self.committing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Asks the operation to end with `status`: decided at once, unless it
    /// is committing (then held until the commit is done).
    fn end(&self, status: &'static str, message: &str) -> Ending {
        let mut c = self.lock_committing();
        if let Some(held) = c.as_mut() {
            held.get_or_insert((status, message.to_owned()));
            return Ending::Held;
        }
        if self.decided.swap(true, Ordering::SeqCst) {
            return Ending::Already;
        }
        Ending::Decided
    }

    /// Enters the commit section, unless the operation was ended.
    fn start_commit(&self) -> bool {
        let mut c = self.lock_committing();
        if self.decided.load(Ordering::SeqCst) || self.cancel.is_cancelled() {
            return false;
        }
        *c = Some(None);
        true
    }

    /// Leaves the commit section: the ending asked for meanwhile, if any.
    fn end_commit(&self) -> Option<(&'static str, String)> {
        self.lock_committing().take().flatten()
    }
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
    fn an_ending_asked_for_while_committing_is_held_until_the_commit_is_done() {
        let r = Running::new("dev/web".into(), "Apply".into(), Detail::default(), false);
        assert!(r.start_commit());
        assert_eq!(r.end(status::CANCELED, "cancelled"), Ending::Held);
        assert_eq!(r.end(status::ABORTED, "newer"), Ending::Held);
        // The first one asked for is what the report says.
        assert_eq!(r.end_commit(), Some((status::CANCELED, "cancelled".into())));
        assert_eq!(r.end(status::CANCELED, "cancelled"), Ending::Decided);
        assert_eq!(r.end(status::CANCELED, "cancelled"), Ending::Already);
        // Ended: it never enters the commit.
        assert!(!r.start_commit());
    }

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
