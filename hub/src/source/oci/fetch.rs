//! The registry side of a source, with Flux `OCIRepository` semantics: a
//! digest pins, a semver range picks the highest matching tag, a tag is
//! resolved to its manifest digest by a `HEAD` (then `GET`); the manifest
//! is pulled by digest (read up to [`MAX_MANIFEST`]: a registry cannot make
//! the hub hold more) and the chosen layer's bytes are checked against
//! its digest. Errors say what failed, where, in words an operator can act
//! on; credentials never appear in them.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::task::{Context, Poll};

use oci_client::client::{Certificate, CertificateEncoding, ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::manifest::{OciDescriptor, OciImageManifest};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use sha2::Digest as _;

use super::{ArtifactLimits, LAYER_TYPES};
use crate::model::{OciAuth, OciRef, OciSpec};

/// The most tags a semver source looks through.
const MAX_TAGS: usize = 100_000;

/// The largest manifest read: what the OCI distribution spec asks
/// registries to accept (the blob caps are [`ArtifactLimits`]).
pub const MAX_MANIFEST: usize = 4 << 20;

/// The manifest types asked for: an artifact is an image manifest; an
/// index is accepted too, so that a digest naming one is refused as "not
/// an image manifest" rather than reported missing.
const MANIFEST_TYPES: &str = "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.list.v2+json";

/// A registry repository as one source sees it.
pub struct Registry {
    client: Client,
    /// For the manifest's bounded `GET` (oci-client reads any size).
    http: reqwest::Client,
    /// Hosts reached over plain HTTP.
    insecure_hosts: Vec<String>,
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
        let http = {
            let mut b = reqwest::Client::builder()
                .connect_timeout(std::time::Duration::from_secs(10))
                .read_timeout(std::time::Duration::from_secs(60))
                .user_agent(concat!("unitsync-hub/", env!("CARGO_PKG_VERSION")));
            if !spec.ca_pem.is_empty() {
                let ca = reqwest::Certificate::from_pem(spec.ca_pem.as_bytes())
                    .map_err(|e| format!("registry CA for {host}: {e}"))?;
                b = b.tls_certs_only([ca]);
            }
            b.build()
                .map_err(|e| format!("registry client for {host}: {e}"))?
        };
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
            http,
            insecure_hosts: spec.insecure_hosts.clone(),
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
        let manifest = self.manifest(digest).await?;
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

impl Registry {
    /// The image manifest `digest`, read up to [`MAX_MANIFEST`] bytes and
    /// checked against its digest (authenticated as oci-client does:
    /// its token for the repository, or the basic credentials).
    async fn manifest(&self, digest: &str) -> Result<OciImageManifest, String> {
        let image = &self.pinned(digest);
        let what = format!("manifest {digest}");
        let at = self.at();
        let token = self
            .client
            .auth(image, &self.auth, oci_client::RegistryOperation::Pull)
            .await
            .map_err(|e| self.explain(&what, e))?;
        // As oci-client addresses it (`docker.io` is `index.docker.io`).
        let registry = image.resolve_registry();
        let scheme = if self.insecure_hosts.iter().any(|h| h == registry) {
            "http"
        } else {
            "https"
        };
        let url = format!(
            "{scheme}://{registry}/v2/{}/manifests/{digest}",
            image.repository()
        );
        let mut request = self
            .http
            .get(url)
            .header(reqwest::header::ACCEPT, MANIFEST_TYPES);
        request = match (token, &self.auth) {
            (Some(token), _) => request.bearer_auth(token),
            (None, RegistryAuth::Basic(user, password)) => request.basic_auth(user, Some(password)),
            (None, _) => request,
        };
        let unreachable = |e: reqwest::Error| {
            let msg = crate::error::ErrorChain(&e).to_string();
            format!(
                "{what}: cannot reach registry {}: {}",
                self.host,
                crate::manifest::prefix(&msg)
            )
        };
        let mut response = request.send().await.map_err(unreachable)?;
        match response.status().as_u16() {
            200 => {}
            401 => {
                return Err(format!(
                    "{what}: registry {at} refused the credentials (401 Unauthorized)"
                ));
            }
            403 => {
                return Err(format!(
                    "{what}: registry {at} answered 403 Forbidden: the credentials may not read this repository"
                ));
            }
            404 => return Err(format!("{what}: not found in registry {at}")),
            code => return Err(format!("{what}: registry {at} answered {code}")),
        }
        let too_large = || {
            format!(
                "{what} from registry {at} is larger than {} MiB; refused",
                MAX_MANIFEST >> 20
            )
        };
        if response
            .content_length()
            .is_some_and(|n| n > MAX_MANIFEST as u64)
        {
            return Err(too_large());
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(unreachable)? {
            if body.len() + chunk.len() > MAX_MANIFEST {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }
        let got = match digest.split_once(':') {
            Some(("sha256", _)) => format!("sha256:{}", hex::encode(sha2::Sha256::digest(&body))),
            Some(("sha512", _)) => format!("sha512:{}", hex::encode(sha2::Sha512::digest(&body))),
            _ => {
                return Err(format!(
                    "{what}: unsupported digest algorithm (sha256 or sha512)"
                ));
            }
        };
        if got != digest {
            return Err(format!(
                "{what} from registry {at}: the registry sent {got}"
            ));
        }
        serde_json::from_slice(&body)
            .map_err(|e| format!("{what} from registry {at}: not an image manifest ({e})"))
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
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A registry on a loopback port that answers `/v2/` and, for any
    /// manifest, `head` then `body` (repeated `times`); the address.
    async fn registry(head: &'static str, body: Vec<u8>, times: usize) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            loop {
                let Ok((mut tcp, _)) = listener.accept().await else {
                    return;
                };
                let body = body.clone();
                tokio::spawn(async move {
                    let mut request = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !request.ends_with(b"\r\n\r\n") {
                        match tcp.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => request.extend_from_slice(&buf[..n]),
                        }
                    }
                    if request.starts_with(b"GET /v2/ ") {
                        let _ = tcp.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").await;
                        return;
                    }
                    let _ = tcp.write_all(head.as_bytes()).await;
                    for _ in 0..times {
                        if tcp.write_all(&body).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        addr
    }

    fn source(addr: &str) -> Registry {
        let spec = OciSpec {
            url: format!("oci://{addr}/app"),
            reference: OciRef::Tag("v1".into()),
            interval_seconds: 60,
            mode: crate::model::SourceMode::Artifact,
            layer_media_type: String::new(),
            insecure_hosts: vec![addr.to_owned()],
            ca_pem: String::new(),
        };
        Registry::new(&spec, &OciAuth::Anonymous).unwrap()
    }

    /// A chunk of HTTP/1.1 chunked encoding.
    fn chunk(data: &[u8]) -> Vec<u8> {
        let mut c = format!("{:x}\r\n", data.len()).into_bytes();
        c.extend_from_slice(data);
        c.extend_from_slice(b"\r\n");
        c
    }

    #[tokio::test]
    async fn a_manifest_is_read_up_to_its_cap_and_checked_against_its_digest() {
        let wait = |f| tokio::time::timeout(std::time::Duration::from_secs(10), f);
        let manifest = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.empty.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2},"layers":[]}"#;
        let digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(manifest)));
        let head = "HTTP/1.1 200 OK\r\ncontent-type: application/vnd.oci.image.manifest.v1+json\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n";
        let mut body = chunk(manifest);
        body.extend_from_slice(b"0\r\n\r\n");
        let ok = source(&registry(head, body, 1).await);
        let got = wait(ok.manifest(&digest)).await.unwrap().unwrap();
        assert_eq!(got.schema_version, 2);
        // Another digest than the bytes': refused.
        let other = format!("sha256:{}", "0".repeat(64));
        let e = wait(ok.manifest(&other)).await.unwrap().unwrap_err();
        assert!(e.contains(&format!("the registry sent {digest}")), "{e}");
        // Endless, without a length: refused once past the cap, not held.
        let endless = source(&registry(head, chunk(&[b' '; 64 << 10]), usize::MAX).await);
        let e = wait(endless.manifest(&digest))
            .await
            .expect("refused at the cap")
            .unwrap_err();
        assert!(e.contains("is larger than 4 MiB; refused"), "{e}");
        // A length past the cap: refused before the body is read.
        let long = "HTTP/1.1 200 OK\r\ncontent-length: 1073741824\r\nconnection: close\r\n\r\n";
        let declared = source(&registry(long, Vec::new(), 0).await);
        let e = wait(declared.manifest(&digest)).await.unwrap().unwrap_err();
        assert!(e.contains("is larger than 4 MiB; refused"), "{e}");
    }

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
