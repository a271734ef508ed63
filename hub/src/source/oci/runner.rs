//! Syncs every OCI source: on its interval, when an operator asks (`source
//! sync`), or when ConfigHub announces a release of the space it follows.
//! One replica of a shared store runs them (the store's leader). A sync
//! resolves the reference; an unchanged digest commits nothing; a new one
//! is pulled, verified, unpacked under limits, mapped to units and
//! committed as one release set. What happened is recorded on the source.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::ArtifactLimits;
use super::fetch::Registry;
use crate::control::{Hub, ReleaseUnit};
use crate::metrics::{SourceLabel, SourceLabels};
use crate::model::{Digest, OciAuth, OciSource, OciSpec, SourceName, SourceStatus, UnixMillis};

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
    /// Registry clients by source, kept across syncs (their connections
    /// and tokens) while the source's address, TLS settings and credentials
    /// stay the same (compared by a hash: no secret is kept twice).
    registries: Mutex<HashMap<SourceName, (Digest, Arc<Registry>)>>,
}

/// What a successful sync did.
struct Synced {
    digest: String,
    revision: String,
    result: String,
    units: Vec<String>,
    committed: bool,
    /// The artifact's `org.opencontainers.image.*` annotations.
    metadata: std::collections::BTreeMap<String, String>,
}

impl Runner {
    pub fn new(hub: Arc<Hub>, limits: ArtifactLimits) -> Arc<Runner> {
        Arc::new(Runner {
            hub,
            limits,
            hinted: Mutex::default(),
            registries: Mutex::default(),
        })
    }

    /// The source's registry client: the one from its last sync, unless
    /// how to reach the registry changed.
    fn registry(&self, s: &OciSource, auth: &OciAuth) -> Result<Arc<Registry>, String> {
        let key = connection_key(&s.spec, auth);
        let mut cache = self
            .registries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((k, r)) = cache.get(&s.name)
            && *k == key
        {
            return Ok(r.clone());
        }
        let r = Arc::new(Registry::new(&s.spec, auth)?);
        cache.insert(s.name.clone(), (key, r.clone()));
        Ok(r)
    }

    /// Drops the clients of sources that are gone.
    fn keep_registries(&self, sources: &[OciSource]) {
        let names: BTreeSet<&SourceName> = sources.iter().map(|s| &s.name).collect();
        self.registries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .retain(|name, _| names.contains(name));
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
        let mut running: JoinSet<()> = JoinSet::new();
        // Syncs in flight, by task (a panicking one is found by its id).
        let mut busy: HashMap<tokio::task::Id, SourceName> = HashMap::new();
        loop {
            let mut wait = RESCAN;
            if self.hub.is_leader().await {
                let sources = self.hub.list_sources().await.unwrap_or_default();
                self.keep_registries(&sources);
                let now = UnixMillis::now();
                for s in sources {
                    if s.suspended {
                        self.lock_hinted().remove(&s.name);
                        continue;
                    }
                    // A hint for a source syncing now stays for afterwards.
                    if busy.values().any(|n| *n == s.name) {
                        continue;
                    }
                    let hinted = self.lock_hinted().remove(&s.name);
                    if hinted || s.due(now) {
                        if busy.len() >= PARALLEL {
                            if hinted {
                                self.lock_hinted().insert(s.name.clone());
                            }
                            continue;
                        }
                        let this = self.clone();
                        let name = s.name.clone();
                        let task = running.spawn(async move { this.sync(s).await });
                        busy.insert(task.id(), name);
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
                Some(done) = running.join_next_with_id(), if !running.is_empty() => {
                    Self::finished(&mut busy, done);
                }
            }
            while let Some(done) = running.try_join_next_with_id() {
                Self::finished(&mut busy, done);
            }
        }
        running.shutdown().await;
    }

    fn finished(
        busy: &mut HashMap<tokio::task::Id, SourceName>,
        done: Result<(tokio::task::Id, ()), tokio::task::JoinError>,
    ) {
        let id = match done {
            Ok((id, ())) => id,
            Err(e) => {
                if let Some(name) = busy.get(&e.id()) {
                    tracing::error!(source = %name, error = %e, "a source sync panicked");
                }
                e.id()
            }
        };
        busy.remove(&id);
    }

    /// One sync of one source; its status records the outcome.
    async fn sync(&self, s: OciSource) {
        let started = UnixMillis::now();
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
        // A permission to prune is for the next sync, whatever it finds.
        let prune_used = s.allow_prune;
        match outcome {
            Ok(done) => {
                status.last_success = Some(UnixMillis::now());
                status.last_error.clear();
                status.last_digest = done.digest;
                status.last_revision = done.revision;
                status.last_result = done.result;
                status.units = done.units;
                status.metadata = done.metadata;
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

    /// Fetches the artifact (within the fetch timeout: a registry that
    /// stalls stops the sync, nothing changed) and commits its units (never
    /// cut short: a commit under way finishes, and the status says what
    /// it did).
    async fn attempt(&self, s: &OciSource) -> Result<Synced, String> {
        let limit = self.hub.tuning.source_fetch_timeout;
        let fetched = tokio::time::timeout(limit, self.fetch(s))
            .await
            .map_err(|_| {
                format!(
                    "reaching the registry and unpacking took longer than {}; stopped",
                    humantime::format_duration(limit)
                )
            })??;
        let (now, units, metadata) = match fetched {
            Fetched::Unchanged(synced) => return Ok(synced),
            Fetched::New {
                now,
                units,
                metadata,
            } => (now, units, metadata),
        };
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
            metadata,
        })
    }

    /// Resolves the reference; when it names a new artifact, pulls and
    /// unpacks it into units.
    async fn fetch(&self, s: &OciSource) -> Result<Fetched, String> {
        let auth = self
            .hub
            .source_auth(&s.name)
            .await
            .map_err(|e| format!("reading the credentials: {e}"))?;
        let registry = self.registry(s, &auth)?;
        let now = registry.resolve(&s.spec.reference).await?;
        if now.digest == s.status.last_digest {
            return Ok(Fetched::Unchanged(Synced {
                result: format!("unchanged at {}", now.revision),
                digest: now.digest,
                revision: now.revision,
                units: s.status.units.clone(),
                committed: false,
                metadata: s.status.metadata.clone(),
            }));
        }
        let artifact = registry
            .fetch(&now.digest, &s.spec.layer_media_type, &self.limits)
            .await?;
        let metadata = artifact
            .annotations
            .iter()
            .filter(|(k, _)| {
                k.starts_with("org.opencontainers.image.") || k.starts_with("com.confighub.")
            })
            .map(|(k, v)| (k.clone(), v.chars().take(256).collect()))
            .collect();
        let limits = self.limits.clone();
        let files =
            tokio::task::spawn_blocking(move || super::extract::extract(&artifact.layer, &limits))
                .await
                .map_err(|e| format!("unpacking: {e}"))??;
        let units = super::mapping::units(s.spec.mode, &s.name, &now.revision, &files)?;
        Ok(Fetched::New {
            now,
            units,
            metadata,
        })
    }
}

/// What a fetch found.
enum Fetched {
    /// The artifact committed last: nothing to do.
    Unchanged(Synced),
    /// A new artifact, unpacked into units.
    New {
        now: super::fetch::Resolved,
        units: Vec<ReleaseUnit>,
        metadata: BTreeMap<String, String>,
    },
}

/// What a registry client depends on, hashed: the address, the TLS
/// settings and the credentials.
fn connection_key(spec: &OciSpec, auth: &OciAuth) -> Digest {
    let auth = match auth {
        OciAuth::Anonymous => String::new(),
        OciAuth::Basic { username, password } => {
            format!("basic\0{username}\0{}", password.expose())
        }
        OciAuth::Bearer { token } => format!("bearer\0{}", token.expose()),
    };
    let key = format!(
        "{}\0{}\0{}\0{auth}",
        spec.url,
        spec.ca_pem,
        spec.insecure_hosts.join(",")
    );
    Digest::of(key.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Secret;
    use crate::model::{OciRef, SourceMode};

    fn spec() -> OciSpec {
        OciSpec {
            url: "oci://registry.example:5000/team/app".into(),
            reference: OciRef::Tag("latest".into()),
            interval_seconds: 60,
            mode: SourceMode::Artifact,
            layer_media_type: String::new(),
            insecure_hosts: vec![],
            ca_pem: String::new(),
        }
    }

    fn basic(password: &str) -> OciAuth {
        OciAuth::Basic {
            username: "ci".into(),
            password: Secret::from_string(password.into()),
        }
    }

    #[test]
    fn a_registry_client_is_kept_until_how_to_reach_the_registry_changes() {
        let key = connection_key(&spec(), &basic("one"));
        // Another tag or interval: the same client serves it.
        let retagged = OciSpec {
            reference: OciRef::Semver("^1".into()),
            interval_seconds: 5,
            ..spec()
        };
        assert_eq!(connection_key(&retagged, &basic("one")), key);
        // A rotated password, another CA, a plain-HTTP host, another
        // registry: a new client.
        assert_ne!(connection_key(&spec(), &basic("two")), key);
        let with_ca = OciSpec {
            ca_pem: "-----BEGIN CERTIFICATE-----".into(),
            ..spec()
        };
        assert_ne!(connection_key(&with_ca, &basic("one")), key);
        let plain = OciSpec {
            insecure_hosts: vec!["registry.example:5000".into()],
            ..spec()
        };
        assert_ne!(connection_key(&plain, &basic("one")), key);
        let moved = OciSpec {
            url: "oci://other.example/team/app".into(),
            ..spec()
        };
        assert_ne!(connection_key(&moved, &basic("one")), key);
        assert_ne!(connection_key(&spec(), &OciAuth::Anonymous), key);
    }
}
