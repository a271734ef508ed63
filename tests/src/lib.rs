//! Test fixtures for unitsync: in-process hubs on `127.0.0.1:0` with a
//! fresh SQLite store or PostgreSQL database each ([`hub`]), simulated agents built on the real
//! agent session client ([`sim_agent`]), simulated Kubernetes clusters
//! ([`kube_sim`]) with a real agent ([`cluster`]), a simulated ConfigHub
//! ([`confighub_sim`]), condition waits ([`wait`]),
//! and for the fault suite: the real binaries as processes ([`processes`]),
//! a real OCI registry ([`registry`]), a fault-injecting TCP proxy
//! ([`fault_proxy`]), a fleet of them
//! ([`fleet`]) and the history checker ([`history`]).

pub mod browser;
pub mod cluster;
pub mod confighub_sim;
pub mod fault_proxy;
pub mod fleet;
pub mod history;
pub mod hub;
pub mod kube_sim;
pub mod processes;
pub mod registry;
pub mod sim_agent;
pub mod wait;

pub use hub::TestHub;
pub use sim_agent::SimAgent;
pub use wait::{DEADLINE, until, within};

/// A small valid unit: one ConfigMap whose data carries `value`.
pub fn configmap(name: &str, value: &str) -> String {
    format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\n  namespace: apps\ndata:\n  value: \"{value}\"\n"
    )
}
