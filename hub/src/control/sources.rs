//! [`Hub`] operations on OCI sources: what operators do (create, list,
//! suspend, delete, sync now) and what the source runner does (read the
//! credentials, record status, commit a release atomically). Like every
//! other edge, the runner reaches the store only through these.

use std::collections::BTreeSet;
use std::sync::Arc;

use super::Hub;
use crate::error::{HubError, Result};
use crate::model::{
    Actor, NewAudit, NewRevision, OciAuth, OciSource, Revision, RevisionNum, SourceName,
    SourceStatus, UnitName, UnitRef, UnixMillis,
};

/// One unit of a release, as a source read it.
#[derive(Clone, Debug)]
pub struct ReleaseUnit {
    pub name: UnitName,
    pub manifests: String,
    /// Where this unit's content came from (provenance).
    pub origin: String,
}

/// What committing a release did.
#[derive(Clone, Debug, Default)]
pub struct ReleaseOutcome {
    /// New revisions (content and tombstones), committed together.
    pub committed: Vec<Revision>,
    /// Units whose content was already the head.
    pub unchanged: usize,
    /// Units destroyed because they left the release.
    pub destroyed: Vec<UnitRef>,
}

impl Hub {
    fn source_not_found(name: &SourceName) -> HubError {
        HubError::NotFound(format!("source {name}"))
    }

    /// Creates a source (validated once, here).
    pub async fn create_source(
        &self,
        actor: Actor,
        source: OciSource,
        auth: OciAuth,
    ) -> Result<OciSource> {
        source
            .spec
            .validate()
            .map_err(|e| HubError::InvalidArgument(format!("source {}: {e}", source.name)))?;
        let audit = NewAudit {
            actor,
            action: "source.create",
            target: format!("source/{}", source.name),
            detail: format!(
                "{} {} mode {} into {} every {}s (credentials: {})",
                source.spec.url,
                source.spec.reference,
                source.spec.mode.as_str(),
                source.env,
                source.spec.interval_seconds,
                auth.kind()
            ),
        };
        self.store.create_source(&source, &auth, audit).await?;
        self.sources_changed.notify_one();
        self.get_source(&source.name).await
    }

    pub async fn list_sources(&self) -> Result<Vec<OciSource>> {
        Ok(self.store.list_sources().await?)
    }

    pub async fn get_source(&self, name: &SourceName) -> Result<OciSource> {
        self.store
            .get_source(name)
            .await?
            .ok_or_else(|| Self::source_not_found(name))
    }

    /// Suspends (no syncs) or resumes a source.
    pub async fn set_source_suspended(
        &self,
        actor: Actor,
        name: &SourceName,
        suspended: bool,
    ) -> Result<OciSource> {
        let audit = NewAudit {
            actor,
            action: if suspended {
                "source.suspend"
            } else {
                "source.resume"
            },
            target: format!("source/{name}"),
            detail: String::new(),
        };
        self.store
            .set_source_suspended(name, suspended, audit)
            .await?;
        self.sources_changed.notify_one();
        self.get_source(name).await
    }

    /// Deletes a source. Its units stay where they run and become the
    /// hub's (`unit destroy` removes them).
    pub async fn delete_source(&self, actor: Actor, name: &SourceName) -> Result<()> {
        let audit = NewAudit {
            actor,
            action: "source.delete",
            target: format!("source/{name}"),
            detail: "its units stay, owned by the hub".into(),
        };
        self.store.delete_source(name, audit).await?;
        self.sources_changed.notify_one();
        Ok(())
    }

    /// Asks for a sync now; returns when it was asked (a sync that
    /// started at or after it answers the request).
    pub async fn sync_source(
        &self,
        actor: Actor,
        name: &SourceName,
        allow_prune: bool,
    ) -> Result<UnixMillis> {
        let at = UnixMillis::now();
        let audit = NewAudit {
            actor,
            action: "source.sync",
            target: format!("source/{name}"),
            detail: if allow_prune {
                "may destroy more than half of its units".into()
            } else {
                String::new()
            },
        };
        self.store
            .request_source_sync(name, at, allow_prune, audit)
            .await?;
        self.sources_changed.notify_one();
        Ok(at)
    }

    /// Wakes the source runner of this hub (a hint: the store is the
    /// truth).
    pub fn source_wakeup(&self) -> &tokio::sync::Notify {
        &self.sources_changed
    }

    /// A small durable fact of the hub (the ConfigHub event cursor).
    pub async fn hub_state(&self, key: &str) -> Result<Option<String>> {
        Ok(self.store.get_state(key).await?)
    }

    pub async fn set_hub_state(&self, key: &str, value: &str) -> Result<()> {
        Ok(self.store.put_state(key, value).await?)
    }

    /// The registry credentials (the source runner only).
    pub async fn source_auth(&self, name: &SourceName) -> Result<OciAuth> {
        Ok(self.store.source_auth(name).await?)
    }

    pub async fn record_source_status(
        &self,
        name: &SourceName,
        status: &SourceStatus,
        prune_used: bool,
    ) -> Result<()> {
        Ok(self
            .store
            .set_source_status(name, status, prune_used)
            .await?)
    }

    /// Commits a release of a source atomically: every unit of it with new
    /// content, and a tombstone for every unit of the source that left it,
    /// all new revisions or none. A release that would destroy more than
    /// half of the source's units is refused unless `allow_prune`.
    pub async fn commit_source_release(
        &self,
        source: &OciSource,
        units: Vec<ReleaseUnit>,
        message: &str,
        allow_prune: bool,
    ) -> Result<ReleaseOutcome> {
        let owner = source.name.owner();
        let actor = Actor::Source(owner.clone());
        let mut names = BTreeSet::new();
        let mut revs = Vec::new();
        let mut outcome = ReleaseOutcome::default();
        for u in units {
            let unit = UnitRef {
                env: source.env.clone(),
                name: u.name.clone(),
            };
            if !names.insert(u.name.clone()) {
                return Err(HubError::InvalidArgument(format!(
                    "source {}: the release holds unit {} twice",
                    source.name, u.name
                )));
            }
            let (valid, text) = self
                .validate(&unit, u.manifests)
                .await
                .map_err(|e| HubError::InvalidArgument(format!("source {}: {e}", source.name)))?;
            let existing = self.store.get_unit(&unit).await?;
            if let Some(e) = &existing
                && e.source != owner
            {
                let by = if e.source.is_empty() {
                    "the hub".to_owned()
                } else {
                    e.source.clone()
                };
                return Err(HubError::FailedPrecondition(format!(
                    "source {}: unit {unit} belongs to {by}; the release changes nothing",
                    source.name
                )));
            }
            let head = match &existing {
                Some(e) if !e.destroyed => self.store.get_revision(&unit, e.head).await?,
                _ => None,
            };
            if head.as_ref().is_some_and(|h| h.digest == valid.digest) {
                outcome.unchanged += 1;
                continue;
            }
            revs.push(NewRevision {
                source: owner.clone(),
                expected_head: Some(existing.as_ref().map_or(RevisionNum(0), |e| e.head)),
                ..NewRevision::content(
                    unit,
                    Arc::from(text),
                    valid.documents(),
                    valid.digest,
                    actor.clone(),
                    u.origin,
                    message,
                )
            });
        }
        let owned: Vec<_> = self
            .store
            .list_units(Some(&source.env))
            .await?
            .into_iter()
            .filter(|u| u.source == owner && !u.destroyed)
            .collect();
        let gone: Vec<_> = owned
            .iter()
            .filter(|u| !names.contains(&u.unit.name))
            .collect();
        if !gone.is_empty() && gone.len() * 2 > owned.len() && !allow_prune {
            let list: Vec<String> = gone.iter().map(|u| u.unit.to_string()).collect();
            return Err(HubError::FailedPrecondition(format!(
                "source {}: the release would destroy {} of its {} units ({}); if that is meant, run `unitsync source sync {} --allow-prune`",
                source.name,
                gone.len(),
                owned.len(),
                list.join(", "),
                source.name
            )));
        }
        for u in gone {
            revs.push(NewRevision {
                source: owner.clone(),
                expected_head: Some(u.head),
                ..NewRevision::tombstone(
                    u.unit.clone(),
                    actor.clone(),
                    format!("{owner}: left the release"),
                    format!("{message}: no longer in the release"),
                )
            });
            outcome.destroyed.push(u.unit.clone());
        }
        if revs.is_empty() {
            return Ok(outcome);
        }
        let (committed, _) = self.commit_release(revs, None).await?;
        outcome.committed = committed;
        Ok(outcome)
    }
}
