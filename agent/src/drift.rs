//! Watching applied objects: one kube-runtime watcher per served type the
//! agent has applied, filtered on the `app.kubernetes.io/managed-by=unitsync`
//! label, wakes the owning unit's worker whenever someone else changes one
//! of its objects or it disappears, so drift is found within moments
//! instead of at the next periodic check (which stays as a safety net).
//! The agent's own writes (the resourceVersion it just wrote) wake nobody;
//! a change of status only (same generation) wakes the worker to re-assess
//! health, without a drift check. A watch that fell behind (410 Gone)
//! re-lists, which says what exists but not what changed or went in the
//! gap: after a re-list every unit checks its objects.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use kube::api::{Api, DynamicObject};
use kube::core::ApiResource;
use kube::runtime::WatchStreamExt;
use kube::runtime::utils::{Backoff, ResetTimerBackoff};
use kube::runtime::watcher::{self, Event};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use unitsync_proto::backoff::BackoffPolicy;

use crate::manifest::{LABEL_MANAGED_BY, LABEL_UNIT};

/// Retries of a watch: the first within 100 ms (a watch that fell behind
/// re-lists at once, so drift in the gap is found in moments), then
/// doubling to 30 s, jittered, for an API server in trouble.
const WATCH_RETRY: BackoffPolicy = BackoffPolicy {
    first_window: Duration::from_millis(100),
    initial: Duration::from_millis(200),
    multiplier: 2.0,
    jitter: 0.2,
    max: Duration::from_secs(30),
};

/// A watch that has not failed for this long starts from the first retry
/// again (client-go's reflector does the same).
const WATCH_BACKOFF_RESET: Duration = Duration::from_secs(120);

/// [`WATCH_RETRY`] as kube-runtime's watcher takes a backoff.
struct WatchBackoff(unitsync_proto::backoff::Backoff);

impl WatchBackoff {
    fn new() -> WatchBackoff {
        WatchBackoff(unitsync_proto::backoff::Backoff::new(WATCH_RETRY))
    }
}

impl Iterator for WatchBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        Some(self.0.next_delay())
    }
}

impl Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.0.reset();
    }
}

/// What the agent itself last wrote, by object uid: the resourceVersion
/// and generation its write produced, and the object's type (`kind.group`).
/// An entry goes when the watch sees its object deleted, or when a re-list
/// of its type no longer shows it (a deletion the watch missed), so the
/// record stays as large as what the agent manages. (An object written
/// while a re-list is under way may be dropped too: its next event then
/// counts as someone else's, one needless drift check.)
#[derive(Default)]
pub struct OwnWrites {
    writes: Mutex<HashMap<String, OwnWrite>>,
    /// Where its size is reported (a metric), once set.
    size: std::sync::OnceLock<prometheus_client::metrics::gauge::Gauge>,
}

struct OwnWrite {
    resource_version: String,
    generation: Option<i64>,
    kind: String,
    /// Empty for a cluster-scoped object.
    namespace: String,
}

/// A type's name in [`OwnWrites`]: `kind.group` (`ConfigMap.` for core).
pub fn qualified_kind(group: &str, kind: &str) -> String {
    format!("{kind}.{group}")
}

/// What a watched change is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Change {
    /// The agent's own write.
    Own,
    /// Someone else changed the status only (the generation the agent
    /// wrote is unchanged): health may have changed.
    Status,
    /// Someone else changed what the agent applied, or it is gone.
    Spec,
}

impl OwnWrites {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, OwnWrite>> {
        self.writes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Reports how many objects the record holds to `gauge` from now on.
    pub fn report_size(&self, gauge: prometheus_client::metrics::gauge::Gauge) {
        let _ = self.size.set(gauge);
        self.resized(&self.lock());
    }

    fn resized(&self, writes: &HashMap<String, OwnWrite>) {
        if let Some(g) = self.size.get() {
            g.set(i64::try_from(writes.len()).unwrap_or(i64::MAX));
        }
    }

    /// Records what an apply of an object of type `kind` (see
    /// [`qualified_kind`]) returned.
    pub fn record(&self, kind: String, meta: &kube::api::ObjectMeta) {
        if let (Some(uid), Some(rv)) = (&meta.uid, &meta.resource_version) {
            let write = OwnWrite {
                resource_version: rv.clone(),
                generation: meta.generation,
                kind,
                namespace: meta.namespace.clone().unwrap_or_default(),
            };
            let mut writes = self.lock();
            writes.insert(uid.clone(), write);
            self.resized(&writes);
        }
    }

    /// The object is gone: its uid never comes back.
    fn forget(&self, meta: &kube::api::ObjectMeta) {
        if let Some(uid) = &meta.uid {
            self.forget_uid(uid);
        }
    }

    /// The agent deleted the object with `uid` (or found it gone): no
    /// watch may see it go (none runs for types no unit applies any more).
    pub fn forget_uid(&self, uid: &str) {
        let mut writes = self.lock();
        if writes.remove(uid).is_some() {
            self.resized(&writes);
        }
    }

    /// A re-list of `kind` (in `namespace`, or the whole cluster) showed
    /// exactly `listed`: the others of that type there were deleted
    /// meanwhile.
    fn keep_listed(&self, kind: &str, namespace: Option<&str>, listed: &HashSet<String>) {
        let mut writes = self.lock();
        writes.retain(|uid, w| {
            w.kind != kind || namespace.is_some_and(|ns| w.namespace != ns) || listed.contains(uid)
        });
        self.resized(&writes);
    }

    fn classify(&self, meta: &kube::api::ObjectMeta) -> Change {
        let own = meta.uid.as_ref().and_then(|uid| {
            self.lock()
                .get(uid)
                .map(|w| (w.resource_version.clone(), w.generation))
        });
        match own {
            Some((rv, _)) if meta.resource_version.as_ref() == Some(&rv) => Change::Own,
            Some((_, Some(generation))) if meta.generation == Some(generation) => Change::Status,
            _ => Change::Spec,
        }
    }
}

/// How a unit's worker is woken: why, and the notice.
#[derive(Default)]
pub struct Waker {
    pub notify: Notify,
    /// Someone else changed an object: check drift.
    drifted: std::sync::atomic::AtomicBool,
}

impl Waker {
    /// Whether a drift check is due (clears it).
    pub fn take_drift(&self) -> bool {
        self.drifted
            .swap(false, std::sync::atomic::Ordering::SeqCst)
    }
}

pub struct DriftWatch {
    client: kube::Client,
    /// The namespaces the agent may change (empty: the whole cluster).
    namespaces: Vec<String>,
    own: Arc<OwnWrites>,
    watched: Mutex<HashSet<(String, String, String)>>,
    wakers: Arc<Mutex<HashMap<String, Arc<Waker>>>>,
    shutdown: CancellationToken,
}

impl DriftWatch {
    pub fn new(
        client: kube::Client,
        namespaces: Vec<String>,
        own: Arc<OwnWrites>,
        shutdown: CancellationToken,
    ) -> DriftWatch {
        DriftWatch {
            client,
            namespaces,
            own,
            watched: Mutex::default(),
            wakers: Arc::default(),
            shutdown,
        }
    }

    /// The notifier a unit's worker waits on.
    pub fn waker(&self, unit: &str) -> Arc<Waker> {
        self.wakers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(unit.to_owned())
            .or_default()
            .clone()
    }

    pub fn forget(&self, unit: &str) {
        self.wakers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(unit);
    }

    /// Starts watching a type, once: across the cluster, or in each
    /// namespace the agent may change when it is confined to some.
    pub fn watch(&self, ar: &ApiResource, namespaced: bool) {
        let key = (ar.group.clone(), ar.version.clone(), ar.kind.clone());
        if !self
            .watched
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(key)
        {
            return;
        }
        for api in crate::apply::scoped_apis(&self.client, ar, namespaced, &self.namespaces) {
            tokio::spawn(follow(
                api,
                ar.clone(),
                self.wakers.clone(),
                self.own.clone(),
                self.shutdown.clone(),
            ));
        }
    }
}

/// Whether a watch failed because the agent may not watch there (401 or
/// 403): it retries, but the operator has permissions to fix.
fn refused(e: &watcher::Error) -> bool {
    let code = match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => s.code,
        watcher::Error::WatchError(s) => s.code,
        _ => 0,
    };
    matches!(code, 401 | 403)
}

/// Follows one watch of a type, waking the units whose objects changed.
async fn follow(
    api: Api<DynamicObject>,
    ar: ApiResource,
    wakers: Arc<Mutex<HashMap<String, Arc<Waker>>>>,
    own: Arc<OwnWrites>,
    stop: CancellationToken,
) {
    let scope = api.namespace().map(str::to_owned);
    let config = watcher::Config::default().labels(&format!("{LABEL_MANAGED_BY}=unitsync"));
    let kind = ar.kind.clone();
    let own_kind = qualified_kind(&ar.group, &ar.kind);
    let backoff = ResetTimerBackoff::new(WatchBackoff::new(), WATCH_BACKOFF_RESET);
    let stream = watcher::watcher(api, config).backoff(backoff);
    let mut stream = std::pin::pin!(stream);
    let mut listed = false;
    // The uids of the list in progress.
    let mut listing: HashSet<String> = HashSet::new();
    // A refusal was logged since the watch last worked.
    let mut told = false;
    loop {
        let ev = tokio::select! {
            () = stop.cancelled() => return,
            ev = stream.next() => ev,
        };
        let (obj, change) = match ev {
            None => return,
            Some(Ok(Event::Apply(o))) => {
                let c = own.classify(&o.metadata);
                (o, c)
            }
            Some(Ok(Event::Delete(o))) => {
                own.forget(&o.metadata);
                (o, Change::Spec)
            }
            Some(Ok(Event::Init)) => {
                listing.clear();
                continue;
            }
            Some(Ok(Event::InitApply(o))) => {
                listing.extend(o.metadata.uid);
                continue;
            }
            // A re-list (the watch fell behind: 410 Gone) reports
            // what exists, not what changed or went meanwhile:
            // every unit checks its objects.
            Some(Ok(Event::InitDone)) => {
                told = false;
                own.keep_listed(&own_kind, scope.as_deref(), &std::mem::take(&mut listing));
                if std::mem::replace(&mut listed, true) {
                    tracing::debug!(%kind, "watch re-listed; checking every unit for drift");
                    let all: Vec<_> = wakers
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .values()
                        .cloned()
                        .collect();
                    for w in all {
                        w.drifted.store(true, std::sync::atomic::Ordering::SeqCst);
                        w.notify.notify_one();
                    }
                }
                continue;
            }
            Some(Err(e)) if refused(&e) && !std::mem::replace(&mut told, true) => {
                tracing::warn!(
                    %kind,
                    namespace = scope.as_deref().unwrap_or("(all)"),
                    error = %e,
                    "may not watch this type; drift is found by the periodic check only until the agent's permissions allow it"
                );
                continue;
            }
            Some(Err(e)) => {
                tracing::debug!(%kind, error = %e, "watch interrupted; resuming");
                continue;
            }
        };
        let Some(unit) = obj.metadata.labels.as_ref().and_then(|l| l.get(LABEL_UNIT)) else {
            continue;
        };
        let waker = wakers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(unit)
            .cloned();
        if let Some(w) = waker {
            match change {
                Change::Own => {}
                Change::Status => w.notify.notify_one(),
                Change::Spec => {
                    w.drifted.store(true, std::sync::atomic::Ordering::SeqCst);
                    w.notify.notify_one();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_watch_that_fell_behind_retries_at_once_then_backs_off() {
        let mut b = WatchBackoff::new();
        assert!(b.next().unwrap() < Duration::from_millis(100));
        let later: Vec<Duration> = (0..12).map(|_| b.next().unwrap()).collect();
        assert!(later[0] >= Duration::from_millis(160), "{later:?}");
        assert!(later.windows(2).all(|w| w[1] >= w[0] / 2), "{later:?}");
        assert!(
            *later.last().unwrap() <= Duration::from_secs(36),
            "{later:?}"
        );
        assert!(
            *later.last().unwrap() >= Duration::from_secs(24),
            "{later:?}"
        );
        b.reset();
        assert!(b.next().unwrap() < Duration::from_millis(100));
    }
    use kube::api::ObjectMeta;

    fn meta(uid: &str, rv: &str, generation: Option<i64>) -> ObjectMeta {
        ObjectMeta {
            uid: Some(uid.into()),
            resource_version: Some(rv.into()),
            generation,
            ..ObjectMeta::default()
        }
    }

    #[test]
    fn own_writes_wake_nobody_and_status_changes_skip_the_drift_check() {
        let own = OwnWrites::default();
        own.record(
            qualified_kind("apps", "Deployment"),
            &meta("u1", "10", Some(3)),
        );
        own.record(qualified_kind("", "ConfigMap"), &meta("u2", "20", None));
        // The event of the agent's own write.
        assert_eq!(own.classify(&meta("u1", "10", Some(3))), Change::Own);
        assert_eq!(own.classify(&meta("u2", "20", None)), Change::Own);
        // A controller updated the status: same generation.
        assert_eq!(own.classify(&meta("u1", "11", Some(3))), Change::Status);
        // Someone changed the spec, or an object without generations.
        assert_eq!(own.classify(&meta("u1", "12", Some(4))), Change::Spec);
        assert_eq!(own.classify(&meta("u2", "21", None)), Change::Spec);
        // An object this agent never wrote.
        assert_eq!(own.classify(&meta("u3", "1", Some(1))), Change::Spec);
    }

    #[test]
    fn the_record_forgets_deleted_objects() {
        let own = OwnWrites::default();
        let (deployment, configmap) = (
            qualified_kind("apps", "Deployment"),
            qualified_kind("", "ConfigMap"),
        );
        own.record(deployment.clone(), &meta("d1", "10", Some(1)));
        own.record(deployment.clone(), &meta("d2", "11", Some(1)));
        own.record(configmap.clone(), &meta("c1", "12", None));
        // The watch saw d1 deleted.
        own.forget(&meta("d1", "13", Some(1)));
        assert_eq!(own.classify(&meta("d1", "10", Some(1))), Change::Spec);
        // A re-list of Deployments shows no d2 (deleted while the watch
        // was down); ConfigMaps are another type's business.
        own.keep_listed(&deployment, None, &HashSet::new());
        assert_eq!(own.lock().len(), 1);
        assert_eq!(own.classify(&meta("c1", "12", None)), Change::Own);
        own.keep_listed(&configmap, None, &HashSet::from(["c1".to_owned()]));
        assert_eq!(own.classify(&meta("c1", "12", None)), Change::Own);
    }

    #[test]
    fn a_namespace_s_re_list_forgets_only_that_namespace_s_objects() {
        let own = OwnWrites::default();
        let configmap = qualified_kind("", "ConfigMap");
        let in_ns = |uid: &str, ns: &str| ObjectMeta {
            namespace: Some(ns.into()),
            ..meta(uid, "1", None)
        };
        own.record(configmap.clone(), &in_ns("a1", "a"));
        own.record(configmap.clone(), &in_ns("b1", "b"));
        // The watch of namespace `a` re-listed and found nothing there.
        own.keep_listed(&configmap, Some("a"), &HashSet::new());
        assert_eq!(own.classify(&in_ns("a1", "a")), Change::Spec);
        assert_eq!(own.classify(&in_ns("b1", "b")), Change::Own);
    }
}
