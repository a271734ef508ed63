//! The hub's error type and the one place where errors become gRPC statuses.

use tonic::{Code, Status};

use crate::manifest::ManifestError;
use crate::model::NameError;
use crate::store::StoreError;

pub type Result<T, E = HubError> = std::result::Result<T, E>;

/// Errors of hub operations. Messages never carry secret values.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error(transparent)]
    Name(#[from] NameError),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// Also used for "exists but not yours": the two must look identical.
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0} already exists")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    /// Bad, unknown or revoked credential. Deliberately uninformative.
    #[error("authentication failed")]
    Unauthenticated,
    #[error("permission denied")]
    PermissionDenied,
    /// Load shedding; retryable.
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("store operation failed")]
    Store(#[source] StoreError),
    /// A bug or a failed runtime task; details go to the log only.
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<StoreError> for HubError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(what) => HubError::NotFound(what),
            StoreError::AlreadyExists(what) => HubError::AlreadyExists(what),
            StoreError::Conflict(what) => HubError::FailedPrecondition(what),
            other => HubError::Store(other),
        }
    }
}

impl From<HubError> for Status {
    fn from(e: HubError) -> Status {
        let code = match &e {
            HubError::InvalidArgument(_) | HubError::Name(_) | HubError::Manifest(_) => {
                Code::InvalidArgument
            }
            HubError::NotFound(_) => Code::NotFound,
            HubError::AlreadyExists(_) => Code::AlreadyExists,
            HubError::FailedPrecondition(_) => Code::FailedPrecondition,
            HubError::Unauthenticated => Code::Unauthenticated,
            HubError::PermissionDenied => Code::PermissionDenied,
            HubError::ResourceExhausted(_) => Code::ResourceExhausted,
            HubError::Store(_) | HubError::Internal(_) => Code::Internal,
        };
        if code == Code::Internal {
            tracing::error!(error = %ErrorChain(&e), "request failed");
            return Status::internal("internal error; see the hub log");
        }
        Status::new(code, bounded(&e.to_string()))
    }
}

/// gRPC carries messages in HTTP/2 trailers: a long one (a huge rejected
/// value) would break the stream instead of reaching the caller.
const MAX_STATUS_MESSAGE: usize = 2048;

fn bounded(message: &str) -> String {
    if message.len() <= MAX_STATUS_MESSAGE {
        return message.to_owned();
    }
    let mut cut = MAX_STATUS_MESSAGE;
    while !message.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}… (message cut)", &message[..cut])
}

pub use unitsync_proto::ErrorChain;
