//! unitsync integration tests: one test binary, one module per area. Hub
//! tests start their own hub on `127.0.0.1:0` with a fresh store (SQLite, or a
//! fresh PostgreSQL database for the shared-store tests).

mod agent;
mod agent_faults;
mod auth;
mod cli;
mod confighub;
mod dashboard;
mod delivery;
mod deploy;
mod hub_faults;
mod kube_sim;
mod least_privilege;
mod oci;
mod promote;
mod protocol;
mod store;
mod tidy;
mod ui;
mod validation;
mod watch;
