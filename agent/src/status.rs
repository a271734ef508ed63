//! What the agent says about a unit: its phase at a revision and each
//! resource's sync state and health. The agent's own types; the session
//! (`hub_client`) turns them into the wire's.

use crate::health::Health;

/// Where a unit stands in a cluster at one revision.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Phase {
    Applying,
    Applied,
    Progressing,
    Ready,
    Degraded,
    Failed,
    Drifted,
    Destroyed,
    /// A newer revision arrived while this one was applied.
    Superseded,
    /// Nothing can be checked (the API server is unreachable).
    Unknown,
}

/// Whether a resource is as the revision says.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SyncState {
    Synced,
    OutOfSync,
    Failed,
    Pruned,
}

/// One resource of a unit, as last seen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResourceReport {
    pub api_version: String,
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub sync: SyncState,
    /// `None` when not assessed (pruned, failed to apply).
    pub health: Option<Health>,
    pub message: String,
    pub drifted_fields: Vec<String>,
}

/// A unit's status at one revision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatusUpdate {
    pub unit: String,
    pub revision: u64,
    pub phase: Phase,
    pub message: String,
    pub resources: Vec<ResourceReport>,
}
