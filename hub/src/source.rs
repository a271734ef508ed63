//! Sources of units besides the operator CLI: the ConfigHub worker
//! ([`confighub`]) and OCI artifacts ([`oci`]: ConfigHub releases,
//! Flux-style artifacts). A source acts only through [`crate::control::Hub`]
//! operations (validation, commit, audit, publish, like the CLI) and owns
//! the units it creates: other writers are refused.
//!
//! **Architecture invariant:** sources depend on the hub's core; the core
//! never depends on a source.

pub mod confighub;
pub mod oci;
