//! Prometheus metrics of the hub (served at `/metrics`).

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
    pub delivery_latency: Histogram,
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
        // 0.5 ms .. ~65 s.
        let delivery_latency = Histogram::new(
            prometheus_client::metrics::histogram::exponential_buckets(0.0005, 2.0, 18),
        );
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
            delivery_latency.clone(),
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
