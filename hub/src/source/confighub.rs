//! The ConfigHub worker adapter: the hub is one ConfigHub worker for every
//! cluster. `wire` holds ConfigHub's JSON shapes (nothing else sees them),
//! `client` the HTTP calls of both transports, `worker` the worker (its
//! `connection`: registration, transports, lease, heartbeats; its
//! `operations`: Apply, Destroy, Refresh, Import, Cancel) and `verdict`
//! what ConfigHub hears from the clusters' statuses.

pub mod client;
mod verdict;
pub mod wire;
mod worker;

use std::time::Duration;

use crate::auth::Secret;
use crate::model::EnvName;

pub use worker::{Worker, target_slug};

/// How the worker talks to ConfigHub.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// HTTP long poll with a lease (the default; one replica works the queue).
    LongPoll,
    /// The HTTP/2 server-sent-event stream (older servers).
    Http2Stream,
}

impl std::str::FromStr for Transport {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "long-poll" => Ok(Transport::LongPoll),
            "http2-stream" => Ok(Transport::Http2Stream),
            other => Err(format!(
                "unknown ConfigHub transport {other:?} (long-poll or http2-stream)"
            )),
        }
    }
}

/// What ends an Apply whose resources are stuck (ImagePullBackOff,
/// crash loops, progress deadlines).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StuckResult {
    /// `ApplyWaitFailed`: every ConfigHub server knows it.
    WaitFailed,
    /// `ApplyStuck`, for servers that know it.
    Stuck,
}

impl StuckResult {
    pub fn as_str(self) -> &'static str {
        match self {
            StuckResult::WaitFailed => wire::result::APPLY_WAIT_FAILED,
            StuckResult::Stuck => wire::result::APPLY_STUCK,
        }
    }
}

/// The worker's configuration (validated once, with the hub's).
#[derive(Clone, Debug)]
pub struct ConfigHubConfig {
    /// ConfigHub's URL, e.g. `https://hub.confighub.com`.
    pub url: String,
    pub worker_id: String,
    /// The worker secret (`cub worker create` prints it). Never logged.
    pub secret: Secret,
    pub transport: Transport,
    /// A CA to trust instead of the system roots (a private ConfigHub).
    pub ca_pem: Option<String>,
    /// Environments offered as targets (`None`: all of them).
    pub environments: Option<Vec<EnvName>>,
    /// How long an Apply or Destroy waits for every cluster (unless the
    /// target asks for another `WaitTimeout`).
    pub wait_timeout: Duration,
    pub stuck_result: StuckResult,
}

impl ConfigHubConfig {
    /// Whether promotions into `env` must happen in ConfigHub instead.
    pub fn feeds(&self, env: &EnvName) -> bool {
        self.environments.as_ref().is_none_or(|e| e.contains(env))
    }
}
