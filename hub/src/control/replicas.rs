//! [`Hub`] among replicas sharing a PostgreSQL store: what the others
//! announce. Their commits are offered to this hub's agents; their agents'
//! statuses, their agent sessions and their clusters created or deleted
//! reach this hub's views and watchers (`status`, `--wait`,
//! `status --watch`, the dashboard, the ConfigHub worker's waits), which
//! would otherwise know only of agents connected here. Each replica shares
//! its own sessions under a lease ([`Hub::share_sessions`]): those of a
//! replica that crashed count as closed once its lease runs out.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use super::{Connection, Hub};
use crate::events::HubEvent;
use crate::model::{ClusterName, EnvName, StatusReport, UnitRef, UnixMillis};
use crate::store::{Announcement, AnnouncementStream, Seen};

/// Announcements handled together: the statuses among them are read in
/// one batch.
const BATCH: usize = 1_024;

impl Hub {
    /// A cluster's agent session, here or on another replica.
    pub fn connection(&self, cluster: &ClusterName) -> Option<Connection> {
        if let Some(s) = self.fanout.session(cluster) {
            return Some(Connection {
                connected_at: s.connected_at,
                agent_version: s.agent_version.clone(),
                elsewhere: false,
            });
        }
        self.elsewhere
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(cluster)
            .map(|(_, s)| Connection {
                connected_at: s.at,
                agent_version: s.agent_version.clone(),
                elsewhere: true,
            })
    }

    /// Whether a cluster's agent holds a session here or on another
    /// replica.
    pub fn is_connected(&self, cluster: &ClusterName) -> bool {
        self.fanout.session(cluster).is_some()
            || self
                .elsewhere
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .contains_key(cluster)
    }

    /// The clusters whose agent holds a session here or on another
    /// replica, read once (for views that check many cells).
    pub fn connected(&self) -> HashSet<ClusterName> {
        let mut connected = self.fanout.connected();
        connected.extend(
            self.elsewhere
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .keys()
                .cloned(),
        );
        connected
    }

    /// A session opened or closed here: other replicas hear of it.
    pub fn session_changed(&self) {
        self.sessions_changed.notify_one();
    }

    /// Shares this hub's agent sessions with the replicas of its store
    /// until `stop`: what opened and closed, soon after (a burst of them
    /// in one write), under a lease renewed every third of
    /// [`super::Tuning::session_lease`]; stopping ends the lease at once.
    pub async fn share_sessions(self: Arc<Self>, stop: CancellationToken) {
        let lease = self.tuning.session_lease;
        let mut written: HashMap<ClusterName, UnixMillis> = HashMap::new();
        let mut retry = Duration::from_millis(100);
        loop {
            let open = self.fanout.sessions();
            let opened: Vec<Seen> = open
                .iter()
                .filter(|s| written.get(&s.cluster) != Some(&s.connected_at))
                .map(|s| Seen {
                    cluster: s.cluster.clone(),
                    agent_version: s.agent_version.clone(),
                    at: s.connected_at,
                })
                .collect();
            let still: HashSet<&ClusterName> = open.iter().map(|s| &s.cluster).collect();
            let closed: Vec<ClusterName> = written
                .keys()
                .filter(|c| !still.contains(c))
                .cloned()
                .collect();
            let until = UnixMillis(UnixMillis::now().0 + lease.as_millis() as i64);
            let pause = match self.store.record_sessions(&opened, &closed, until).await {
                Ok(()) => {
                    for c in &closed {
                        written.remove(c);
                    }
                    written.extend(opened.into_iter().map(|s| (s.cluster, s.at)));
                    retry = Duration::from_millis(100);
                    lease / 3
                }
                Err(e) => {
                    tracing::warn!(error = %crate::error::ErrorChain(&e), "sharing agent sessions with other replicas failed; will retry");
                    retry = (retry * 2).min(lease / 3);
                    retry
                }
            };
            tokio::select! {
                () = stop.cancelled() => break,
                () = self.sessions_changed.notified() => {}
                () = tokio::time::sleep(pause) => {}
            }
        }
        if let Err(e) = self.store.record_sessions(&[], &[], UnixMillis(0)).await {
            tracing::warn!(error = %crate::error::ErrorChain(&e), "ending this replica's lease on its agent sessions failed; other replicas count them until it runs out");
        }
    }

    /// Follows the other replicas' announcements until `stop`, and
    /// re-reads their agent sessions as often as they renew their leases
    /// (those of a replica that stopped renewing run out).
    pub async fn follow_replicas(
        self: Arc<Self>,
        announcements: AnnouncementStream,
        stop: CancellationToken,
    ) {
        let mut batches = announcements.ready_chunks(BATCH);
        let mut leases = tokio::time::interval(self.tuning.session_lease / 3);
        leases.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let batch = tokio::select! {
                () = stop.cancelled() => return,
                _ = leases.tick() => {
                    self.sessions_elsewhere().await;
                    continue;
                }
                b = batches.next() => match b {
                    Some(b) => b,
                    None => return,
                },
            };
            let mut statuses = Vec::new();
            let mut sessions = false;
            for announced in batch {
                match announced {
                    Announcement::Revision(unit, number) => {
                        match self.store.get_revision(&unit, number).await {
                            Ok(Some(r)) => self.offer(&r),
                            Ok(None) => {}
                            Err(e) => tracing::warn!(
                                error = %crate::error::ErrorChain(&e),
                                "loading an announced revision failed"
                            ),
                        }
                    }
                    Announcement::Resync => self.resync().await,
                    Announcement::Status(cluster, unit) => statuses.push((cluster, unit)),
                    Announcement::Clusters(env) => self.events.send(HubEvent::Clusters { env }),
                    Announcement::Sessions => sessions = true,
                }
            }
            self.replicas_statuses(statuses).await;
            if sessions {
                self.sessions_elsewhere().await;
            }
        }
    }

    /// Reads the agent sessions other replicas hold under a running lease;
    /// watchers hear of each cluster whose sessions changed. If they cannot
    /// be read, what was read last stands until the next try.
    async fn sessions_elsewhere(&self) {
        let read = match self.store.sessions_elsewhere(UnixMillis::now()).await {
            Ok(read) => read,
            Err(e) => {
                tracing::warn!(error = %crate::error::ErrorChain(&e), "reading other replicas' agent sessions failed");
                return;
            }
        };
        // The latest of a cluster's sessions (the rows come oldest first).
        let now: HashMap<ClusterName, (EnvName, Seen)> = read
            .into_iter()
            .map(|(env, s)| (s.cluster.clone(), (env, s)))
            .collect();
        let before = std::mem::replace(
            &mut *self
                .elsewhere
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
            now.clone(),
        );
        let changed = now
            .iter()
            .filter(|(c, s)| before.get(*c) != Some(*s))
            .chain(before.iter().filter(|(c, _)| !now.contains_key(*c)));
        for (cluster, (env, _)) in changed {
            self.events.send(HubEvent::Session {
                cluster: cluster.clone(),
                env: env.clone(),
            });
        }
    }

    /// Announcements may have been missed: every head is offered again
    /// (offering one twice changes nothing) and every watcher starts over
    /// from the store.
    async fn resync(&self) {
        match self.reoffer_heads().await {
            Ok(n) => tracing::info!(heads = n, "re-offered heads after missed announcements"),
            Err(e) => tracing::warn!(
                error = %crate::error::ErrorChain(&e),
                "re-offering heads failed"
            ),
        }
        match self.store.list_environments().await {
            Ok(envs) => {
                for e in envs {
                    self.events.send(HubEvent::Clusters { env: e.name });
                }
            }
            Err(e) => tracing::warn!(
                error = %crate::error::ErrorChain(&e),
                "listing environments after missed announcements failed"
            ),
        }
    }

    /// Statuses other replicas recorded, as the store holds them, to this
    /// hub's watchers (a later one of a cell may already be there: the
    /// watcher keeps the newer). This hub's status clock never stamps a
    /// status earlier than one it has seen (an agent moving here from a
    /// replica whose clock is ahead). If they cannot be read, the watchers
    /// of their environments start over from the store.
    async fn replicas_statuses(&self, mut which: Vec<(ClusterName, UnitRef)>) {
        if which.is_empty() {
            return;
        }
        which.sort_unstable();
        which.dedup();
        let cells = match self.store.cells(&which).await {
            Ok(cells) => cells,
            Err(e) => {
                tracing::warn!(error = %crate::error::ErrorChain(&e), "reading statuses another replica recorded failed; watchers start over");
                let mut envs: Vec<_> = which.into_iter().map(|(_, unit)| unit.env).collect();
                envs.sort_unstable();
                envs.dedup();
                for env in envs {
                    self.events.send(HubEvent::Clusters { env });
                }
                return;
            }
        };
        if let Some(latest) = cells.iter().map(|c| c.status.updated_at).max() {
            self.status_clock.not_before(latest);
        }
        let reports: Vec<StatusReport> = cells
            .into_iter()
            .map(|c| StatusReport {
                cluster: c.cluster,
                unit: c.unit,
                revision: c.status.revision,
                phase: c.status.phase,
                message: c.status.message,
                resources: c.status.resources,
                observed_at: c.status.updated_at,
            })
            .collect();
        if !reports.is_empty() {
            self.events.send(HubEvent::Statuses(Arc::new(reports)));
        }
    }
}
