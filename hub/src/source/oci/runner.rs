//! Syncs every OCI source: on its interval, when an operator asks (`source
//! sync`), or when ConfigHub announces a release of the space it follows.
//! One replica of a shared store runs them (the store's leader). A sync
//! resolves the reference; an unchanged digest commits nothing; a new one
//! is pulled, verified, unpacked under limits, mapped to units and
//! committed as one release set. What happened is recorded on the source.

use std::collections::{BTreeSet, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::ArtifactLimits;
use super::fetch::Registry;
use crate::control::Hub;
use crate::metrics::{SourceLabel, SourceLabels};
use crate::model::{OciSource, SourceName, SourceStatus, UnixMillis};

/// How many sources sync at once.
const PARALLEL: usize = 4;
/// How often the runner re-reads the sources without a wake-up (changes
/// made through another replica).
const RESCAN: Duration = Duration::from_secs(2);

/// The OCI source runner of one hub.
pub struct Runner {
    hub: Arc<Hub>,
    limits: ArtifactLimits,
    /// Sources to sync at once (a ConfigHub release announcement).
    hinted: Mutex<BTreeSet<SourceName>>,
}

/// What a successful sync did.
struct Synced {
    digest: String,
    revision: String,
    result: String,
    units: Vec<String>,
    committed: bool,
}

impl Runner {
    pub fn new(hub: Arc<Hub>, limits: ArtifactLimits) -> Arc<Runner> {
        Arc::new(Runner {
            hub,
            limits,
            hinted: Mutex::default(),
        })
    }

    fn lock_hinted(&self) -> std::sync::MutexGuard<'_, BTreeSet<SourceName>> {
        self.hinted
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// ConfigHub published a release of `space`: sync the sources that
    /// follow it (`…/space/<space>` repositories) now. A hint only: the
    /// digest check decides.
    pub async fn release_published(&self, space: &str) {
        let suffix = format!("/space/{space}");
        let Ok(sources) = self.hub.list_sources().await else {
            return;
        };
        let mut hinted = false;
        for s in sources.iter().filter(|s| s.spec.url.ends_with(&suffix)) {
            tracing::info!(source = %s.name, %space, "ConfigHub published a release; syncing");
            self.lock_hinted().insert(s.name.clone());
            hinted = true;
        }
        if hinted {
            self.hub.source_wakeup().notify_one();
        }
    }

    /// Runs until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut running: JoinSet<SourceName> = JoinSet::new();
        let mut busy: HashSet<SourceName> = HashSet::new();
        loop {
            let mut wait = RESCAN;
            if self.hub.is_leader().await {
                let sources = self.hub.list_sources().await.unwrap_or_default();
                let now = UnixMillis::now();
                for s in sources {
                    let hinted = self.lock_hinted().remove(&s.name);
                    if busy.contains(&s.name) || s.suspended {
                        continue;
                    }
                    if hinted || s.due(now) {
                        if busy.len() >= PARALLEL {
                            if hinted {
                                self.lock_hinted().insert(s.name.clone());
                            }
                            continue;
                        }
                        busy.insert(s.name.clone());
                        let this = self.clone();
                        running.spawn(async move {
                            let name = s.name.clone();
                            this.sync(s).await;
                            name
                        });
                    } else if let Some(next) = s.status.next_check {
                        let ms = u64::try_from(next.0 - now.0).unwrap_or(0);
                        wait = wait.min(Duration::from_millis(ms.max(50)));
                    }
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = self.hub.source_wakeup().notified() => {}
                () = tokio::time::sleep(wait) => {}
                Some(done) = running.join_next(), if !running.is_empty() => {
                    if let Ok(name) = done {
                        busy.remove(&name);
                    }
                }
            }
            while let Some(done) = running.try_join_next() {
                if let Ok(name) = done {
                    busy.remove(&name);
                }
            }
        }
        running.shutdown().await;
    }

    /// One sync of one source; its status records the outcome.
    async fn sync(&self, s: OciSource) {
        let started = UnixMillis::now();
        let prune = s.allow_prune;
        let outcome = self.attempt(&s).await;
        let mut status = SourceStatus {
            last_attempt: Some(started),
            next_check: Some(UnixMillis(
                started.0
                    + i64::try_from(s.spec.interval_seconds.saturating_mul(1000))
                        .unwrap_or(i64::MAX / 2),
            )),
            ..s.status.clone()
        };
        let label = |result: &str| SourceLabels {
            source: s.name.to_string(),
            result: result.to_owned(),
        };
        let mut prune_used = false;
        match outcome {
            Ok(done) => {
                status.last_success = Some(UnixMillis::now());
                status.last_error.clear();
                status.last_digest = done.digest;
                status.last_revision = done.revision;
                status.last_result = done.result;
                status.units = done.units;
                prune_used = prune && done.committed;
                let result = if done.committed {
                    "committed"
                } else {
                    "unchanged"
                };
                self.hub
                    .metrics
                    .source_syncs
                    .get_or_create(&label(result))
                    .inc();
                let l = SourceLabel {
                    source: s.name.to_string(),
                };
                self.hub
                    .metrics
                    .source_last_success
                    .get_or_create(&l)
                    .set(UnixMillis::now().0 / 1000);
                self.hub
                    .metrics
                    .source_units
                    .get_or_create(&l)
                    .set(i64::try_from(status.units.len()).unwrap_or(i64::MAX));
            }
            Err(e) => {
                tracing::warn!(source = %s.name, error = %e, "source sync failed");
                status.last_error = e;
                status.last_result = "failed; nothing changed".into();
                self.hub
                    .metrics
                    .source_syncs
                    .get_or_create(&label("failed"))
                    .inc();
            }
        }
        if let Err(e) = self
            .hub
            .record_source_status(&s.name, &status, prune_used)
            .await
        {
            tracing::warn!(source = %s.name, error = %e, "cannot record the source's status");
        }
    }

    async fn attempt(&self, s: &OciSource) -> Result<Synced, String> {
        let auth = self
            .hub
            .source_auth(&s.name)
            .await
            .map_err(|e| format!("reading the credentials: {e}"))?;
        let registry = Registry::new(&s.spec, &auth)?;
        let now = registry.resolve(&s.spec.reference).await?;
        if now.digest == s.status.last_digest {
            return Ok(Synced {
                result: format!("unchanged at {}", now.revision),
                digest: now.digest,
                revision: now.revision,
                units: s.status.units.clone(),
                committed: false,
            });
        }
        let artifact = registry
            .fetch(&now.digest, &s.spec.layer_media_type, &self.limits)
            .await?;
        let limits = self.limits.clone();
        let files =
            tokio::task::spawn_blocking(move || super::extract::extract(&artifact.layer, &limits))
                .await
                .map_err(|e| format!("unpacking: {e}"))??;
        let units = super::mapping::units(s.spec.mode, &s.name, &now.revision, &files)?;
        let names: Vec<String> = units.iter().map(|u| u.name.to_string()).collect();
        let message = format!("{} {}", s.name.owner(), now.revision);
        let outcome = self
            .hub
            .commit_source_release(s, units, &message, s.allow_prune)
            .await
            .map_err(|e| e.to_string())?;
        tracing::info!(
            source = %s.name,
            revision = %now.revision,
            committed = outcome.committed.len(),
            unchanged = outcome.unchanged,
            destroyed = outcome.destroyed.len(),
            "source synced"
        );
        Ok(Synced {
            result: format!(
                "{}: {} new revision(s), {} unchanged, {} destroyed",
                now.revision,
                outcome.committed.len() - outcome.destroyed.len(),
                outcome.unchanged,
                outcome.destroyed.len()
            ),
            digest: now.digest,
            revision: now.revision,
            units: names,
            committed: !outcome.committed.is_empty(),
        })
    }
}
