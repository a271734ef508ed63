//! kube-sim's server: options, fault injection settings, the HTTP(S)
//! listener that serves the API routes ([`super::routes`]), the control
//! endpoint (faults, resets, write counts) and the response helpers every
//! route uses.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use http::{Method, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use super::controllers;
use super::errors::ApiError;
use super::rbac::Account;
use super::routes::api_router;
use super::store::{State, WriteOpts};
use super::tls;

pub(super) type Body = BoxBody<Bytes, Infallible>;

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
    pub(super) latency_ms: AtomicU64,
    /// Per-mille of requests answered 503.
    pub(super) error_per_mille: AtomicU64,
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

    pub(super) fn fails(&self, method: &Method, path_and_query: &str) -> bool {
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
    pub(super) drop_watches: broadcast::Sender<()>,
    /// Something was written: the controllers look.
    pub changed: tokio::sync::Notify,
    /// Non-dry-run writes (create, update, patch, apply, delete) per
    /// object: `apiVersion/plural/namespace/name`.
    pub(super) writes: Mutex<BTreeMap<String, u64>>,
    /// Dry-run writes per object, keyed the same way.
    pub(super) dry_runs: Mutex<BTreeMap<String, u64>>,
    /// Service account tokens minted by
    /// [`KubeSim::service_account_kubeconfig`]: their requests are
    /// authorized by the cluster's RBAC objects.
    pub(super) accounts: Mutex<HashMap<String, Account>>,
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
    // Every cluster's bootstrap ClusterRole for administrators.
    let ty = state
        .find_type("rbac.authorization.k8s.io", "v1", "clusterroles")
        .expect("clusterroles");
    let _ = state.create(
        &ty,
        "",
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": "cluster-admin", "labels": {"kubernetes.io/bootstrapping": "rbac-defaults"}},
            "rules": [
                {"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]},
                {"nonResourceURLs": ["*"], "verbs": ["*"]}
            ]
        }),
        &WriteOpts {
            manager: "kube-apiserver".into(),
            ..WriteOpts::default()
        },
    );
    state
}

pub(super) fn write_key(api_version: &str, plural: &str, namespace: &str, name: &str) -> String {
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
            dry_runs: Mutex::default(),
            accounts: Mutex::default(),
            changed: tokio::sync::Notify::new(),
        });
        let shutdown = CancellationToken::new();
        tokio::spawn(controllers::run(inner.clone(), shutdown.clone()));
        let acceptor = tls
            .as_ref()
            .map(|t| tokio_rustls::TlsAcceptor::from(t.server.clone()));
        let serve_inner = inner.clone();
        let app = api_router(inner.clone());
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
                let svc = hyper_util::service::TowerToHyperService::new(app.clone());
                let acceptor = acceptor.clone();
                let mut kill_rx = kill.subscribe();
                let stop = stop.clone();
                tokio::spawn(async move {
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
        // kubectl prompts for a password when a user has no credential at
        // all; without required auth any token is accepted.
        let token = self
            .inner
            .options
            .token
            .clone()
            .unwrap_or_else(|| "kube-sim".into());
        self.kubeconfig_with(name, &token)
    }

    fn kubeconfig_with(&self, name: &str, token: &str) -> String {
        let mut cluster = json!({"server": self.url()});
        if let Some(ca) = &self.ca_pem {
            cluster["certificate-authority-data"] =
                json!(base64::engine::general_purpose::STANDARD.encode(ca));
        }
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

    /// A kubeconfig acting as the service account `namespace/name`: its
    /// requests are allowed only by the Roles, ClusterRoles and bindings in
    /// this cluster, as the API server's RBAC authorizer allows them (see
    /// [`rbac`](super::rbac)). The account itself need not exist.
    pub fn service_account_kubeconfig(&self, namespace: &str, name: &str) -> String {
        let token = format!("sa-{}", uuid::Uuid::new_v4().simple());
        self.inner.accounts.lock().unwrap().insert(
            token.clone(),
            Account {
                namespace: namespace.into(),
                name: name.into(),
            },
        );
        self.kubeconfig_with(&format!("{namespace}-{name}"), &token)
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

    /// Dry-run writes the simulator served for one object (keyed as
    /// [`KubeSim::writes`]).
    pub fn dry_runs(&self, api_version: &str, plural: &str, namespace: &str, name: &str) -> u64 {
        self.inner
            .dry_runs
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

pub(super) fn full(status: StatusCode, content_type: &str, body: Vec<u8>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .body(Full::new(Bytes::from(body)).boxed())
        .expect("valid response")
}

pub(super) fn json_response(status: u16, v: &Value) -> Response<Body> {
    full(
        StatusCode::from_u16(status).unwrap_or(StatusCode::OK),
        "application/json",
        serde_json::to_vec(v).unwrap_or_default(),
    )
}

pub(super) fn error(e: &ApiError) -> Response<Body> {
    let mut r = json_response(e.code, &e.status());
    if e.code == 429 {
        r.headers_mut()
            .insert(header::RETRY_AFTER, http::HeaderValue::from_static("1"));
    }
    r
}

pub(super) fn not_found_page() -> Response<Body> {
    full(
        StatusCode::NOT_FOUND,
        "text/plain; charset=utf-8",
        b"404 page not found\n".to_vec(),
    )
}
