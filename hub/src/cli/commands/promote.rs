//! `unitsync promote`: plans, gates and release sets.

use super::*;

pub(super) async fn promote(c: &mut Client, f: Format, args: PromoteArgs) -> anyhow::Result<()> {
    let r = api(c
        .promote(pb::PromoteRequest {
            from: args.from.clone(),
            to: args.to.clone(),
            units: args.units.clone(),
            all: args.all,
            selector: args.selector.clone().unwrap_or_default(),
            revision: args.revision.unwrap_or(0),
            dry_run: args.dry_run,
            force: args.force,
            reason: args.reason.clone(),
        })
        .await)?;
    #[derive(serde::Serialize)]
    struct Item<'a> {
        source: String,
        target: &'a str,
        target_revision: u64,
        skipped: &'a str,
        gates: Vec<String>,
        diff: &'a str,
    }
    let items: Vec<Item<'_>> = r
        .items
        .iter()
        .map(|i| Item {
            source: format!("{}@{}", i.source_unit, i.source_revision),
            target: &i.target_unit,
            target_revision: i.target_revision,
            skipped: &i.skipped,
            gates: i
                .gates
                .iter()
                .map(|g| {
                    format!(
                        "{} {}: {}",
                        g.gate,
                        if g.passed { "passed" } else { "FAILED" },
                        g.detail
                    )
                })
                .collect(),
            diff: &i.diff,
        })
        .collect();
    match structured(f, &items) {
        Some(s) => print(&s),
        None => {
            if args.dry_run {
                for i in &r.items {
                    if !i.diff.is_empty() && i.skipped != "up to date" {
                        print(&i.diff);
                    }
                    for g in &i.gates {
                        print(&format!(
                            "  gate {} {}: {}",
                            g.gate,
                            if g.passed { "passed" } else { "FAILED" },
                            g.detail
                        ));
                    }
                }
            }
            print(&r.message);
            if r.promotion_id > 0 {
                print(&format!("promotion {} recorded", r.promotion_id));
            }
        }
    }
    if r.blocked {
        bail!("promotion from {} to {} blocked", args.from, args.to);
    }
    if !args.dry_run {
        for i in r.items.iter().filter(|i| i.target_revision > 0) {
            args.wait
                .run(c, &i.target_unit, i.target_revision, false)
                .await?;
        }
    }
    Ok(())
}
