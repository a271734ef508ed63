//! `WatchStatus`: the matrix (in pages), then its changes as the hub's
//! events announce them. A watcher that falls behind, or whose
//! environment gained or lost a cluster, gets a fresh snapshot (its first
//! page says so: `snapshot` set; the watcher replaces what it holds); one
//! that leaves ends its task at once; when the hub shuts down, every watch
//! ends with `UNAVAILABLE` (an open stream would hold the listener's
//! graceful drain).

use std::sync::Arc;

use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::Status;
use unitsync_proto::v1 as pb;

use super::convert;
use crate::control::Hub;
use crate::error::Result;
use crate::events::HubEvent;
use crate::model::{EnvName, UnitRef};
use crate::store::Page;

/// Cells per snapshot page.
const PAGE: u32 = 1_000;

type Tx = mpsc::Sender<std::result::Result<pb::StatusEvent, Status>>;

/// What a watcher follows.
#[derive(Clone)]
pub(super) struct Scope {
    pub env: Option<EnvName>,
    pub unit: Option<UnitRef>,
}

impl Scope {
    fn env_matches(&self, env: &EnvName) -> bool {
        self.env.as_ref().is_none_or(|e| e == env)
    }

    fn unit_matches(&self, unit: &UnitRef) -> bool {
        self.env_matches(&unit.env) && self.unit.as_ref().is_none_or(|u| u == unit)
    }
}

/// Streams the scope's matrix, then its changes, into `tx` until the
/// watcher leaves or the hub `stop`s.
pub(super) async fn run(hub: Arc<Hub>, scope: Scope, tx: Tx, stop: CancellationToken) {
    tokio::select! {
        () = follow(&hub, &scope, &tx) => {}
        () = stop.cancelled() => {
            let _ = tx
                .send(Err(Status::unavailable("the hub is shutting down")))
                .await;
        }
    }
}

async fn follow(hub: &Hub, scope: &Scope, tx: &Tx) {
    loop {
        // Subscribe before reading: nothing falls between the two.
        let mut events = hub.subscribe();
        match snapshot(hub, scope, tx).await {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                let _ = tx.send(Err(e.into())).await;
                return;
            }
        }
        loop {
            let event = tokio::select! {
                () = tx.closed() => return,
                e = events.recv() => e,
            };
            match event {
                Ok(e) => match change(hub, scope, &e).await {
                    Ok(Change::Event(ev)) => {
                        if tx.send(Ok(ev)).await.is_err() {
                            return;
                        }
                    }
                    Ok(Change::None) => {}
                    // The set of clusters changed: start over from the
                    // store (the watcher replaces what it holds).
                    Ok(Change::Clusters) => break,
                    Err(e) => {
                        let _ = tx.send(Err(e.into())).await;
                        return;
                    }
                },
                // Fell behind: start over from the store.
                Err(RecvError::Lagged(_)) => break,
                Err(RecvError::Closed) => return,
            }
        }
    }
}

/// Sends the current state in pages; false when the watcher left.
async fn snapshot(hub: &Hub, scope: &Scope, tx: &Tx) -> Result<bool> {
    let mut page = Page {
        after: None,
        limit: PAGE,
    };
    loop {
        let v = hub
            .status_of(scope.env.as_ref(), scope.unit.as_ref(), &page)
            .await?;
        let last = v.next.is_none();
        let (units, clusters, cells) = convert::status_view(&v);
        let ev = pb::StatusEvent {
            snapshot: true,
            snapshot_complete: last,
            units,
            clusters,
            cells,
        };
        if tx.send(Ok(ev)).await.is_err() {
            return Ok(false);
        }
        match v.next {
            Some(next) => page = next,
            None => return Ok(true),
        }
    }
}

/// What an event changes for a watcher.
enum Change {
    None,
    Event(pb::StatusEvent),
    /// Clusters came or went: a fresh snapshot says which are left.
    Clusters,
}

/// The change an event makes to the scope.
async fn change(hub: &Hub, scope: &Scope, e: &HubEvent) -> Result<Change> {
    let mut ev = pb::StatusEvent::default();
    match e {
        HubEvent::Statuses(reports) => {
            ev.cells = reports
                .iter()
                .filter(|r| scope.unit_matches(&r.unit))
                .map(|r| pb::ClusterUnitStatus {
                    cluster: r.cluster.to_string(),
                    unit: r.unit.to_string(),
                    // A status for a revision means it was received.
                    acked_revision: r.revision.0,
                    revision: r.revision.0,
                    phase: convert::phase_to_pb(r.phase).into(),
                    message: r.message.clone(),
                    resources: r.resources.iter().map(convert::resource_to_pb).collect(),
                    updated_at: convert::timestamp(r.observed_at),
                    // As the snapshot says it: a session here or on
                    // another replica.
                    connected: hub.is_connected(&r.cluster),
                })
                .collect();
        }
        HubEvent::Committed(unit) if scope.unit_matches(unit) => {
            if let Some(u) = hub.store.get_unit(unit).await? {
                ev.units.push(convert::unit(&u.masked()));
            }
        }
        HubEvent::Session { cluster, env, .. } if scope.env_matches(env) => {
            // The registry is the truth (a replaced session ends after its
            // successor started); a deleted cluster's session ends after
            // it is gone, and its `Clusters` event follows.
            match hub.get_cluster(cluster).await {
                Ok((c, session)) => ev.clusters.push(convert::cluster(&c, session.as_ref())),
                Err(crate::error::HubError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        HubEvent::Clusters { env } if scope.env_matches(env) => return Ok(Change::Clusters),
        _ => {}
    }
    let empty = ev.cells.is_empty() && ev.units.is_empty() && ev.clusters.is_empty();
    Ok(if empty {
        Change::None
    } else {
        Change::Event(ev)
    })
}
