//! The unit page: the head and where it came from, per-cluster status with
//! every resource's sync, health, drift and message, the history (author,
//! message, origin, time) and a diff of any two revisions. Manifests are
//! shown as a read-only operator sees them (Secret values masked), for
//! every viewer.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use maud::{Markup, html};
use serde::Deserialize;
use similar::{ChangeTag, TextDiff};

use super::layout::{self, Nav};
use super::{Page, Ui, Viewer};
use crate::model::{EnvName, Revision, RevisionNum, Role, UnitName, UnitRef};
use crate::store::Page as StorePage;

/// Lines of context around each change.
const CONTEXT: usize = 3;
/// The most diff lines rendered.
const MAX_DIFF_LINES: usize = 5_000;
/// The most time spent finding a diff's smallest form.
const DIFF_DEADLINE: std::time::Duration = std::time::Duration::from_millis(200);

#[derive(Deserialize, Default)]
pub(super) struct DiffQuery {
    from: Option<u64>,
    to: Option<u64>,
}

pub(super) async fn page(
    State(ui): State<Arc<Ui>>,
    viewer: Viewer,
    Path((env, name)): Path<(String, String)>,
    Query(q): Query<DiffQuery>,
) -> Page {
    let unit = UnitRef {
        env: env
            .parse::<EnvName>()
            .map_err(crate::error::HubError::from)?,
        name: name
            .parse::<UnitName>()
            .map_err(crate::error::HubError::from)?,
    };
    let hub = &ui.hub;
    // Everyone reads manifests masked here, admins included: a screen is
    // easily shared.
    let view = hub
        .get_unit(&unit, true, Role::ReadOnly, &StorePage::ALL)
        .await?;
    let history = hub.unit_history(&unit).await?;
    let clusters = hub.list_clusters(Some(&unit.env)).await?;
    let envs = hub.list_environments().await?;
    let next_env = envs
        .iter()
        .skip_while(|e| e.name != unit.env)
        .nth(1)
        .map(|e| e.name.clone());
    let head = view.unit.head.0;
    let to = q.to.unwrap_or(head).clamp(1, head.max(1));
    let from = q.from.unwrap_or(to.saturating_sub(1)).min(head);
    let diff = if from == to || head == 0 {
        None
    } else {
        let old = if from == 0 {
            None
        } else {
            Some(
                hub.get_revision(&unit, RevisionNum(from), Role::ReadOnly)
                    .await?,
            )
        };
        let new = hub
            .get_revision(&unit, RevisionNum(to), Role::ReadOnly)
            .await?;
        Some((old, new))
    };

    let u = &view.unit;
    let title = unit.to_string();
    let top = html! {
        div.title-row {
            h1 { (unit) }
            div.actions {
                @if viewer.is_admin() && !u.destroyed {
                    @if let Some(next) = &next_env {
                        a.button href=(format!("/ui/confirm/promote?from={}&to={}&unit={}", unit.env, next, unit.name)) {
                            "Promote to " (next) "…"
                        }
                    }
                }
            }
        }
    };
    let live = html! {
        dl.facts {
            dt { "Head" } dd { (layout::rev(head)) @if u.destroyed { " " span.badge.idle { "destroyed" } } }
            dt { "Source" } dd { (layout::source(u)) }
            @if let Some(up) = &u.upstream {
                dt { "Promoted from" }
                dd { a href=(layout::unit_href(up)) { (up) } " " (layout::rev(u.head_source.0)) }
            }
            dt { "Updated" } dd { (layout::time(u.updated_at)) }
            @if !u.labels.is_empty() {
                dt { "Labels" }
                dd { @for (k, v) in &u.labels { code.label { (k) "=" (v) } " " } }
            }
            @if !u.overrides.is_empty() {
                dt { "Overrides" }
                dd { ul.plain { @for o in &u.overrides {
                    li { code { (o.kind) "/" (o.name) " " (o.path) " = " (o.shown_value()) } }
                } } }
            }
        }
        h2 { "Clusters" }
        @if clusters.is_empty() {
            p.empty { "No clusters in " (unit.env) "." }
        } @else {
            table.list {
                thead { tr { th { "Cluster" } th { "Revision" } th { "Phase" } th { "Message" } th { "Updated" } } }
                tbody {
                    @for (c, session) in &clusters {
                        @let cell = view.cells.iter().find(|x| x.cluster == c.name);
                        tr data-cluster=(c.name) {
                            td {
                                a href=(format!("/ui/clusters/{}", c.name)) { (c.name) }
                                @if session.is_none() { " " span.offline { "(offline)" } }
                            }
                            @match cell {
                                Some(cell) => {
                                    td {
                                        (layout::rev(cell.status.revision.0))
                                        @if cell.status.acked != cell.status.revision {
                                            span.muted { " (received " (layout::rev(cell.status.acked.0)) ")" }
                                        }
                                    }
                                    td { (layout::phase(cell.status.phase)) }
                                    td.msg { (cell.status.message) }
                                    td { (layout::time(cell.status.updated_at)) }
                                }
                                None => { td.muted colspan="4" { "no status yet" } }
                            }
                        }
                        @if let Some(cell) = cell.filter(|x| !x.status.resources.is_empty()) {
                            tr.sub { td colspan="5" {
                                details id=(format!("res-{}", c.name)) {
                                    summary { (layout::count(cell.status.resources.len(), "resource")) }
                                    table.list.inner {
                                        thead { tr { th { "Resource" } th { "Sync" } th { "Health" } th { "Drift" } th { "Message" } } }
                                        tbody {
                                            @for r in &cell.status.resources {
                                                tr {
                                                    td { code { (r.kind) " " @if !r.namespace.is_empty() { (r.namespace) "/" } (r.name) } }
                                                    td { (layout::word(&r.sync)) }
                                                    td { (layout::word(&r.health)) }
                                                    td { @if r.drifted_fields.is_empty() { span.muted { "—" } } @else { code { (r.drifted_fields.join(", ")) } } }
                                                    td.msg { (r.message) }
                                                }
                                            }
                                        }
                                    }
                                }
                            } }
                        }
                    }
                }
            }
        }
        h2 { "History" }
        form.diff-pick method="get" action=(layout::unit_href(&unit)) {
            label { "Diff " select name="from" {
                option value="0" selected[from == 0] { "(empty)" }
                @for r in history.iter().rev() { option value=(r.number.0) selected[r.number.0 == from] { (layout::rev(r.number.0)) } }
            } }
            label { " → " select name="to" {
                @for r in history.iter().rev() { option value=(r.number.0) selected[r.number.0 == to] { (layout::rev(r.number.0)) } }
            } }
            " " button type="submit" { "Show diff" }
        }
        table.list.history {
            thead { tr { th { "Rev" } th { "Time" } th { "Author" } th { "Origin" } th { "Message" } th { "Docs" } th {} } }
            tbody {
                @for r in history.iter().rev() {
                    tr data-revision=(r.number.0) {
                        td { (layout::rev(r.number.0)) @if r.number.0 == head { " " span.badge.small.ok { "head" } } }
                        td { (layout::time(r.created_at)) }
                        td { (r.author) }
                        td { (r.origin) }
                        td.msg { (r.message) @if r.tombstone { " " span.badge.small.idle { "destroy" } } }
                        td { (r.documents) }
                        td.row-actions {
                            @if r.number.0 > 1 {
                                a href=(format!("{}?from={}&to={}", layout::unit_href(&unit), r.number.0 - 1, r.number.0)) { "diff" }
                            }
                            @if viewer.is_admin() && r.number.0 != head && !r.tombstone {
                                " "
                                a href=(format!("/ui/confirm/rollback-unit?unit={}&revision={}", unit, r.number.0)) { "roll back to this…" }
                            }
                        }
                    }
                }
            }
        }
        @if let Some((old, new)) = &diff {
            h2 #diff { "Diff " (layout::rev(from)) " → " (layout::rev(to)) }
            (render_diff(old.as_ref(), new))
        }
        @if let Some(h) = &view.head {
            details #manifests {
                summary { "Manifests at " (layout::rev(h.number.0)) " (" (h.documents) " documents; Secret values masked)" }
                pre.code { (h.manifests) }
            }
        }
    };
    Ok(layout::page(&viewer, &title, Nav::Fleet, top, live))
}

/// A unified diff, with line numbers on both sides.
pub(super) fn render_diff(old: Option<&Revision>, new: &Revision) -> Markup {
    let old_text = old.map_or("", |r| &r.manifests);
    // Bounded work: past the deadline the diff is coarser, not slower.
    let diff = TextDiff::configure()
        .timeout(DIFF_DEADLINE)
        .diff_lines(old_text, &new.manifests);
    let groups = diff.grouped_ops(CONTEXT);
    if groups.is_empty() {
        return html! { p.empty { "The two revisions have the same content." } };
    }
    // The rows shown: a gap between groups, at most MAX_DIFF_LINES lines.
    let mut rows = Vec::new();
    let mut shown = 0;
    let mut cut = false;
    'groups: for (i, group) in groups.iter().enumerate() {
        if i > 0 {
            rows.push(None);
        }
        for change in group.iter().flat_map(|op| diff.iter_changes(op)) {
            if shown == MAX_DIFF_LINES {
                cut = true;
                break 'groups;
            }
            shown += 1;
            rows.push(Some(change));
        }
    }
    html! {
        table.diff {
            @for row in &rows {
                @match row {
                    None => { tr.gap { td colspan="4" { "⋯" } } }
                    Some(change) => {
                        @let (class, sign) = match change.tag() {
                            ChangeTag::Delete => ("del", "-"),
                            ChangeTag::Insert => ("add", "+"),
                            ChangeTag::Equal => ("eq", " "),
                        };
                        tr class=(class) {
                            td.ln { @if let Some(n) = change.old_index() { (n + 1) } }
                            td.ln { @if let Some(n) = change.new_index() { (n + 1) } }
                            td.sign { (sign) }
                            td.code { (change.value().trim_end_matches('\n')) }
                        }
                    }
                }
            }
        }
        @if cut {
            p.warn { "The diff is cut at " (MAX_DIFF_LINES) " lines; use " code { "unitsync unit diff" } " for all of it." }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Digest, UnixMillis};

    fn rev(text: &str) -> Revision {
        Revision {
            unit: "dev/web".parse().unwrap(),
            number: RevisionNum(1),
            digest: Digest::of(text.as_bytes()),
            tombstone: false,
            manifests: Arc::from(text),
            documents: 1,
            author: String::new(),
            message: String::new(),
            origin: String::new(),
            created_at: UnixMillis(0),
            source_revision: RevisionNum(0),
        }
    }

    #[test]
    fn diffs_show_changed_lines_escaped() {
        let a = rev("a: 1\nb: 2\nc: 3\n");
        let b = rev("a: 1\nb: <script>x</script>\nc: 3\n");
        let m = render_diff(Some(&a), &b).into_string();
        assert!(
            m.contains("class=\"del\"") && m.contains("class=\"add\""),
            "{m}"
        );
        assert!(
            m.contains("&lt;script&gt;") && !m.contains("<script>"),
            "{m}"
        );
        assert!(
            render_diff(Some(&a), &a)
                .into_string()
                .contains("same content")
        );
    }
}
