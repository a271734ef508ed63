//! confighub-sim: a ConfigHub-API-compatible server for tests and the
//! quick start, built from the wire shapes of ConfigHub's public Go SDK
//! (`confighub/sdk`). [`model`] holds what it keeps, [`server`] serves the
//! worker API (both transports) and the operator API `cub` calls, and
//! [`cub`] is a small client that drives it the way `cub` does (including
//! `apply --wait`'s completion rule); `release publish` pushes a space's
//! units to an OCI registry in ConfigHub's release layout.

pub mod cub;
pub mod model;
mod release;
mod server;

pub use model::Faults;
pub use server::{ConfigHubSim, SimOptions};
