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
/// and generation its write produced.
#[derive(Default)]
pub struct OwnWrites(Mutex<HashMap<String, (String, Option<i64>)>>);

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
    /// Records what an apply returned.
    pub fn record(&self, meta: &kube::api::ObjectMeta) {
        if let (Some(uid), Some(rv)) = (&meta.uid, &meta.resource_version) {
            self.0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(uid.clone(), (rv.clone(), meta.generation));
        }
    }

    fn classify(&self, meta: &kube::api::ObjectMeta) -> Change {
        let own = meta.uid.as_ref().and_then(|uid| {
            self.0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .get(uid)
                .cloned()
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
    own: Arc<OwnWrites>,
    watched: Mutex<HashSet<(String, String, String)>>,
    wakers: Arc<Mutex<HashMap<String, Arc<Waker>>>>,
    shutdown: CancellationToken,
}

impl DriftWatch {
    pub fn new(
        client: kube::Client,
        own: Arc<OwnWrites>,
        shutdown: CancellationToken,
    ) -> DriftWatch {
        DriftWatch {
            client,
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

    /// Starts watching a type, once.
    pub fn watch(&self, ar: &ApiResource) {
        let key = (ar.group.clone(), ar.version.clone(), ar.kind.clone());
        if !self
            .watched
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(key)
        {
            return;
        }
        let api: Api<DynamicObject> = Api::all_with(self.client.clone(), ar);
        let config = watcher::Config::default().labels(&format!("{LABEL_MANAGED_BY}=unitsync"));
        let wakers = self.wakers.clone();
        let own = self.own.clone();
        let stop = self.shutdown.clone();
        let kind = ar.kind.clone();
        tokio::spawn(async move {
            let backoff = ResetTimerBackoff::new(WatchBackoff::new(), WATCH_BACKOFF_RESET);
            let stream = watcher::watcher(api, config).backoff(backoff);
            let mut stream = std::pin::pin!(stream);
            let mut listed = false;
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
                    Some(Ok(Event::Delete(o))) => (o, Change::Spec),
                    // A re-list (the watch fell behind: 410 Gone) reports
                    // what exists, not what changed or went meanwhile:
                    // every unit checks its objects.
                    Some(Ok(Event::InitDone)) => {
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
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => {
                        tracing::debug!(%kind, error = %e, "watch interrupted; resuming");
                        continue;
                    }
                };
                let Some(unit) = obj.metadata.labels.as_ref().and_then(|l| l.get(LABEL_UNIT))
                else {
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
        });
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
        own.record(&meta("u1", "10", Some(3)));
        own.record(&meta("u2", "20", None));
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
}
