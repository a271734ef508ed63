//! Automatic promotion: linked units whose upstream head moved past what
//! was ever promoted into them, promoted as soon as their gates pass (the
//! leader of a shared store does it); a rollback stands until then.

use super::*;

impl Hub {
    /// Promotes automatically into every environment that asks for it:
    /// linked units whose upstream head passed the gates.
    pub async fn auto_promote_once(&self) -> Result<usize> {
        let envs = self.store.list_environments().await?;
        let mut promoted = 0;
        for pair in envs.windows(2) {
            let (from, to) = (&pair[0], &pair[1]);
            if !to.policy.auto_promote {
                continue;
            }
            let sources: BTreeMap<UnitRef, Unit> = self
                .store
                .list_units(Some(&from.name))
                .await?
                .into_iter()
                .map(|u| (u.unit.clone(), u))
                .collect();
            for t in self.store.list_units(Some(&to.name)).await? {
                // Linked to it, or past it to its own upstream (`from` was
                // inserted since; promoting re-links the unit).
                let inserted = || {
                    let same = UnitRef {
                        env: from.name.clone(),
                        name: t.unit.name.clone(),
                    };
                    sources.get(&same).filter(|s| relinks(&t, s, from))
                };
                let linked = t.upstream.as_ref().and_then(|up| sources.get(up));
                let Some(src) = linked.or_else(inserted) else {
                    continue;
                };
                // Re-linking: the target's revisions say nothing of this
                // source's (promoted unless it is up to date already).
                let relinking = linked.is_none();
                if src.destroyed || (!relinking && t.head_source == src.head) {
                    continue;
                }
                // A rollback (of the unit, or of a promotion) took the
                // target back from an upstream revision promoted already:
                // it stands until upstream moves on.
                if !relinking {
                    match self.store.history(&t.unit).await {
                        Ok(h) if h.iter().any(|r| r.source_revision >= src.head) => continue,
                        Ok(_) => {}
                        Err(e) => {
                            tracing::warn!(unit = %t.unit, error = %ErrorChain(&e), "reading the unit's history for automatic promotion failed");
                            continue;
                        }
                    }
                }
                let out = self
                    .promote(PromoteRequest {
                        actor: Actor::Hub,
                        from: from.name.clone(),
                        to: to.name.clone(),
                        selection: Selection::Units(vec![src.unit.name.clone()]),
                        revision: None,
                        dry_run: false,
                        force: None,
                        automatic: true,
                        reader: Role::Admin,
                        confirmed: None,
                        message: None,
                    })
                    .await;
                // One unit's problem blocks that unit only.
                match out {
                    Ok(out) => promoted += usize::from(out.promotion.is_some()),
                    Err(e) => tracing::warn!(
                        unit = %t.unit,
                        error = %ErrorChain(&e),
                        "automatic promotion of this unit failed"
                    ),
                }
            }
        }
        Ok(promoted)
    }

    /// The automatic-promotion task.
    pub async fn auto_promote_loop(self: Arc<Self>, interval: Duration, stop: CancellationToken) {
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(interval) => {}
            }
            // With a shared store, one replica promotes.
            if !self.store.is_leader().await.unwrap_or(false) {
                continue;
            }
            if let Err(e) = self.auto_promote_once().await {
                tracing::warn!(error = %ErrorChain(&e), "automatic promotion failed");
            }
        }
    }
}
