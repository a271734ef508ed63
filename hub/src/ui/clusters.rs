//! Clusters and their agents: connected or not, agent version, last seen,
//! certificate expiry, their units' phases; one page per cluster with
//! every unit; a revoke button for admins.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use axum::extract::{Path, State};
use maud::{Markup, html};

use super::layout::{self, Nav};
use super::{Page, Ui, Viewer};
use crate::control::Connection;
use crate::model::{Cluster, ClusterName, Phase, UnixMillis};

/// A certificate closer to expiry than this is flagged.
const EXPIRY_WARNING_MS: i64 = 7 * 86_400_000;

pub(super) async fn page(State(ui): State<Arc<Ui>>, viewer: Viewer) -> Page {
    // Counted by the store: a large fleet's matrix is never read here.
    let clusters = ui.hub.list_clusters(None).await?;
    let mut phases: HashMap<ClusterName, BTreeMap<Phase, u64>> = HashMap::new();
    for (cluster, phase, n) in ui.hub.phase_counts(None).await? {
        *phases.entry(cluster).or_default().entry(phase).or_default() += n;
    }
    let top = html! { h1 { "Clusters" } };
    let live = html! {
        @if clusters.is_empty() {
            p.empty { "No clusters yet: " code { "unitsync cluster create NAME --env dev" } " then "
                code { "unitsync agent install NAME --export | kubectl apply -f -" } }
        } @else {
            table.list.clusters {
                thead { tr {
                    th { "Cluster" } th { "Environment" } th { "Agent" } th { "Version" }
                    th { "Last seen" } th { "Certificate" } th { "Units" } th { "Labels" } th {}
                } }
                tbody {
                    @for (c, session) in &clusters {
                        tr data-cluster=(c.name) {
                            td { a href=(format!("/ui/clusters/{}", c.name)) { (c.name) } }
                            td { (c.environment) }
                            td { (state(c, session.as_ref())) }
                            td { (version(c, session.as_ref())) }
                            td { (seen(c, session.as_ref())) }
                            td { (certificate(c)) }
                            td { @if let Some(by) = phases.get(&c.name) {
                                @for (p, n) in by { span.count { (layout::phase(*p)) " " (n) } " " }
                            } @else { span.muted { "none" } } }
                            td { @for (k, v) in &c.labels { code.label { (k) "=" (v) } " " } }
                            td.row-actions { (revoke_link(&viewer, c)) }
                        }
                    }
                }
            }
        }
    };
    Ok(layout::page(&viewer, "Clusters", Nav::Clusters, top, live))
}

pub(super) async fn detail(
    State(ui): State<Arc<Ui>>,
    viewer: Viewer,
    Path(name): Path<String>,
) -> Page {
    let name: ClusterName = name.parse().map_err(crate::error::HubError::from)?;
    let (cluster, session) = ui.hub.get_cluster(&name).await?;
    let units = ui.hub.list_units(Some(&cluster.environment)).await?;
    let cells = ui.hub.cluster_cells(&name).await?;
    let cells: HashMap<_, _> = cells.iter().map(|c| (&c.unit, &c.status)).collect();
    let top = html! {
        div.title-row {
            h1 { "Cluster " (name) }
            div.actions { (revoke_link(&viewer, &cluster)) }
        }
    };
    let live = html! {
        dl.facts {
            dt { "Environment" } dd { (cluster.environment) }
            dt { "Agent" } dd { (state(&cluster, session.as_ref())) }
            dt { "Version" } dd { (version(&cluster, session.as_ref())) }
            dt { "Last seen" } dd { (seen(&cluster, session.as_ref())) }
            @if let Some(s) = &session {
                dt { "Connected since" }
                dd { (layout::time(s.connected_at)) @if s.elsewhere { " (to another hub replica)" } }
            }
            dt { "Certificate" } dd { (certificate(&cluster)) }
            dt { "Created" } dd { (layout::time(cluster.created_at)) }
        }
        h2 { "Units" }
        @if units.is_empty() {
            p.empty { "No units in " (cluster.environment) "." }
        } @else {
            table.list {
                thead { tr { th { "Unit" } th { "Head" } th { "Running" } th { "Phase" } th { "Message" } th { "Updated" } } }
                tbody {
                    @for u in &units {
                        tr data-unit=(u.unit.name) {
                            td { a href=(layout::unit_href(&u.unit)) { (u.unit.name) } }
                            td { (layout::rev(u.head.0)) }
                            @match cells.get(&u.unit) {
                                Some(s) => {
                                    td { (layout::rev(s.revision.0)) }
                                    td { (layout::phase(s.phase)) }
                                    td.msg { (s.message) }
                                    td { (layout::time(s.updated_at)) }
                                }
                                None => { td.muted colspan="4" { "no status yet" } }
                            }
                        }
                    }
                }
            }
        }
    };
    Ok(layout::page(
        &viewer,
        &format!("Cluster {name}"),
        Nav::Clusters,
        top,
        live,
    ))
}

fn state(c: &Cluster, session: Option<&Connection>) -> Markup {
    html! {
        @if c.revoked {
            span.badge.bad { "✗ revoked" }
        } @else if session.is_some() {
            span.badge.ok { "● connected" }
        } @else {
            span.badge.idle { "○ offline" }
        }
    }
}

fn version(c: &Cluster, session: Option<&Connection>) -> Markup {
    let v = session.map_or(c.agent_version.as_str(), |s| s.agent_version.as_str());
    html! { @if v.is_empty() { span.muted { "—" } } @else { code { (v) } } }
}

fn seen(c: &Cluster, session: Option<&Connection>) -> Markup {
    html! {
        @if session.is_some() { "now" } @else { (layout::time(c.last_seen)) }
    }
}

fn certificate(c: &Cluster) -> Markup {
    html! {
        @match c.cert_expires {
            None => { span.muted { "token only" } }
            Some(t) => {
                @let left = t.0 - UnixMillis::now().0;
                @if left <= 0 {
                    span.badge.bad title=(layout::rfc3339(t)) { "expired " (layout::ago(t)) }
                } @else if left < EXPIRY_WARNING_MS {
                    span.badge.warn title=(layout::rfc3339(t)) { "expires " (layout::ago(t)) }
                } @else {
                    span title=(layout::rfc3339(t)) { "expires " (layout::ago(t)) }
                }
            }
        }
    }
}

fn revoke_link(viewer: &Viewer, c: &Cluster) -> Markup {
    html! {
        @if viewer.is_admin() && !c.revoked {
            a.button.danger href=(format!("/ui/confirm/revoke?cluster={}", c.name)) { "Revoke…" }
        }
    }
}
