//! One Convoy node: opens storage, starts its shard hosts, router, gateway and admin
//! server, reports ready, and shuts down in order on SIGTERM.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use convoy_actors::body::BodyLimits;
use convoy_actors::domain::DomainConfig;
use convoy_actors::group::GroupLimits;
use convoy_config::Config;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::admin::{self, Phase};
use crate::entity::{EntityHost, EntityLimits, NodeRuntime};
use crate::gateway::{self, Gateway, GatewayLimits, auth::TokenKeys, hub::Hub};
use crate::router::Router;
use crate::shard::network::NoPeers;
use crate::shard::{Leadership, NodeAddr, NodeId, RaftGroupId, RaftSettings, ShardHost, ShardParts};
use crate::store::{Durability, Store, StoreError, WriterLimits, keys};

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("cannot use data directory {path}: {source}")]
    DataDir { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(
        "data directory {path} belongs to node {found:?}, not {expected:?}: point node.data_dir elsewhere or use the matching node.id"
    )]
    WrongNode { path: PathBuf, found: String, expected: String },
    #[error("no client secret: set auth.secret in the config file or CONVOY_AUTH_SECRET (at least 32 bytes)")]
    NoSecret,
    #[error("cannot listen on {what} address {addr}: {source}")]
    Listen { what: &'static str, addr: std::net::SocketAddr, source: std::io::Error },
    #[error("starting {0}: {1}")]
    Start(String, String),
}

/// Where the client secret comes from when the configuration has none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretPolicy {
    /// `convoy start`: the configuration must carry it.
    Required,
    /// `convoy dev`: generate one and keep it in the data directory.
    GenerateInDataDir,
}

/// The file `convoy dev` keeps its generated client secret in.
pub fn secret_file(data_dir: &Path) -> PathBuf {
    data_dir.join("client-secret")
}

/// The client secret for this node: configured, or kept in the data directory.
pub fn client_secret(cfg: &Config, policy: SecretPolicy) -> Result<String, NodeError> {
    if let Some(s) = &cfg.auth.secret {
        return Ok(s.clone());
    }
    let path = secret_file(&cfg.node.data_dir);
    let dir_err = |source| NodeError::DataDir { path: cfg.node.data_dir.clone(), source };
    match std::fs::read_to_string(&path) {
        Ok(s) if s.trim().len() >= 32 => return Ok(s.trim().to_string()),
        Ok(_) | Err(_) if policy == SecretPolicy::Required => return Err(NodeError::NoSecret),
        _ => {}
    }
    std::fs::create_dir_all(&cfg.node.data_dir).map_err(dir_err)?;
    let secret: String = (0..48).map(|_| format!("{:x}", rand::random::<u8>() % 16)).collect();
    std::fs::write(&path, &secret).map_err(dir_err)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
    }
    Ok(secret)
}

/// Who this node is, stored in its data directory the first time it starts.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Identity {
    name: String,
    /// Random, per data directory: a wiped node comes back as a new Raft member.
    incarnation: u64,
}

async fn identity(store: &Store, name: &str, data_dir: &Path) -> Result<NodeId, NodeError> {
    let key = keys::node_meta("identity");
    let id: Identity = match store.get("node identity", &key)? {
        Some(id) => id,
        None => {
            let id = Identity { name: name.to_string(), incarnation: rand::random() };
            store.put(key, &id, Durability::Durable).await?;
            id
        }
    };
    if id.name != name {
        return Err(NodeError::WrongNode { path: data_dir.to_path_buf(), found: id.name, expected: name.to_string() });
    }
    Ok(xxhash_rust::xxh3::xxh3_64(format!("{}:{}", id.name, id.incarnation).as_bytes()))
}

pub fn domain_config(cfg: &Config) -> DomainConfig {
    DomainConfig {
        body: BodyLimits { max_text_chars: cfg.limits.max_text_chars },
        group: GroupLimits {
            max_members: cfg.limits.max_members_per_group,
            max_receipt_watches: cfg.limits.max_receipt_watches_per_group,
        },
        max_groups_per_user: cfg.limits.max_groups_per_user,
        receipt_timeout_ms: cfg.timeouts.receipt_timeout.as_millis() as u64,
        sync_limit_max: cfg.limits.sync_limit_max,
    }
}

fn gateway_limits(cfg: &Config) -> GatewayLimits {
    GatewayLimits {
        max_frame_bytes: cfg.limits.max_frame_bytes,
        requests_per_second: cfg.limits.requests_per_second,
        request_burst: cfg.limits.request_burst,
        rate_limit_strikes: cfg.limits.rate_limit_strikes,
        max_pending_requests: cfg.limits.max_pending_requests,
        outbound_queue: cfg.limits.outbound_queue,
        max_connections: cfg.limits.max_connections,
        hello_timeout: cfg.auth.hello_timeout,
        ping_interval: cfg.timeouts.ping_interval,
        pong_timeout: cfg.timeouts.pong_timeout,
        request_timeout: cfg.timeouts.request_timeout,
    }
}

fn raft_settings(cfg: &Config) -> RaftSettings {
    RaftSettings {
        heartbeat: cfg.raft.heartbeat_interval,
        election_min: cfg.raft.election_timeout_min,
        election_max: cfg.raft.election_timeout_max,
        snapshot_every_entries: cfg.raft.snapshot_every_entries,
        max_payload_entries: cfg.raft.max_payload_entries,
    }
}

/// Runs a node until SIGTERM or SIGINT, then shuts it down in order.
pub async fn run(
    cfg: Config,
    policy: SecretPolicy,
    metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
) -> Result<(), NodeError> {
    let data_dir = cfg.node.data_dir.clone();
    std::fs::create_dir_all(&data_dir).map_err(|source| NodeError::DataDir { path: data_dir.clone(), source })?;
    let secret = client_secret(&cfg, policy)?;
    let keys = Arc::new(TokenKeys::new(secret.as_bytes(), cfg.auth.max_token_ttl));

    let limits =
        WriterLimits { queue_depth: cfg.storage.queue_depth, max_batch_bytes: cfg.storage.max_batch_bytes as usize };
    let (store, writer_thread) = Store::open(&data_dir.join("db"), cfg.storage.cache_capacity_bytes, limits)?;
    let node_id = identity(&store, &cfg.node.id, &data_dir).await?;
    let client_url = format!("ws://{}/v1/ws", cfg.client.listen);
    let admin_url = format!("http://{}", cfg.admin.listen);
    let addr = NodeAddr {
        name: cfg.node.id.clone(),
        cluster_addr: cfg.cluster.advertise_addr(),
        client_url: client_url.clone(),
        admin_url: admin_url.clone(),
    };
    tracing::info!(node = %cfg.node.id, id = format!("{node_id:x}"), data_dir = %data_dir.display(), "starting");

    let (phase_tx, phase_rx) = watch::channel(Phase::Starting);
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let hub = Arc::new(Hub::default());
    let runtime = NodeRuntime::new(domain_config(&cfg), hub.clone());
    let router = Router::new(cfg.cluster.shards, cfg.timeouts.leader_wait);
    runtime.bind_router(router.clone());

    // Listen first: a port in use should fail fast, before any Raft group starts.
    let client_listener = gateway::bind(cfg.client.listen).await.map_err(|source| NodeError::Listen {
        what: "client",
        addr: cfg.client.listen,
        source,
    })?;
    let admin_app = admin::router(admin::AdminState {
        phase: phase_rx.clone(),
        metrics,
        router: router.clone(),
        chaos: cfg.chaos.enabled,
    });
    let admin_listener_check = std::net::TcpListener::bind(cfg.admin.listen).map_err(|source| NodeError::Listen {
        what: "admin",
        addr: cfg.admin.listen,
        source,
    })?;
    drop(admin_listener_check);
    let admin_task = tokio::spawn(admin::serve(cfg.admin.listen, admin_app, shutdown_rx.clone()));

    let entity_limits = EntityLimits {
        mailbox: cfg.limits.entity_mailbox,
        max_active: cfg.limits.max_active_entities,
        idle: cfg.timeouts.entity_idle,
    };
    let active = Arc::new(AtomicUsize::new(0));
    let cache_per_shard = (cfg.limits.max_active_entities / cfg.cluster.shards as usize).max(1024);
    let transport = Arc::new(NoPeers);
    for shard in 0..cfg.cluster.shards {
        let group = RaftGroupId(shard);
        let entities = EntityHost::new(group, runtime.clone(), entity_limits, active.clone())
            .await
            .map_err(|e| NodeError::Start(format!("entity supervisor of {group}"), e.to_string()))?;
        let host = ShardHost::start(ShardParts {
            group,
            node: node_id,
            store: store.clone(),
            transport: transport.clone(),
            settings: raft_settings(&cfg),
            snapshot_root: data_dir.join("snapshots"),
            cache_entities: cache_per_shard,
            entities,
        })
        .await
        .map_err(|e| NodeError::Start(group.to_string(), e.to_string()))?;
        host.initialize_alone(addr.clone()).await.map_err(|e| NodeError::Start(group.to_string(), e.to_string()))?;
        router.add_local(host);
    }

    let gw = Arc::new(Gateway::new(
        cfg.node.id.clone(),
        gateway_limits(&cfg),
        domain_config(&cfg),
        router.clone(),
        hub.clone(),
        keys,
        shutdown_rx.clone(),
    ));
    let gateway_task = tokio::spawn(gw.clone().serve(client_listener));

    wait_until_leading(&router).await;
    let _ = phase_tx.send(Phase::Ready);
    println!("convoy ready node={} client={client_url} admin={admin_url}", cfg.node.id);
    tracing::info!(node = %cfg.node.id, %client_url, %admin_url, "ready");

    wait_for_signal().await;
    tracing::info!("shutting down: draining connections");
    let _ = phase_tx.send(Phase::Draining);
    let _ = shutdown_tx.send(true);
    let _ = gateway_task.await;
    // Connections finish their in-flight requests (bounded by request_timeout).
    let grace = tokio::time::Instant::now() + cfg.timeouts.shutdown_grace;
    while gw.open_connections() > 0 && tokio::time::Instant::now() < grace {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for host in router.local_hosts() {
        host.shutdown().await;
    }
    let _ = admin_task.await;
    // Everything acknowledged is already durable; this makes the rest durable too.
    store.writer().stop().await;
    let _ = tokio::task::spawn_blocking(move || writer_thread.join()).await;
    tracing::info!("stopped");
    Ok(())
}

async fn wait_until_leading(router: &Router) {
    for host in router.local_hosts() {
        let mut w = host.watch_leadership();
        let _ = w.wait_for(|l| matches!(l, Leadership::Leading { .. })).await;
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("installing a SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
