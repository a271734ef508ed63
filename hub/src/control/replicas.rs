//! [`Hub`] among replicas sharing a PostgreSQL store: what the others
//! announce. Their commits are offered to this hub's agents; their agents'
//! statuses, their agent sessions and their clusters created or deleted
//! reach this hub's views and watchers (`status`, `--wait`,
//! `status --watch`, the dashboard, the ConfigHub worker's waits), which
//! would otherwise know only of agents connected here. Each replica shares
//! its own sessions under a lease ([`Hub::share_sessions`]): those of a
//! replica that crashed count as closed once its lease runs out. A
//! credential revoked, rotated or deleted through another replica ends
//! this one's session of it at once.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use super::{Connection, Hub};
use crate::events::HubEvent;
use crate::fanout::{AgentConn, EndReason};
use crate::model::{ClusterName, EnvName, StatusReport, UnitRef, UnixMillis};
use crate::store::{Announcement, AnnouncementStream, Seen};

/// Announcements handled together: the statuses among them are read in
/// one batch.
const BATCH: usize = 1_024;

/// How long a failed credential re-check waits before its one retry.
const RECHECK_RETRY: Duration = Duration::from_secs(1);

/// How often a replica writes all its agent sessions again (in between, what
/// opened and closed).
const REWRITE_SESSIONS: Duration = Duration::from_secs(300);

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
        self.read_elsewhere().get(cluster).map(|(_, s)| Connection {
            connected_at: s.at,
            agent_version: s.agent_version.clone(),
            elsewhere: true,
        })
    }

    /// Whether a cluster's agent holds a session here or on another
    /// replica.
    pub fn is_connected(&self, cluster: &ClusterName) -> bool {
        self.fanout.session(cluster).is_some() || self.read_elsewhere().contains_key(cluster)
    }

    /// The clusters whose agent holds a session here or on another
    /// replica, read once (for views that check many cells).
    pub fn connected(&self) -> HashSet<ClusterName> {
        let mut connected = self.fanout.connected();
        connected.extend(self.read_elsewhere().keys().cloned());
        connected
    }

    /// The sessions other replicas hold, as last read.
    fn read_elsewhere(
        &self,
    ) -> std::sync::RwLockReadGuard<'_, HashMap<ClusterName, (EnvName, Seen)>> {
        self.elsewhere
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A session opened or closed here: other replicas hear of it.
    pub fn session_changed(&self) {
        self.sessions_changed.notify_one();
    }

    /// Shares this hub's agent sessions with the replicas of its store
    /// until `stop`: what opened and closed, soon after (a burst of them
    /// in one write), under a lease renewed every third of
    /// [`super::Tuning::session_lease`]; all of them again after a failed
    /// write and every [`REWRITE_SESSIONS`] (what the store holds may have
    /// been lost meanwhile); stopping ends the lease at once.
    pub async fn share_sessions(self: Arc<Self>, stop: CancellationToken) {
        let lease = self.tuning.session_lease;
        let mut written: HashMap<ClusterName, UnixMillis> = HashMap::new();
        let mut rewritten = tokio::time::Instant::now();
        let mut replace = true;
        let mut retry = Duration::from_millis(100);
        loop {
            replace |= rewritten.elapsed() >= REWRITE_SESSIONS;
            let open = self.fanout.sessions();
            let opened: Vec<Seen> = open
                .iter()
                .filter(|s| replace || written.get(&s.cluster) != Some(&s.connected_at))
                .map(|s| Seen {
                    cluster: s.cluster.clone(),
                    agent_version: s.agent_version.clone(),
                    at: s.connected_at,
                })
                .collect();
            let still: HashSet<&ClusterName> = open.iter().map(|s| &s.cluster).collect();
            let closed: Vec<ClusterName> = if replace {
                Vec::new()
            } else {
                written
                    .keys()
                    .filter(|c| !still.contains(c))
                    .cloned()
                    .collect()
            };
            let wrote = self
                .store
                .record_sessions(&opened, &closed, replace, lease)
                .await;
            let pause = match wrote {
                Ok(()) => {
                    if replace {
                        written.clear();
                        rewritten = tokio::time::Instant::now();
                        replace = false;
                    }
                    for c in &closed {
                        written.remove(c);
                    }
                    written.extend(opened.into_iter().map(|s| (s.cluster, s.at)));
                    retry = Duration::from_millis(100);
                    lease / 3
                }
                Err(e) => {
                    tracing::warn!(error = %crate::error::ErrorChain(&e), "sharing agent sessions with other replicas failed; will retry");
                    replace = true;
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
        if let Err(e) = self
            .store
            .record_sessions(&[], &[], false, Duration::ZERO)
            .await
        {
            tracing::warn!(error = %crate::error::ErrorChain(&e), "ending this replica's lease on its agent sessions failed; other replicas count them until it runs out");
        }
    }

    /// Whether each of these sessions' credential still names its cluster:
    /// a session whose credential was revoked, rotated or deleted ends.
    /// The lot in a few batched queries. A credential that cannot be
    /// checked is not valid (a revoked one must not ride out a database
    /// outage), but one failed batch is tried again after
    /// [`RECHECK_RETRY`] first (a blip must not end the whole fleet's
    /// sessions at once); then those sessions end, and their agents
    /// reconnect and are checked afresh.
    pub async fn recheck_credentials(&self, live: Vec<Arc<AgentConn>>) {
        if live.is_empty() {
            return;
        }
        let held: Vec<_> = live
            .iter()
            .filter_map(|c| Some((c.cluster.clone(), c.credential.clone()?)))
            .collect();
        let mut answer = self.store.credentials_in_force(&held).await;
        if answer.is_err() {
            tokio::time::sleep(RECHECK_RETRY).await;
            answer = self.store.credentials_in_force(&held).await;
        }
        let in_force = match answer {
            Ok(in_force) => in_force,
            Err(e) => {
                tracing::warn!(sessions = live.len(), error = %crate::error::ErrorChain(&e), "cannot re-check the sessions' credentials; ending them");
                for conn in &live {
                    conn.end(EndReason::Shutdown);
                }
                return;
            }
        };
        for conn in live {
            let valid = conn
                .credential
                .as_ref()
                .is_some_and(|c| in_force.contains(&(conn.cluster.clone(), c.clone())));
            // A session that ended meanwhile (replaced, say) is left be.
            if !valid && conn.end_reason().is_none() {
                tracing::info!(cluster = %conn.cluster, "the session's credential no longer names its cluster; ending the session");
                conn.end(EndReason::CredentialRevoked);
            }
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
        let mut sessions_read = tokio::time::Instant::now();
        loop {
            let batch = tokio::select! {
                () = stop.cancelled() => return,
                _ = leases.tick() => {
                    self.sessions_elsewhere(&mut sessions_read).await;
                    continue;
                }
                b = batches.next() => match b {
                    Some(b) => b,
                    None => return,
                },
            };
            let mut statuses = Vec::new();
            let mut sessions = false;
            let mut credentials = Vec::new();
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
                    Announcement::Resync => {
                        self.resync().await;
                        sessions = true;
                    }
                    Announcement::Status(cluster, unit) => statuses.push((cluster, unit)),
                    Announcement::Clusters(env) => self.events.send(HubEvent::Clusters { env }),
                    Announcement::Sessions => sessions = true,
                    Announcement::Credentials(cluster) => {
                        credentials.extend(self.fanout.session(&cluster));
                    }
                }
            }
            // Off this loop: a retry must not hold the announcements up.
            if !credentials.is_empty() {
                let hub = self.clone();
                tokio::spawn(async move { hub.recheck_credentials(credentials).await });
            }
            self.replicas_statuses(statuses).await;
            if sessions {
                self.sessions_elsewhere(&mut sessions_read).await;
            }
        }
    }

    /// Reads the agent sessions other replicas hold under a running lease;
    /// watchers hear of each cluster whose sessions changed. If they cannot
    /// be read, what was read last (at `read`) stands until a lease could
    /// have run out since, and then none count.
    async fn sessions_elsewhere(&self, read: &mut tokio::time::Instant) {
        let now = match self.store.sessions_elsewhere().await {
            Ok(now) => {
                *read = tokio::time::Instant::now();
                now
            }
            Err(e) => {
                tracing::warn!(error = %crate::error::ErrorChain(&e), "reading other replicas' agent sessions failed");
                if read.elapsed() < self.tuning.session_lease {
                    return;
                }
                Vec::new()
            }
        };
        // The latest of a cluster's sessions (the rows come oldest first).
        let now: HashMap<ClusterName, (EnvName, Seen)> = now
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
