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
    /// Commit only if the plan is still this one (its [`fingerprint`]):
    /// what an operator confirmed, checked where the commit's expected
    /// heads are read.
    pub confirmed: Option<String>,
    /// The new revisions' message, instead of the promotion's origin (a
    /// unit created linked to its upstream, with the operator's message).
    pub message: Option<String>,
}

/// What a plan does, unit by unit (see [`PlanItem::fingerprint`]).
pub fn fingerprint(items: &[PlanItem]) -> String {
    items
        .iter()
        .map(PlanItem::fingerprint)
        .collect::<Vec<_>>()
        .join(",")
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
    /// The target is created: with the source unit's labels (so a selector
    /// that picked the source picks it in its environment too).
    create: Option<crate::model::Labels>,
    /// Where a source-owned upstream revision came from (its origin).
    provenance: Option<String>,
    /// The target, linked to its source's own upstream (an environment was
    /// inserted between them), is linked to the source from now on.
    relink: bool,
}

impl PlanItem {
    /// What the item does, for a confirmation to pin:
    /// `SOURCE@REV=TARGET@HEAD:` and the digest of the content it commits
    /// (whatever the gates say: forcing them commits it), or of why it
    /// commits nothing (`skip-…`), or `destroy`. The content covers the
    /// target's overrides, which change without a revision.
    pub fn fingerprint(&self) -> String {
        let what = match (&self.content, &self.skipped) {
            (Some((_, valid)), _) => valid.digest.to_hex()[..16].to_owned(),
            (None, Some(why)) => format!(
                "skip-{}",
                &crate::model::Digest::of(why.as_bytes()).to_hex()[..16]
            ),
            (None, None) => "destroy".to_owned(),
        };
        format!(
            "{}@{}={}@{}:{what}",
            self.source, self.source_revision, self.target, self.previous
        )
    }
}

#[derive(Clone, Debug)]
pub struct Outcome {
    pub promotion: Option<u64>,
    pub items: Vec<PlanItem>,
    pub blocked: bool,
    pub message: String,
}

mod auto;
mod gates;
mod overrides;
mod plan;
mod rollback;

pub use gates::Approval;
pub use overrides::apply_overrides;

/// Whether a promotion from `source` (in `from`) re-links `target`: the
/// target is linked past `from` to the source's own upstream (links go
/// forward, so that upstream comes before `from`), and `from` was created
/// after the target, so it was inserted since (a link made past an
/// environment on purpose stays); a destroyed target is left be.
fn relinks(target: &Unit, source: &Unit, from: &Environment) -> bool {
    target.upstream.is_some()
        && target.upstream == source.upstream
        && !target.destroyed
        && from.created_at > target.created_at
}
use overrides::override_conflicts;
