//! `--wait`: block until every cluster of a unit's environment reports the
//! new revision Ready (or Destroyed), failing fast when one reports a
//! failure for it, or moves on to a later revision before it got there
//! (a commit made meanwhile supersedes it: the hub sends each cluster the
//! unit's latest revision, so the wait could never end). It follows
//! `WatchStatus` (the hub pushes each status as it is recorded): no
//! polling interval.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::bail;
use unitsync_proto::v1 as pb;

use super::client::Client;
use super::output::phase;

impl super::WaitArgs {
    /// Waits as asked on the command line (nothing without `--wait`).
    pub(super) async fn run(
        &self,
        client: &mut Client,
        unit: &str,
        revision: u64,
        tombstone: bool,
    ) -> anyhow::Result<()> {
        if !self.wait {
            return Ok(());
        }
        until_ready(
            client,
            unit,
            revision,
            tombstone,
            Duration::from_secs(self.timeout),
        )
        .await
    }
}

pub(super) async fn until_ready(
    client: &mut Client,
    unit: &str,
    revision: u64,
    tombstone: bool,
    timeout: Duration,
) -> anyhow::Result<()> {
    let want = if tombstone {
        pb::Phase::Destroyed
    } else {
        pb::Phase::Ready
    };
    let deadline = tokio::time::Instant::now() + timeout;
    // The hub pushes the unit's state, then every change to it.
    let mut events = client
        .watch_status(pb::WatchStatusRequest {
            environment: String::new(),
            unit: unit.to_owned(),
        })
        .await?
        .into_inner();
    let mut clusters: BTreeMap<String, bool> = BTreeMap::new();
    let mut cells: BTreeMap<String, pb::ClusterUnitStatus> = BTreeMap::new();
    let mut ready = false;
    let mut in_snapshot = false;
    let mut last_line = String::new();
    loop {
        let next = tokio::time::timeout_at(deadline, events.message()).await;
        let ended = match next {
            Ok(Ok(Some(ev))) => Ok(ev),
            Ok(Ok(None)) => bail!("the hub ended the status stream"),
            Ok(Err(e)) => Err(format!(
                "the hub ended the watch of {unit}@{revision} ({})",
                e.message()
            )),
            Err(_) => Err(format!(
                "timed out after {}s waiting for {unit}@{revision}",
                timeout.as_secs()
            )),
        };
        let ev = match ended {
            Ok(ev) => ev,
            Err(why) => {
                let verdict = judge(&clusters, &cells, revision, want);
                bail!(
                    "{why}; not {} yet:\n  {}",
                    phase(want.into()),
                    verdict.waiting.join("\n  ")
                );
            }
        };

        // A fresh snapshot (the hub starts over when clusters come or go,
        // or the watch fell behind) replaces what was known.
        if ev.snapshot && !in_snapshot {
            clusters.clear();
            cells.clear();
        }
        in_snapshot = ev.snapshot && !ev.snapshot_complete;
        for c in ev.clusters {
            clusters.insert(c.name, c.connected);
        }
        for c in ev.cells {
            merge(&mut cells, c);
        }
        if ev.snapshot && !ev.snapshot_complete {
            continue;
        }
        if ev.snapshot_complete {
            ready = true;
        }
        if !ready {
            continue;
        }
        if clusters.is_empty() {
            let env = unit.split_once('/').map_or("", |(e, _)| e);
            eprintln!("environment {env} has no clusters; nothing to wait for");
            return Ok(());
        }
        let v = judge(&clusters, &cells, revision, want);
        let line = format!(
            "{unit}@{revision}: {}/{} clusters {}{}",
            v.done,
            clusters.len(),
            phase(want.into()),
            if v.waiting.is_empty() {
                String::new()
            } else {
                format!(" ({})", v.waiting.join(", "))
            }
        );
        if line != last_line {
            eprintln!("{line}");
            last_line = line;
        }
        if !v.failed.is_empty() {
            bail!(
                "{unit}@{revision} failed in {} cluster(s):\n  {}",
                v.failed.len(),
                v.failed.join("\n  ")
            );
        }
        if v.done == clusters.len() {
            return Ok(());
        }
        if !v.superseded.is_empty() {
            bail!(
                "{unit}@{revision} was superseded before it was {} in every cluster ({}/{} were):\n  {}",
                phase(want.into()),
                v.done,
                clusters.len(),
                v.superseded.join("\n  ")
            );
        }
    }
}

/// Keeps `cell` unless the one held for its cluster is newer: a change
/// recorded before the watch's snapshot can arrive after it (the hub
/// subscribes first, so nothing is lost), and must not undo what the
/// snapshot showed (a stale `Degraded` would fail the wait).
fn merge(cells: &mut BTreeMap<String, pb::ClusterUnitStatus>, cell: pb::ClusterUnitStatus) {
    let at = |c: &pb::ClusterUnitStatus| {
        let t = c.updated_at.unwrap_or_default();
        (c.revision, t.seconds, t.nanos)
    };
    match cells.get(&cell.cluster) {
        Some(held) if at(held) > at(&cell) => {}
        _ => {
            cells.insert(cell.cluster.clone(), cell);
        }
    }
}

/// Said of a cluster whose agent is not connected (what it last reported
/// will not change until it is).
fn offline(connected: bool) -> &'static str {
    if connected {
        ""
    } else {
        " (agent not connected)"
    }
}

/// Where a revision stands across the environment's clusters.
struct Verdict {
    done: usize,
    failed: Vec<String>,
    /// Clusters that moved on to a later revision (or set this one aside).
    superseded: Vec<String>,
    waiting: Vec<String>,
}

fn judge(
    clusters: &BTreeMap<String, bool>,
    cells: &BTreeMap<String, pb::ClusterUnitStatus>,
    revision: u64,
    want: pb::Phase,
) -> Verdict {
    let mut v = Verdict {
        done: 0,
        failed: vec![],
        superseded: vec![],
        waiting: vec![],
    };
    for (name, connected) in clusters {
        match cells.get(name) {
            Some(s) if s.revision == revision && s.phase == i32::from(want) => v.done += 1,
            Some(s)
                if s.revision == revision
                    && matches!(
                        pb::Phase::try_from(s.phase),
                        Ok(pb::Phase::Failed | pb::Phase::Degraded)
                    ) =>
            {
                v.failed
                    .push(format!("{name}: {} {}", phase(s.phase), s.message));
            }
            Some(s) if s.revision > revision || s.acked_revision > revision => {
                let later = s.revision.max(s.acked_revision);
                v.superseded.push(format!("{name}: at revision {later}"));
            }
            Some(s) if s.revision == revision && s.phase == i32::from(pb::Phase::Superseded) => {
                v.superseded.push(format!("{name}: {}", phase(s.phase)));
            }
            Some(s) if s.revision == revision => {
                v.waiting
                    .push(format!("{name}: {}{}", phase(s.phase), offline(*connected)));
            }
            Some(s) if s.acked_revision >= revision => {
                v.waiting
                    .push(format!("{name}: received{}", offline(*connected)));
            }
            _ if !connected => v.waiting.push(format!("{name}: agent not connected")),
            _ => v.waiting.push(format!("{name}: pending")),
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cell(revision: u64, acked: u64, phase: pb::Phase) -> pb::ClusterUnitStatus {
        pb::ClusterUnitStatus {
            revision,
            acked_revision: acked,
            phase: phase.into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_change_older_than_the_snapshot_does_not_undo_it() {
        let at = |seconds, phase| pb::ClusterUnitStatus {
            cluster: "a".into(),
            updated_at: Some(prost_types::Timestamp { seconds, nanos: 0 }),
            ..cell(2, 2, phase)
        };
        let mut cells = BTreeMap::new();
        merge(&mut cells, at(20, pb::Phase::Ready));
        // Recorded at 10, broadcast after the snapshot read the state at 20.
        merge(&mut cells, at(10, pb::Phase::Degraded));
        assert_eq!(cells["a"].phase, i32::from(pb::Phase::Ready));
        let clusters: BTreeMap<String, bool> = [("a".to_owned(), true)].into();
        let v = judge(&clusters, &cells, 2, pb::Phase::Ready);
        assert!(v.failed.is_empty() && v.done == 1);
        // A newer one replaces it.
        merge(&mut cells, at(30, pb::Phase::Degraded));
        assert_eq!(cells["a"].phase, i32::from(pb::Phase::Degraded));
    }

    #[test]
    fn a_cluster_past_the_revision_supersedes_the_wait() {
        let clusters: BTreeMap<String, bool> =
            ["a", "b", "c", "d"].map(|c| (c.to_owned(), true)).into();
        let cells: BTreeMap<String, pb::ClusterUnitStatus> = [
            ("a", cell(2, 2, pb::Phase::Ready)),
            // Ready at 2 and has received 3: it was Ready at 2.
            ("b", cell(2, 3, pb::Phase::Ready)),
            ("c", cell(3, 3, pb::Phase::Ready)),
            ("d", cell(1, 3, pb::Phase::Ready)),
        ]
        .map(|(c, s)| (c.to_owned(), s))
        .into();
        let v = judge(&clusters, &cells, 2, pb::Phase::Ready);
        assert_eq!(v.done, 2);
        assert_eq!(v.superseded, ["c: at revision 3", "d: at revision 3"]);
        assert!(v.failed.is_empty() && v.waiting.is_empty());
        // Still on its way to 2: waiting, not superseded.
        let cells: BTreeMap<String, pb::ClusterUnitStatus> = [("a", cell(1, 2, pb::Phase::Ready))]
            .map(|(c, s)| (c.to_owned(), s))
            .into();
        let v = judge(&clusters, &cells, 2, pb::Phase::Ready);
        assert!(v.superseded.is_empty());
        assert_eq!(v.waiting[0], "a: received");
        // Its agent gone, it says so.
        let clusters: BTreeMap<String, bool> = [("a".to_owned(), false)].into();
        let v = judge(&clusters, &cells, 2, pb::Phase::Ready);
        assert_eq!(v.waiting, ["a: received (agent not connected)"]);
    }
}
