//! [`Hub`] among replicas sharing a PostgreSQL store: what the others
//! announce. Their commits are offered to this hub's agents; their agents'
//! statuses and their clusters created or deleted reach this hub's
//! watchers (`--wait`, `status --watch`, the dashboard, the ConfigHub
//! worker's waits), which would otherwise hear only of agents connected
//! here.

use std::sync::Arc;

use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use super::Hub;
use crate::events::HubEvent;
use crate::model::{ClusterName, StatusReport, UnitRef};
use crate::store::{Announcement, AnnouncementStream};

/// Announcements handled together: the statuses among them are read in
/// one batch.
const BATCH: usize = 1_024;

impl Hub {
    /// Follows the other replicas' announcements until `stop`.
    pub async fn follow_replicas(
        self: Arc<Self>,
        announcements: AnnouncementStream,
        stop: CancellationToken,
    ) {
        let mut batches = announcements.ready_chunks(BATCH);
        loop {
            let batch = tokio::select! {
                () = stop.cancelled() => return,
                b = batches.next() => match b {
                    Some(b) => b,
                    None => return,
                },
            };
            let mut statuses = Vec::new();
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
                }
            }
            self.replicas_statuses(statuses).await;
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
