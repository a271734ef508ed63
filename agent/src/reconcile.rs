//! One worker per unit keeps its cluster in the unit's desired state:
//! apply (bounded concurrency across units; one unit's revisions in order,
//! a newer revision superseding an in-flight one), record the inventory,
//! prune what left the unit, assess health, and watch for drift. It works
//! from the desired-state record alone, so a hub outage changes nothing.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;
use unitsync_proto::backoff::{Backoff, BackoffPolicy};
use unitsync_proto::v1 as pb;

use crate::apply::{Applier, ApplyError};
use crate::desired::{DesiredStore, DesiredUnit};
use crate::drift::DriftWatch;
use crate::health::{self, Health};
use crate::hub_client::{ResourceReport, StatusQueue, StatusUpdate};
use crate::inventory::{Entry, Inventory, InventoryStore};
use crate::manifest::{self, ANNOTATION_DRIFT, ANNOTATION_FORCE, ANNOTATION_PRUNE, Object};

/// Tuning of the reconcile loop.
#[derive(Clone, Debug)]
pub struct Tuning {
    /// Units applied at the same time.
    pub concurrency: usize,
    /// How often health is re-assessed while a unit is not Ready.
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
    allowed_namespaces: Vec<String>,
    shutdown: CancellationToken,
}

/// After a watch event, how long to let related changes settle before
/// comparing.
const DRIFT_SETTLE: Duration = Duration::from_millis(100);

/// The outcome of one pass over a unit.
enum Pass {
    Done,
    Superseded,
    Failed {
        phase: pb::Phase,
        message: String,
        resources: Vec<ResourceReport>,
    },
}

fn resource(e: &Entry, sync: pb::SyncState, health: pb::Health, message: String) -> ResourceReport {
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

fn health_pb(h: Health) -> pb::Health {
    match h {
        Health::Ready => pb::Health::Ready,
        Health::InProgress => pb::Health::InProgress,
        Health::Terminating => pb::Health::Terminating,
        Health::Failed => pb::Health::Failed,
        Health::Stuck => pb::Health::Stuck,
    }
}

impl Reconciler {
    pub fn new(
        applier: Arc<Applier>,
        inventory: InventoryStore,
        desired: Arc<dyn DesiredStore>,
        statuses: Arc<StatusQueue>,
        tuning: Tuning,
        allowed_namespaces: Vec<String>,
        shutdown: CancellationToken,
    ) -> Arc<Reconciler> {
        Arc::new(Reconciler {
            permits: Arc::new(Semaphore::new(tuning.concurrency.max(1))),
            drift: DriftWatch::new(applier.client().clone(), shutdown.clone()),
            applier,
            inventory,
            desired,
            statuses,
            tuning,
            workers: Mutex::default(),
            allowed_namespaces,
            shutdown,
        })
    }

    /// Hands a unit's (new) desired state to its worker, starting one.
    pub fn desired(self: &Arc<Self>, unit: DesiredUnit) {
        let mut workers = self
            .workers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(tx) = workers.get(&unit.unit)
            && tx.send(unit.clone()).is_ok()
        {
            return;
        }
        let name = unit.unit.clone();
        let (tx, rx) = watch::channel(unit);
        workers.insert(name.clone(), tx);
        tokio::spawn(self.clone().worker(name, rx));
    }

    fn report(
        &self,
        u: &DesiredUnit,
        phase: pb::Phase,
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
        let mut last_report: Option<(pb::Phase, String)> = None;
        loop {
            let unit = rx.borrow_and_update().clone();
            if self.shutdown.is_cancelled() {
                return;
            }
            let pass = if unit.tombstone {
                self.destroy(&unit, &rx).await
            } else {
                self.apply(&unit, &rx).await
            };
            match pass {
                Pass::Superseded if self.shutdown.is_cancelled() => return,
                Pass::Superseded => {
                    self.report(
                        &unit,
                        pb::Phase::Superseded,
                        "a newer revision arrived while applying",
                        vec![],
                    );
                    continue;
                }
                Pass::Failed {
                    phase,
                    message,
                    resources,
                } => {
                    tracing::warn!(unit = %unit.unit, revision = unit.revision, %message, "unit not applied");
                    self.report(&unit, phase, message, resources);
                    let delay = backoff.next_delay();
                    tokio::select! {
                        () = self.shutdown.cancelled() => return,
                        r = rx.changed() => if r.is_err() { return },
                        () = tokio::time::sleep(delay) => {}
                    }
                    continue;
                }
                Pass::Done if unit.tombstone => {
                    self.report(&unit, pb::Phase::Destroyed, "all objects deleted", vec![]);
                    let _ = self.desired.forget(&name);
                    self.drift.forget(&name);
                    self.workers
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .remove(&name);
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
                Pass::Done => backoff.reset(),
            }
            // Watch health and drift until a new revision arrives. Drift on
            // report-only objects keeps the unit Drifted until it goes away;
            // healed drift is noted in the message.
            let mut next_drift = tokio::time::Instant::now() + self.tuning.drift_interval;
            let mut drift = Drift::default();
            let mut healed_note = String::new();
            loop {
                let (mut phase, mut message, mut resources) = self.assess(&unit).await;
                let outstanding = drift.report_only();
                if !outstanding.is_empty() && phase == pb::Phase::Ready {
                    phase = pb::Phase::Drifted;
                    message = outstanding
                        .iter()
                        .map(|r| {
                            let id = if r.namespace.is_empty() {
                                format!("{} {}", r.kind, r.name)
                            } else {
                                format!("{} {}/{}", r.kind, r.namespace, r.name)
                            };
                            format!(
                                "{id} drifted at {} (report-only)",
                                r.drifted_fields.join(", ")
                            )
                        })
                        .collect::<Vec<_>>()
                        .join("; ");
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
                    self.report(&unit, phase, message, resources);
                    last_report = Some(key);
                }
                let wait = if phase == pb::Phase::Ready {
                    self.tuning.drift_interval
                } else {
                    self.tuning.health_interval
                };
                tokio::select! {
                    () = self.shutdown.cancelled() => return,
                    r = rx.changed() => { if r.is_err() { return } break; }
                    () = tokio::time::sleep(wait.min(self.tuning.drift_interval)) => {}
                    // One of the unit's objects changed: compare now.
                    () = changed.notified() => {
                        tokio::time::sleep(DRIFT_SETTLE).await;
                        next_drift = tokio::time::Instant::now();
                    }
                }
                if tokio::time::Instant::now() >= next_drift {
                    next_drift = tokio::time::Instant::now() + self.tuning.drift_interval;
                    drift = self.check_drift(&unit).await;
                    if drift.healed > 0 {
                        healed_note = format!("healed drift: {}", drift.messages.join("; "));
                    }
                }
            }
            last_report = None;
        }
    }

    fn objects(&self, unit: &DesiredUnit) -> Result<Vec<Object>, String> {
        let mut objs = manifest::parse(&unit.manifests)
            .map_err(|e| format!("unit {} revision {}: {e}", unit.unit, unit.revision))?;
        for o in &mut objs {
            manifest::stamp(o, &unit.unit, &unit.environment, unit.revision);
        }
        Ok(objs)
    }

    /// HPA-owned replicas: a Deployment that a HorizontalPodAutoscaler (in
    /// the cluster or in the unit itself) scales is applied without
    /// `spec.replicas`, leaving the field to the autoscaler.
    async fn leave_replicas_to_autoscalers(&self, objs: &mut [Object]) {
        let mut scaled: BTreeSet<String> = objs
            .iter()
            .filter(|o| {
                o.kind == "HorizontalPodAutoscaler"
                    && o.body["spec"]["scaleTargetRef"]["kind"] == "Deployment"
            })
            .filter_map(|o| {
                Some(format!(
                    "{}/{}",
                    o.namespace.clone()?,
                    o.body["spec"]["scaleTargetRef"]["name"].as_str()?
                ))
            })
            .collect();
        let namespaces: BTreeSet<String> = objs
            .iter()
            .filter(|o| o.kind == "Deployment")
            .filter_map(|o| o.namespace.clone())
            .collect();
        for ns in namespaces {
            scaled.extend(self.applier.hpa_targets(&ns).await);
        }
        for o in objs.iter_mut().filter(|o| o.kind == "Deployment") {
            if scaled.contains(&format!(
                "{}/{}",
                o.namespace.clone().unwrap_or_default(),
                o.name
            )) && let Some(spec) = o.body["spec"].as_object_mut()
            {
                spec.remove("replicas");
            }
        }
    }

    fn unit_ref(unit: &DesiredUnit) -> String {
        format!("{}/{}", unit.environment, unit.unit)
    }

    async fn apply(&self, unit: &DesiredUnit, rx: &watch::Receiver<DesiredUnit>) -> Pass {
        let Ok(_permit) = self.permits.clone().acquire_owned().await else {
            return Pass::Done;
        };
        self.report(unit, pb::Phase::Applying, "", vec![]);
        let mut objs = match self.objects(unit) {
            Ok(o) => o,
            Err(message) => {
                return Pass::Failed {
                    phase: pb::Phase::Failed,
                    message,
                    resources: vec![],
                };
            }
        };
        let previous = match self.inventory.load(&unit.unit).await {
            Ok(p) => p.unwrap_or_default(),
            Err(e) => return unreachable(format!("Kubernetes API unreachable: {e}")),
        };
        // Mass-prune guard.
        let wanted: BTreeSet<(String, String, String, String)> = objs
            .iter()
            .map(|o| {
                (
                    o.group().to_owned(),
                    o.kind.clone(),
                    o.namespace.clone().unwrap_or_default(),
                    o.name.clone(),
                )
            })
            .collect();
        // An entry without a namespace is cluster-scoped: a document naming
        // one anyway (which apply drops) still wants it.
        let by_name: BTreeSet<(String, String, String)> = objs
            .iter()
            .map(|o| (o.group().to_owned(), o.kind.clone(), o.name.clone()))
            .collect();
        let still_wanted = |e: &Entry| {
            wanted.contains(&e.key())
                || (e.namespace.is_empty()
                    && by_name.contains(&(e.group.clone(), e.kind.clone(), e.name.clone())))
        };
        let leaving: Vec<&Entry> = previous
            .entries
            .iter()
            .filter(|e| !still_wanted(e))
            .collect();
        if !previous.entries.is_empty()
            && leaving.len() >= 2
            && leaving.len() as f64 > previous.entries.len() as f64 * self.tuning.max_prune_ratio
        {
            return Pass::Failed {
                phase: pb::Phase::Failed,
                message: format!(
                    "refusing to prune {} of {} objects (more than {:.0} %) without an explicit destroy",
                    leaving.len(),
                    previous.entries.len(),
                    self.tuning.max_prune_ratio * 100.0
                ),
                resources: vec![],
            };
        }
        self.leave_replicas_to_autoscalers(&mut objs).await;
        let unit_ref = Self::unit_ref(unit);
        let mut entries = Vec::new();
        let mut resources = Vec::new();
        let mut failures = Vec::new();
        let mut crds: Vec<String> = Vec::new();
        for o in &objs {
            if rx.has_changed().unwrap_or(false) || self.shutdown.is_cancelled() {
                return Pass::Superseded;
            }
            // CRDs first; wait for them before anything that may use them.
            if !o.is_crd() && !crds.is_empty() {
                for name in std::mem::take(&mut crds) {
                    if let Err(e) = self.applier.wait_established(&name).await {
                        return match e {
                            ApplyError::Unreachable(m) => unreachable(m),
                            ApplyError::NotServed(m) => waiting(m),
                            ApplyError::Rejected(m) => Pass::Failed {
                                phase: pb::Phase::Failed,
                                message: m,
                                resources,
                            },
                        };
                    }
                }
            }
            let force = o.annotation(ANNOTATION_FORCE) == Some("enabled");
            let outside = !self.allowed_namespaces.is_empty()
                && !o
                    .namespace
                    .as_ref()
                    .is_some_and(|ns| self.allowed_namespaces.contains(ns));
            let result = if outside {
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
                    if let Some(ar) = self.applier.resource(o.group(), o.version(), &o.kind).await {
                        self.drift.watch(&ar);
                    }
                    if o.is_crd() {
                        crds.push(o.name.clone());
                    }
                    resources.push(resource(
                        &entry,
                        pb::SyncState::Synced,
                        pb::Health::Unspecified,
                        String::new(),
                    ));
                    entries.push(entry);
                }
                Err(ApplyError::Unreachable(m)) => return unreachable(m),
                Err(ApplyError::NotServed(m)) => return waiting(m),
                Err(ApplyError::Rejected(m)) => {
                    let e = Entry::of(o);
                    resources.push(resource(
                        &e,
                        pb::SyncState::Failed,
                        pb::Health::Unspecified,
                        m.clone(),
                    ));
                    failures.push(m);
                }
            }
        }
        for name in crds {
            if let Err(e) = self.applier.wait_established(&name).await {
                return Pass::Failed {
                    phase: pb::Phase::Failed,
                    message: e.message().to_owned(),
                    resources,
                };
            }
        }
        // Record what exists now (including objects kept from before when
        // this revision failed to apply them), then prune what left.
        let mut inv = Inventory {
            revision: unit.revision,
            entries: entries.clone(),
        };
        if !failures.is_empty() {
            for e in &previous.entries {
                if !inv.entries.iter().any(|x| x.key() == e.key()) && still_wanted(e) {
                    inv.entries.push(e.clone());
                }
            }
        }
        for e in &leaving {
            let protected = match self.applier.get(e).await {
                Ok(Some(live)) => live["metadata"]["annotations"][ANNOTATION_PRUNE] == "disabled",
                Ok(None) => false,
                Err(ApplyError::Unreachable(m)) => return unreachable(m),
                Err(_) => false,
            };
            if protected {
                tracing::info!(unit = %unit.unit, object = %e.id(), "prune-protected; kept");
                continue;
            }
            if let Err(err) = self.applier.delete(e).await {
                inv.entries.push((*e).clone());
                failures.push(format!("pruning {}: {}", e.id(), err.message()));
            } else {
                resources.push(resource(
                    e,
                    pb::SyncState::Pruned,
                    pb::Health::Unspecified,
                    String::new(),
                ));
            }
        }
        if let Err(e) = self.inventory.save(&unit.unit, &inv).await {
            return unreachable(format!("saving the inventory: {e}"));
        }
        if !failures.is_empty() {
            return Pass::Failed {
                phase: pb::Phase::Failed,
                message: failures.join("; "),
                resources,
            };
        }
        self.report(
            unit,
            pb::Phase::Applied,
            format!("{} objects applied", entries.len()),
            resources,
        );
        Pass::Done
    }

    /// Deletes every object of the unit's inventory and waits until they are gone.
    async fn destroy(&self, unit: &DesiredUnit, rx: &watch::Receiver<DesiredUnit>) -> Pass {
        let inv = match self.inventory.load(&unit.unit).await {
            Ok(i) => i.unwrap_or_default(),
            Err(e) => return unreachable(format!("Kubernetes API unreachable: {e}")),
        };
        // Delete in reverse apply order: workloads before namespaces and CRDs.
        let mut entries = inv.entries.clone();
        entries.reverse();
        for e in &entries {
            match self.applier.get(e).await {
                Ok(Some(live))
                    if live["metadata"]["annotations"][ANNOTATION_PRUNE] == "disabled" =>
                {
                    continue;
                }
                Ok(Some(_)) => {
                    if let Err(err) = self.applier.delete(e).await {
                        return fail(err);
                    }
                }
                Ok(None) => {}
                Err(err) => return fail(err),
            }
        }
        // Destroyed only when the objects are gone.
        loop {
            if rx.has_changed().unwrap_or(false) {
                return Pass::Superseded;
            }
            let mut remaining = Vec::new();
            for e in &entries {
                match self.applier.get(e).await {
                    Ok(Some(live))
                        if live["metadata"]["annotations"][ANNOTATION_PRUNE] != "disabled" =>
                    {
                        remaining.push(e.id())
                    }
                    Ok(_) => {}
                    Err(err) => return fail(err),
                }
            }
            if remaining.is_empty() {
                break;
            }
            self.report(
                unit,
                pb::Phase::Progressing,
                format!("waiting for {} to be deleted", remaining.join(", ")),
                vec![],
            );
            tokio::select! {
                () = self.shutdown.cancelled() => return Pass::Superseded,
                () = tokio::time::sleep(self.tuning.health_interval) => {}
            }
        }
        if let Err(e) = self.inventory.delete(&unit.unit).await {
            return unreachable(format!("deleting the inventory: {e}"));
        }
        Pass::Done
    }

    /// Health of every inventory object, rolled up to a unit phase.
    async fn assess(&self, unit: &DesiredUnit) -> (pb::Phase, String, Vec<ResourceReport>) {
        let inv = match self.inventory.load(&unit.unit).await {
            Ok(i) => i.unwrap_or_default(),
            Err(e) => {
                return (
                    pb::Phase::Degraded,
                    format!("Kubernetes API unreachable: {e}"),
                    vec![],
                );
            }
        };
        let mut resources = Vec::new();
        let mut worst = Health::Ready;
        let mut problems = Vec::new();
        for e in &inv.entries {
            let live = match self.applier.get(e).await {
                Ok(l) => l,
                Err(err) => return (pb::Phase::Degraded, err.message().to_owned(), resources),
            };
            let Some(live) = live else {
                resources.push(resource(
                    e,
                    pb::SyncState::OutOfSync,
                    pb::Health::Unspecified,
                    "missing".into(),
                ));
                worst = worst.max(Health::InProgress);
                problems.push(format!("{} is missing", e.id()));
                continue;
            };
            let pods = if matches!(e.kind.as_str(), "Deployment" | "StatefulSet" | "DaemonSet") {
                self.applier.pods_of(&live).await
            } else {
                vec![]
            };
            let a = health::assess(&live, &pods);
            if a.health != Health::Ready {
                problems.push(format!("{}: {} {}", e.id(), a.health.as_str(), a.message));
            }
            worst = worst.max(a.health);
            resources.push(resource(
                e,
                pb::SyncState::Synced,
                health_pb(a.health),
                a.message,
            ));
        }
        let phase = match worst {
            Health::Ready => pb::Phase::Ready,
            Health::InProgress | Health::Terminating => pb::Phase::Progressing,
            Health::Failed | Health::Stuck => pb::Phase::Degraded,
        };
        (phase, problems.join("; "), resources)
    }

    /// Compares live objects with the unit; heals drift unless an object
    /// is report-only. Returns the drift message when there was drift.
    async fn check_drift(&self, unit: &DesiredUnit) -> Drift {
        let Ok(mut objs) = self.objects(unit) else {
            return Drift::default();
        };
        self.leave_replicas_to_autoscalers(&mut objs).await;
        let unit_ref = Self::unit_ref(unit);
        let mut reports = Vec::new();
        let mut messages = Vec::new();
        let mut healed = 0;
        for mut o in objs {
            let entry = Entry::of(&o);
            let paths = match self.applier.drift(&mut o).await {
                Ok(p) if p.is_empty() => continue,
                Ok(p) => p,
                Err(_) => continue,
            };
            let report_only = o.annotation(ANNOTATION_DRIFT) == Some("report");
            messages.push(format!("{} drifted at {}", o.id(), paths.join(", ")));
            let mut r = resource(
                &entry,
                pb::SyncState::OutOfSync,
                pb::Health::Unspecified,
                if report_only {
                    "drift reported (report-only)".into()
                } else {
                    "drift healed".into()
                },
            );
            r.drifted_fields = paths;
            reports.push(r);
            // Drift checks run only after a successful apply, when every
            // field of the unit was ours: whoever changed one since took it
            // from us, and healing takes it back.
            if !report_only && self.applier.apply(&o, &unit_ref, true).await.is_ok() {
                healed += 1;
            }
        }
        if !messages.is_empty() {
            tracing::warn!(unit = %unit.unit, drift = %messages.join("; "), healed, "drift");
        }
        Drift {
            messages,
            reports,
            healed,
        }
    }
}

/// What a drift check found.
#[derive(Default)]
struct Drift {
    messages: Vec<String>,
    /// Per-resource drift (report-only and healed).
    reports: Vec<ResourceReport>,
    healed: usize,
}

impl Drift {
    fn report_only(&self) -> Vec<&ResourceReport> {
        self.reports
            .iter()
            .filter(|r| r.message.contains("report-only"))
            .collect()
    }
}

/// Not an error of the unit: something it depends on is on its way.
fn waiting(message: String) -> Pass {
    Pass::Failed {
        phase: pb::Phase::Progressing,
        message,
        resources: vec![],
    }
}

fn unreachable(message: String) -> Pass {
    Pass::Failed {
        phase: pb::Phase::Degraded,
        message,
        resources: vec![],
    }
}

fn fail(e: ApplyError) -> Pass {
    match e {
        ApplyError::Unreachable(m) => unreachable(m),
        ApplyError::NotServed(m) => waiting(m),
        ApplyError::Rejected(m) => Pass::Failed {
            phase: pb::Phase::Failed,
            message: m,
            resources: vec![],
        },
    }
}
