//! One worker per unit keeps its cluster in the unit's desired state:
//! apply (bounded concurrency across units; one unit's revisions in order,
//! a newer revision superseding an in-flight one), record the inventory
//! (written ahead of the apply, shrunk after prune), prune what left the
//! unit, assess health, and watch for drift. It works from the
//! desired-state record alone, so a hub outage changes nothing.
//!
//! Failure is never silent and never unsafe: an object that cannot be
//! applied is reported with its reason while the rest of the unit is
//! applied (and its drift healed); a type the cluster does not serve is
//! waited for a bounded time, then reported Failed; anything the agent
//! cannot check (a failed read, an unreachable API server, a corrupt
//! inventory) keeps objects rather than deleting them, and reads Unknown or
//! Failed, never Ready.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::status::{Phase, SyncState};
use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use unitsync_proto::backoff::{Backoff, BackoffPolicy};

use crate::apply::{Applier, ApplyError, ObjectDrift, SCALED_KINDS, scale_target, scaled_key};
use crate::desired::{DesiredStore, DesiredUnit};
use crate::drift::DriftWatch;
use crate::health::{self, Health};
use crate::hub_client::{ResourceReport, StatusQueue, StatusUpdate};
use crate::inventory::{Entry, Inventory, InventoryError, InventoryStore};
use crate::manifest::{
    ANNOTATION_DRIFT, ANNOTATION_FORCE, ANNOTATION_PRUNE, ANNOTATION_UNIT, Object,
};
use crate::metrics::AgentMetrics;

mod plan;

use plan::{Key, key_of, rank};
pub use plan::{Plan, plan};

/// Tuning of the reconcile loop.
#[derive(Clone, Debug)]
pub struct Tuning {
    /// Units applied at the same time.
    pub concurrency: usize,
    /// How often health is re-assessed while a unit is not Ready, and how
    /// often the API server's reachability is probed.
    pub health_interval: Duration,
    /// How often applied objects are checked for drift.
    pub drift_interval: Duration,
    /// A revision that would prune more than this share of the inventory is
    /// refused (an explicit destroy is needed).
    pub max_prune_ratio: f64,
    /// Retry policy after a failed apply.
    pub retry: BackoffPolicy,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            concurrency: 4,
            health_interval: Duration::from_secs(2),
            drift_interval: Duration::from_secs(30),
            max_prune_ratio: 0.5,
            retry: BackoffPolicy {
                first_window: Duration::ZERO,
                initial: Duration::from_secs(1),
                multiplier: 1.6,
                jitter: 0.2,
                max: Duration::from_secs(60),
            },
        }
    }
}

pub struct Reconciler {
    applier: Arc<Applier>,
    inventory: InventoryStore,
    desired: Arc<dyn DesiredStore>,
    statuses: Arc<StatusQueue>,
    tuning: Tuning,
    permits: Arc<Semaphore>,
    workers: Mutex<HashMap<String, watch::Sender<DesiredUnit>>>,
    drift: DriftWatch,
    /// `Some(reason)` while the API server does not answer.
    api_down: watch::Receiver<Option<String>>,
    allowed_namespaces: Vec<String>,
    metrics: Arc<AgentMetrics>,
    shutdown: CancellationToken,
}

/// After a watch event, how long to let related changes settle before
/// comparing.
const DRIFT_SETTLE: Duration = Duration::from_millis(100);

/// The outcome of one pass over a unit.
enum Pass {
    /// Every object applied and everything that left the unit pruned
    /// (or, for a destroy, deleted).
    Done {
        healable: BTreeSet<Key>,
        /// What was kept although it left the unit, and why.
        kept: Vec<String>,
    },
    Superseded,
    Failed {
        phase: Phase,
        message: String,
        resources: Vec<ResourceReport>,
        /// Objects applied in this pass: their drift may still be healed.
        healable: BTreeSet<Key>,
        /// Retry at the health interval (waiting for something on its
        /// way) instead of backing off.
        soon: bool,
    },
}

impl Pass {
    /// The pass's result, as the metrics label it.
    fn result(&self, tombstone: bool) -> &'static str {
        match self {
            Pass::Done { .. } if tombstone => "destroyed",
            Pass::Done { .. } => "applied",
            Pass::Superseded => "superseded",
            Pass::Failed {
                phase: Phase::Unknown,
                ..
            } => "unknown",
            Pass::Failed { .. } => "failed",
        }
    }

    fn failed(phase: Phase, message: impl Into<String>) -> Pass {
        Pass::Failed {
            phase,
            message: message.into(),
            resources: vec![],
            healable: BTreeSet::new(),
            soon: false,
        }
    }

    /// The API server could not be reached: the unit's state is unknown.
    fn unknown(message: impl Into<String>) -> Pass {
        Self::failed(Phase::Unknown, message)
    }

    fn of(e: ApplyError) -> Pass {
        match e {
            ApplyError::Unreachable(m) => Self::unknown(m),
            ApplyError::NotServed(m) | ApplyError::Rejected(m) => Self::failed(Phase::Failed, m),
        }
    }

    fn inventory(e: InventoryError) -> Pass {
        match e {
            InventoryError::Unreachable(_) => Self::unknown(e.to_string()),
            InventoryError::Corrupt { .. } | InventoryError::OtherEnvironment { .. } => {
                Self::failed(Phase::Failed, e.to_string())
            }
        }
    }
}

/// A Job with `ttlSecondsAfterFinished`: the cluster deletes it once it
/// finished, and that is not drift (re-creating it would run it again).
fn expires(o: &Object) -> bool {
    o.group() == "batch" && o.kind == "Job" && o.body["spec"]["ttlSecondsAfterFinished"].is_number()
}

/// The unit (`ENV/UNIT`) a live object says it belongs to; nothing is
/// deleted for a unit that is not its owner.
fn owner(live: &serde_json::Value) -> &str {
    live["metadata"]["annotations"][ANNOTATION_UNIT]
        .as_str()
        .unwrap_or_default()
}

/// Why deleting a Namespace or CRD of `unit` would take other units'
/// objects along (the namespace controller deletes what a namespace holds;
/// deleting a CRD deletes every resource of its type); `None` when it
/// would not.
fn takes_along(
    e: &Entry,
    live: &serde_json::Value,
    unit: &str,
    members: &crate::apply::Membership,
) -> Option<String> {
    let within = |o: &Entry| match (e.group.as_str(), e.kind.as_str()) {
        ("", "Namespace") => o.namespace == e.name,
        ("apiextensions.k8s.io", "CustomResourceDefinition") => {
            live["spec"]["group"].as_str() == Some(o.group.as_str())
                && live["spec"]["names"]["kind"].as_str() == Some(o.kind.as_str())
        }
        _ => false,
    };
    let mut others: Vec<&str> = members
        .iter()
        .filter(|(u, objects)| u.as_str() != unit && objects.iter().any(within))
        .map(|(u, _)| u.as_str())
        .collect();
    if others.is_empty() {
        return None;
    }
    others.sort_unstable();
    Some(format!("kept: it holds objects of {}", others.join(", ")))
}

/// What the watch phase after a pass ended with.
enum Watched {
    NewRevision,
    /// Apply again (retry time reached, or the inventory was lost).
    Reapply,
    Stop,
}

/// What an assessment found.
enum Assessed {
    Status(Phase, String, Vec<ResourceReport>),
    /// The inventory is gone, or names an object replaced since: apply
    /// again (which recovers membership, and the new uids).
    Lost,
}

fn resource(e: &Entry, sync: SyncState, health: Option<Health>, message: String) -> ResourceReport {
    ResourceReport {
        api_version: e.api_version(),
        kind: e.kind.clone(),
        namespace: e.namespace.clone(),
        name: e.name.clone(),
        sync,
        health,
        message,
        drifted_fields: vec![],
    }
}

/// What a [`Reconciler`] works with.
pub struct Parts {
    pub applier: Arc<Applier>,
    pub inventory: InventoryStore,
    /// The durable record of desired revisions.
    pub desired: Arc<dyn DesiredStore>,
    /// Where status for the hub goes.
    pub statuses: Arc<StatusQueue>,
    pub tuning: Tuning,
    /// Namespaces objects may be in (empty: any).
    pub allowed_namespaces: Vec<String>,
    pub metrics: Arc<AgentMetrics>,
}

impl Reconciler {
    pub fn new(parts: Parts, shutdown: CancellationToken) -> Arc<Reconciler> {
        let Parts {
            applier,
            inventory,
            desired,
            statuses,
            tuning,
            allowed_namespaces,
            metrics,
        } = parts;
        let (down_tx, api_down) = watch::channel(None);
        tokio::spawn(probe_api(
            applier.client().clone(),
            tuning.health_interval,
            down_tx,
            shutdown.clone(),
        ));
        applier
            .own_writes()
            .report_size(metrics.tracked_objects.clone());
        Arc::new(Reconciler {
            permits: Arc::new(Semaphore::new(tuning.concurrency.max(1))),
            drift: DriftWatch::new(
                applier.client().clone(),
                allowed_namespaces.clone(),
                applier.own_writes(),
                shutdown.clone(),
            ),
            applier,
            inventory,
            desired,
            statuses,
            tuning,
            workers: Mutex::default(),
            api_down,
            allowed_namespaces,
            metrics,
            shutdown,
        })
    }

    /// Hands a unit's (new) desired state to its worker, starting one. The
    /// revision a worker already has is not handed again.
    pub fn desired(self: &Arc<Self>, unit: DesiredUnit) {
        let mut workers = self
            .workers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(tx) = workers.get(&unit.unit) {
            if tx.borrow().same_revision(&unit) {
                return;
            }
            if tx.send(unit.clone()).is_ok() {
                return;
            }
        }
        let name = unit.unit.clone();
        let (tx, rx) = watch::channel(unit);
        workers.insert(name.clone(), tx);
        self.metrics.units.set(workers.len() as i64);
        tokio::spawn(self.clone().worker(name, rx));
    }

    /// Makes the workers match the durable record (on every hub session:
    /// nothing recorded is left unapplied, whatever happened to a session).
    pub fn sync_with_record(self: &Arc<Self>) {
        for unit in self.desired.load() {
            self.desired(unit);
        }
    }

    fn report(
        &self,
        u: &DesiredUnit,
        phase: Phase,
        message: impl Into<String>,
        resources: Vec<ResourceReport>,
    ) {
        self.statuses.push(StatusUpdate {
            unit: u.unit.clone(),
            revision: u.revision,
            phase,
            message: message.into(),
            resources,
        });
    }

    async fn worker(self: Arc<Self>, name: String, mut rx: watch::Receiver<DesiredUnit>) {
        let mut backoff = Backoff::new(self.tuning.retry);
        let changed = self.drift.waker(&name);
        // Since when this revision has been waiting for a type to be served.
        let mut waiting_since: Option<(u64, Instant)> = None;
        loop {
            let unit = rx.borrow_and_update().clone();
            if self.shutdown.is_cancelled() {
                return;
            }
            tracing::debug!(unit = %unit.unit, revision = unit.revision, tombstone = unit.tombstone, "pass");
            let started = Instant::now();
            let pass = if unit.tombstone {
                self.destroy(&unit, &rx).await
            } else {
                self.apply(&unit, &rx, &mut waiting_since).await
            };
            self.metrics
                .pass(pass.result(unit.tombstone), started.elapsed());
            let (healable, retry_at) = match pass {
                Pass::Superseded if self.shutdown.is_cancelled() => return,
                Pass::Superseded => {
                    self.report(
                        &unit,
                        Phase::Superseded,
                        "a newer revision arrived while applying",
                        vec![],
                    );
                    continue;
                }
                Pass::Done { kept, .. } if unit.tombstone => {
                    let message = if kept.is_empty() {
                        "all objects deleted".to_owned()
                    } else {
                        format!("all objects deleted but {}", kept.join("; "))
                    };
                    self.report(&unit, Phase::Destroyed, message, vec![]);
                    if let Err(e) = self.desired.forget(&name, unit.revision).await {
                        tracing::warn!(unit = %name, error = %e, "cannot forget a destroyed unit");
                    }
                    self.drift.forget(&name);
                    {
                        let mut workers = self
                            .workers
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner);
                        workers.remove(&name);
                        self.metrics.units.set(workers.len() as i64);
                    }
                    // A new revision may have raced the removal: serve it.
                    if rx.has_changed().unwrap_or(false) {
                        let next = rx.borrow().clone();
                        if !next.tombstone {
                            let this = self.clone();
                            tokio::spawn(async move { this.desired(next) });
                        }
                    }
                    return;
                }
                Pass::Done { healable, .. } => {
                    backoff.reset();
                    (healable, None)
                }
                Pass::Failed {
                    phase,
                    message,
                    resources,
                    healable,
                    soon,
                } => {
                    tracing::warn!(unit = %unit.unit, revision = unit.revision, %message, "unit not applied");
                    self.report(&unit, phase, message, resources);
                    let delay = if soon {
                        self.tuning.health_interval
                    } else {
                        backoff.next_delay()
                    };
                    (healable, Some(Instant::now() + delay))
                }
            };
            if unit.tombstone {
                // A failed destroy: retry it, or serve a new revision.
                tokio::select! {
                    () = self.shutdown.cancelled() => return,
                    r = rx.changed() => if r.is_err() { return },
                    () = tokio::time::sleep_until(retry_at.unwrap_or_else(Instant::now)) => {}
                }
                continue;
            }
            match self
                .watch(&unit, &mut rx, &changed, &healable, retry_at)
                .await
            {
                Watched::NewRevision | Watched::Reapply => {}
                Watched::Stop => return,
            }
        }
    }

    /// After a pass: re-assess health (while the pass succeeded) and heal
    /// drift of the objects applied, until a new revision arrives or it is
    /// time to apply again.
    async fn watch(
        &self,
        unit: &DesiredUnit,
        rx: &mut watch::Receiver<DesiredUnit>,
        changed: &crate::drift::Waker,
        healable: &BTreeSet<Key>,
        retry_at: Option<Instant>,
    ) -> Watched {
        let failed = retry_at.is_some();
        // Jobs their TTL controller deletes once finished: gone is done
        // (the unit is parsed again only when it may hold one).
        let expiring: BTreeSet<Key> = if unit.manifests.contains("ttlSecondsAfterFinished") {
            plan(unit, &Inventory::default(), 1.0)
                .map(|p| {
                    p.objects
                        .iter()
                        .filter(|o| expires(o))
                        .map(key_of)
                        .collect()
                })
                .unwrap_or_default()
        } else {
            BTreeSet::new()
        };
        let mut api_down = self.api_down.clone();
        let mut next_drift = Instant::now() + self.tuning.drift_interval;
        let mut drift = Drift::default();
        let mut healed_note = String::new();
        let mut last_report: Option<(Phase, String)> = None;
        loop {
            let down = api_down.borrow_and_update().clone();
            tracing::trace!(unit = %unit.unit, revision = unit.revision, failed, api_down = down.is_some(), "watching");
            let mut phase = Phase::Unknown;
            if let Some(reason) = &down {
                // Nothing can be checked: say so rather than keep a stale
                // verdict (Unknown is not Ready).
                let key = (Phase::Unknown, reason.clone());
                if last_report.as_ref() != Some(&key) {
                    self.report(unit, Phase::Unknown, reason.clone(), vec![]);
                    last_report = Some(key);
                }
            } else if !failed {
                let (p, mut message, mut resources) = match self.assess(unit, &expiring).await {
                    Assessed::Lost => return Watched::Reapply,
                    Assessed::Status(p, m, r) => (p, m, r),
                };
                phase = p;
                if !drift.outstanding.is_empty() && phase == Phase::Ready {
                    phase = Phase::Drifted;
                    message = drift.outstanding.join("; ");
                }
                for r in &mut resources {
                    if let Some(d) = drift.reports.iter().find(|d| {
                        d.kind == r.kind && d.namespace == r.namespace && d.name == r.name
                    }) {
                        r.drifted_fields = d.drifted_fields.clone();
                        r.sync = d.sync;
                    }
                }
                if !healed_note.is_empty() {
                    message = if message.is_empty() {
                        healed_note.clone()
                    } else {
                        format!("{message}; {healed_note}")
                    };
                }
                let key = (phase, message.clone());
                if last_report.as_ref() != Some(&key) {
                    self.report(unit, phase, message, resources);
                    last_report = Some(key);
                }
            }
            let wait = match retry_at {
                Some(at) => at.saturating_duration_since(Instant::now()),
                None if phase == Phase::Ready => self.tuning.drift_interval,
                None => self.tuning.health_interval,
            }
            .min(self.tuning.drift_interval)
            .min(next_drift.saturating_duration_since(Instant::now()));
            // Every wait ends at once for a new revision.
            tokio::select! {
                () = self.shutdown.cancelled() => return Watched::Stop,
                r = rx.changed() => return if r.is_err() { Watched::Stop } else { Watched::NewRevision },
                () = tokio::time::sleep(wait) => {}
                r = api_down.changed() => if r.is_err() { return Watched::Stop },
                // Someone changed one of the unit's objects: compare once
                // the burst settles; a status change: re-assess now.
                () = changed.notify.notified() => {
                    if changed.take_drift() {
                        next_drift = next_drift.min(Instant::now() + DRIFT_SETTLE);
                    }
                }
            }
            if retry_at.is_some_and(|at| Instant::now() >= at) {
                return Watched::Reapply;
            }
            if Instant::now() >= next_drift && api_down.borrow().is_none() {
                next_drift = Instant::now() + self.tuning.drift_interval;
                drift = self.check_drift(unit, healable).await;
                if drift.missing {
                    return Watched::Reapply;
                }
                if drift.healed > 0 {
                    healed_note = format!("healed drift: {}", drift.messages.join("; "));
                }
            }
        }
    }

    /// Whether the object is in a namespace the agent may change (any,
    /// unless it is confined to some; then nothing cluster-scoped).
    fn may_change(&self, o: &Object) -> bool {
        self.allowed_namespaces.is_empty()
            || o.namespace
                .as_ref()
                .is_some_and(|ns| self.allowed_namespaces.contains(ns))
    }

    /// HPA-owned replicas: a Deployment or StatefulSet that a
    /// HorizontalPodAutoscaler (in the cluster or in the unit itself)
    /// scales is applied (and drift-checked) without `spec.replicas`,
    /// leaving the field to the autoscaler; the field is handed over first
    /// where the agent owns it, so that leaving it does not remove it. When
    /// the autoscalers cannot be listed this is an error, not "none".
    async fn leave_replicas_to_autoscalers(&self, objs: &mut [Object]) -> Result<(), ApplyError> {
        let mut scaled: BTreeSet<String> = objs
            .iter()
            .filter(|o| o.kind == "HorizontalPodAutoscaler")
            .filter_map(|o| scale_target(&o.body, o.namespace.as_deref().unwrap_or_default()))
            .collect();
        let workload = |o: &Object| SCALED_KINDS.contains(&o.kind.as_str());
        // Outside the allowed namespaces nothing is applied (the object
        // fails, naming why), and the agent may not list there.
        let namespaces: BTreeSet<String> = objs
            .iter()
            .filter(|o| workload(o) && self.may_change(o))
            .filter_map(|o| o.namespace.clone())
            .collect();
        for ns in namespaces {
            scaled.extend(self.applier.hpa_targets(&ns).await?);
        }
        for o in objs.iter_mut().filter(|o| workload(o)) {
            let key = scaled_key(&o.kind, o.namespace.as_deref().unwrap_or_default(), &o.name);
            if !scaled.contains(&key) || o.body["spec"].get("replicas").is_none() {
                continue;
            }
            if self.may_change(o) {
                self.applier.hand_over_replicas(o).await?;
            }
            if let Some(spec) = o.body.get_mut("spec").and_then(|s| s.as_object_mut()) {
                spec.remove("replicas");
            }
        }
        Ok(())
    }

    fn unit_ref(unit: &DesiredUnit) -> String {
        format!("{}/{}", unit.environment, unit.unit)
    }

    /// The unit's inventory; a missing one is recovered from the labels and
    /// annotations the agent stamps on every object (a new unit has none).
    async fn load_inventory(&self, unit: &DesiredUnit) -> Result<Inventory, Pass> {
        match self.inventory.load(&unit.unit, &unit.environment).await {
            Ok(Some(inv)) => Ok(inv),
            Ok(None) => {
                let found = self
                    .applier
                    .membership(self.inventory.last_written(&unit.unit))
                    .await
                    .map_err(Pass::of)?
                    .get(&Self::unit_ref(unit))
                    .cloned()
                    .unwrap_or_default();
                if !found.is_empty() {
                    tracing::warn!(
                        unit = %unit.unit,
                        objects = found.len(),
                        "inventory missing; recovered membership from the objects' labels"
                    );
                }
                Ok(Inventory {
                    revision: 0,
                    entries: found,
                })
            }
            Err(e) => Err(Pass::inventory(e)),
        }
    }

    async fn apply(
        &self,
        unit: &DesiredUnit,
        rx: &watch::Receiver<DesiredUnit>,
        waiting_since: &mut Option<(u64, Instant)>,
    ) -> Pass {
        let Ok(_permit) = self.permits.clone().acquire_owned().await else {
            return Pass::Superseded;
        };
        self.report(unit, Phase::Applying, "", vec![]);
        let previous = match self.load_inventory(unit).await {
            Ok(p) => p,
            Err(pass) => return pass,
        };
        let Plan {
            mut objects,
            leaving,
            ahead,
        } = match plan(unit, &previous, self.tuning.max_prune_ratio) {
            Ok(p) => p,
            Err(message) => return Pass::failed(Phase::Failed, message),
        };
        if let Err(e) = self.leave_replicas_to_autoscalers(&mut objects).await {
            return Pass::of(e);
        }
        // Write-ahead: every object this pass may create is in the
        // inventory before it exists.
        if (ahead.entries != previous.entries || previous.revision == 0)
            && let Err(e) = self
                .inventory
                .save(&unit.unit, &unit.environment, &ahead)
                .await
        {
            return Pass::inventory(e);
        }
        let unit_ref = Self::unit_ref(unit);
        let mut applied: Vec<Entry> = Vec::new();
        let mut resources = Vec::new();
        let mut failures = Vec::new();
        let mut not_served = Vec::new();
        let mut crds: Vec<String> = Vec::new();
        for o in &objects {
            if rx.has_changed().unwrap_or(false) || self.shutdown.is_cancelled() {
                return Pass::Superseded;
            }
            // CRDs first; wait for them before anything that may use them.
            if !o.is_crd() && !crds.is_empty() {
                for name in std::mem::take(&mut crds) {
                    match self.applier.wait_established(&name).await {
                        Ok(()) => {}
                        Err(ApplyError::Unreachable(m)) => return Pass::unknown(m),
                        Err(e) => failures.push(e.message().to_owned()),
                    }
                }
            }
            let force = o.annotation(ANNOTATION_FORCE) == Some("enabled");
            let result = if !self.may_change(o) {
                Err(ApplyError::Rejected(format!(
                    "{} is outside the namespaces this agent may change ({})",
                    o.id(),
                    self.allowed_namespaces.join(", ")
                )))
            } else {
                self.applier.apply(o, &unit_ref, force).await
            };
            match result {
                Ok((_, entry)) => {
                    if let Some((ar, namespaced)) =
                        self.applier.resource(o.group(), o.version(), &o.kind).await
                    {
                        self.drift.watch(&ar, namespaced);
                    }
                    if o.is_crd() {
                        crds.push(o.name.clone());
                    }
                    resources.push(resource(&entry, SyncState::Synced, None, String::new()));
                    applied.push(entry);
                }
                // The write-ahead inventory covers what was created so far.
                Err(ApplyError::Unreachable(m)) => return Pass::unknown(m),
                Err(e) => {
                    resources.push(resource(
                        &Entry::of(o),
                        SyncState::Failed,
                        None,
                        e.message().to_owned(),
                    ));
                    match e {
                        ApplyError::NotServed(m) => not_served.push(m),
                        other => failures.push(other.message().to_owned()),
                    }
                }
            }
        }
        for name in crds {
            match self.applier.wait_established(&name).await {
                Ok(()) => {}
                Err(ApplyError::Unreachable(m)) => return Pass::unknown(m),
                Err(e) => failures.push(e.message().to_owned()),
            }
        }
        // Prune what left the unit, once every object of the revision
        // applied (a replacement that failed leaves the old object in
        // place); what cannot be checked is kept.
        let mut gone: Vec<Entry> = Vec::new();
        let complete = failures.is_empty() && not_served.is_empty();
        let held_back = if complete || leaving.is_empty() {
            String::new()
        } else {
            format!(
                "; {} object(s) that left the unit kept until every object applies",
                leaving.len()
            )
        };
        let mut kept = Vec::new();
        // Scanned once, for the first Namespace or CRD that leaves.
        let mut members: Option<Arc<crate::apply::Membership>> = None;
        let mut pruning: Vec<&Entry> = leaving.iter().filter(|_| complete).collect();
        // Reverse apply order: what a namespace holds before it.
        pruning.sort_by_key(|e| std::cmp::Reverse(rank(e)));
        for e in pruning {
            let target = if e.uid.is_empty() {
                // Written ahead by an interrupted pass: prune it only if it
                // exists and is this unit's.
                match self.applier.owned(e, &unit_ref).await {
                    Ok(Some(t)) => t,
                    Ok(None) => {
                        gone.push(e.clone());
                        continue;
                    }
                    Err(err) => {
                        failures.push(format!("not pruning {}: {}", e.id(), err.message()));
                        continue;
                    }
                }
            } else {
                e.clone()
            };
            match self.applier.get(&target).await {
                Ok(Some(live))
                    if live["metadata"]["annotations"][ANNOTATION_PRUNE] == "disabled" =>
                {
                    tracing::info!(unit = %unit.unit, object = %e.id(), "prune-protected; kept and no longer managed");
                    gone.push(e.clone());
                    continue;
                }
                // Someone else's now (another unit's, another agent's):
                // never deleted, no longer this unit's.
                Ok(Some(live)) if owner(&live) != unit_ref => {
                    tracing::warn!(unit = %unit.unit, object = %e.id(), owner = owner(&live), "not the unit's any more; kept and no longer managed");
                    gone.push(e.clone());
                    continue;
                }
                Ok(Some(live)) if rank(e) < 2 => {
                    if members.is_none() {
                        match self.applier.membership(Some(Instant::now())).await {
                            Ok(m) => members = Some(m),
                            Err(err) => {
                                failures.push(format!(
                                    "not pruning {}: cannot check what it holds: {}",
                                    e.id(),
                                    err.message()
                                ));
                                continue;
                            }
                        }
                    }
                    if let Some(scanned) = members.as_deref()
                        && let Some(why) = takes_along(e, &live, &unit_ref, scanned)
                    {
                        tracing::warn!(unit = %unit.unit, object = %e.id(), %why, "kept and no longer managed");
                        kept.push(format!("{} ({why})", e.id()));
                        gone.push(e.clone());
                        continue;
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) => {
                    gone.push(e.clone());
                    continue;
                }
                Err(err) => {
                    failures.push(format!(
                        "not pruning {}: cannot check whether it is prune-protected: {}",
                        e.id(),
                        err.message()
                    ));
                    continue;
                }
            }
            match self.applier.delete(&target).await {
                Ok(()) => {
                    gone.push(e.clone());
                    resources.push(resource(e, SyncState::Pruned, None, String::new()));
                }
                Err(err) => failures.push(format!("pruning {}: {}", e.id(), err.message())),
            }
        }
        // Shrink the inventory to what exists: applied objects with their
        // uids, nothing that was pruned; the rest of the write-ahead stays
        // until a pass settles it.
        let mut inv = Inventory {
            revision: unit.revision,
            entries: Vec::new(),
        };
        for e in &ahead.entries {
            if gone.iter().any(|g| g == e) {
                continue;
            }
            match applied.iter().find(|a| e.names(a)) {
                Some(a) => inv.merge(a.clone()),
                None => inv.merge(e.clone()),
            }
        }
        for a in &applied {
            inv.merge(a.clone());
        }
        if inv != ahead
            && let Err(e) = self
                .inventory
                .save(&unit.unit, &unit.environment, &inv)
                .await
        {
            return Pass::inventory(e);
        }
        let healable: BTreeSet<Key> = objects
            .iter()
            .filter(|o| applied.iter().any(|a| Entry::of(o).names(a)))
            .map(key_of)
            .collect();
        if !not_served.is_empty() {
            let since = match waiting_since {
                Some((rev, at)) if *rev == unit.revision => *at,
                _ => {
                    let now = Instant::now();
                    *waiting_since = Some((unit.revision, now));
                    now
                }
            };
            let waited = since.elapsed();
            if failures.is_empty() && waited < self.applier.crd_timeout {
                return Pass::Failed {
                    phase: Phase::Progressing,
                    message: not_served.join("; ") + &held_back,
                    resources,
                    healable,
                    soon: true,
                };
            }
            failures.extend(not_served.iter().map(|m| {
                format!(
                    "{} (not served after {}s)",
                    m.replace(
                        "waiting for the cluster to serve",
                        "the cluster does not serve"
                    ),
                    waited.as_secs()
                )
            }));
        }
        if !failures.is_empty() {
            return Pass::Failed {
                phase: Phase::Failed,
                message: failures.join("; ") + &held_back,
                resources,
                healable,
                soon: false,
            };
        }
        *waiting_since = None;
        let mut message = format!("{} objects applied", applied.len());
        if !kept.is_empty() {
            message.push_str(&format!(
                "; kept although they left the unit: {}",
                kept.join("; ")
            ));
        }
        self.report(unit, Phase::Applied, message, resources);
        Pass::Done { healable, kept }
    }

    /// Deletes every object of the unit (its inventory, plus anything the
    /// labels say is the unit's) and waits until they are gone.
    async fn destroy(&self, unit: &DesiredUnit, rx: &watch::Receiver<DesiredUnit>) -> Pass {
        let unit_ref = Self::unit_ref(unit);
        // Another environment's inventory of the same name (another
        // agent's) is left alone: the unit's objects are found by their
        // annotation only, and the ConfigMap stays.
        let (mut inv, theirs) = match self.inventory.load(&unit.unit, &unit.environment).await {
            Ok(i) => (i.unwrap_or_default(), false),
            Err(InventoryError::OtherEnvironment { .. }) => (Inventory::default(), true),
            Err(e) => return Pass::inventory(e),
        };
        // Whatever the inventory says, labelled objects of the unit count:
        // a lost or partial inventory must not read Destroyed. One scan:
        // the unit gains no objects while it is destroyed.
        let mut members = match self.applier.membership(Some(Instant::now())).await {
            Ok(m) => m,
            Err(e) => return Pass::of(e),
        };
        for e in members.get(&unit_ref).cloned().unwrap_or_default() {
            inv.merge(e);
        }
        let mut kept: Vec<String> = Vec::new();
        // A Namespace or CRD holding other units' objects waits a few
        // health intervals (2 s at least) for them to leave (units
        // destroyed together) before it is kept.
        let hold_until =
            Instant::now() + (self.tuning.health_interval * 5).max(Duration::from_secs(2));
        loop {
            let mut rescan = false;
            let mut entries = inv.entries.clone();
            // Reverse apply order: workloads before namespaces and CRDs.
            entries.sort_by_key(|e| std::cmp::Reverse(rank(e)));
            let mut remaining = Vec::new();
            for e in &entries {
                let target = if e.uid.is_empty() {
                    match self.applier.owned(e, &unit_ref).await {
                        Ok(Some(t)) => t,
                        Ok(None) => continue,
                        Err(err) => return Pass::of(err),
                    }
                } else {
                    e.clone()
                };
                match self.applier.get(&target).await {
                    Ok(Some(live))
                        if live["metadata"]["annotations"][ANNOTATION_PRUNE] == "disabled" => {}
                    // Someone else's (another unit's, another agent's).
                    Ok(Some(live)) if owner(&live) != unit_ref => {}
                    Ok(Some(live)) if live["metadata"]["deletionTimestamp"].is_null() => {
                        if let Some(why) = takes_along(e, &live, &unit_ref, &members) {
                            if Instant::now() < hold_until {
                                remaining.push(format!("{} ({why}, waiting for them)", e.id()));
                                rescan = true;
                                continue;
                            }
                            let note = format!("{} ({why})", e.id());
                            if !kept.contains(&note) {
                                tracing::warn!(unit = %unit.unit, object = %e.id(), %why, "kept");
                                kept.push(note);
                            }
                            continue;
                        }
                        if let Err(err) = self.applier.delete(&target).await {
                            return Pass::of(err);
                        }
                        remaining.push(e.id());
                    }
                    Ok(Some(_)) => remaining.push(e.id()),
                    Ok(None) => {}
                    Err(err) => return Pass::of(err),
                }
            }
            if remaining.is_empty() {
                break;
            }
            self.report(
                unit,
                Phase::Progressing,
                format!("waiting for {} to be deleted", remaining.join(", ")),
                vec![],
            );
            tokio::select! {
                () = self.shutdown.cancelled() => return Pass::Superseded,
                () = tokio::time::sleep(self.tuning.health_interval) => {}
            }
            if rx.has_changed().unwrap_or(false) {
                return Pass::Superseded;
            }
            if rescan {
                members = match self.applier.membership(Some(Instant::now())).await {
                    Ok(m) => m,
                    Err(e) => return Pass::of(e),
                };
            }
        }
        if !theirs && let Err(e) = self.inventory.delete(&unit.unit).await {
            return Pass::inventory(e);
        }
        Pass::Done {
            healable: BTreeSet::new(),
            kept,
        }
    }

    /// Health of every inventory object, rolled up to a unit phase; an
    /// `expiring` Job that is gone finished and was cleaned up.
    async fn assess(&self, unit: &DesiredUnit, expiring: &BTreeSet<Key>) -> Assessed {
        let inv = match self.inventory.load(&unit.unit, &unit.environment).await {
            Ok(Some(i)) => i,
            Ok(None) => {
                tracing::warn!(unit = %unit.unit, "inventory missing; applying again");
                return Assessed::Lost;
            }
            Err(e @ InventoryError::Unreachable(_)) => {
                return Assessed::Status(Phase::Unknown, e.to_string(), vec![]);
            }
            Err(e) => return Assessed::Status(Phase::Failed, e.to_string(), vec![]),
        };
        let mut resources = Vec::new();
        let mut worst = Health::Ready;
        let mut problems = Vec::new();
        let mut notes = Vec::new();
        for e in &inv.entries {
            let live = match self.applier.get(e).await {
                Ok(l) => l,
                Err(err) => {
                    return Assessed::Status(Phase::Unknown, err.message().to_owned(), resources);
                }
            };
            let Some(live) = live else {
                if expiring.contains(&e.key()) {
                    resources.push(resource(
                        e,
                        SyncState::Synced,
                        Some(Health::Ready),
                        "finished; removed after ttlSecondsAfterFinished".into(),
                    ));
                    notes.push(format!(
                        "{} finished and was removed (ttlSecondsAfterFinished)",
                        e.id()
                    ));
                    continue;
                }
                // Deleted and created again under its name (`kubectl
                // replace --force`), the unit's still: applied again, the
                // inventory follows the new object.
                if !e.uid.is_empty() {
                    let by_name = Entry {
                        uid: String::new(),
                        ..e.clone()
                    };
                    if let Ok(Some(_)) = self.applier.owned(&by_name, &Self::unit_ref(unit)).await {
                        tracing::info!(unit = %unit.unit, object = %e.id(), "replaced under its name; applying again");
                        return Assessed::Lost;
                    }
                }
                resources.push(resource(e, SyncState::OutOfSync, None, "missing".into()));
                worst = worst.max(Health::InProgress);
                problems.push(format!("{} is missing", e.id()));
                continue;
            };
            let pods = if matches!(e.kind.as_str(), "Deployment" | "StatefulSet" | "DaemonSet") {
                self.applier.pods_of(&live).await
            } else {
                vec![]
            };
            let a = health::assess(&live, &pods, self.applier.type_info(e).await);
            if a.health != Health::Ready {
                problems.push(format!("{}: {} {}", e.id(), a.health.as_str(), a.message));
            }
            worst = worst.max(a.health);
            resources.push(resource(e, SyncState::Synced, Some(a.health), a.message));
        }
        let phase = match worst {
            Health::Ready => Phase::Ready,
            Health::InProgress | Health::Terminating => Phase::Progressing,
            Health::Failed | Health::Stuck => Phase::Degraded,
        };
        let message = if problems.is_empty() { notes } else { problems };
        Assessed::Status(phase, message.join("; "), resources)
    }

    /// Compares live objects with the unit; heals drift of the objects
    /// applied in the last pass unless an object is report-only.
    async fn check_drift(&self, unit: &DesiredUnit, healable: &BTreeSet<Key>) -> Drift {
        let Ok(Plan { mut objects, .. }) = plan(unit, &Inventory::default(), 1.0) else {
            return Drift::default();
        };
        objects.retain(|o| healable.contains(&key_of(o)));
        if let Err(e) = self.leave_replicas_to_autoscalers(&mut objects).await {
            // Healing a workload now could fight its autoscaler.
            tracing::warn!(unit = %unit.unit, error = e.message(), "not healing Deployments and StatefulSets: autoscalers unknown");
            objects.retain(|o| !SCALED_KINDS.contains(&o.kind.as_str()));
        }
        let unit_ref = Self::unit_ref(unit);
        let mut reports = Vec::new();
        let mut messages = Vec::new();
        let mut healed = 0;
        let mut outstanding = Vec::new();
        let mut missing = false;
        for mut o in objects {
            let entry = Entry::of(&o);
            let Ok(Some(drift)) = self.applier.drift(&mut o).await else {
                continue;
            };
            let report_only = o.annotation(ANNOTATION_DRIFT) == Some("report");
            let paths = match drift {
                // A finished Job its TTL controller removed: not run again
                // before the next revision.
                ObjectDrift::Missing if expires(&o) => continue,
                // Re-created only through a full pass: the inventory is
                // written ahead of any object (it may be gone too).
                ObjectDrift::Missing if !report_only => {
                    missing = true;
                    continue;
                }
                ObjectDrift::Missing => vec!["(object missing)".to_owned()],
                ObjectDrift::Fields(paths) => paths,
            };
            let drifted = format!("{} drifted at {}", o.id(), paths.join(", "));
            // Only objects applied in the last pass are healed: every field
            // of theirs was ours then, so whoever changed one since took it
            // from us, and healing takes it back.
            let note = if report_only {
                outstanding.push(format!("{drifted} (report-only)"));
                "drift reported (report-only)".to_owned()
            } else {
                match self.applier.apply(&o, &unit_ref, true).await {
                    Ok(_) => {
                        healed += 1;
                        "drift healed".to_owned()
                    }
                    Err(e) => {
                        outstanding.push(format!("{drifted} (not healed: {})", e.message()));
                        format!("drift not healed: {}", e.message())
                    }
                }
            };
            messages.push(drifted);
            let mut r = resource(&entry, SyncState::OutOfSync, None, note);
            r.drifted_fields = paths;
            reports.push(r);
        }
        if !messages.is_empty() {
            tracing::warn!(unit = %unit.unit, drift = %messages.join("; "), healed, "drift");
        }
        self.metrics.drift_detected.inc_by(messages.len() as u64);
        self.metrics.drift_healed.inc_by(healed as u64);
        Drift {
            messages,
            reports,
            outstanding,
            healed,
            missing,
        }
    }
}

/// Probes the API server every `interval`; publishes `Some(reason)` while
/// it does not answer.
async fn probe_api(
    client: kube::Client,
    interval: Duration,
    down: watch::Sender<Option<String>>,
    shutdown: CancellationToken,
) {
    let timeout = interval.max(Duration::from_secs(1));
    loop {
        let state = match tokio::time::timeout(timeout, client.apiserver_version()).await {
            Ok(Ok(_)) => None,
            Ok(Err(e)) => Some(format!("Kubernetes API unreachable: {e}")),
            Err(_) => Some(format!(
                "Kubernetes API unreachable: no answer within {}s",
                timeout.as_secs()
            )),
        };
        down.send_if_modified(|cur| {
            // The first failure's reason stands until it answers again.
            let changed = cur.is_some() != state.is_some();
            if changed {
                cur.clone_from(&state);
            }
            changed
        });
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
    }
}

/// What a drift check found.
#[derive(Default)]
struct Drift {
    messages: Vec<String>,
    /// Per-resource drift (report-only, healed, not healed).
    reports: Vec<ResourceReport>,
    /// Drift still there (report-only, or a heal that failed), in words:
    /// the unit reads Drifted, not Ready.
    outstanding: Vec<String>,
    healed: usize,
    /// An object to heal is gone: the unit is applied again.
    missing: bool,
}
