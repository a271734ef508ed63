//! A promotion: the plan (sources, targets, overrides, diffs, gate
//! verdicts), then the release set committed at once, and linking a
//! downstream unit to its upstream.

use super::*;

impl Hub {
    /// One environment by name.
    pub async fn environment(&self, name: &EnvName) -> Result<Environment> {
        self.store
            .list_environments()
            .await?
            .into_iter()
            .find(|e| e.name == *name)
            .ok_or_else(|| HubError::NotFound(format!("environment {name}")))
    }

    /// Plans (and unless dry-run or blocked, commits) a promotion.
    pub async fn promote(&self, req: PromoteRequest) -> Result<Outcome> {
        let from = self.environment(&req.from).await?;
        let to = self.environment(&req.to).await?;
        if let Some(why) = self.claimed(&to.name) {
            return Err(HubError::FailedPrecondition(why));
        }
        if from.position >= to.position {
            return Err(HubError::InvalidArgument(format!(
                "{} comes after {} in the pipeline; promotions go forward",
                from.name, to.name
            )));
        }
        let mut sources: Vec<Unit> = self.store.list_units(Some(&from.name)).await?;
        match &req.selection {
            Selection::All => {}
            Selection::Units(names) => {
                for n in names {
                    if !sources.iter().any(|u| u.unit.name == *n) {
                        return Err(HubError::NotFound(format!("unit {}/{n}", from.name)));
                    }
                }
                sources.retain(|u| names.contains(&u.unit.name));
            }
            Selection::Labels(sel) => {
                sources.retain(|u| sel.iter().all(|(k, v)| u.labels.get(k) == Some(v)))
            }
        }
        // Destroys are not promoted: a destroyed source whose linked unit
        // runs on is said so, not dropped from the plan silently.
        let (destroyed, sources): (Vec<Unit>, Vec<Unit>) =
            sources.into_iter().partition(|u| u.destroyed);
        let mut items = Vec::new();
        for d in &destroyed {
            let target = UnitRef {
                env: to.name.clone(),
                name: d.unit.name.clone(),
            };
            let Some(t) = self.store.get_unit(&target).await? else {
                continue;
            };
            if t.destroyed || t.upstream.as_ref() != Some(&d.unit) {
                continue;
            }
            items.push(PlanItem {
                source: d.unit.clone(),
                source_revision: d.head,
                target,
                previous: t.head,
                committed: RevisionNum(0),
                diff: String::new(),
                gates: Vec::new(),
                skipped: Some(format!(
                    "{} was destroyed; destroys are not promoted: `unitsync unit destroy {}` to follow",
                    d.unit, t.unit
                )),
                blocking: false,
                content: None,
                create: None,
                provenance: None,
                relink: false,
            });
        }
        if sources.is_empty() && !items.is_empty() {
            let message = summary(&items, false, req.dry_run);
            return Ok(Outcome {
                promotion: None,
                items,
                blocked: false,
                message,
            });
        }
        if sources.is_empty() {
            return Err(HubError::InvalidArgument(format!(
                "no units of {} match",
                from.name
            )));
        }
        if req.revision.is_some() && sources.len() != 1 {
            return Err(HubError::InvalidArgument(
                "--revision needs exactly one unit".into(),
            ));
        }
        let clusters = self.store.list_clusters(Some(&from.name)).await?;
        let cells = self
            .store
            .statuses(Some(&from.name), None, &Page::ALL)
            .await?;
        for s in &sources {
            let rev_no = req.revision.unwrap_or(s.head);
            let src = self
                .store
                .get_revision(&s.unit, rev_no)
                .await?
                .ok_or_else(|| HubError::NotFound(format!("unit {} revision {rev_no}", s.unit)))?;
            let target = UnitRef {
                env: to.name.clone(),
                name: s.unit.name.clone(),
            };
            let existing = self.store.get_unit(&target).await?;
            let mut item = PlanItem {
                source: s.unit.clone(),
                source_revision: rev_no,
                target: target.clone(),
                previous: existing.as_ref().map_or(RevisionNum(0), |t| t.head),
                committed: RevisionNum(0),
                diff: String::new(),
                gates: Vec::new(),
                skipped: None,
                blocking: false,
                content: None,
                create: existing.is_none().then(|| s.labels.clone()),
                provenance: (!s.source.is_empty()).then(|| src.origin.clone()),
                relink: false,
            };
            if src.tombstone {
                item.skipped = Some(format!("{}@{rev_no} is a destroy", s.unit));
                items.push(item);
                continue;
            }
            item.relink = existing.as_ref().is_some_and(|t| relinks(t, s, &from));
            if let Some(t) = &existing
                && t.upstream.as_ref() != Some(&s.unit)
                && !item.relink
            {
                item.skipped = Some(format!(
                    "{target} is not linked to {} (its upstream is {}); link it with `unitsync unit create {target} --from {}`",
                    s.unit,
                    t.upstream
                        .as_ref()
                        .map_or("none".to_owned(), ToString::to_string),
                    s.unit
                ));
                item.blocking = true;
                items.push(item);
                continue;
            }
            let overrides = existing
                .as_ref()
                .map(|t| t.overrides.clone())
                .unwrap_or_default();
            let head = match &existing {
                Some(t) => self.store.get_revision(&target, t.head).await?,
                None => None,
            };
            // Overridden fields the upstream changed since the last
            // promotion, or since the override was set if that was later.
            let promoted = head.as_ref().map_or(RevisionNum(0), |h| h.source_revision);
            let mut conflicts = Vec::new();
            let mut bases: BTreeMap<RevisionNum, Vec<Override>> = BTreeMap::new();
            for o in &overrides {
                // Reviewed against a later upstream than the one promoted
                // (`--revision` of an older one): from the last promotion.
                let base = if o.reviewed_at <= rev_no {
                    promoted.max(o.reviewed_at)
                } else {
                    promoted
                };
                if !base.is_zero() && base != rev_no {
                    bases.entry(base).or_default().push(o.clone());
                }
            }
            for (base, group) in &bases {
                if let Some(prev) = self.store.get_revision(&s.unit, *base).await? {
                    conflicts.extend(override_conflicts(&prev.manifests, &src.manifests, group));
                }
            }
            if !conflicts.is_empty() {
                item.skipped = Some(format!(
                    "override conflict: {}; set the overrides of {target} again to keep them, or remove them to take upstream's",
                    conflicts.join("; ")
                ));
                item.blocking = true;
                items.push(item);
                continue;
            }
            let content = apply_overrides(&target, &src.manifests, &overrides)?;
            let (valid, content) = self.validate(&target, content).await?;
            let old_text = head
                .as_ref()
                .filter(|h| !h.tombstone)
                .map(|h| h.manifests.to_string())
                .unwrap_or_default();
            // Bounded work: past the deadline the diff is coarser.
            item.diff = similar::TextDiff::configure()
                .timeout(std::time::Duration::from_millis(200))
                .diff_lines(
                    &Hub::reveal(req.reader, &old_text),
                    &Hub::reveal(req.reader, &content),
                )
                .unified_diff()
                .header(
                    &format!("{target}@{}", item.previous),
                    &format!("{target} (from {}@{rev_no})", s.unit),
                )
                .to_string();
            // (Re-linking commits even the same content: the link is
            // recorded with a revision.)
            if head
                .as_ref()
                .is_some_and(|h| !h.tombstone && h.digest == valid.digest)
                && !existing.as_ref().is_some_and(|t| t.destroyed)
                && !item.relink
            {
                item.skipped = Some("up to date".into());
                items.push(item);
                continue;
            }
            item.gates = self.gates(&to, &s.unit, rev_no, &clusters, &cells).await?;
            if item.gates.iter().any(|g| !g.passed) && req.force.is_none() {
                item.skipped = Some("blocked by gates".into());
                item.blocking = true;
            }
            item.content = Some((content, valid));
            items.push(item);
        }
        // What the operator confirmed, or nothing (the commit expects the
        // targets' heads read here).
        if let Some(confirmed) = &req.confirmed
            && fingerprint(&items) != *confirmed
        {
            return Err(HubError::FailedPrecondition(format!(
                "the plan changed since you confirmed it (now: {}); nothing was promoted. Review it again.",
                fingerprint(&items)
            )));
        }
        let blocked = items.iter().any(|i| i.blocking);
        let message = summary(&items, blocked, req.dry_run);
        if blocked
            || req.dry_run
            || items
                .iter()
                .all(|i| i.content.is_none() || i.skipped.is_some())
        {
            return Ok(Outcome {
                promotion: None,
                items,
                blocked,
                message,
            });
        }
        // Commit the release set atomically.
        let mut revs = Vec::new();
        let mut promoted = Vec::new();
        for i in items.iter().filter(|i| i.skipped.is_none()) {
            let (content, valid) = i.content.clone().expect("planned content");
            let origin = match &i.provenance {
                Some(p) => format!("promotion from {}@{} ({p})", i.source, i.source_revision),
                None => format!("promotion from {}@{}", i.source, i.source_revision),
            };
            let message = req.message.clone().unwrap_or_else(|| origin.clone());
            revs.push(NewRevision {
                source_revision: i.source_revision,
                upstream: (i.create.is_some() || i.relink).then(|| i.source.clone()),
                labels: i.create.clone(),
                // The plan read the target at this head: a change since
                // (another operator, another replica) is a conflict.
                expected_head: Some(i.previous),
                ..NewRevision::content(
                    i.target.clone(),
                    Arc::from(content),
                    valid.documents(),
                    valid.digest,
                    req.actor.clone(),
                    origin,
                    message,
                )
            });
            promoted.push(PromotedUnit {
                source_unit: i.source.to_string(),
                source_revision: i.source_revision.0,
                target_unit: i.target.to_string(),
                target_revision: 0,
                previous_revision: i.previous.0,
            });
        }
        let (committed, id) = self
            .commit_release(
                revs,
                Some(NewPromotion {
                    actor: req.actor.clone(),
                    from: from.name.clone(),
                    to: to.name.clone(),
                    automatic: req.automatic,
                    forced: req.force.is_some(),
                    reason: req.force.clone().unwrap_or_default(),
                    items: promoted,
                }),
            )
            .await?;
        for r in &committed {
            if let Some(i) = items.iter_mut().find(|i| i.target == r.unit) {
                i.committed = r.number;
            }
        }
        tracing::info!(from = %from.name, to = %to.name, units = committed.len(), automatic = req.automatic, forced = req.force.is_some(), "promoted");
        Ok(Outcome {
            promotion: id,
            message: summary(&items, false, false),
            items,
            blocked: false,
        })
    }

    /// Creates a downstream unit linked to `upstream` (same name, a later
    /// environment): revision 1 is the upstream head with the (still empty)
    /// overrides, under the target environment's gates.
    pub async fn link_unit(
        &self,
        actor: Actor,
        unit: UnitRef,
        upstream: UnitRef,
        message: &str,
    ) -> Result<Revision> {
        if unit.name != upstream.name {
            return Err(HubError::InvalidArgument(format!(
                "a linked unit has its upstream's name: {}/{}",
                unit.env, upstream.name
            )));
        }
        if self.store.get_unit(&unit).await?.is_some() {
            return Err(HubError::AlreadyExists(format!("unit {unit}")));
        }
        let out = self
            .promote(PromoteRequest {
                actor,
                from: upstream.env.clone(),
                to: unit.env.clone(),
                selection: Selection::Units(vec![upstream.name.clone()]),
                revision: None,
                dry_run: false,
                force: None,
                automatic: false,
                reader: Role::Admin,
                confirmed: None,
                message: (!message.is_empty()).then(|| message.to_owned()),
            })
            .await?;
        let item = out
            .items
            .first()
            .ok_or_else(|| HubError::NotFound(format!("unit {upstream}")))?;
        if item.committed.0 == 0 {
            return Err(HubError::FailedPrecondition(out.message));
        }
        self.store
            .get_revision(&unit, item.committed)
            .await?
            .ok_or_else(|| HubError::NotFound(format!("unit {unit}")))
    }
}

fn summary(items: &[PlanItem], blocked: bool, dry_run: bool) -> String {
    let mut lines = Vec::new();
    for i in items {
        let state = match (&i.skipped, i.committed.0) {
            (Some(why), _) => format!("not promoted: {why}"),
            (None, 0) if dry_run => "would be promoted".to_owned(),
            (None, 0) => "pending".to_owned(),
            (None, n) => format!("promoted as revision {n}"),
        };
        lines.push(format!(
            "{}@{} -> {}: {state}",
            i.source, i.source_revision, i.target
        ));
        for g in i.gates.iter().filter(|g| !g.passed) {
            lines.push(format!("  gate {} failed: {}", g.name, g.detail));
        }
    }
    if blocked {
        lines.insert(0, "promotion blocked; nothing was committed".into());
    }
    lines.join("\n")
}
