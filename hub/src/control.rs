//! The hub's operations: what the operator API and the agent sessions call.
//! Validation happens here, before the store is touched; commits are
//! published to connected agents after they are durable.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::auth::{AGENT_TOKEN_PREFIX, Secret};
use crate::error::{HubError, Result};
use crate::fanout::{Delivery, Fanout};
use crate::feedback::Feedback;
use crate::manifest::{self, Limits};
use crate::metrics::Metrics;
use crate::model::{
    Actor, Cluster, ClusterName, Digest, EnvName, Environment, HeadRef, Labels, NewAudit,
    NewRevision, PutMode, Revision, UnitName, UnitRef,
};
use crate::store::Store;

/// Longest validity of a client certificate (agents renew theirs well
/// before expiry, so long-lived ones only widen the window of a leaked key).
pub const MAX_CERT_VALIDITY: Duration = Duration::from_secs(90 * 24 * 3600);
/// Validity of a client certificate when none is asked for.
pub const DEFAULT_CERT_VALIDITY: Duration = Duration::from_secs(30 * 24 * 3600);

/// Tuning of a running hub (addresses and paths live in `Config`).
#[derive(Clone, Debug)]
pub struct Tuning {
    pub limits: Limits,
    pub heartbeat: Duration,
    /// Agent sessions beyond this are refused with RESOURCE_EXHAUSTED.
    pub max_sessions: usize,
    /// How often environments with automatic promotion are checked.
    pub auto_promote_interval: Duration,
    /// How often a live agent session re-checks its credential.
    pub credential_recheck: Duration,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            heartbeat: Duration::from_secs(30),
            max_sessions: 20_000,
            auto_promote_interval: Duration::from_secs(5),
            credential_recheck: Duration::from_secs(30),
        }
    }
}

/// Shared state of one hub process.
pub struct Hub {
    pub store: Arc<dyn Store>,
    pub fanout: Fanout,
    pub feedback: Arc<Feedback>,
    pub metrics: Arc<Metrics>,
    pub tuning: Tuning,
    /// Head revision content per unit, shared by every session that needs it.
    heads: Mutex<HashMap<(EnvName, UnitName), Arc<Delivery>>>,
    next_session: AtomicU64,
    /// Where the CA lives (client certificates).
    data_dir: std::path::PathBuf,
}

impl Hub {
    pub fn new(store: Arc<dyn Store>, tuning: Tuning, data_dir: std::path::PathBuf) -> Hub {
        Hub {
            store,
            fanout: Fanout::default(),
            feedback: Arc::default(),
            metrics: Arc::default(),
            tuning,
            heads: Mutex::default(),
            next_session: AtomicU64::new(1),
            data_dir,
        }
    }

    /// The hub CA certificate file (generated TLS).
    pub fn ca_path(&self) -> std::path::PathBuf {
        self.data_dir.join("ca.crt")
    }

    pub fn next_session_id(&self) -> u64 {
        self.next_session.fetch_add(1, Ordering::Relaxed)
    }

    pub async fn create_environment(
        &self,
        actor: Actor,
        name: EnvName,
        after: Option<EnvName>,
    ) -> Result<Environment> {
        let audit = NewAudit {
            actor,
            action: "environment.create",
            target: format!("env/{name}"),
            detail: after
                .as_ref()
                .map(|a| format!("after {a}"))
                .unwrap_or_default(),
        };
        Ok(self
            .store
            .create_environment(&name, after.as_ref(), audit)
            .await?)
    }

    /// Creates a cluster and its agent token (returned once, stored hashed).
    pub async fn create_cluster(
        &self,
        actor: Actor,
        name: ClusterName,
        env: EnvName,
        labels: Labels,
    ) -> Result<(Cluster, Secret)> {
        let token = Secret::generate(AGENT_TOKEN_PREFIX);
        let audit = NewAudit {
            actor,
            action: "cluster.create",
            target: format!("cluster/{name}"),
            detail: format!("environment {env}"),
        };
        let cluster = self
            .store
            .create_cluster(&name, &env, &labels, &token.hash(), audit)
            .await?;
        Ok((cluster, token))
    }

    /// Issues a new agent token; the old one stops working at once.
    pub async fn issue_cluster_token(
        &self,
        actor: Actor,
        name: ClusterName,
    ) -> Result<(Cluster, Secret)> {
        let cluster = self
            .store
            .get_cluster(&name)
            .await?
            .ok_or_else(|| HubError::NotFound(format!("cluster {name}")))?;
        let token = Secret::generate(AGENT_TOKEN_PREFIX);
        let audit = NewAudit {
            actor,
            action: "cluster.token",
            target: format!("cluster/{name}"),
            detail: "new agent token issued".into(),
        };
        self.store
            .set_cluster_token(&name, &token.hash(), audit)
            .await?;
        self.fanout.disconnect(&name);
        Ok((cluster, token))
    }

    /// Issues a client certificate for a cluster (mutual TLS identity).
    pub async fn issue_cluster_cert(
        &self,
        actor: Actor,
        name: ClusterName,
        validity: Duration,
    ) -> Result<crate::tls::ClientCert> {
        if self.store.get_cluster(&name).await?.is_none() {
            return Err(HubError::NotFound(format!("cluster {name}")));
        }
        let cert = crate::tls::issue_client_cert(
            &self.data_dir,
            name.as_str(),
            std::time::SystemTime::now() - Duration::from_secs(60),
            validity + Duration::from_secs(60),
        )
        .map_err(|e| {
            HubError::FailedPrecondition(format!(
                "cannot issue a certificate: {}",
                crate::error::ErrorChain(&e)
            ))
        })?;
        let not_after = crate::model::UnixMillis(
            i64::try_from(
                cert.not_after
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_millis(),
            )
            .unwrap_or(i64::MAX),
        );
        let audit = NewAudit {
            actor,
            action: "cluster.certificate",
            target: format!("cluster/{name}"),
            detail: format!("sha256 {} valid {}s", cert.fingerprint, validity.as_secs()),
        };
        self.store
            .add_cluster_cert(&name, &cert.fingerprint, not_after, audit)
            .await?;
        Ok(cert)
    }

    /// Signs a renewed client certificate for an authenticated cluster.
    pub async fn renew_cluster_cert(
        &self,
        cluster: &ClusterName,
        csr_pem: &str,
        validity: Duration,
    ) -> Result<(String, std::time::SystemTime)> {
        let (cert, fingerprint, not_after) =
            crate::tls::sign_csr(&self.data_dir, cluster.as_str(), csr_pem, validity).map_err(
                |e| {
                    HubError::InvalidArgument(format!(
                        "cannot sign the certificate request: {}",
                        crate::error::ErrorChain(&e)
                    ))
                },
            )?;
        let millis = crate::model::UnixMillis(
            i64::try_from(
                not_after
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_millis(),
            )
            .unwrap_or(i64::MAX),
        );
        let audit = NewAudit {
            actor: Actor::Agent(cluster.clone()),
            action: "cluster.certificate.renew",
            target: format!("cluster/{cluster}"),
            detail: format!("sha256 {fingerprint} valid {}s", validity.as_secs()),
        };
        self.store
            .add_cluster_cert(cluster, &fingerprint, millis, audit)
            .await?;
        Ok((cert, not_after))
    }

    /// Revokes a cluster's credentials for good and ends its live session.
    pub async fn revoke_cluster(&self, actor: Actor, name: ClusterName) -> Result<()> {
        let audit = NewAudit {
            actor,
            action: "cluster.revoke",
            target: format!("cluster/{name}"),
            detail: "all credentials revoked".into(),
        };
        self.store.revoke_cluster(&name, audit).await?;
        self.fanout.disconnect(&name);
        Ok(())
    }

    /// Deletes a cluster: its credential stops working and its live session ends.
    pub async fn delete_cluster(&self, actor: Actor, name: ClusterName) -> Result<()> {
        let audit = NewAudit {
            actor,
            action: "cluster.delete",
            target: format!("cluster/{name}"),
            detail: String::new(),
        };
        self.store.delete_cluster(&name, audit).await?;
        self.fanout.disconnect(&name);
        Ok(())
    }

    /// Validates and commits a new revision, then publishes it.
    pub async fn put_unit(
        &self,
        actor: Actor,
        unit: UnitRef,
        manifests: String,
        message: String,
        mode: PutMode,
        labels: Option<Labels>,
    ) -> Result<Revision> {
        let valid = manifest::validate(&unit, &manifests, &self.tuning.limits)?;
        let rev = NewRevision {
            unit,
            mode,
            labels,
            tombstone: false,
            documents: u32::try_from(valid.objects.len()).unwrap_or(u32::MAX),
            manifests: Arc::from(manifests),
            digest: valid.digest,
            author: actor,
            message,
            origin: "cli".into(),
            source_revision: crate::model::RevisionNum(0),
            upstream: None,
        };
        self.commit(rev).await
    }

    /// Commits a tombstone: agents delete what they applied for the unit.
    pub async fn destroy_unit(
        &self,
        actor: Actor,
        unit: UnitRef,
        message: String,
    ) -> Result<Revision> {
        let rev = NewRevision {
            unit,
            mode: PutMode::Update,
            labels: None,
            tombstone: true,
            documents: 0,
            manifests: Arc::from(""),
            digest: Digest::of(b""),
            author: actor,
            message,
            origin: "cli".into(),
            source_revision: crate::model::RevisionNum(0),
            upstream: None,
        };
        self.commit(rev).await
    }

    async fn commit(&self, rev: NewRevision) -> Result<Revision> {
        let committed = self.store.commit_revision(rev).await?;
        self.publish(&committed);
        Ok(committed)
    }

    /// Offers a committed revision to connected agents.
    pub fn publish(&self, committed: &Revision) {
        self.metrics.revisions_committed.inc();
        self.offer(committed);
    }

    /// Offers a revision (committed here or by another hub sharing the
    /// store) to connected agents; offering one twice changes nothing.
    pub fn offer(&self, committed: &Revision) {
        let delivery = Delivery::of(committed, std::time::SystemTime::now());
        self.cache_head(&delivery);
        let stats = self.fanout.publish(&delivery);
        self.metrics
            .coalesced_updates
            .inc_by(stats.coalesced as u64);
        tracing::info!(
            unit = %committed.unit,
            revision = %committed.number,
            tombstone = committed.tombstone,
            origin = %committed.origin,
            sessions = stats.sessions,
            "revision committed"
        );
    }

    /// Keeps the newest delivery per unit (a late or repeated offer never
    /// replaces a newer head).
    fn cache_head(&self, d: &Arc<Delivery>) {
        let mut heads = self.lock_heads();
        let entry = heads
            .entry((d.env.clone(), d.unit.clone()))
            .or_insert_with(|| d.clone());
        if entry.revision < d.revision {
            *entry = d.clone();
        }
    }

    fn lock_heads(&self) -> std::sync::MutexGuard<'_, HashMap<(EnvName, UnitName), Arc<Delivery>>> {
        self.heads
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The delivery for a unit's head revision, from the cache or the store.
    pub async fn head_delivery(&self, env: &EnvName, head: &HeadRef) -> Result<Arc<Delivery>> {
        let key = (env.clone(), head.unit.clone());
        if let Some(d) = self.lock_heads().get(&key)
            && d.revision == head.number
        {
            return Ok(d.clone());
        }
        let unit = UnitRef {
            env: env.clone(),
            name: head.unit.clone(),
        };
        let rev = self
            .store
            .get_revision(&unit, head.number)
            .await?
            .ok_or_else(|| HubError::NotFound(format!("unit {unit} revision {}", head.number)))?;
        let d = Delivery::of(
            &rev,
            std::time::UNIX_EPOCH
                + Duration::from_millis(u64::try_from(rev.created_at.0).unwrap_or(0)),
        );
        self.cache_head(&d);
        Ok(d)
    }
}
