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
    struct Gate<'a> {
        gate: &'a str,
        passed: bool,
        detail: &'a str,
    }
    #[derive(serde::Serialize)]
    struct Item<'a> {
        source: String,
        target: &'a str,
        target_revision: u64,
        skipped: &'a str,
        gates: Vec<Gate<'a>>,
        diff: &'a str,
    }
    /// The whole answer: what a script needs to follow or undo it.
    #[derive(serde::Serialize)]
    struct Outcome<'a> {
        /// `null` when nothing was recorded (a dry run, or nothing to do).
        promotion_id: Option<u64>,
        blocked: bool,
        message: &'a str,
        items: Vec<Item<'a>>,
    }
    let outcome = Outcome {
        promotion_id: (r.promotion_id > 0).then_some(r.promotion_id),
        blocked: r.blocked,
        message: &r.message,
        items: r
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
                    .map(|g| Gate {
                        gate: &g.gate,
                        passed: g.passed,
                        detail: &g.detail,
                    })
                    .collect(),
                diff: &i.diff,
            })
            .collect(),
    };
    match structured(f, &outcome) {
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
