//! unitsync hub: the authoritative store of units and revisions, the agent
//! stream, and the operator CLI (`unitsync`).
//!
//! Entry points: [`server::start`] runs a hub; [`cli`] is the operator CLI.
//! See ARCHITECTURE.md for the code map and invariants.

pub mod auth;
pub mod cli;
pub mod config;
pub mod control;
pub mod error;
pub mod events;
pub mod fanout;
pub mod feedback;
pub mod grpc;
pub mod http;
pub mod lane;
pub mod manifest;
pub mod metrics;
pub mod model;
pub mod promote;
pub mod server;
pub mod source;
pub mod store;
pub mod tls;
pub mod ui;

pub use config::Config;
pub use server::{RunningHub, start};
