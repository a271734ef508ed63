//! `unitsync status` (once or `--watch`) and `unitsync audit`.

use super::*;

pub(super) fn status_cells(cells: &[CellView]) -> String {
    table(
        &[
            "cluster",
            "acked",
            "revision",
            "phase",
            "connected",
            "message",
        ],
        cells
            .iter()
            .map(|c| {
                vec![
                    c.cluster.clone(),
                    c.acked_revision.to_string(),
                    c.revision.to_string(),
                    c.phase.into(),
                    if c.connected { "yes" } else { "no" }.into(),
                    c.message.clone(),
                ]
            })
            .collect(),
    )
}

pub(super) async fn status(c: &mut Client, f: Format, env: String) -> anyhow::Result<()> {
    let m = api(client::status_matrix(c, &env).await)?;
    let cells: Vec<CellView> = m.cells.iter().map(CellView::from).collect();
    if let Some(s) = structured(f, &cells) {
        print(&s);
        return Ok(());
    }
    print(&matrix(&m));
    let sources = api(c.list_sources(pb::ListSourcesRequest {}).await)?.sources;
    let sources: Vec<pb::Source> = sources
        .into_iter()
        .filter(|s| env.is_empty() || s.environment == env)
        .collect();
    if !sources.is_empty() {
        print("");
        print(&crate::cli::source::sources_table(&sources));
    }
    Ok(())
}

/// `status --watch`: the matrix, redrawn as the hub pushes changes (at
/// most ten times a second); while the hub is out of reach (restarting),
/// the last matrix stays up under a line saying so, and the watch is
/// reopened until it is back or the operator interrupts it.
pub(super) async fn status_watch(c: &mut Client, env: String) -> anyhow::Result<()> {
    use std::io::IsTerminal;
    use tokio::time::{Duration, Instant};

    use crate::cli::follow::{Followed, Watch};
    let mut watch = Watch::new(
        c,
        pb::WatchStatusRequest {
            environment: env,
            unit: String::new(),
        },
    );
    let lost = |why: &tonic::Status| format!("--- lost the hub ({}); reconnecting", why.message());
    let tty = std::io::stdout().is_terminal();
    let mut drawn = Instant::now() - Duration::from_secs(1);
    let mut redraw: Option<Instant> = None;
    loop {
        tokio::select! {
            m = watch.next() => match m.map_err(refused)? {
                Followed::Changed { whole } => {
                    if whole && redraw.is_none() {
                        redraw = Some((drawn + Duration::from_millis(100)).max(Instant::now()));
                    }
                }
                // Under what is drawn, at once (the hub may be back before
                // the next redraw), and under every redraw until it is.
                Followed::Lost(why) => print(&lost(&why)),
            },
            () = tokio::time::sleep_until(redraw.unwrap_or_else(Instant::now)), if redraw.is_some() => {
                redraw = None;
                drawn = Instant::now();
                let view = watch.view();
                let m = pb::StatusMatrix {
                    units: view.units.values().cloned().collect(),
                    clusters: view.clusters.values().cloned().collect(),
                    cells: view.cells.values().cloned().collect(),
                    next_page_token: String::new(),
                };
                if tty {
                    print!("\x1b[2J\x1b[H");
                } else {
                    print(&format!("--- {}", humantime::format_rfc3339_seconds(std::time::SystemTime::now())));
                }
                print(&matrix(&m));
                if let Some(why) = watch.lost() {
                    print(&lost(why));
                }
            }
        }
    }
}

/// The matrix: a row per unit, a column per cluster of its environment.
pub(super) fn matrix(m: &pb::StatusMatrix) -> String {
    // Matrix: one row per unit, one column per cluster of the unit's environment.
    let clusters: Vec<&pb::Cluster> = m.clusters.iter().collect();
    let by_cell: std::collections::HashMap<(&str, &str), &pb::ClusterUnitStatus> = m
        .cells
        .iter()
        .map(|s| ((s.cluster.as_str(), s.unit.as_str()), s))
        .collect();
    let mut header: Vec<String> = vec!["unit".into(), "head".into(), "source".into()];
    header.extend(clusters.iter().map(|c| c.name.clone()));
    header.push("promotion".into());
    let rows = m
        .units
        .iter()
        .map(|u| {
            let env = u.unit.split_once('/').map_or("", |(e, _)| e);
            let mut row = vec![
                u.unit.clone(),
                if u.destroyed {
                    format!("{} (destroyed)", u.head_revision)
                } else {
                    u.head_revision.to_string()
                },
                if u.source.is_empty() {
                    if u.upstream.is_empty() {
                        "hub"
                    } else {
                        "promotion"
                    }
                    .to_owned()
                } else {
                    u.source.clone()
                },
            ];
            for cl in &clusters {
                let cell = if cl.environment != env {
                    String::new()
                } else {
                    match by_cell.get(&(cl.name.as_str(), u.unit.as_str())) {
                        Some(s) if s.revision > 0 => {
                            format!("{} {}", s.revision, output::phase(s.phase))
                        }
                        Some(s) if s.acked_revision > 0 => format!("{} received", s.acked_revision),
                        _ => "-".into(),
                    }
                };
                row.push(cell);
            }
            row.push(promotion_state(u, &m.units));
            row
        })
        .collect();
    let header_refs: Vec<&str> = header.iter().map(String::as_str).collect();
    table(&header_refs, rows)
}

/// Whether a linked unit runs its upstream's head or a promotion is pending
/// (`unitsync promote --dry-run` tells what blocks it).
pub(super) fn promotion_state(u: &pb::Unit, units: &[pb::Unit]) -> String {
    if u.upstream.is_empty() {
        return String::new();
    }
    match units.iter().find(|x| x.unit == u.upstream) {
        Some(up) if up.destroyed => format!("{} destroyed", u.upstream),
        Some(up) if up.head_revision != u.promoted_from_revision => {
            format!(
                "pending {}@{} (has @{})",
                u.upstream, up.head_revision, u.promoted_from_revision
            )
        }
        Some(_) => format!("= {}@{}", u.upstream, u.promoted_from_revision),
        None => format!("from {}@{}", u.upstream, u.promoted_from_revision),
    }
}

pub(super) async fn audit(
    c: &mut Client,
    f: Format,
    limit: u32,
    target: String,
) -> anyhow::Result<()> {
    let r = api(c
        .list_audit(pb::ListAuditRequest {
            limit,
            target_prefix: target,
        })
        .await)?;
    let views: Vec<AuditView> = r.entries.iter().map(AuditView::from).collect();
    print(&structured(f, &views).unwrap_or_else(|| {
        table(
            &["time", "actor", "action", "target", "detail"],
            views
                .iter()
                .map(|a| {
                    vec![
                        a.time.clone(),
                        a.actor.clone(),
                        a.action.clone(),
                        a.target.clone(),
                        a.detail.clone(),
                    ]
                })
                .collect(),
        )
    }));
    Ok(())
}
