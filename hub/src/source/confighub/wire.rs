//! ConfigHub's worker wire format, as the public Go SDK (`confighub/sdk`,
//! `core/worker/api`) encodes it: Go field names as JSON keys (no tags),
//! `[]byte` as standard base64 (`null` when empty), UUIDs as strings, times
//! RFC 3339; the auth, lease and poll bodies are snake_case. These types
//! stay in this adapter: the hub's model never sees them.

use std::collections::BTreeMap;

use base64::Engine as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The nil UUID, where the SDK sends one (heartbeat replies).
pub const NIL_UUID: &str = "00000000-0000-0000-0000-000000000000";

/// `Event` values of an [`EventMessage`].
pub mod event {
    pub const WORKER: &str = "WorkerEvent";
    pub const BRIDGE_WORKER: &str = "BridgeWorkerEvent";
    pub const FUNCTION_WORKER: &str = "FunctionWorkerEvent";
    pub const EVENT_LOG: &str = "EventLog";
}

/// `ActionType` values.
pub mod action {
    pub const APPLY: &str = "Apply";
    pub const DESTROY: &str = "Destroy";
    pub const REFRESH: &str = "Refresh";
    pub const IMPORT: &str = "Import";
    pub const FINALIZE: &str = "Finalize";
    pub const HEARTBEAT: &str = "Heartbeat";
    pub const CANCEL: &str = "Cancel";
}

/// `ActionStatusType` values.
pub mod status {
    pub const NONE: &str = "None";
    pub const PROGRESSING: &str = "Progressing";
    pub const COMPLETED: &str = "Completed";
    pub const FAILED: &str = "Failed";
    pub const CANCELED: &str = "Canceled";
    pub const ABORTED: &str = "Aborted";

    /// Statuses that end an operation (exactly one per operation).
    pub fn is_terminal(s: &str) -> bool {
        matches!(s, COMPLETED | FAILED | CANCELED | ABORTED)
    }
}

/// `ActionResultType` values.
pub mod result {
    pub const NONE: &str = "None";
    pub const APPLY_COMPLETED: &str = "ApplyCompleted";
    pub const APPLY_SYNCED: &str = "ApplySynced";
    pub const APPLY_FAILED: &str = "ApplyFailed";
    pub const APPLY_WAIT_FAILED: &str = "ApplyWaitFailed";
    /// Known to some ConfigHub servers only (see `StuckResult`).
    pub const APPLY_STUCK: &str = "ApplyStuck";
    pub const DESTROY_COMPLETED: &str = "DestroyCompleted";
    pub const DESTROY_FAILED: &str = "DestroyFailed";
    pub const DESTROY_WAIT_FAILED: &str = "DestroyWaitFailed";
    pub const REFRESH_FAILED: &str = "RefreshFailed";
    pub const REFRESH_AND_DRIFTED: &str = "RefreshAndDrifted";
    pub const REFRESH_AND_NO_DRIFT: &str = "RefreshAndNoDrift";
    pub const IMPORT_FAILED: &str = "ImportFailed";
}

/// `ResourceReadiness` values.
pub mod readiness {
    pub const READY: &str = "Ready";
    pub const IN_PROGRESS: &str = "InProgress";
    pub const STUCK: &str = "Stuck";
    pub const FAILED: &str = "Failed";
    pub const TERMINATING: &str = "Terminating";
    pub const UNKNOWN: &str = "Unknown";
}

/// `ResourceSyncStatus` values.
pub mod sync {
    pub const SYNCED: &str = "Synced";
    pub const PENDING: &str = "Pending";
    pub const FAILED: &str = "Failed";
}

/// Longest `ActionResult.Message` a server accepts.
pub const MAX_MESSAGE: usize = 4096;

/// `[]byte` fields: standard base64, `null` for none.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Bytes(pub Vec<u8>);

impl Serialize for Bytes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.0.is_empty() {
            s.serialize_none()
        } else {
            s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(&self.0))
        }
    }
}

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s: Option<String> = Option::deserialize(d)?;
        match s {
            None => Ok(Bytes::default()),
            Some(s) => base64::engine::general_purpose::STANDARD
                .decode(s.as_bytes())
                .map(Bytes)
                .map_err(serde::de::Error::custom),
        }
    }
}

impl Bytes {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// `map[string]string` that may arrive as `null`.
fn null_map<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    Ok(Option::<BTreeMap<String, String>>::deserialize(d)?.unwrap_or_default())
}

/// One event from ConfigHub (an SSE `data:` line, or an element of a poll
/// answer).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EventMessage {
    #[serde(rename = "Event")]
    pub event: String,
    #[serde(rename = "Data", default)]
    pub data: serde_json::Value,
}

/// `Data` of a `WorkerEvent`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct WorkerEventRequest {
    #[serde(rename = "Action", default)]
    pub action: String,
}

/// `Data` of a `BridgeWorkerEvent`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BridgeWorkerEventRequest {
    #[serde(rename = "Action", default)]
    pub action: String,
    #[serde(rename = "Payload", default)]
    pub payload: BridgeWorkerPayload,
}

/// What ConfigHub says about one operation on one unit.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct BridgeWorkerPayload {
    #[serde(rename = "QueuedOperationID")]
    pub queued_operation_id: String,
    #[serde(rename = "ToolchainType")]
    pub toolchain_type: String,
    #[serde(rename = "ProviderType")]
    pub provider_type: String,
    #[serde(rename = "BridgeHandle", skip_serializing_if = "String::is_empty")]
    pub bridge_handle: String,
    #[serde(rename = "UnitSlug")]
    pub unit_slug: String,
    #[serde(rename = "UnitID")]
    pub unit_id: String,
    #[serde(rename = "UnitLabels", deserialize_with = "null_map")]
    pub unit_labels: BTreeMap<String, String>,
    #[serde(rename = "UnitAnnotations", deserialize_with = "null_map")]
    pub unit_annotations: BTreeMap<String, String>,
    #[serde(rename = "SpaceSlug")]
    pub space_slug: String,
    #[serde(rename = "SpaceID")]
    pub space_id: String,
    #[serde(rename = "OrganizationID")]
    pub organization_id: String,
    #[serde(rename = "TargetID")]
    pub target_id: String,
    #[serde(rename = "DryRun")]
    pub dry_run: bool,
    #[serde(rename = "Data")]
    pub data: Bytes,
    #[serde(rename = "LiveData")]
    pub live_data: Bytes,
    #[serde(rename = "LiveState")]
    pub live_state: Bytes,
    #[serde(rename = "BridgeState", skip_serializing_if = "Bytes::is_empty")]
    pub bridge_state: Bytes,
    #[serde(
        rename = "TargetOptions",
        deserialize_with = "null_map",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub target_options: BTreeMap<String, String>,
    #[serde(rename = "TargetParams")]
    pub target_params: Bytes,
    #[serde(rename = "ExtraParams")]
    pub extra_params: Bytes,
    #[serde(rename = "RevisionNum")]
    pub revision_num: i64,
    #[serde(rename = "LiveRevisionNum")]
    pub live_revision_num: i64,
    #[serde(
        rename = "DriftReconciliationMode",
        skip_serializing_if = "String::is_empty"
    )]
    pub drift_reconciliation_mode: String,
}

/// Per-resource status in an [`ActionResult`], keyed
/// `apiVersion/kind#namespace/name`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceStatus {
    #[serde(
        rename = "SyncStatus",
        skip_serializing_if = "String::is_empty",
        default
    )]
    pub sync_status: String,
    #[serde(
        rename = "Readiness",
        skip_serializing_if = "String::is_empty",
        default
    )]
    pub readiness: String,
    #[serde(rename = "Message", skip_serializing_if = "String::is_empty", default)]
    pub message: String,
    #[serde(rename = "UpdatedAt")]
    pub updated_at: String,
}

/// A report about one operation (progress, then exactly one terminal).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ActionResult {
    #[serde(rename = "UnitID")]
    pub unit_id: String,
    #[serde(rename = "SpaceID")]
    pub space_id: String,
    #[serde(rename = "QueuedOperationID")]
    pub queued_operation_id: String,
    #[serde(rename = "RevisionNum")]
    pub revision_num: i64,
    #[serde(rename = "Action")]
    pub action: String,
    #[serde(rename = "Result")]
    pub result: String,
    #[serde(rename = "Status")]
    pub status: String,
    #[serde(rename = "Message")]
    pub message: String,
    #[serde(rename = "StartedAt")]
    pub started_at: String,
    #[serde(
        rename = "TerminatedAt",
        skip_serializing_if = "Option::is_none",
        default
    )]
    pub terminated_at: Option<String>,
    #[serde(rename = "Data", skip_serializing_if = "Bytes::is_empty", default)]
    pub data: Bytes,
    #[serde(rename = "LiveData", skip_serializing_if = "Bytes::is_empty", default)]
    pub live_data: Bytes,
    #[serde(rename = "LiveState", skip_serializing_if = "Bytes::is_empty", default)]
    pub live_state: Bytes,
    #[serde(
        rename = "BridgeState",
        skip_serializing_if = "Bytes::is_empty",
        default
    )]
    pub bridge_state: Bytes,
    #[serde(
        rename = "ResourceStatuses",
        skip_serializing_if = "BTreeMap::is_empty",
        default
    )]
    pub resource_statuses: BTreeMap<String, ResourceStatus>,
    #[serde(
        rename = "ErrorMessages",
        skip_serializing_if = "Vec::is_empty",
        default
    )]
    pub error_messages: Vec<String>,
}

impl ActionResult {
    /// Bounds the message to what a server accepts.
    pub fn bounded(mut self) -> ActionResult {
        if self.message.len() > MAX_MESSAGE {
            let mut cut = MAX_MESSAGE - 3;
            while !self.message.is_char_boundary(cut) {
                cut -= 1;
            }
            self.message.truncate(cut);
            self.message.push('…');
        }
        self
    }
}

/// What the worker provides (registration).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct WorkerInfo {
    #[serde(rename = "BridgeWorkerInfo")]
    pub bridge_worker_info: BridgeWorkerInfo,
    #[serde(rename = "FunctionWorkerInfo")]
    pub function_worker_info: FunctionWorkerInfo,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BridgeWorkerInfo {
    #[serde(rename = "SupportedConfigTypes")]
    pub supported_config_types: Vec<SupportedConfigType>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FunctionWorkerInfo {
    #[serde(rename = "SupportedFunctions")]
    pub supported_functions: BTreeMap<String, serde_json::Value>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SupportedConfigType {
    #[serde(rename = "ProviderType")]
    pub provider_type: String,
    #[serde(rename = "ToolchainType")]
    pub toolchain_type: String,
    #[serde(
        rename = "LiveStateType",
        skip_serializing_if = "String::is_empty",
        default
    )]
    pub live_state_type: String,
    #[serde(rename = "AvailableTargets", default)]
    pub available_targets: Vec<AvailableTarget>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AvailableTarget {
    #[serde(rename = "BridgeHandle")]
    pub bridge_handle: String,
    #[serde(rename = "Name")]
    pub name: String,
}

/// `POST /auth/worker` request.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AuthRequest {
    pub worker_id: String,
    pub worker_secret: String,
}

/// `POST /auth/worker` answer.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct AuthResponse {
    pub access_token: String,
    #[serde(default)]
    pub worker: Option<AuthWorker>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct AuthWorker {
    #[serde(default)]
    pub bridge_worker_id: String,
    #[serde(default)]
    pub slug: String,
    #[serde(default)]
    pub space_id: String,
    #[serde(default)]
    pub space_slug: String,
}

/// Lease claim answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Lease {
    pub claim_token: String,
    #[serde(default)]
    pub ttl_seconds: i64,
}

/// Lease release and poll bodies.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClaimToken {
    pub claim_token: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PollRequest {
    pub claim_token: String,
    pub timeout_seconds: i64,
}

/// Event-cursor poll body.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct CursorPollRequest {
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub event_types: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub from_cursor: Option<i64>,
    pub timeout_seconds: i64,
}

/// `Data` of an `EventLog` event.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct EventLogEntry {
    #[serde(rename = "CursorID")]
    pub cursor_id: i64,
    #[serde(rename = "EventType")]
    pub event_type: String,
    #[serde(rename = "SubjectEntityType")]
    pub subject_entity_type: String,
    #[serde(rename = "SubjectEntityID")]
    pub subject_entity_id: String,
    #[serde(rename = "SpaceID")]
    pub space_id: String,
    #[serde(rename = "TargetID")]
    pub target_id: String,
    #[serde(rename = "Payload")]
    pub payload: serde_json::Value,
    #[serde(rename = "CreatedAt")]
    pub created_at: String,
}

/// A target upsert (`POST …/target`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TargetCreate {
    #[serde(rename = "Slug")]
    pub slug: String,
    #[serde(rename = "DisplayName")]
    pub display_name: String,
    #[serde(rename = "BridgeHandle")]
    pub bridge_handle: String,
    #[serde(rename = "BridgeWorkerID")]
    pub bridge_worker_id: String,
    #[serde(rename = "ProviderType")]
    pub provider_type: String,
    #[serde(rename = "ToolchainType")]
    pub toolchain_type: String,
    #[serde(rename = "LiveStateType")]
    pub live_state_type: String,
    /// JSON text in a string (`"null"` for none).
    #[serde(rename = "Parameters")]
    pub parameters: String,
}

/// `GET /api/info`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ApiInfo {
    #[serde(rename = "WorkerPort", default)]
    pub worker_port: String,
}

/// RFC 3339 (UTC, nanoseconds) of a wall-clock time, as Go prints it.
pub fn rfc3339(t: std::time::SystemTime) -> String {
    humantime::format_rfc3339_nanos(t).to_string()
}

/// The resource key ConfigHub uses: `apiVersion/kind#namespace/name`.
pub fn resource_key(api_version: &str, kind: &str, namespace: &str, name: &str) -> String {
    format!("{api_version}/{kind}#{namespace}/{name}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_decode_as_go_encodes_them() {
        let json = r#"{"QueuedOperationID":"6b0f3c1e-0000-4000-8000-000000000001","ToolchainType":"Kubernetes/YAML",
            "ProviderType":"Kubernetes","BridgeHandle":"dev","UnitSlug":"web","UnitID":"u","UnitLabels":null,
            "UnitAnnotations":null,"SpaceSlug":"s","SpaceID":"sp","SpaceLabels":null,"SpaceAnnotations":null,
            "OrganizationID":"o","TargetID":"t","DryRun":false,"Data":"a2luZDogQ29uZmlnTWFw","LiveData":null,
            "LiveState":null,"TargetParams":null,"ExtraParams":null,"RevisionNum":3,"LiveRevisionNum":2,
            "DriftReconciliationMode":"OnDemand"}"#;
        let p: BridgeWorkerPayload = serde_json::from_str(json).unwrap();
        assert_eq!(p.data.0, b"kind: ConfigMap");
        assert!(p.live_data.is_empty() && p.unit_labels.is_empty());
        assert_eq!(p.revision_num, 3);
        assert_eq!(p.bridge_handle, "dev");
    }

    #[test]
    fn results_encode_go_field_names_and_omit_what_go_omits() {
        let r = ActionResult {
            unit_id: "u".into(),
            action: action::APPLY.into(),
            result: result::NONE.into(),
            status: status::PROGRESSING.into(),
            started_at: "2026-11-30T00:00:00Z".into(),
            ..Default::default()
        };
        let v = serde_json::to_value(&r).unwrap();
        for key in [
            "UnitID",
            "SpaceID",
            "QueuedOperationID",
            "RevisionNum",
            "StartedAt",
            "Message",
        ] {
            assert!(v.get(key).is_some(), "{key} always present: {v}");
        }
        for key in [
            "TerminatedAt",
            "Data",
            "ResourceStatuses",
            "ErrorMessages",
            "BridgeState",
        ] {
            assert!(v.get(key).is_none(), "{key} omitted when empty: {v}");
        }
        let long = ActionResult {
            message: "é".repeat(5000),
            ..Default::default()
        }
        .bounded();
        assert!(long.message.len() <= MAX_MESSAGE);
    }
}
