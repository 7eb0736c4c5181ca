//! Node-to-node transport on ractor_cluster.
//!
//! Each node runs one `NodeServer` and one remote-capable actor, its endpoint, which peers
//! find in the process group `convoy.peer:<node id>`. Everything travels as bytes in
//! `Call` (request/reply) or `Cast` (one-way) messages; `wire.rs` says what the bytes hold.
//!
//! ractor_cluster has no failure detector, no timeouts and no reconnect, so this module
//! adds them (`peers.rs` does the dialing and heartbeats):
//! - the ractor node name is `<node id>.<boot nonce>`: a restarted node never collides with
//!   a session its peers still hold to its previous run;
//! - every call has a timeout, and a reply lost because the session died is told apart
//!   from a slow one by the time it took;
//! - a peer that stays silent longer than `cluster.failure_timeout` has its session closed
//!   by us, and is dialed again with backoff.
//!
//! Faults injected by an operator (`faults.rs`) apply here: every send and every message
//! received passes through them.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use parking_lot::RwLock;
use ractor::concurrency::Duration as RactorDuration;
use ractor::rpc::CallResult;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use ractor_cluster::node::{NodeConnectionMode, NodeServerSessionInformation};
use ractor_cluster::{
    IncomingEncryptionMode, NodeEventSubscription, NodeServer, NodeServerMessage, NodeSessionMessage,
    RactorClusterMessage,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, broadcast, mpsc, oneshot};
use tracing::Instrument;

use super::faults::PeerFaults;
use super::tls::{ClusterTls, server_name};
use super::wire::{Call, CallReply, Cast, Envelope, Hello, MAX_MESSAGE_BYTES};
use crate::shard::NodeId;
use crate::store::codec;
use crate::telemetry::trace;

/// The process group a node's endpoint joins.
pub fn endpoint_group(node: NodeId) -> String {
    format!("convoy.peer:{node:016x}")
}

/// The ractor node name: our id, then a nonce that changes every boot.
fn ractor_name(node: NodeId) -> String {
    format!("{node:016x}.{:08x}", rand::random::<u32>())
}

/// Our node id from a peer's ractor name (`<id>.<nonce>@<host>`).
pub fn node_of(ractor_name: &str) -> Option<NodeId> {
    let id = ractor_name.split(['.', '@']).next()?;
    u64::from_str_radix(id, 16).ok().filter(|_| id.len() == 16)
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum TransportError {
    #[error("node {0:x} is not connected")]
    NotConnected(NodeId),
    #[error("node {0:x} did not answer within {1:?}")]
    Timeout(NodeId, Duration),
    #[error("the session to node {0:x} closed before it answered")]
    SessionLost(NodeId),
    #[error("node {0:x} has {1} requests in flight from us, the limit")]
    Busy(NodeId, usize),
    #[error("message of {0} bytes is over the {MAX_MESSAGE_BYTES} byte limit")]
    TooLarge(usize),
    #[error("node {0:x} answered something unreadable: {1}")]
    Garbled(NodeId, String),
}

/// A peer came or went.
#[derive(Debug, Clone)]
pub enum PeerEvent {
    Up(Hello),
    Down(NodeId),
}

/// What a node does with what its peers send.
pub trait Inbound: Send + Sync + 'static {
    fn call(&self, from: NodeId, call: Call) -> BoxFuture<'static, CallReply>;
    fn cast(&self, from: NodeId, cast: Cast);
}

#[derive(RactorClusterMessage)]
pub enum EndpointMsg {
    Cast(Vec<u8>),
    #[rpc]
    Call(Vec<u8>, RpcReplyPort<Vec<u8>>),
}

/// An open, greeted session to a peer.
#[derive(Clone)]
pub(super) struct Link {
    pub hello: Hello,
    pub session: ActorRef<NodeSessionMessage>,
    pub endpoint: ActorRef<EndpointMsg>,
    /// Milliseconds since the transport started, when the peer was last heard from.
    pub last_heard: Arc<AtomicU64>,
    pub in_flight: Arc<Semaphore>,
}

/// Calls in flight to one peer at most.
const MAX_IN_FLIGHT_PER_PEER: usize = 4096;
/// Calls from peers being handled at once, over all peers.
const MAX_INBOUND_CALLS: usize = 8192;

pub struct Transport {
    pub(super) me: NodeId,
    pub(super) hello: RwLock<Hello>,
    pub(super) server: ActorRef<NodeServerMessage>,
    pub(super) links: RwLock<HashMap<NodeId, Link>>,
    pub(super) events: broadcast::Sender<PeerEvent>,
    pub(super) started: Instant,
    inbound: std::sync::OnceLock<Arc<dyn Inbound>>,
    inbound_slots: Arc<Semaphore>,
    tls: Option<ClusterTls>,
    faults: Arc<PeerFaults>,
    /// Casts held back by an injected delay, in order, per peer.
    delayed_casts: parking_lot::Mutex<HashMap<NodeId, DelayLine>>,
    /// Casts held back over all peers: while there are any, casts to a peer with some still
    /// queued queue behind them, so that a heal never reorders them.
    casts_held: Arc<AtomicUsize>,
    runtime: tokio::runtime::Handle,
}

/// A delayed cast: when it is due, where it goes, what it carries.
type HeldCast = (tokio::time::Instant, ActorRef<EndpointMsg>, Vec<u8>);

/// The queue of delayed casts to one peer, sent in order by a task of its own.
struct DelayLine {
    tx: mpsc::UnboundedSender<HeldCast>,
    held: Arc<AtomicUsize>,
}

impl Transport {
    /// Starts the NodeServer and this node's endpoint. Session events go to `session_events`
    /// for the peer manager; `faults` are consulted on every send and receipt.
    pub async fn start(
        me: NodeId,
        hello: Hello,
        listen: std::net::SocketAddr,
        cookie: String,
        tls: Option<ClusterTls>,
        session_events: mpsc::UnboundedSender<SessionEvent>,
        faults: Arc<PeerFaults>,
    ) -> Result<Arc<Transport>, String> {
        let advertised_host = hello.addr.cluster_addr.rsplit_once(':').map_or("127.0.0.1", |(h, _)| h).to_string();
        let encryption = tls.as_ref().map(|t| IncomingEncryptionMode::Tls(t.acceptor.clone()));
        let server = NodeServer::new(
            listen.port(),
            cookie,
            ractor_name(me),
            advertised_host,
            encryption,
            Some(NodeConnectionMode::Isolated),
        )
        .with_listen_addr(listen.ip());
        let (server, _) = Actor::spawn(None, server, ()).await.map_err(|e| format!("starting the node server: {e}"))?;
        server
            .cast(NodeServerMessage::SubscribeToEvents {
                id: "convoy.peers".into(),
                subscription: Box::new(Subscription(session_events)),
            })
            .map_err(|e| format!("subscribing to session events: {e}"))?;
        let (events, _) = broadcast::channel(256);
        let transport = Arc::new(Transport {
            me,
            hello: RwLock::new(hello),
            server,
            links: RwLock::new(HashMap::new()),
            events,
            started: Instant::now(),
            inbound: std::sync::OnceLock::new(),
            inbound_slots: Arc::new(Semaphore::new(MAX_INBOUND_CALLS)),
            tls,
            faults,
            delayed_casts: parking_lot::Mutex::new(HashMap::new()),
            casts_held: Arc::new(AtomicUsize::new(0)),
            runtime: tokio::runtime::Handle::current(),
        });
        Actor::spawn(None, Endpoint, transport.clone()).await.map_err(|e| format!("starting the endpoint: {e}"))?;
        Ok(transport)
    }

    pub fn me(&self) -> NodeId {
        self.me
    }

    /// The injected network faults this transport applies.
    pub fn faults(&self) -> &Arc<PeerFaults> {
        &self.faults
    }

    /// Opens a session to the node listening at `addr` (TLS when configured); the session
    /// greets itself once ready.
    pub(super) async fn dial(&self, addr: &str) -> Result<(), String> {
        match &self.tls {
            None => ractor_cluster::client_connect(&self.server, addr).await.map_err(|e| e.to_string()),
            Some(tls) => {
                let name = server_name(addr).map_err(|e| e.to_string())?;
                ractor_cluster::client_connect_enc(&self.server, addr, tls.connector.clone(), name)
                    .await
                    .map_err(|e| e.to_string())
            }
        }
    }

    /// Sets what handles peers' messages (once, before peers are dialed).
    pub fn set_inbound(&self, inbound: Arc<dyn Inbound>) {
        let _ = self.inbound.set(inbound);
    }

    pub fn hello(&self) -> Hello {
        self.hello.read().clone()
    }

    pub fn set_cluster_id(&self, cluster_id: u64) {
        self.hello.write().cluster_id = cluster_id;
    }

    pub fn subscribe(&self) -> broadcast::Receiver<PeerEvent> {
        self.events.subscribe()
    }

    /// Peers with an open, greeted session.
    pub fn peers(&self) -> Vec<Hello> {
        self.links.read().values().map(|l| l.hello.clone()).collect()
    }

    pub fn is_up(&self, node: NodeId) -> bool {
        self.links.read().contains_key(&node)
    }

    pub(super) fn millis(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Any message from `node` proves it alive.
    fn heard_from(&self, node: NodeId) {
        if let Some(link) = self.links.read().get(&node) {
            link.last_heard.store(self.millis(), Ordering::Relaxed);
        }
    }

    fn encode<T: serde::Serialize>(&self, body: &T, traceparent: Option<String>) -> Result<Vec<u8>, TransportError> {
        let bytes = codec::encode(&Envelope { from: self.me, traceparent, body });
        if bytes.len() > MAX_MESSAGE_BYTES {
            return Err(TransportError::TooLarge(bytes.len()));
        }
        Ok(bytes)
    }

    /// Sends `call` to `node` and waits at most `timeout` for its answer.
    pub async fn call(&self, node: NodeId, call: &Call, timeout: Duration) -> Result<CallReply, TransportError> {
        let started = Instant::now();
        let fault = self.faults.get(node);
        if fault.is_some_and(|f| f.dropped) {
            metrics::counter!("convoy_chaos_messages_dropped_total", "direction" => "out").increment(1);
            return Err(TransportError::NotConnected(node));
        }
        let link = self.links.read().get(&node).cloned().ok_or(TransportError::NotConnected(node))?;
        let slot = link
            .in_flight
            .clone()
            .try_acquire_owned()
            .map_err(|_| TransportError::Busy(node, MAX_IN_FLIGHT_PER_PEER))?;
        let bytes = self.encode(call, trace::traceparent())?;
        let result = match fault.and_then(|f| f.delay) {
            None => {
                let result = link
                    .endpoint
                    .call(|reply| EndpointMsg::Call(bytes, reply), Some(RactorDuration::from(timeout)))
                    .await;
                drop(slot);
                result.ok()
            }
            Some(delay) => self.call_delayed(node, link.endpoint, bytes, delay, timeout, slot).await?,
        };
        metrics::histogram!("convoy_peer_call_seconds", "kind" => call.kind()).record(started.elapsed().as_secs_f64());
        let reply = match result {
            Some(CallResult::Success(bytes)) => bytes,
            Some(CallResult::Timeout) => return Err(TransportError::Timeout(node, timeout)),
            // A remote reply port can report its own timer running out as a sender error:
            // tell the two apart by how long the call took.
            Some(CallResult::SenderError) if started.elapsed() >= timeout => {
                return Err(TransportError::Timeout(node, timeout));
            }
            Some(CallResult::SenderError) | None => return Err(TransportError::SessionLost(node)),
        };
        if self.faults.is_dropped(node) {
            // Traffic with the peer was dropped while the call was out: its answer is ignored.
            metrics::counter!("convoy_chaos_messages_dropped_total", "direction" => "in").increment(1);
            return Err(TransportError::NotConnected(node));
        }
        self.heard_from(node);
        let envelope: Envelope<CallReply> =
            codec::decode("peer reply", &reply).map_err(|e| TransportError::Garbled(node, e.to_string()))?;
        Ok(envelope.body)
    }

    /// A call held back by an injected delay, as a slow network holds it: it reaches the peer
    /// `delay` later even when the caller's `timeout` runs out first (a heartbeat still counts),
    /// and the answer comes back only if it is in time. `None` when the session failed.
    async fn call_delayed(
        &self,
        node: NodeId,
        endpoint: ActorRef<EndpointMsg>,
        bytes: Vec<u8>,
        delay: Duration,
        timeout: Duration,
        slot: OwnedSemaphorePermit,
    ) -> Result<Option<CallResult<Vec<u8>>>, TransportError> {
        let (tx, rx) = oneshot::channel();
        let faults = self.faults.clone();
        self.runtime.spawn(async move {
            let _slot = slot;
            tokio::time::sleep(delay).await;
            if faults.is_dropped(node) {
                metrics::counter!("convoy_chaos_messages_dropped_total", "direction" => "out").increment(1);
                return;
            }
            let wait = timeout.checked_sub(delay).filter(|w| !w.is_zero()).unwrap_or(timeout);
            let result = endpoint.call(|reply| EndpointMsg::Call(bytes, reply), Some(RactorDuration::from(wait))).await;
            let _ = tx.send(result.ok());
        });
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(result)) => Ok(result),
            // Traffic with the peer was dropped before the call went out.
            Ok(Err(_)) => Err(TransportError::NotConnected(node)),
            Err(_) => Err(TransportError::Timeout(node, timeout)),
        }
    }

    /// Sends `cast` to `node` without waiting. Best effort.
    pub fn cast(&self, node: NodeId, cast: &Cast) -> Result<(), TransportError> {
        let fault = self.faults.get(node);
        if fault.is_some_and(|f| f.dropped) {
            metrics::counter!("convoy_chaos_messages_dropped_total", "direction" => "out").increment(1);
            return Err(TransportError::NotConnected(node));
        }
        let endpoint =
            self.links.read().get(&node).map(|l| l.endpoint.clone()).ok_or(TransportError::NotConnected(node))?;
        let bytes = self.encode(cast, trace::traceparent())?;
        let delay = fault.and_then(|f| f.delay);
        if delay.is_some() || self.casts_held.load(Ordering::Acquire) > 0 {
            return self.cast_later(node, endpoint, bytes, delay.unwrap_or_default());
        }
        endpoint.cast(EndpointMsg::Cast(bytes)).map_err(|_| TransportError::SessionLost(node))
    }

    /// Sends a cast after `delay`, behind the casts to `node` already held back.
    fn cast_later(
        &self,
        node: NodeId,
        endpoint: ActorRef<EndpointMsg>,
        bytes: Vec<u8>,
        delay: Duration,
    ) -> Result<(), TransportError> {
        let mut lines = self.delayed_casts.lock();
        let queued = lines.get(&node).is_some_and(|l| l.held.load(Ordering::Acquire) > 0);
        if delay.is_zero() && !queued {
            drop(lines);
            return endpoint.cast(EndpointMsg::Cast(bytes)).map_err(|_| TransportError::SessionLost(node));
        }
        let line = lines.entry(node).or_insert_with(|| self.delay_line(node));
        line.held.fetch_add(1, Ordering::AcqRel);
        self.casts_held.fetch_add(1, Ordering::AcqRel);
        if line.tx.send((tokio::time::Instant::now() + delay, endpoint, bytes)).is_err() {
            line.held.fetch_sub(1, Ordering::AcqRel);
            self.casts_held.fetch_sub(1, Ordering::AcqRel);
            return Err(TransportError::SessionLost(node));
        }
        Ok(())
    }

    /// Starts the task that sends the delayed casts to `node`, each when it is due.
    fn delay_line(&self, node: NodeId) -> DelayLine {
        let (tx, mut rx) = mpsc::unbounded_channel::<HeldCast>();
        let held = Arc::new(AtomicUsize::new(0));
        let (line_held, all_held, faults) = (held.clone(), self.casts_held.clone(), self.faults.clone());
        self.runtime.spawn(async move {
            while let Some((due, endpoint, bytes)) = rx.recv().await {
                tokio::time::sleep_until(due).await;
                if faults.is_dropped(node) {
                    metrics::counter!("convoy_chaos_messages_dropped_total", "direction" => "out").increment(1);
                } else {
                    let _ = endpoint.cast(EndpointMsg::Cast(bytes));
                }
                line_held.fetch_sub(1, Ordering::AcqRel);
                all_held.fetch_sub(1, Ordering::AcqRel);
            }
        });
        DelayLine { tx, held }
    }

    /// Greets the peer at the other end of a ready session and, if it answers, makes it a
    /// link. A session from a previous run of the same node is closed in favour of this one.
    pub(super) async fn greet(
        &self,
        session: &NodeServerSessionInformation,
        timeout: Duration,
    ) -> Result<Hello, String> {
        let peer_name = session.peer_name.as_ref().map(|n| n.name.clone()).unwrap_or_default();
        let node = node_of(&peer_name).ok_or_else(|| format!("peer {peer_name:?} is not a convoy node"))?;
        if node == self.me {
            return Err("a connection to ourselves".into());
        }
        let mut timeout = timeout;
        if let Some(fault) = self.faults.get(node) {
            if fault.dropped {
                return Err(format!("traffic with node {node:x} is dropped (fault injection)"));
            }
            if let Some(delay) = fault.delay {
                tokio::time::sleep(delay.min(timeout)).await;
                timeout = timeout.checked_sub(delay).filter(|t| !t.is_zero()).ok_or_else(|| {
                    format!("hello to node {node:x} delayed past its {timeout:?} timeout (fault injection)")
                })?;
            }
        }
        // The peer's endpoint is in its process group by the time the session is ready;
        // take the member behind *this* session, never a proxy of an older one.
        let endpoint = ractor::pg::get_members(&endpoint_group(node))
            .into_iter()
            .find(|cell| cell.get_id().node() == session.node_id && !cell.get_id().is_local())
            .map(ActorRef::<EndpointMsg>::from)
            .ok_or_else(|| format!("node {node:x} has no endpoint on this session"))?;
        let bytes = self.encode(&Call::Hello(self.hello()), None).map_err(|e| e.to_string())?;
        let reply = endpoint
            .call(|r| EndpointMsg::Call(bytes, r), Some(RactorDuration::from(timeout)))
            .await
            .map_err(|e| format!("hello to node {node:x}: {e}"))?;
        let CallResult::Success(bytes) = reply else { return Err(format!("node {node:x} did not answer hello")) };
        let env: Envelope<CallReply> = codec::decode("hello reply", &bytes).map_err(|e| e.to_string())?;
        let CallReply::Hello(hello) = env.body else { return Err(format!("node {node:x} answered hello oddly")) };
        if hello.node != node {
            return Err(format!("node {node:x} introduced itself as {:x}", hello.node));
        }
        let link = Link {
            hello: hello.clone(),
            session: session.actor.clone(),
            endpoint,
            last_heard: Arc::new(AtomicU64::new(self.millis())),
            in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT_PER_PEER)),
        };
        let replaced = {
            let mut links = self.links.write();
            let replaced = links.insert(node, link);
            metrics::gauge!("convoy_peers_connected").set(links.len() as f64);
            replaced
        };
        if let Some(old) = replaced
            && old.session.get_id() != session.actor.get_id()
        {
            old.session.stop(Some("superseded by a newer session".into()));
        }
        tracing::info!(peer = %hello.addr, "peer up");
        metrics::counter!("convoy_peers_up_total").increment(1);
        let _ = self.events.send(PeerEvent::Up(hello.clone()));
        Ok(hello)
    }

    /// The session ended: forget the link if it was this session's.
    pub(super) fn session_closed(&self, session: &NodeServerSessionInformation) {
        let mut links = self.links.write();
        let Some(node) = links.iter().find(|(_, l)| l.session.get_id() == session.actor.get_id()).map(|(n, _)| *n)
        else {
            return;
        };
        let link = links.remove(&node).expect("just found");
        metrics::gauge!("convoy_peers_connected").set(links.len() as f64);
        drop(links);
        tracing::warn!(peer = %link.hello.addr, "peer down: session closed");
        metrics::counter!("convoy_peers_down_total").increment(1);
        let _ = self.events.send(PeerEvent::Down(node));
    }

    /// Closes the session to `node` (it went silent); the peer manager dials it again.
    pub fn drop_link(&self, node: NodeId, reason: &str) {
        let link = {
            let mut links = self.links.write();
            let link = links.remove(&node);
            metrics::gauge!("convoy_peers_connected").set(links.len() as f64);
            link
        };
        if let Some(link) = link {
            tracing::warn!(peer = %link.hello.addr, reason, "closing the session to a peer");
            link.session.stop(Some(reason.to_string()));
            metrics::counter!("convoy_peers_down_total").increment(1);
            let _ = self.events.send(PeerEvent::Down(node));
        }
    }
}

/// Session lifecycle, as ractor_cluster reports it.
#[derive(Debug)]
pub enum SessionEvent {
    Opened(NodeServerSessionInformation),
    Ready(NodeServerSessionInformation),
    Disconnected(NodeServerSessionInformation),
}

/// ractor_cluster calls this inside its NodeServer: only forward.
struct Subscription(mpsc::UnboundedSender<SessionEvent>);

impl NodeEventSubscription for Subscription {
    fn node_session_opened(&self, s: NodeServerSessionInformation) {
        let _ = self.0.send(SessionEvent::Opened(s));
    }
    fn node_session_disconnected(&self, s: NodeServerSessionInformation) {
        let _ = self.0.send(SessionEvent::Disconnected(s));
    }
    fn node_session_authenticated(&self, _: NodeServerSessionInformation) {}
    fn node_session_ready(&self, s: NodeServerSessionInformation) {
        let _ = self.0.send(SessionEvent::Ready(s));
    }
}

/// This node's endpoint: decodes what peers send and hands it to `Inbound`; answers run
/// as tasks so a slow one never holds up the next.
struct Endpoint;

impl Actor for Endpoint {
    type Msg = EndpointMsg;
    type State = Arc<Transport>;
    type Arguments = Arc<Transport>;

    async fn pre_start(
        &self,
        myself: ActorRef<EndpointMsg>,
        t: Arc<Transport>,
    ) -> Result<Arc<Transport>, ActorProcessingErr> {
        ractor::pg::join(endpoint_group(t.me), vec![myself.get_cell()]);
        Ok(t)
    }

    async fn handle(
        &self,
        _: ActorRef<EndpointMsg>,
        msg: EndpointMsg,
        t: &mut Arc<Transport>,
    ) -> Result<(), ActorProcessingErr> {
        let Some(inbound) = t.inbound.get().cloned() else { return Ok(()) };
        match msg {
            EndpointMsg::Cast(bytes) => match codec::decode::<Envelope<Cast>>("peer message", &bytes) {
                Ok(env) if t.faults.is_dropped(env.from) => {
                    metrics::counter!("convoy_chaos_messages_dropped_total", "direction" => "in").increment(1);
                }
                Ok(env) => {
                    t.heard_from(env.from);
                    let from = env.from;
                    let span = trace::continued(
                        env.traceparent.as_deref(),
                        || tracing::info_span!(target: trace::TARGET, "deliver", from = %format_args!("{from:x}"), trace_id = tracing::field::Empty),
                    );
                    span.in_scope(|| inbound.cast(env.from, env.body));
                }
                Err(e) => {
                    metrics::counter!("convoy_peer_garbage_total").increment(1);
                    tracing::warn!(error = %e, "a peer sent an unreadable message; dropped");
                }
            },
            EndpointMsg::Call(bytes, reply) => {
                let env = match codec::decode::<Envelope<Call>>("peer request", &bytes) {
                    Ok(env) => env,
                    Err(e) => {
                        metrics::counter!("convoy_peer_garbage_total").increment(1);
                        tracing::warn!(error = %e, "a peer sent an unreadable request");
                        let answer = codec::encode(&Envelope {
                            from: t.me,
                            traceparent: None,
                            body: CallReply::Failed(format!("unreadable request: {e}")),
                        });
                        let _ = reply.send(answer);
                        return Ok(());
                    }
                };
                if t.faults.is_dropped(env.from) {
                    // As if it never arrived: no answer, and the peer is not heard from.
                    metrics::counter!("convoy_chaos_messages_dropped_total", "direction" => "in").increment(1);
                    drop(reply);
                    return Ok(());
                }
                t.heard_from(env.from);
                let Ok(slot) = t.inbound_slots.clone().try_acquire_owned() else {
                    let busy = CallReply::Failed("this node is handling too many peer requests".into());
                    let _ = reply.send(codec::encode(&Envelope { from: t.me, traceparent: None, body: busy }));
                    return Ok(());
                };
                let me = t.me;
                let from = env.from;
                let span = trace::continued(
                    env.traceparent.as_deref(),
                    || tracing::info_span!(target: trace::TARGET, "serve", from = %format_args!("{from:x}"), trace_id = tracing::field::Empty),
                );
                let kind = env.body.kind();
                let answer = inbound.call(env.from, env.body).instrument(span);
                tokio::spawn(async move {
                    let started = Instant::now();
                    let body = answer.await;
                    metrics::histogram!("convoy_peer_serve_seconds", "kind" => kind)
                        .record(started.elapsed().as_secs_f64());
                    drop(slot);
                    let _ = reply.send(codec::encode(&Envelope { from: me, traceparent: None, body }));
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ractor_names_carry_the_node_id() {
        let name = ractor_name(0xabc);
        assert_eq!(node_of(&name), Some(0xabc));
        assert_eq!(node_of(&format!("{name}@10.0.0.1")), Some(0xabc));
        assert_ne!(ractor_name(0xabc), ractor_name(0xabc), "every boot gets its own name");
        assert_eq!(node_of("n1@host"), None);
        assert_eq!(node_of(""), None);
    }
}
