//! Domain types of the hub: identifiers as validated newtypes, and the
//! records the store keeps. Prost types never appear here.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} {value:?}: {why}")]
pub struct NameError {
    pub what: &'static str,
    pub value: String,
    pub why: &'static str,
}

/// Checks a DNS-1123 label: at most 63 lowercase alphanumerics or '-',
/// starting and ending with an alphanumeric.
pub fn check_dns1123_label(value: &str) -> Result<(), &'static str> {
    if value.is_empty() {
        return Err("must not be empty");
    }
    if value.len() > 63 {
        return Err("must be no more than 63 characters");
    }
    let ok_chars = value
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    let b = value.as_bytes();
    let ends_ok = b[0].is_ascii_alphanumeric() && b[b.len() - 1].is_ascii_alphanumeric();
    if !ok_chars || !ends_ok {
        return Err(
            "must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character",
        );
    }
    Ok(())
}

/// Checks a DNS-1123 subdomain: at most 253 characters, dot-separated labels.
pub fn check_dns1123_subdomain(value: &str) -> Result<(), &'static str> {
    const WHY: &str = "must be a lowercase RFC 1123 subdomain: lower case alphanumeric characters, '-' or '.', starting and ending with an alphanumeric character";
    if value.is_empty() {
        return Err("must not be empty");
    }
    if value.len() > 253 {
        return Err("must be no more than 253 characters");
    }
    for part in value.split('.') {
        let b = part.as_bytes();
        if b.is_empty()
            || !b[0].is_ascii_alphanumeric()
            || !b[b.len() - 1].is_ascii_alphanumeric()
            || !b
                .iter()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        {
            return Err(WHY);
        }
    }
    Ok(())
}

macro_rules! label_newtype {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(Arc<str>);

        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        /// Maps keyed by name are looked up by `&str` (hashes and order
        /// are those of the text).
        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl FromStr for $name {
            type Err = NameError;
            fn from_str(s: &str) -> Result<Self, NameError> {
                check_dns1123_label(s).map_err(|why| NameError {
                    what: $what,
                    value: crate::manifest::prefix(s),
                    why,
                })?;
                Ok(Self(Arc::from(s)))
            }
        }

        impl TryFrom<String> for $name {
            type Error = NameError;
            fn try_from(s: String) -> Result<Self, NameError> {
                s.parse()
            }
        }

        impl From<$name> for String {
            fn from(n: $name) -> String {
                n.0.to_string()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

label_newtype!(
    /// An environment name such as `dev` (DNS-1123 label).
    EnvName,
    "environment name"
);
label_newtype!(
    /// A cluster (agent identity) name (DNS-1123 label).
    ClusterName,
    "cluster name"
);
label_newtype!(
    /// A unit name, unique within its environment (DNS-1123 label).
    UnitName,
    "unit name"
);

mod oci;
pub use oci::{
    MIN_INTERVAL, OciAuth, OciRef, OciSource, OciSpec, SourceMode, SourceName, SourceStatus,
    highest_match, semver_ranges,
};

/// A unit's address: `ENV/NAME`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct UnitRef {
    pub env: EnvName,
    pub name: UnitName,
}

impl FromStr for UnitRef {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        let Some((env, name)) = s.split_once('/') else {
            return Err(NameError {
                what: "unit",
                value: crate::manifest::prefix(s),
                why: "must be written ENV/NAME",
            });
        };
        Ok(Self {
            env: env.parse()?,
            name: name.parse()?,
        })
    }
}

impl fmt::Display for UnitRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.env, self.name)
    }
}

/// A revision number, counted per unit from 1.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
pub struct RevisionNum(pub u64);

impl RevisionNum {
    pub const FIRST: RevisionNum = RevisionNum(1);

    pub fn next(self) -> RevisionNum {
        RevisionNum(self.0 + 1)
    }

    /// No revision (nothing promoted, reviewed or numbered yet).
    pub fn is_zero(&self) -> bool {
        self.0 == 0
    }
}

impl fmt::Display for RevisionNum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// SHA-256 of a revision's manifests.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    pub fn of(bytes: &[u8]) -> Digest {
        Digest(Sha256::digest(bytes).into())
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    pub fn from_hex(s: &str) -> Option<Digest> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).ok()?;
        Some(Digest(out))
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", &self.to_hex()[..12])
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// Milliseconds since the Unix epoch (the store's time unit).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Default, Serialize, Deserialize)]
pub struct UnixMillis(pub i64);

impl UnixMillis {
    pub fn now() -> UnixMillis {
        Self::of(SystemTime::now())
    }

    /// A wall-clock time (before the epoch: 0; far future: saturated).
    pub fn of(t: SystemTime) -> UnixMillis {
        let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
        UnixMillis(i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
    }

    pub fn to_system_time(self) -> SystemTime {
        UNIX_EPOCH + std::time::Duration::from_millis(u64::try_from(self.0).unwrap_or(0))
    }
}

/// The times the hub gives status reports: the wall clock, moved ahead
/// (never back) so that no time it gives is earlier than one it gave or
/// was told of: the latest in the store at start (written before a
/// restart, or by a replica whose clock runs ahead) and those other
/// replicas recorded. A cluster's statuses of one revision are ordered by
/// this time (watchers and the store keep the newer of two), and soak is
/// measured on it. Moved ahead, it keeps running with the wall clock, so
/// later statuses still get later times.
#[derive(Debug, Default)]
pub struct StatusClock {
    /// How far ahead of the wall clock it runs, in milliseconds.
    ahead: std::sync::atomic::AtomicI64,
    /// The latest time given.
    last: std::sync::atomic::AtomicI64,
}

impl StatusClock {
    /// Now, on this clock.
    pub fn now(&self) -> UnixMillis {
        use std::sync::atomic::Ordering::Relaxed;
        let t = UnixMillis::now().0.saturating_add(self.ahead.load(Relaxed));
        UnixMillis(t.max(self.last.fetch_max(t, Relaxed)))
    }

    /// Never give a time before `t` (moving ahead of the wall clock if it
    /// is behind `t`); how far ahead of the wall clock it now runs.
    pub fn not_before(&self, t: UnixMillis) -> std::time::Duration {
        use std::sync::atomic::Ordering::Relaxed;
        let behind = t.0.saturating_sub(UnixMillis::now().0);
        let ahead = self.ahead.fetch_max(behind, Relaxed).max(behind);
        self.last.fetch_max(t.0, Relaxed);
        std::time::Duration::from_millis(u64::try_from(ahead).unwrap_or(0))
    }
}

/// Who did something: recorded in every audit entry and revision.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Actor {
    /// An operator, by token name (`admin` for the generated admin token).
    Operator(String),
    /// An agent, by cluster.
    Agent(ClusterName),
    /// The hub itself (start-up, automatic actions).
    Hub,
    /// A source acting on its own (`confighub:<worker>`, `oci:<source>`).
    Source(String),
}

impl fmt::Display for Actor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Actor::Operator(n) => write!(f, "operator:{n}"),
            Actor::Agent(c) => write!(f, "agent:{c}"),
            Actor::Hub => f.write_str("hub"),
            Actor::Source(s) => f.write_str(s),
        }
    }
}

/// What operators may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Admin,
    ReadOnly,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::ReadOnly => "read-only",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "admin" => Some(Role::Admin),
            "read-only" => Some(Role::ReadOnly),
            _ => None,
        }
    }
}

pub type Labels = BTreeMap<String, String>;

/// Checks labels an operator sets (on a unit or a cluster) against
/// Kubernetes label syntax: `[PREFIX/]NAME=VALUE`, so `--selector` can name
/// them (a `,` or `=` in one could never be selected).
pub fn check_labels(labels: &Labels) -> Result<(), String> {
    for (k, v) in labels {
        let why = label_key(k)
            .err()
            .or_else(|| label_value(v).err().map(|e| format!("its value {e}")));
        if let Some(why) = why {
            return Err(format!(
                "invalid label {}={}: {why}",
                crate::manifest::prefix(k),
                crate::manifest::prefix(v)
            ));
        }
    }
    Ok(())
}

/// Labels a source (ConfigHub, an OCI artifact) brings: only bounded in
/// size. The source's own rules govern them; one that is not Kubernetes
/// label syntax is kept, and no selector can name it.
pub fn check_label_sizes(labels: &Labels) -> Result<(), String> {
    match labels
        .iter()
        .find(|(k, v)| k.is_empty() || k.len() > 317 || v.len() > 63)
    {
        Some((k, v)) => Err(format!(
            "invalid label {}={}: a key of 1 to 317 characters, a value of at most 63",
            crate::manifest::prefix(k),
            crate::manifest::prefix(v)
        )),
        None => Ok(()),
    }
}

/// A label's name part (or a whole value): at most 63 characters,
/// alphanumeric at both ends, `-`, `_` and `.` between, as Kubernetes
/// takes them (so a selector can name them).
fn label_name(s: &str) -> Result<(), String> {
    let inner = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.');
    let bytes = s.as_bytes();
    if s.is_empty() || s.len() > 63 {
        return Err("must be 1 to 63 characters".into());
    }
    if !bytes[0].is_ascii_alphanumeric()
        || !bytes[bytes.len() - 1].is_ascii_alphanumeric()
        || !bytes.iter().all(|b| inner(*b))
    {
        return Err(
            "must be letters, digits, '-', '_' or '.', starting and ending with a letter or digit"
                .into(),
        );
    }
    Ok(())
}

/// A label key: `[PREFIX/]NAME`, the prefix a DNS subdomain.
fn label_key(k: &str) -> Result<(), String> {
    let name = match k.split_once('/') {
        Some((prefix, name)) => {
            check_dns1123_subdomain(prefix).map_err(|e| format!("its prefix {e}"))?;
            name
        }
        None => k,
    };
    label_name(name)
}

/// A label value: empty, or as a label name.
fn label_value(v: &str) -> Result<(), String> {
    if v.is_empty() { Ok(()) } else { label_name(v) }
}

/// What promotions into an environment require.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct EnvPolicy {
    /// Approvals from distinct operators.
    pub required_approvals: u32,
    /// Seconds the source revision must have been Ready everywhere.
    pub soak_seconds: u64,
    pub auto_promote: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Environment {
    pub name: EnvName,
    pub position: u32,
    pub created_at: UnixMillis,
    pub policy: EnvPolicy,
}

/// An environment-specific change applied on top of promoted content.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Override {
    pub kind: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Dot-separated field path (`spec.replicas`).
    pub path: String,
    pub value: serde_json::Value,
    /// The upstream head when the override was last set: a change of the
    /// field upstream up to there was seen and is no conflict.
    #[serde(default, skip_serializing_if = "RevisionNum::is_zero")]
    pub reviewed_at: RevisionNum,
}

impl Override {
    /// Whether the value is a Secret's and must not be shown.
    pub fn is_secret(&self) -> bool {
        self.kind == "Secret"
    }

    /// The value as logs, audit entries, messages and read-only readers
    /// see it: `***` for a Secret's.
    pub fn shown_value(&self) -> String {
        if self.is_secret() {
            "\"***\"".to_owned()
        } else {
            self.value.to_string()
        }
    }

    /// The override as a read-only reader sees it.
    pub fn masked(&self) -> Override {
        let mut o = self.clone();
        if o.is_secret() {
            o.value = serde_json::Value::String("***".into());
        }
        o
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Cluster {
    pub name: ClusterName,
    pub environment: EnvName,
    pub labels: Labels,
    pub created_at: UnixMillis,
    /// Every credential revoked, for good.
    pub revoked: bool,
    /// When its agent last opened or closed a session (0: never).
    pub last_seen: UnixMillis,
    /// The agent version of that session.
    pub agent_version: String,
    /// When its newest client certificate expires (none issued: `None`).
    pub cert_expires: Option<UnixMillis>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Unit {
    pub unit: UnitRef,
    pub labels: Labels,
    pub head: RevisionNum,
    pub destroyed: bool,
    pub created_at: UnixMillis,
    pub updated_at: UnixMillis,
    /// The upstream unit this one is promoted from.
    pub upstream: Option<UnitRef>,
    pub overrides: Vec<Override>,
    /// The upstream revision the head came from (0: not promoted).
    pub head_source: RevisionNum,
    /// The source that owns the unit (`confighub:SPACE`, `oci:NAME`);
    /// empty for the hub's own units. Other writers are refused.
    pub source: String,
}

impl Unit {
    /// The unit with its Secret override values masked (as listings and
    /// read-only readers show it).
    pub fn masked(mut self) -> Unit {
        self.overrides = self.overrides.iter().map(Override::masked).collect();
        self
    }
}

/// An immutable revision of a unit. `manifests` is empty for a tombstone and
/// in listings that leave content out.
#[derive(Clone, Debug, PartialEq)]
pub struct Revision {
    pub unit: UnitRef,
    pub number: RevisionNum,
    pub digest: Digest,
    pub tombstone: bool,
    pub manifests: Arc<str>,
    pub documents: u32,
    pub author: String,
    pub message: String,
    pub origin: String,
    pub created_at: UnixMillis,
    /// For a promoted revision: the upstream revision it came from (0: none).
    pub source_revision: RevisionNum,
}

/// The head of a unit as the fan-out needs it: no content.
#[derive(Clone, Debug, PartialEq)]
pub struct HeadRef {
    pub unit: UnitName,
    pub number: RevisionNum,
    pub digest: Digest,
    pub tombstone: bool,
}

/// How a put treats an existing or missing unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PutMode {
    CreateOrUpdate,
    Create,
    Update,
}

/// A revision about to be committed (already validated).
#[derive(Clone, Debug)]
pub struct NewRevision {
    pub unit: UnitRef,
    pub mode: PutMode,
    /// `None` keeps the unit's labels.
    pub labels: Option<Labels>,
    pub tombstone: bool,
    pub manifests: Arc<str>,
    pub documents: u32,
    pub digest: Digest,
    pub author: Actor,
    pub message: String,
    pub origin: String,
    pub source_revision: RevisionNum,
    /// Link set when this put creates the unit, or re-links it (a
    /// promotion from an environment inserted in between).
    pub upstream: Option<UnitRef>,
    /// The unit's head this revision was planned against (0: the unit does
    /// not exist yet); checked under the commit's lock, so a concurrent
    /// change is a conflict instead of being silently superseded.
    pub expected_head: Option<RevisionNum>,
    /// Who owns the unit (empty: the hub). A unit owned by a source takes
    /// revisions from that source only.
    pub source: String,
}

impl NewRevision {
    /// A revision with (validated) content, created or updated as needed.
    pub fn content(
        unit: UnitRef,
        manifests: Arc<str>,
        documents: u32,
        digest: Digest,
        author: Actor,
        origin: impl Into<String>,
        message: impl Into<String>,
    ) -> NewRevision {
        NewRevision {
            unit,
            mode: PutMode::CreateOrUpdate,
            labels: None,
            tombstone: false,
            manifests,
            documents,
            digest,
            author,
            message: message.into(),
            origin: origin.into(),
            source_revision: RevisionNum(0),
            upstream: None,
            expected_head: None,
            source: String::new(),
        }
    }

    /// A tombstone: agents delete what they applied for the unit.
    pub fn tombstone(
        unit: UnitRef,
        author: Actor,
        origin: impl Into<String>,
        message: impl Into<String>,
    ) -> NewRevision {
        NewRevision {
            mode: PutMode::Update,
            tombstone: true,
            ..NewRevision::content(
                unit,
                Arc::from(""),
                0,
                Digest::of(b""),
                author,
                origin,
                message,
            )
        }
    }
}

/// What an agent reported about one of its units.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Default, Serialize)]
pub enum Phase {
    #[default]
    Unknown,
    Applying,
    Applied,
    Progressing,
    Ready,
    Degraded,
    Failed,
    Drifted,
    Destroyed,
    Superseded,
}

impl Phase {
    pub const ALL: [Phase; 10] = [
        Phase::Unknown,
        Phase::Applying,
        Phase::Applied,
        Phase::Progressing,
        Phase::Ready,
        Phase::Degraded,
        Phase::Failed,
        Phase::Drifted,
        Phase::Destroyed,
        Phase::Superseded,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Unknown => "Unknown",
            Phase::Applying => "Applying",
            Phase::Applied => "Applied",
            Phase::Progressing => "Progressing",
            Phase::Ready => "Ready",
            Phase::Degraded => "Degraded",
            Phase::Failed => "Failed",
            Phase::Drifted => "Drifted",
            Phase::Destroyed => "Destroyed",
            Phase::Superseded => "Superseded",
        }
    }

    pub fn parse(s: &str) -> Phase {
        Phase::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .unwrap_or(Phase::Unknown)
    }

    /// A phase that will not change without a new revision or outside event.
    pub fn is_failure(self) -> bool {
        matches!(self, Phase::Failed | Phase::Degraded)
    }
}

/// Per-resource detail of a status report (kept as reported).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ResourceState {
    pub api_version: String,
    pub kind: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace: String,
    pub name: String,
    pub sync: String,
    pub health: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drifted_fields: Vec<String>,
}

/// A status report from an agent, as stored.
#[derive(Clone, Debug, PartialEq)]
pub struct StatusReport {
    pub cluster: ClusterName,
    pub unit: UnitRef,
    pub revision: RevisionNum,
    pub phase: Phase,
    pub message: String,
    pub resources: Vec<ResourceState>,
    pub observed_at: UnixMillis,
}

/// The hub's record of one unit in one cluster.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct UnitStatus {
    pub acked: RevisionNum,
    pub revision: RevisionNum,
    pub phase: Phase,
    pub message: String,
    pub resources: Vec<ResourceState>,
    pub updated_at: UnixMillis,
    /// Since when `revision` has been continuously Ready (0: not Ready).
    pub ready_since: UnixMillis,
}

/// One row of the status matrix.
#[derive(Clone, Debug, PartialEq)]
pub struct StatusCell {
    pub cluster: ClusterName,
    pub unit: UnitRef,
    pub status: UnitStatus,
}

#[derive(Clone, Debug, PartialEq)]
pub struct AuditEntry {
    pub id: u64,
    pub time: UnixMillis,
    pub actor: String,
    pub action: String,
    pub target: String,
    pub detail: String,
}

/// One unit of a promotion (release set).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PromotedUnit {
    pub source_unit: String,
    pub source_revision: u64,
    pub target_unit: String,
    pub target_revision: u64,
    /// The target's head before (what a rollback of the promotion restores).
    pub previous_revision: u64,
}

/// A recorded promotion.
#[derive(Clone, Debug, PartialEq)]
pub struct Promotion {
    pub id: u64,
    pub time: UnixMillis,
    pub actor: String,
    pub from: String,
    pub to: String,
    pub automatic: bool,
    pub forced: bool,
    pub reason: String,
    pub items: Vec<PromotedUnit>,
}

/// An operation a source asked for (a ConfigHub queued operation), kept
/// until its terminal report is delivered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceOperation {
    /// The source's id for it (a ConfigHub `QueuedOperationID`).
    pub id: String,
    /// `confighub:<worker>`.
    pub source: String,
    /// `ENV/NAME` (as the source named it; may not be a valid unit).
    pub unit: String,
    pub action: String,
    /// `running` until the terminal report is decided, then `reported`.
    pub state: String,
    /// The hub revision the operation committed (0: none yet).
    pub hub_revision: RevisionNum,
    /// The terminal report, as the source's wire format (empty: none yet).
    pub report: String,
    pub delivered: bool,
    /// What the source needs to resume the operation (its own JSON).
    pub detail: String,
    pub created_at: UnixMillis,
}

/// An audit record about to be written.
#[derive(Clone, Debug)]
pub struct NewAudit {
    pub actor: Actor,
    pub action: &'static str,
    pub target: String,
    pub detail: String,
}

#[cfg(test)]
mod tests {

    #[test]
    fn labels_follow_kubernetes_syntax_so_selectors_can_name_them() {
        let one = |k: &str, v: &str| check_labels(&[(k.to_owned(), v.to_owned())].into());
        for (k, v) in [
            ("app", "web"),
            ("example.com/tier", "front-end_1.2"),
            ("team", ""),
        ] {
            one(k, v).unwrap_or_else(|e| panic!("{k}={v}: {e}"));
        }
        for (k, v) in [
            ("app", "a,b"),
            ("app", "x=y"),
            ("a b", "web"),
            ("", "web"),
            ("app", "-web"),
            ("Example.com/tier", "x"),
            ("app", &"x".repeat(64)),
        ] {
            let e = one(k, v).unwrap_err();
            assert!(e.starts_with("invalid label"), "{e}");
        }
    }

    use super::*;

    #[test]
    fn the_status_clock_never_goes_back_and_keeps_running() {
        let clock = StatusClock::default();
        let first = clock.now();
        assert!(clock.now() >= first);
        // A time in the store from a clock an hour ahead.
        let ahead = UnixMillis(UnixMillis::now().0 + 3_600_000);
        assert!(clock.not_before(ahead) >= std::time::Duration::from_secs(3_599));
        let then = clock.now();
        assert!(then >= ahead);
        // It runs on with the wall clock: a later status gets a later time.
        let start = std::time::Instant::now();
        while clock.now() == then {
            assert!(start.elapsed() < std::time::Duration::from_secs(5));
            std::thread::yield_now();
        }
        assert!(clock.now() > then);
        // An earlier time changes nothing.
        clock.not_before(UnixMillis(0));
        assert!(clock.now() > then);
    }

    #[test]
    fn names_follow_dns1123_labels() {
        for ok in ["dev", "prod-eu-1", "a", "0x"] {
            assert!(ok.parse::<EnvName>().is_ok(), "{ok}");
        }
        for bad in ["", "Dev", "-dev", "dev-", "d_v", "a.b", &"x".repeat(64)] {
            assert!(bad.parse::<ClusterName>().is_err(), "{bad}");
        }
    }

    #[test]
    fn unit_refs_parse_and_print() {
        let r: UnitRef = "dev/web".parse().unwrap();
        assert_eq!(r.to_string(), "dev/web");
        assert!("web".parse::<UnitRef>().is_err());
        assert!("dev/Web".parse::<UnitRef>().is_err());
        assert!("dev/web/x".parse::<UnitRef>().is_err());
    }

    #[test]
    fn subdomains() {
        assert!(check_dns1123_subdomain("tables.dynamodb.aws.upbound.io").is_ok());
        assert!(check_dns1123_subdomain("Bad_Name").is_err());
        assert!(check_dns1123_subdomain("a..b").is_err());
    }

    #[test]
    fn digest_hex_round_trip() {
        let d = Digest::of(b"hello");
        assert_eq!(Digest::from_hex(&d.to_hex()), Some(d));
        assert_eq!(Digest::from_hex("zz"), None);
    }
}
