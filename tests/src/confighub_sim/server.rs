//! confighub-sim's HTTP API: the worker side (both transports: `POST
//! /auth/worker` with HS256 JWTs, the lease, `ProvidedInfo`, targets,
//! `queued_operation/poll` and reports; the HTTP/2 event stream with SSE
//! framing, `me` and `action_result`; event cursors) and the operator side
//! `cub` calls (spaces, workers, targets, units with revisions,
//! set-target, apply/destroy/refresh/cancel as queued operations, unit
//! events, `LatestUnitEvent`). Faults: 5xx rate, latency, JWT lifetime,
//! a stolen lease, dropped streams, failing polls.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State as AxState};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, post};
use base64::Engine as _;
use serde_json::{Value, json};
use tokio::sync::{Notify, broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use super::model::{
    Faults, Lease, Operation, Revision, Space, State, Target, Unit, Worker, new_id, now,
};

/// Tuning of a simulated ConfigHub.
#[derive(Clone, Debug)]
pub struct SimOptions {
    /// Lifetime of a lease without polls.
    pub lease_ttl: Duration,
    /// Heartbeats on event streams (0: none).
    pub heartbeat: Duration,
    /// The operator token `cub` uses.
    pub operator_token: String,
    /// Where `release publish` pushes bundles (ConfigHub's OCI endpoint).
    pub registry: Option<crate::registry::Pusher>,
}

impl Default for SimOptions {
    fn default() -> Self {
        Self {
            lease_ttl: Duration::from_secs(15),
            heartbeat: Duration::from_secs(10),
            operator_token: "chs_operator_token".into(),
            registry: None,
        }
    }
}

pub(crate) struct Sim {
    /// One release publish at a time (numbers and digests in order).
    pub publishing: tokio::sync::Mutex<()>,
    pub state: Mutex<State>,
    /// New operations or log entries.
    pub changed: Notify,
    pub options: SimOptions,
    key: ring::hmac::Key,
    drop_streams: broadcast::Sender<()>,
    pub port: u16,
}

/// A running simulated ConfigHub.
pub struct ConfigHubSim {
    pub(crate) sim: Arc<Sim>,
    pub addr: SocketAddr,
    stop: CancellationToken,
}

pub(super) type Reply = Response;

pub(super) fn error(status: u16, message: impl Into<String>) -> Reply {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        code,
        axum::Json(
            json!({"Code": code.canonical_reason().unwrap_or(""), "Message": message.into()}),
        ),
    )
        .into_response()
}

/// A refusal a helper returns; the handler turns it into the answer.
pub(super) struct Refusal(u16, String);

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        error(self.0, self.1)
    }
}

fn refuse(status: u16, message: impl Into<String>) -> Refusal {
    Refusal(status, message.into())
}

pub(super) fn ok(v: Value) -> Reply {
    axum::Json(v).into_response()
}

fn bearer(h: &HeaderMap) -> Option<String> {
    h.get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::to_owned)
}

/// `where=Slug = 'x'` style filters: (key, value) pairs.
fn parse_where(w: &str) -> BTreeMap<String, String> {
    w.split(" AND ")
        .filter_map(|c| {
            let (k, v) = c.split_once('=')?;
            Some((k.trim().to_owned(), v.trim().trim_matches('\'').to_owned()))
        })
        .collect()
}

impl ConfigHubSim {
    /// Starts a simulated ConfigHub on `addr` (port 0: any).
    pub async fn start(addr: SocketAddr, options: SimOptions) -> anyhow::Result<ConfigHubSim> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let rng = ring::rand::SystemRandom::new();
        let key = ring::hmac::Key::generate(ring::hmac::HMAC_SHA256, &rng)
            .map_err(|_| anyhow::anyhow!("cannot generate the JWT key"))?;
        let sim = Arc::new(Sim {
            state: Mutex::default(),
            publishing: tokio::sync::Mutex::new(()),
            changed: Notify::new(),
            options,
            key,
            drop_streams: broadcast::channel(4).0,
            port: addr.port(),
        });
        let stop = CancellationToken::new();
        let app = router(sim.clone());
        let s = stop.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move { s.cancelled().await })
                .await;
        });
        Ok(ConfigHubSim { sim, addr, stop })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn operator_token(&self) -> &str {
        &self.sim.options.operator_token
    }

    /// Reads or changes the simulator's state (tests).
    pub fn with_state<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let r = f(&mut self.sim.state.lock().unwrap());
        self.sim.changed.notify_waiters();
        r
    }

    pub fn set_faults(&self, faults: Faults) {
        self.with_state(|s| s.faults = faults);
    }

    /// Ends every open event stream now.
    pub fn drop_streams(&self) {
        let _ = self.sim.drop_streams.send(());
    }

    /// Gives a worker's lease to someone else for `hold`.
    pub fn steal_lease(&self, worker: &str, hold: Duration) {
        self.with_state(|s| {
            if let Some(w) = s.worker_mut(worker) {
                w.lease = Some(Lease {
                    claim_token: new_id(),
                    expires: Instant::now() + hold,
                });
            }
        });
    }

    pub fn stop(&self) {
        self.stop.cancel();
    }
}

impl Drop for ConfigHubSim {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

// --- JWTs (HS256) ---

fn b64url(b: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

impl Sim {
    fn issue_jwt(&self, worker: &str, ttl: Duration) -> String {
        let exp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs()
            + ttl.as_secs().max(1);
        let head = b64url(br#"{"alg":"HS256","typ":"JWT"}"#);
        let body = b64url(
            json!({"sub": worker, "exp": exp, "aud": "worker"})
                .to_string()
                .as_bytes(),
        );
        let signed = format!("{head}.{body}");
        let sig = ring::hmac::sign(&self.key, signed.as_bytes());
        format!("{signed}.{}", b64url(sig.as_ref()))
    }

    /// The worker a valid, unexpired JWT names.
    fn verify_jwt(&self, token: &str) -> Option<String> {
        let (signed, sig) = token.rsplit_once('.')?;
        let sig = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(sig)
            .ok()?;
        ring::hmac::verify(&self.key, signed.as_bytes(), &sig).ok()?;
        let body = signed.split_once('.')?.1;
        let claims: Value = serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(body)
                .ok()?,
        )
        .ok()?;
        let now = SystemTime::now().duration_since(UNIX_EPOCH).ok()?.as_secs();
        (claims["exp"].as_u64()? > now && claims["aud"] == "worker")
            .then(|| claims["sub"].as_str().map(str::to_owned))
            .flatten()
    }

    /// Faults on the worker API: latency, then maybe a 503.
    async fn fault(&self) -> Option<Reply> {
        let f = self.state.lock().unwrap().faults.clone();
        if f.latency_ms > 0 {
            tokio::time::sleep(Duration::from_millis(f.latency_ms)).await;
        }
        let mut s = self.state.lock().unwrap();
        if s.faults.fail_next > 0 || (f.error_rate > 0.0 && rand::random::<f64>() < f.error_rate) {
            s.faults.fail_next = s.faults.fail_next.saturating_sub(1);
            s.injected_errors += 1;
            return Some(error(503, "simulated outage"));
        }
        None
    }

    /// A report answered 503 while `fail_reports` lasts.
    fn report_fault(&self) -> Option<Reply> {
        let mut s = self.state.lock().unwrap();
        if s.faults.fail_reports == 0 {
            return None;
        }
        s.faults.fail_reports -= 1;
        s.injected_errors += 1;
        Some(error(503, "simulated outage"))
    }

    /// The worker authenticated by a JWT (long poll).
    fn jwt_worker(&self, h: &HeaderMap, id: &str) -> Result<String, Refusal> {
        let token = bearer(h).ok_or_else(|| refuse(401, "no token"))?;
        match self.verify_jwt(&token) {
            Some(w) if w == id => Ok(w),
            Some(_) => Err(refuse(403, "not this worker")),
            None => Err(refuse(401, "token expired or invalid")),
        }
    }

    /// The worker authenticated by its secret (stream transport).
    fn secret_worker(&self, h: &HeaderMap, id: &str) -> Result<String, Refusal> {
        let token = bearer(h).ok_or_else(|| refuse(401, "no token"))?;
        let s = self.state.lock().unwrap();
        match s.worker(id) {
            Some(w) if w.secret == token => Ok(w.id.clone()),
            // What ConfigHub answers for a wrong secret.
            _ => Err(refuse(404, "bridge worker not found")),
        }
    }

    pub(super) fn operator(&self, h: &HeaderMap) -> Result<(), Refusal> {
        match bearer(h) {
            Some(t) if t == self.options.operator_token => Ok(()),
            _ => Err(refuse(401, "unauthorized")),
        }
    }

    fn seen(&self, worker: &str, message: &str) {
        if let Some(w) = self.state.lock().unwrap().worker_mut(worker) {
            w.last_seen = Some(Instant::now());
            w.last_seen_at = now();
            if !message.is_empty() {
                w.last_message = message.to_owned();
            }
        }
    }

    /// Takes the worker's queued operations (marked delivered), as event
    /// messages with the operation each delivers.
    fn take_queue(&self, worker: &str) -> Vec<(Option<String>, Value)> {
        let mut s = self.state.lock().unwrap();
        let mut out: Vec<(Option<String>, Value)> = s
            .injected
            .remove(worker)
            .unwrap_or_default()
            .into_iter()
            .map(|m| (None, m))
            .collect();
        let ids: Vec<String> = s
            .queues
            .get_mut(worker)
            .map(|q| q.drain(..).collect())
            .unwrap_or_default();
        for id in ids {
            if let Some(m) = s.event_message(&id) {
                out.push((Some(id.clone()), m));
            }
            if let Some(op) = s.operations.iter_mut().find(|o| o.id == id)
                && op.status == "Pending"
            {
                op.status = "Delivered".into();
            }
        }
        out
    }

    /// Puts operations a dead stream could not deliver back in front of
    /// the worker's queue.
    fn requeue(&self, worker: &str, ids: Vec<String>) {
        let mut s = self.state.lock().unwrap();
        for id in ids.iter().rev() {
            if let Some(op) = s.operations.iter_mut().find(|o| o.id == *id)
                && op.status == "Delivered"
            {
                op.status = "Pending".into();
            }
            s.queues
                .entry(worker.to_owned())
                .or_default()
                .push_front(id.clone());
        }
    }

    /// Whether `generation` is still the worker's newest stream.
    fn current_stream(&self, worker: &str, generation: u64) -> bool {
        self.state
            .lock()
            .unwrap()
            .worker(worker)
            .is_some_and(|w| w.stream_generation == generation)
    }
}

fn router(sim: Arc<Sim>) -> Router {
    Router::new()
        .route("/api/info", get(info))
        .route("/auth/worker", post(auth_worker))
        .route("/api/bridge_worker/{id}/me", get(me))
        .route("/api/bridge_worker/{id}/stream", post(stream))
        .route("/api/bridge_worker/{id}/action_result", post(action_result))
        .route(
            "/api/space/{space}/bridge_worker/{id}/lease",
            post(claim).delete(release),
        )
        .route(
            "/api/space/{space}/bridge_worker/{id}/queued_operation/poll",
            post(poll),
        )
        .route(
            "/api/space/{space}/bridge_worker/{id}/queued_operation/{op}",
            patch(report),
        )
        .route(
            "/api/space/{space}/bridge_worker/{id}/event_cursor/{name}/poll",
            post(cursor_poll),
        )
        .route(
            "/api/space/{space}/bridge_worker/{id}",
            patch(register).get(get_worker),
        )
        .route("/api/space", post(create_space).get(list_spaces))
        .route(
            "/api/space/{space}/bridge_worker",
            post(create_worker).get(list_workers),
        )
        .route(
            "/api/space/{space}/target",
            post(create_target).get(list_targets),
        )
        .route("/api/space/{space}/target/{target}", patch(patch_target))
        .route("/api/space/{space}/unit", post(create_unit).get(list_units))
        .route(
            "/api/space/{space}/unit/{unit}",
            get(get_unit).patch(patch_unit).put(patch_unit),
        )
        .route("/api/space/{space}/unit/{unit}/apply", post(apply))
        .route("/api/space/{space}/unit/{unit}/destroy", post(destroy))
        .route("/api/space/{space}/unit/{unit}/refresh", post(refresh))
        .route(
            "/api/space/{space}/unit/{unit}/unit_event",
            get(unit_events),
        )
        .route("/api/unit/cancel", post(cancel))
        .route("/api/unit", get(search_units))
        .route("/api/space/{space}/release", post(super::release::publish))
        .route("/_sim/faults", get(get_faults).put(put_faults))
        .route("/_sim/drop-streams", post(drop_streams))
        .route("/_sim/steal-lease/{id}", post(steal))
        .with_state(sim)
}

pub(super) type S = AxState<Arc<Sim>>;

async fn info(AxState(sim): S) -> Reply {
    ok(json!({"WorkerPort": sim.port.to_string(), "Build": "confighub-sim"}))
}

async fn auth_worker(AxState(sim): S, body: Bytes) -> Reply {
    if let Some(r) = sim.fault().await {
        return r;
    }
    let req: Value = serde_json::from_slice(&body).unwrap_or_default();
    let (id, secret) = (
        req["worker_id"].as_str().unwrap_or_default(),
        req["worker_secret"].as_str().unwrap_or_default(),
    );
    let (w, space, ttl) = {
        let mut s = sim.state.lock().unwrap();
        let Some(w) = s.worker(id).filter(|w| w.secret == secret).cloned() else {
            return error(401, "invalid worker credentials");
        };
        let space = s.space(&w.space_id).cloned();
        s.auths += 1;
        let ttl = match s.faults.jwt_ttl_seconds {
            0 => Duration::from_secs(3600),
            n => Duration::from_secs(n),
        };
        (w, space, ttl)
    };
    ok(json!({
        "access_token": sim.issue_jwt(&w.id, ttl),
        "worker": {"bridge_worker_id": w.id, "slug": w.slug, "space_id": w.space_id,
                   "space_slug": space.map(|s| s.slug).unwrap_or_default()},
    }))
}

async fn me(AxState(sim): S, Path(id): Path<String>, h: HeaderMap) -> Reply {
    let worker = match sim.secret_worker(&h, &id) {
        Ok(w) => w,
        Err(r) => return r.into_response(),
    };
    let s = sim.state.lock().unwrap();
    ok(s.worker(&worker).map(|w| w.json(false)).unwrap_or_default())
}

/// Decrements a worker's open streams when its stream ends.
struct StreamGuard {
    sim: Arc<Sim>,
    worker: String,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if let Some(w) = self.sim.state.lock().unwrap().worker_mut(&self.worker) {
            w.streams = w.streams.saturating_sub(1);
        }
    }
}

async fn stream(AxState(sim): S, Path(id): Path<String>, h: HeaderMap, body: Bytes) -> Reply {
    if let Some(r) = sim.fault().await {
        return r;
    }
    let worker = match sim.secret_worker(&h, &id) {
        Ok(w) => w,
        Err(r) => return r.into_response(),
    };
    let info: Value = serde_json::from_slice(&body).unwrap_or_default();
    let generation = {
        let mut s = sim.state.lock().unwrap();
        s.register(&worker, &info);
        match s.worker_mut(&worker) {
            Some(w) => {
                w.streams += 1;
                // A new stream replaces the worker's older ones.
                w.stream_generation += 1;
                w.stream_generation
            }
            None => 0,
        }
    };
    sim.seen(&worker, "");
    let (tx, rx) = mpsc::channel::<Result<Bytes, Infallible>>(64);
    let guard = StreamGuard {
        sim: sim.clone(),
        worker: worker.clone(),
    };
    let mut dropped = sim.drop_streams.subscribe();
    tokio::spawn(async move {
        let _guard = guard;
        let heartbeat = sim.options.heartbeat;
        let mut beat = tokio::time::interval(if heartbeat.is_zero() {
            Duration::from_secs(3600)
        } else {
            heartbeat
        });
        beat.tick().await;
        let mut keepalive = tokio::time::interval(Duration::from_secs(15));
        keepalive.tick().await;
        loop {
            if tx.is_closed() || !sim.current_stream(&worker, generation) {
                return;
            }
            let mut batch = sim.take_queue(&worker).into_iter();
            while let Some((op, m)) = batch.next() {
                if tx
                    .send(Ok(Bytes::from(format!("data: {m}\n\n"))))
                    .await
                    .is_err()
                {
                    let undelivered = op
                        .into_iter()
                        .chain(batch.filter_map(|(op, _)| op))
                        .collect();
                    sim.requeue(&worker, undelivered);
                    return;
                }
            }
            let notified = sim.changed.notified();
            tokio::select! {
                () = notified => {}
                _ = dropped.recv() => return,
                _ = keepalive.tick() => {
                    if tx.send(Ok(Bytes::from_static(b": keepalive\n\n"))).await.is_err() {
                        return;
                    }
                }
                _ = beat.tick(), if !heartbeat.is_zero() => {
                    let hb = json!({"Event": "WorkerEvent", "Data": {"Action": "Heartbeat", "Payload": {"Timestamp": 0}}});
                    if tx.send(Ok(Bytes::from(format!("data: {hb}\n\n")))).await.is_err() {
                        return;
                    }
                }
                () = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
    });
    Response::builder()
        .status(200)
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        ))
        .unwrap_or_else(|_| error(500, "stream"))
}

async fn action_result(
    AxState(sim): S,
    Path(id): Path<String>,
    h: HeaderMap,
    body: Bytes,
) -> Reply {
    if let Some(r) = sim.fault().await {
        return r;
    }
    if let Some(r) = sim.report_fault() {
        return r;
    }
    let worker = match sim.secret_worker(&h, &id) {
        Ok(w) => w,
        Err(r) => return r.into_response(),
    };
    let r: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return error(400, format!("bad ActionResult: {e}")),
    };
    sim.seen(&worker, r["Message"].as_str().unwrap_or_default());
    let done = sim.state.lock().unwrap().report(&r);
    sim.changed.notify_waiters();
    match done {
        // The stream transport's success is 200 exactly.
        Ok(()) => StatusCode::OK.into_response(),
        Err((code, m)) => error(code, m),
    }
}

async fn claim(AxState(sim): S, Path((_space, id)): Path<(String, String)>, h: HeaderMap) -> Reply {
    if let Some(r) = sim.fault().await {
        return r;
    }
    let worker = match sim.jwt_worker(&h, &id) {
        Ok(w) => w,
        Err(r) => return r.into_response(),
    };
    let ttl = sim.options.lease_ttl;
    let mut s = sim.state.lock().unwrap();
    let Some(w) = s.worker_mut(&worker) else {
        return error(404, "bridge worker not found");
    };
    if w.lease.as_ref().is_some_and(|l| l.expires > Instant::now()) {
        return error(409, "the lease is held by another worker");
    }
    let token = new_id();
    w.lease = Some(Lease {
        claim_token: token.clone(),
        expires: Instant::now() + ttl,
    });
    w.last_seen = Some(Instant::now());
    w.last_seen_at = now();
    ok(json!({"claim_token": token, "ttl_seconds": ttl.as_secs()}))
}

async fn release(
    AxState(sim): S,
    Path((_space, id)): Path<(String, String)>,
    h: HeaderMap,
    body: Bytes,
) -> Reply {
    let worker = match sim.jwt_worker(&h, &id) {
        Ok(w) => w,
        Err(r) => return r.into_response(),
    };
    let req: Value = serde_json::from_slice(&body).unwrap_or_default();
    let mut s = sim.state.lock().unwrap();
    if let Some(w) = s.worker_mut(&worker)
        && w.lease
            .as_ref()
            .is_some_and(|l| l.claim_token == req["claim_token"].as_str().unwrap_or_default())
    {
        w.lease = None;
    }
    StatusCode::NO_CONTENT.into_response()
}

/// Whether `claim` is the worker's live lease; renews it.
fn renew(sim: &Sim, worker: &str, claim: &str) -> bool {
    let ttl = sim.options.lease_ttl;
    let mut s = sim.state.lock().unwrap();
    match s.worker_mut(worker).and_then(|w| w.lease.as_mut()) {
        Some(l) if l.claim_token == claim && l.expires > Instant::now() => {
            l.expires = Instant::now() + ttl;
            true
        }
        _ => false,
    }
}

async fn poll(
    AxState(sim): S,
    Path((_space, id)): Path<(String, String)>,
    h: HeaderMap,
    body: Bytes,
) -> Reply {
    if let Some(r) = sim.fault().await {
        return r;
    }
    let worker = match sim.jwt_worker(&h, &id) {
        Ok(w) => w,
        Err(r) => return r.into_response(),
    };
    {
        let mut s = sim.state.lock().unwrap();
        if s.faults.fail_polls {
            s.injected_errors += 1;
            return error(504, "upstream timed out");
        }
    }
    let req: Value = serde_json::from_slice(&body).unwrap_or_default();
    let claim = req["claim_token"].as_str().unwrap_or_default().to_owned();
    let asked = match req["timeout_seconds"].as_i64().unwrap_or(30) {
        n if n <= 0 => 30,
        n => n.min(60),
    };
    let timeout = match sim.state.lock().unwrap().faults.poll_timeout_seconds {
        0 => u64::try_from(asked).unwrap_or(30),
        cap => cap,
    };
    let deadline = Instant::now() + Duration::from_secs(timeout);
    loop {
        if !renew(&sim, &worker, &claim) {
            return error(409, "the claim is no longer valid");
        }
        sim.seen(&worker, "");
        let notified = sim.changed.notified();
        let events: Vec<Value> = sim
            .take_queue(&worker)
            .into_iter()
            .map(|(_, m)| m)
            .collect();
        if !events.is_empty() {
            return ok(Value::Array(events));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return StatusCode::NO_CONTENT.into_response();
        }
        tokio::select! {
            () = notified => {}
            () = tokio::time::sleep(left.min(Duration::from_millis(500))) => {}
        }
    }
}

async fn report(
    AxState(sim): S,
    Path((_space, id, op)): Path<(String, String, String)>,
    h: HeaderMap,
    body: Bytes,
) -> Reply {
    if let Some(r) = sim.fault().await {
        return r;
    }
    if let Some(r) = sim.report_fault() {
        return r;
    }
    let worker = match sim.jwt_worker(&h, &id) {
        Ok(w) => w,
        Err(r) => return r.into_response(),
    };
    let r: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return error(400, format!("bad ActionResult: {e}")),
    };
    if r["QueuedOperationID"].as_str() != Some(op.as_str()) {
        return error(400, "QueuedOperationID does not match the path");
    }
    sim.seen(&worker, "");
    let done = sim.state.lock().unwrap().report(&r);
    sim.changed.notify_waiters();
    match done {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err((code, m)) => error(code, m),
    }
}

async fn cursor_poll(
    AxState(sim): S,
    Path((_space, id, name)): Path<(String, String, String)>,
    h: HeaderMap,
    body: Bytes,
) -> Reply {
    if let Err(r) = sim.jwt_worker(&h, &id) {
        return r.into_response();
    }
    let req: Value = serde_json::from_slice(&body).unwrap_or_default();
    let types: Vec<String> = req["event_types"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|t| t.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let timeout = Duration::from_secs(req["timeout_seconds"].as_u64().unwrap_or(30).min(60));
    let deadline = Instant::now() + timeout;
    loop {
        let notified = sim.changed.notified();
        let out: Vec<Value> = {
            let mut s = sim.state.lock().unwrap();
            // An explicit from_cursor resumes there; otherwise the server's
            // bookmark, which starts at the log's tail for a new cursor.
            let tail = s.log.last().map_or(0, |e| e.cursor);
            let from = match req["from_cursor"].as_i64() {
                Some(f) => f,
                None => *s.cursors.entry(name.clone()).or_insert(tail),
            };
            let entries: Vec<_> = s
                .log
                .iter()
                .filter(|e| e.cursor > from && (types.is_empty() || types.contains(&e.event_type)))
                .cloned()
                .collect();
            if let Some(last) = entries.last() {
                s.cursors.insert(name.clone(), last.cursor);
            }
            entries
                .iter()
                .map(super::model::LogEntry::message)
                .collect()
        };
        if !out.is_empty() {
            return ok(Value::Array(out));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return StatusCode::NO_CONTENT.into_response();
        }
        tokio::select! {
            () = notified => {}
            () = tokio::time::sleep(left.min(Duration::from_millis(500))) => {}
        }
    }
}

async fn register(
    AxState(sim): S,
    Path((_space, id)): Path<(String, String)>,
    h: HeaderMap,
    body: Bytes,
) -> Reply {
    if let Some(r) = sim.fault().await {
        return r;
    }
    let worker = match sim.jwt_worker(&h, &id) {
        Ok(w) => w,
        Err(r) => return r.into_response(),
    };
    let patch: Value = serde_json::from_slice(&body).unwrap_or_default();
    let mut s = sim.state.lock().unwrap();
    if let Some(info) = patch.get("ProvidedInfo") {
        s.register(&worker, info);
    }
    ok(s.worker(&worker).map(|w| w.json(false)).unwrap_or_default())
}

async fn get_worker(
    AxState(sim): S,
    Path((_space, id)): Path<(String, String)>,
    h: HeaderMap,
) -> Reply {
    if let Err(r) = sim.operator(&h) {
        return r.into_response();
    }
    let s = sim.state.lock().unwrap();
    match s.worker(&id) {
        Some(w) => ok(json!({"BridgeWorker": w.json(false)})),
        None => error(404, "bridge worker not found"),
    }
}

// --- operator API ---

async fn create_space(AxState(sim): S, h: HeaderMap, body: Bytes) -> Reply {
    if let Err(r) = sim.operator(&h) {
        return r.into_response();
    }
    let req: Value = serde_json::from_slice(&body).unwrap_or_default();
    let slug = req["Slug"].as_str().unwrap_or_default().to_owned();
    if slug.is_empty() {
        return error(400, "Slug is required");
    }
    let mut s = sim.state.lock().unwrap();
    if let Some(existing) = s.space(&slug) {
        return ok(existing.json());
    }
    let space = Space { id: new_id(), slug };
    s.spaces.push(space.clone());
    ok(space.json())
}

#[derive(serde::Deserialize, Default)]
struct ListQuery {
    #[serde(default, rename = "where")]
    filter: String,
    #[serde(default)]
    dry_run: Option<bool>,
}

async fn list_spaces(AxState(sim): S, h: HeaderMap, Query(q): Query<ListQuery>) -> Reply {
    if let Err(r) = sim.operator(&h) {
        return r.into_response();
    }
    let w = parse_where(&q.filter);
    let s = sim.state.lock().unwrap();
    ok(Value::Array(
        s.spaces
            .iter()
            .filter(|x| w.get("Slug").is_none_or(|v| *v == x.slug))
            .map(|x| json!({"Space": x.json()}))
            .collect(),
    ))
}

pub(super) fn space_id(s: &State, space: &str) -> Result<String, Refusal> {
    s.space(space)
        .map(|x| x.id.clone())
        .ok_or_else(|| refuse(404, format!("space {space} not found")))
}

async fn create_worker(
    AxState(sim): S,
    Path(space): Path<String>,
    h: HeaderMap,
    body: Bytes,
) -> Reply {
    if let Err(r) = sim.operator(&h) {
        return r.into_response();
    }
    let req: Value = serde_json::from_slice(&body).unwrap_or_default();
    let mut s = sim.state.lock().unwrap();
    let space = match space_id(&s, &space) {
        Ok(x) => x,
        Err(r) => return r.into_response(),
    };
    let slug = req["Slug"].as_str().unwrap_or_default().to_owned();
    if let Some(w) = s
        .workers
        .iter()
        .find(|w| w.slug == slug && w.space_id == space)
    {
        return ok(w.json(true));
    }
    let w = Worker {
        id: new_id(),
        slug,
        space_id: space,
        secret: format!("ch_{}", new_id().replace('-', "")),
        provided_info: Value::Null,
        lease: None,
        streams: 0,
        stream_generation: 0,
        last_seen: None,
        last_seen_at: String::new(),
        last_message: String::new(),
    };
    s.workers.push(w.clone());
    ok(w.json(true))
}

async fn list_workers(AxState(sim): S, Path(space): Path<String>, h: HeaderMap) -> Reply {
    if let Err(r) = sim.operator(&h) {
        return r.into_response();
    }
    let s = sim.state.lock().unwrap();
    let space = match space_id(&s, &space) {
        Ok(x) => x,
        Err(r) => return r.into_response(),
    };
    ok(Value::Array(
        s.workers
            .iter()
            .filter(|w| w.space_id == space)
            .map(|w| json!({"BridgeWorker": w.json(false)}))
            .collect(),
    ))
}

fn target_from(space: &str, v: &Value) -> Target {
    let text = |k: &str| v[k].as_str().unwrap_or_default().to_owned();
    Target {
        id: new_id(),
        slug: text("Slug"),
        space_id: space.to_owned(),
        worker_id: text("BridgeWorkerID"),
        bridge_handle: text("BridgeHandle"),
        provider_type: text("ProviderType"),
        toolchain_type: text("ToolchainType"),
        parameters: v["Parameters"].as_str().unwrap_or("null").to_owned(),
        options: serde_json::from_value(v["Options"].clone()).unwrap_or_default(),
    }
}

async fn create_target(
    AxState(sim): S,
    Path(space): Path<String>,
    h: HeaderMap,
    body: Bytes,
) -> Reply {
    let req: Value = serde_json::from_slice(&body).unwrap_or_default();
    // Workers create targets (JWT) and so do operators.
    let by_worker = bearer(&h).and_then(|t| sim.verify_jwt(&t)).is_some();
    if !by_worker && let Err(r) = sim.operator(&h) {
        return r.into_response();
    }
    let mut s = sim.state.lock().unwrap();
    let space = match space_id(&s, &space) {
        Ok(x) => x,
        Err(r) => return r.into_response(),
    };
    let t = target_from(&space, &req);
    if s.targets
        .iter()
        .any(|x| x.slug == t.slug && x.space_id == space)
    {
        return error(409, format!("target {} exists", t.slug));
    }
    s.targets.push(t.clone());
    ok(t.json())
}

async fn patch_target(
    AxState(sim): S,
    Path((space, target)): Path<(String, String)>,
    h: HeaderMap,
    body: Bytes,
) -> Reply {
    let by_worker = bearer(&h).and_then(|t| sim.verify_jwt(&t)).is_some();
    if !by_worker && let Err(r) = sim.operator(&h) {
        return r.into_response();
    }
    let patch: Value = serde_json::from_slice(&body).unwrap_or_default();
    let mut s = sim.state.lock().unwrap();
    let space = match space_id(&s, &space) {
        Ok(x) => x,
        Err(r) => return r.into_response(),
    };
    let Some(t) = s
        .targets
        .iter_mut()
        .find(|t| t.space_id == space && (t.slug == target || t.id == target))
    else {
        return error(404, "target not found");
    };
    for (k, field) in [
        ("BridgeHandle", &mut t.bridge_handle),
        ("BridgeWorkerID", &mut t.worker_id),
    ] {
        if let Some(v) = patch[k].as_str() {
            *field = v.to_owned();
        }
    }
    if let Some(o) = patch.get("Options") {
        t.options = serde_json::from_value(o.clone()).unwrap_or_default();
    }
    ok(t.json())
}

async fn list_targets(
    AxState(sim): S,
    Path(space): Path<String>,
    h: HeaderMap,
    Query(q): Query<ListQuery>,
) -> Reply {
    if let Err(r) = sim.operator(&h) {
        return r.into_response();
    }
    let w = parse_where(&q.filter);
    let s = sim.state.lock().unwrap();
    let space = match space_id(&s, &space) {
        Ok(x) => x,
        Err(r) => return r.into_response(),
    };
    ok(Value::Array(
        s.targets
            .iter()
            .filter(|t| t.space_id == space && w.get("Slug").is_none_or(|v| *v == t.slug))
            .map(|t| json!({"Target": t.json()}))
            .collect(),
    ))
}

fn decode_data(v: &Value) -> Result<Vec<u8>, Refusal> {
    base64::engine::general_purpose::STANDARD
        .decode(v.as_str().unwrap_or_default())
        .map_err(|e| refuse(400, format!("Data must be base64: {e}")))
}

async fn create_unit(
    AxState(sim): S,
    Path(space): Path<String>,
    h: HeaderMap,
    body: Bytes,
) -> Reply {
    if let Err(r) = sim.operator(&h) {
        return r.into_response();
    }
    let req: Value = serde_json::from_slice(&body).unwrap_or_default();
    let data = match decode_data(&req["Data"]) {
        Ok(d) => d,
        Err(r) => return r.into_response(),
    };
    let mut s = sim.state.lock().unwrap();
    let space = match space_id(&s, &space) {
        Ok(x) => x,
        Err(r) => return r.into_response(),
    };
    let slug = req["Slug"].as_str().unwrap_or_default().to_owned();
    if s.unit(&space, &slug).is_some() {
        return error(409, format!("unit {slug} exists"));
    }
    let u = Unit {
        id: new_id(),
        slug,
        space_id: space,
        target_id: req["TargetID"]
            .as_str()
            .map(str::to_owned)
            .filter(|t| !t.is_empty()),
        toolchain_type: req["ToolchainType"]
            .as_str()
            .unwrap_or("Kubernetes/YAML")
            .to_owned(),
        labels: serde_json::from_value(req["Labels"].clone()).unwrap_or_default(),
        revisions: vec![Revision {
            num: 1,
            data,
            created_at: now(),
        }],
        last_applied: 0,
        live: 0,
        version: 1,
        bridge_state: None,
    };
    s.units.push(u.clone());
    ok(u.json())
}

fn extended(s: &State, u: &Unit) -> Value {
    json!({"Unit": u.json(), "LatestUnitEvent": s.latest_event(&u.id).map(super::model::UnitEvent::json),
           "Target": u.target_id.as_ref().and_then(|t| s.target(t)).map(Target::json)})
}

async fn list_units(
    AxState(sim): S,
    Path(space): Path<String>,
    h: HeaderMap,
    Query(q): Query<ListQuery>,
) -> Reply {
    if let Err(r) = sim.operator(&h) {
        return r.into_response();
    }
    let w = parse_where(&q.filter);
    let s = sim.state.lock().unwrap();
    let space = match space_id(&s, &space) {
        Ok(x) => x,
        Err(r) => return r.into_response(),
    };
    ok(Value::Array(
        s.units
            .iter()
            .filter(|u| u.space_id == space && w.get("Slug").is_none_or(|v| *v == u.slug))
            .map(|u| extended(&s, u))
            .collect(),
    ))
}

async fn search_units(AxState(sim): S, h: HeaderMap, Query(q): Query<ListQuery>) -> Reply {
    if let Err(r) = sim.operator(&h) {
        return r.into_response();
    }
    let w = parse_where(&q.filter);
    let s = sim.state.lock().unwrap();
    ok(Value::Array(
        s.units
            .iter()
            .filter(|u| w.get("UnitID").is_none_or(|v| *v == u.id))
            .map(|u| extended(&s, u))
            .collect(),
    ))
}

async fn get_unit(
    AxState(sim): S,
    Path((space, unit)): Path<(String, String)>,
    h: HeaderMap,
) -> Reply {
    if let Err(r) = sim.operator(&h) {
        return r.into_response();
    }
    let s = sim.state.lock().unwrap();
    let space = match space_id(&s, &space) {
        Ok(x) => x,
        Err(r) => return r.into_response(),
    };
    match s.unit(&space, &unit) {
        Some(u) => ok(extended(&s, u)),
        None => error(404, "unit not found"),
    }
}

/// Merge-patch (or full update) of a unit: `TargetID` (the nil UUID
/// unsets it), `Data` (a new revision when it differs), `Labels`.
async fn patch_unit(
    AxState(sim): S,
    Path((space, unit)): Path<(String, String)>,
    h: HeaderMap,
    body: Bytes,
) -> Reply {
    if let Err(r) = sim.operator(&h) {
        return r.into_response();
    }
    let patch: Value = serde_json::from_slice(&body).unwrap_or_default();
    let data = match patch.get("Data") {
        Some(d) if !d.is_null() => match decode_data(d) {
            Ok(b) => Some(b),
            Err(r) => return r.into_response(),
        },
        _ => None,
    };
    let mut s = sim.state.lock().unwrap();
    let space = match space_id(&s, &space) {
        Ok(x) => x,
        Err(r) => return r.into_response(),
    };
    let target = patch["TargetID"].as_str().map(str::to_owned);
    if let Some(t) = &target
        && t != "00000000-0000-0000-0000-000000000000"
        && s.target(t).is_none()
    {
        return error(404, "target not found");
    }
    let Some(u) = s.unit_mut(&space, &unit) else {
        return error(404, "unit not found");
    };
    if let Some(t) = target {
        u.target_id = (t != "00000000-0000-0000-0000-000000000000").then_some(t);
    }
    if let Some(d) = data
        && d != u.head().data
    {
        let num = u.head().num + 1;
        u.revisions.push(Revision {
            num,
            data: d,
            created_at: now(),
        });
    }
    if let Some(l) = patch.get("Labels").filter(|l| l.is_object()) {
        u.labels = serde_json::from_value(l.clone()).unwrap_or_default();
    }
    u.version += 1;
    ok(u.json())
}

async fn queue(
    sim: &Sim,
    h: &HeaderMap,
    space: &str,
    unit: &str,
    action: &str,
    dry_run: bool,
) -> Reply {
    if let Err(r) = sim.operator(h) {
        return r.into_response();
    }
    let op: Result<Operation, (u16, String)> = {
        let mut s = sim.state.lock().unwrap();
        match space_id(&s, space) {
            Ok(space) => s.enqueue(&space, unit, action, dry_run, None),
            Err(r) => return r.into_response(),
        }
    };
    sim.changed.notify_waiters();
    match op {
        Ok(op) => ok(op.json()),
        Err((code, m)) => error(code, m),
    }
}

async fn apply(
    AxState(sim): S,
    Path((space, unit)): Path<(String, String)>,
    h: HeaderMap,
    Query(q): Query<ListQuery>,
) -> Reply {
    queue(&sim, &h, &space, &unit, "Apply", q.dry_run.unwrap_or(false)).await
}

async fn destroy(
    AxState(sim): S,
    Path((space, unit)): Path<(String, String)>,
    h: HeaderMap,
    Query(q): Query<ListQuery>,
) -> Reply {
    queue(
        &sim,
        &h,
        &space,
        &unit,
        "Destroy",
        q.dry_run.unwrap_or(false),
    )
    .await
}

async fn refresh(
    AxState(sim): S,
    Path((space, unit)): Path<(String, String)>,
    h: HeaderMap,
    Query(q): Query<ListQuery>,
) -> Reply {
    queue(
        &sim,
        &h,
        &space,
        &unit,
        "Refresh",
        q.dry_run.unwrap_or(false),
    )
    .await
}

/// `POST /api/unit/cancel?where=UnitID='…'`: cancels each unit's running
/// operation.
async fn cancel(AxState(sim): S, h: HeaderMap, Query(q): Query<ListQuery>) -> Reply {
    if let Err(r) = sim.operator(&h) {
        return r.into_response();
    }
    let w = parse_where(&q.filter);
    let mut out = Vec::new();
    {
        let mut s = sim.state.lock().unwrap();
        let units: Vec<(String, String)> = s
            .units
            .iter()
            .filter(|u| w.get("UnitID").is_none_or(|v| *v == u.id))
            .map(|u| (u.space_id.clone(), u.id.clone()))
            .collect();
        for (space, unit) in units {
            let running = s
                .operations
                .iter()
                .rev()
                .find(|o| {
                    o.unit_id == unit
                        && o.cancels.is_none()
                        && matches!(o.status.as_str(), "Pending" | "Delivered" | "Progressing")
                })
                .map(|o| o.id.clone());
            if let Some(target) = running
                && let Ok(op) = s.enqueue(&space, &unit, "Cancel", false, Some(target))
            {
                out.push(json!({"Action": op.json()}));
            }
        }
    }
    sim.changed.notify_waiters();
    ok(Value::Array(out))
}

async fn unit_events(
    AxState(sim): S,
    Path((space, unit)): Path<(String, String)>,
    h: HeaderMap,
    Query(q): Query<ListQuery>,
) -> Reply {
    if let Err(r) = sim.operator(&h) {
        return r.into_response();
    }
    let w = parse_where(&q.filter);
    let s = sim.state.lock().unwrap();
    let space = match space_id(&s, &space) {
        Ok(x) => x,
        Err(r) => return r.into_response(),
    };
    let Some(u) = s.unit(&space, &unit) else {
        return error(404, "unit not found");
    };
    let mut events: Vec<_> = s
        .events
        .iter()
        .filter(|e| e.unit_id == u.id)
        .filter(|e| {
            w.get("QueuedOperationID")
                .is_none_or(|v| *v == e.operation_id)
        })
        .collect();
    events.sort_by_key(|e| std::cmp::Reverse(e.seq));
    ok(Value::Array(events.iter().map(|e| e.json()).collect()))
}

async fn get_faults(AxState(sim): S) -> Reply {
    ok(serde_json::to_value(sim.state.lock().unwrap().faults.clone()).unwrap_or_default())
}

async fn put_faults(AxState(sim): S, body: Bytes) -> Reply {
    match serde_json::from_slice::<Faults>(&body) {
        Ok(f) => {
            sim.state.lock().unwrap().faults = f;
            StatusCode::NO_CONTENT.into_response()
        }
        Err(e) => error(400, e.to_string()),
    }
}

async fn drop_streams(AxState(sim): S) -> Reply {
    let _ = sim.drop_streams.send(());
    StatusCode::NO_CONTENT.into_response()
}

async fn steal(AxState(sim): S, Path(id): Path<String>) -> Reply {
    let hold = sim.options.lease_ttl;
    if let Some(w) = sim.state.lock().unwrap().worker_mut(&id) {
        w.lease = Some(Lease {
            claim_token: new_id(),
            expires: Instant::now() + hold,
        });
    }
    StatusCode::NO_CONTENT.into_response()
}
