//! The HTTP side of the ConfigHub worker protocol, both transports: long
//! poll with a lease on the main API (JWT from `POST /auth/worker`,
//! refreshed on 401) and the HTTP/2 server-sent-event stream on the worker
//! port (`GET /api/info`, the raw worker secret as bearer, h2c for
//! `http://`). Status codes are handled as the SDK handles them; every
//! call has a deadline; the secret never appears in an error or a log.

use std::time::Duration;

use futures::{Stream, StreamExt};
use reqwest::{Method, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::wire::{
    ActionResult, ApiInfo, AuthRequest, AuthResponse, ClaimToken, CursorPollRequest, EventMessage,
    Lease, PollRequest, TargetCreate, WorkerInfo,
};

/// Why a ConfigHub call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// ConfigHub answered with this status.
    #[error("ConfigHub answered {status}: {message}")]
    Status { status: u16, message: String },
    #[error("ConfigHub unreachable: {0}")]
    Transport(String),
    #[error("unexpected answer from ConfigHub: {0}")]
    Decode(String),
    #[error("{0}")]
    Config(String),
}

impl ClientError {
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Whether a result send should be tried again (SDK policy: network
    /// errors, 5xx, 409 and 429 (too many requests: a final report refused
    /// for the server's load must still arrive, or `cub --wait` waits for
    /// ever); a 401 after re-authenticating).
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Status { status, .. } => {
                *status >= 500 || matches!(*status, 409 | 429 | 401)
            }
            ClientError::Transport(_) => true,
            ClientError::Decode(_) | ClientError::Config(_) => false,
        }
    }
}

/// Percent-encodes one path segment.
fn segment(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A transport failure (the secret travels in a header, never in the URL
/// an error may quote).
fn transport(e: &reqwest::Error) -> ClientError {
    ClientError::Transport(e.to_string())
}

/// What a long poll answered.
#[derive(Debug)]
pub enum Polled {
    /// Nothing before the timeout: poll again.
    Nothing,
    Events(Vec<EventMessage>),
    /// The claim is no longer ours (409): claim again.
    LeaseLost,
}

/// Timeouts as the SDK sets them.
const SHORT: Duration = Duration::from_secs(30);
const POLL_TIMEOUT_SECONDS: i64 = 30;
const POLL: Duration = Duration::from_secs(45);

/// A connection to one ConfigHub as one worker.
pub struct Client {
    http: reqwest::Client,
    /// HTTP/2 only (h2c for `http://`), for the SSE stream.
    stream_http: reqwest::Client,
    base: String,
    worker_id: String,
    secret: String,
    jwt: tokio::sync::Mutex<Option<String>>,
    space_id: std::sync::Mutex<String>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("base", &self.base)
            .field("worker_id", &self.worker_id)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// `base`: ConfigHub's URL (`https://hub.confighub.com`); `ca_pem`
    /// trusts one CA only (a private ConfigHub), else the system roots.
    pub fn new(
        base: &str,
        worker_id: &str,
        secret: &str,
        ca_pem: Option<&str>,
    ) -> Result<Client, ClientError> {
        if secret.len() < 8 {
            return Err(ClientError::Config(
                "the ConfigHub worker secret is too short (under 8 characters)".into(),
            ));
        }
        // reqwest uses the process's rustls provider: unitsync's is ring.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let build = |http2_only: bool| {
            let mut b = reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(10))
                .user_agent(concat!("unitsync-hub/", env!("CARGO_PKG_VERSION")));
            if let Some(ca) = ca_pem {
                let cert = reqwest::Certificate::from_pem(ca.as_bytes())
                    .map_err(|e| ClientError::Config(format!("the ConfigHub CA: {e}")))?;
                b = b.tls_certs_only([cert]);
            }
            if http2_only {
                b = b
                    .http2_prior_knowledge()
                    .http2_keep_alive_interval(Duration::from_secs(30))
                    .http2_keep_alive_timeout(Duration::from_secs(20));
            }
            b.build()
                .map_err(|e| ClientError::Config(format!("HTTP client: {e}")))
        };
        Ok(Client {
            http: build(false)?,
            stream_http: build(true)?,
            base: base.trim_end_matches('/').to_owned(),
            worker_id: worker_id.to_owned(),
            secret: secret.to_owned(),
            jwt: tokio::sync::Mutex::new(None),
            space_id: std::sync::Mutex::new(String::new()),
        })
    }

    fn space_id(&self) -> String {
        self.space_id
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// `/api/space/{space}/bridge_worker/{id}` (authenticating first when
    /// the worker's space is not known yet).
    async fn worker_path(&self) -> Result<String, ClientError> {
        Ok(format!(
            "{}/bridge_worker/{}",
            self.space_path().await?,
            segment(&self.worker_id)
        ))
    }

    async fn space_path(&self) -> Result<String, ClientError> {
        if self.space_id().is_empty() {
            self.authenticate().await?;
        }
        Ok(format!("/api/space/{}", segment(&self.space_id())))
    }

    /// `POST /auth/worker`: a fresh JWT (and the worker's space).
    pub async fn authenticate(&self) -> Result<AuthResponse, ClientError> {
        let r = self
            .http
            .post(format!("{}/auth/worker", self.base))
            .timeout(SHORT)
            .json(&AuthRequest {
                worker_id: self.worker_id.clone(),
                worker_secret: self.secret.clone(),
            })
            .send()
            .await
            .map_err(|e| transport(&e))?;
        let auth: AuthResponse = decode(r).await?;
        if auth.access_token.is_empty() {
            return Err(ClientError::Decode("no access_token in the answer".into()));
        }
        let space = auth
            .worker
            .as_ref()
            .map(|w| w.space_id.clone())
            .filter(|s| !s.is_empty())
            .ok_or_else(|| {
                ClientError::Decode(
                    "ConfigHub did not return space_id; is the server new enough?".into(),
                )
            })?;
        *self
            .space_id
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = space;
        *self.jwt.lock().await = Some(auth.access_token.clone());
        Ok(auth)
    }

    async fn token(&self) -> Result<String, ClientError> {
        if let Some(t) = self.jwt.lock().await.clone() {
            return Ok(t);
        }
        Ok(self.authenticate().await?.access_token)
    }

    /// One call on the main API with the JWT; a 401 re-authenticates and
    /// tries once more.
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<(&str, Vec<u8>)>,
        timeout: Duration,
    ) -> Result<reqwest::Response, ClientError> {
        for attempt in 0..2 {
            let token = self.token().await?;
            let mut req = self
                .http
                .request(method.clone(), format!("{}{path}", self.base))
                .timeout(timeout)
                .bearer_auth(&token);
            if let Some((content_type, bytes)) = &body {
                req = req
                    .header(reqwest::header::CONTENT_TYPE, *content_type)
                    .body(bytes.clone());
            } else if method == Method::POST {
                req = req.header(reqwest::header::CONTENT_TYPE, "application/json");
            }
            let r = req.send().await.map_err(|e| transport(&e))?;
            if r.status() == StatusCode::UNAUTHORIZED && attempt == 0 {
                *self.jwt.lock().await = None;
                continue;
            }
            return Ok(r);
        }
        unreachable!("the loop returns on its second attempt")
    }

    fn json<T: Serialize>(v: &T) -> Vec<u8> {
        serde_json::to_vec(v).unwrap_or_default()
    }

    /// Claims the worker's lease (long poll); 409 while another replica
    /// holds it.
    pub async fn claim(&self) -> Result<Lease, ClientError> {
        let r = self
            .call(
                Method::POST,
                &format!("{}/lease", self.worker_path().await?),
                None,
                SHORT,
            )
            .await?;
        decode(r).await
    }

    /// Releases the lease (first thing at shutdown).
    pub async fn release(&self, claim: &str) -> Result<(), ClientError> {
        let body = Self::json(&ClaimToken {
            claim_token: claim.to_owned(),
        });
        let r = self
            .call(
                Method::DELETE,
                &format!("{}/lease", self.worker_path().await?),
                Some(("application/json", body)),
                Duration::from_secs(5),
            )
            .await?;
        expect(r, &[204]).await
    }

    /// Tells ConfigHub what the worker provides (after the first claim).
    pub async fn register(&self, info: &WorkerInfo) -> Result<(), ClientError> {
        let body = Self::json(&serde_json::json!({ "ProvidedInfo": info }));
        let r = self
            .call(
                Method::PATCH,
                &self.worker_path().await?,
                Some(("application/merge-patch+json", body)),
                SHORT,
            )
            .await?;
        expect(r, &[200, 204]).await
    }

    /// Creates a target, or points an existing one (by slug) at this worker.
    pub async fn upsert_target(&self, t: &TargetCreate) -> Result<(), ClientError> {
        let path = format!("{}/target", self.space_path().await?);
        let r = self
            .call(
                Method::POST,
                &path,
                Some(("application/json", Self::json(t))),
                SHORT,
            )
            .await?;
        if r.status() != StatusCode::CONFLICT {
            return expect(r, &[200, 201]).await;
        }
        let patch = serde_json::json!({
            "BridgeHandle": t.bridge_handle,
            "BridgeWorkerID": t.bridge_worker_id,
            "DisplayName": t.display_name,
        });
        let r = self
            .call(
                Method::PATCH,
                &format!("{path}/{}", segment(&t.slug)),
                Some(("application/merge-patch+json", Self::json(&patch))),
                SHORT,
            )
            .await?;
        expect(r, &[200, 204]).await
    }

    /// One long poll for queued operations.
    pub async fn poll(&self, claim: &str) -> Result<Polled, ClientError> {
        let body = Self::json(&PollRequest {
            claim_token: claim.to_owned(),
            timeout_seconds: POLL_TIMEOUT_SECONDS,
        });
        let r = self
            .call(
                Method::POST,
                &format!("{}/queued_operation/poll", self.worker_path().await?),
                Some(("application/json", body)),
                POLL,
            )
            .await?;
        match r.status() {
            StatusCode::NO_CONTENT => Ok(Polled::Nothing),
            StatusCode::CONFLICT => Ok(Polled::LeaseLost),
            _ => decode(r).await.map(Polled::Events),
        }
    }

    /// One long poll of an event cursor (`release.published`, say).
    pub async fn poll_events(
        &self,
        cursor: &str,
        body: &CursorPollRequest,
    ) -> Result<Vec<EventMessage>, ClientError> {
        let r = self
            .call(
                Method::POST,
                &format!(
                    "{}/event_cursor/{}/poll",
                    self.worker_path().await?,
                    segment(cursor)
                ),
                Some(("application/json", Self::json(body))),
                POLL,
            )
            .await?;
        if r.status() == StatusCode::NO_CONTENT {
            return Ok(vec![]);
        }
        decode(r).await
    }

    /// Reports on an operation over the long-poll API.
    pub async fn report(&self, result: &ActionResult) -> Result<(), ClientError> {
        let r = self
            .call(
                Method::PATCH,
                &format!(
                    "{}/queued_operation/{}",
                    self.worker_path().await?,
                    segment(&result.queued_operation_id)
                ),
                Some(("application/json", Self::json(result))),
                SHORT,
            )
            .await?;
        expect(r, &[200, 204]).await
    }

    // --- the HTTP/2 stream (v1) ---

    /// The base of the worker port (`GET /api/info`); the main URL when
    /// the server does not say.
    pub async fn stream_base(&self) -> String {
        let info = async {
            let r = self
                .http
                .get(format!("{}/api/info", self.base))
                .timeout(Duration::from_secs(10))
                .send()
                .await
                .ok()?;
            r.json::<ApiInfo>().await.ok()
        }
        .await;
        let port = info
            .map(|i| i.worker_port)
            .and_then(|p| p.parse::<u16>().ok());
        let Some(port) = port else {
            return self.base.clone();
        };
        match reqwest::Url::parse(&self.base) {
            Ok(mut u) => {
                if u.set_port(Some(port)).is_err() {
                    return self.base.clone();
                }
                u.as_str().trim_end_matches('/').to_owned()
            }
            Err(_) => self.base.clone(),
        }
    }

    fn secret_request(&self, method: Method, url: String) -> reqwest::RequestBuilder {
        self.stream_http
            .request(method, url)
            .bearer_auth(&self.secret)
    }

    /// `GET /api/bridge_worker/{id}/me` (a wrong secret answers 404).
    pub async fn me(&self, base: &str) -> Result<serde_json::Value, ClientError> {
        let r = self
            .secret_request(
                Method::GET,
                format!("{base}/api/bridge_worker/{}/me", segment(&self.worker_id)),
            )
            .timeout(SHORT)
            .send()
            .await
            .map_err(|e| transport(&e))?;
        decode(r).await
    }

    /// Opens the event stream, registering what the worker provides.
    pub async fn stream(
        &self,
        base: &str,
        info: &WorkerInfo,
    ) -> Result<impl Stream<Item = Result<EventMessage, ClientError>> + use<>, ClientError> {
        let r = self
            .secret_request(
                Method::POST,
                format!(
                    "{base}/api/bridge_worker/{}/stream",
                    segment(&self.worker_id)
                ),
            )
            .header(reqwest::header::ACCEPT, "text/event-stream")
            .header(reqwest::header::CACHE_CONTROL, "no-cache")
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(Self::json(info))
            .send()
            .await
            .map_err(|e| transport(&e))?;
        if r.status() != StatusCode::OK {
            return Err(status_error(r).await);
        }
        Ok(sse_events(r.bytes_stream()))
    }

    /// Reports on an operation over the stream API (success is 200 only).
    pub async fn report_stream(
        &self,
        base: &str,
        result: &ActionResult,
    ) -> Result<(), ClientError> {
        let r = self
            .secret_request(
                Method::POST,
                format!(
                    "{base}/api/bridge_worker/{}/action_result",
                    segment(&self.worker_id)
                ),
            )
            .timeout(SHORT)
            .json(result)
            .send()
            .await
            .map_err(|e| transport(&e))?;
        expect(r, &[200]).await
    }
}

/// The events of an SSE body: only `data: ` lines carry one (one JSON
/// `EventMessage` per line); comments, `event:`/`id:` lines and blank
/// lines are skipped; a line that is not valid JSON is skipped too.
fn sse_events<S>(body: S) -> impl Stream<Item = Result<EventMessage, ClientError>>
where
    S: Stream<Item = reqwest::Result<bytes::Bytes>> + Send + 'static,
{
    futures::stream::unfold(
        (Box::pin(body), Vec::<u8>::new(), false),
        |(mut body, mut buf, done)| async move {
            if done {
                return None;
            }
            loop {
                if let Some(pos) = buf.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=pos).collect();
                    let line = String::from_utf8_lossy(&line);
                    if let Some(data) = line.strip_prefix("data: ") {
                        match serde_json::from_str::<EventMessage>(data.trim_end()) {
                            Ok(m) => return Some((Ok(m), (body, buf, false))),
                            Err(e) => {
                                tracing::warn!(error = %e, "skipping a malformed event line");
                                continue;
                            }
                        }
                    }
                    continue;
                }
                match body.next().await {
                    Some(Ok(chunk)) => buf.extend_from_slice(&chunk),
                    Some(Err(e)) => return Some((Err(transport(&e)), (body, buf, true))),
                    None => return None,
                }
            }
        },
    )
}

async fn status_error(r: reqwest::Response) -> ClientError {
    let status = r.status().as_u16();
    let text = r.text().await.unwrap_or_default();
    let message: String = text.chars().take(300).collect();
    ClientError::Status { status, message }
}

async fn expect(r: reqwest::Response, ok: &[u16]) -> Result<(), ClientError> {
    if ok.contains(&r.status().as_u16()) {
        Ok(())
    } else {
        Err(status_error(r).await)
    }
}

async fn decode<T: DeserializeOwned>(r: reqwest::Response) -> Result<T, ClientError> {
    if !r.status().is_success() {
        return Err(status_error(r).await);
    }
    let bytes = r.bytes().await.map_err(|e| transport(&e))?;
    serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode(e.to_string()))
}

#[cfg(test)]
mod tests {

    #[test]
    fn reports_refused_for_load_or_conflict_are_retried_and_bad_ones_not() {
        let status = |status: u16| ClientError::Status {
            status,
            message: String::new(),
        };
        for code in [500, 503, 409, 429, 401] {
            assert!(status(code).is_retryable(), "{code}");
        }
        for code in [400, 403, 404, 422] {
            assert!(!status(code).is_retryable(), "{code}");
        }
    }

    use super::*;

    #[tokio::test]
    async fn server_sent_events_yield_data_lines_only() {
        let body = ": keepalive\n\nevent: x\ndata: {\"Event\":\"WorkerEvent\",\"Data\":{\"Action\":\"keepalive\"}}\n\ndata:{\"Event\":\"no space\"}\ndata: not json\n\ndata: {\"Event\":\"BridgeWorkerEvent\",\"Data\":{}}\n";
        // Split across chunks at awkward places.
        let chunks: Vec<reqwest::Result<bytes::Bytes>> = body
            .as_bytes()
            .chunks(7)
            .map(|c| Ok(bytes::Bytes::copy_from_slice(c)))
            .collect();
        let events: Vec<String> = sse_events(futures::stream::iter(chunks))
            .map(|e| e.unwrap().event)
            .collect()
            .await;
        assert_eq!(events, ["WorkerEvent", "BridgeWorkerEvent"]);
    }
}
