//! The registry side of a source, with Flux `OCIRepository` semantics: a
//! digest pins, a semver range picks the highest matching tag, a tag is
//! resolved to its manifest digest by a `HEAD` (then a `GET`); the manifest
//! is pulled by digest and the chosen layer's bytes are checked against
//! its digest. Every response is read up to a cap ([`MAX_MANIFEST`] for
//! manifests and tag lists, the source's blob limit for layers): a
//! registry cannot make the hub hold more. oci-client does the token flow;
//! the requests are the hub's own, so they are bounded and carry the basic
//! credentials also where only the repository asks for them. Errors say
//! what failed, where, in words an operator can act on; credentials never
//! appear in them.

use std::collections::BTreeMap;

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
    /// The repository's pull token (`None`: the registry asks for none)
    /// and when it was issued; asked again once old or refused.
    token: std::sync::Mutex<Option<(Option<String>, std::time::Instant)>>,
    host: String,
    repo: String,
}

/// How long a pull token is used before a new one is asked for (registries
/// issue them for 5 minutes or more; one refused earlier is renewed then).
const TOKEN_REUSE: std::time::Duration = std::time::Duration::from_secs(60);

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
            token: std::sync::Mutex::default(),
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
                let got = self.manifest_digest(d, &format!("digest {d}")).await?;
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
        let digest = self.manifest_digest(&tag, &format!("tag {tag}")).await?;
        Ok(Resolved {
            revision: format!("{tag}@{digest}"),
            digest,
        })
    }

    /// The digest of the manifest `reference` names: the `HEAD`'s
    /// `Docker-Content-Digest`, or (a registry that leaves it out) the
    /// digest of the manifest read by a bounded `GET`.
    async fn manifest_digest(&self, reference: &str, what: &str) -> Result<String, String> {
        let url = self.url(&format!("manifests/{reference}"))?;
        let head = self
            .send(
                what,
                reqwest::Method::HEAD,
                url.clone(),
                Some(MANIFEST_TYPES),
            )
            .await?;
        if let Some(d) = head
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .filter(|d| is_digest(d))
        {
            return Ok(d.to_owned());
        }
        let body = self
            .read(
                what,
                self.send(what, reqwest::Method::GET, url, Some(MANIFEST_TYPES))
                    .await?,
                MAX_MANIFEST,
            )
            .await?;
        Ok(sha256(&body))
    }

    /// The highest tag matching a semver range (all pages of the list).
    async fn highest(&self, range: &str) -> Result<String, String> {
        #[derive(serde::Deserialize)]
        struct Page {
            #[serde(default)]
            tags: Option<Vec<String>>,
        }
        let ranges = crate::model::semver_ranges(range)?;
        let what = "listing tags";
        let mut tags: Vec<String> = Vec::new();
        let mut last: Option<String> = None;
        // Every page (registries may cap a page below what was asked),
        // until an empty page or one that does not move on.
        loop {
            let mut url = self.url("tags/list")?;
            url.query_pairs_mut().append_pair("n", "1000");
            if let Some(l) = &last {
                url.query_pairs_mut().append_pair("last", l);
            }
            let body = self
                .read(
                    what,
                    self.send(what, reqwest::Method::GET, url, None).await?,
                    MAX_MANIFEST,
                )
                .await?;
            let page: Page = serde_json::from_slice(&body).map_err(|e| {
                format!("{what}: registry {} answered no tag list ({e})", self.at())
            })?;
            let page = page.tags.unwrap_or_default();
            let next = page.last().cloned();
            if page.is_empty() || next == last {
                break;
            }
            tags.extend(page);
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
        let manifest = self.manifest(digest).await?;
        let layer = choose_layer(&manifest.layers, layer_media_type)?;
        if u64::try_from(layer.size).unwrap_or(u64::MAX) > limits.max_blob {
            return Err(format!(
                "layer {} is {} bytes; the limit is {}",
                layer.digest, layer.size, limits.max_blob
            ));
        }
        let what = format!("layer {}", layer.digest);
        let response = self
            .send(
                &what,
                reqwest::Method::GET,
                self.url(&format!("blobs/{}", layer.digest))?,
                None,
            )
            .await?;
        let cap = usize::try_from(limits.max_blob).unwrap_or(usize::MAX);
        let bytes = self.read(&what, response, cap).await?;
        verify(&what, &layer.digest, &bytes, &self.at())?;
        Ok(Artifact {
            layer: bytes,
            media_type: layer.media_type.clone(),
            annotations: manifest.annotations.unwrap_or_default(),
        })
    }
}

impl Registry {
    /// The image manifest `digest`, read up to [`MAX_MANIFEST`] bytes and
    /// checked against its digest.
    async fn manifest(&self, digest: &str) -> Result<OciImageManifest, String> {
        let what = format!("manifest {digest}");
        let response = self
            .send(
                &what,
                reqwest::Method::GET,
                self.url(&format!("manifests/{digest}"))?,
                Some(MANIFEST_TYPES),
            )
            .await?;
        let body = self.read(&what, response, MAX_MANIFEST).await?;
        verify(&what, digest, &body, &self.at())?;
        serde_json::from_slice(&body).map_err(|e| {
            format!(
                "{what} from registry {}: not an image manifest ({e})",
                self.at()
            )
        })
    }

    /// The address of `path` in the repository (`/v2/<repo>/<path>`), as
    /// oci-client addresses it (`docker.io` is `index.docker.io`).
    fn url(&self, path: &str) -> Result<reqwest::Url, String> {
        let image = self.tagged("latest");
        let registry = image.resolve_registry();
        let scheme = if self.insecure_hosts.iter().any(|h| h == registry) {
            "http"
        } else {
            "https"
        };
        let url = format!("{scheme}://{registry}/v2/{}/{path}", image.repository());
        reqwest::Url::parse(&url).map_err(|e| format!("registry {}: {url}: {e}", self.at()))
    }

    /// One request to the repository (see [`Registry::url`]), authenticated
    /// as the registry asks: oci-client's token for the repository where
    /// the registry challenges for one, otherwise the basic credentials
    /// (sent even when `/v2/` itself is open: a registry may guard
    /// repositories only). Anything but 200 is an error naming it.
    async fn send(
        &self,
        what: &str,
        method: reqwest::Method,
        url: reqwest::Url,
        accept: Option<&str>,
    ) -> Result<reqwest::Response, String> {
        let at = self.at();
        let image = self.tagged("latest");
        // A reused token the registry refuses (expired, revoked): once
        // more with a new one.
        let mut renew = false;
        let response = loop {
            let (token, reused) = self.token(what, &image, renew).await?;
            let mut request = self.http.request(method.clone(), url.clone());
            if let Some(accept) = accept {
                request = request.header(reqwest::header::ACCEPT, accept);
            }
            request = match (token, &self.auth) {
                (Some(token), _) => request.bearer_auth(token),
                (None, RegistryAuth::Basic(user, password)) => {
                    request.basic_auth(user, Some(password))
                }
                (None, RegistryAuth::Bearer(token)) => request.bearer_auth(token),
                (None, RegistryAuth::Anonymous) => request,
            };
            let r = request
                .send()
                .await
                .map_err(|e| self.unreachable(what, &e))?;
            if r.status() == reqwest::StatusCode::UNAUTHORIZED && reused {
                renew = true;
                continue;
            }
            break r;
        };
        match response.status().as_u16() {
            200 => Ok(response),
            401 => Err(format!(
                "{what}: registry {at} refused the credentials (401 Unauthorized)"
            )),
            403 => Err(format!(
                "{what}: registry {at} answered 403 Forbidden: the credentials may not read this repository"
            )),
            404 => Err(format!("{what}: not found in registry {at}")),
            code => Err(format!("{what}: registry {at} answered {code}")),
        }
    }

    /// The pull token for the repository (oci-client's token flow: the
    /// registry's challenge, then its token service), reused for
    /// [`TOKEN_REUSE`] unless `renew`; whether it was reused.
    async fn token(
        &self,
        what: &str,
        image: &Reference,
        renew: bool,
    ) -> Result<(Option<String>, bool), String> {
        let lock = || {
            self.token
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        };
        if !renew
            && let Some((token, at)) = lock().as_ref()
            && at.elapsed() < TOKEN_REUSE
        {
            return Ok((token.clone(), true));
        }
        let token = self
            .client
            .auth(image, &self.auth, oci_client::RegistryOperation::Pull)
            .await
            .map_err(|e| self.explain(what, e))?;
        *lock() = Some((token.clone(), std::time::Instant::now()));
        Ok((token, false))
    }

    /// A response's body, refused past `cap` bytes without holding more.
    async fn read(
        &self,
        what: &str,
        mut response: reqwest::Response,
        cap: usize,
    ) -> Result<Vec<u8>, String> {
        let too_large = || {
            format!(
                "{what} from registry {} is larger than {}; refused",
                self.at(),
                size(cap)
            )
        };
        if response
            .content_length()
            .is_some_and(|n| n > u64::try_from(cap).unwrap_or(u64::MAX))
        {
            return Err(too_large());
        }
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| self.unreachable(what, &e))?
        {
            if body.len() + chunk.len() > cap {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }

    fn unreachable(&self, what: &str, e: &reqwest::Error) -> String {
        let msg = crate::error::ErrorChain(e).to_string();
        format!(
            "{what}: cannot reach registry {}: {}",
            self.host,
            crate::manifest::prefix(&msg)
        )
    }
}

/// The OCI digest of bytes by SHA-256 (`sha256:<hex>`).
fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", crate::model::Digest::of(bytes).to_hex())
}

/// Checks bytes against the digest that named them.
fn verify(what: &str, digest: &str, bytes: &[u8], at: &str) -> Result<(), String> {
    let got = match digest.split_once(':') {
        Some(("sha256", _)) => sha256(bytes),
        Some(("sha512", _)) => format!("sha512:{}", hex::encode(sha2::Sha512::digest(bytes))),
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
    Ok(())
}

/// A byte count in words (`4 MiB`, `1500 bytes`).
fn size(n: usize) -> String {
    if n >= 1 << 20 && n.is_multiple_of(1 << 20) {
        format!("{} MiB", n >> 20)
    } else {
        format!("{n} bytes")
    }
}

/// A content digest as a registry names one (`sha256:<64 hex>`,
/// `sha512:<128 hex>`).
fn is_digest(d: &str) -> bool {
    let hex_of = |h: &str, n: usize| h.len() == n && h.bytes().all(|b| b.is_ascii_hexdigit());
    match d.split_once(':') {
        Some(("sha256", h)) => hex_of(h, 64),
        Some(("sha512", h)) => hex_of(h, 128),
        _ => false,
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// What the fake registry writes back to one request: a head, then a
    /// body repeated some times.
    type Answer = (String, Vec<u8>, usize);

    /// A registry on a loopback port answering each request (its request
    /// line and headers) with `answer`; the address.
    async fn serve(answer: impl Fn(&str) -> Answer + Send + Sync + 'static) -> String {
        let answer = std::sync::Arc::new(answer);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            loop {
                let Ok((mut tcp, _)) = listener.accept().await else {
                    return;
                };
                let answer = answer.clone();
                tokio::spawn(async move {
                    let mut request = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !request.ends_with(b"\r\n\r\n") {
                        match tcp.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => request.extend_from_slice(&buf[..n]),
                        }
                    }
                    let (head, body, times) = answer(&String::from_utf8_lossy(&request));
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

    const OPEN: &str = "HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";

    /// A registry that answers `/v2/` and, for anything else, `head` then
    /// `body` (repeated `times`).
    async fn registry(head: &'static str, body: Vec<u8>, times: usize) -> String {
        serve(move |request| {
            if request.starts_with("GET /v2/ ") {
                (OPEN.into(), Vec::new(), 0)
            } else {
                (head.into(), body.clone(), times)
            }
        })
        .await
    }

    fn source(addr: &str) -> Registry {
        source_as(addr, &OciAuth::Anonymous)
    }

    /// A source of the registry at `addr`, with credentials.
    fn source_as(addr: &str, auth: &OciAuth) -> Registry {
        let spec = OciSpec {
            url: format!("oci://{addr}/app"),
            reference: OciRef::Tag("v1".into()),
            interval_seconds: 60,
            mode: crate::model::SourceMode::Artifact,
            layer_media_type: String::new(),
            insecure_hosts: vec![addr.to_owned()],
            ca_pem: String::new(),
        };
        Registry::new(&spec, auth).unwrap()
    }

    /// A chunk of HTTP/1.1 chunked encoding.
    fn chunk(data: &[u8]) -> Vec<u8> {
        let mut c = format!("{:x}\r\n", data.len()).into_bytes();
        c.extend_from_slice(data);
        c.extend_from_slice(b"\r\n");
        c
    }

    const MANIFEST: &[u8] = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.empty.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2},"layers":[]}"#;

    const CHUNKED: &str = "HTTP/1.1 200 OK\r\ncontent-type: application/vnd.oci.image.manifest.v1+json\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n";

    fn manifest_digest() -> String {
        sha256(MANIFEST)
    }

    /// The manifest in chunked encoding, ended.
    fn manifest_body() -> Vec<u8> {
        let mut body = chunk(MANIFEST);
        body.extend_from_slice(b"0\r\n\r\n");
        body
    }

    fn wait<F: std::future::Future>(f: F) -> tokio::time::Timeout<F> {
        tokio::time::timeout(std::time::Duration::from_secs(10), f)
    }

    #[tokio::test]
    async fn a_manifest_is_read_up_to_its_cap_and_checked_against_its_digest() {
        let digest = manifest_digest();
        let head = CHUNKED;
        let body = manifest_body();
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

    /// A registry whose `HEAD` names no digest: the tag's digest is the
    /// manifest's, read by a `GET` bounded like any manifest read.
    #[tokio::test]
    async fn a_tag_without_a_digest_header_resolves_by_a_bounded_read() {
        let plain = serve(|r| match r.split(' ').next() {
            _ if r.starts_with("GET /v2/ ") => (OPEN.into(), Vec::new(), 0),
            Some("HEAD") => (OPEN.into(), Vec::new(), 0),
            _ => (CHUNKED.into(), manifest_body(), 1),
        })
        .await;
        let got = wait(source(&plain).resolve(&OciRef::Tag("v1".into())))
            .await
            .unwrap()
            .unwrap();
        let digest = manifest_digest();
        assert_eq!(got.digest, digest);
        assert_eq!(got.revision, format!("v1@{digest}"));
        let endless = serve(|r| match r.split(' ').next() {
            _ if r.starts_with("GET /v2/ ") => (OPEN.into(), Vec::new(), 0),
            Some("HEAD") => (OPEN.into(), Vec::new(), 0),
            _ => (CHUNKED.into(), chunk(&[b' '; 64 << 10]), usize::MAX),
        })
        .await;
        let e = wait(source(&endless).resolve(&OciRef::Tag("v1".into())))
            .await
            .expect("refused at the cap")
            .unwrap_err();
        assert!(
            e.contains("tag v1 from registry") && e.contains("larger than 4 MiB"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn an_endless_tag_list_is_refused_at_the_cap() {
        let endless = serve(|r| {
            if r.starts_with("GET /v2/ ") {
                (OPEN.into(), Vec::new(), 0)
            } else {
                let mut first = chunk(br#"{"name":"app","tags":["1.0.0""#);
                first.extend(chunk(&[b' '; 64 << 10]));
                (
                    CHUNKED.to_owned() + &String::from_utf8(first).unwrap(),
                    chunk(&[b' '; 64 << 10]),
                    usize::MAX,
                )
            }
        })
        .await;
        let e = wait(source(&endless).resolve(&OciRef::Semver(">=1.0.0".into())))
            .await
            .expect("refused at the cap")
            .unwrap_err();
        assert!(
            e.contains("listing tags from registry") && e.contains("larger than 4 MiB"),
            "{e}"
        );
    }

    /// `/v2/` open, the repository guarded by basic auth (no challenge to
    /// answer first): the credentials go with every repository request.
    #[tokio::test]
    async fn basic_credentials_are_sent_where_only_the_repository_is_guarded() {
        use base64::Engine as _;
        let digest = manifest_digest();
        let expected = format!(
            "authorization: basic {}",
            base64::engine::general_purpose::STANDARD.encode("reader:s3cret")
        )
        .to_ascii_lowercase();
        let answer_digest = digest.clone();
        let guarded = serve(move |r| {
            if r.starts_with("GET /v2/ ") {
                (OPEN.into(), Vec::new(), 0)
            } else if !r.to_ascii_lowercase().contains(&expected) {
                ("HTTP/1.1 401 Unauthorized\r\nwww-authenticate: Basic realm=\"repo\"\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".into(), Vec::new(), 0)
            } else if r.starts_with("HEAD ") {
                (format!("HTTP/1.1 200 OK\r\ndocker-content-digest: {answer_digest}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"), Vec::new(), 0)
            } else {
                (CHUNKED.into(), manifest_body(), 1)
            }
        })
        .await;
        let auth = OciAuth::Basic {
            username: "reader".into(),
            password: crate::auth::Secret::from_string("s3cret".into()),
        };
        let r = source_as(&guarded, &auth);
        let got = wait(r.resolve(&OciRef::Tag("v1".into())))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.digest, digest);
        assert_eq!(
            wait(r.manifest(&digest))
                .await
                .unwrap()
                .unwrap()
                .schema_version,
            2
        );
        // Without them: refused, naming it (and never the password).
        let e = wait(source(&guarded).resolve(&OciRef::Tag("v1".into())))
            .await
            .unwrap()
            .unwrap_err();
        assert!(
            e.contains("refused the credentials (401 Unauthorized)"),
            "{e}"
        );
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
