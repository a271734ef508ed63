//! The fleet page: environments in promotion order as columns, units as
//! rows; each cell the unit's head there, where it came from, a revision
//! waiting to be promoted into it, and every cluster's revision and phase
//! (a summary by phase when the environment has many clusters: those are
//! read as counts from the store, never cell by cell).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use axum::extract::{Query, State};
use maud::{Markup, html};
use serde::Deserialize;

use super::layout::{self, Nav};
use super::{Page, Ui, Viewer};
use crate::control::Connection;
use crate::control::Hub;
use crate::error::Result;
use crate::model::{
    Cluster, ClusterName, EnvName, Environment, Phase, StatusCell, Unit, UnitName, UnitRef,
    UnitStatus,
};

/// Clusters shown one by one in a cell; more are summarised by phase.
const CHIPS: usize = 6;
/// What the fleet page shows, read so that a large fleet costs counts,
/// not cells: per-cluster cells only for environments small enough to
/// show them as chips, phase counts per unit for the rest.
struct Fleet {
    units: Vec<Unit>,
    clusters: Vec<(Cluster, Option<Connection>)>,
    /// The cells of environments with at most [`CHIPS`] clusters.
    cells: Vec<StatusCell>,
    /// Clusters per unit at its head, by phase (`None`: behind).
    counts: Vec<(UnitRef, Option<Phase>, u64)>,
}

impl Fleet {
    async fn read(hub: &Hub) -> Result<Fleet> {
        let units = hub.list_units(None).await?;
        let clusters = hub.list_clusters(None).await?;
        let mut per_env: BTreeMap<&EnvName, usize> = BTreeMap::new();
        for (c, _) in &clusters {
            *per_env.entry(&c.environment).or_default() += 1;
        }
        let mut cells = Vec::new();
        for (env, n) in per_env {
            if n <= CHIPS {
                cells.extend(hub.env_cells(env).await?);
            }
        }
        let counts = hub.unit_phase_counts(None).await?;
        Ok(Fleet {
            units,
            clusters,
            cells,
            counts,
        })
    }
}

#[derive(Deserialize, Default)]
pub(super) struct Filter {
    /// Units whose name contains this.
    #[serde(default)]
    q: String,
}

pub(super) async fn page(
    State(ui): State<Arc<Ui>>,
    viewer: Viewer,
    Query(f): Query<Filter>,
) -> Page {
    let envs = ui.hub.list_environments().await?;
    let fleet = Fleet::read(&ui.hub).await?;
    let top = html! {
        div.title-row {
            h1 { "Fleet" }
            form.filters method="get" action="/ui/" {
                input type="search" name="q" value=(f.q) placeholder="Filter units" aria-label="Filter units";
                button type="submit" { "Filter" }
            }
        }
    };
    let live = render(&envs, &fleet, f.q.trim());
    Ok(layout::page(&viewer, "Fleet", Nav::Fleet, top, live))
}

/// One environment's clusters and the status cells by (unit, cluster).
struct Matrix<'a> {
    clusters: BTreeMap<&'a EnvName, Vec<(&'a ClusterName, bool)>>,
    cells: HashMap<(&'a UnitRef, &'a ClusterName), &'a UnitStatus>,
    units: HashMap<&'a UnitRef, &'a Unit>,
    /// Per unit: clusters at its head by phase, and how many are behind.
    counts: HashMap<&'a UnitRef, (BTreeMap<Phase, usize>, usize)>,
}

fn render(envs: &[Environment], view: &Fleet, q: &str) -> Markup {
    let mut m = Matrix {
        clusters: BTreeMap::new(),
        cells: HashMap::new(),
        units: HashMap::new(),
        counts: HashMap::new(),
    };
    for (c, session) in &view.clusters {
        m.clusters
            .entry(&c.environment)
            .or_default()
            .push((&c.name, session.is_some()));
    }
    for c in &view.cells {
        m.cells.insert((&c.unit, &c.cluster), &c.status);
    }
    let mut totals: BTreeMap<Phase, usize> = BTreeMap::new();
    for (unit, phase, n) in &view.counts {
        let n = usize::try_from(*n).unwrap_or(usize::MAX);
        let (by, behind) = m.counts.entry(unit).or_default();
        match phase {
            Some(p) => {
                *by.entry(*p).or_default() += n;
                *totals.entry(*p).or_default() += n;
            }
            None => *behind += n,
        }
    }
    let mut rows: BTreeMap<&UnitName, Vec<&Unit>> = BTreeMap::new();
    for u in &view.units {
        m.units.insert(&u.unit, u);
        if u.unit.name.as_str().contains(q) {
            rows.entry(&u.unit.name).or_default().push(u);
        }
    }
    let connected = view.clusters.iter().filter(|(_, s)| s.is_some()).count();
    html! {
        div.summary {
            @let units = view.units.iter().filter(|u| !u.destroyed).count();
            span { strong { (units) } @if units == 1 { " unit" } @else { " units" } }
            span { strong { (connected) } " of " (layout::count(view.clusters.len(), "cluster")) " connected" }
            @for (p, n) in &totals {
                span { (layout::phase(*p)) " " (n) }
            }
        }
        @if envs.is_empty() {
            p.empty { "No environments yet: " code { "unitsync env create dev" } }
        } @else if rows.is_empty() {
            p.empty { @if q.is_empty() { "No units yet: " code { "unitsync unit put dev/NAME -f FILE" } } @else { "No unit matches." } }
        } @else {
            div.scroll {
                table.matrix {
                    thead { tr {
                        th { "Unit" }
                        @for e in envs {
                            th {
                                (e.name)
                                span.muted { " · " (layout::count(m.clusters.get(&e.name).map_or(0, Vec::len), "cluster")) }
                                @if e.policy.required_approvals > 0 || e.policy.soak_seconds > 0 || e.policy.auto_promote {
                                    br;
                                    span.policy {
                                        @if e.policy.required_approvals > 0 { (e.policy.required_approvals) " approval(s) " }
                                        @if e.policy.soak_seconds > 0 { "soak " (e.policy.soak_seconds) "s " }
                                        @if e.policy.auto_promote { "auto" }
                                    }
                                }
                            }
                        }
                    } }
                    tbody {
                        @for (name, units) in &rows {
                            tr data-unit=(name) {
                                th scope="row" { (name) }
                                @for e in envs {
                                    td { (cell(&m, e, units.iter().find(|u| u.unit.env == e.name).copied())) }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

fn cell(m: &Matrix<'_>, env: &Environment, unit: Option<&Unit>) -> Markup {
    let Some(u) = unit else {
        return html! { span.muted { "—" } };
    };
    let clusters = m.clusters.get(&env.name).map_or(&[][..], Vec::as_slice);
    // A newer upstream revision than the one this unit was promoted from.
    let waiting = u
        .upstream
        .as_ref()
        .and_then(|up| m.units.get(up))
        .filter(|up| !up.destroyed && up.head > u.head_source);
    html! {
        div.cell data-env=(env.name) {
            div.head {
                a href=(layout::unit_href(&u.unit)) { (layout::rev(u.head.0)) }
                " " (layout::source(u))
                @if u.destroyed { " " span.badge.idle { "destroyed" } }
            }
            @if let Some(up) = waiting {
                a.pending href="/ui/promotions" title=(format!("{}@{} is newer than what {} runs", up.unit, up.head, u.unit)) {
                    "⇡ " (up.unit.env) " " (layout::rev(up.head.0)) " waiting"
                }
            }
            @if clusters.is_empty() {
                span.muted.small { "no clusters" }
            } @else if clusters.len() <= CHIPS {
                ul.chips {
                    @for (c, online) in clusters {
                        (chip(u, c, *online, m.cells.get(&(&u.unit, *c)).copied()))
                    }
                }
            } @else {
                (summary(u, clusters, m))
            }
        }
    }
}

fn chip(u: &Unit, cluster: &ClusterName, online: bool, status: Option<&UnitStatus>) -> Markup {
    html! {
        li.chip data-cluster=(cluster) {
            span.cname { (cluster) @if !online { " " span.offline title="agent not connected" { "(offline)" } } }
            " "
            @match status {
                Some(s) if s.revision.0 > 0 || s.acked.0 > 0 => {
                    @if s.revision != u.head { span.behind title="not the head revision" { (layout::rev(s.revision.0)) " " } }
                    (layout::phase(if s.revision.0 == 0 { Phase::Unknown } else { s.phase }))
                }
                _ => { span.badge.idle { "no status" } }
            }
        }
    }
}

fn summary(u: &Unit, clusters: &[(&ClusterName, bool)], m: &Matrix<'_>) -> Markup {
    let offline = clusters.iter().filter(|(_, online)| !online).count();
    let (mut by, behind) = m.counts.get(&u.unit).cloned().unwrap_or_default();
    // Clusters that reported nothing for the unit yet.
    let reported = by.values().sum::<usize>() + behind;
    let silent = clusters.len().saturating_sub(reported);
    if silent > 0 {
        *by.entry(Phase::Unknown).or_default() += silent;
    }
    html! {
        div.counts {
            @for (p, n) in &by { span { (layout::phase(*p)) " " (n) } }
            @if behind > 0 { span.behind { (behind) " behind" } }
            @if offline > 0 { span.offline { (offline) " offline" } }
        }
    }
}
