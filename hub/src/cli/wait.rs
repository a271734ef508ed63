//! `--wait`: block until every cluster of a unit's environment reports the
//! new revision Ready (or Destroyed), failing fast when one reports a
//! failure for it.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::bail;
use unitsync_proto::v1 as pb;

use super::client::Client;
use super::output::phase;

/// How often the CLI asks the hub for status while waiting.
const POLL: Duration = Duration::from_millis(250);

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
    let env = unit.split_once('/').map_or("", |(e, _)| e).to_owned();
    let want = if tombstone {
        pb::Phase::Destroyed
    } else {
        pb::Phase::Ready
    };
    let deadline = Instant::now() + timeout;
    let mut last_line = String::new();
    loop {
        let clusters = client
            .list_clusters(pb::ListClustersRequest {
                environment: env.clone(),
            })
            .await?
            .into_inner()
            .clusters;
        if clusters.is_empty() {
            eprintln!("environment {env} has no clusters; nothing to wait for");
            return Ok(());
        }
        let detail = super::client::unit_detail(client, unit, false)
            .await?
            .into_inner();
        let cells: BTreeMap<&str, &pb::ClusterUnitStatus> = detail
            .clusters
            .iter()
            .map(|c| (c.cluster.as_str(), c))
            .collect();
        let mut done = 0;
        let mut failed = Vec::new();
        let mut waiting = Vec::new();
        for c in &clusters {
            match cells.get(c.name.as_str()) {
                Some(s) if s.revision == revision && s.phase == i32::from(want) => done += 1,
                Some(s)
                    if s.revision == revision
                        && matches!(
                            pb::Phase::try_from(s.phase),
                            Ok(pb::Phase::Failed | pb::Phase::Degraded)
                        ) =>
                {
                    failed.push(format!("{}: {} {}", c.name, phase(s.phase), s.message));
                }
                Some(s) if s.revision == revision => {
                    waiting.push(format!("{}: {}", c.name, phase(s.phase)));
                }
                Some(s) if s.acked_revision >= revision => {
                    waiting.push(format!("{}: received", c.name));
                }
                _ if !c.connected => waiting.push(format!("{}: agent not connected", c.name)),
                _ => waiting.push(format!("{}: pending", c.name)),
            }
        }
        let line = format!(
            "{unit}@{revision}: {done}/{} clusters {}{}",
            clusters.len(),
            phase(want.into()),
            if waiting.is_empty() {
                String::new()
            } else {
                format!(" ({})", waiting.join(", "))
            }
        );
        if line != last_line {
            eprintln!("{line}");
            last_line = line;
        }
        if !failed.is_empty() {
            bail!(
                "{unit}@{revision} failed in {} cluster(s):\n  {}",
                failed.len(),
                failed.join("\n  ")
            );
        }
        if done == clusters.len() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "timed out after {}s waiting for {unit}@{revision}; not {} yet:\n  {}",
                timeout.as_secs(),
                phase(want.into()),
                waiting.join("\n  ")
            );
        }
        tokio::time::sleep(POLL).await;
    }
}
