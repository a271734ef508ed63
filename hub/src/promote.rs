//! Promotion of units from one environment to the next: linked downstream
//! units, declared overrides re-applied on every promotion (and conflicts
//! with upstream changes reported, never guessed), gates (health in every
//! source cluster, soak time, approvals from distinct operators), atomic
//! release sets, automatic promotion, and rollback.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::control::Hub;
use crate::error::{ErrorChain, HubError, Result};

use crate::model::{
    Actor, EnvName, Environment, NewAudit, NewRevision, Override, Phase, PromotedUnit, PutMode,
    Revision, RevisionNum, Role, Unit, UnitName, UnitRef, UnixMillis,
};
use crate::store::{NewPromotion, Page};

/// Which source units a promotion takes.
#[derive(Clone, Debug)]
pub enum Selection {
    Units(Vec<UnitName>),
    All,
    Labels(Vec<(String, String)>),
}

#[derive(Clone, Debug)]
pub struct PromoteRequest {
    pub actor: Actor,
    pub from: EnvName,
    pub to: EnvName,
    pub selection: Selection,
    /// A specific source revision (one unit only).
    pub revision: Option<RevisionNum>,
    pub dry_run: bool,
    /// Bypass the gates, with this reason (audited).
    pub force: Option<String>,
    pub automatic: bool,
    /// Who reads the diffs (read-only operators see Secret values masked).
    pub reader: Role,
}

/// One gate's verdict.
#[derive(Clone, Debug, PartialEq)]
pub struct Gate {
    pub name: &'static str,
    pub passed: bool,
    pub detail: String,
}

/// What happens (or would happen) to one unit.
#[derive(Clone, Debug)]
pub struct PlanItem {
    pub source: UnitRef,
    pub source_revision: RevisionNum,
    pub target: UnitRef,
    pub previous: RevisionNum,
    pub committed: RevisionNum,
    pub diff: String,
    pub gates: Vec<Gate>,
    /// Why the unit is not promoted.
    pub skipped: Option<String>,
    /// A skip that blocks the release set (gate, conflict, bad link).
    pub blocking: bool,
    content: Option<(String, crate::manifest::Validated)>,
    create: bool,
    /// Where a source-owned upstream revision came from (its origin).
    provenance: Option<String>,
}

#[derive(Clone, Debug)]
pub struct Outcome {
    pub promotion: Option<u64>,
    pub items: Vec<PlanItem>,
    pub blocked: bool,
    pub message: String,
}

/// Sets `path` (dot-separated) in a JSON object, creating maps on the way.
fn set_path(doc: &mut Value, path: &str, value: Value) -> std::result::Result<(), String> {
    let parts: Vec<&str> = path.split('.').filter(|p| !p.is_empty()).collect();
    let Some((last, parents)) = parts.split_last() else {
        return Err("empty path".into());
    };
    let mut cur = doc;
    for p in parents {
        if !cur.is_object() {
            return Err(format!("{p} is not a mapping"));
        }
        cur = cur
            .as_object_mut()
            .expect("object")
            .entry((*p).to_owned())
            .or_insert_with(|| Value::Object(Default::default()));
    }
    match cur.as_object_mut() {
        Some(m) => {
            m.insert((*last).to_owned(), value);
            Ok(())
        }
        None => Err(format!("the parent of {last} is not a mapping")),
    }
}

fn get_path<'a>(doc: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.')
        .filter(|p| !p.is_empty())
        .try_fold(doc, |cur, p| cur.get(p))
}

fn find_doc<'a>(docs: &'a mut [Value], o: &Override) -> Option<&'a mut Value> {
    docs.iter_mut().find(|d| {
        d["kind"] == o.kind.as_str()
            && d["metadata"]["name"] == o.name.as_str()
            && o.namespace
                .as_ref()
                .is_none_or(|ns| d["metadata"]["namespace"] == ns.as_str())
    })
}

fn parse_docs(text: &str) -> std::result::Result<Vec<Value>, String> {
    let docs: Vec<Value> = serde_saphyr::from_multiple(text).map_err(|e| e.to_string())?;
    Ok(docs.into_iter().filter(|d| !d.is_null()).collect())
}

/// The upstream content with the downstream overrides applied. Without
/// overrides the text is kept byte for byte.
pub fn apply_overrides(unit: &UnitRef, text: &str, overrides: &[Override]) -> Result<String> {
    if overrides.is_empty() {
        return Ok(text.to_owned());
    }
    let bad = |m: String| HubError::InvalidArgument(format!("unit {unit}: {m}"));
    let mut docs = parse_docs(text).map_err(bad)?;
    for o in overrides {
        let doc = find_doc(&mut docs, o).ok_or_else(|| {
            bad(format!(
                "override of {} {} {}: the unit has no such object",
                o.kind, o.name, o.path
            ))
        })?;
        set_path(doc, &o.path, o.value.clone())
            .map_err(|m| bad(format!("override {} on {} {}: {m}", o.path, o.kind, o.name)))?;
    }
    let parts: Vec<String> = docs
        .iter()
        .map(|d| serde_saphyr::to_string(d).unwrap_or_default())
        .collect();
    Ok(parts.join("---\n"))
}

/// Overridden fields that the upstream changed between two revisions.
fn override_conflicts(before: &str, after: &str, overrides: &[Override]) -> Vec<String> {
    let (Ok(mut b), Ok(mut a)) = (parse_docs(before), parse_docs(after)) else {
        return vec![];
    };
    let mut out = Vec::new();
    for o in overrides {
        let old = find_doc(&mut b, o).and_then(|d| get_path(d, &o.path).cloned());
        let new = find_doc(&mut a, o).and_then(|d| get_path(d, &o.path).cloned());
        if old != new {
            let show =
                |v: &Option<Value>| v.as_ref().map_or("(unset)".to_owned(), Value::to_string);
            out.push(format!(
                "{} {} {}: upstream changed it from {} to {}, overridden here as {}",
                o.kind,
                o.name,
                o.path,
                show(&old),
                show(&new),
                o.value
            ));
        }
    }
    out
}

impl Hub {
    async fn environment(&self, name: &EnvName) -> Result<Environment> {
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
        let mut sources: Vec<Unit> = self
            .store
            .list_units(Some(&from.name))
            .await?
            .into_iter()
            .filter(|u| !u.destroyed)
            .collect();
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
        let mut items = Vec::new();
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
                create: existing.is_none(),
                provenance: (!s.source.is_empty()).then(|| src.origin.clone()),
            };
            if src.tombstone {
                item.skipped = Some(format!("{}@{rev_no} is a destroy", s.unit));
                items.push(item);
                continue;
            }
            if let Some(t) = &existing
                && t.upstream.as_ref() != Some(&s.unit)
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
            // Overridden fields the upstream changed since the last promotion.
            if let Some(h) = head
                .as_ref()
                .filter(|h| h.source_revision.0 > 0 && h.source_revision != rev_no)
                && let Some(prev) = self.store.get_revision(&s.unit, h.source_revision).await?
            {
                let conflicts = override_conflicts(&prev.manifests, &src.manifests, &overrides);
                if !conflicts.is_empty() {
                    item.skipped = Some(format!("override conflict: {}", conflicts.join("; ")));
                    item.blocking = true;
                    items.push(item);
                    continue;
                }
            }
            let content = apply_overrides(&target, &src.manifests, &overrides)?;
            let (valid, content) = self.validate(&target, content).await?;
            let old_text = head
                .as_ref()
                .filter(|h| !h.tombstone)
                .map(|h| h.manifests.to_string())
                .unwrap_or_default();
            item.diff = similar::TextDiff::from_lines(
                &Hub::reveal(req.reader, &old_text),
                &Hub::reveal(req.reader, &content),
            )
            .unified_diff()
            .header(
                &format!("{target}@{}", item.previous),
                &format!("{target} (from {}@{rev_no})", s.unit),
            )
            .to_string();
            if head
                .as_ref()
                .is_some_and(|h| !h.tombstone && h.digest == valid.digest)
                && !existing.as_ref().is_some_and(|t| t.destroyed)
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
            revs.push(NewRevision {
                source_revision: i.source_revision,
                upstream: i.create.then(|| i.source.clone()),
                // The plan read the target at this head: a change since
                // (another operator, another replica) is a conflict.
                expected_head: Some(i.previous),
                ..NewRevision::content(
                    i.target.clone(),
                    Arc::from(content),
                    valid.documents(),
                    valid.digest,
                    req.actor.clone(),
                    origin.clone(),
                    origin,
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
            .store
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
            self.publish(r);
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

    /// Evaluates the target environment's gates for one source revision.
    async fn gates(
        &self,
        to: &Environment,
        source: &UnitRef,
        revision: RevisionNum,
        clusters: &[crate::model::Cluster],
        cells: &[crate::model::StatusCell],
    ) -> Result<Vec<Gate>> {
        let mut gates = Vec::new();
        let mine: BTreeMap<&str, &crate::model::StatusCell> = cells
            .iter()
            .filter(|c| c.unit == *source)
            .map(|c| (c.cluster.as_str(), c))
            .collect();
        let mut not_ready = Vec::new();
        let mut last_ready: Option<UnixMillis> = None;
        for c in clusters {
            match mine.get(c.name.as_str()) {
                Some(cell)
                    if cell.status.revision == revision && cell.status.phase == Phase::Ready =>
                {
                    let since = cell.status.ready_since;
                    last_ready = Some(last_ready.map_or(since, |o: UnixMillis| o.max(since)));
                }
                Some(cell) if cell.status.revision == revision => {
                    not_ready.push(
                        format!(
                            "{}: {} {}",
                            c.name,
                            cell.status.phase.as_str(),
                            cell.status.message
                        )
                        .trim_end()
                        .to_owned(),
                    );
                }
                Some(cell) => not_ready.push(format!(
                    "{}: runs revision {} (not {revision})",
                    c.name, cell.status.revision
                )),
                None => not_ready.push(format!("{}: no status yet", c.name)),
            }
        }
        if clusters.is_empty() {
            not_ready.push(format!(
                "environment {} has no clusters to prove it",
                source.env
            ));
        }
        gates.push(Gate {
            name: "health",
            passed: not_ready.is_empty(),
            detail: if not_ready.is_empty() {
                format!("{source}@{revision} Ready in {} cluster(s)", clusters.len())
            } else {
                format!("{source}@{revision} not Ready: {}", not_ready.join("; "))
            },
        });
        if to.policy.soak_seconds > 0 {
            let need = Duration::from_secs(to.policy.soak_seconds);
            let soaked = last_ready.filter(|_| not_ready.is_empty()).map(|since| {
                Duration::from_millis(u64::try_from(UnixMillis::now().0 - since.0).unwrap_or(0))
            });
            gates.push(Gate {
                name: "soak",
                passed: soaked.is_some_and(|s| s >= need),
                detail: match soaked {
                    Some(s) => format!("Ready for {}s of {}s", s.as_secs(), need.as_secs()),
                    None => format!("needs {}s Ready in every cluster", need.as_secs()),
                },
            });
        }
        if to.policy.required_approvals > 0 {
            let approvers = self.store.approvals(&to.name, source, revision).await?;
            gates.push(Gate {
                name: "approvals",
                passed: approvers.len() >= to.policy.required_approvals as usize,
                detail: format!(
                    "{} of {} approvals{}",
                    approvers.len(),
                    to.policy.required_approvals,
                    if approvers.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", approvers.join(", "))
                    }
                ),
            });
        }
        Ok(gates)
    }

    /// Creates a downstream unit linked to `upstream` (same name, a later
    /// environment): revision 1 is the upstream head with the (still empty)
    /// overrides, under the target environment's gates.
    pub async fn link_unit(
        &self,
        actor: Actor,
        unit: UnitRef,
        upstream: UnitRef,
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

    /// Records an operator's approval of a source revision for an environment.
    pub async fn approve(
        &self,
        actor: Actor,
        source: UnitRef,
        revision: Option<RevisionNum>,
        target: EnvName,
    ) -> Result<(u32, u32)> {
        let Actor::Operator(name) = &actor else {
            return Err(HubError::PermissionDenied);
        };
        let env = self.environment(&target).await?;
        let unit = self
            .store
            .get_unit(&source)
            .await?
            .ok_or_else(|| HubError::NotFound(format!("unit {source}")))?;
        let revision = revision.unwrap_or(unit.head);
        let audit = NewAudit {
            actor: actor.clone(),
            action: "promotion.approve",
            target: source.to_string(),
            detail: format!("revision {revision} for {target}"),
        };
        let approvers = self
            .store
            .approve(&target, &source, revision, name, audit)
            .await?;
        Ok((
            u32::try_from(approvers.len()).unwrap_or(u32::MAX),
            env.policy.required_approvals,
        ))
    }

    /// A new revision with an old revision's content (history stays append-only).
    pub async fn rollback(
        &self,
        actor: Actor,
        unit: UnitRef,
        to: RevisionNum,
        message: String,
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
        let origin = format!("rollback to {to}");
        let rev = NewRevision {
            mode: PutMode::Update,
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
        let (mut revs, _) = self.store.commit_release(vec![rev], None).await?;
        let r = revs
            .pop()
            .ok_or_else(|| HubError::NotFound(format!("unit {unit}")))?;
        self.publish(&r);
        Ok(r)
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
        let (committed, _) = self.store.commit_release(revs, None).await?;
        // Committed revisions reach agents whatever happens to the summary
        // entry (each revision's own audit entry is already in the commit).
        for r in &committed {
            self.publish(r);
        }
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
                let Some(src) = t.upstream.as_ref().and_then(|up| sources.get(up)) else {
                    continue;
                };
                if src.destroyed || t.head_source == src.head {
                    continue;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_apply_and_conflicts_are_detected() {
        let unit: UnitRef = "staging/web".parse().unwrap();
        let text =
            "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\nspec:\n  replicas: 1\n";
        let o = Override {
            kind: "Deployment".into(),
            name: "web".into(),
            namespace: None,
            path: "spec.replicas".into(),
            value: serde_json::json!(3),
        };
        let out = apply_overrides(&unit, text, std::slice::from_ref(&o)).unwrap();
        assert!(out.contains("replicas: 3"), "{out}");
        assert_eq!(apply_overrides(&unit, text, &[]).unwrap(), text);
        let changed = text.replace("replicas: 1", "replicas: 2");
        assert_eq!(
            override_conflicts(text, &changed, std::slice::from_ref(&o)).len(),
            1
        );
        assert!(
            override_conflicts(
                text,
                &text.replace("web\n", "web\n  labels: {a: b}\n"),
                std::slice::from_ref(&o)
            )
            .is_empty()
        );
        let missing = Override {
            name: "nope".into(),
            ..o
        };
        assert!(apply_overrides(&unit, text, &[missing]).is_err());
    }
}
