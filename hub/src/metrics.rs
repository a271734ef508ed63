//! Prometheus metrics of the hub (served at `/metrics`), and latency
//! histograms whose buckets the dashboard reads.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// The hub's metrics; cheap to update from any task.
pub struct Metrics {
    registry: Registry,
    pub connected_agents: Gauge,
    pub revisions_committed: Counter,
    pub updates_sent: Counter,
    pub deliveries: Counter,
    pub coalesced_updates: Counter,
    /// Commit to the agent's acknowledgement.
    pub delivery_latency: Latency,
    /// Commit to the first Ready report of that revision.
    pub ready_latency: Latency,
    pub status_reports: Counter,
    pub sessions_refused: Counter,
    /// 1 while the ConfigHub worker holds its lease or stream.
    pub confighub_connected: Gauge,
    pub confighub_operations: Family<OperationLabels, Counter>,
    pub confighub_report_retries: Counter,
    /// OCI source syncs, by source and result (`committed`, `unchanged`,
    /// `failed`).
    pub source_syncs: Family<SourceLabels, Counter>,
    /// When each source last synced without error (Unix seconds).
    pub source_last_success: Family<SourceLabel, Gauge>,
    /// Units each source owns.
    pub source_units: Family<SourceLabel, Gauge>,
}

/// Labels of a source sync.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    pub source: String,
    pub result: String,
}

/// A source's label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabel {
    pub source: String,
}

/// Labels of a finished source operation.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OperationLabels {
    pub action: String,
    pub result: String,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("unitsync");
        let connected_agents = Gauge::default();
        let revisions_committed = Counter::default();
        let updates_sent = Counter::default();
        let deliveries = Counter::default();
        let coalesced_updates = Counter::default();
        let status_reports = Counter::default();
        let sessions_refused = Counter::default();
        let delivery_latency = Latency::new();
        let ready_latency = Latency::new();
        registry.register(
            "connected_agents",
            "Agent sessions currently open",
            connected_agents.clone(),
        );
        registry.register(
            "revisions_committed",
            "Revisions committed to the store",
            revisions_committed.clone(),
        );
        registry.register(
            "updates_sent",
            "Unit updates written to agent streams",
            updates_sent.clone(),
        );
        registry.register(
            "deliveries",
            "Unit updates acknowledged by agents",
            deliveries.clone(),
        );
        registry.register(
            "coalesced_updates",
            "Pending updates replaced by a newer revision before being sent",
            coalesced_updates.clone(),
        );
        registry.register(
            "delivery_latency_seconds",
            "Time from commit to the agent's acknowledgement",
            delivery_latency.histogram.clone(),
        );
        registry.register(
            "ready_latency_seconds",
            "Time from commit to the first Ready report of the revision, per cluster",
            ready_latency.histogram.clone(),
        );
        registry.register(
            "status_reports",
            "Status reports received from agents",
            status_reports.clone(),
        );
        registry.register(
            "sessions_refused",
            "Agent sessions refused (auth, version, load)",
            sessions_refused.clone(),
        );
        let confighub_connected = Gauge::default();
        let confighub_operations = Family::<OperationLabels, Counter>::default();
        let confighub_report_retries = Counter::default();
        registry.register(
            "confighub_connected",
            "1 while the ConfigHub worker holds its lease (long poll) or stream",
            confighub_connected.clone(),
        );
        registry.register(
            "confighub_operations",
            "ConfigHub operations finished, by action and terminal result",
            confighub_operations.clone(),
        );
        registry.register(
            "confighub_report_retries",
            "Result reports to ConfigHub sent again after a failure",
            confighub_report_retries.clone(),
        );
        let source_syncs = Family::<SourceLabels, Counter>::default();
        let source_last_success = Family::<SourceLabel, Gauge>::default();
        let source_units = Family::<SourceLabel, Gauge>::default();
        registry.register(
            "source_syncs",
            "OCI source syncs, by source and result (committed, unchanged, failed)",
            source_syncs.clone(),
        );
        registry.register(
            "source_last_success_timestamp_seconds",
            "When each OCI source last synced without error",
            source_last_success.clone(),
        );
        registry.register(
            "source_units",
            "Units each OCI source owns",
            source_units.clone(),
        );
        Metrics {
            registry,
            source_syncs,
            source_last_success,
            source_units,
            confighub_connected,
            confighub_operations,
            confighub_report_retries,
            connected_agents,
            revisions_committed,
            updates_sent,
            deliveries,
            coalesced_updates,
            delivery_latency,
            ready_latency,
            status_reports,
            sessions_refused,
        }
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// A latency histogram (seconds) exported to Prometheus whose buckets can
/// also be read here: 0.5 ms to ~65 s, doubling.
#[derive(Clone)]
pub struct Latency {
    histogram: Histogram,
    bounds: Arc<[f64]>,
    /// Per bucket (not cumulative); the last one is everything above.
    counts: Arc<[AtomicU64]>,
}

impl Default for Latency {
    fn default() -> Self {
        Self::new()
    }
}

impl Latency {
    pub fn new() -> Latency {
        let bounds: Arc<[f64]> =
            prometheus_client::metrics::histogram::exponential_buckets(0.0005, 2.0, 18).collect();
        Latency {
            histogram: Histogram::new(bounds.iter().copied()),
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            bounds,
        }
    }

    pub fn observe(&self, seconds: f64) {
        self.histogram.observe(seconds);
        let i = self.bounds.partition_point(|b| *b < seconds);
        self.counts[i].fetch_add(1, Ordering::Relaxed);
    }

    /// The buckets as they are now.
    pub fn snapshot(&self) -> LatencySnapshot {
        LatencySnapshot {
            buckets: self
                .bounds
                .iter()
                .copied()
                .map(Some)
                .chain([None])
                .zip(self.counts.iter().map(|c| c.load(Ordering::Relaxed)))
                .collect(),
        }
    }
}

/// Observations per bucket: `(upper bound in seconds, count)`, the last
/// bucket unbounded (`None`).
#[derive(Clone, Debug, PartialEq)]
pub struct LatencySnapshot {
    pub buckets: Vec<(Option<f64>, u64)>,
}

impl LatencySnapshot {
    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|(_, n)| n).sum()
    }

    /// The `q` quantile, interpolated within its bucket as Prometheus'
    /// `histogram_quantile` does; `None` without observations. Above the
    /// last bound it is that bound (the estimate cannot say more).
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = q.clamp(0.0, 1.0) * total as f64;
        let mut below = 0u64;
        let mut lower = 0.0;
        for (upper, n) in &self.buckets {
            let Some(upper) = *upper else {
                return Some(lower);
            };
            if n > &0 && (below + n) as f64 >= rank {
                let within = (rank - below as f64) / *n as f64;
                return Some(lower + (upper - lower) * within);
            }
            below += n;
            lower = upper;
        }
        Some(lower)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_buckets_and_quantiles() {
        let m = Metrics::new();
        let l = &m.ready_latency;
        assert_eq!(l.snapshot().quantile(0.5), None);
        for _ in 0..90 {
            l.observe(0.003); // (0.002, 0.004]
        }
        for _ in 0..10 {
            l.observe(0.1); // (0.064, 0.128]
        }
        l.observe(1_000.0); // above every bound
        let s = l.snapshot();
        assert_eq!(s.count(), 101);
        let p50 = s.quantile(0.5).unwrap();
        assert!((0.002..=0.004).contains(&p50), "{p50}");
        let p95 = s.quantile(0.95).unwrap();
        assert!((0.064..=0.128).contains(&p95), "{p95}");
        assert_eq!(s.quantile(1.0), Some(0.0005 * 2f64.powi(17)));
        // The Prometheus side saw the same observations.
        let text = m.encode();
        assert!(
            text.contains("unitsync_ready_latency_seconds_count 101"),
            "{text}"
        );
    }
}
