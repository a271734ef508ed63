//! Following the hub's `WatchStatus`, for `--wait` and `status --watch`:
//! a watch reopened when the hub goes away (a restart ends every watch
//! with `UNAVAILABLE`, a crash breaks the connection) for as long as the
//! caller keeps asking, and the view its events build.
//!
//! Every watch the hub opens starts with a snapshot, which replaces the
//! view; so does one it starts over with (clusters came or went, or the
//! watch fell behind). A change recorded before a snapshot's read can be
//! broadcast after it (the hub subscribes first, so nothing is lost): a
//! cell older than the one held is stale and kept out.

use std::collections::BTreeMap;
use std::time::Duration;

use tonic::{Code, Status, Streaming};
use unitsync_proto::v1 as pb;

use super::client::Client;

/// The pause after a first attempt to reopen a watch the hub ended
/// failed (the first is at once; the hub restarts in tens of
/// milliseconds); doubled after each attempt until a snapshot comes whole.
const FIRST_RETRY: Duration = Duration::from_millis(50);
/// The longest pause between attempts.
const LAST_RETRY: Duration = Duration::from_secs(2);

/// What the watch has shown.
#[derive(Default)]
pub(super) struct View {
    pub(super) units: BTreeMap<String, pb::Unit>,
    pub(super) clusters: BTreeMap<String, pb::Cluster>,
    /// By unit, then cluster.
    pub(super) cells: BTreeMap<(String, String), pb::ClusterUnitStatus>,
    /// A snapshot's pages are arriving.
    in_snapshot: bool,
    /// A snapshot was completed since the view was last replaced.
    complete: bool,
}

impl View {
    /// Applies an event; whether the view is whole now (its snapshot is
    /// complete and no fresh one is arriving).
    pub(super) fn apply(&mut self, ev: pb::StatusEvent) -> bool {
        if ev.snapshot && !self.in_snapshot {
            *self = View::default();
        }
        self.in_snapshot = ev.snapshot && !ev.snapshot_complete;
        self.complete |= ev.snapshot_complete;
        for u in ev.units {
            self.units.insert(u.unit.clone(), u);
        }
        for c in ev.clusters {
            self.clusters.insert(c.name.clone(), c);
        }
        for c in ev.cells {
            self.merge(c);
        }
        self.complete && !self.in_snapshot
    }

    /// The watch was cut: whatever it was sending is void, and the
    /// reopened watch's snapshot replaces the view.
    fn lost(&mut self) {
        self.in_snapshot = false;
    }

    /// The status of `unit` in `cluster`.
    pub(super) fn cell(&self, unit: &str, cluster: &str) -> Option<&pb::ClusterUnitStatus> {
        self.cells.get(&(unit.to_owned(), cluster.to_owned()))
    }

    /// Keeps `cell` unless the one held is newer (a stale `Degraded` over
    /// the snapshot's `Ready` would fail a wait).
    fn merge(&mut self, cell: pb::ClusterUnitStatus) {
        let at = |c: &pb::ClusterUnitStatus| {
            let t = c.updated_at.unwrap_or_default();
            (c.revision, t.seconds, t.nanos)
        };
        let key = (cell.unit.clone(), cell.cluster.clone());
        match self.cells.get(&key) {
            Some(held) if at(held) > at(&cell) => {}
            _ => {
                self.cells.insert(key, cell);
            }
        }
    }
}

/// What following the watch brings.
pub(super) enum Followed {
    /// An event changed the view; whether it is whole now (see
    /// [`View::apply`]).
    Changed { whole: bool },
    /// The hub went away (said once per absence); the next call waits
    /// for it, and the watch reopens with a fresh snapshot.
    Lost(Status),
}

/// A `WatchStatus` that outlives the hub's restarts, and what it showed.
pub(super) struct Watch {
    client: Client,
    request: pb::WatchStatusRequest,
    events: Option<Streaming<pb::StatusEvent>>,
    view: View,
    /// Why the hub is out of reach, while it is.
    lost: Option<Status>,
    pause: Duration,
}

impl Watch {
    /// A watch of `request`, opened at the first `next`.
    pub(super) fn new(client: &Client, request: pb::WatchStatusRequest) -> Watch {
        Watch {
            client: client.clone(),
            request,
            events: None,
            view: View::default(),
            lost: None,
            pause: Duration::ZERO,
        }
    }

    /// What the watch has shown (whole once [`Followed::Changed`] said so).
    pub(super) fn view(&self) -> &View {
        &self.view
    }

    /// The next event, applied to the view, or word that the hub went
    /// away (once per absence).
    /// While it is away, the watch is reopened at once, then after a pause
    /// that doubles from `FIRST_RETRY` up to `LAST_RETRY` until it answers
    /// (the pauses start over once a snapshot is complete). An error that retrying
    /// cannot mend (no such unit, a credential revoked) ends the watch.
    pub(super) async fn next(&mut self) -> Result<Followed, Status> {
        loop {
            let events = match &mut self.events {
                Some(events) => events,
                None => {
                    tokio::time::sleep(self.pause).await;
                    self.pause = (self.pause * 2).clamp(FIRST_RETRY, LAST_RETRY);
                    match self.client.watch_status(self.request.clone()).await {
                        Ok(r) => {
                            self.lost = None;
                            self.events.insert(r.into_inner())
                        }
                        Err(e) if fatal(&e) => return Err(e),
                        Err(e) => {
                            if self.lost.replace(e.clone()).is_none() {
                                return Ok(Followed::Lost(e));
                            }
                            continue;
                        }
                    }
                }
            };
            let why = match events.message().await {
                Ok(Some(ev)) => {
                    if ev.snapshot_complete {
                        self.pause = Duration::ZERO;
                    }
                    let whole = self.view.apply(ev);
                    return Ok(Followed::Changed { whole });
                }
                Ok(None) => Status::unavailable("the hub ended the watch"),
                Err(e) if fatal(&e) => return Err(e),
                Err(e) => e,
            };
            self.events = None;
            self.view.lost();
            if self.lost.replace(why.clone()).is_none() {
                return Ok(Followed::Lost(why));
            }
        }
    }

    /// Why the hub is out of reach, while it is.
    pub(super) fn lost(&self) -> Option<&Status> {
        self.lost.as_ref()
    }
}

/// Whether the hub refused the watch (retrying cannot mend it), rather
/// than went away: a shutdown, a refused, reset or timed-out connection,
/// a stream cut by a proxy (`UNAVAILABLE`, `UNKNOWN`, `CANCELLED`,
/// `INTERNAL` …) are retried, and the caller's timeout bounds them.
fn fatal(e: &Status) -> bool {
    matches!(
        e.code(),
        Code::InvalidArgument
            | Code::NotFound
            | Code::PermissionDenied
            | Code::Unauthenticated
            | Code::FailedPrecondition
            | Code::OutOfRange
            | Code::Unimplemented
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cell(cluster: &str, seconds: i64, phase: pb::Phase) -> pb::ClusterUnitStatus {
        pb::ClusterUnitStatus {
            unit: "dev/web".into(),
            cluster: cluster.into(),
            revision: 2,
            acked_revision: 2,
            phase: phase.into(),
            updated_at: Some(prost_types::Timestamp { seconds, nanos: 0 }),
            ..Default::default()
        }
    }

    fn snapshot(complete: bool, cells: Vec<pb::ClusterUnitStatus>) -> pb::StatusEvent {
        pb::StatusEvent {
            snapshot: true,
            snapshot_complete: complete,
            cells,
            ..Default::default()
        }
    }

    fn change(cells: Vec<pb::ClusterUnitStatus>) -> pb::StatusEvent {
        pb::StatusEvent {
            cells,
            ..Default::default()
        }
    }

    fn phase_of(view: &View, cluster: &str) -> Option<i32> {
        view.cell("dev/web", cluster).map(|c| c.phase)
    }

    #[test]
    fn a_change_older_than_the_snapshot_does_not_undo_it() {
        let mut view = View::default();
        assert!(view.apply(snapshot(true, vec![cell("a", 20, pb::Phase::Ready)])));
        // Recorded at 10, broadcast after the snapshot read the state at 20.
        view.apply(change(vec![cell("a", 10, pb::Phase::Degraded)]));
        assert_eq!(phase_of(&view, "a"), Some(pb::Phase::Ready.into()));
        // A newer one replaces it.
        view.apply(change(vec![cell("a", 30, pb::Phase::Degraded)]));
        assert_eq!(phase_of(&view, "a"), Some(pb::Phase::Degraded.into()));
    }

    #[test]
    fn a_fresh_snapshot_replaces_the_view_once_complete() {
        let mut view = View::default();
        assert!(!view.apply(snapshot(false, vec![cell("a", 20, pb::Phase::Ready)])));
        assert!(view.apply(snapshot(true, vec![cell("b", 20, pb::Phase::Ready)])));
        assert!(view.apply(change(vec![cell("b", 30, pb::Phase::Progressing)])));
        // The hub starts over (after a restart, say): its first page
        // replaces everything, and the view is not whole until the last.
        assert!(!view.apply(snapshot(false, vec![cell("b", 5, pb::Phase::Ready)])));
        assert_eq!(phase_of(&view, "a"), None);
        assert_eq!(phase_of(&view, "b"), Some(pb::Phase::Ready.into()));
        assert!(view.apply(snapshot(true, vec![])));
        // Cut in the middle of a snapshot: the reopened watch's snapshot
        // replaces the pages that came.
        assert!(!view.apply(snapshot(false, vec![cell("a", 40, pb::Phase::Ready)])));
        view.lost();
        assert!(view.apply(snapshot(true, vec![cell("b", 40, pb::Phase::Ready)])));
        assert_eq!(phase_of(&view, "a"), None);
    }
}
