//! The hub's durable state behind one trait. One implementation,
//! [`SqlStore`], serves both backends: SQLite (the embedded default) and
//! PostgreSQL (shared by hub replicas); `tests/integration/store.rs` states
//! the contract once and runs it on both.
//!
//! Every mutation writes its audit entry in the same transaction, and a
//! failed call leaves the store unchanged.

mod backend;
mod commit;
mod rows;
mod sql;

use async_trait::async_trait;

use crate::model::{
    AuditEntry, Cluster, ClusterName, EnvName, EnvPolicy, Environment, HeadRef, Labels, NewAudit,
    NewRevision, Override, Phase, PromotedUnit, Promotion, Revision, RevisionNum, Role, StatusCell,
    StatusReport, Unit, UnitRef,
};

pub use sql::SqlStore;

/// Stores and records for the hub's unit tests.
#[cfg(test)]
pub(crate) mod testing {
    use std::sync::Arc;

    use super::{SqlStore, Store};
    use crate::model::{Actor, Digest, EnvName, EnvPolicy, NewAudit, NewRevision, PutMode};

    /// An audit entry by the tester.
    pub(crate) fn audit(action: &'static str, target: &str) -> NewAudit {
        NewAudit {
            actor: Actor::Operator("tester".into()),
            action,
            target: target.into(),
            detail: String::new(),
        }
    }

    /// A revision of `unit` (`ENV/NAME`) with `text` as its manifests.
    pub(crate) fn rev(unit: &str, text: &str, mode: PutMode) -> NewRevision {
        NewRevision {
            mode,
            ..NewRevision::content(
                unit.parse().unwrap(),
                Arc::from(text),
                1,
                Digest::of(text.as_bytes()),
                Actor::Operator("tester".into()),
                "test",
                "",
            )
        }
    }

    /// A SQLite store in `dir` with the environment `dev`.
    pub(crate) async fn store(dir: &tempfile::TempDir) -> SqlStore {
        let store = SqlStore::sqlite(&dir.path().join("hub.db")).await.unwrap();
        let dev: EnvName = "dev".parse().unwrap();
        store
            .create_environment(
                &dev,
                None,
                EnvPolicy::default(),
                audit("environment.create", "env/dev"),
            )
            .await
            .unwrap();
        store
    }
}

/// What a store sharing replicas announces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Announcement {
    /// A revision committed (by any replica).
    Revision(UnitRef, RevisionNum),
    /// Announcements may have been missed (the listener reconnected):
    /// re-offer every head to connected agents, and start every watcher
    /// over from the store.
    Resync,
    /// Another replica recorded a cluster's status of a unit (its agent
    /// is connected there): watchers here hear of it too.
    Status(ClusterName, UnitRef),
    /// Another replica created or deleted a cluster of the environment.
    Clusters(EnvName),
    /// Another replica's agent sessions opened or closed.
    Sessions,
    /// Another replica revoked, rotated or deleted a cluster's credential.
    Credentials(ClusterName),
}

/// Announcements from other hubs sharing the store.
pub type AnnouncementStream = std::pin::Pin<Box<dyn futures::Stream<Item = Announcement> + Send>>;

/// SHA-256 of a bearer token, the only form in which tokens are stored.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TokenHash(pub String);

/// An operator credential's owner.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Operator {
    pub name: String,
    pub role: Role,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0} already exists")]
    AlreadyExists(String),
    #[error("{0}")]
    Conflict(String),
    #[error("database error")]
    Database(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
}

pub type StoreResult<T> = Result<T, StoreError>;

/// A promotion about to be recorded with its revisions.
#[derive(Clone, Debug)]
pub struct NewPromotion {
    pub actor: crate::model::Actor,
    pub from: EnvName,
    pub to: EnvName,
    pub automatic: bool,
    pub forced: bool,
    pub reason: String,
    /// In the order of the revisions committed with it.
    pub items: Vec<PromotedUnit>,
}

/// A page of a listing: rows after `after` (the last row of the previous
/// page), at most `limit` (0: all).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Page {
    pub after: Option<(UnitRef, ClusterName)>,
    pub limit: u32,
}

impl Page {
    /// Everything.
    pub const ALL: Page = Page {
        after: None,
        limit: 0,
    };
}

/// An agent session opened or closed: when, and with which agent version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    pub cluster: ClusterName,
    pub agent_version: String,
    pub at: crate::model::UnixMillis,
}

/// One acknowledged receipt: the cluster's agent recorded this revision
/// durably (batched by the hub's feedback writer).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ack {
    pub cluster: ClusterName,
    pub unit: UnitRef,
    pub revision: RevisionNum,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    // --- environments ---
    /// Creates an environment after `after` (or last), with its policy.
    async fn create_environment(
        &self,
        name: &EnvName,
        after: Option<&EnvName>,
        policy: EnvPolicy,
        audit: NewAudit,
    ) -> StoreResult<Environment>;
    /// All environments in pipeline order.
    async fn list_environments(&self) -> StoreResult<Vec<Environment>>;

    // --- clusters and credentials ---
    async fn create_cluster(
        &self,
        name: &ClusterName,
        env: &EnvName,
        labels: &Labels,
        token: &TokenHash,
        audit: NewAudit,
    ) -> StoreResult<Cluster>;
    async fn list_clusters(&self, env: Option<&EnvName>) -> StoreResult<Vec<Cluster>>;
    async fn get_cluster(&self, name: &ClusterName) -> StoreResult<Option<Cluster>>;
    /// Deletes the cluster, its credential and its statuses; the
    /// environment it was in.
    async fn delete_cluster(&self, name: &ClusterName, audit: NewAudit) -> StoreResult<EnvName>;
    async fn cluster_by_token(&self, token: &TokenHash) -> StoreResult<Option<Cluster>>;
    /// Registers a client certificate (by SHA-256 fingerprint) for a cluster.
    async fn add_cluster_cert(
        &self,
        name: &ClusterName,
        fingerprint: &str,
        not_after: crate::model::UnixMillis,
        audit: NewAudit,
    ) -> StoreResult<()>;
    /// The cluster a client certificate belongs to (not revoked).
    async fn cluster_by_cert(&self, fingerprint: &str) -> StoreResult<Option<Cluster>>;
    /// The status cells of these clusters and units (those that exist).
    async fn cells(&self, which: &[(ClusterName, UnitRef)]) -> StoreResult<Vec<StatusCell>>;
    /// The latest time a status was recorded at (0 without any).
    async fn latest_status_time(&self) -> StoreResult<crate::model::UnixMillis>;
    /// Of the clusters and the credentials their sessions opened with,
    /// those whose credential still names the cluster (not revoked,
    /// rotated away or deleted), in a few batched queries.
    async fn credentials_in_force(
        &self,
        held: &[(ClusterName, crate::auth::Credential)],
    ) -> StoreResult<std::collections::HashSet<(ClusterName, crate::auth::Credential)>>;
    /// Revokes every credential of a cluster, for good (kept for the audit trail).
    async fn revoke_cluster(&self, name: &ClusterName, audit: NewAudit) -> StoreResult<()>;
    /// Replaces a cluster's credential.
    async fn set_cluster_token(
        &self,
        name: &ClusterName,
        token: &TokenHash,
        audit: NewAudit,
    ) -> StoreResult<()>;
    /// Creates an operator credential; `AlreadyExists` when the name is taken.
    async fn create_operator(
        &self,
        op: &Operator,
        token: &TokenHash,
        audit: NewAudit,
    ) -> StoreResult<()>;
    /// Replaces an operator's token (the old one stops working at once);
    /// `NotFound` for an unknown name.
    async fn rotate_operator(
        &self,
        name: &str,
        token: &TokenHash,
        audit: NewAudit,
    ) -> StoreResult<Operator>;
    /// Sets the `admin` operator's token to the data directory's
    /// `admin.token` (at start-up: the file is the truth).
    async fn install_admin_token(&self, token: &TokenHash) -> StoreResult<()>;
    async fn operator_by_token(&self, token: &TokenHash) -> StoreResult<Option<Operator>>;

    // --- units and revisions ---
    /// Commits a revision atomically (unit row, revision, head, audit).
    /// Fails with `Conflict` when the put mode does not fit the unit's state,
    /// or the unit's head is not the revision's `expected_head`.
    async fn commit_revision(&self, rev: NewRevision) -> StoreResult<Revision> {
        let (mut revs, _) = self.commit_release(vec![rev], None).await?;
        revs.pop()
            .ok_or_else(|| StoreError::Corrupt("no revision committed".into()))
    }
    /// Commits several revisions in one transaction (all or none), and the
    /// promotion record when given (its items get the committed numbers).
    async fn commit_release(
        &self,
        revs: Vec<NewRevision>,
        promotion: Option<NewPromotion>,
    ) -> StoreResult<(Vec<Revision>, Option<u64>)>;
    async fn get_unit(&self, unit: &UnitRef) -> StoreResult<Option<Unit>>;
    async fn list_units(&self, env: Option<&EnvName>) -> StoreResult<Vec<Unit>>;
    /// All revisions of a unit, oldest first, without content.
    async fn history(&self, unit: &UnitRef) -> StoreResult<Vec<Revision>>;
    /// One revision with its content.
    async fn get_revision(&self, unit: &UnitRef, n: RevisionNum) -> StoreResult<Option<Revision>>;
    /// The head revision of every unit in an environment, without content.
    async fn heads(&self, env: &EnvName) -> StoreResult<Vec<HeadRef>>;

    // --- agent feedback ---
    // Each of these writes its batch in one statement: a batch holds at
    // most one entry per cluster (and unit), as the hub's feedback buffer
    // coalesces them.
    /// Records acknowledged receipts (never lowers a recorded revision).
    async fn record_acks(&self, acks: &[Ack]) -> StoreResult<()>;
    /// Records the latest status per (cluster, unit): one older than the
    /// recorded one (a lower revision, or the same one received earlier)
    /// is not written, unless the recorded one is of a revision the unit
    /// did not have. Announced to other replicas.
    async fn record_statuses(&self, reports: &[StatusReport]) -> StoreResult<()>;
    /// Records when agents were last seen (never moves a cluster's time back).
    async fn record_seen(&self, seen: &[Seen]) -> StoreResult<()>;
    /// Status rows for an environment (all when `None`), optionally one
    /// unit, ordered by environment, unit and cluster; a page of them.
    async fn statuses(
        &self,
        env: Option<&EnvName>,
        unit: Option<&UnitRef>,
        page: &Page,
    ) -> StoreResult<Vec<StatusCell>>;

    /// One cluster's status rows, ordered by unit.
    async fn cluster_statuses(&self, cluster: &ClusterName) -> StoreResult<Vec<StatusCell>>;
    /// How many units each cluster (of an environment, or all) runs per
    /// phase; a unit whose reported revision is not its head counts as
    /// `Unknown` (not there yet). Ordered by cluster, then phase name.
    async fn phase_counts(
        &self,
        env: Option<&EnvName>,
    ) -> StoreResult<Vec<(ClusterName, Phase, u64)>>;

    /// How many clusters report each unit (of an environment, or all) at
    /// its head, per phase; `None` counts reports of an older revision
    /// (behind). Ordered by unit.
    async fn unit_phase_counts(
        &self,
        env: Option<&EnvName>,
    ) -> StoreResult<Vec<(UnitRef, Option<Phase>, u64)>>;

    // --- promotion ---
    async fn set_environment_policy(
        &self,
        env: &EnvName,
        policy: EnvPolicy,
        audit: NewAudit,
    ) -> StoreResult<Environment>;
    async fn set_overrides(
        &self,
        unit: &UnitRef,
        overrides: &[Override],
        audit: NewAudit,
    ) -> StoreResult<Unit>;
    /// Records an approval; `AlreadyExists` when this approver already
    /// approved. Returns the approvers so far.
    async fn approve(
        &self,
        target: &EnvName,
        unit: &UnitRef,
        revision: RevisionNum,
        approver: &str,
        audit: NewAudit,
    ) -> StoreResult<Vec<String>>;
    async fn approvals(
        &self,
        target: &EnvName,
        unit: &UnitRef,
        revision: RevisionNum,
    ) -> StoreResult<Vec<String>>;
    /// Newest first.
    async fn list_promotions(&self, limit: u32) -> StoreResult<Vec<Promotion>>;
    async fn get_promotion(&self, id: u64) -> StoreResult<Option<Promotion>>;

    // --- replicas ---
    /// What the other hubs sharing this store announce (their commits,
    /// statuses and cluster changes), as they commit (`None`: the store
    /// is this hub's alone).
    async fn subscribe(&self) -> StoreResult<Option<AnnouncementStream>>;

    /// Records the agent sessions this hub opened (replacing the cluster's
    /// previous one here) and closed (with `replace`, first drops every
    /// one it recorded: `opened` are then all it holds), and holds them
    /// under a lease for `lease` on the store's clock (replicas' clocks may
    /// differ): past it, other replicas count them closed (this hub
    /// crashed); a zero lease ends them at once (it stops). Announced to
    /// other replicas when anything but the lease changed.
    async fn record_sessions(
        &self,
        opened: &[Seen],
        closed: &[ClusterName],
        replace: bool,
        lease: std::time::Duration,
    ) -> StoreResult<()>;
    /// The agent sessions other replicas hold under a lease running now
    /// (the store's clock), with their clusters' environments (a deleted
    /// cluster's are left out), ordered by cluster and then by when they
    /// opened.
    async fn sessions_elsewhere(&self) -> StoreResult<Vec<(EnvName, Seen)>>;

    /// Whether this hub runs the store's singleton tasks (automatic
    /// promotion): always for a store of its own; for a shared store, the
    /// replica holding the leader lock.
    async fn is_leader(&self) -> StoreResult<bool>;

    /// Whether the store takes writes now (readiness).
    async fn ping(&self) -> StoreResult<()>;

    // --- source operations ---
    /// Records (or updates) an operation a source asked for.
    async fn put_operation(&self, op: &crate::model::SourceOperation) -> StoreResult<()>;
    /// Records an operation's terminal report unless one is recorded
    /// already (by this hub or another replica): true when this call
    /// decided it, and only then may the report be sent.
    async fn decide_operation(&self, op: &crate::model::SourceOperation) -> StoreResult<bool>;
    async fn get_operation(&self, id: &str) -> StoreResult<Option<crate::model::SourceOperation>>;
    /// A source's operations whose terminal report is not delivered yet,
    /// oldest first.
    async fn open_operations(
        &self,
        source: &str,
    ) -> StoreResult<Vec<crate::model::SourceOperation>>;

    // --- OCI sources ---
    async fn create_source(
        &self,
        source: &crate::model::OciSource,
        auth: &crate::model::OciAuth,
        audit: NewAudit,
    ) -> StoreResult<()>;
    async fn list_sources(&self) -> StoreResult<Vec<crate::model::OciSource>>;
    async fn get_source(
        &self,
        name: &crate::model::SourceName,
    ) -> StoreResult<Option<crate::model::OciSource>>;
    /// The registry credentials (only the hub's source runner reads them).
    async fn source_auth(
        &self,
        name: &crate::model::SourceName,
    ) -> StoreResult<crate::model::OciAuth>;
    async fn set_source_suspended(
        &self,
        name: &crate::model::SourceName,
        suspended: bool,
        audit: NewAudit,
    ) -> StoreResult<()>;
    /// Deletes a source; its units stay, owned by the hub from then on.
    async fn delete_source(
        &self,
        name: &crate::model::SourceName,
        audit: NewAudit,
    ) -> StoreResult<()>;
    /// Asks for a sync now (`allow_prune`: the next sync may destroy more
    /// than half of the source's units).
    async fn request_source_sync(
        &self,
        name: &crate::model::SourceName,
        at: crate::model::UnixMillis,
        allow_prune: bool,
        audit: NewAudit,
    ) -> StoreResult<()>;
    /// Records what a sync found; `prune_used` clears the permission.
    async fn set_source_status(
        &self,
        name: &crate::model::SourceName,
        status: &crate::model::SourceStatus,
        prune_used: bool,
    ) -> StoreResult<()>;
    /// Small durable facts (the ConfigHub event cursor).
    async fn get_state(&self, key: &str) -> StoreResult<Option<String>>;
    async fn put_state(&self, key: &str, value: &str) -> StoreResult<()>;

    // --- audit ---
    async fn append_audit(&self, entry: NewAudit) -> StoreResult<()>;
    /// Newest first.
    async fn list_audit(&self, limit: u32, target_prefix: &str) -> StoreResult<Vec<AuditEntry>>;
}
