//! Agent feedback (acks and status reports) on its way to the store.
//!
//! The stream's receive loop only records feedback here, in memory and
//! coalesced per (cluster, unit); one writer task flushes it in batches. So
//! acks and heartbeats never wait on a database write, and a burst from
//! thousands of agents becomes a few short transactions: statuses at once
//! when the writer is idle (operators wait on them; under load, what arrives
//! during a write is the next batch), acks at most once a second and less
//! often under load (they are advisory: the agent's version vector, not
//! the hub's ack record, drives resync; see [`ack_interval`]), and only
//! those no status report of the same revision covers (the report records
//! its receipt too). Written statuses are announced on the hub's
//! [`Events`] (and, by the store, to other replicas).
//! Batches are split into chunks so a commit never waits long for the
//! store's single writer.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::error::ErrorChain;
use crate::events::{Events, HubEvent};
use crate::model::{ClusterName, EnvName, RevisionNum, StatusReport, UnitName, UnitRef};
use crate::store::{Ack, Seen, Store};

type Key = (ClusterName, UnitRef);

#[derive(Default)]
struct Pending {
    /// By cluster, then unit (an ack to a known cluster and unit allocates
    /// nothing).
    acks: HashMap<ClusterName, ClusterAcks>,
    statuses: HashMap<Key, StatusReport>,
    seen: HashMap<ClusterName, Seen>,
}

/// A cluster's pending acks: its environment and the newest per unit.
struct ClusterAcks {
    env: EnvName,
    units: HashMap<UnitName, RevisionNum>,
}

/// Coalescing buffer between agent sessions and the store.
pub struct Feedback {
    pending: Mutex<Pending>,
    notify: Notify,
    /// Where recorded statuses are announced.
    events: Events,
}

impl Feedback {
    pub fn new(events: Events) -> Feedback {
        Feedback {
            pending: Mutex::default(),
            notify: Notify::new(),
            events,
        }
    }
}
/// How often acks are written at most.
const ACK_INTERVAL: Duration = Duration::from_secs(1);
/// How often acks are written at least.
const MAX_ACK_INTERVAL: Duration = Duration::from_secs(10);
/// Acks take at most one part in this many of the writer's time.
const ACK_SHARE: u32 = 10;

/// When acks (and "last seen" records) are next written, after a batch of
/// them took `took`: a second later, or ten times `took` later when that
/// is longer (at most ten seconds). Each agent's acks of a unit coalesce
/// meanwhile, so while a batch takes under a second the writer (which
/// commits and statuses wait for) spends at most about a tenth of its time
/// on them, and a unit's "received" is as fresh as that allows.
fn ack_interval(took: Duration) -> Duration {
    took.saturating_mul(ACK_SHARE)
        .clamp(ACK_INTERVAL, MAX_ACK_INTERVAL)
}

/// What a flush did.
#[derive(Debug)]
pub struct Flushed {
    /// Everything was written (else what was not is kept for the next
    /// attempt).
    pub written: bool,
    /// How long the acks (and "last seen" records, written with them)
    /// took to write.
    pub acks: Duration,
}
/// Rows per transaction: few enough that a commit waiting for the writer
/// waits a few milliseconds.
const CHUNK: usize = 2048;

impl Feedback {
    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records an ack (written with the next batch of acks, a second
    /// later or, under load, up to [`MAX_ACK_INTERVAL`]; acks do not wake
    /// the writer).
    pub fn ack(&self, cluster: &ClusterName, env: &EnvName, unit: UnitName, revision: RevisionNum) {
        let mut p = self.lock();
        let acks = match p.acks.get_mut(cluster) {
            Some(a) => a,
            None => p
                .acks
                .entry(cluster.clone())
                .or_insert_with(|| ClusterAcks {
                    env: env.clone(),
                    units: HashMap::new(),
                }),
        };
        let e = acks.units.entry(unit).or_default();
        *e = (*e).max(revision);
    }

    /// Records that a cluster's agent opened or closed a session (written
    /// with the acks).
    pub fn seen(&self, seen: Seen) {
        let mut p = self.lock();
        match p.seen.get(&seen.cluster) {
            Some(old) if old.at > seen.at => {}
            _ => {
                p.seen.insert(seen.cluster.clone(), seen);
            }
        }
    }

    /// Records a status report. It says its revision was received, so the
    /// ack of that revision is not written on its own (the status row
    /// records receipt too, of a revision the unit has; an ack only ever
    /// matches a revision the hub sent): with agents reporting right after
    /// they ack, this halves the rows written.
    pub fn status(&self, report: StatusReport) {
        let key = (report.cluster.clone(), report.unit.clone());
        let mut p = self.lock();
        if let Some(acks) = p.acks.get_mut(&report.cluster)
            && acks
                .units
                .get(&report.unit.name)
                .is_some_and(|acked| *acked == report.revision)
        {
            acks.units.remove(&report.unit.name);
        }
        match p.statuses.get(&key) {
            Some(old) if old.revision > report.revision => {}
            _ => {
                p.statuses.insert(key, report);
            }
        }
        drop(p);
        self.notify.notify_one();
    }

    /// Writes pending statuses (and acks when `with_acks`); on failure the
    /// entries are kept for the next attempt (newer feedback recorded
    /// meanwhile wins).
    pub async fn flush(&self, store: &dyn Store, with_acks: bool) -> Flushed {
        let (acks, seen, statuses) = {
            let mut p = self.lock();
            let (acks, seen) = if with_acks {
                (std::mem::take(&mut p.acks), std::mem::take(&mut p.seen))
            } else {
                (HashMap::new(), HashMap::new())
            };
            (acks, seen, std::mem::take(&mut p.statuses))
        };
        let seen: Vec<Seen> = seen.into_values().collect();
        let statuses: Vec<StatusReport> = statuses.into_values().collect();
        let acks: Vec<Ack> = acks
            .into_iter()
            .flat_map(|(cluster, a)| {
                a.units.into_iter().map(move |(name, revision)| Ack {
                    cluster: cluster.clone(),
                    unit: UnitRef {
                        env: a.env.clone(),
                        name,
                    },
                    revision,
                })
            })
            .collect();
        let mut failed = None;
        let mut written_statuses = 0;
        for chunk in statuses.chunks(CHUNK) {
            if let Err(e) = store.record_statuses(chunk).await {
                failed = Some(e);
                break;
            }
            written_statuses += chunk.len();
            self.events
                .send(HubEvent::Statuses(Arc::new(chunk.to_vec())));
        }
        let mut written_acks = 0;
        let acks_started = std::time::Instant::now();
        if failed.is_none() {
            for chunk in acks.chunks(CHUNK) {
                if let Err(e) = store.record_acks(chunk).await {
                    failed = Some(e);
                    break;
                }
                written_acks += chunk.len();
            }
        }
        let mut written_seen = 0;
        if failed.is_none() {
            for chunk in seen.chunks(CHUNK) {
                if let Err(e) = store.record_seen(chunk).await {
                    failed = Some(e);
                    break;
                }
                written_seen += chunk.len();
            }
        }
        let acks_took = acks_started.elapsed();
        let Some(e) = failed else {
            return Flushed {
                written: true,
                acks: acks_took,
            };
        };
        tracing::warn!(error = %ErrorChain(&e), "recording agent feedback failed; will retry");
        for a in acks.into_iter().skip(written_acks) {
            self.ack(&a.cluster, &a.unit.env, a.unit.name, a.revision);
        }
        let mut p = self.lock();
        for s in seen.into_iter().skip(written_seen) {
            p.seen.entry(s.cluster.clone()).or_insert(s);
        }
        for r in statuses.into_iter().skip(written_statuses) {
            p.statuses
                .entry((r.cluster.clone(), r.unit.clone()))
                .or_insert(r);
        }
        Flushed {
            written: false,
            acks: acks_took,
        }
    }

    /// The writer task: flushes until `shutdown`, then once more.
    pub async fn run(self: Arc<Self>, store: Arc<dyn Store>, shutdown: CancellationToken) {
        let mut retry = Duration::from_millis(100);
        let mut acks_due = tokio::time::Instant::now() + ACK_INTERVAL;
        loop {
            // Statuses are written at once when the writer is idle; under load
            // they gather while the previous batch is written (the batch is
            // whatever arrived meanwhile).
            tokio::select! {
                () = self.notify.notified() => {}
                () = tokio::time::sleep_until(acks_due) => {}
                () = shutdown.cancelled() => break,
            }
            let with_acks = tokio::time::Instant::now() >= acks_due;
            let flushed = self.flush(store.as_ref(), with_acks).await;
            if with_acks {
                acks_due = tokio::time::Instant::now() + ack_interval(flushed.acks);
            }
            if flushed.written {
                retry = Duration::from_millis(100);
            } else {
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(Duration::from_secs(5));
                self.notify.notify_one();
            }
        }
        self.flush(store.as_ref(), true).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Labels, Phase, PutMode, UnixMillis};
    use crate::store::testing::{audit, rev, store};
    use crate::store::{Page, TokenHash};

    #[tokio::test]
    async fn a_status_report_carries_the_ack_it_covers() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir).await;
        let dev: EnvName = "dev".parse().unwrap();
        let cluster: ClusterName = "dev-1".parse().unwrap();
        store
            .create_cluster(
                &cluster,
                &dev,
                &Labels::default(),
                &TokenHash("t".into()),
                audit("cluster.create", "cluster/dev-1"),
            )
            .await
            .unwrap();
        for unit in ["dev/api", "dev/web"] {
            store
                .commit_revision(rev(unit, "v1", PutMode::CreateOrUpdate))
                .await
                .unwrap();
        }
        let feedback = Feedback::new(Events::default());
        let (api, web): (UnitRef, UnitRef) =
            ("dev/api".parse().unwrap(), "dev/web".parse().unwrap());
        feedback.ack(&cluster, &dev, api.name.clone(), RevisionNum(1));
        feedback.ack(&cluster, &dev, web.name.clone(), RevisionNum(1));
        let report = StatusReport {
            cluster: cluster.clone(),
            unit: web.clone(),
            revision: RevisionNum(1),
            phase: Phase::Ready,
            message: String::new(),
            resources: vec![],
            observed_at: UnixMillis(1_000),
        };
        feedback.status(report.clone());
        let pending: usize = feedback.lock().acks.values().map(|a| a.units.len()).sum();
        assert_eq!(pending, 1, "web's ack rides with its status; api's waits");
        assert!(feedback.flush(&store, true).await.written);
        let cells: Vec<(String, u64, u64)> = store
            .statuses(Some(&dev), None, &Page::ALL)
            .await
            .unwrap()
            .into_iter()
            .map(|c| (c.unit.to_string(), c.status.acked.0, c.status.revision.0))
            .collect();
        assert_eq!(
            cells,
            [("dev/api".into(), 1, 0), ("dev/web".into(), 1, 1)],
            "both received; web reported"
        );
        // A report of a revision the unit does not have says nothing of
        // what was received: an ack of another revision stays pending.
        feedback.ack(&cluster, &dev, web.name.clone(), RevisionNum(1));
        feedback.status(StatusReport {
            revision: RevisionNum(9),
            ..report.clone()
        });
        let pending: usize = feedback.lock().acks.values().map(|a| a.units.len()).sum();
        assert_eq!(
            pending, 1,
            "the ack of revision 1 is not covered by a report of 9"
        );
        assert!(feedback.flush(&store, true).await.written);
        let web_cell = || async {
            store
                .statuses(Some(&dev), Some(&web), &Page::ALL)
                .await
                .unwrap()
                .pop()
                .unwrap()
        };
        let cell = web_cell().await;
        assert_eq!((cell.status.acked.0, cell.status.revision.0), (1, 9));
        // It does not hold the cell: a report of a revision the unit has,
        // received later, replaces it although its number is lower.
        feedback.status(StatusReport {
            observed_at: UnixMillis(2_000),
            ..report.clone()
        });
        assert!(feedback.flush(&store, true).await.written);
        let cell = web_cell().await;
        assert_eq!(cell.status.revision.0, 1);
    }

    #[test]
    fn acks_are_written_less_often_when_they_take_long() {
        let ms = Duration::from_millis;
        assert_eq!(ack_interval(ms(0)), ACK_INTERVAL);
        assert_eq!(ack_interval(ms(100)), ACK_INTERVAL);
        assert_eq!(ack_interval(ms(150)), ms(1_500));
        assert_eq!(ack_interval(ms(400)), ms(4_000));
        assert_eq!(ack_interval(Duration::from_secs(30)), MAX_ACK_INTERVAL);
        assert_eq!(ack_interval(Duration::MAX), MAX_ACK_INTERVAL);
    }
}
