//! One Convoy node: opens storage, starts its shard hosts, router, gateway and admin
//! server, reports ready, and shuts down in order on SIGTERM.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use convoy_actors::body::BodyLimits;
use convoy_actors::domain::{DomainConfig, TicketsConfig};
use convoy_actors::group::GroupLimits;
use convoy_actors::ids::SkillGroup;
use convoy_actors::ticket::{Category, Priority, Rules, Sla, SlaTable, TicketSettings};
use convoy_config::Config;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use tokio::sync::mpsc;

use crate::admin::{self, Phase};
use crate::cluster::controller::{Controller, join_or_found};
use crate::cluster::faults::PeerFaults;
use crate::cluster::inbound::NodeInbound;
use crate::cluster::meta::ClusterState;
use crate::cluster::peers::{self, PeerSettings};
use crate::cluster::presence::Presence;
use crate::cluster::raft_net::PeerRaft;
use crate::cluster::shards::{ShardResources, Shards};
use crate::cluster::transport::{PeerEvent, Transport};
use crate::cluster::view::ClusterView;
use crate::cluster::wire::{GroupReport, Hello};
use crate::entity::{EntityLimits, NodeRuntime};
use crate::gateway::{self, Gateway, GatewayLimits, auth::TokenKeys, hub::Hub};
use crate::router::Router;
use crate::shard::{NodeAddr, NodeId, RaftGroupId, RaftSettings};
use crate::store::{Durability, Store, StoreError, WriterLimits, keys};
use crate::tls::ClusterTls;
use crate::webhook::WebhookSender;

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
    #[error(
        "cluster.shards is {configured} on this node but the cluster was formed with {cluster}: every node of a \
         cluster needs the same cluster.shards, and it cannot change once the cluster exists"
    )]
    ShardCountMismatch { configured: u16, cluster: u16 },
    #[error(
        "storage did not finish its writes within timeouts.shutdown_grace ({0:?}) of the stop: the node exited \
         without a last flush; nothing acknowledged is lost, and a restart recovers as after a crash"
    )]
    StorageStuckAtShutdown(Duration),
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
        tickets: tickets_config(&cfg.tickets),
        webhook_max_attempts: cfg.webhooks.max_attempts,
    }
}

/// The configured ticket rules and clocks in the domain's terms (validated already).
fn tickets_config(t: &convoy_config::TicketsConfig) -> TicketsConfig {
    use convoy_config::schema::{CategoryConfig, SlaTimes, TicketPriority};
    let priority = |p: TicketPriority| match p {
        TicketPriority::Low => Priority::Low,
        TicketPriority::Normal => Priority::Normal,
        TicketPriority::High => Priority::High,
        TicketPriority::Urgent => Priority::Urgent,
    };
    let category = |c: &CategoryConfig| Category {
        name: c.name.clone(),
        skill_group: SkillGroup::parse(&c.skill_group).expect("validated by the configuration"),
        priority: priority(c.priority),
        keywords: c.keywords.clone(),
    };
    let sla = |s: SlaTimes| Sla {
        first_response_ms: s.first_response.as_millis() as u64,
        resolution_ms: s.resolution.as_millis() as u64,
    };
    TicketsConfig {
        rules: Rules::new(t.categories.iter().map(category).collect(), category(&t.fallback), t.urgency_words.clone()),
        settings: TicketSettings {
            sla: SlaTable {
                low: sla(t.sla.low),
                normal: sla(t.sla.normal),
                high: sla(t.sla.high),
                urgent: sla(t.sla.urgent),
            },
            max_history: t.max_history,
        },
        agent_capacity: t.agent_capacity,
        agent_grace_ms: t.agent_grace.as_millis() as u64,
        presence_refresh_ms: t.presence_refresh.as_millis() as u64,
        max_tickets_per_user: t.max_tickets_per_user,
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
        keep_entries_after_snapshot: cfg.raft.keep_entries_after_snapshot,
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

    let limits = WriterLimits {
        queue_depth: cfg.storage.queue_depth,
        max_batch_bytes: cfg.storage.max_batch_bytes as usize,
        max_staged_bytes: cfg.storage.max_staged_bytes as usize,
    };
    let (store, writer_thread) = Store::open(&data_dir, cfg.storage.cache_capacity_bytes, limits)?;
    let node_id = identity(&store, &cfg.node.id, &data_dir).await?;
    let client_tls = match (&cfg.client.tls_cert, &cfg.client.tls_key) {
        (Some(cert), Some(key)) => Some(
            crate::tls::client_acceptor(cert, key).map_err(|e| NodeError::Start("client TLS".into(), e.to_string()))?,
        ),
        _ => None,
    };
    let scheme = if client_tls.is_some() { "wss" } else { "ws" };
    let client_url = format!("{scheme}://{}/v1/ws", cfg.client.listen);
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
    // The admin endpoints stop last: while connections drain, /readyz says so and /metrics
    // shows the drain.
    let (admin_stop_tx, admin_stop_rx) = watch::channel(false);
    let hub = Arc::new(Hub::default());

    // Listen first: a port in use should fail fast, before any Raft group starts.
    let client_listener = gateway::bind(cfg.client.listen).await.map_err(|source| NodeError::Listen {
        what: "client",
        addr: cfg.client.listen,
        source,
    })?;
    std::net::TcpListener::bind(cfg.admin.listen).map_err(|source| NodeError::Listen {
        what: "admin",
        addr: cfg.admin.listen,
        source,
    })?;
    std::net::TcpListener::bind(cfg.cluster.listen).map_err(|source| NodeError::Listen {
        what: "cluster",
        addr: cfg.cluster.listen,
        source,
    })?;

    let (session_tx, session_rx) = mpsc::unbounded_channel();
    let hello = Hello { node: node_id, addr: addr.clone(), cluster_id: 0 };
    let tls = match (&cfg.cluster.tls_cert, &cfg.cluster.tls_key, &cfg.cluster.tls_ca) {
        (Some(cert), Some(key), Some(ca)) => {
            Some(ClusterTls::load(cert, key, ca).map_err(|e| NodeError::Start("cluster TLS".into(), e.to_string()))?)
        }
        _ => None,
    };
    let peer_faults = Arc::new(PeerFaults::default());
    let transport =
        Transport::start(node_id, hello, cfg.cluster.listen, cfg.cluster.cookie.clone(), tls, session_tx, peer_faults)
            .await
            .map_err(|e| NodeError::Start("the cluster transport".into(), e))?;
    let view = Arc::new(ClusterView::new(node_id));
    let presence = Presence::new(transport.clone(), hub.clone());
    let domain = domain_config(&cfg);
    let runtime = NodeRuntime::new(domain.clone(), presence.clone(), WebhookSender::new(&cfg.webhooks));
    let router = Router::new(cfg.cluster.shards, cfg.timeouts.leader_wait, cfg.timeouts.request_timeout);
    runtime.bind_router(router.clone());
    router.connect(transport.clone(), view.clone());

    let shards = Shards::new(
        ShardResources {
            me: node_id,
            store: store.clone(),
            raft: Arc::new(PeerRaft::new(transport.clone())),
            settings: raft_settings(&cfg),
            snapshot_root: data_dir.join("snapshots"),
            cache_entities: (cfg.limits.max_active_entities / cfg.cluster.shards as usize).max(1024),
            entity_limits: EntityLimits {
                mailbox: cfg.limits.entity_mailbox,
                max_active: cfg.limits.max_active_entities,
                idle: cfg.timeouts.entity_idle,
            },
            runtime: runtime.clone(),
        },
        router.clone(),
        view.clone(),
    );
    let meta = shards
        .ensure(RaftGroupId::META)
        .await
        .map_err(|e| NodeError::Start("the metadata group".into(), e.to_string()))?;
    let cluster_state = meta.data().cluster().expect("the metadata group carries the cluster state");
    // A member restarted with another shard count stops before it serves anything.
    same_shard_count(&cluster_state.borrow(), cfg.cluster.shards)?;
    let inbound = Arc::new(NodeInbound {
        transport: transport.clone(),
        shards: shards.clone(),
        view: view.clone(),
        router: router.clone(),
        presence: presence.clone(),
        hub: hub.clone(),
        snapshots: Default::default(),
    });
    // Peers' greetings wait for this; the answer carries our cluster id, which tells a
    // joining node that we are a cluster's member and not a node to found one with.
    transport.set_cluster_id(cluster_state.borrow().cluster_id);
    transport.set_inbound(Arc::new(inbound));

    let admin_app = admin::router(admin::AdminState {
        phase: phase_rx.clone(),
        metrics,
        router: router.clone(),
        keys: keys.clone(),
        cluster: admin::ClusterHandles {
            transport: transport.clone(),
            view: view.clone(),
            state: cluster_state.clone(),
            shards: shards.clone(),
        },
        chaos: cfg.chaos.enabled,
        storage: store.writer().faults().clone(),
        reported: convoy_actors::domain::reported_entities(&domain),
    });
    let admin_task = tokio::spawn(admin::serve(cfg.admin.listen, admin_app, admin_stop_rx));

    // Peers: the seeds, then every member the cluster state names.
    let seeds: Vec<String> = cfg.cluster.seeds.iter().filter(|s| **s != addr.cluster_addr).cloned().collect();
    let (addrs_tx, addrs_rx) = watch::channel(seeds.clone());
    peers::spawn(
        transport.clone(),
        PeerSettings {
            heartbeat: cfg.cluster.heartbeat_interval,
            failure_timeout: cfg.cluster.failure_timeout,
            backoff_max: cfg.cluster.reconnect_backoff_max,
        },
        session_rx,
        addrs_rx,
        Arc::new(HeartbeatReports { shards: shards.clone(), view: view.clone() }),
    );
    tokio::spawn(follow_cluster(cluster_state.clone(), transport.clone(), view.clone(), addrs_tx, seeds.clone()));
    let shards_task = tokio::spawn(shards.clone().run(cluster_state.clone(), shutdown_rx.clone()));
    tokio::spawn(join_or_found(meta.clone(), transport.clone(), seeds, cfg.cluster.shards));
    let controller = Controller::new(
        meta.clone(),
        shards.clone(),
        view.clone(),
        transport.clone(),
        cfg.cluster.shards,
        cfg.cluster.replication_factor,
    );
    tokio::spawn(controller.run());

    let gw = Arc::new(Gateway::new(
        cfg.node.id.clone(),
        gateway_limits(&cfg),
        domain,
        router.clone(),
        hub.clone(),
        keys,
        shutdown_rx.clone(),
    ));
    let gateway_task = tokio::spawn(gw.clone().serve(client_listener, client_tls));

    wait_until_serving(&router, &cluster_state, node_id).await?;
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
    // Stopping the shards and the last flush wait for storage. A storage that never comes back
    // must not keep the process alive: giving up is as safe as a kill -9, since everything
    // acknowledged is already durable.
    let stop_storage = async {
        // The shards' keeper ends first: it would take the groups stopped below for failed ones
        // and start them again.
        let _ = shards_task.await;
        for host in router.local_hosts() {
            host.shutdown().await;
        }
        let _ = admin_stop_tx.send(true);
        let _ = admin_task.await;
        // Everything acknowledged is already durable; this makes the rest durable too.
        store.writer().stop().await;
        let _ = tokio::task::spawn_blocking(move || writer_thread.join()).await;
    };
    if tokio::time::timeout(cfg.timeouts.shutdown_grace, stop_storage).await.is_err() {
        tracing::error!(
            grace = ?cfg.timeouts.shutdown_grace,
            "storage did not finish its writes within timeouts.shutdown_grace: exiting without a last flush \
             (everything acknowledged is durable; requests still waiting were never acknowledged)"
        );
        return Err(NodeError::StorageStuckAtShutdown(cfg.timeouts.shutdown_grace));
    }
    tracing::info!("stopped");
    Ok(())
}

/// Entities are placed by a hash modulo the shard count: a node must count as its cluster does.
fn same_shard_count(state: &ClusterState, configured: u16) -> Result<(), NodeError> {
    if state.is_bootstrapped() && state.shards != configured {
        return Err(NodeError::ShardCountMismatch { configured, cluster: state.shards });
    }
    Ok(())
}

/// Ready means: a member of a bootstrapped cluster whose every shard has a leader this
/// node can reach. A node that counts shards differently from the cluster would route
/// entities to the wrong shards, so it stops instead.
async fn wait_until_serving(
    router: &Router,
    cluster: &watch::Receiver<Arc<ClusterState>>,
    me: NodeId,
) -> Result<(), NodeError> {
    loop {
        let state = cluster.borrow().clone();
        same_shard_count(&state, router.shards())?;
        let member = state.is_bootstrapped() && state.members.contains_key(&me);
        if member && (0..router.shards()).all(|s| router.leader_of(RaftGroupId(s)).is_some()) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Feeds the heartbeats: our groups out, peers' groups into the view.
struct HeartbeatReports {
    shards: Arc<Shards>,
    view: Arc<ClusterView>,
}

impl peers::Reports for HeartbeatReports {
    fn local(&self) -> Vec<GroupReport> {
        self.shards.reports()
    }
    fn received(&self, from: NodeId, reports: Vec<GroupReport>) {
        self.view.update(from, reports);
    }
}

/// Keeps what depends on the cluster state current: the addresses to dial, our cluster id
/// in hellos, and the view (peers that went down).
async fn follow_cluster(
    mut cluster: watch::Receiver<Arc<ClusterState>>,
    transport: Arc<Transport>,
    view: Arc<ClusterView>,
    addrs: watch::Sender<Vec<String>>,
    seeds: Vec<String>,
) {
    let mut peers = transport.subscribe();
    loop {
        let state = cluster.borrow_and_update().clone();
        transport.set_cluster_id(state.cluster_id);
        let mut all = seeds.clone();
        for m in state.members.values() {
            if !all.contains(&m.addr.cluster_addr) && m.addr.cluster_addr != transport.hello().addr.cluster_addr {
                all.push(m.addr.cluster_addr.clone());
            }
        }
        addrs.send_if_modified(|a| {
            let changed = *a != all;
            *a = all;
            changed
        });
        tokio::select! {
            changed = cluster.changed() => if changed.is_err() { return },
            event = peers.recv() => match event {
                Ok(PeerEvent::Down(node)) => view.forget(node),
                Ok(PeerEvent::Up(_)) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            },
        }
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
