//! The promotions page: for each step of the pipeline, what a promotion
//! would do now (a dry run of the same plan the CLI runs): each unit's
//! change, its gates with their verdicts (what blocks and why, who
//! approved), and buttons to approve or promote; then the history of
//! release sets, each with a rollback.

use std::sync::Arc;

use axum::extract::State;
use maud::{Markup, html};

use super::layout::{self, Nav};
use super::{Page, Ui, UiError, Viewer};
use crate::control::Hub;
use crate::model::{Environment, Promotion, Role};
use crate::promote::{Outcome, PlanItem, PromoteRequest, Selection};

/// Release sets listed.
const HISTORY: u32 = 50;

pub(super) async fn page(State(ui): State<Arc<Ui>>, viewer: Viewer) -> Page {
    let envs = ui.hub.list_environments().await?;
    let mut steps = Vec::new();
    for pair in envs.windows(2) {
        steps.push((
            &pair[0],
            &pair[1],
            plan(&ui.hub, &viewer, &pair[0], &pair[1], None).await,
        ));
    }
    let history = ui.hub.list_promotions(HISTORY).await?;
    let top = html! { h1 { "Promotions" } };
    let live = html! {
        @if steps.is_empty() {
            p.empty { "Promotion needs two environments: " code { "unitsync env create staging --after dev" } }
        }
        @for (from, to, plan) in &steps {
            (step(&viewer, from, to, plan))
        }
        h2 { "History" }
        (history_table(&viewer, &history))
    };
    Ok(layout::page(
        &viewer,
        "Promotions",
        Nav::Promotions,
        top,
        live,
    ))
}

/// What promoting `from` → `to` would do now (a dry run; Secret values
/// masked whoever looks), or why it cannot be planned.
pub(super) async fn plan(
    hub: &Hub,
    viewer: &Viewer,
    from: &Environment,
    to: &Environment,
    unit: Option<crate::model::UnitName>,
) -> Result<Outcome, String> {
    if let Some(why) = hub.claimed(&to.name) {
        return Err(why);
    }
    let req = PromoteRequest {
        actor: viewer.session.actor(),
        from: from.name.clone(),
        to: to.name.clone(),
        selection: unit.map_or(Selection::All, |u| Selection::Units(vec![u])),
        revision: None,
        dry_run: true,
        force: None,
        automatic: false,
        reader: Role::ReadOnly,
        confirmed: None,
        message: None,
    };
    // Through UiError: an internal failure is logged, not shown.
    hub.promote(req).await.map_err(|e| UiError::from(e).message)
}

fn policy(e: &Environment) -> Markup {
    let p = &e.policy;
    html! {
        span.policy {
            "gates: health"
            @if p.soak_seconds > 0 { ", soak " (p.soak_seconds) "s" }
            @if p.required_approvals > 0 { ", " (p.required_approvals) " approval(s)" }
            @if p.auto_promote { " · automatic" }
        }
    }
}

fn step(
    viewer: &Viewer,
    from: &Environment,
    to: &Environment,
    plan: &Result<Outcome, String>,
) -> Markup {
    html! {
        section.step data-from=(from.name) data-to=(to.name) {
            div.title-row {
                h2 { (from.name) " → " (to.name) }
                (policy(to))
            }
            @match plan {
                Err(why) => { p.muted { (why) } }
                Ok(out) => {
                    @let pending: Vec<&PlanItem> = out.items.iter().filter(|i| i.skipped.as_deref() != Some("up to date")).collect();
                    @let current = out.items.len() - pending.len();
                    @if pending.is_empty() {
                        p.empty { "Everything in " (to.name) " is up to date with " (from.name) "." }
                    } @else {
                        table.list.plan {
                            thead { tr { th { "Unit" } th { "Change" } th { "Gates" } th { "State" } th {} } }
                            tbody {
                                @for i in &pending { (item(viewer, from, to, i)) }
                            }
                        }
                        @if viewer.is_admin() && pending.iter().any(|i| !i.blocking) {
                            p.actions {
                                a.button.primary href=(format!("/ui/confirm/promote?from={}&to={}", from.name, to.name)) {
                                    "Promote " (from.name) " → " (to.name) "…"
                                }
                                @if out.blocked { span.muted { " (a release set is all or nothing: blocked units block it; promote units one by one or force)" } }
                            }
                        }
                    }
                    @if current > 0 { p.muted.small { (current) " unit(s) already up to date." } }
                }
            }
        }
    }
}

fn item(viewer: &Viewer, from: &Environment, to: &Environment, i: &PlanItem) -> Markup {
    let approvals_missing = i.gates.iter().any(|g| g.name == "approvals" && !g.passed);
    html! {
        tr data-unit=(i.source.name) {
            td { a href=(layout::unit_href(&i.source)) { (i.source.name) } }
            td {
                (layout::rev(i.source_revision.0)) " → " (to.name)
                @if i.previous.0 > 0 { " (now " (layout::rev(i.previous.0)) ")" } @else { " (new)" }
            }
            td {
                ul.gates {
                    @for g in &i.gates {
                        li {
                            span class={ "badge small " (if g.passed { "ok" } else { "bad" }) } {
                                (if g.passed { "✓ " } else { "✗ " }) (g.name)
                            }
                            " " span.detail { (g.detail) }
                        }
                    }
                }
            }
            td {
                @match &i.skipped {
                    None => { span.badge.ok { "ready to promote" } }
                    Some(why) if i.blocking => { span.badge.bad { "blocked" } " " span.detail { (why) } }
                    Some(why) => { span.badge.idle { (why) } }
                }
            }
            td.row-actions {
                @if viewer.is_admin() {
                    @if approvals_missing {
                        a.button href=(format!("/ui/confirm/approve?unit={}&revision={}&to={}", i.source, i.source_revision, to.name)) { "Approve…" }
                        " "
                    }
                    @if i.skipped.is_none() || i.gates.iter().any(|g| !g.passed) {
                        a.button href=(format!("/ui/confirm/promote?from={}&to={}&unit={}", from.name, to.name, i.source.name)) { "Promote…" }
                    }
                }
                @if !i.diff.is_empty() {
                    details id=(format!("plan-{}-{}", to.name, i.source.name)) {
                        summary { "diff" }
                        pre.code { (i.diff) }
                    }
                }
            }
        }
    }
}

pub(super) fn history_table(viewer: &Viewer, history: &[Promotion]) -> Markup {
    html! {
        @if history.is_empty() {
            p.empty { "No promotions yet." }
        } @else {
            table.list.history {
                thead { tr { th { "#" } th { "Time" } th { "By" } th { "Step" } th { "Units" } th { "Notes" } th {} } }
                tbody {
                    @for p in history {
                        tr data-promotion=(p.id) {
                            td { (p.id) }
                            td { (layout::time(p.time)) }
                            td { (p.actor) }
                            td { (p.from) " → " (p.to) }
                            td { ul.plain { @for it in &p.items {
                                li { (it.target_unit) " " (layout::rev(it.target_revision))
                                     span.muted { " from " (it.source_unit) " " (layout::rev(it.source_revision))
                                     @if it.previous_revision > 0 { ", was " (layout::rev(it.previous_revision)) } } }
                            } } }
                            td {
                                @if p.automatic { span.badge.small.idle { "automatic" } " " }
                                @if p.forced { span.badge.small.warn { "forced" } " " }
                                (p.reason)
                            }
                            td.row-actions {
                                @if viewer.is_admin() {
                                    a href=(format!("/ui/confirm/rollback-promotion?id={}", p.id)) { "roll back…" }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}
