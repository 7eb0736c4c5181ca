//! Admin HTTP: health, readiness and Prometheus metrics.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use convoy_actors::{EntityKey, EntityKind};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;
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
    pub router: crate::router::Router,
    /// Fault injection endpoints answer only when `chaos.enabled`.
    pub chaos: bool,
}

type JsonReply = (StatusCode, axum::Json<serde_json::Value>);

fn refuse(status: StatusCode, message: String) -> JsonReply {
    (status, axum::Json(json!({ "error": message })))
}

fn entity_key(kind: &str, id: &str) -> Result<EntityKey, JsonReply> {
    let kind = EntityKind::parse(kind).ok_or_else(|| {
        refuse(StatusCode::NOT_FOUND, format!("unknown entity kind {kind:?}: use group, user, ticket or skill_queue"))
    })?;
    EntityKey::parse(kind, id).map_err(|e| refuse(StatusCode::BAD_REQUEST, e.to_string()))
}

/// `POST /v1/chaos/entities/{kind}/{id}/crash`: the entity's actor fails on purpose.
async fn crash_entity(State(s): State<Arc<AdminState>>, Path((kind, id)): Path<(String, String)>) -> JsonReply {
    if !s.chaos {
        return refuse(
            StatusCode::FORBIDDEN,
            "fault injection is disabled on this node: set chaos.enabled = true".into(),
        );
    }
    let key = match entity_key(&kind, &id) {
        Ok(k) => k,
        Err(reply) => return reply,
    };
    let group = s.router.shard_of(&key);
    let Some(host) = s.router.local(group) else {
        return refuse(StatusCode::CONFLICT, format!("{key} lives in {group}, which this node does not hold"));
    };
    let crashed = host.entities().crash(&key);
    (StatusCode::OK, axum::Json(json!({ "entity": key.to_string(), "shard": group.to_string(), "crashed": crashed })))
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
        .route("/v1/chaos/entities/{kind}/{id}/crash", post(crash_entity))
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
