//! Watching applied objects: one kube-runtime watcher per served type the
//! agent has applied, filtered on the `app.kubernetes.io/managed-by=unitsync`
//! label, wakes the owning unit's worker whenever one of its objects
//! changes or disappears, so drift is found within moments instead of at the
//! next periodic check (which stays as a safety net).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use kube::api::{Api, DynamicObject};
use kube::core::ApiResource;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::manifest::{LABEL_MANAGED_BY, LABEL_UNIT};

pub struct DriftWatch {
    client: kube::Client,
    watched: Mutex<HashSet<(String, String, String)>>,
    wakers: Arc<Mutex<HashMap<String, Arc<Notify>>>>,
    shutdown: CancellationToken,
}

impl DriftWatch {
    pub fn new(client: kube::Client, shutdown: CancellationToken) -> DriftWatch {
        DriftWatch {
            client,
            watched: Mutex::default(),
            wakers: Arc::default(),
            shutdown,
        }
    }

    /// The notifier a unit's worker waits on.
    pub fn waker(&self, unit: &str) -> Arc<Notify> {
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
        let stop = self.shutdown.clone();
        let kind = ar.kind.clone();
        tokio::spawn(async move {
            let stream = watcher::watcher(api, config).default_backoff();
            let mut stream = std::pin::pin!(stream);
            loop {
                let ev = tokio::select! {
                    () = stop.cancelled() => return,
                    ev = stream.next() => ev,
                };
                let obj = match ev {
                    None => return,
                    Some(Ok(Event::Apply(o) | Event::Delete(o))) => o,
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
                    w.notify_one();
                }
            }
        });
    }
}
