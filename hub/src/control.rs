//! The hub's operations: what the operator API, the agent sessions and the
//! sources call; the only way into the store from the edges. Validation
//! happens here (on blocking threads: a unit may be megabytes), before the
//! store is touched; commits are published to connected agents after they
//! are durable; readers without the admin role never see Secret values.

mod replicas;
mod sources;
pub use sources::{ReleaseOutcome, ReleaseUnit};

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::auth::{AGENT_TOKEN_PREFIX, OPERATOR_TOKEN_PREFIX, Secret};
use crate::error::{HubError, Result};
use crate::fanout::{Delivery, Fanout};
use crate::feedback::Feedback;
use crate::manifest::{self, Limits, Validated};
use crate::metrics::Metrics;
use crate::model::{
    Actor, AuditEntry, Cluster, ClusterName, EnvName, EnvPolicy, Environment, HeadRef, Labels,
    NewAudit, NewRevision, Override, Phase, Promotion, PutMode, Revision, RevisionNum, Role,
    SourceOperation, StatusCell, Unit, UnitName, UnitRef, UnixMillis,
};
use crate::store::{Operator, Page, Store};
use crate::tls::HubCa;

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
    /// How often the hub re-checks every live agent session's credential
    /// against the store (one batched pass for the fleet).
    pub credential_recheck: Duration,
    /// With replicas sharing a store: how long another replica counts
    /// this hub's agent sessions after it last renewed its lease on them
    /// (renewed every third of it; a crashed replica's sessions count as
    /// closed once it runs out).
    pub session_lease: Duration,
    /// How long a source sync may take to reach its registry and unpack
    /// the artifact (the commit that follows is never cut short; Flux's
    /// default `timeout` is 60 s, a large artifact may need more).
    pub source_fetch_timeout: Duration,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            heartbeat: Duration::from_secs(30),
            max_sessions: 20_000,
            auto_promote_interval: Duration::from_secs(5),
            credential_recheck: Duration::from_secs(30),
            session_lease: Duration::from_secs(15),
            source_fetch_timeout: Duration::from_secs(120),
        }
    }
}

/// Shared state of one hub process.
pub struct Hub {
    pub store: Arc<dyn Store>,
    pub fanout: Fanout,
    pub feedback: Arc<Feedback>,
    /// What happens, for watchers.
    pub events: crate::events::Events,
    pub metrics: Arc<Metrics>,
    pub tuning: Tuning,
    /// When status reports were received (see [`crate::model::StatusClock`]).
    pub status_clock: crate::model::StatusClock,
    /// Head revision content per unit, shared by every session that needs it.
    heads: Mutex<HashMap<(EnvName, UnitName), Arc<Delivery>>>,
    next_session: AtomicU64,
    /// The hub CA (client certificates), loaded once at start.
    ca: Option<Arc<HubCa>>,
    /// Environments a source feeds (promotions into them happen there).
    claim: std::sync::RwLock<Option<EnvClaim>>,
    /// Sources were created, changed or asked to sync (wakes the runner).
    sources_changed: tokio::sync::Notify,
    /// This hub (commits run in tasks of their own, see [`Hub::commit_release`]).
    me: std::sync::Weak<Hub>,
    /// The control lane: operators' connections and calls, the HTTP
    /// endpoints and the feedback writer's loop (see [`crate::lane`]).
    pub control: crate::lane::Lane,
    /// The runtime serving the agent sessions (the one the hub was made
    /// on): commits are offered to the sessions there.
    sessions: tokio::runtime::Handle,
    /// Agent sessions other replicas sharing the store hold, by cluster
    /// (see [`Hub::share_sessions`]).
    elsewhere: std::sync::RwLock<HashMap<ClusterName, (EnvName, crate::store::Seen)>>,
    /// A session opened or closed here (wakes [`Hub::share_sessions`]).
    sessions_changed: tokio::sync::Notify,
}

/// A cluster's agent session as views show it: held here, or by another
/// replica sharing the store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Connection {
    pub connected_at: UnixMillis,
    pub agent_version: String,
    /// Held by another replica.
    pub elsewhere: bool,
}

/// A source's claim on environments: promotions into them are refused and
/// pointed to the source.
#[derive(Clone, Debug)]
pub struct EnvClaim {
    /// Who feeds them (`ConfigHub`).
    pub by: String,
    /// The environments (`None`: all).
    pub envs: Option<Vec<EnvName>>,
    /// What to do instead.
    pub hint: String,
}

/// Content a source commits (see [`Hub::commit_from_source`]).
#[derive(Clone, Debug)]
pub struct SourceCommit {
    /// The owner (`confighub:WORKER_ID`, `oci:NAME`).
    pub source: String,
    pub actor: Actor,
    pub unit: UnitRef,
    pub manifests: String,
    /// `None` keeps the unit's labels.
    pub labels: Option<Labels>,
    pub origin: String,
    pub message: String,
}

/// A unit as an operator reads it.
#[derive(Clone, Debug)]
pub struct UnitView {
    pub unit: Unit,
    /// The head revision (content only when asked for).
    pub head: Option<Revision>,
    /// Per-cluster status, a page of it.
    pub cells: Vec<StatusCell>,
    pub connected: HashSet<ClusterName>,
    /// Where the next page starts (`None`: this was the last).
    pub next: Option<Page>,
}

/// The units × clusters matrix, a page of cells at a time (units and
/// clusters come with the first page).
#[derive(Clone, Debug, Default)]
pub struct StatusView {
    pub units: Vec<Unit>,
    pub clusters: Vec<(Cluster, Option<Connection>)>,
    pub cells: Vec<StatusCell>,
    pub connected: HashSet<ClusterName>,
    pub next: Option<Page>,
}

/// The page after `cells`, if `cells` filled `page`.
fn next_page(page: &Page, cells: &[StatusCell]) -> Option<Page> {
    let last = cells.last()?;
    (page.limit > 0 && cells.len() as u32 >= page.limit).then(|| Page {
        after: Some((last.unit.clone(), last.cluster.clone())),
        limit: page.limit,
    })
}

/// Units up to this size are validated on the calling task.
const INLINE_VALIDATION_BYTES: usize = 16 * 1024;

/// Runs CPU-bound work (validation, signing) on the blocking pool.
pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| HubError::Internal(format!("a blocking task failed: {e}")))
}

impl Hub {
    pub fn new(
        store: Arc<dyn Store>,
        tuning: Tuning,
        ca: Option<HubCa>,
    ) -> std::io::Result<Arc<Hub>> {
        let events = crate::events::Events::default();
        let control = crate::lane::Lane::new("hub-control")?;
        Ok(Arc::new_cyclic(|me| Hub {
            store,
            fanout: Fanout::default(),
            feedback: Arc::new(Feedback::new(events.clone())),
            events,
            metrics: Arc::default(),
            tuning,
            heads: Mutex::default(),
            next_session: AtomicU64::new(1),
            ca: ca.map(Arc::new),
            claim: std::sync::RwLock::new(None),
            sources_changed: tokio::sync::Notify::new(),
            me: me.clone(),
            status_clock: crate::model::StatusClock::default(),
            control,
            sessions: tokio::runtime::Handle::current(),
            elsewhere: std::sync::RwLock::default(),
            sessions_changed: tokio::sync::Notify::new(),
        }))
    }

    /// Records that a source feeds some environments.
    pub fn claim_environments(&self, claim: EnvClaim) {
        *self
            .claim
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(claim);
    }

    /// Why promotions into `env` are refused, if they are.
    pub fn claimed(&self, env: &EnvName) -> Option<String> {
        let claim = self
            .claim
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()?;
        claim
            .envs
            .as_ref()
            .is_none_or(|e| e.contains(env))
            .then(|| format!("environment {env} is fed by {}: {}", claim.by, claim.hint))
    }

    /// The runtime serving the agents' sessions.
    pub fn sessions(&self) -> &tokio::runtime::Handle {
        &self.sessions
    }

    /// The hub CA certificate (PEM), when the hub has a CA.
    pub fn ca_pem(&self) -> Option<&str> {
        self.ca.as_deref().map(HubCa::cert_pem)
    }

    fn ca(&self) -> Result<Arc<HubCa>> {
        self.ca.clone().ok_or_else(|| {
            HubError::FailedPrecondition(
                "client certificates need the hub's CA (ca.crt and ca.key in its data directory)"
                    .into(),
            )
        })
    }

    pub fn next_session_id(&self) -> u64 {
        self.next_session.fetch_add(1, Ordering::Relaxed)
    }

    /// Manifests for a reader: admins see them as stored; read-only
    /// operators see Secret values masked.
    pub fn reveal(role: Role, text: &str) -> String {
        match role {
            Role::Admin => text.to_owned(),
            Role::ReadOnly => manifest::mask_secrets(text),
        }
    }

    /// Validates a unit's manifests: a small unit at once (microseconds,
    /// less than a hand-over to another thread under load), a larger one on
    /// the blocking pool.
    pub async fn validate(&self, unit: &UnitRef, manifests: String) -> Result<(Validated, String)> {
        if manifests.len() <= INLINE_VALIDATION_BYTES {
            let v = manifest::validate(unit, &manifests, &self.tuning.limits)?;
            return Ok((v, manifests));
        }
        let (unit, limits) = (unit.clone(), self.tuning.limits.clone());
        let (valid, text) = blocking(move || {
            let v = manifest::validate(&unit, &manifests, &limits);
            (v, manifests)
        })
        .await?;
        Ok((valid?, text))
    }

    // --- environments ---

    pub async fn create_environment(
        &self,
        actor: Actor,
        name: EnvName,
        after: Option<EnvName>,
        policy: EnvPolicy,
    ) -> Result<Environment> {
        let mut detail = policy_detail(&policy);
        if let Some(a) = &after {
            detail = format!("after {a}; {detail}");
        }
        let audit = NewAudit {
            actor,
            action: "environment.create",
            target: format!("env/{name}"),
            detail,
        };
        Ok(self
            .store
            .create_environment(&name, after.as_ref(), policy, audit)
            .await?)
    }

    pub async fn list_environments(&self) -> Result<Vec<Environment>> {
        Ok(self.store.list_environments().await?)
    }

    pub async fn set_environment_policy(
        &self,
        actor: Actor,
        env: EnvName,
        policy: EnvPolicy,
    ) -> Result<Environment> {
        let audit = NewAudit {
            actor,
            action: "environment.policy",
            target: format!("env/{env}"),
            detail: policy_detail(&policy),
        };
        Ok(self
            .store
            .set_environment_policy(&env, policy, audit)
            .await?)
    }

    // --- clusters and credentials ---

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
        self.events.send(crate::events::HubEvent::Clusters { env });
        Ok((cluster, token))
    }

    /// Clusters (of one environment, or all) with their live sessions.
    pub async fn list_clusters(
        &self,
        env: Option<&EnvName>,
    ) -> Result<Vec<(Cluster, Option<Connection>)>> {
        let clusters = self.store.list_clusters(env).await?;
        Ok(clusters
            .into_iter()
            .map(|c| {
                let s = self.connection(&c.name);
                (c, s)
            })
            .collect())
    }

    pub async fn get_cluster(&self, name: &ClusterName) -> Result<(Cluster, Option<Connection>)> {
        let c = self
            .store
            .get_cluster(name)
            .await?
            .ok_or_else(|| HubError::NotFound(format!("cluster {name}")))?;
        Ok((c, self.connection(name)))
    }

    /// Issues a new agent token; the old one stops working at once.
    pub async fn issue_cluster_token(
        &self,
        actor: Actor,
        name: ClusterName,
    ) -> Result<(Cluster, Secret)> {
        let (cluster, _) = self.get_cluster(&name).await?;
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
        self.get_cluster(&name).await?;
        let ca = self.ca()?;
        let cluster = name.to_string();
        let cert = blocking(move || {
            ca.issue_client_cert(
                &cluster,
                std::time::SystemTime::now() - Duration::from_secs(60),
                validity + Duration::from_secs(60),
            )
        })
        .await?
        .map_err(|e| {
            HubError::FailedPrecondition(format!(
                "cannot issue a certificate: {}",
                crate::error::ErrorChain(&e)
            ))
        })?;
        let audit = NewAudit {
            actor,
            action: "cluster.certificate",
            target: format!("cluster/{name}"),
            detail: format!("sha256 {} valid {}s", cert.fingerprint, validity.as_secs()),
        };
        self.store
            .add_cluster_cert(
                &name,
                &cert.fingerprint,
                UnixMillis::of(cert.not_after),
                audit,
            )
            .await?;
        Ok(cert)
    }

    /// Signs a renewed client certificate for a cluster authenticated by
    /// its current client certificate.
    pub async fn renew_cluster_cert(
        &self,
        cluster: &ClusterName,
        csr_pem: String,
        validity: Duration,
    ) -> Result<(String, std::time::SystemTime)> {
        let ca = self.ca()?;
        let name = cluster.to_string();
        let (cert, fingerprint, not_after) =
            blocking(move || ca.sign_csr(&name, &csr_pem, validity))
                .await?
                .map_err(|e| {
                    HubError::InvalidArgument(format!(
                        "cannot sign the certificate request: {}",
                        crate::error::ErrorChain(&e)
                    ))
                })?;
        let audit = NewAudit {
            actor: Actor::Agent(cluster.clone()),
            action: "cluster.certificate.renew",
            target: format!("cluster/{cluster}"),
            detail: format!("sha256 {fingerprint} valid {}s", validity.as_secs()),
        };
        self.store
            .add_cluster_cert(cluster, &fingerprint, UnixMillis::of(not_after), audit)
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
        let env = self.store.delete_cluster(&name, audit).await?;
        self.fanout.disconnect(&name);
        self.events.send(crate::events::HubEvent::Clusters { env });
        Ok(())
    }

    // --- operators ---

    /// Creates an operator and its token (shown once); an existing name is
    /// refused (rotation is [`Hub::rotate_operator`]).
    pub async fn create_operator(&self, actor: Actor, name: String, role: Role) -> Result<Secret> {
        let token = Secret::generate(OPERATOR_TOKEN_PREFIX);
        let audit = NewAudit {
            actor,
            action: "operator.create",
            target: format!("operator/{name}"),
            detail: format!("role {}", role.as_str()),
        };
        self.store
            .create_operator(&Operator { name, role }, &token.hash(), audit)
            .await?;
        Ok(token)
    }

    /// Issues a new token for an operator; the old one stops working at once.
    pub async fn rotate_operator(&self, actor: Actor, name: String) -> Result<(Operator, Secret)> {
        let token = Secret::generate(OPERATOR_TOKEN_PREFIX);
        let audit = NewAudit {
            actor,
            action: "operator.rotate",
            target: format!("operator/{name}"),
            detail: "new token issued".into(),
        };
        let op = self
            .store
            .rotate_operator(&name, &token.hash(), audit)
            .await?;
        Ok((op, token))
    }

    // --- units ---

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
        let (valid, text) = self.validate(&unit, manifests).await?;
        let rev = NewRevision {
            mode,
            labels,
            ..NewRevision::content(
                unit,
                Arc::from(text),
                valid.documents(),
                valid.digest,
                actor,
                "cli",
                message,
            )
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
        self.commit(NewRevision::tombstone(unit, actor, "cli", message))
            .await
    }

    /// Commits one revision and publishes it.
    pub async fn commit(&self, rev: NewRevision) -> Result<Revision> {
        let (mut committed, _) = self.commit_release(vec![rev], None).await?;
        committed
            .pop()
            .ok_or_else(|| HubError::Internal("no revision committed".into()))
    }

    /// Commits revisions (and the promotion that made them) atomically and
    /// offers them to agents. Both happen in a task of their own, so a
    /// caller that goes away (a cancelled RPC) cannot leave a committed
    /// revision unoffered. The caller hears first: its reply does not wait
    /// behind the deliveries the commit sets off, which run on the
    /// sessions' runtime (waking a session from there costs a local queue
    /// push; from the control lane, the shared queue's lock and often a
    /// thread wake-up, and the lane would be busy for the whole fan-out).
    pub async fn commit_release(
        &self,
        revs: Vec<NewRevision>,
        promotion: Option<crate::store::NewPromotion>,
    ) -> Result<(Vec<Revision>, Option<u64>)> {
        // Text the databases cannot all store (PostgreSQL refuses NUL).
        let nul =
            |what: String| HubError::InvalidArgument(format!("{what} contains a NUL character"));
        for r in &revs {
            if r.message.contains('\0') {
                return Err(nul(format!("the message for unit {}", r.unit)));
            }
            if r.origin.contains('\0') {
                return Err(nul(format!("the origin of unit {}", r.unit)));
            }
        }
        if promotion.as_ref().is_some_and(|p| p.reason.contains('\0')) {
            return Err(nul("the promotion's reason".into()));
        }
        let hub = self
            .me
            .upgrade()
            .ok_or_else(|| HubError::Internal("the hub is shutting down".into()))?;
        let (reply, answer) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            match hub.store.commit_release(revs, promotion).await {
                Ok(committed) => {
                    let offer = committed.0.clone();
                    let _ = reply.send(Ok(committed));
                    let sessions = hub.sessions.clone();
                    sessions.spawn(async move {
                        for r in &offer {
                            hub.publish(r);
                        }
                    });
                }
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            }
        });
        answer
            .await
            .map_err(|_| HubError::Internal("a commit task failed".into()))?
            .map_err(HubError::from)
    }

    /// A unit with its head and a page of per-cluster status.
    pub async fn get_unit(
        &self,
        unit: &UnitRef,
        include_manifests: bool,
        role: Role,
        page: &Page,
    ) -> Result<UnitView> {
        let u = self
            .store
            .get_unit(unit)
            .await?
            .ok_or_else(|| HubError::NotFound(format!("unit {unit}")))?;
        let mut u = u;
        if role == Role::ReadOnly {
            u = u.masked();
        }
        let mut head = self.store.get_revision(unit, u.head).await?;
        if let Some(h) = head.as_mut() {
            h.manifests = if include_manifests {
                Arc::from(Self::reveal(role, &h.manifests))
            } else {
                Arc::from("")
            };
        }
        let cells = self
            .store
            .statuses(Some(&unit.env), Some(unit), page)
            .await?;
        Ok(UnitView {
            next: next_page(page, &cells),
            unit: u,
            head,
            cells,
            connected: self.connected(),
        })
    }

    /// Units (of an environment, or all), Secret override values masked
    /// (only [`Hub::get_unit`] shows them, to admins).
    pub async fn list_units(&self, env: Option<&EnvName>) -> Result<Vec<Unit>> {
        let units = self.store.list_units(env).await?;
        Ok(units.into_iter().map(Unit::masked).collect())
    }

    /// All revisions of a unit, oldest first, without content.
    pub async fn unit_history(&self, unit: &UnitRef) -> Result<Vec<Revision>> {
        let revs = self.store.history(unit).await?;
        if revs.is_empty() {
            return Err(HubError::NotFound(format!("unit {unit}")));
        }
        Ok(revs)
    }

    /// One revision with its content (0: the head).
    pub async fn get_revision(
        &self,
        unit: &UnitRef,
        number: RevisionNum,
        role: Role,
    ) -> Result<Revision> {
        let number = if number.0 == 0 {
            self.store
                .get_unit(unit)
                .await?
                .ok_or_else(|| HubError::NotFound(format!("unit {unit}")))?
                .head
        } else {
            number
        };
        let mut rev = self
            .store
            .get_revision(unit, number)
            .await?
            .ok_or_else(|| HubError::NotFound(format!("unit {unit} revision {number}")))?;
        rev.manifests = Arc::from(Self::reveal(role, &rev.manifests));
        Ok(rev)
    }

    /// The status matrix (of one environment, or all), a page of cells.
    pub async fn status(&self, env: Option<&EnvName>, page: &Page) -> Result<StatusView> {
        self.status_of(env, None, page).await
    }

    /// The same, for one unit only when `unit` is given.
    pub async fn status_of(
        &self,
        env: Option<&EnvName>,
        unit: Option<&UnitRef>,
        page: &Page,
    ) -> Result<StatusView> {
        let first = page.after.is_none();
        let cells = self.store.statuses(env, unit, page).await?;
        Ok(StatusView {
            units: if first {
                let mut units = self.list_units(env).await?;
                units.retain(|u| unit.is_none_or(|x| u.unit == *x));
                units
            } else {
                vec![]
            },
            clusters: if first {
                self.list_clusters(env).await?
            } else {
                vec![]
            },
            next: next_page(page, &cells),
            cells,
            connected: self.connected(),
        })
    }

    /// One cluster's status cells, by unit.
    pub async fn cluster_cells(&self, name: &ClusterName) -> Result<Vec<StatusCell>> {
        Ok(self.store.cluster_statuses(name).await?)
    }

    /// How many units each cluster runs per phase (not at the head:
    /// `Unknown`), counted by the store.
    pub async fn phase_counts(
        &self,
        env: Option<&EnvName>,
    ) -> Result<Vec<(ClusterName, crate::model::Phase, u64)>> {
        Ok(self.store.phase_counts(env).await?)
    }

    /// Clusters per unit at the head, by phase (`None`: behind), counted by
    /// the store.
    pub async fn unit_phase_counts(
        &self,
        env: Option<&EnvName>,
    ) -> Result<Vec<(UnitRef, Option<crate::model::Phase>, u64)>> {
        Ok(self.store.unit_phase_counts(env).await?)
    }

    /// An environment's status cells (every unit, every cluster).
    pub async fn env_cells(&self, env: &EnvName) -> Result<Vec<StatusCell>> {
        Ok(self.store.statuses(Some(env), None, &Page::ALL).await?)
    }

    /// A unit's status cells, one per cluster that reported (nothing else
    /// read: for loops that wait on them).
    pub async fn unit_cells(&self, unit: &UnitRef) -> Result<Vec<StatusCell>> {
        Ok(self
            .store
            .statuses(Some(&unit.env), Some(unit), &Page::ALL)
            .await?)
    }

    pub async fn list_audit(&self, limit: u32, target_prefix: &str) -> Result<Vec<AuditEntry>> {
        Ok(self.store.list_audit(limit, target_prefix).await?)
    }

    pub async fn set_overrides(
        &self,
        actor: Actor,
        unit: UnitRef,
        overrides: Vec<Override>,
    ) -> Result<Unit> {
        let detail = overrides
            .iter()
            .map(|o| format!("{} {} {}={}", o.kind, o.name, o.path, o.shown_value()))
            .collect::<Vec<_>>()
            .join(", ");
        let audit = NewAudit {
            actor,
            action: "unit.overrides",
            target: unit.to_string(),
            detail,
        };
        // Setting them says the upstream as it is now was seen: a change of
        // an overridden field up to its head is no longer a conflict.
        let upstream = self.store.get_unit(&unit).await?.and_then(|u| u.upstream);
        let reviewed_at = match upstream {
            Some(up) => self.store.get_unit(&up).await?.map(|u| u.head),
            None => None,
        }
        .unwrap_or_default();
        let overrides: Vec<Override> = overrides
            .into_iter()
            .map(|o| Override { reviewed_at, ..o })
            .collect();
        Ok(self.store.set_overrides(&unit, &overrides, audit).await?)
    }

    pub async fn get_promotion(&self, id: u64) -> Result<Promotion> {
        self.store
            .get_promotion(id)
            .await?
            .ok_or_else(|| HubError::NotFound(format!("promotion {id}")))
    }

    pub async fn list_promotions(&self, limit: u32) -> Result<Vec<Promotion>> {
        Ok(self.store.list_promotions(limit).await?)
    }

    // --- sources ---

    /// Commits content on behalf of a source, which owns the unit (other
    /// writers are refused). Content and labels equal to the head's commit
    /// nothing and return the head, unless a cluster reports the head
    /// Failed, Degraded or Drifted: a source's apply asks for the content
    /// to be applied, so the same content is committed again as a new
    /// revision and every cluster applies it afresh (rather than the
    /// source hearing the verdict on the earlier attempt).
    pub async fn commit_from_source(&self, c: SourceCommit) -> Result<Revision> {
        if let Some(labels) = &c.labels {
            crate::model::check_label_sizes(labels)
                .map_err(|e| HubError::InvalidArgument(format!("unit {}: {e}", c.unit)))?;
        }
        let (valid, text) = self.validate(&c.unit, c.manifests).await?;
        if let Some(u) = self.store.get_unit(&c.unit).await?
            && !u.destroyed
            && u.source == c.source
            && c.labels.as_ref().is_none_or(|l| *l == u.labels)
            && let Some(head) = self.store.get_revision(&c.unit, u.head).await?
            && head.digest == valid.digest
            && !self.attempt_again(&c.unit, head.number).await?
        {
            return Ok(head);
        }
        let rev = NewRevision {
            source: c.source,
            labels: c.labels,
            ..NewRevision::content(
                c.unit,
                Arc::from(text),
                valid.documents(),
                valid.digest,
                c.actor,
                c.origin,
                c.message,
            )
        };
        self.commit(rev).await
    }

    /// Whether a cluster's last attempt at `revision` of the unit ended
    /// in a state only a new attempt changes (the agents retry failed
    /// applies on their own, but only on their backoff).
    async fn attempt_again(&self, unit: &UnitRef, revision: RevisionNum) -> Result<bool> {
        Ok(self.unit_cells(unit).await?.iter().any(|c| {
            c.status.revision == revision
                && matches!(
                    c.status.phase,
                    Phase::Failed | Phase::Degraded | Phase::Drifted
                )
        }))
    }

    /// Destroys a unit on behalf of its source; `None` when there is
    /// nothing to destroy (unknown or already destroyed).
    pub async fn destroy_from_source(
        &self,
        source: &str,
        actor: Actor,
        unit: UnitRef,
        origin: String,
        message: String,
    ) -> Result<Option<Revision>> {
        match self.store.get_unit(&unit).await? {
            None => return Ok(None),
            Some(u) if u.destroyed => return Ok(None),
            Some(_) => {}
        }
        let rev = NewRevision {
            source: source.to_owned(),
            ..NewRevision::tombstone(unit, actor, origin, message)
        };
        self.commit(rev).await.map(Some)
    }

    /// Records (or updates) an operation a source asked for.
    pub async fn put_operation(&self, op: &SourceOperation) -> Result<()> {
        Ok(self.store.put_operation(op).await?)
    }

    /// Records an operation's terminal report unless another was recorded
    /// first; true when this one decided it (only then is it sent).
    pub async fn decide_operation(&self, op: &SourceOperation) -> Result<bool> {
        Ok(self.store.decide_operation(op).await?)
    }

    /// Whether this hub runs the singleton tasks of a shared store.
    pub async fn is_leader(&self) -> bool {
        self.store.is_leader().await.unwrap_or(false)
    }

    pub async fn get_operation(&self, id: &str) -> Result<Option<SourceOperation>> {
        Ok(self.store.get_operation(id).await?)
    }

    /// A source's operations not yet reported to it, oldest first.
    pub async fn open_operations(&self, source: &str) -> Result<Vec<SourceOperation>> {
        Ok(self.store.open_operations(source).await?)
    }

    /// What happens in the hub (a hint; the store is the truth).
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<crate::events::HubEvent> {
        self.events.subscribe()
    }

    // --- publishing ---

    /// Offers a committed revision to connected agents.
    pub fn publish(&self, committed: &Revision) {
        self.metrics.revisions_committed.inc();
        self.offer(committed);
    }

    /// Offers a revision (committed here or by another hub sharing the
    /// store) to connected agents; offering one twice changes nothing.
    pub fn offer(&self, committed: &Revision) {
        self.events
            .send(crate::events::HubEvent::Committed(committed.unit.clone()));
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

    /// Offers every head of every environment with connected agents again
    /// (after announcements from other replicas may have been missed).
    pub async fn reoffer_heads(&self) -> Result<usize> {
        let mut offered = 0;
        for env in self.fanout.environments() {
            for head in self.store.heads(&env).await? {
                let d = self.head_delivery(&env, &head).await?;
                self.fanout.publish(&d);
                offered += 1;
            }
        }
        Ok(offered)
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
        let d = Delivery::of(&rev, rev.created_at.to_system_time());
        self.cache_head(&d);
        Ok(d)
    }
}

/// A policy as the audit trail records it.
fn policy_detail(p: &EnvPolicy) -> String {
    format!(
        "approvals {} soak {}s auto-promote {}",
        p.required_approvals, p.soak_seconds, p.auto_promote
    )
}
