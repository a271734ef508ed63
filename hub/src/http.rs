//! The HTTP address: probes and scraping without credentials — `/healthz`
//! (process is up), `/readyz` (the store takes writes), `/metrics`
//! (Prometheus text format) — and the dashboard under `/ui` (an operator
//! token's session). Plain HTTP by default (a probe port inside the
//! cluster); `--http-tls` serves it over HTTPS with the hub's certificate.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::control::Hub;

/// Probes, metrics and the dashboard.
pub fn app(hub: Arc<Hub>, secure: bool, stop: CancellationToken) -> Router {
    router(hub.clone()).merge(crate::ui::router(hub, secure, stop))
}

/// Serves `app` on `listener` until `stop`: HTTPS when `tls` is given.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    tls: Option<Arc<rustls::ServerConfig>>,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let Some(tls) = tls else {
        return axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await;
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let tcp = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    // Out of file descriptors, say: do not spin.
                    tracing::debug!(error = %e, "HTTPS accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = stop.cancelled() => return Ok(()),
        };
        let acceptor = acceptor.clone();
        let service = TowerToHyperService::new(app.clone());
        let stop = stop.clone();
        tokio::spawn(async move {
            let handshake =
                tokio::time::timeout(std::time::Duration::from_secs(10), acceptor.accept(tcp));
            let Ok(Ok(stream)) = handshake.await else {
                return;
            };
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            tokio::select! {
                _ = builder.serve_connection_with_upgrades(TokioIo::new(stream), service) => {}
                () = stop.cancelled() => {}
            }
        });
    }
}

/// Probes and metrics: no credentials.
pub fn router(hub: Arc<Hub>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .with_state(hub)
}

/// Ready while the store takes writes (a hub whose database is gone must
/// not receive traffic).
async fn ready(State(hub): State<Arc<Hub>>) -> impl IntoResponse {
    match hub.store.ping().await {
        Ok(()) => (StatusCode::OK, "ready\n"),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "store unavailable\n"),
    }
}

async fn metrics(State(hub): State<Arc<Hub>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        hub.metrics.encode(),
    )
}
