//! OCI sources: the hub follows an OCI artifact (a ConfigHub release on
//! ConfigHub's OCI endpoint, or a Flux-style artifact in any registry) the
//! way Flux's `OCIRepository` does, and lands each new artifact as one
//! release set of units. `fetch` talks to the registry (resolve the
//! reference, compare digests, pull and verify), `extract` unpacks the
//! layer under limits, `mapping` turns files into units, `runner` does it
//! for every source on its interval, when asked, or on a ConfigHub
//! `release.published` hint. Everything is stored through
//! [`Hub`](crate::control::Hub) operations.

pub mod extract;
pub mod fetch;
pub mod mapping;
mod runner;

pub use runner::Runner;

/// Caps on what an artifact may hold (the unit caps apply after).
#[derive(Clone, Debug)]
pub struct ArtifactLimits {
    /// The layer as stored in the registry (compressed).
    pub max_blob: u64,
    /// All files together, uncompressed.
    pub max_total: u64,
    pub max_files: usize,
    pub max_file: u64,
}

impl Default for ArtifactLimits {
    fn default() -> Self {
        ArtifactLimits {
            max_blob: 64 << 20,
            max_total: 64 << 20,
            max_files: 10_000,
            max_file: 16 << 20,
        }
    }
}

/// The layer media types taken without a `--layer-media-type` (Flux and
/// ConfigHub tar+gzip, plain tar).
pub const LAYER_TYPES: [&str; 3] = [
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.cncf.flux.content.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar",
];
