//! unitsync agent: keeps one cluster in the state the hub assigns to it.
//!
//! This crate currently holds the hub side of the agent: the durable
//! desired-state record ([`desired`]) and the session client
//! ([`hub_client`]). Applying to Kubernetes lands with the agent issue.

pub mod desired;
pub mod hub_client;
