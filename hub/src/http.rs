//! Plain-HTTP endpoints for probes and scraping: `/healthz` (process is
//! up), `/readyz` (the store takes writes), `/metrics` (Prometheus text format).
//! Nothing else answers without credentials.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use crate::control::Hub;

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
