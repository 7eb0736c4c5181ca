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

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
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
use tokio::sync::{Semaphore, broadcast, mpsc};

use super::tls::{ClusterTls, server_name};
use super::wire::{Call, CallReply, Cast, Envelope, Hello, MAX_MESSAGE_BYTES};
use crate::shard::NodeId;
use crate::store::codec;

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
}

impl Transport {
    /// Starts the NodeServer and this node's endpoint. Session events go to `session_events`
    /// for the peer manager.
    pub async fn start(
        me: NodeId,
        hello: Hello,
        listen: std::net::SocketAddr,
        cookie: String,
        tls: Option<ClusterTls>,
        session_events: mpsc::UnboundedSender<SessionEvent>,
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
        });
        Actor::spawn(None, Endpoint, transport.clone()).await.map_err(|e| format!("starting the endpoint: {e}"))?;
        Ok(transport)
    }

    pub fn me(&self) -> NodeId {
        self.me
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
        let link = self.links.read().get(&node).cloned().ok_or(TransportError::NotConnected(node))?;
        let _slot = link.in_flight.try_acquire().map_err(|_| TransportError::Busy(node, MAX_IN_FLIGHT_PER_PEER))?;
        let bytes = self.encode(call, None)?;
        let started = Instant::now();
        let result =
            link.endpoint.call(|reply| EndpointMsg::Call(bytes, reply), Some(RactorDuration::from(timeout))).await;
        metrics::histogram!("convoy_peer_call_seconds").record(started.elapsed().as_secs_f64());
        let reply = match result {
            Ok(CallResult::Success(bytes)) => bytes,
            Ok(CallResult::Timeout) => return Err(TransportError::Timeout(node, timeout)),
            // A remote reply port can report its own timer running out as a sender error:
            // tell the two apart by how long the call took.
            Ok(CallResult::SenderError) if started.elapsed() >= timeout => {
                return Err(TransportError::Timeout(node, timeout));
            }
            Ok(CallResult::SenderError) | Err(_) => return Err(TransportError::SessionLost(node)),
        };
        self.heard_from(node);
        let envelope: Envelope<CallReply> =
            codec::decode("peer reply", &reply).map_err(|e| TransportError::Garbled(node, e.to_string()))?;
        Ok(envelope.body)
    }

    /// Sends `cast` to `node` without waiting. Best effort.
    pub fn cast(&self, node: NodeId, cast: &Cast) -> Result<(), TransportError> {
        let endpoint =
            self.links.read().get(&node).map(|l| l.endpoint.clone()).ok_or(TransportError::NotConnected(node))?;
        let bytes = self.encode(cast, None)?;
        endpoint.cast(EndpointMsg::Cast(bytes)).map_err(|_| TransportError::SessionLost(node))
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
        let replaced = self.links.write().insert(node, link);
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
        drop(links);
        tracing::warn!(peer = %link.hello.addr, "peer down: session closed");
        metrics::counter!("convoy_peers_down_total").increment(1);
        let _ = self.events.send(PeerEvent::Down(node));
    }

    /// Closes the session to `node` (it went silent); the peer manager dials it again.
    pub fn drop_link(&self, node: NodeId, reason: &str) {
        let link = self.links.write().remove(&node);
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
                Ok(env) => {
                    t.heard_from(env.from);
                    inbound.cast(env.from, env.body);
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
                t.heard_from(env.from);
                let Ok(slot) = t.inbound_slots.clone().try_acquire_owned() else {
                    let busy = CallReply::Failed("this node is handling too many peer requests".into());
                    let _ = reply.send(codec::encode(&Envelope { from: t.me, traceparent: None, body: busy }));
                    return Ok(());
                };
                let me = t.me;
                let answer = inbound.call(env.from, env.body);
                tokio::spawn(async move {
                    let body = answer.await;
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
