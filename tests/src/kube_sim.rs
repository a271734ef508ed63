//! kube-sim: an in-memory server that behaves like kube-apiserver 1.32 for
//! everything the unitsync agent uses, so that the real `kube` client (and
//! `kubectl`) can be tested against it: discovery, CRDs, server-side apply
//! with managedFields and conflicts, patches, finalizers and garbage
//! collection, list/watch with selectors, pagination, bookmarks and 410s,
//! simulated controllers, TLS, bearer tokens, RBAC for service accounts and
//! fault injection.
//!
//! ```no_run
//! # async fn f() -> anyhow::Result<()> {
//! use unitsync_tests::kube_sim::{KubeSim, SimOptions};
//! let sim = KubeSim::start(SimOptions::default()).await?;
//! let client = sim.client().await?;
//! # Ok(()) }
//! ```

mod controllers;
mod discovery;
mod errors;
mod fields;
mod rbac;
mod registry;
mod routes;
mod selector;
mod server;
mod store;
pub mod tls;
mod watch;

pub use controllers::FAIL_ANNOTATION;
pub use server::{Faults, KubeSim, SimOptions};
