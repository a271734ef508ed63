//! What happens in the hub, as it happens: statuses recorded, revisions
//! committed, agent sessions opening and closing. Watchers (`WatchStatus`,
//! the ConfigHub worker's waits) subscribe instead of polling. A hint
//! stream: a watcher that lags re-reads the store, which stays the truth.

use std::sync::Arc;

use tokio::sync::broadcast;

use crate::model::{ClusterName, EnvName, StatusReport, UnitRef};

/// One thing that happened.
#[derive(Clone, Debug)]
pub enum HubEvent {
    /// Statuses just written to the store (one flush chunk; one older
    /// than the recorded one is not written, and watchers keep the newer),
    /// or read from it after another replica announced them.
    Statuses(Arc<Vec<StatusReport>>),
    /// A revision committed (here, or by another replica of the store).
    Committed(UnitRef),
    /// An agent session opened or closed (here, or on another replica).
    Session { cluster: ClusterName, env: EnvName },
    /// A cluster was created in `env` or deleted from it (here or by
    /// another replica), or announcements were missed: watchers of `env`
    /// start over from the store.
    Clusters { env: EnvName },
}

impl HubEvent {
    /// Whether the event concerns `unit` (a status, a commit of it).
    pub fn touches(&self, unit: &UnitRef) -> bool {
        match self {
            HubEvent::Statuses(s) => s.iter().any(|r| r.unit == *unit),
            HubEvent::Committed(u) => u == unit,
            HubEvent::Session { env, .. } | HubEvent::Clusters { env } => *env == unit.env,
        }
    }
}

/// The hub's event bus (cheap to clone).
#[derive(Clone)]
pub struct Events(broadcast::Sender<HubEvent>);

impl Default for Events {
    fn default() -> Self {
        Events(broadcast::channel(4096).0)
    }
}

impl Events {
    pub fn send(&self, e: HubEvent) {
        // Nobody listening is fine.
        let _ = self.0.send(e);
    }

    pub fn subscribe(&self) -> broadcast::Receiver<HubEvent> {
        self.0.subscribe()
    }
}
