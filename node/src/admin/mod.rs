//! Admin HTTP: health, readiness and Prometheus metrics (open), and the `/v1` API for
//! operators (cluster status, entity lookup, replica reads, fault injection), which needs
//! `Authorization: Bearer <token>` with a token whose roles include `admin`.

mod chaos;
mod status;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use convoy_actors::domain::{self, LogReader};
use convoy_actors::event::WireEntries;
use convoy_actors::principal::Role;
use convoy_actors::{EntityKey, EntityKind};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Deserialize;
use serde_json::json;
pub use status::{ClusterStatus, GroupRow, MemberRow};
use tokio::sync::watch;

use crate::cluster::inbound::meta_command;
use crate::cluster::meta::{ClusterState, MetaCommand};
use crate::cluster::shards::Shards;
use crate::cluster::transport::Transport;
use crate::cluster::view::ClusterView;
use crate::gateway::auth::TokenKeys;
use crate::shard::Leadership;
use crate::store::writer::WriterFaults;

/// Where the node is in its life, as `/readyz` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Starting,
    Ready,
    Draining,
}

/// What the cluster endpoints read.
#[derive(Clone)]
pub struct ClusterHandles {
    pub transport: Arc<Transport>,
    pub view: Arc<ClusterView>,
    pub state: watch::Receiver<Arc<ClusterState>>,
    pub shards: Arc<Shards>,
}

#[derive(Clone)]
pub struct AdminState {
    pub phase: watch::Receiver<Phase>,
    pub metrics: Option<PrometheusHandle>,
    pub router: crate::router::Router,
    pub keys: Arc<TokenKeys>,
    pub cluster: ClusterHandles,
    /// Fault injection endpoints answer only when `chaos.enabled`.
    pub chaos: bool,
    /// The storage writer's fault switches (network faults live in the transport).
    pub storage: Arc<WriterFaults>,
    /// Entities whose figures `/v1/desk` and `/metrics` report.
    pub reported: Vec<EntityKey>,
}

type JsonReply = (StatusCode, axum::Json<serde_json::Value>);

fn refuse(status: StatusCode, message: String) -> JsonReply {
    (status, axum::Json(json!({ "error": message })))
}

/// The `/v1` API is for admins: a bearer token whose roles include `admin`.
fn authorize(s: &AdminState, headers: &HeaderMap) -> Result<(), JsonReply> {
    let unauthorized = |m: &str| refuse(StatusCode::UNAUTHORIZED, m.to_string());
    let header = headers.get(axum::http::header::AUTHORIZATION).ok_or_else(|| {
        unauthorized("send Authorization: Bearer <token>; mint one with: convoy token --user ops --role admin")
    })?;
    let token = header
        .to_str()
        .ok()
        .and_then(|h| h.strip_prefix("Bearer "))
        .ok_or_else(|| unauthorized("the Authorization header must be Bearer <token>"))?;
    let verified = s.keys.verify(token).map_err(|r| unauthorized(&r.message))?;
    if !verified.principal.has(Role::Admin) {
        return Err(refuse(StatusCode::FORBIDDEN, "the token's roles must include admin".into()));
    }
    Ok(())
}

fn entity_key(kind: &str, id: &str) -> Result<EntityKey, JsonReply> {
    let kind = EntityKind::parse(kind).ok_or_else(|| {
        refuse(StatusCode::NOT_FOUND, format!("unknown entity kind {kind:?}: use group, user, ticket or skill_queue"))
    })?;
    EntityKey::parse(kind, id).map_err(|e| refuse(StatusCode::BAD_REQUEST, e.to_string()))
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(s): State<Arc<AdminState>>) -> (StatusCode, String) {
    let phase = *s.phase.borrow();
    match phase {
        Phase::Ready => match meta_stopped(&s) {
            None => (StatusCode::OK, "ready\n".into()),
            Some(why) => (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("restart needed: the metadata group stopped on an error ({why}); restart this node\n"),
            ),
        },
        Phase::Starting => {
            (StatusCode::SERVICE_UNAVAILABLE, "starting: waiting for the cluster and shard leaders\n".into())
        }
        Phase::Draining => (StatusCode::SERVICE_UNAVAILABLE, "draining: shutting down\n".into()),
    }
}

/// Why this node's replica of the metadata group stopped, if it did: unlike a shard, it is
/// not started again in place (see `cluster::shards`), so the node must restart.
pub(crate) fn meta_stopped(s: &AdminState) -> Option<String> {
    s.router.local(crate::shard::RaftGroupId::META).and_then(|meta| meta.stopped())
}

async fn prometheus(State(s): State<Arc<AdminState>>) -> impl IntoResponse {
    match &s.metrics {
        Some(h) => {
            let mut text = h.render();
            render_gauges(&s, &mut text);
            (StatusCode::OK, [("content-type", "text/plain; version=0.0.4")], text)
        }
        None => (StatusCode::NOT_FOUND, [("content-type", "text/plain")], "metrics are not enabled\n".to_string()),
    }
}

/// Appends the figures of the reported entities this node leads: each is reported by
/// exactly one node, its leader, so sums across nodes are right.
fn render_gauges(s: &AdminState, out: &mut String) {
    use std::fmt::Write;
    let mut gauges: Vec<domain::Gauge> = Vec::new();
    for key in &s.reported {
        let Some(host) = s.router.local(s.router.shard_of(key)) else { continue };
        if !matches!(host.leadership(), Leadership::Leading { .. }) {
            continue;
        }
        if let Ok(state) = host.data().state(key) {
            gauges.extend(domain::gauges(key, state.as_deref(), crate::shard::now()));
        }
    }
    gauges.sort_by_key(|g| g.name);
    let mut last = "";
    for g in &gauges {
        if g.name != last {
            let _ = writeln!(out, "# HELP {} {}\n# TYPE {} gauge", g.name, g.help, g.name);
            last = g.name;
        }
        let labels: Vec<String> = g.labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
        let _ = writeln!(out, "{}{{{}}} {}", g.name, labels.join(","), g.value);
    }
}

/// `GET /v1/desk`: the service desk's figures, one entry per skill group.
async fn desk(
    State(s): State<Arc<AdminState>>,
    headers: HeaderMap,
) -> Result<axum::Json<serde_json::Value>, JsonReply> {
    authorize(&s, &headers)?;
    let now = crate::shard::now();
    let asks = s.reported.iter().map(|key| s.router.query(key.clone(), domain::Query::Desk { now }));
    let mut figures = Vec::new();
    for reply in futures::future::join_all(asks).await {
        let reply = reply.map_err(|r| refuse(StatusCode::SERVICE_UNAVAILABLE, r.to_string()))?;
        figures.push(serde_json::to_value(reply.protocol()).unwrap_or_default());
    }
    Ok(axum::Json(json!({ "skill_groups": figures })))
}

/// `GET /v1/cluster`: members, groups, leaders, replication lag.
async fn cluster(State(s): State<Arc<AdminState>>, headers: HeaderMap) -> Result<axum::Json<ClusterStatus>, JsonReply> {
    authorize(&s, &headers)?;
    Ok(axum::Json(status::collect(&s.cluster, &s.router)))
}

/// `POST /v1/cluster/nodes/{name}/drain` and `.../remove`: move every replica off a node
/// (it leaves once it holds none), or forget a node that is gone for good.
async fn node_command(
    State(s): State<Arc<AdminState>>,
    headers: HeaderMap,
    Path((name, action)): Path<(String, String)>,
) -> Result<axum::Json<serde_json::Value>, JsonReply> {
    authorize(&s, &headers)?;
    let state = s.cluster.state.borrow().clone();
    let Some((&node, _)) = state.members.iter().find(|(_, m)| m.addr.name == name) else {
        let names: Vec<&str> = state.members.values().map(|m| m.addr.name.as_str()).collect();
        return Err(refuse(StatusCode::NOT_FOUND, format!("no member named {name:?}; members: {}", names.join(", "))));
    };
    let cmd = match action.as_str() {
        "drain" => MetaCommand::Drain { node },
        "remove" => MetaCommand::Remove { node },
        other => return Err(refuse(StatusCode::NOT_FOUND, format!("unknown action {other:?}: use drain or remove"))),
    };
    let c = &s.cluster;
    meta_command(&c.shards, &c.view, &c.transport, cmd).await.map_err(|e| refuse(StatusCode::CONFLICT, e))?;
    Ok(axum::Json(json!({ "node": name, "action": action, "accepted": true })))
}

/// `GET /v1/entities/{kind}/{id}`: where an entity lives and, if this node holds a replica,
/// its state there.
async fn entity(
    State(s): State<Arc<AdminState>>,
    headers: HeaderMap,
    Path((kind, id)): Path<(String, String)>,
) -> Result<axum::Json<serde_json::Value>, JsonReply> {
    authorize(&s, &headers)?;
    let key = entity_key(&kind, &id)?;
    let group = s.router.shard_of(&key);
    let state = s.cluster.state.borrow().clone();
    let name = |n: u64| state.name_of(n).map_or_else(|| format!("{n:x}"), str::to_string);
    let local = s.router.local(group);
    let (replica_state, active) = match &local {
        Some(host) => {
            let st = host.data().state(&key).map_err(|e| refuse(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
            let active = matches!(host.leadership(), Leadership::Leading { .. }) && host.entities().is_active(&key);
            (st.map(|s| serde_json::to_value(&*s).unwrap_or(serde_json::Value::Null)), Some(active))
        }
        None => (None, None),
    };
    Ok(axum::Json(json!({
        "entity": key.to_string(),
        "shard": group.to_string(),
        "leader": s.router.leader_of(group).map(name),
        "replicas": state.replicas(group).into_iter().map(name).collect::<Vec<_>>(),
        "held_here": local.is_some(),
        "active_here": active,
        "state_here": replica_state,
    })))
}

#[derive(Deserialize)]
struct EntriesQuery {
    #[serde(default)]
    after: u64,
    limit: Option<u32>,
}

/// `GET /v1/replicas/{kind}/{id}/entries?after=&limit=`: the entries this node's replica
/// holds, read locally without any Raft round: what a checker compares across replicas.
async fn replica_entries(
    State(s): State<Arc<AdminState>>,
    headers: HeaderMap,
    Path((kind, id)): Path<(String, String)>,
    Query(q): Query<EntriesQuery>,
) -> Result<axum::Json<serde_json::Value>, JsonReply> {
    authorize(&s, &headers)?;
    let key = entity_key(&kind, &id)?;
    let group = s.router.shard_of(&key);
    let Some(host) = s.router.local(group) else {
        return Err(refuse(StatusCode::NOT_FOUND, format!("{key} lives in {group}, which this node does not hold")));
    };
    let limit = q.limit.unwrap_or(500).clamp(1, 5000);
    let entries =
        host.data().read_entries(&key, q.after, limit).map_err(|e| refuse(StatusCode::INTERNAL_SERVER_ERROR, e.0))?;
    let applied = crate::cluster::shards::report(&host).last_applied;
    Ok(axum::Json(json!({
        "entity": key.to_string(),
        "shard": group.to_string(),
        "applied_index": applied,
        "entries": serde_json::to_value(WireEntries(&entries)).unwrap_or_default(),
    })))
}

pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(prometheus))
        .route("/v1/cluster", get(cluster))
        .route("/v1/desk", get(desk))
        .route("/v1/cluster/nodes/{name}/{action}", post(node_command))
        .route("/v1/entities/{kind}/{id}", get(entity))
        .route("/v1/replicas/{kind}/{id}/entries", get(replica_entries))
        .route("/v1/chaos", get(chaos::faults))
        .route("/v1/chaos/peers/heal", post(chaos::heal_peers))
        .route("/v1/chaos/peers/{name}/{action}", post(chaos::peer_fault))
        .route("/v1/chaos/storage/{action}", post(chaos::storage_fault))
        .route("/v1/chaos/entities/{kind}/{id}/crash", post(chaos::crash_entity))
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
