//! What confighub-sim keeps: spaces, workers (secret, lease, what they
//! provide), targets, units with numbered revisions, queued operations in
//! creation order, unit events (one per reported ActionResult) and the
//! event log. JSON shapes follow the SDK (`confighub/sdk`): PascalCase Go
//! field names, base64 `Data`, RFC 3339 times.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant, SystemTime};

use serde_json::{Value, json};

pub fn now() -> String {
    humantime::format_rfc3339_nanos(SystemTime::now()).to_string()
}

pub fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// The SDK's `ActionResultType` values (its validator refuses others).
pub const RESULTS: [&str; 15] = [
    "None",
    "ApplyCompleted",
    "ApplySynced",
    "ApplyFailed",
    "ApplyWaitFailed",
    "DestroyCompleted",
    "DestroyFailed",
    "DestroyWaitFailed",
    "RefreshFailed",
    "RefreshAndDrifted",
    "RefreshAndNoDrift",
    "ImportCompleted",
    "ImportFailed",
    "FunctionInvocationCompleted",
    "FunctionInvocationFailed",
];

/// The SDK's `ActionStatusType` values.
pub const STATUSES: [&str; 8] = [
    "None",
    "Pending",
    "Submitted",
    "Progressing",
    "Completed",
    "Failed",
    "Canceled",
    "Aborted",
];

/// The statuses that end an operation.
pub const TERMINAL: [&str; 4] = ["Completed", "Failed", "Canceled", "Aborted"];

/// The zero time Go prints for an unset `time.Time`.
pub const ZERO_TIME: &str = "0001-01-01T00:00:00Z";

#[derive(Clone, Debug)]
pub struct Space {
    pub id: String,
    pub slug: String,
}

impl Space {
    pub fn json(&self) -> Value {
        json!({"SpaceID": self.id, "Slug": self.slug, "DisplayName": self.slug, "EntityType": "space"})
    }
}

#[derive(Clone, Debug)]
pub struct Lease {
    pub claim_token: String,
    pub expires: Instant,
}

#[derive(Clone, Debug)]
pub struct Worker {
    pub id: String,
    pub slug: String,
    pub space_id: String,
    pub secret: String,
    pub provided_info: Value,
    pub lease: Option<Lease>,
    /// Open SSE streams (each ends when its sender is dropped).
    pub streams: usize,
    /// Bumped by each new stream; older streams of the worker end.
    pub stream_generation: u64,
    pub last_seen: Option<Instant>,
    pub last_seen_at: String,
    pub last_message: String,
}

impl Worker {
    /// `Ready` while it holds a live lease or stream and was seen lately.
    pub fn condition(&self) -> &'static str {
        let connected = self.streams > 0
            || self
                .lease
                .as_ref()
                .is_some_and(|l| l.expires > Instant::now());
        match (connected, self.last_seen) {
            (true, Some(t)) if t.elapsed() < Duration::from_secs(90) => "Ready",
            (true, _) => "Unresponsive",
            (false, _) => "Disconnected",
        }
    }

    pub fn json(&self, with_secret: bool) -> Value {
        let mut v = json!({
            "BridgeWorkerID": self.id, "Slug": self.slug, "SpaceID": self.space_id,
            "Condition": self.condition(), "ProvidedInfo": self.provided_info,
            "LastSeenAt": if self.last_seen_at.is_empty() { ZERO_TIME } else { &self.last_seen_at },
            "LastMessage": self.last_message, "EntityType": "bridge_worker",
        });
        if with_secret {
            v["Secret"] = json!(self.secret);
        }
        v
    }
}

#[derive(Clone, Debug)]
pub struct Target {
    pub id: String,
    pub slug: String,
    pub space_id: String,
    pub worker_id: String,
    pub bridge_handle: String,
    pub provider_type: String,
    pub toolchain_type: String,
    pub parameters: String,
    pub options: BTreeMap<String, String>,
}

impl Target {
    pub fn json(&self) -> Value {
        json!({
            "TargetID": self.id, "Slug": self.slug, "DisplayName": self.slug, "SpaceID": self.space_id,
            "BridgeWorkerID": self.worker_id, "BridgeHandle": self.bridge_handle,
            "ProviderType": self.provider_type, "ToolchainType": self.toolchain_type,
            "Parameters": self.parameters, "Options": self.options, "EntityType": "target",
        })
    }
}

#[derive(Clone, Debug)]
pub struct Revision {
    pub num: i64,
    pub data: Vec<u8>,
    pub created_at: String,
}

#[derive(Clone, Debug)]
pub struct Unit {
    pub id: String,
    pub slug: String,
    pub space_id: String,
    pub target_id: Option<String>,
    pub toolchain_type: String,
    pub labels: BTreeMap<String, String>,
    pub revisions: Vec<Revision>,
    pub last_applied: i64,
    pub live: i64,
    pub version: i64,
    /// The worker's `BridgeState` from its last terminal report (base64).
    pub bridge_state: Option<String>,
}

impl Unit {
    pub fn head(&self) -> &Revision {
        self.revisions.last().expect("a unit has a revision")
    }

    pub fn json(&self) -> Value {
        use base64::Engine as _;
        json!({
            "UnitID": self.id, "Slug": self.slug, "SpaceID": self.space_id,
            "TargetID": self.target_id, "ToolchainType": self.toolchain_type, "Labels": self.labels,
            "Data": base64::engine::general_purpose::STANDARD.encode(&self.head().data),
            "HeadRevisionNum": self.head().num, "LastAppliedRevisionNum": self.last_applied,
            "LiveRevisionNum": self.live, "Version": self.version, "EntityType": "unit",
        })
    }
}

/// A queued operation (`QueuedOperation` / `UnitAction`).
#[derive(Clone, Debug)]
pub struct Operation {
    pub id: String,
    pub action: String,
    pub unit_id: String,
    pub space_id: String,
    pub target_id: String,
    pub worker_id: String,
    pub revision_num: i64,
    pub dry_run: bool,
    /// `Pending` → `Delivered` → a terminal status.
    pub status: String,
    pub created_at: String,
    /// For `Cancel`: the operation to cancel.
    pub cancels: Option<String>,
}

impl Operation {
    pub fn json(&self) -> Value {
        json!({
            "QueuedOperationID": self.id, "Action": self.action, "UnitID": self.unit_id,
            "SpaceID": self.space_id, "TargetID": self.target_id, "BridgeWorkerID": self.worker_id,
            "RevisionNum": self.revision_num, "Status": self.status, "CreatedAt": self.created_at,
            "DryRun": self.dry_run,
        })
    }
}

/// One reported ActionResult.
#[derive(Clone, Debug)]
pub struct UnitEvent {
    pub id: String,
    pub unit_id: String,
    pub space_id: String,
    pub operation_id: String,
    pub action: String,
    pub result: String,
    pub status: String,
    pub message: String,
    pub revision_num: i64,
    pub started_at: String,
    pub terminated_at: String,
    pub created_at: String,
    pub resource_statuses: Value,
    pub seq: u64,
}

impl UnitEvent {
    pub fn json(&self) -> Value {
        json!({
            "UnitEventID": self.id, "UnitID": self.unit_id, "SpaceID": self.space_id,
            "QueuedOperationID": self.operation_id, "Action": self.action, "Result": self.result,
            "Status": self.status, "Message": self.message, "RevisionNum": self.revision_num,
            "StartedAt": self.started_at, "TerminatedAt": self.terminated_at,
            "CreatedAt": self.created_at, "ResourceStatuses": self.resource_statuses,
            "EntityType": "unit_event",
        })
    }
}

/// An entry of the event log (`release.published`, …).
#[derive(Clone, Debug)]
pub struct LogEntry {
    pub cursor: i64,
    pub event_type: String,
    pub space_id: String,
    pub target_id: String,
    pub subject_type: String,
    pub subject_id: String,
    pub payload: Value,
    pub created_at: String,
}

impl LogEntry {
    pub fn message(&self) -> Value {
        json!({"Event": "EventLog", "Data": {
            "CursorID": self.cursor, "EventType": self.event_type, "SubjectEntityType": self.subject_type,
            "SubjectEntityID": self.subject_id, "SpaceID": self.space_id, "TargetID": self.target_id,
            "Payload": self.payload, "CreatedAt": self.created_at, "SubscriptionName": "",
        }})
    }
}

/// A published release of a space.
#[derive(Clone, Debug)]
pub struct Release {
    pub id: String,
    pub space_id: String,
    pub num: i64,
    /// sha256 of the bundle (ConfigHub's `Digest`).
    pub digest: String,
    /// The OCI manifest's digest.
    pub manifest_digest: String,
    pub unit_count: usize,
    pub created_at: String,
}

impl Release {
    pub fn json(&self) -> Value {
        json!({"ReleaseID": self.id, "SpaceID": self.space_id, "ReleaseNum": self.num,
               "Digest": self.digest, "ManifestDigest": self.manifest_digest,
               "UnitCount": self.unit_count, "Published": true, "CreatedAt": self.created_at})
    }
}

/// Faults the simulator injects (worker API only).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Faults {
    /// Share (0..1) of worker calls answered 503.
    #[serde(default)]
    pub error_rate: f64,
    /// The next this many worker calls are answered 503.
    #[serde(default)]
    pub fail_next: u32,
    /// The next this many reports (ActionResults) are answered 503.
    #[serde(default)]
    pub fail_reports: u32,
    #[serde(default)]
    pub latency_ms: u64,
    /// Lifetime of issued JWTs, seconds (0: an hour).
    #[serde(default)]
    pub jwt_ttl_seconds: u64,
    /// Polls fail with 504 (a proxy timing out) instead of answering.
    #[serde(default)]
    pub fail_polls: bool,
    /// Long polls end (204) after this many seconds whatever the worker
    /// asked for (0: as asked).
    #[serde(default)]
    pub poll_timeout_seconds: u64,
}

#[derive(Default)]
pub struct State {
    pub spaces: Vec<Space>,
    pub workers: Vec<Worker>,
    pub targets: Vec<Target>,
    pub units: Vec<Unit>,
    pub operations: Vec<Operation>,
    /// Per worker: operations not yet delivered, in creation order.
    pub queues: BTreeMap<String, VecDeque<String>>,
    pub events: Vec<UnitEvent>,
    pub log: Vec<LogEntry>,
    /// Per event cursor name: the last cursor delivered.
    pub cursors: BTreeMap<String, i64>,
    pub faults: Faults,
    pub event_seq: u64,
    /// Raw event messages for a worker, delivered before its operations
    /// (tests: unknown events and actions).
    pub injected: BTreeMap<String, Vec<Value>>,
    /// Worker authentications answered (`POST /auth/worker`).
    pub auths: u64,
    /// Calls answered with an injected 503.
    pub injected_errors: u64,
    /// Reports refused because their operation had ended already.
    pub late_reports: u64,
    pub releases: Vec<Release>,
}

impl State {
    pub fn space(&self, id_or_slug: &str) -> Option<&Space> {
        self.spaces
            .iter()
            .find(|s| s.id == id_or_slug || s.slug == id_or_slug)
    }

    pub fn worker(&self, id: &str) -> Option<&Worker> {
        self.workers.iter().find(|w| w.id == id || w.slug == id)
    }

    pub fn worker_mut(&mut self, id: &str) -> Option<&mut Worker> {
        self.workers.iter_mut().find(|w| w.id == id || w.slug == id)
    }

    pub fn unit(&self, space: &str, id_or_slug: &str) -> Option<&Unit> {
        self.units
            .iter()
            .find(|u| u.space_id == space && (u.id == id_or_slug || u.slug == id_or_slug))
    }

    pub fn unit_mut(&mut self, space: &str, id_or_slug: &str) -> Option<&mut Unit> {
        self.units
            .iter_mut()
            .find(|u| u.space_id == space && (u.id == id_or_slug || u.slug == id_or_slug))
    }

    pub fn target(&self, id_or_slug: &str) -> Option<&Target> {
        self.targets
            .iter()
            .find(|t| t.id == id_or_slug || t.slug == id_or_slug)
    }

    /// The events reported for an operation, oldest first.
    pub fn events_of(&self, op_id: &str) -> Vec<UnitEvent> {
        self.events
            .iter()
            .filter(|e| e.operation_id == op_id)
            .cloned()
            .collect()
    }

    /// The newest event of a unit.
    pub fn latest_event(&self, unit_id: &str) -> Option<&UnitEvent> {
        self.events
            .iter()
            .filter(|e| e.unit_id == unit_id)
            .max_by_key(|e| e.seq)
    }

    /// Queues an operation for the worker of the unit's target.
    pub fn enqueue(
        &mut self,
        space: &str,
        unit_id: &str,
        action: &str,
        dry_run: bool,
        cancels: Option<String>,
    ) -> Result<Operation, (u16, String)> {
        let unit = self
            .unit(space, unit_id)
            .ok_or((404, "unit not found".to_owned()))?
            .clone();
        let target_id = unit.target_id.clone().ok_or((
            400,
            format!("unit {} has no target; set one first", unit.slug),
        ))?;
        let target = self
            .target(&target_id)
            .ok_or((400, "the unit's target does not exist".to_owned()))?
            .clone();
        let op = Operation {
            id: new_id(),
            action: action.to_owned(),
            unit_id: unit.id.clone(),
            space_id: unit.space_id.clone(),
            target_id: target.id.clone(),
            worker_id: target.worker_id.clone(),
            revision_num: unit.head().num,
            dry_run,
            status: "Pending".into(),
            created_at: now(),
            cancels,
        };
        if action == "Apply"
            && !dry_run
            && let Some(u) = self.unit_mut(space, unit_id)
        {
            u.last_applied = u.head().num;
        }
        self.operations.push(op.clone());
        self.queues
            .entry(target.worker_id.clone())
            .or_default()
            .push_back(op.id.clone());
        Ok(op)
    }

    /// The `BridgeWorkerEvent` message delivering an operation.
    pub fn event_message(&self, op_id: &str) -> Option<Value> {
        use base64::Engine as _;
        let op = self.operations.iter().find(|o| o.id == op_id)?;
        let target = self.target(&op.target_id)?;
        let space = self.space(&op.space_id)?;
        // A Cancel names the operation to cancel.
        let (queued_id, unit_id) = match &op.cancels {
            Some(other) => (other.clone(), op.unit_id.clone()),
            None => (op.id.clone(), op.unit_id.clone()),
        };
        let unit = self.unit(&op.space_id, &unit_id)?;
        let data = unit
            .revisions
            .iter()
            .find(|r| r.num == op.revision_num)
            .map(|r| r.data.clone())
            .unwrap_or_default();
        let b64 = |b: &[u8]| {
            if b.is_empty() {
                Value::Null
            } else {
                json!(base64::engine::general_purpose::STANDARD.encode(b))
            }
        };
        Some(
            json!({"Event": "BridgeWorkerEvent", "Data": {"Action": op.action, "Payload": {
                "QueuedOperationID": queued_id, "ToolchainType": unit.toolchain_type,
                "ProviderType": target.provider_type, "BridgeHandle": target.bridge_handle,
                "UnitSlug": unit.slug, "UnitID": unit.id, "UnitLabels": unit.labels, "UnitAnnotations": null,
                "SpaceSlug": space.slug, "SpaceID": space.id, "SpaceLabels": null, "SpaceAnnotations": null,
                "OrganizationID": "00000000-0000-0000-0000-00000000000a", "TargetID": target.id,
                "DryRun": op.dry_run, "Data": b64(&data), "LiveData": null, "LiveState": null,
                "BridgeState": unit.bridge_state,
                "TargetOptions": target.options, "TargetParams": b64(target.parameters.as_bytes()),
                "ExtraParams": null, "RevisionNum": op.revision_num, "LiveRevisionNum": unit.live,
                "DriftReconciliationMode": "OnDemand",
            }}}),
        )
    }

    /// Records a reported ActionResult as a unit event.
    pub fn report(&mut self, r: &Value) -> Result<(), (u16, String)> {
        let text = |k: &str| r[k].as_str().unwrap_or_default().to_owned();
        let op_id = text("QueuedOperationID");
        let action = text("Action");
        if action == "Heartbeat" {
            return Ok(());
        }
        for (k, why) in [
            ("UnitID", "UnitID must be provided"),
            ("SpaceID", "SpaceID must be provided"),
            ("QueuedOperationID", "QueuedOperationID must be provided"),
        ] {
            let v = text(k);
            if v.is_empty() || v == "00000000-0000-0000-0000-000000000000" {
                return Err((400, why.to_owned()));
            }
        }
        let message = text("Message");
        if message.len() > 4096 {
            return Err((
                400,
                format!("Message length {} exceeds max length 4096", message.len()),
            ));
        }
        let status = text("Status");
        let result = text("Result");
        if !RESULTS.contains(&result.as_str()) {
            return Err((400, format!("invalid Result {result}")));
        }
        if !STATUSES.contains(&status.as_str()) {
            return Err((400, format!("invalid Status {status}")));
        }
        let op = self
            .operations
            .iter_mut()
            .find(|o| o.id == op_id)
            .ok_or((404, format!("queued operation {op_id} not found")))?;
        if TERMINAL.contains(&op.status.as_str()) {
            self.late_reports += 1;
            return Err((
                400,
                format!("queued operation {op_id} already ended ({})", op.status),
            ));
        }
        if matches!(
            status.as_str(),
            "Completed" | "Failed" | "Canceled" | "Aborted"
        ) {
            op.status = status.clone();
        } else if op.status == "Delivered" || op.status == "Pending" {
            op.status = "Progressing".into();
        }
        if let Some(u) = self.units.iter_mut().find(|u| u.id == text("UnitID")) {
            if result == "ApplyCompleted" {
                u.live = r["RevisionNum"].as_i64().unwrap_or(u.live);
            }
            if let Some(b) = r["BridgeState"].as_str() {
                u.bridge_state = Some(b.to_owned());
            }
        }
        self.event_seq += 1;
        self.events.push(UnitEvent {
            id: new_id(),
            unit_id: text("UnitID"),
            space_id: text("SpaceID"),
            operation_id: op_id,
            action,
            result,
            status,
            message,
            revision_num: r["RevisionNum"].as_i64().unwrap_or(0),
            started_at: text("StartedAt"),
            terminated_at: r["TerminatedAt"].as_str().unwrap_or(ZERO_TIME).to_owned(),
            created_at: now(),
            resource_statuses: r["ResourceStatuses"].clone(),
            seq: self.event_seq,
        });
        Ok(())
    }

    /// Creates or updates the targets a worker's `WorkerInfo` names.
    pub fn register(&mut self, worker_id: &str, info: &Value) {
        let Some(w) = self.worker(worker_id).cloned() else {
            return;
        };
        if let Some(wm) = self.worker_mut(worker_id) {
            wm.provided_info = info.clone();
        }
        let types = info["BridgeWorkerInfo"]["SupportedConfigTypes"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        for t in types {
            for a in t["AvailableTargets"]
                .as_array()
                .cloned()
                .unwrap_or_default()
            {
                let handle = a["BridgeHandle"].as_str().unwrap_or_default().to_owned();
                let slug = a["Name"]
                    .as_str()
                    .filter(|s| !s.is_empty())
                    .map_or_else(|| format!("{}-{handle}", w.slug), str::to_owned);
                self.upsert_target(Target {
                    id: new_id(),
                    slug,
                    space_id: w.space_id.clone(),
                    worker_id: w.id.clone(),
                    bridge_handle: handle,
                    provider_type: t["ProviderType"].as_str().unwrap_or_default().to_owned(),
                    toolchain_type: t["ToolchainType"].as_str().unwrap_or_default().to_owned(),
                    parameters: "null".into(),
                    options: BTreeMap::new(),
                });
            }
        }
    }

    /// Adds a target, or points the one with that slug at the worker.
    pub fn upsert_target(&mut self, t: Target) -> bool {
        match self
            .targets
            .iter_mut()
            .find(|x| x.slug == t.slug && x.space_id == t.space_id)
        {
            Some(x) => {
                x.worker_id = t.worker_id;
                x.bridge_handle = t.bridge_handle;
                false
            }
            None => {
                self.targets.push(t);
                true
            }
        }
    }

    pub fn append_log(
        &mut self,
        event_type: &str,
        space_id: &str,
        subject_type: &str,
        subject_id: &str,
        payload: Value,
    ) {
        let cursor = self.log.last().map_or(1, |e| e.cursor + 1);
        self.log.push(LogEntry {
            cursor,
            event_type: event_type.to_owned(),
            space_id: space_id.to_owned(),
            target_id: String::new(),
            subject_type: subject_type.to_owned(),
            subject_id: subject_id.to_owned(),
            payload,
            created_at: now(),
        });
    }
}
