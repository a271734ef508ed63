//! Prometheus metrics of the agent, served at `/metrics` beside the probes:
//! passes over units by result and how long they took, drift found and
//! healed, and the hub session.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// The agent's metrics; cheap to update from any task.
pub struct AgentMetrics {
    registry: Registry,
    /// Passes over a unit, by result.
    pub passes: Family<PassLabels, Counter>,
    /// How long a pass took (apply, prune, health), by result.
    pub pass_duration: Family<PassLabels, Histogram>,
    /// Objects found changed by someone else.
    pub drift_detected: Counter,
    /// Drifted objects set back to the unit's content.
    pub drift_healed: Counter,
    /// 1 while a session with the hub is open.
    pub hub_connected: Gauge,
    /// Sessions the hub welcomed (a reconnect counts one more).
    pub hub_sessions: Counter,
    /// Units the agent is reconciling.
    pub units: Gauge,
    /// Objects the agent remembers writing (to tell its own writes from
    /// others'); follows what it manages.
    pub tracked_objects: Gauge,
}

/// How a pass over a unit ended.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PassLabels {
    /// `applied`, `destroyed`, `failed`, `unknown` (API server unreachable)
    /// or `superseded`.
    pub result: &'static str,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl AgentMetrics {
    pub fn new() -> AgentMetrics {
        let mut registry = Registry::with_prefix("unitsync_agent");
        let passes = Family::<PassLabels, Counter>::default();
        let pass_duration = Family::<PassLabels, Histogram>::new_with_constructor(|| {
            Histogram::new([
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
            ])
        });
        let drift_detected = Counter::default();
        let drift_healed = Counter::default();
        let hub_connected = Gauge::default();
        let hub_sessions = Counter::default();
        let units = Gauge::default();
        let tracked_objects = Gauge::default();
        registry.register(
            "passes",
            "Passes over a unit (apply or destroy), by result",
            passes.clone(),
        );
        registry.register(
            "pass_duration_seconds",
            "Time a pass over a unit took, by result",
            pass_duration.clone(),
        );
        registry.register(
            "drift_detected",
            "Objects found changed by someone else",
            drift_detected.clone(),
        );
        registry.register(
            "drift_healed",
            "Drifted objects set back to the unit's content",
            drift_healed.clone(),
        );
        registry.register(
            "hub_connected",
            "1 while a session with the hub is open",
            hub_connected.clone(),
        );
        registry.register(
            "hub_sessions",
            "Sessions the hub welcomed",
            hub_sessions.clone(),
        );
        registry.register("units", "Units the agent reconciles", units.clone());
        registry.register(
            "tracked_objects",
            "Objects the agent remembers writing (to tell its own writes from others')",
            tracked_objects.clone(),
        );
        AgentMetrics {
            registry,
            passes,
            pass_duration,
            drift_detected,
            drift_healed,
            hub_connected,
            hub_sessions,
            units,
            tracked_objects,
        }
    }

    /// Records one finished pass.
    pub fn pass(&self, result: &'static str, took: std::time::Duration) {
        let labels = PassLabels { result };
        self.passes.get_or_create(&labels).inc();
        self.pass_duration
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_are_counted_by_result() {
        let m = AgentMetrics::new();
        m.pass("applied", std::time::Duration::from_millis(30));
        m.pass("applied", std::time::Duration::from_millis(30));
        m.pass("failed", std::time::Duration::from_secs(2));
        m.drift_healed.inc();
        let text = m.encode();
        assert!(
            text.contains("unitsync_agent_passes_total{result=\"applied\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("unitsync_agent_passes_total{result=\"failed\"} 1"),
            "{text}"
        );
        assert!(
            text.contains(
                "unitsync_agent_pass_duration_seconds_bucket{le=\"2.5\",result=\"failed\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("unitsync_agent_drift_healed_total 1"),
            "{text}"
        );
    }
}
