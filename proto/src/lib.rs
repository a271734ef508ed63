//! The unitsync wire protocol (`unitsync.v1`): generated prost messages and
//! tonic services, the protocol version constants, the client-side
//! reconnect policy every agent shares, how agents and the CLI dial the hub
//! ([`dial`]: TLS naming their role), and [`ErrorChain`], the one way both
//! sides print an error with its causes; [`units`]: how agents parse a
//! unit's YAML, which the hub checks every unit against.
//!
//! Prost types stop at the gRPC edge: hub and agent convert them into their
//! own domain types.

pub mod backoff;
pub mod dial;
pub mod outgoing;
pub mod units;

/// Displays an error with its whole `source()` chain (`a: b: c`), for logs
/// and the last line a binary prints; shared by hub and agent.
pub struct ErrorChain<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cur = self.0.source();
        while let Some(e) = cur {
            write!(f, ": {e}")?;
            cur = e.source();
        }
        Ok(())
    }
}

/// Generated code for package `unitsync.v1`.
pub mod v1 {
    tonic::include_proto!("unitsync.v1");
}

/// The hub's side of `AgentService`: the same service, its stream carrying
/// [`outgoing::Outgoing`] (updates encoded once for every session).
pub mod session {
    include!(concat!(env!("OUT_DIR"), "/session/unitsync.v1.rs"));
}

/// The compiled descriptors of `unitsync.v1` (an encoded
/// `FileDescriptorSet`).
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptor.bin"));

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// The oldest protocol version a hub of this build accepts.
pub const MIN_PROTOCOL_VERSION: u32 = 1;

/// Largest message either side accepts or sends (4 MiB plus envelope room).
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024 + 64 * 1024;

/// gRPC metadata key carrying `Bearer <token>`.
pub const AUTHORIZATION: &str = "authorization";
