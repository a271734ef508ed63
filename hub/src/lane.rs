//! A runtime thread of its own, for work that must not queue behind the
//! agent sessions.
//!
//! On the hub's main runtime every wake-up of a task goes to the back of a
//! queue shared with thousands of agent sessions: under a delivery burst a
//! task that waits on something else many times over waits a full queue
//! each time. A store transaction is such a string of hand-overs (sqlx runs
//! each SQLite statement on the connection's own thread), and so is an
//! operator's call (authentication, then the store): commits took ~16 ms
//! each under a burst of deliveries to 1,000 agents and bounded the hub's
//! throughput. On a lane, a one-thread runtime that runs nothing else, each
//! hand-over is served at once. The hub has three: the store's (its
//! committer and its batched writes), the control plane's (operators'
//! connections and calls, the HTTP endpoints, the feedback writer's loop)
//! and the accept lane (new gRPC connections until their first call sends
//! them home, see [`crate::grpc::listener`]). One thread each.

use std::future::Future;

use tokio::runtime::{Handle, Runtime};
use tokio::task::JoinHandle;

/// The lane's runtime; shut down (without blocking) when the lane goes.
pub struct Lane {
    runtime: Option<Runtime>,
    handle: Handle,
}

impl std::fmt::Debug for Lane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lane").finish_non_exhaustive()
    }
}

impl Lane {
    /// Starts a lane whose thread is called `name`.
    pub fn new(name: &str) -> std::io::Result<Lane> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name(name)
            .enable_all()
            .build()?;
        Ok(Lane {
            handle: runtime.handle().clone(),
            runtime: Some(runtime),
        })
    }

    /// The lane's runtime, to spawn onto or register sockets with.
    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// Runs `work` on the lane.
    pub fn spawn<T: Send + 'static>(
        &self,
        work: impl Future<Output = T> + Send + 'static,
    ) -> JoinHandle<T> {
        self.handle.spawn(work)
    }
}

impl Drop for Lane {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}
