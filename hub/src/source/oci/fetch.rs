//! The registry side of a source, with Flux `OCIRepository` semantics: a
//! digest pins, a semver range picks the highest matching tag, a tag is
//! resolved to its manifest digest by a `HEAD` (then `GET`); the manifest
//! is pulled by digest and the chosen layer's bytes are checked against
//! its digest. Errors say what failed, where, in words an operator can act
//! on; credentials never appear in them.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::task::{Context, Poll};

use oci_client::client::{Certificate, CertificateEncoding, ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::manifest::OciDescriptor;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

use super::{ArtifactLimits, LAYER_TYPES};
use crate::model::{OciAuth, OciRef, OciSpec};

/// The most tags a semver source looks through.
const MAX_TAGS: usize = 100_000;

/// A registry repository as one source sees it.
pub struct Registry {
    client: Client,
    auth: RegistryAuth,
    host: String,
    repo: String,
}

/// What a reference points at now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    /// `sha256:…` of the manifest.
    pub digest: String,
    /// Flux's revision string: `<tag>@sha256:…`, or the digest alone.
    pub revision: String,
}

/// An artifact's chosen layer, verified.
#[derive(Clone, Debug)]
pub struct Artifact {
    pub layer: Vec<u8>,
    pub media_type: String,
    /// The manifest's annotations (`org.opencontainers.image.*`,
    /// `com.confighub.target.id`).
    pub annotations: BTreeMap<String, String>,
}

impl Registry {
    pub fn new(spec: &OciSpec, auth: &OciAuth) -> Result<Registry, String> {
        let (host, repo) = OciSpec::parse_url(&spec.url)?;
        let protocol = if spec.insecure_hosts.is_empty() {
            ClientProtocol::Https
        } else {
            ClientProtocol::HttpsExcept(spec.insecure_hosts.clone())
        };
        let tls_certs_only = if spec.ca_pem.is_empty() {
            vec![]
        } else {
            vec![Certificate {
                encoding: CertificateEncoding::Pem,
                data: spec.ca_pem.clone().into_bytes(),
            }]
        };
        // reqwest (inside the client) uses the process's rustls provider:
        // unitsync's is ring.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = Client::try_from(ClientConfig {
            protocol,
            tls_certs_only,
            connect_timeout: Some(std::time::Duration::from_secs(10)),
            read_timeout: Some(std::time::Duration::from_secs(60)),
            user_agent: concat!("unitsync-hub/", env!("CARGO_PKG_VERSION")),
            ..ClientConfig::default()
        })
        .map_err(|e| format!("registry client for {host}: {e}"))?;
        let auth = match auth {
            OciAuth::Anonymous => RegistryAuth::Anonymous,
            OciAuth::Basic { username, password } => {
                RegistryAuth::Basic(username.clone(), password.expose().to_owned())
            }
            OciAuth::Bearer { token } => RegistryAuth::Bearer(token.expose().to_owned()),
        };
        Ok(Registry {
            client,
            auth,
            host,
            repo,
        })
    }

    fn at(&self) -> String {
        format!("{}/{}", self.host, self.repo)
    }

    fn tagged(&self, tag: &str) -> Reference {
        Reference::with_tag(self.host.clone(), self.repo.clone(), tag.to_owned())
    }

    fn pinned(&self, digest: &str) -> Reference {
        Reference::with_digest(self.host.clone(), self.repo.clone(), digest.to_owned())
    }

    /// In words, naming the registry and what was asked.
    fn explain(&self, what: &str, e: OciDistributionError) -> String {
        let at = self.at();
        match e {
            OciDistributionError::AuthenticationFailure(_)
            | OciDistributionError::UnauthorizedError { .. } => {
                format!("{what}: registry {at} refused the credentials (401 Unauthorized)")
            }
            OciDistributionError::ImageManifestNotFoundError(_) => {
                format!("{what}: not found in registry {at}")
            }
            OciDistributionError::ServerError { code, message, .. } => {
                let code = match code {
                    401 => "401 Unauthorized: the registry refused the credentials".to_owned(),
                    403 => "403 Forbidden: the credentials may not read this repository".to_owned(),
                    404 => "404 Not Found".to_owned(),
                    c => format!("{c} {}", crate::manifest::prefix(&message)),
                };
                format!("{what}: registry {at} answered {code}")
            }
            OciDistributionError::RegistryError { envelope, .. } => {
                let codes: Vec<String> = envelope
                    .errors
                    .iter()
                    .map(|e| format!("{:?}: {}", e.code, crate::manifest::prefix(&e.message)))
                    .collect();
                let unauthorized = codes
                    .iter()
                    .any(|c| c.starts_with("Unauthorized") || c.starts_with("Denied"));
                if unauthorized {
                    format!(
                        "{what}: registry {at} refused the credentials ({})",
                        codes.join("; ")
                    )
                } else {
                    format!("{what}: registry {at} answered {}", codes.join("; "))
                }
            }
            OciDistributionError::RequestError(e) => {
                let msg = crate::error::ErrorChain(&e).to_string();
                format!(
                    "{what}: cannot reach registry {}: {}",
                    self.host,
                    crate::manifest::prefix(&msg)
                )
            }
            OciDistributionError::DigestError(e) => {
                format!("{what}: content from registry {at} does not match its digest ({e})")
            }
            other => format!("{what}: registry {at}: {other}"),
        }
    }

    /// Resolves the reference to a manifest digest (a tag by `HEAD`, a
    /// semver range by listing the tags first).
    pub async fn resolve(&self, reference: &OciRef) -> Result<Resolved, String> {
        let tag = match reference {
            OciRef::Digest(d) => {
                // Still asked every time: a pin whose artifact went away (or
                // whose registry did) is reported, not assumed.
                let got = self
                    .client
                    .fetch_manifest_digest(&self.pinned(d), &self.auth)
                    .await
                    .map_err(|e| self.explain(&format!("digest {d}"), e))?;
                if got != *d {
                    return Err(format!("registry {} answered {got} for {d}", self.at()));
                }
                return Ok(Resolved {
                    digest: d.clone(),
                    revision: d.clone(),
                });
            }
            OciRef::Tag(t) => t.clone(),
            OciRef::Semver(range) => self.highest(range).await?,
        };
        let digest = self
            .client
            .fetch_manifest_digest(&self.tagged(&tag), &self.auth)
            .await
            .map_err(|e| self.explain(&format!("tag {tag}"), e))?;
        Ok(Resolved {
            revision: format!("{tag}@{digest}"),
            digest,
        })
    }

    /// The highest tag matching a semver range (all pages of the list).
    async fn highest(&self, range: &str) -> Result<String, String> {
        let ranges = crate::model::semver_ranges(range)?;
        let image = self.tagged("latest");
        let mut tags: Vec<String> = Vec::new();
        let mut last: Option<String> = None;
        // Every page (registries may cap a page below what was asked),
        // until an empty page or one that does not move on.
        loop {
            let page = self
                .client
                .list_tags(&image, &self.auth, Some(1000), last.as_deref())
                .await
                .map_err(|e| self.explain("listing tags", e))?;
            let next = page.tags.last().cloned();
            if page.tags.is_empty() || next == last {
                break;
            }
            tags.extend(page.tags);
            if tags.len() > MAX_TAGS {
                return Err(format!(
                    "{} has more than {MAX_TAGS} tags; pin a tag or digest",
                    self.at()
                ));
            }
            last = next;
        }
        crate::model::highest_match(tags.iter().map(String::as_str), &ranges)
            .map(str::to_owned)
            .ok_or_else(|| {
                format!(
                    "no tag of {} matches semver {range} ({} tags)",
                    self.at(),
                    tags.len()
                )
            })
    }

    /// Pulls the manifest by digest and the chosen layer, both verified.
    pub async fn fetch(
        &self,
        digest: &str,
        layer_media_type: &str,
        limits: &ArtifactLimits,
    ) -> Result<Artifact, String> {
        let image = self.pinned(digest);
        let (manifest, got) = self
            .client
            .pull_image_manifest(&image, &self.auth)
            .await
            .map_err(|e| self.explain(&format!("manifest {digest}"), e))?;
        if got != digest {
            return Err(format!(
                "manifest {digest} from registry {}: the registry sent {got}",
                self.at()
            ));
        }
        let layer = choose_layer(&manifest.layers, layer_media_type)?;
        if u64::try_from(layer.size).unwrap_or(u64::MAX) > limits.max_blob {
            return Err(format!(
                "layer {} is {} bytes; the limit is {}",
                layer.digest, layer.size, limits.max_blob
            ));
        }
        let mut sink = CappedSink {
            bytes: Vec::new(),
            cap: usize::try_from(limits.max_blob).unwrap_or(usize::MAX),
        };
        self.client
            .pull_blob(&image, layer, &mut sink)
            .await
            .map_err(|e| self.explain(&format!("layer {}", layer.digest), e))?;
        Ok(Artifact {
            layer: sink.bytes,
            media_type: layer.media_type.clone(),
            annotations: manifest.annotations.unwrap_or_default(),
        })
    }
}

/// The first layer, or the first with `media_type`; it must be a tar.
fn choose_layer<'a>(
    layers: &'a [OciDescriptor],
    media_type: &str,
) -> Result<&'a OciDescriptor, String> {
    let types = || {
        layers
            .iter()
            .map(|l| l.media_type.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    if media_type.is_empty() {
        let first = layers.first().ok_or("the artifact has no layers")?;
        if !LAYER_TYPES.contains(&first.media_type.as_str()) {
            return Err(format!(
                "the first layer is {}, not a tar or tar+gzip layer; choose one with --layer-media-type (layers: {})",
                first.media_type,
                types()
            ));
        }
        return Ok(first);
    }
    layers
        .iter()
        .find(|l| l.media_type == media_type)
        .ok_or_else(|| format!("no layer of media type {media_type} (layers: {})", types()))
}

/// Collects a blob, failing past `cap` bytes (a registry sending more
/// than the manifest said).
struct CappedSink {
    bytes: Vec<u8>,
    cap: usize,
}

impl tokio::io::AsyncWrite for &mut CappedSink {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if this.bytes.len() + buf.len() > this.cap {
            return Poll::Ready(Err(std::io::Error::other(
                "the layer is larger than the limit",
            )));
        }
        this.bytes.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(media_type: &str) -> OciDescriptor {
        OciDescriptor {
            media_type: media_type.into(),
            ..OciDescriptor::default()
        }
    }

    #[test]
    fn the_first_tar_layer_or_the_selected_one() {
        let layers = [
            layer("application/vnd.cncf.flux.content.v1.tar+gzip"),
            layer("application/vnd.example.sbom+json"),
        ];
        assert_eq!(
            choose_layer(&layers, "").unwrap().media_type,
            layers[0].media_type
        );
        assert_eq!(
            choose_layer(&layers, "application/vnd.example.sbom+json")
                .unwrap()
                .media_type,
            layers[1].media_type
        );
        let e = choose_layer(&layers, "text/plain").unwrap_err();
        assert!(e.contains("no layer of media type text/plain"), "{e}");
        let e = choose_layer(&[layer("application/json")], "").unwrap_err();
        assert!(e.contains("--layer-media-type"), "{e}");
        assert!(choose_layer(&[], "").is_err());
    }
}
