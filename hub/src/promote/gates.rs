//! The gates of a target environment (health in every source cluster but
//! revoked ones, each with its agent connected; soak time on the hub's
//! status clock, the one statuses are stamped with; approvals from
//! distinct operators) and approving.

use super::*;

impl Hub {
    /// Evaluates the target environment's gates for one source revision.
    pub(super) async fn gates(
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
        // A revoked cluster never reports again: it does not count.
        let (revoked, clusters): (Vec<_>, Vec<_>) = clusters.iter().partition(|c| c.revoked);
        let mut not_ready = Vec::new();
        let mut last_ready: Option<UnixMillis> = None;
        let connected = self.connected();
        for c in &clusters {
            match mine.get(c.name.as_str()) {
                // Its last report may be stale: nobody hears from it now.
                Some(cell) if !connected.contains(&c.name) => not_ready.push(format!(
                    "{}: agent not connected (its last report: revision {} {})",
                    c.name,
                    cell.status.revision,
                    cell.status.phase.as_str()
                )),
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
            detail: format!(
                "{}{}",
                if not_ready.is_empty() {
                    format!("{source}@{revision} Ready in {} cluster(s)", clusters.len())
                } else {
                    format!("{source}@{revision} not Ready: {}", not_ready.join("; "))
                },
                if revoked.is_empty() {
                    String::new()
                } else {
                    let names: Vec<&str> = revoked.iter().map(|c| c.name.as_str()).collect();
                    format!(" (revoked, not counted: {})", names.join(", "))
                }
            ),
        });
        if to.policy.soak_seconds > 0 {
            let need = Duration::from_secs(to.policy.soak_seconds);
            let soaked = last_ready.filter(|_| not_ready.is_empty()).map(|since| {
                Duration::from_millis(
                    u64::try_from(self.status_clock.now().0 - since.0).unwrap_or(0),
                )
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

    /// Records an operator's approval of a source revision for an environment.
    pub async fn approve(
        &self,
        actor: Actor,
        source: UnitRef,
        revision: Option<RevisionNum>,
        target: EnvName,
    ) -> Result<Approval> {
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
        Ok(Approval {
            revision,
            approvals: u32::try_from(approvers.len()).unwrap_or(u32::MAX),
            required: env.policy.required_approvals,
        })
    }
}

/// What an approval recorded: the revision approved (the head, when none
/// was named) and where its approvals stand.
#[derive(Debug, Clone, Copy)]
pub struct Approval {
    pub revision: RevisionNum,
    pub approvals: u32,
    pub required: u32,
}
