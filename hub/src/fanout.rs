//! Fan-out of committed revisions to connected agents.
//!
//! Each agent session owns a [`Mailbox`] holding, per unit, the latest
//! revision not yet written to its stream. A commit replaces the pending
//! entry (coalescing), so memory is O(units) per agent, nothing is ever
//! dropped (a superseded revision is simply never sent), and a slow agent
//! only ever waits on its own stream. Order is per unit: a mailbox never
//! sends a revision older than one it already sent, or than the one the
//! agent said it holds when its version vector matched the head.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::auth::Credential;
use crate::model::{ClusterName, Digest, EnvName, Revision, RevisionNum, UnitName, UnixMillis};

/// One revision (or tombstone) on its way to agents; shared by all of them.
#[derive(Debug)]
pub struct Delivery {
    pub env: EnvName,
    pub unit: UnitName,
    /// 0 for a tombstone of a unit the hub does not know (never assigned).
    pub revision: RevisionNum,
    pub digest: Option<Digest>,
    pub tombstone: bool,
    pub manifests: Arc<str>,
    /// Wall-clock commit time, as precise as the clock allows.
    pub committed_at: std::time::SystemTime,
    /// When this hub committed it (or loaded it for a resync).
    pub committed: Instant,
    /// Its encoded form, made once by the edge that sends it and shared by
    /// every session.
    pub wire: std::sync::OnceLock<bytes::Bytes>,
}

impl Delivery {
    /// The delivery of a committed revision.
    pub fn of(rev: &Revision, committed_at: std::time::SystemTime) -> Arc<Delivery> {
        Arc::new(Delivery {
            env: rev.unit.env.clone(),
            unit: rev.unit.name.clone(),
            revision: rev.number,
            digest: Some(rev.digest),
            tombstone: rev.tombstone,
            manifests: rev.manifests.clone(),
            committed_at,
            committed: Instant::now(),
            wire: std::sync::OnceLock::new(),
        })
    }
}

/// The last revision of a unit written to a session's stream.
#[derive(Clone, Copy, Debug)]
struct Sent {
    revision: RevisionNum,
    /// When it was committed (for the delivery and Ready latencies).
    committed: Instant,
    /// Not yet reported Ready (a tombstone never is).
    awaiting_ready: bool,
}

/// What [`Mailbox::offer`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    Queued,
    /// Replaced an older pending revision of the same unit.
    Coalesced,
    /// Not newer than what is pending or was sent: ignored.
    Stale,
}

/// Everything a session knows of one unit, in one place: a delivery
/// touches one entry of one table (the fan-out offers each revision to
/// every session, so this is the hub's hottest memory).
#[derive(Default)]
struct Slot {
    /// The latest revision not yet written to the stream.
    pending: Option<Arc<Delivery>>,
    /// The last revision written to the stream.
    sent: Option<Sent>,
    /// The unit belongs to the session's environment.
    assigned: bool,
}

#[derive(Default)]
struct MailboxState {
    units: HashMap<UnitName, Slot>,
    /// Units with a pending delivery, in the order they were queued.
    queue: Vec<UnitName>,
    /// The session ended: nothing more is sent.
    closed: bool,
}

/// The per-session queue of latest revisions.
#[derive(Default)]
pub struct Mailbox {
    state: Mutex<MailboxState>,
    notify: Notify,
}

impl Mailbox {
    fn lock(&self) -> std::sync::MutexGuard<'_, MailboxState> {
        // A panic while holding this lock leaves consistent data behind.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Queues a delivery unless something at least as new is pending or sent.
    pub fn offer(&self, d: Arc<Delivery>) -> Offer {
        let mut s = self.lock();
        let MailboxState { units, queue, .. } = &mut *s;
        let slot = units.entry(d.unit.clone()).or_default();
        if !d.tombstone || d.revision.0 > 0 {
            slot.assigned = true;
        }
        if d.revision.0 > 0 && slot.sent.is_some_and(|sent| sent.revision >= d.revision) {
            return Offer::Stale;
        }
        let outcome = match &slot.pending {
            Some(p) if p.revision >= d.revision => return Offer::Stale,
            Some(_) => Offer::Coalesced,
            None => {
                queue.push(d.unit.clone());
                Offer::Queued
            }
        };
        slot.pending = Some(d);
        drop(s);
        self.notify.notify_one();
        outcome
    }

    /// Marks a unit as belonging to this session's cluster without sending.
    pub fn assign(&self, unit: UnitName) {
        self.lock().units.entry(unit).or_default().assigned = true;
    }

    /// Records that the agent holds `revision` of `unit` already (its
    /// version vector matched the head at the resync): an offer that is
    /// not newer (a late commit notice, a re-offer of heads read earlier)
    /// is stale, as if the hub had sent it.
    pub fn hold(&self, unit: UnitName, revision: RevisionNum) {
        let mut s = self.lock();
        let slot = s.units.entry(unit).or_default();
        slot.assigned = true;
        if slot.sent.is_none_or(|sent| sent.revision < revision) {
            slot.sent = Some(Sent {
                revision,
                committed: Instant::now(),
                awaiting_ready: false,
            });
        }
    }

    /// The unit's name as assigned to this session (shared, not copied),
    /// or `None` if it is not one of the session's units.
    pub fn assigned(&self, unit: &str) -> Option<UnitName> {
        self.lock()
            .units
            .get_key_value(unit)
            .filter(|(_, slot)| slot.assigned)
            .map(|(name, _)| name.clone())
    }

    /// Waits until something is pending and takes it all, in the order it
    /// was queued, recording it as written to the stream (the caller
    /// writes it next); `None` once the mailbox is closed.
    pub async fn next_batch(&self) -> Option<Vec<Arc<Delivery>>> {
        loop {
            {
                let mut s = self.lock();
                if s.closed {
                    return None;
                }
                if !s.queue.is_empty() {
                    let MailboxState { units, queue, .. } = &mut *s;
                    return Some(
                        queue
                            .drain(..)
                            .filter_map(|unit| {
                                let slot = units.get_mut(&unit)?;
                                let d = slot.pending.take()?;
                                slot.sent = Some(Sent {
                                    revision: d.revision,
                                    committed: d.committed,
                                    awaiting_ready: !d.tombstone,
                                });
                                Some(d)
                            })
                            .collect(),
                    );
                }
            }
            self.notify.notified().await;
        }
    }

    /// Ends the mailbox: [`Mailbox::next_batch`] answers `None` from now on.
    pub fn close(&self) {
        self.lock().closed = true;
        self.notify.notify_one();
    }

    /// The first Ready report of a sent revision: its commit instant (later
    /// reports, and reports of other revisions, give `None`).
    pub fn ready(&self, unit: &UnitName, revision: RevisionNum) -> Option<Instant> {
        let mut s = self.lock();
        let sent = s.units.get_mut(unit)?.sent.as_mut()?;
        if sent.revision != revision || !sent.awaiting_ready {
            return None;
        }
        sent.awaiting_ready = false;
        Some(sent.committed)
    }

    /// Matches an ack against what was sent; returns the unit's name and
    /// the commit instant of the acknowledged revision, or `None` if it
    /// was never sent here.
    pub fn ack(&self, unit: &str, revision: RevisionNum) -> Option<(UnitName, Instant)> {
        // An ack of an older revision than the last sent is late, not
        // wrong: it matches nothing.
        let s = self.lock();
        let (name, slot) = s.units.get_key_value(unit)?;
        let sent = slot.sent.filter(|s| s.revision == revision)?;
        Some((name.clone(), sent.committed))
    }

    pub fn pending_len(&self) -> usize {
        self.lock().queue.len()
    }
}

/// Why the hub ended a session (the agent is told).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EndReason {
    /// The credential was revoked, rotated or its cluster deleted.
    CredentialRevoked,
    /// A newer session of the same cluster replaced it.
    Replaced,
    /// The hub is shutting down.
    Shutdown,
    /// The agent broke the protocol (the decode error, say).
    Protocol(String),
}

/// One connected agent session.
pub struct AgentConn {
    pub cluster: ClusterName,
    pub env: EnvName,
    pub session: u64,
    pub agent_version: String,
    /// What the session authenticated with (re-checked against the store
    /// by [`crate::grpc::agent::recheck_credentials`]).
    pub credential: Option<Credential>,
    pub connected_at: UnixMillis,
    pub mailbox: Mailbox,
    /// Cancelled when the session ends (see [`AgentConn::close`]).
    pub kick: CancellationToken,
    ended: Mutex<Option<EndReason>>,
    /// The session's clock: when the agent was last heard and when the
    /// hub last sent, as milliseconds since `opened`. Atomics, so that
    /// the streams note them per message and only the session's watchdog
    /// keeps timers.
    opened: tokio::time::Instant,
    heard: AtomicU64,
    sent: AtomicU64,
}

impl std::fmt::Debug for AgentConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentConn")
            .field("cluster", &self.cluster)
            .field("env", &self.env)
            .field("session", &self.session)
            .finish_non_exhaustive()
    }
}

impl AgentConn {
    pub fn new(
        cluster: ClusterName,
        env: EnvName,
        session: u64,
        agent_version: String,
        credential: Option<Credential>,
    ) -> AgentConn {
        AgentConn {
            cluster,
            env,
            session,
            agent_version,
            credential,
            connected_at: UnixMillis::now(),
            mailbox: Mailbox::default(),
            kick: CancellationToken::new(),
            ended: Mutex::default(),
            opened: tokio::time::Instant::now(),
            heard: AtomicU64::new(0),
            sent: AtomicU64::new(0),
        }
    }

    /// Ends the session; the first reason given is the one the agent hears.
    pub fn end(&self, why: EndReason) {
        self.ended
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get_or_insert(why);
        self.close();
    }

    /// Ends the session's streams (its outbound stream says why, if a
    /// reason was given) and its watchdog.
    pub fn close(&self) {
        self.mailbox.close();
        self.kick.cancel();
    }

    fn since_opened(&self) -> u64 {
        u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn at(&self, millis: &AtomicU64) -> tokio::time::Instant {
        self.opened + std::time::Duration::from_millis(millis.load(Ordering::Relaxed))
    }

    /// The agent was heard now.
    pub fn heard_now(&self) {
        self.heard.store(self.since_opened(), Ordering::Relaxed);
    }

    /// When the agent was last heard (the session's opening at first).
    pub fn last_heard(&self) -> tokio::time::Instant {
        self.at(&self.heard)
    }

    /// The hub sent the agent something now.
    pub fn sent_now(&self) {
        self.sent.store(self.since_opened(), Ordering::Relaxed);
    }

    /// When the hub last sent the agent something.
    pub fn last_sent(&self) -> tokio::time::Instant {
        self.at(&self.sent)
    }

    pub fn end_reason(&self) -> Option<EndReason> {
        self.ended
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// Registry of connected sessions by environment and cluster.
#[derive(Default)]
pub struct Fanout {
    agents: RwLock<HashMap<EnvName, HashMap<ClusterName, Arc<AgentConn>>>>,
}

/// What [`Fanout::publish`] did, for metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PublishStats {
    pub sessions: usize,
    pub coalesced: usize,
}

impl Fanout {
    fn read(
        &self,
    ) -> std::sync::RwLockReadGuard<'_, HashMap<EnvName, HashMap<ClusterName, Arc<AgentConn>>>>
    {
        self.agents
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(
        &self,
    ) -> std::sync::RwLockWriteGuard<'_, HashMap<EnvName, HashMap<ClusterName, Arc<AgentConn>>>>
    {
        self.agents
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Registers a session; a previous session of the same cluster is
    /// kicked (the newest connection wins).
    pub fn register(&self, conn: Arc<AgentConn>) {
        let old = self
            .write()
            .entry(conn.env.clone())
            .or_default()
            .insert(conn.cluster.clone(), conn);
        if let Some(old) = old {
            old.end(EndReason::Replaced);
        }
    }

    /// Removes a session if it is still the registered one.
    pub fn unregister(&self, conn: &AgentConn) {
        let mut all = self.write();
        if let Some(env) = all.get_mut(&conn.env)
            && env
                .get(&conn.cluster)
                .is_some_and(|c| c.session == conn.session)
        {
            env.remove(&conn.cluster);
        }
    }

    /// Offers a delivery to every session of its environment.
    pub fn publish(&self, d: &Arc<Delivery>) -> PublishStats {
        let mut stats = PublishStats::default();
        if let Some(env) = self.read().get(&d.env) {
            for conn in env.values() {
                stats.sessions += 1;
                if conn.mailbox.offer(d.clone()) == Offer::Coalesced {
                    stats.coalesced += 1;
                }
            }
        }
        stats
    }

    /// Ends a cluster's live session, if any: its credential no longer
    /// holds (revoked, rotated, deleted).
    pub fn disconnect(&self, cluster: &ClusterName) -> bool {
        let all = self.read();
        let mut found = false;
        for env in all.values() {
            if let Some(c) = env.get(cluster) {
                c.end(EndReason::CredentialRevoked);
                found = true;
            }
        }
        found
    }

    /// Every live session.
    pub fn sessions(&self) -> Vec<Arc<AgentConn>> {
        self.read()
            .values()
            .flat_map(|env| env.values().cloned())
            .collect()
    }

    /// Environments with at least one live session.
    pub fn environments(&self) -> Vec<EnvName> {
        self.read()
            .iter()
            .filter(|(_, sessions)| !sessions.is_empty())
            .map(|(env, _)| env.clone())
            .collect()
    }

    pub fn session(&self, cluster: &ClusterName) -> Option<Arc<AgentConn>> {
        self.read()
            .values()
            .find_map(|env| env.get(cluster).cloned())
    }

    /// The clusters with a live session, read once (for views that check
    /// many cells).
    pub fn connected(&self) -> HashSet<ClusterName> {
        self.read()
            .values()
            .flat_map(|env| env.keys().cloned())
            .collect()
    }

    pub fn count(&self) -> usize {
        self.read().values().map(HashMap::len).sum()
    }

    /// Ends every session (hub shutdown).
    pub fn disconnect_all(&self) {
        for env in self.read().values() {
            for c in env.values() {
                c.end(EndReason::Shutdown);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(unit: &str, rev: u64) -> Arc<Delivery> {
        Arc::new(Delivery {
            env: "dev".parse().unwrap(),
            unit: unit.parse().unwrap(),
            revision: RevisionNum(rev),
            digest: Some(Digest::of(format!("{unit}{rev}").as_bytes())),
            tombstone: false,
            manifests: Arc::from(""),
            committed_at: std::time::SystemTime::now(),
            committed: Instant::now(),
            wire: std::sync::OnceLock::new(),
        })
    }

    #[tokio::test]
    async fn coalesces_to_latest_per_unit_and_never_goes_back() {
        let m = Mailbox::default();
        assert_eq!(m.offer(d("a", 1)), Offer::Queued);
        assert_eq!(m.offer(d("a", 2)), Offer::Coalesced);
        assert_eq!(m.offer(d("a", 1)), Offer::Stale);
        assert_eq!(m.offer(d("b", 5)), Offer::Queued);
        assert_eq!(m.pending_len(), 2);
        let batch = m.next_batch().await.unwrap();
        let got: Vec<(String, u64)> = batch
            .iter()
            .map(|x| (x.unit.to_string(), x.revision.0))
            .collect();
        assert_eq!(got, [("a".into(), 2), ("b".into(), 5)]);
        // Already sent: a resync offering the same revision again is stale.
        assert_eq!(m.offer(d("a", 2)), Offer::Stale);
        assert_eq!(m.offer(d("a", 3)), Offer::Queued);
    }

    #[test]
    fn what_the_agent_holds_counts_as_sent() {
        let m = Mailbox::default();
        m.hold("a".parse().unwrap(), RevisionNum(6));
        assert!(m.assigned("a").is_some());
        assert_eq!(m.offer(d("a", 5)), Offer::Stale, "older than held");
        assert_eq!(m.offer(d("a", 6)), Offer::Stale, "the one held");
        assert_eq!(m.offer(d("a", 7)), Offer::Queued);
        // Holding an older one than was sent changes nothing.
        m.hold("a".parse().unwrap(), RevisionNum(2));
        assert_eq!(m.offer(d("a", 6)), Offer::Stale);
    }

    #[tokio::test]
    async fn acks_match_only_what_was_sent() {
        let m = Mailbox::default();
        let x = d("a", 3);
        m.offer(x.clone());
        assert!(m.ack("a", RevisionNum(3)).is_none(), "pending is not sent");
        assert_eq!(m.next_batch().await.unwrap().len(), 1);
        let (name, _) = m.ack("a", RevisionNum(3)).expect("sent, so acknowledged");
        assert!(
            std::ptr::eq(name.as_str(), x.unit.as_str()),
            "the name is shared, not copied"
        );
        assert!(m.ack("a", RevisionNum(4)).is_none());
        assert!(m.ack("zz", RevisionNum(1)).is_none());
    }

    #[tokio::test]
    async fn a_batch_goes_in_the_order_queued_and_a_coalesced_unit_keeps_its_place() {
        let m = Mailbox::default();
        m.offer(d("b", 1));
        m.offer(d("a", 1));
        assert_eq!(m.offer(d("b", 2)), Offer::Coalesced);
        let got: Vec<(String, u64)> = m
            .next_batch()
            .await
            .unwrap()
            .iter()
            .map(|x| (x.unit.to_string(), x.revision.0))
            .collect();
        assert_eq!(got, [("b".into(), 2), ("a".into(), 1)]);
        assert_eq!(m.pending_len(), 0);
        // A tombstone of a unit the hub does not know is sent, never
        // assigned; an assigned unit is known by its shared name.
        m.offer(Arc::new(Delivery {
            tombstone: true,
            revision: RevisionNum(0),
            ..Arc::into_inner(d("ghost", 0)).unwrap()
        }));
        assert!(m.assigned("ghost").is_none());
        assert_eq!(m.next_batch().await.unwrap().len(), 1);
        assert!(m.assigned("a").is_some());
    }

    #[tokio::test]
    async fn next_batch_wakes_on_offer() {
        let m = Arc::new(Mailbox::default());
        let waiter = tokio::spawn({
            let m = m.clone();
            async move { m.next_batch().await.map(|b| b.len()) }
        });
        tokio::task::yield_now().await;
        m.offer(d("a", 1));
        let n = tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(n, Some(1));
        // Closed: the waiting stream hears of it.
        let waiter = tokio::spawn({
            let m = m.clone();
            async move { m.next_batch().await.map(|b| b.len()) }
        });
        tokio::task::yield_now().await;
        m.close();
        m.offer(d("a", 2));
        let n = tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(n, None);
    }
}
