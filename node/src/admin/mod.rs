//! Admin HTTP: health, readiness and Prometheus metrics.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::sync::watch;

/// Where the node is in its life, as `/readyz` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Starting,
    Ready,
    Draining,
}

#[derive(Clone)]
pub struct AdminState {
    pub phase: watch::Receiver<Phase>,
    pub metrics: Option<PrometheusHandle>,
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(s): State<Arc<AdminState>>) -> impl IntoResponse {
    match *s.phase.borrow() {
        Phase::Ready => (StatusCode::OK, "ready\n"),
        Phase::Starting => (StatusCode::SERVICE_UNAVAILABLE, "starting: waiting for shard leaders\n"),
        Phase::Draining => (StatusCode::SERVICE_UNAVAILABLE, "draining: shutting down\n"),
    }
}

async fn prometheus(State(s): State<Arc<AdminState>>) -> impl IntoResponse {
    match &s.metrics {
        Some(h) => (StatusCode::OK, [("content-type", "text/plain; version=0.0.4")], h.render()),
        None => (StatusCode::NOT_FOUND, [("content-type", "text/plain")], "metrics are not enabled\n".to_string()),
    }
}

pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(prometheus))
        .with_state(Arc::new(state))
}

pub async fn serve(addr: SocketAddr, app: Router, mut shutdown: watch::Receiver<bool>) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = shutdown.wait_for(|s| *s).await;
        })
        .await
}
