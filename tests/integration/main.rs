//! unitsync integration tests: one test binary, one module per area. Every
//! test starts its own hub on `127.0.0.1:0` with a fresh SQLite store.

mod agent;
mod auth;
mod cli;
mod delivery;
mod deploy;
mod kube_sim;
mod promote;
mod protocol;
mod store;
mod validation;
