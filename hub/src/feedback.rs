//! Agent feedback (acks and status reports) on its way to the store.
//!
//! The stream's receive loop only records feedback here, in memory and
//! coalesced per (cluster, unit); one writer task flushes it in batches. So
//! acks and heartbeats never wait on a database write, and a burst from
//! thousands of agents becomes a few transactions.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::error::ErrorChain;
use crate::model::{ClusterName, RevisionNum, StatusReport, UnitRef};
use crate::store::{Ack, Store};

type Key = (ClusterName, UnitRef);

#[derive(Default)]
struct Pending {
    acks: HashMap<Key, RevisionNum>,
    statuses: HashMap<Key, StatusReport>,
}

/// Coalescing buffer between agent sessions and the store.
#[derive(Default)]
pub struct Feedback {
    pending: Mutex<Pending>,
    notify: Notify,
}

/// How long the writer gathers feedback before a flush.
const GATHER: Duration = Duration::from_millis(20);

impl Feedback {
    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn ack(&self, cluster: ClusterName, unit: UnitRef, revision: RevisionNum) {
        let mut p = self.lock();
        let e = p.acks.entry((cluster, unit)).or_default();
        *e = (*e).max(revision);
        drop(p);
        self.notify.notify_one();
    }

    pub fn status(&self, report: StatusReport) {
        let key = (report.cluster.clone(), report.unit.clone());
        let mut p = self.lock();
        match p.statuses.get(&key) {
            Some(old) if old.revision > report.revision => {}
            _ => {
                p.statuses.insert(key, report);
            }
        }
        drop(p);
        self.notify.notify_one();
    }

    /// Writes everything pending; on failure the entries are kept for the
    /// next attempt (newer feedback recorded meanwhile wins).
    pub async fn flush(&self, store: &dyn Store) -> bool {
        let taken = std::mem::take(&mut *self.lock());
        if taken.acks.is_empty() && taken.statuses.is_empty() {
            return true;
        }
        let acks: Vec<Ack> = taken
            .acks
            .iter()
            .map(|((cluster, unit), revision)| Ack {
                cluster: cluster.clone(),
                unit: unit.clone(),
                revision: *revision,
            })
            .collect();
        let statuses: Vec<StatusReport> = taken.statuses.values().cloned().collect();
        let result = match store.record_acks(&acks).await {
            Ok(()) => store.record_statuses(&statuses).await,
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            tracing::warn!(error = %ErrorChain(&e), "recording agent feedback failed; will retry");
            let mut p = self.lock();
            for (k, v) in taken.acks {
                let e = p.acks.entry(k).or_default();
                *e = (*e).max(v);
            }
            for (k, v) in taken.statuses {
                p.statuses.entry(k).or_insert(v);
            }
            return false;
        }
        true
    }

    /// The writer task: flushes until `shutdown`, then once more.
    pub async fn run(self: Arc<Self>, store: Arc<dyn Store>, shutdown: CancellationToken) {
        let mut retry = Duration::from_millis(100);
        loop {
            tokio::select! {
                () = self.notify.notified() => {}
                () = shutdown.cancelled() => break,
            }
            tokio::time::sleep(GATHER).await;
            if self.flush(store.as_ref()).await {
                retry = Duration::from_millis(100);
            } else {
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(Duration::from_secs(5));
                self.notify.notify_one();
            }
        }
        self.flush(store.as_ref()).await;
    }
}
