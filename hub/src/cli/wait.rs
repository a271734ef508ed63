//! `--wait`: block until every cluster of a unit's environment reports the
//! new revision Ready (or Destroyed), failing fast when one reports a
//! failure for it, or moves on to a later revision before it got there
//! (a commit made meanwhile supersedes it: the hub sends each cluster the
//! unit's latest revision, so the wait could never end). It follows
//! `WatchStatus` (the hub pushes each status as it is recorded): no
//! polling interval.

use std::time::Duration;

use anyhow::bail;
use unitsync_proto::v1 as pb;

use super::client::Client;
use super::follow::{Followed, View, Watch};
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
    // The hub pushes the unit's state, then every change to it; after a
    // restart of the hub, the watch reopens with its state again.
    let mut watch = Watch::new(
        client,
        pb::WatchStatusRequest {
            environment: String::new(),
            unit: unit.to_owned(),
        },
    );
    let mut last_line = String::new();
    loop {
        let ended = match tokio::time::timeout_at(deadline, watch.next()).await {
            Ok(Ok(Followed::Changed { whole: true })) => None,
            Ok(Ok(Followed::Changed { whole: false })) => continue,
            Ok(Ok(Followed::Lost(why))) => {
                eprintln!("lost the hub ({}); reconnecting", why.message());
                last_line.clear();
                continue;
            }
            Ok(Err(e)) => Some(format!(
                "the hub ended the watch of {unit}@{revision} ({})",
                e.message()
            )),
            Err(_) => Some(format!(
                "timed out after {}s waiting for {unit}@{revision}{}",
                timeout.as_secs(),
                watch.lost().map_or(String::new(), |why| format!(
                    " (the hub is out of reach: {})",
                    why.message()
                ))
            )),
        };
        let view = watch.view();
        if let Some(why) = ended {
            let waiting = judge(view, unit, revision, want).waiting;
            if waiting.is_empty() {
                bail!("{why}; no status seen yet");
            }
            bail!(
                "{why}; not {} yet:\n  {}",
                phase(want.into()),
                waiting.join("\n  ")
            );
        }
        let v = judge(view, unit, revision, want);
        if v.clusters == 0 {
            let env = unit.split_once('/').map_or("", |(e, _)| e);
            eprintln!(
                "environment {env} has no clusters (revoked ones do not count); nothing to wait for"
            );
            return Ok(());
        }
        let line = format!(
            "{unit}@{revision}: {}/{} clusters {}{}",
            v.done,
            v.clusters,
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
        if v.done == v.clusters {
            return Ok(());
        }
        if !v.superseded.is_empty() {
            bail!(
                "{unit}@{revision} was superseded before it was {} in every cluster ({}/{} were):\n  {}",
                phase(want.into()),
                v.done,
                v.clusters,
                v.superseded.join("\n  ")
            );
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
    /// The clusters that count (a revoked one never reports again).
    clusters: usize,
    done: usize,
    failed: Vec<String>,
    /// Clusters that moved on to a later revision (or set this one aside).
    superseded: Vec<String>,
    waiting: Vec<String>,
}

/// Where `unit@revision` stands in every cluster the view holds.
fn judge(view: &View, unit: &str, revision: u64, want: pb::Phase) -> Verdict {
    let mut v = Verdict {
        clusters: 0,
        done: 0,
        failed: vec![],
        superseded: vec![],
        waiting: vec![],
    };
    for (name, cluster) in view.clusters.iter().filter(|(_, c)| !c.revoked) {
        v.clusters += 1;
        let connected = cluster.connected;
        match view.cell(unit, name) {
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
                    .push(format!("{name}: {}{}", phase(s.phase), offline(connected)));
            }
            Some(s) if s.acked_revision >= revision => {
                v.waiting
                    .push(format!("{name}: received{}", offline(connected)));
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

    fn cell(cluster: &str, revision: u64, acked: u64) -> pb::ClusterUnitStatus {
        pb::ClusterUnitStatus {
            unit: "dev/web".into(),
            cluster: cluster.into(),
            revision,
            acked_revision: acked,
            phase: pb::Phase::Ready.into(),
            ..Default::default()
        }
    }

    /// A view of `clusters` (name, connected) and `cells` of `dev/web`.
    fn view(clusters: &[(&str, bool)], cells: Vec<pb::ClusterUnitStatus>) -> View {
        let mut view = View::default();
        view.apply(pb::StatusEvent {
            snapshot: true,
            snapshot_complete: true,
            clusters: clusters
                .iter()
                .map(|(name, connected)| pb::Cluster {
                    name: (*name).into(),
                    connected: *connected,
                    ..Default::default()
                })
                .collect(),
            cells,
            ..Default::default()
        });
        view
    }

    #[test]
    fn a_cluster_past_the_revision_supersedes_the_wait() {
        let clusters = ["a", "b", "c", "d"].map(|c| (c, true));
        let v = view(
            &clusters,
            vec![
                cell("a", 2, 2),
                // Ready at 2 and has received 3: it was Ready at 2.
                cell("b", 2, 3),
                cell("c", 3, 3),
                cell("d", 1, 3),
            ],
        );
        let v = judge(&v, "dev/web", 2, pb::Phase::Ready);
        assert_eq!(v.done, 2);
        assert_eq!(v.superseded, ["c: at revision 3", "d: at revision 3"]);
        assert!(v.failed.is_empty() && v.waiting.is_empty());
        // Still on its way to 2: waiting, not superseded.
        let v = judge(
            &view(&clusters[..1], vec![cell("a", 1, 2)]),
            "dev/web",
            2,
            pb::Phase::Ready,
        );
        assert!(v.superseded.is_empty());
        assert_eq!(v.waiting[0], "a: received");
        // Its agent gone, it says so.
        let v = judge(
            &view(&[("a", false)], vec![cell("a", 1, 2)]),
            "dev/web",
            2,
            pb::Phase::Ready,
        );
        assert_eq!(v.waiting, ["a: received (agent not connected)"]);
    }

    #[test]
    fn a_revoked_cluster_is_not_waited_for() {
        let mut v = view(&[("a", true), ("b", false)], vec![cell("a", 2, 2)]);
        // b is revoked: it never reports again.
        v.apply(pb::StatusEvent {
            clusters: vec![pb::Cluster {
                name: "b".into(),
                revoked: true,
                ..Default::default()
            }],
            ..Default::default()
        });
        let j = judge(&v, "dev/web", 2, pb::Phase::Ready);
        assert_eq!((j.done, j.clusters), (1, 1));
        assert!(j.waiting.is_empty(), "{:?}", j.waiting);
    }
}
