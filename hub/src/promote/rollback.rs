//! Rollbacks: a unit to an earlier revision's content, a release set to
//! what its units ran before.

use super::*;

impl Hub {
    /// A new revision with an old revision's content (history stays
    /// append-only), replacing the head, or only `expected` (what an
    /// operator confirmed) when given. A destroyed unit comes back: that
    /// is how a destroy is undone.
    pub async fn rollback(
        &self,
        actor: Actor,
        unit: UnitRef,
        to: RevisionNum,
        message: String,
        expected: Option<RevisionNum>,
    ) -> Result<Revision> {
        let old = self
            .store
            .get_revision(&unit, to)
            .await?
            .ok_or_else(|| HubError::NotFound(format!("unit {unit} revision {to}")))?;
        if old.tombstone {
            return Err(HubError::InvalidArgument(format!(
                "{unit}@{to} is a destroy; roll back to a revision with content"
            )));
        }
        let head = self
            .store
            .get_unit(&unit)
            .await?
            .ok_or_else(|| HubError::NotFound(format!("unit {unit}")))?
            .head;
        if let Some(confirmed) = expected
            && confirmed != head
        {
            return Err(HubError::FailedPrecondition(format!(
                "{unit} changed since you confirmed the rollback (its head is now revision {head}, not {confirmed}); nothing was rolled back. Review it again."
            )));
        }
        let origin = format!("rollback to {to}");
        let rev = NewRevision {
            // Not `Update`: a destroyed unit is rolled back too (its head
            // is expected, so a unit gone meanwhile is still refused).
            mode: PutMode::CreateOrUpdate,
            source_revision: old.source_revision,
            expected_head: Some(head),
            ..NewRevision::content(
                unit.clone(),
                old.manifests.clone(),
                old.documents,
                old.digest,
                actor,
                origin.clone(),
                if message.is_empty() { origin } else { message },
            )
        };
        let (mut revs, _) = self.commit_release(vec![rev], None).await?;
        revs.pop()
            .ok_or_else(|| HubError::NotFound(format!("unit {unit}")))
    }

    /// Rolls a whole release set back: every unit it changed returns to its
    /// previous revision (units it created are destroyed), atomically.
    pub async fn rollback_promotion(&self, actor: Actor, id: u64) -> Result<Vec<Revision>> {
        let p = self
            .store
            .get_promotion(id)
            .await?
            .ok_or_else(|| HubError::NotFound(format!("promotion {id}")))?;
        let mut revs = Vec::new();
        let origin = format!("rollback of promotion {id}");
        for i in &p.items {
            let unit: UnitRef = i.target_unit.parse()?;
            // Only while the promoted revision is still the head: a later
            // change would be dropped silently otherwise.
            let expected_head = Some(RevisionNum(i.target_revision));
            if i.previous_revision == 0 {
                revs.push(NewRevision {
                    expected_head,
                    ..NewRevision::tombstone(unit, actor.clone(), origin.clone(), origin.clone())
                });
                continue;
            }
            let old = self
                .store
                .get_revision(&unit, RevisionNum(i.previous_revision))
                .await?
                .ok_or_else(|| {
                    HubError::NotFound(format!("unit {unit} revision {}", i.previous_revision))
                })?;
            revs.push(NewRevision {
                mode: PutMode::Update,
                tombstone: old.tombstone,
                source_revision: old.source_revision,
                expected_head,
                ..NewRevision::content(
                    unit,
                    old.manifests.clone(),
                    old.documents,
                    old.digest,
                    actor.clone(),
                    origin.clone(),
                    origin.clone(),
                )
            });
        }
        // Committed revisions reach agents whatever happens to the summary
        // entry (each revision's own audit entry is already in the commit).
        let (committed, _) = self.commit_release(revs, None).await?;
        self.store
            .append_audit(NewAudit {
                actor,
                action: "promotion.rollback",
                target: format!("{}->{}", p.from, p.to),
                detail: format!("promotion {id}: {} unit(s)", committed.len()),
            })
            .await?;
        Ok(committed)
    }
}
