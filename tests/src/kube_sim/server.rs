//! The HTTP(S) front of kube-sim: routing, discovery, verbs, list
//! pagination, watch streams, bearer-token authentication and fault
//! injection.

use std::collections::{BTreeMap, HashSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Bytes;
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use super::controllers;
use super::errors::ApiError;
use super::registry::{ResourceType, version_priority};
use super::selector::{FieldSelector, LabelSelector};
use super::store::{Event, State, WriteOpts};
use super::tls;

type Body = BoxBody<Bytes, Infallible>;

/// Tuning of a simulated cluster.
#[derive(Clone, Debug)]
pub struct SimOptions {
    /// Serve HTTPS with a generated CA (the kubeconfig carries it).
    pub tls: bool,
    /// Require this bearer token.
    pub token: Option<String>,
    /// Delay before a new CRD is Established.
    pub crd_delay: Duration,
    /// Delay before workloads report their rollout done.
    pub rollout_delay: Duration,
    /// Delay before custom resources get Synced/Ready conditions.
    pub cr_delay: Duration,
    /// Watch events retained for resuming watches (older: 410 Gone).
    pub history: usize,
    /// Interval of watch bookmarks.
    pub bookmark_interval: Duration,
}

impl Default for SimOptions {
    fn default() -> Self {
        Self {
            tls: true,
            token: None,
            crd_delay: Duration::from_millis(50),
            rollout_delay: Duration::from_millis(100),
            cr_delay: Duration::from_millis(100),
            history: 10_000,
            bookmark_interval: Duration::from_secs(10),
        }
    }
}

/// Faults to inject, changeable while the simulator runs (from tests, or
/// through the binary's control endpoint).
#[derive(Default)]
pub struct Faults {
    latency_ms: AtomicU64,
    /// Per-mille of requests answered 503.
    error_per_mille: AtomicU64,
    down: AtomicBool,
    /// Requests answered 503 by rule: (method, path substring).
    failing: Mutex<Vec<FailRule>>,
    drop_watches: Mutex<Option<broadcast::Sender<()>>>,
    kill_connections: Mutex<Option<broadcast::Sender<()>>>,
}

/// Requests with this method (any when empty) whose path and query contain
/// `path` fail with 503 ServiceUnavailable.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FailRule {
    #[serde(default)]
    pub method: String,
    pub path: String,
}

/// The fault settings as the control endpoint reads and writes them.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct FaultSettings {
    #[serde(default)]
    pub latency_ms: u64,
    #[serde(default)]
    pub error_rate: f64,
    #[serde(default)]
    pub down: bool,
    #[serde(default)]
    pub fail: Vec<FailRule>,
}

impl Faults {
    /// Makes matching requests fail with 503 (see [`FailRule`]).
    pub fn fail(&self, method: &str, path: &str) {
        self.failing.lock().unwrap().push(FailRule {
            method: method.into(),
            path: path.into(),
        });
    }

    pub fn clear_failures(&self) {
        self.failing.lock().unwrap().clear();
    }

    fn fails(&self, method: &Method, path_and_query: &str) -> bool {
        self.failing.lock().unwrap().iter().any(|r| {
            (r.method.is_empty() || r.method.eq_ignore_ascii_case(method.as_str()))
                && path_and_query.contains(&r.path)
        })
    }

    /// The current settings.
    pub fn settings(&self) -> FaultSettings {
        FaultSettings {
            latency_ms: self.latency_ms.load(Ordering::Relaxed),
            error_rate: self.error_per_mille.load(Ordering::Relaxed) as f64 / 1000.0,
            down: self.is_down(),
            fail: self.failing.lock().unwrap().clone(),
        }
    }

    /// Replaces every setting at once.
    pub fn apply(&self, s: &FaultSettings) {
        self.set_latency(Duration::from_millis(s.latency_ms));
        self.set_error_rate(s.error_rate);
        *self.failing.lock().unwrap() = s.fail.clone();
        self.set_down(s.down);
    }

    pub fn set_latency(&self, d: Duration) {
        self.latency_ms
            .store(d.as_millis() as u64, Ordering::Relaxed);
    }

    /// Fraction (0.0..=1.0) of requests failing with 503 ServiceUnavailable.
    pub fn set_error_rate(&self, rate: f64) {
        self.error_per_mille
            .store((rate.clamp(0.0, 1.0) * 1000.0) as u64, Ordering::Relaxed);
    }

    /// Refuse everything (connections are closed), as a dead API server.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::Relaxed);
        if down && let Some(tx) = self.kill_connections.lock().unwrap().as_ref() {
            let _ = tx.send(());
        }
    }

    pub fn is_down(&self) -> bool {
        self.down.load(Ordering::Relaxed)
    }

    /// Ends every open watch stream now.
    pub fn drop_watches(&self) {
        if let Some(tx) = self.drop_watches.lock().unwrap().as_ref() {
            let _ = tx.send(());
        }
    }
}

pub(crate) struct Inner {
    pub state: Arc<Mutex<State>>,
    pub options: SimOptions,
    pub faults: Arc<Faults>,
    pub addr: SocketAddr,
    drop_watches: broadcast::Sender<()>,
    /// Something was written: the controllers look.
    pub changed: tokio::sync::Notify,
    /// Non-dry-run writes (create, update, patch, apply, delete) per
    /// object: `apiVersion/plural/namespace/name`.
    writes: Mutex<BTreeMap<String, u64>>,
}

/// A fresh store with the namespaces every cluster has.
fn seeded_state(history: usize) -> State {
    let mut state = State::new(history);
    for ns in ["default", "kube-system", "kube-public"] {
        let ty = state.find_type("", "v1", "namespaces").expect("namespaces");
        let _ = state.create(
            &ty,
            "",
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
            &WriteOpts {
                manager: "kube-apiserver".into(),
                ..WriteOpts::default()
            },
        );
    }
    state
}

fn write_key(api_version: &str, plural: &str, namespace: &str, name: &str) -> String {
    format!("{api_version}/{plural}/{namespace}/{name}")
}

/// A running simulated cluster.
pub struct KubeSim {
    inner: Arc<Inner>,
    ca_pem: Option<String>,
    shutdown: CancellationToken,
}

impl KubeSim {
    /// Starts a simulated cluster on `127.0.0.1:0`.
    pub async fn start(options: SimOptions) -> anyhow::Result<KubeSim> {
        Self::start_on("127.0.0.1:0".parse()?, options).await
    }

    pub async fn start_on(addr: SocketAddr, options: SimOptions) -> anyhow::Result<KubeSim> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let tls = if options.tls {
            Some(tls::generate()?)
        } else {
            None
        };
        let state = seeded_state(options.history);
        let (drop_watches, _) = broadcast::channel(4);
        let (kill, _) = broadcast::channel(4);
        let faults = Arc::new(Faults::default());
        *faults.drop_watches.lock().unwrap() = Some(drop_watches.clone());
        *faults.kill_connections.lock().unwrap() = Some(kill.clone());
        let inner = Arc::new(Inner {
            state: Arc::new(Mutex::new(state)),
            options,
            faults,
            addr,
            drop_watches,
            writes: Mutex::default(),
            changed: tokio::sync::Notify::new(),
        });
        let shutdown = CancellationToken::new();
        tokio::spawn(controllers::run(inner.clone(), shutdown.clone()));
        let acceptor = tls
            .as_ref()
            .map(|t| tokio_rustls::TlsAcceptor::from(t.server.clone()));
        let serve_inner = inner.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = tokio::select! {
                    r = listener.accept() => match r { Ok(c) => c, Err(_) => continue },
                    () = stop.cancelled() => break,
                };
                if serve_inner.faults.is_down() {
                    drop(tcp);
                    continue;
                }
                let _ = tcp.set_nodelay(true);
                let inner = serve_inner.clone();
                let acceptor = acceptor.clone();
                let mut kill_rx = kill.subscribe();
                let stop = stop.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let inner = inner.clone();
                        async move { Ok::<_, Infallible>(handle(inner, req).await) }
                    });
                    let builder =
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    let serve = async {
                        match acceptor {
                            Some(a) => {
                                if let Ok(tls) = a.accept(tcp).await {
                                    let _ = builder.serve_connection(TokioIo::new(tls), svc).await;
                                }
                            }
                            None => {
                                let _ = builder.serve_connection(TokioIo::new(tcp), svc).await;
                            }
                        }
                    };
                    tokio::select! {
                        () = serve => {}
                        _ = kill_rx.recv() => {}
                        () = stop.cancelled() => {}
                    }
                });
            }
        });
        Ok(KubeSim {
            ca_pem: tls.map(|t| t.ca_pem),
            inner,
            shutdown,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    pub fn url(&self) -> String {
        let scheme = if self.ca_pem.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", self.inner.addr)
    }

    pub fn faults(&self) -> &Faults {
        &self.inner.faults
    }

    /// A kubeconfig for this cluster (CA and token embedded).
    pub fn kubeconfig(&self, name: &str) -> String {
        let mut cluster = json!({"server": self.url()});
        if let Some(ca) = &self.ca_pem {
            cluster["certificate-authority-data"] =
                json!(base64::engine::general_purpose::STANDARD.encode(ca));
        }
        // kubectl prompts for a password when a user has no credential at
        // all; without required auth any token is accepted.
        let token = self
            .inner
            .options
            .token
            .clone()
            .unwrap_or_else(|| "kube-sim".into());
        let user = json!({"token": token});
        let cfg = json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": name, "cluster": cluster}],
            "users": [{"name": name, "user": user}],
            "contexts": [{"name": name, "context": {"cluster": name, "user": name}}],
            "current-context": name,
        });
        serde_saphyr::to_string(&cfg).unwrap_or_default()
    }

    /// A `kube` client for this cluster, built from its kubeconfig.
    pub async fn client(&self) -> anyhow::Result<kube::Client> {
        let kc: kube::config::Kubeconfig = serde_saphyr::from_str(&self.kubeconfig("kube-sim"))?;
        let config =
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await?;
        Ok(kube::Client::try_from(config)?)
    }

    /// Runs `f` on the simulator's state (for test set-up and inspection).
    pub(crate) fn with_state<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let r = f(&mut self.inner.state.lock().unwrap());
        // The state may have changed: the controllers look.
        self.inner.changed.notify_one();
        r
    }

    /// Forgets watch history so resuming from an older version gets 410.
    pub fn compact(&self) {
        self.with_state(State::compact);
    }

    /// The cluster as restored empty (a new control plane, or a restore of
    /// an old backup): every object gone, the built-in namespaces back,
    /// watches ended (resource versions keep growing, older ones get 410).
    pub fn reset(&self) {
        reset(&self.inner);
    }

    /// Non-dry-run writes the simulator served for one object (by
    /// apiVersion, plural, namespace (empty for cluster-scoped) and name).
    pub fn writes(&self, api_version: &str, plural: &str, namespace: &str, name: &str) -> u64 {
        self.inner
            .writes
            .lock()
            .unwrap()
            .get(&write_key(api_version, plural, namespace, name))
            .copied()
            .unwrap_or(0)
    }

    /// Non-dry-run writes served in all.
    pub fn total_writes(&self) -> u64 {
        self.inner.writes.lock().unwrap().values().sum()
    }

    /// Serves the control endpoint (plain HTTP) on `addr`: `GET`/`PUT
    /// /faults` ([`FaultSettings`] as JSON), `POST /drop-watches`, `POST
    /// /reset`, `GET /writes`. Returns the bound address.
    pub async fn serve_control(&self, addr: SocketAddr) -> anyhow::Result<SocketAddr> {
        let listener = TcpListener::bind(addr).await?;
        let bound = listener.local_addr()?;
        let inner = self.inner.clone();
        let stop = self.shutdown.clone();
        let app = control_router(inner);
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await;
        });
        Ok(bound)
    }

    /// The current cluster-wide resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.with_state(|s| s.rv)
    }

    /// A stored object as JSON (test inspection), by apiVersion, plural,
    /// namespace (empty for cluster-scoped) and name.
    pub fn object(
        &self,
        api_version: &str,
        plural: &str,
        namespace: &str,
        name: &str,
    ) -> Option<Value> {
        let (g, v) = api_version.rsplit_once('/').unwrap_or(("", api_version));
        self.with_state(|s| {
            let ty = s.find_type(g, v, plural)?;
            s.get(&ty, namespace, name).ok()
        })
    }

    pub fn stop(&self) {
        self.shutdown.cancel();
    }
}

impl Drop for KubeSim {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn reset(inner: &Inner) {
    {
        let mut state = inner.state.lock().unwrap();
        let rv = state.rv;
        *state = seeded_state(inner.options.history);
        state.rv = state.rv.max(rv + 1);
        state.compacted = rv;
    }
    inner.changed.notify_one();
    let _ = inner.drop_watches.send(());
}

fn control_router(inner: Arc<Inner>) -> axum::Router {
    use axum::routing::{get, post};
    let faults = inner.faults.clone();
    let put_faults = inner.faults.clone();
    let drop = inner.clone();
    let writes = inner.clone();
    axum::Router::new()
        .route(
            "/faults",
            get(move || {
                let f = faults.clone();
                async move { axum::Json(f.settings()) }
            })
            .put(move |axum::Json(s): axum::Json<FaultSettings>| {
                let f = put_faults.clone();
                async move {
                    f.apply(&s);
                    axum::Json(f.settings())
                }
            }),
        )
        .route(
            "/drop-watches",
            post(move || {
                let i = drop.clone();
                async move {
                    i.faults.drop_watches();
                    "ok\n"
                }
            }),
        )
        .route(
            "/reset",
            post(move || {
                let i = inner.clone();
                async move {
                    reset(&i);
                    "ok\n"
                }
            }),
        )
        .route(
            "/writes",
            get(move || {
                let i = writes.clone();
                async move { axum::Json(i.writes.lock().unwrap().clone()) }
            }),
        )
}

fn full(status: StatusCode, content_type: &str, body: Vec<u8>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .body(Full::new(Bytes::from(body)).boxed())
        .expect("valid response")
}

fn json_response(status: u16, v: &Value) -> Response<Body> {
    full(
        StatusCode::from_u16(status).unwrap_or(StatusCode::OK),
        "application/json",
        serde_json::to_vec(v).unwrap_or_default(),
    )
}

fn error(e: &ApiError) -> Response<Body> {
    let mut r = json_response(e.code, &e.status());
    if e.code == 429 {
        r.headers_mut()
            .insert(header::RETRY_AFTER, http::HeaderValue::from_static("1"));
    }
    r
}

fn not_found_page() -> Response<Body> {
    full(
        StatusCode::NOT_FOUND,
        "text/plain; charset=utf-8",
        b"404 page not found\n".to_vec(),
    )
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = (b[i] == b'%' && i + 2 < b.len())
            .then(|| {
                std::str::from_utf8(&b[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
            })
            .flatten();
        match (b[i], hex) {
            (_, Some(x)) => {
                out.push(x);
                i += 3;
            }
            (b'+', None) => {
                out.push(b' ');
                i += 1;
            }
            (c, None) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn query(req: &Request<Incoming>) -> BTreeMap<String, String> {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

/// What a request addresses.
struct Target {
    ty: ResourceType,
    namespace: String,
    name: Option<String>,
    sub: Option<String>,
}

async fn handle(inner: Arc<Inner>, req: Request<Incoming>) -> Response<Body> {
    let f = &inner.faults;
    let latency = f.latency_ms.load(Ordering::Relaxed);
    if latency > 0 {
        tokio::time::sleep(Duration::from_millis(latency)).await;
    }
    if f.is_down() {
        return error(&ApiError::new(
            503,
            "ServiceUnavailable",
            "the server is currently unable to handle the request",
        ));
    }
    let rate = f.error_per_mille.load(Ordering::Relaxed);
    let path_and_query = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    if (rate > 0 && u64::from(rand::random::<u16>() % 1000) < rate)
        || f.fails(req.method(), &path_and_query)
    {
        return error(&ApiError::new(
            503,
            "ServiceUnavailable",
            "the server is currently unable to handle the request",
        ));
    }
    if let Some(token) = &inner.options.token {
        let ok = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|t| t == token);
        if !ok {
            return error(&ApiError::new(401, "Unauthorized", "Unauthorized"));
        }
    }
    let path = req.uri().path().trim_end_matches('/').to_owned();
    let segs: Vec<String> = path
        .split('/')
        .filter(|s| !s.is_empty())
        .map(decode)
        .collect();
    let segs: Vec<&str> = segs.iter().map(String::as_str).collect();
    if req.method() == Method::GET {
        let aggregated = req
            .headers()
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|accept| {
                accept.split(',').any(|t| {
                    let params: Vec<&str> = t.split(';').map(str::trim).collect();
                    params.contains(&"g=apidiscovery.k8s.io")
                        && params.contains(&"as=APIGroupDiscoveryList")
                        && (params.contains(&"v=v2") || params.contains(&"v=v2beta1"))
                })
            });
        let doc = if aggregated {
            aggregated_discovery(&inner, &segs)
        } else {
            None
        };
        if let Some(r) = doc.or_else(|| discovery(&inner, &segs)) {
            return r;
        }
    }
    let (group, version, rest) = match segs.as_slice() {
        ["api", "v1", rest @ ..] if !rest.is_empty() => ("", "v1", rest),
        ["apis", g, v, rest @ ..] if !rest.is_empty() => (*g, *v, rest),
        _ => return not_found_page(),
    };
    let target = {
        let state = inner.state.lock().unwrap();
        resolve(&state, group, version, rest)
    };
    let Some(target) = target else {
        return not_found_page();
    };
    let q = query(&req);
    let method = req.method().clone();
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or("").trim().to_owned())
        .unwrap_or_default();
    let user_agent = req
        .headers()
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("unknown")
        .to_owned();
    if content_type.contains("protobuf") {
        return error(&ApiError::new(
            415,
            "UnsupportedMediaType",
            "the body of the request was in an unknown format - accepted media types include: application/json, application/yaml",
        ));
    }
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return error(&ApiError::bad_request("cannot read the request body")),
    };
    let manager = q.get("fieldManager").cloned().unwrap_or_default();
    let dry_run = match q.get("dryRun").map(String::as_str) {
        None | Some("") => false,
        Some("All") => true,
        Some(other) => {
            return error(&ApiError::invalid(
                "PatchOptions.meta.k8s.io",
                "",
                "dryRun",
                "FieldValueNotSupported",
                &format!("Unsupported value: \"{other}\": supported values: \"All\""),
            ));
        }
    };
    let force = q.get("force").is_some_and(|v| v == "true");
    let opts = |manager: String| WriteOpts {
        manager,
        dry_run,
        force,
        subresource: target.sub.clone(),
    };
    let update_manager = if manager.is_empty() {
        user_agent.split('/').next().unwrap_or("unknown").to_owned()
    } else {
        manager.clone()
    };
    let parse_body = |b: &Bytes| -> Result<Value, ApiError> {
        if b.is_empty() {
            return Ok(json!({}));
        }
        serde_json::from_slice(b).or_else(|_| {
            let s = std::str::from_utf8(b)
                .map_err(|_| ApiError::bad_request("the body is not UTF-8"))?;
            serde_saphyr::from_str::<Value>(s)
                .map_err(|e| ApiError::bad_request(format!("error decoding YAML: {e}")))
        })
    };
    let ty = &target.ty;
    let ns = target.namespace.as_str();
    let write = matches!(
        method,
        Method::POST | Method::PUT | Method::PATCH | Method::DELETE
    ) && !dry_run;
    let created_name = body_name(&body);
    let name_for_count = target.name.clone().or(created_name);
    let api_version = if ty.group.is_empty() {
        ty.version.clone()
    } else {
        format!("{}/{}", ty.group, ty.version)
    };
    let (plural, count_ns) = (ty.plural.clone(), ns.to_owned());
    let response = 'resp: {
        match (method, target.name.as_deref()) {
            (Method::GET, None) if q.get("watch").is_some_and(|w| w == "true" || w == "1") => {
                watch(inner.clone(), target, &q).await
            }
            (Method::GET, None) => list(&inner, &target, &q),
            (Method::GET, Some(name)) => {
                let s = inner.state.lock().unwrap();
                match s.get(ty, ns, name) {
                    Ok(o) => json_response(200, &o),
                    Err(e) => error(&e),
                }
            }
            (Method::POST, None) => {
                let body = match parse_body(&body) {
                    Ok(b) => b,
                    Err(e) => break 'resp error(&e),
                };
                let r = inner
                    .state
                    .lock()
                    .unwrap()
                    .create(ty, ns, body, &opts(update_manager));
                match r {
                    Ok(o) => json_response(201, &o),
                    Err(e) => error(&e),
                }
            }
            (Method::PUT, Some(name)) => {
                let body = match parse_body(&body) {
                    Ok(b) => b,
                    Err(e) => break 'resp error(&e),
                };
                if target.sub.as_deref() == Some("finalize") {
                    // Namespace finalize: replace spec.finalizers.
                    let mut s = inner.state.lock().unwrap();
                    let r = s.get(ty, ns, name).and_then(|mut live| {
                        live["spec"]["finalizers"] = body["spec"]["finalizers"].clone();
                        let o = WriteOpts {
                            manager: update_manager.clone(),
                            dry_run,
                            force: false,
                            subresource: None,
                        };
                        s.replace(ty, ns, name, live, &o)
                    });
                    break 'resp match r {
                        Ok(o) => json_response(200, &o),
                        Err(e) => error(&e),
                    };
                }
                let r =
                    inner
                        .state
                        .lock()
                        .unwrap()
                        .replace(ty, ns, name, body, &opts(update_manager));
                match r {
                    Ok(o) => json_response(200, &o),
                    Err(e) => error(&e),
                }
            }
            (Method::PATCH, Some(name)) => {
                let parsed = match parse_body(&body) {
                    Ok(b) => b,
                    Err(e) => break 'resp error(&e),
                };
                if content_type == "application/apply-patch+yaml" {
                    let r = inner
                        .state
                        .lock()
                        .unwrap()
                        .apply(ty, ns, name, parsed, &opts(manager));
                    break 'resp match r {
                        Ok((o, created)) => json_response(if created { 201 } else { 200 }, &o),
                        Err(e) => error(&e),
                    };
                }
                let r = inner.state.lock().unwrap().patch(
                    ty,
                    ns,
                    name,
                    &content_type,
                    &parsed,
                    &opts(update_manager),
                );
                match r {
                    Ok(o) => json_response(200, &o),
                    Err(e) => error(&e),
                }
            }
            (Method::DELETE, Some(name)) => {
                let mut options = parse_body(&body).unwrap_or_else(|_| json!({}));
                if let Some(p) = q.get("propagationPolicy") {
                    options["propagationPolicy"] = json!(p);
                }
                let r = inner
                    .state
                    .lock()
                    .unwrap()
                    .delete(ty, ns, name, &options, dry_run);
                match r {
                    Ok(o) => json_response(200, &o),
                    Err(e) => error(&e),
                }
            }
            (Method::DELETE, None) => {
                let sel =
                    match LabelSelector::parse(q.get("labelSelector").map_or("", String::as_str)) {
                        Ok(s) => s,
                        Err(e) => break 'resp error(&e),
                    };
                let mut s = inner.state.lock().unwrap();
                let names: Vec<String> = s
                    .list(ty, ty.namespaced.then_some(ns))
                    .into_iter()
                    .filter(|o| sel.matches(o["metadata"]["labels"].as_object()))
                    .filter_map(|o| o["metadata"]["name"].as_str().map(str::to_owned))
                    .collect();
                for n in &names {
                    let _ = s.delete(ty, ns, n, &json!({}), dry_run);
                }
                json_response(
                    200,
                    &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}),
                )
            }
            _ => error(&ApiError::new(
                405,
                "MethodNotAllowed",
                "the server does not allow this method on the requested resource",
            )),
        }
    };
    if write && response.status().is_success() {
        inner.changed.notify_one();
    }
    if write
        && response.status().is_success()
        && let Some(name) = name_for_count
    {
        *inner
            .writes
            .lock()
            .unwrap()
            .entry(write_key(&api_version, &plural, &count_ns, &name))
            .or_default() += 1;
    }
    response
}

/// `metadata.name` of a request body (JSON or YAML), if any.
fn body_name(body: &Bytes) -> Option<String> {
    let v: Value = serde_json::from_slice(body)
        .ok()
        .or_else(|| serde_saphyr::from_str(std::str::from_utf8(body).ok()?).ok())?;
    v["metadata"]["name"].as_str().map(str::to_owned)
}

fn resolve(state: &State, group: &str, version: &str, rest: &[&str]) -> Option<Target> {
    let t = |plural: &str| state.find_type(group, version, plural);
    match rest {
        ["namespaces", ns, plural, tail @ ..]
            if t(plural).is_some_and(|x| x.namespaced) && tail.len() <= 2 =>
        {
            let ty = t(plural)?;
            let sub = tail.get(1).map(|s| (*s).to_owned());
            if sub
                .as_deref()
                .is_some_and(|s| s != "status" || !ty.status_subresource)
            {
                return None;
            }
            Some(Target {
                ty,
                namespace: (*ns).to_owned(),
                name: tail.first().map(|s| (*s).to_owned()),
                sub,
            })
        }
        [plural, tail @ ..] if tail.len() <= 2 => {
            let ty = t(plural)?;
            let sub = tail.get(1).map(|s| (*s).to_owned());
            let allowed = match sub.as_deref() {
                None => true,
                Some("status") => ty.status_subresource,
                Some("finalize") => ty.kind == "Namespace",
                _ => false,
            };
            if !allowed || (ty.namespaced && !tail.is_empty()) {
                return None;
            }
            Some(Target {
                ty,
                namespace: String::new(),
                name: tail.first().map(|s| (*s).to_owned()),
                sub,
            })
        }
        _ => None,
    }
}

fn discovery(inner: &Inner, segs: &[&str]) -> Option<Response<Body>> {
    let state = inner.state.lock().unwrap();
    let v = match segs {
        ["version"] => json!({
            "major": "1", "minor": "32", "gitVersion": "v1.32.0-kube-sim", "gitCommit": "kube-sim",
            "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z", "goVersion": "go1.23",
            "compiler": "gc", "platform": "linux/amd64"
        }),
        ["api"] => json!({
            "kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": inner.addr.to_string()}]
        }),
        ["api", "v1"] => json!({
            "kind": "APIResourceList", "groupVersion": "v1",
            "resources": state.types.iter().filter(|t| t.group.is_empty()).flat_map(ResourceType::discovery).collect::<Vec<_>>()
        }),
        ["apis"] => {
            let groups: Vec<Value> = groups(&state)
                .into_iter()
                .map(|(g, vs)| group_json(&g, &vs))
                .collect();
            json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
        }
        ["apis", g] => {
            let (name, vs) = groups(&state).into_iter().find(|(n, _)| n == g)?;
            let mut v = group_json(&name, &vs);
            v["kind"] = json!("APIGroup");
            v["apiVersion"] = json!("v1");
            v
        }
        ["apis", g, ver] => {
            let res: Vec<Value> = state
                .types
                .iter()
                .filter(|t| t.group == *g && t.version == *ver)
                .flat_map(ResourceType::discovery)
                .collect();
            if res.is_empty() {
                return None;
            }
            json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": format!("{g}/{ver}"), "resources": res})
        }
        _ => return None,
    };
    Some(json_response(200, &v))
}

/// Aggregated discovery (`/api`, `/apis` with the apidiscovery Accept type),
/// as kubectl 1.32 and `Discovery::run_aggregated` ask for it.
fn aggregated_discovery(inner: &Inner, segs: &[&str]) -> Option<Response<Body>> {
    let state = inner.state.lock().unwrap();
    let group_items = |names: Vec<(String, Vec<String>)>| -> Vec<Value> {
        names
            .into_iter()
            .map(|(g, versions)| {
                let versions: Vec<Value> = versions
                    .iter()
                    .map(|v| {
                        let resources: Vec<Value> = state
                            .types
                            .iter()
                            .filter(|t| t.group == g && t.version == *v)
                            .map(ResourceType::aggregated)
                            .collect();
                        json!({"version": v, "freshness": "Current", "resources": resources})
                    })
                    .collect();
                json!({"metadata": {"name": g}, "versions": versions})
            })
            .collect()
    };
    let items = match segs {
        ["api"] => group_items(vec![(String::new(), vec!["v1".to_owned()])]),
        ["apis"] => group_items(groups(&state)),
        _ => return None,
    };
    let body = json!({"kind": "APIGroupDiscoveryList", "apiVersion": "apidiscovery.k8s.io/v2", "metadata": {}, "items": items});
    let mut r = json_response(200, &body);
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static(
            "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList",
        ),
    );
    r.headers_mut()
        .insert(header::VARY, http::HeaderValue::from_static("Accept"));
    Some(r)
}

fn groups(state: &State) -> Vec<(String, Vec<String>)> {
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    for t in state.types.iter().filter(|t| !t.group.is_empty()) {
        match out.iter_mut().find(|(g, _)| *g == t.group) {
            Some((_, vs)) => {
                if !vs.contains(&t.version) {
                    vs.push(t.version.clone());
                }
            }
            None => out.push((t.group.clone(), vec![t.version.clone()])),
        }
    }
    for (_, vs) in &mut out {
        vs.sort_by_key(|v| std::cmp::Reverse(version_priority(v)));
    }
    out
}

fn group_json(name: &str, versions: &[String]) -> Value {
    let vs: Vec<Value> = versions
        .iter()
        .map(|v| json!({"groupVersion": format!("{name}/{v}"), "version": v}))
        .collect();
    json!({"name": name, "versions": vs, "preferredVersion": vs[0]})
}

fn selectors(
    target: &Target,
    q: &BTreeMap<String, String>,
) -> Result<(LabelSelector, FieldSelector), ApiError> {
    Ok((
        LabelSelector::parse(q.get("labelSelector").map_or("", String::as_str))?,
        FieldSelector::parse(
            q.get("fieldSelector").map_or("", String::as_str),
            target.ty.namespaced,
        )?,
    ))
}

fn list_kind(ty: &ResourceType) -> String {
    format!("{}List", ty.kind)
}

fn list(inner: &Inner, target: &Target, q: &BTreeMap<String, String>) -> Response<Body> {
    let (labels, fields) = match selectors(target, q) {
        Ok(s) => s,
        Err(e) => return error(&e),
    };
    let state = inner.state.lock().unwrap();
    let ty = &target.ty;
    let ns = (ty.namespaced && !target.namespace.is_empty()).then_some(target.namespace.as_str());
    let mut items: Vec<Value> = state
        .list(ty, ns)
        .into_iter()
        .filter(|o| labels.matches(o["metadata"]["labels"].as_object()) && fields.matches(o))
        .collect();
    let mut rv = state.rv;
    // Continue tokens: base64 JSON {rv, start}.
    if let Some(token) = q.get("continue").filter(|t| !t.is_empty()) {
        let parsed = base64::engine::general_purpose::STANDARD
            .decode(token)
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok());
        let Some(parsed) = parsed else {
            return error(&ApiError::bad_request(format!(
                "invalid continue token: {token}"
            )));
        };
        let token_rv = parsed["rv"].as_u64().unwrap_or(0);
        if token_rv <= state.compacted {
            return error(&ApiError::gone(
                "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.",
            ));
        }
        rv = token_rv;
        let start = parsed["start"].as_str().unwrap_or_default().to_owned();
        items.retain(|o| {
            let k = format!(
                "{}/{}",
                o["metadata"]["namespace"].as_str().unwrap_or(""),
                o["metadata"]["name"].as_str().unwrap_or("")
            );
            k > start
        });
    }
    let mut meta = json!({"resourceVersion": rv.to_string()});
    if let Some(limit) = q
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .filter(|l| *l > 0)
        && items.len() > limit
    {
        items.truncate(limit);
        let last = items.last().expect("non-empty");
        let start = format!(
            "{}/{}",
            last["metadata"]["namespace"].as_str().unwrap_or(""),
            last["metadata"]["name"].as_str().unwrap_or("")
        );
        let token = base64::engine::general_purpose::STANDARD
            .encode(json!({"rv": rv, "start": start}).to_string());
        meta["continue"] = json!(token);
    }
    if ty.crd.is_none() {
        for i in &mut items {
            if let Some(o) = i.as_object_mut() {
                o.remove("kind");
                o.remove("apiVersion");
            }
        }
    }
    json_response(
        200,
        &json!({"kind": list_kind(ty), "apiVersion": ty.api_version(), "metadata": meta, "items": items}),
    )
}

fn event_line(kind: &str, object: &Value) -> Bytes {
    let mut s = serde_json::to_vec(&json!({"type": kind, "object": object})).unwrap_or_default();
    s.push(b'\n');
    Bytes::from(s)
}

async fn watch(inner: Arc<Inner>, target: Target, q: &BTreeMap<String, String>) -> Response<Body> {
    let (labels, fields) = match selectors(&target, q) {
        Ok(s) => s,
        Err(e) => return error(&e),
    };
    let ty = target.ty.clone();
    let ns = (ty.namespaced && !target.namespace.is_empty()).then(|| target.namespace.clone());
    let matches_key = {
        let (group, plural, ns) = (ty.group.clone(), ty.plural.clone(), ns.clone());
        move |ev: &Event| {
            ev.key.group == group
                && ev.key.plural == plural
                && ns.as_ref().is_none_or(|n| ev.key.namespace == *n)
        }
    };
    let bookmarks = q.get("allowWatchBookmarks").is_some_and(|v| v == "true");
    let send_initial = q.get("sendInitialEvents").is_some_and(|v| v == "true");
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map(Duration::from_secs);
    let requested = q.get("resourceVersion").cloned().unwrap_or_default();

    let (tx, rx) = mpsc::channel::<Bytes>(256);
    let (mut live, initial, mut last_rv, seen) = {
        let state = inner.state.lock().unwrap();
        let live = state.events.subscribe();
        let mut seen: HashSet<(String, String)> = HashSet::new();
        let mut initial = Vec::new();
        let from_state = requested.is_empty() || requested == "0";
        if from_state {
            for o in state.list(&ty, ns.as_deref()) {
                if labels.matches(o["metadata"]["labels"].as_object()) && fields.matches(&o) {
                    seen.insert((
                        o["metadata"]["namespace"].as_str().unwrap_or("").into(),
                        o["metadata"]["name"].as_str().unwrap_or("").into(),
                    ));
                    initial.push(event_line("ADDED", &o));
                }
            }
            if send_initial {
                initial.push(event_line(
                    "BOOKMARK",
                    &json!({"kind": ty.kind, "apiVersion": ty.api_version(), "metadata": {"resourceVersion": state.rv.to_string(), "annotations": {"k8s.io/initial-events-end": "true"}}}),
                ));
            }
            (live, initial, state.rv, seen)
        } else {
            let Ok(n) = requested.parse::<u64>() else {
                return error(&ApiError::bad_request(format!(
                    "invalid resource version: {requested}"
                )));
            };
            if n > state.rv {
                return error(&ApiError::new(
                    504,
                    "Timeout",
                    format!(
                        "Timeout: Too large resource version: {n}, current: {}",
                        state.rv
                    ),
                ));
            }
            if n < state.compacted {
                let st = ApiError::gone(format!(
                    "too old resource version: {n} ({})",
                    state.compacted + 1
                ))
                .status();
                let line = event_line("ERROR", &st);
                let (etx, erx) = mpsc::channel::<Bytes>(1);
                let _ = etx.try_send(line);
                drop(etx);
                return stream_response(erx);
            }
            // Objects that exist now count as seen for selector transitions.
            for o in state.list(&ty, ns.as_deref()) {
                if labels.matches(o["metadata"]["labels"].as_object()) && fields.matches(&o) {
                    seen.insert((
                        o["metadata"]["namespace"].as_str().unwrap_or("").into(),
                        o["metadata"]["name"].as_str().unwrap_or("").into(),
                    ));
                }
            }
            for ev in state.history.iter().filter(|e| e.rv > n && matches_key(e)) {
                let o = state.at_version(&ev.object, &ty);
                if labels.matches(o["metadata"]["labels"].as_object()) && fields.matches(&o) {
                    initial.push(event_line(ev.kind, &o));
                }
            }
            (live, initial, state.rv.max(n), seen)
        }
    };
    let mut drop_rx = inner.drop_watches.subscribe();
    let interval = inner.options.bookmark_interval;
    let api_version = ty.api_version();
    let kind = ty.kind.clone();
    let state = inner.state.clone();
    tokio::spawn(async move {
        let mut seen = seen;
        for line in initial {
            if tx.send(line).await.is_err() {
                return;
            }
        }
        let deadline = tokio::time::Instant::now() + timeout.unwrap_or(Duration::from_secs(3600));
        let mut ticker = tokio::time::interval(interval);
        ticker.tick().await;
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(deadline) => break,
                _ = drop_rx.recv() => break,
                _ = ticker.tick(), if bookmarks => {
                    let rv = state.lock().unwrap().rv;
                    let b = json!({"kind": kind, "apiVersion": api_version, "metadata": {"resourceVersion": rv.to_string()}});
                    if tx.send(event_line("BOOKMARK", &b)).await.is_err() { break; }
                }
                ev = live.recv() => {
                    // Fell behind: end the stream; the client resumes.
                    let Ok(ev) = ev else { break };
                    if ev.rv <= last_rv || !matches_key(&ev) {
                        continue;
                    }
                    last_rv = ev.rv;
                    let mut o = ev.object.clone();
                    o["apiVersion"] = json!(api_version);
                    let id = (o["metadata"]["namespace"].as_str().unwrap_or("").to_owned(), o["metadata"]["name"].as_str().unwrap_or("").to_owned());
                    let matches = labels.matches(o["metadata"]["labels"].as_object()) && fields.matches(&o);
                    let kind = match (ev.kind, matches, seen.contains(&id)) {
                        ("DELETED", _, true) => { seen.remove(&id); "DELETED" }
                        ("DELETED", _, false) => continue,
                        (_, true, true) => "MODIFIED",
                        (_, true, false) => { seen.insert(id); "ADDED" }
                        (_, false, true) => { seen.remove(&id); "DELETED" }
                        (_, false, false) => continue,
                    };
                    if tx.send(event_line(kind, &o)).await.is_err() { break; }
                }
            }
        }
    });
    stream_response(rx)
}

fn stream_response(rx: mpsc::Receiver<Bytes>) -> Response<Body> {
    let stream =
        tokio_stream::StreamExt::map(tokio_stream::wrappers::ReceiverStream::new(rx), |b| {
            Ok::<_, Infallible>(Frame::data(b))
        });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .expect("valid response")
}
