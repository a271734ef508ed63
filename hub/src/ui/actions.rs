//! What admins change from the dashboard: approve, promote (a unit or a
//! whole step, forced past the gates with a reason), roll a unit or a
//! release set back, revoke a cluster. Each is a confirmation page (what
//! will happen, with the plan or diff) and a POST carrying the session's
//! CSRF token; both call the same [`Hub`](crate::control::Hub) operations
//! as the CLI, audited with the operator as actor. Read-only operators get
//! neither.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Form;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect};
use maud::html;

use super::layout::{self, Nav};
use super::session::check_post;
use super::{Page, Ui, UiError, Viewer};
use crate::error::HubError;
use crate::model::{ClusterName, EnvName, RevisionNum, Role, UnitName, UnitRef};
use crate::promote::{PromoteRequest, Selection};

/// One change an admin can make.
#[derive(Clone, Debug, PartialEq)]
enum Action {
    Approve {
        unit: UnitRef,
        revision: RevisionNum,
        to: EnvName,
    },
    Promote {
        from: EnvName,
        to: EnvName,
        unit: Option<UnitName>,
    },
    RollbackUnit {
        unit: UnitRef,
        revision: RevisionNum,
    },
    RollbackPromotion {
        id: u64,
    },
    Revoke {
        cluster: ClusterName,
    },
}

type Params = HashMap<String, String>;

fn field<'a>(p: &'a Params, name: &str) -> Result<&'a str, UiError> {
    p.get(name)
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
        .ok_or_else(|| UiError::new(StatusCode::BAD_REQUEST, format!("missing field {name}")))
}

fn parsed<T: std::str::FromStr<Err = crate::model::NameError>>(
    p: &Params,
    name: &str,
) -> Result<T, UiError> {
    field(p, name)?
        .parse()
        .map_err(|e| UiError::from(HubError::from(e)))
}

/// What the operator confirmed (the confirmation page's `plan`): an action
/// that changes what that page showed comes through it, or not at all.
fn confirmed_plan(p: &Params) -> Result<&str, UiError> {
    field(p, "plan").map_err(|_| {
        UiError::new(
            StatusCode::CONFLICT,
            "nothing was confirmed; review the change on its confirmation page first",
        )
    })
}

fn number(p: &Params, name: &str) -> Result<u64, UiError> {
    field(p, name)?
        .parse()
        .map_err(|_| UiError::new(StatusCode::BAD_REQUEST, format!("{name} must be a number")))
}

impl Action {
    fn parse(name: &str, p: &Params) -> Result<Action, UiError> {
        Ok(match name {
            "approve" => Action::Approve {
                unit: parsed(p, "unit")?,
                revision: RevisionNum(number(p, "revision")?),
                to: parsed(p, "to")?,
            },
            "promote" => Action::Promote {
                from: parsed(p, "from")?,
                to: parsed(p, "to")?,
                unit: match p.get("unit").map(|s| s.trim()).filter(|s| !s.is_empty()) {
                    Some(u) => Some(u.parse().map_err(|e| UiError::from(HubError::from(e)))?),
                    None => None,
                },
            },
            "rollback-unit" => Action::RollbackUnit {
                unit: parsed(p, "unit")?,
                revision: RevisionNum(number(p, "revision")?),
            },
            "rollback-promotion" => Action::RollbackPromotion {
                id: number(p, "id")?,
            },
            "revoke" => Action::Revoke {
                cluster: parsed(p, "cluster")?,
            },
            _ => return Err(UiError::new(StatusCode::NOT_FOUND, "no such action")),
        })
    }

    fn name(&self) -> &'static str {
        match self {
            Action::Approve { .. } => "approve",
            Action::Promote { .. } => "promote",
            Action::RollbackUnit { .. } => "rollback-unit",
            Action::RollbackPromotion { .. } => "rollback-promotion",
            Action::Revoke { .. } => "revoke",
        }
    }

    /// The form fields that say which change (the confirmation posts them).
    fn fields(&self) -> Vec<(&'static str, String)> {
        match self {
            Action::Approve { unit, revision, to } => vec![
                ("unit", unit.to_string()),
                ("revision", revision.0.to_string()),
                ("to", to.to_string()),
            ],
            Action::Promote { from, to, unit } => {
                let mut f = vec![("from", from.to_string()), ("to", to.to_string())];
                if let Some(u) = unit {
                    f.push(("unit", u.to_string()));
                }
                f
            }
            Action::RollbackUnit { unit, revision } => vec![
                ("unit", unit.to_string()),
                ("revision", revision.0.to_string()),
            ],
            Action::RollbackPromotion { id } => vec![("id", id.to_string())],
            Action::Revoke { cluster } => vec![("cluster", cluster.to_string())],
        }
    }

    fn title(&self) -> String {
        match self {
            Action::Approve { unit, revision, to } => {
                format!("Approve {unit} {} for {to}", layout::rev(revision.0))
            }
            Action::Promote {
                from,
                to,
                unit: None,
            } => format!("Promote {from} → {to}"),
            Action::Promote {
                from,
                to,
                unit: Some(u),
            } => format!("Promote {from}/{u} → {to}"),
            Action::RollbackUnit { unit, revision } => {
                format!("Roll {unit} back to {}", layout::rev(revision.0))
            }
            Action::RollbackPromotion { id } => format!("Roll back promotion {id}"),
            Action::Revoke { cluster } => format!("Revoke cluster {cluster}"),
        }
    }

    /// Where the operator goes afterwards (or on cancel).
    fn back(&self) -> String {
        match self {
            Action::Approve { .. } | Action::Promote { .. } | Action::RollbackPromotion { .. } => {
                "/ui/promotions".into()
            }
            Action::RollbackUnit { unit, .. } => layout::unit_href(unit),
            Action::Revoke { cluster } => format!("/ui/clusters/{cluster}"),
        }
    }
}

fn read_only() -> UiError {
    UiError::forbidden("read-only operators can look at everything but change nothing")
}

/// The confirmation page: what will happen, and the form that does it.
pub(super) async fn confirm(
    State(ui): State<Arc<Ui>>,
    viewer: Viewer,
    Path(name): Path<String>,
    Query(p): Query<Params>,
) -> Page {
    if !viewer.is_admin() {
        return Err(read_only());
    }
    let action = Action::parse(&name, &p)?;
    let hub = &ui.hub;
    let mut pinned = None;
    let (what, blocked) = match &action {
        Action::Approve { unit, revision, to } => (
            html! { p { "Records your approval of " strong { (unit) " " (layout::rev(revision.0)) }
            " for promotion into " strong { (to) } ". Approvals count once per operator." } },
            false,
        ),
        Action::Promote { from, to, unit } => {
            let (f, t) = environments(hub, from, to).await?;
            match super::promotions::plan(hub, &viewer, &f, &t, unit.clone()).await {
                Err(why) => return Err(UiError::new(StatusCode::CONFLICT, why)),
                Ok(out) => (
                    html! {
                        p { "Commits one release set into " strong { (to) } ": every unit below at once, or none." }
                        ul.plan {
                            @for i in &out.items {
                                li {
                                    strong { (i.target) } " ← " (i.source) " " (layout::rev(i.source_revision.0))
                                    @match &i.skipped {
                                        None => { " " span.badge.small.ok { "will be promoted" } }
                                        Some(why) if i.blocking => { " " span.badge.small.bad { "blocked" } " " span.detail { (why) } }
                                        Some(why) => { " " span.badge.small.idle { (why) } }
                                    }
                                    @for g in i.gates.iter().filter(|g| !g.passed) {
                                        br; span.detail { "✗ " (g.name) ": " (g.detail) }
                                    }
                                    @if !i.diff.is_empty() && i.skipped.as_deref() != Some("up to date") {
                                        details { summary { "diff" } pre.code { (i.diff) } }
                                    }
                                }
                            }
                        }
                        p.muted { (out.message) }
                    },
                    {
                        // Posted back: the promotion commits only this plan.
                        pinned = Some(crate::promote::fingerprint(&out.items));
                        out.blocked
                    },
                ),
            }
        }
        Action::RollbackUnit { unit, revision } => {
            let old = hub.get_revision(unit, *revision, Role::ReadOnly).await?;
            let head = hub
                .get_revision(unit, RevisionNum(0), Role::ReadOnly)
                .await?;
            pinned = Some(head.number.0.to_string());
            (
                html! {
                    p { "Commits a new revision of " strong { (unit) } " with the content of "
                        (layout::rev(revision.0)) " (" (old.message) "); history is kept." }
                    h3 { "What changes (" (layout::rev(head.number.0)) " → content of " (layout::rev(revision.0)) ")" }
                    (super::unit::render_diff(Some(&head), &old))
                },
                false,
            )
        }
        Action::RollbackPromotion { id } => {
            let pr = hub.get_promotion(*id).await?;
            (
                html! {
                    p { "Returns every unit promotion " (id) " changed (" (pr.from) " → " (pr.to) ", "
                        (layout::time(pr.time)) " by " (pr.actor) ") to what it ran before, at once; units it created are destroyed." }
                    ul.plain { @for it in &pr.items {
                        li { (it.target_unit) ": " (layout::rev(it.target_revision)) " → "
                            @if it.previous_revision > 0 { "content of " (layout::rev(it.previous_revision)) } @else { "destroyed" } }
                    } }
                },
                false,
            )
        }
        Action::Revoke { cluster } => (
            html! { p { "Revokes every credential of " strong { (cluster) } " for good and ends its agent's session. "
            "Its workloads keep running; the agent can no longer connect. This cannot be undone: "
            "a new identity needs " code { "unitsync cluster create" } "." } },
            false,
        ),
    };
    let title = action.title();
    let top = html! { h1 { (title) } };
    let body = html! {
        (what)
        form.confirm method="post" action=(format!("/ui/actions/{}", action.name())) {
            (layout::csrf(&viewer))
            @for (k, v) in action.fields() { input type="hidden" name=(k) value=(v); }
            @if let Some(plan) = &pinned { input type="hidden" name="plan" value=(plan); }
            @if let Action::RollbackUnit { .. } = action {
                label { "Message " input type="text" name="message" placeholder="why (recorded in the history)"; }
            }
            @if blocked {
                p.warn { "Gates block this promotion. Force it only if you know why they fail; the reason is audited." }
                label { "Force, because " input type="text" name="reason" required placeholder="incident 1234: hotfix"; }
            }
            div.buttons {
                button.primary type="submit" { @if blocked { "Force " } "Confirm" }
                " " a.button href=(action.back()) { "Cancel" }
            }
        }
    };
    Ok(layout::page(&viewer, &title, nav(&action), top, body))
}

/// The two environments of a promotion step.
async fn environments(
    hub: &crate::control::Hub,
    from: &EnvName,
    to: &EnvName,
) -> Result<(crate::model::Environment, crate::model::Environment), UiError> {
    Ok((hub.environment(from).await?, hub.environment(to).await?))
}

fn nav(a: &Action) -> Nav {
    match a {
        Action::Revoke { .. } => Nav::Clusters,
        Action::RollbackUnit { .. } => Nav::Fleet,
        _ => Nav::Promotions,
    }
}

/// Does it: CSRF and origin checked, admins only, then the hub operation.
pub(super) async fn act(
    State(ui): State<Arc<Ui>>,
    viewer: Viewer,
    headers: HeaderMap,
    Path(name): Path<String>,
    Form(p): Form<Params>,
) -> Page {
    check_post(&viewer, &headers, p.get("csrf").map(String::as_str))?;
    if !viewer.is_admin() {
        return Err(read_only());
    }
    let action = Action::parse(&name, &p)?;
    let actor = viewer.session.actor();
    let hub = &ui.hub;
    let done = match &action {
        Action::Approve { unit, revision, to } => {
            let a = hub
                .approve(actor, unit.clone(), Some(*revision), to.clone())
                .await?;
            format!(
                "Approved {unit} {} for {to} ({} of {} approvals).",
                layout::rev(a.revision.0),
                a.approvals,
                a.required
            )
        }
        Action::Promote { from, to, unit } => {
            let reason = p.get("reason").map(|s| s.trim()).unwrap_or_default();
            // Promote what the operator confirmed, or nothing.
            let confirmed = confirmed_plan(&p)?.to_owned();
            let out = hub
                .promote(PromoteRequest {
                    actor,
                    from: from.clone(),
                    to: to.clone(),
                    selection: unit
                        .clone()
                        .map_or(Selection::All, |u| Selection::Units(vec![u])),
                    revision: None,
                    dry_run: false,
                    force: (!reason.is_empty()).then(|| reason.to_owned()),
                    automatic: false,
                    reader: Role::ReadOnly,
                    confirmed: Some(confirmed),
                    message: None,
                })
                .await?;
            if out.blocked {
                return Err(UiError::new(StatusCode::CONFLICT, out.message));
            }
            match out.promotion {
                Some(id) => format!("Promotion {id}: {}", out.message),
                None => out.message,
            }
        }
        Action::RollbackUnit { unit, revision } => {
            let message = p.get("message").map(|s| s.trim()).unwrap_or_default();
            // Replace the head whose diff the operator confirmed, or nothing.
            let head = confirmed_plan(&p)?.parse().map(RevisionNum).map_err(|_| {
                UiError::new(StatusCode::BAD_REQUEST, "plan must be a revision number")
            })?;
            let r = hub
                .rollback(
                    actor,
                    unit.clone(),
                    *revision,
                    message.to_owned(),
                    Some(head),
                )
                .await?;
            format!(
                "{unit} rolled back to the content of {} as {}.",
                layout::rev(revision.0),
                layout::rev(r.number.0)
            )
        }
        Action::RollbackPromotion { id } => {
            let revs = hub.rollback_promotion(actor, *id).await?;
            format!("Promotion {id} rolled back: {} unit(s).", revs.len())
        }
        Action::Revoke { cluster } => {
            hub.revoke_cluster(actor, cluster.clone()).await?;
            format!("Cluster {cluster} revoked; its agent was disconnected.")
        }
    };
    ui.sessions.flash(&viewer.id, done);
    Ok(Redirect::to(&action.back()).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(kv: &[(&str, &str)]) -> Params {
        kv.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn actions_round_trip_through_their_forms() {
        let all = [
            Action::Approve {
                unit: "dev/web".parse().unwrap(),
                revision: RevisionNum(3),
                to: "staging".parse().unwrap(),
            },
            Action::Promote {
                from: "dev".parse().unwrap(),
                to: "staging".parse().unwrap(),
                unit: None,
            },
            Action::Promote {
                from: "dev".parse().unwrap(),
                to: "staging".parse().unwrap(),
                unit: Some("web".parse().unwrap()),
            },
            Action::RollbackUnit {
                unit: "prod/web".parse().unwrap(),
                revision: RevisionNum(1),
            },
            Action::RollbackPromotion { id: 7 },
            Action::Revoke {
                cluster: "prod-1".parse().unwrap(),
            },
        ];
        for a in all {
            let p: Params = a
                .fields()
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect();
            assert_eq!(Action::parse(a.name(), &p).unwrap(), a);
        }
    }

    #[test]
    fn bad_fields_are_named() {
        let e =
            Action::parse("approve", &params(&[("unit", "dev/web"), ("to", "prod")])).unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(e.message.contains("revision"), "{}", e.message);
        let e = Action::parse("revoke", &params(&[("cluster", "<script>")])).unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert_eq!(
            Action::parse("drop-tables", &params(&[]))
                .unwrap_err()
                .status,
            StatusCode::NOT_FOUND
        );
    }
}
