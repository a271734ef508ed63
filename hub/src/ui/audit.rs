//! The audit log with filters (actor, action, target), and a small picture
//! of the hub's own latency histograms: commit → delivered (the agent's
//! acknowledgement) and commit → Ready, since the hub started.

use std::sync::Arc;

use axum::extract::{Query, State};
use maud::{Markup, html};
use serde::Deserialize;

use super::layout::{self, Nav};
use super::{Page, Ui, Viewer};
use crate::metrics::LatencySnapshot;

/// Entries shown when the filter does not say.
const DEFAULT_LIMIT: u32 = 200;
const MAX_LIMIT: u32 = 1_000;
/// Entries read to filter by actor or action (the store filters targets).
const SCAN: u32 = 10_000;

#[derive(Deserialize, Default)]
pub(super) struct Filter {
    #[serde(default)]
    actor: String,
    #[serde(default)]
    action: String,
    #[serde(default)]
    target: String,
    limit: Option<u32>,
}

pub(super) async fn page(
    State(ui): State<Arc<Ui>>,
    viewer: Viewer,
    Query(f): Query<Filter>,
) -> Page {
    let limit = f.limit.unwrap_or(DEFAULT_LIMIT).clamp(1, MAX_LIMIT);
    let (actor, action, target) = (f.actor.trim(), f.action.trim(), f.target.trim());
    let scan = if actor.is_empty() && action.is_empty() {
        limit
    } else {
        SCAN
    };
    let entries: Vec<_> = ui
        .hub
        .list_audit(scan, target)
        .await?
        .into_iter()
        .filter(|e| e.actor.contains(actor) && e.action.contains(action))
        .take(limit as usize)
        .collect();
    let top = html! {
        h1 { "Audit" }
        form.filters method="get" action="/ui/audit" {
            label { "Actor " input type="text" name="actor" value=(actor) placeholder="operator:alice"; }
            label { "Action " input type="text" name="action" value=(action) placeholder="promotion"; }
            label { "Target " input type="text" name="target" value=(target) placeholder="prod/"; }
            label { "Show " input type="number" name="limit" value=(limit) min="1" max=(MAX_LIMIT); }
            button type="submit" { "Filter" }
        }
    };
    let m = &ui.hub.metrics;
    let live = html! {
        section.latency {
            h2 { "Latency since the hub started" }
            div.histograms {
                (histogram("Commit → delivered (agent acknowledged)", &m.delivery_latency.snapshot()))
                (histogram("Commit → Ready (first Ready report)", &m.ready_latency.snapshot()))
            }
        }
        h2 { "Entries" }
        @if entries.is_empty() {
            p.empty { "No audit entries match." }
        } @else {
            table.list.audit {
                thead { tr { th { "Time" } th { "Actor" } th { "Action" } th { "Target" } th { "Detail" } } }
                tbody {
                    @for e in &entries {
                        tr data-action=(e.action) {
                            td { (layout::time(e.time)) }
                            td { (e.actor) }
                            td { code { (e.action) } }
                            td { (e.target) }
                            td.msg { (e.detail) }
                        }
                    }
                }
            }
        }
    };
    Ok(layout::page(&viewer, "Audit", Nav::Audit, top, live))
}

/// Seconds as an operator reads them.
fn duration(s: f64) -> String {
    if s < 1.0 {
        format!("{:.1} ms", s * 1000.0)
    } else {
        format!("{s:.2} s")
    }
}

/// Quantiles and the buckets that hold observations, as meters (no
/// inline style: the page's CSP forbids it).
fn histogram(title: &str, s: &LatencySnapshot) -> Markup {
    let count = s.count();
    let max = s.buckets.iter().map(|(_, n)| *n).max().unwrap_or(0);
    let first = s.buckets.iter().position(|(_, n)| *n > 0).unwrap_or(0);
    let last = s.buckets.iter().rposition(|(_, n)| *n > 0).unwrap_or(0);
    html! {
        div.histogram {
            h3 { (title) }
            @if count == 0 {
                p.muted { "No observations yet." }
            } @else {
                p.quantiles {
                    @for (label, q) in [("p50", 0.5), ("p90", 0.9), ("p99", 0.99)] {
                        span { (label) " " strong { (s.quantile(q).map(duration).unwrap_or_default()) } } " "
                    }
                    span.muted { "(" (count) " observations; estimates within a bucket)" }
                }
                table.buckets {
                    @for (upper, n) in &s.buckets[first..=last] {
                        tr {
                            th { @match upper { Some(u) => { "≤ " (duration(*u)) } None => { "more" } } }
                            td { meter min="0" max=(max) value=(n) title=(n) { (n) } }
                            td.n { (n) }
                        }
                    }
                }
            }
        }
    }
}
