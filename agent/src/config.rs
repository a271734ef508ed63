//! Typed configuration of `unitsync-agent`, validated once.

use std::path::PathBuf;
use std::time::Duration;

use crate::hub_client::HubConnection;
use crate::reconcile::Tuning;

/// Where the cluster is.
#[derive(Clone, Debug)]
pub enum KubeTarget {
    /// `KUBECONFIG` or `~/.kube/config` when present, else the in-cluster
    /// service account.
    Infer,
    /// A kubeconfig file and optional context.
    Kubeconfig {
        path: PathBuf,
        context: Option<String>,
    },
}

#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub hub: HubConnection,
    pub kube: KubeTarget,
    /// The agent's own namespace (inventories live here).
    pub namespace: String,
    /// Directory of the desired-state record.
    pub state_dir: PathBuf,
    pub tuning: Tuning,
    /// How long to wait for a new CRD to be established.
    pub crd_timeout: Duration,
    /// Validity asked for when renewing the client certificate (zero: the
    /// hub's default, 30 days).
    pub cert_validity: Duration,
    /// Serve `/healthz` and `/readyz` here.
    pub health_listen: Option<std::net::SocketAddr>,
    /// When not empty, objects outside these namespaces (and cluster-scoped
    /// ones) are refused: the agent runs with namespaced RBAC.
    pub allowed_namespaces: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

impl AgentConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.hub.token.trim().is_empty() && self.hub.identity.is_none() {
            return Err(ConfigError(
                "the agent needs a token or a client certificate".into(),
            ));
        }
        if !(0.0..=1.0).contains(&self.tuning.max_prune_ratio) {
            return Err(ConfigError(
                "max prune ratio must be between 0 and 1".into(),
            ));
        }
        if self.namespace.is_empty() {
            return Err(ConfigError("the agent namespace is empty".into()));
        }
        Ok(())
    }
}
