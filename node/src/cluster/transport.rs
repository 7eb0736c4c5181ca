//! Node-to-node transport on ractor_cluster.
//!
//! Each node runs one `NodeServer` and one remote-capable actor, its endpoint, which peers
//! find in the process group `convoy.peer:<node id>`. Everything travels as bytes;
//! `wire.rs` says what the bytes hold.
//!
//! Each peer has an outbox: a task that sends what queued for the peer as one ractor
//! message, a `Batch` of frames (requests, answers, one-way messages). Every ractor_cluster
//! message passes about eight tasks on each side, so under load a batch of many frames costs
//! little more than one. Requests and answers are matched by id here, not by ractor's reply
//! ports; only the greeting, before a peer has an outbox, is a ractor call.
//!
//! ractor_cluster has no failure detector, no timeouts and no reconnect, so this module
//! adds them (`peers.rs` does the dialing and heartbeats):
//! - the ractor node name is `<node id>.<boot nonce>`: a restarted node never collides with
//!   a session its peers still hold to its previous run;
//! - every call has a timeout, and the calls waiting on a session that closes fail at once;
//! - a peer that stays silent longer than `cluster.failure_timeout` has its session closed
//!   by us, and is dialed again with backoff.
//!
//! Faults injected by an operator (`faults.rs`) apply here: every send and every message
//! received passes through them.

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
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{Semaphore, broadcast, mpsc, oneshot, watch};
use tracing::Instrument;

use super::faults::PeerFaults;
use super::wire::{Batch, Call, CallReply, Cast, Envelope, Frame, FrameRef, Hello, MAX_MESSAGE_BYTES};
use crate::shard::NodeId;
use crate::store::codec;
use crate::telemetry::trace;
use crate::tls::{ClusterTls, server_name};

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
    #[error("{1} messages to node {0:x} are already queued, the limit")]
    Backlog(NodeId, usize),
    #[error("message of {0} bytes is over the {MAX_MESSAGE_BYTES} byte limit")]
    TooLarge(usize),
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
    /// A `Batch` of frames.
    Frames(Vec<u8>),
    #[rpc]
    Call(Vec<u8>, RpcReplyPort<Vec<u8>>),
}

/// An open, greeted session to a peer.
#[derive(Clone)]
pub(super) struct Link {
    pub hello: Hello,
    pub session: ActorRef<NodeSessionMessage>,
    /// Milliseconds since the transport started, when the peer was last heard from.
    pub last_heard: Arc<AtomicU64>,
    pub in_flight: Arc<Semaphore>,
    /// What the peer's outbox task is to send, in order.
    pub outbox: mpsc::Sender<Outgoing>,
}

/// An encoded frame for a peer, and when it may go (later under an injected delay).
pub(super) struct Outgoing {
    due: Option<tokio::time::Instant>,
    frame: Vec<u8>,
}

/// What sending to a peer needs, taken from its link (cheaper than cloning the link, which
/// holds the peer's addresses).
struct Route {
    outbox: mpsc::Sender<Outgoing>,
    in_flight: Arc<Semaphore>,
    session: ractor::ActorId,
}

/// A call waiting for its answer.
struct PendingCall {
    node: NodeId,
    /// The session the call went out on: if it closes, the answer cannot come.
    session: ractor::ActorId,
    answer: oneshot::Sender<CallReply>,
}

/// Calls in flight to one peer at most.
const MAX_IN_FLIGHT_PER_PEER: usize = 4096;
/// Calls from peers being handled at once, over all peers.
const MAX_INBOUND_CALLS: usize = 8192;
/// Frames queued for one peer at most.
const OUTBOX_FRAMES: usize = 16_384;
/// How long a peer's greeting waits for this node to finish opening its groups.
const GREETING_WAIT: Duration = Duration::from_secs(10);
/// The answer to a peer's call that arrives before this node serves.
const STARTING: &str = "this node is still starting; ask again shortly";
/// A batch takes no more frames once this large (one frame may be larger).
const BATCH_BYTES: usize = 1 << 20;

pub struct Transport {
    pub(super) me: NodeId,
    pub(super) hello: RwLock<Hello>,
    pub(super) server: ActorRef<NodeServerMessage>,
    pub(super) links: RwLock<HashMap<NodeId, Link>>,
    pub(super) events: broadcast::Sender<PeerEvent>,
    pub(super) started: Instant,
    inbound: std::sync::OnceLock<Arc<dyn Inbound>>,
    /// Turns true once `inbound` is set: greetings that came earlier wait for it.
    serving: watch::Sender<bool>,
    inbound_slots: Arc<Semaphore>,
    tls: Option<ClusterTls>,
    faults: Arc<PeerFaults>,
    /// Calls waiting for their answers, by id (at most `MAX_IN_FLIGHT_PER_PEER` per peer).
    calls: parking_lot::Mutex<HashMap<u64, PendingCall>>,
    next_call: AtomicU64,
}

/// Where the answer to a peer's call goes.
enum Answer {
    /// A ractor call (the greeting).
    Port(RpcReplyPort<Vec<u8>>),
    /// A framed call: an answer frame with its id, to the node that called.
    Frame { to: NodeId, id: u64 },
}

/// Forgets a call when its caller stops waiting.
struct ForgetCall<'a>(&'a parking_lot::Mutex<HashMap<u64, PendingCall>>, u64);

impl Drop for ForgetCall<'_> {
    fn drop(&mut self) {
        self.0.lock().remove(&self.1);
    }
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
            serving: watch::Sender::new(false),
            inbound_slots: Arc::new(Semaphore::new(MAX_INBOUND_CALLS)),
            tls,
            faults,
            calls: parking_lot::Mutex::new(HashMap::new()),
            next_call: AtomicU64::new(1),
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

    /// Sets what handles peers' messages (once, when this node's groups are open). Until
    /// then peers' greetings wait and their other calls are refused.
    pub fn set_inbound(&self, inbound: Arc<dyn Inbound>) {
        let _ = self.inbound.set(inbound);
        self.serving.send_replace(true);
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

    /// Whether a message from `node` is taken in. One whose traffic is dropped (fault
    /// injection) is as if it never arrived: no answer, and the peer is not heard from. Any
    /// other proves the peer alive.
    fn admit(&self, node: NodeId) -> bool {
        if self.faults.is_dropped(node) {
            metrics::counter!("convoy_chaos_messages_dropped_total", "direction" => "in").increment(1);
            return false;
        }
        if let Some(link) = self.links.read().get(&node) {
            link.last_heard.store(self.millis(), Ordering::Relaxed);
        }
        true
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
        let route = self.route_to(node)?;
        let _slot = route.in_flight.try_acquire().map_err(|_| TransportError::Busy(node, MAX_IN_FLIGHT_PER_PEER))?;
        let id = self.next_call.fetch_add(1, Ordering::Relaxed);
        let frame = self.encode(&FrameRef::Call { id, call }, trace::traceparent())?;
        let (answer, answered) = oneshot::channel();
        self.calls.lock().insert(id, PendingCall { node, session: route.session, answer });
        let _forget = ForgetCall(&self.calls, id);
        self.send(node, &route.outbox, frame)?;
        let answer = tokio::time::timeout(timeout, answered).await;
        metrics::histogram!("convoy_peer_call_seconds", "kind" => call.kind()).record(started.elapsed().as_secs_f64());
        let reply = match answer {
            Ok(Ok(reply)) => reply,
            Ok(Err(_)) => return Err(TransportError::SessionLost(node)),
            Err(_) => return Err(TransportError::Timeout(node, timeout)),
        };
        if self.faults.is_dropped(node) {
            // Traffic with the peer was dropped while the call was out: its answer is ignored.
            metrics::counter!("convoy_chaos_messages_dropped_total", "direction" => "in").increment(1);
            return Err(TransportError::NotConnected(node));
        }
        Ok(reply)
    }

    /// Sends `cast` to `node` without waiting. Best effort.
    pub fn cast(&self, node: NodeId, cast: &Cast) -> Result<(), TransportError> {
        let route = self.route_to(node)?;
        let frame = self.encode(&FrameRef::Cast(cast), trace::traceparent())?;
        self.send(node, &route.outbox, frame)
    }

    /// What sending to `node` needs, unless traffic with it is dropped (fault injection).
    fn route_to(&self, node: NodeId) -> Result<Route, TransportError> {
        if self.faults.is_dropped(node) {
            metrics::counter!("convoy_chaos_messages_dropped_total", "direction" => "out").increment(1);
            return Err(TransportError::NotConnected(node));
        }
        let links = self.links.read();
        let link = links.get(&node).ok_or(TransportError::NotConnected(node))?;
        Ok(Route { outbox: link.outbox.clone(), in_flight: link.in_flight.clone(), session: link.session.get_id() })
    }

    /// Queues `frame` in the outbox of `node`, held back by the injected delay if there is one.
    fn send(&self, node: NodeId, outbox: &mpsc::Sender<Outgoing>, frame: Vec<u8>) -> Result<(), TransportError> {
        let due = self.faults.get(node).and_then(|f| f.delay).map(|delay| tokio::time::Instant::now() + delay);
        outbox.try_send(Outgoing { due, frame }).map_err(|e| match e {
            TrySendError::Full(_) => TransportError::Backlog(node, OUTBOX_FRAMES),
            TrySendError::Closed(_) => TransportError::SessionLost(node),
        })
    }

    /// Sends the answer to a peer's call.
    fn answer(&self, answer: Answer, body: CallReply) {
        let (to, id) = match answer {
            Answer::Port(port) => {
                let _ = port.send(codec::encode(&Envelope { from: self.me, traceparent: None, body }));
                return;
            }
            Answer::Frame { to, id } => (to, id),
        };
        let sent = self.route_to(to).and_then(|route| {
            let frame = match self.encode(&FrameRef::Reply { id, reply: &body }, None) {
                Err(TransportError::TooLarge(n)) => {
                    let failed = CallReply::Failed(format!("the answer of {n} bytes is over the message limit"));
                    self.encode(&FrameRef::Reply { id, reply: &failed }, None)?
                }
                other => other?,
            };
            self.send(to, &route.outbox, frame)
        });
        if let Err(e) = sent {
            metrics::counter!("convoy_peer_answers_lost_total").increment(1);
            tracing::debug!(peer = %format_args!("{to:x}"), error = %e, "an answer to a peer could not be sent; it times out");
        }
    }

    /// Hands an answer to the call waiting for it; a late one, or one from a node the call
    /// did not go to, is dropped.
    fn complete(&self, from: NodeId, id: u64, reply: CallReply) {
        let mut calls = self.calls.lock();
        if calls.get(&id).is_some_and(|c| c.node == from) {
            let call = calls.remove(&id).expect("just found");
            drop(calls);
            let _ = call.answer.send(reply);
        }
    }

    /// The calls that went out on `session` fail now: their answers cannot come.
    fn forget_calls(&self, session: ractor::ActorId) {
        self.calls.lock().retain(|_, c| c.session != session);
    }

    /// Handles a call from a peer in a task of its own, so a slow one never holds up the
    /// next, and sends the answer back.
    ///
    /// Before `Inbound` is set (this node listens while it still opens its groups), a
    /// greeting waits for it, up to `GREETING_WAIT`, and anything else is refused. A greeting
    /// dropped instead would leave the peer waiting for an answer that cannot come while this
    /// node, greeted back, counts the peer up and then closes the silent session.
    fn serve(
        self: &Arc<Self>,
        inbound: Option<&Arc<dyn Inbound>>,
        from: NodeId,
        traceparent: Option<&str>,
        call: Call,
        answer: Answer,
    ) {
        let Some(inbound) = inbound else {
            if !matches!(call, Call::Hello(_)) {
                self.answer(answer, CallReply::Failed(STARTING.into()));
                return;
            }
            let (transport, mut serving) = (self.clone(), self.serving.subscribe());
            tokio::spawn(async move {
                match tokio::time::timeout(GREETING_WAIT, serving.wait_for(|s| *s)).await {
                    Ok(Ok(_)) => transport.serve(transport.inbound.get(), from, None, call, answer),
                    _ => transport.answer(answer, CallReply::Failed(STARTING.into())),
                }
            });
            return;
        };
        let Ok(slot) = self.inbound_slots.clone().try_acquire_owned() else {
            let busy = CallReply::Failed("this node is handling too many peer requests".into());
            self.answer(answer, busy);
            return;
        };
        let span = trace::continued(
            traceparent,
            || tracing::info_span!(target: trace::TARGET, "serve", from = %format_args!("{from:x}"), trace_id = tracing::field::Empty),
        );
        let kind = call.kind();
        let handled = inbound.call(from, call).instrument(span);
        let transport = self.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let body = handled.await;
            metrics::histogram!("convoy_peer_serve_seconds", "kind" => kind).record(started.elapsed().as_secs_f64());
            drop(slot);
            transport.answer(answer, body);
        });
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
        let (outbox, queued) = mpsc::channel(OUTBOX_FRAMES);
        tokio::spawn(send_outbox(node, endpoint, queued, self.faults.clone()));
        let link = Link {
            hello: hello.clone(),
            session: session.actor.clone(),
            last_heard: Arc::new(AtomicU64::new(self.millis())),
            in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT_PER_PEER)),
            outbox,
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
            self.forget_calls(old.session.get_id());
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
        self.forget_calls(link.session.get_id());
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
            self.forget_calls(link.session.get_id());
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
        let inbound = t.inbound.get().cloned();
        match msg {
            EndpointMsg::Frames(bytes) => {
                for frame in Batch::frames_of(&bytes) {
                    let env = match frame
                        .and_then(|f| codec::decode::<Envelope<Frame>>("peer message", f).map_err(|e| e.to_string()))
                    {
                        Ok(env) => env,
                        Err(e) => {
                            metrics::counter!("convoy_peer_garbage_total").increment(1);
                            tracing::warn!(error = %e, "a peer sent an unreadable message; dropped");
                            continue;
                        }
                    };
                    if !t.admit(env.from) {
                        continue;
                    }
                    let from = env.from;
                    match env.body {
                        Frame::Cast(cast) => {
                            // Nothing a cast is about exists before this node serves.
                            let Some(inbound) = &inbound else { continue };
                            let span = trace::continued(
                                env.traceparent.as_deref(),
                                || tracing::info_span!(target: trace::TARGET, "deliver", from = %format_args!("{from:x}"), trace_id = tracing::field::Empty),
                            );
                            span.in_scope(|| inbound.cast(from, cast));
                        }
                        Frame::Call { id, call } => t.serve(
                            inbound.as_ref(),
                            from,
                            env.traceparent.as_deref(),
                            call,
                            Answer::Frame { to: from, id },
                        ),
                        Frame::Reply { id, reply } => t.complete(from, id, reply),
                    }
                }
            }
            EndpointMsg::Call(bytes, reply) => {
                let env = match codec::decode::<Envelope<Call>>("peer request", &bytes) {
                    Ok(env) => env,
                    Err(e) => {
                        metrics::counter!("convoy_peer_garbage_total").increment(1);
                        tracing::warn!(error = %e, "a peer sent an unreadable request");
                        t.answer(Answer::Port(reply), CallReply::Failed(format!("unreadable request: {e}")));
                        return Ok(());
                    }
                };
                if !t.admit(env.from) {
                    return Ok(());
                }
                t.serve(inbound.as_ref(), env.from, env.traceparent.as_deref(), env.body, Answer::Port(reply));
            }
        }
        Ok(())
    }
}

/// Sends what queues for `node` in batches, in order, each frame no earlier than it is due.
/// Ends when the link is gone (every sender dropped) or the session no longer takes messages.
async fn send_outbox(
    node: NodeId,
    endpoint: ActorRef<EndpointMsg>,
    mut queued: mpsc::Receiver<Outgoing>,
    faults: Arc<PeerFaults>,
) {
    let mut next: Option<Outgoing> = None;
    loop {
        let first = match next.take() {
            Some(first) => first,
            None => match queued.recv().await {
                Some(first) => first,
                None => return,
            },
        };
        if let Some(due) = first.due {
            tokio::time::sleep_until(due).await;
        }
        let mut batch = Batch::default();
        batch.push(&first.frame);
        while batch.bytes() < BATCH_BYTES {
            let Ok(more) = queued.try_recv() else { break };
            let early = more.due.is_some_and(|due| due > tokio::time::Instant::now());
            if early || batch.bytes() + more.frame.len() > MAX_MESSAGE_BYTES {
                next = Some(more);
                break;
            }
            batch.push(&more.frame);
        }
        if faults.is_dropped(node) {
            metrics::counter!("convoy_chaos_messages_dropped_total", "direction" => "out")
                .increment(batch.frames() as u64);
            continue;
        }
        metrics::histogram!("convoy_peer_batch_frames").record(batch.frames() as f64);
        if endpoint.cast(EndpointMsg::Frames(batch.into_bytes())).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shard::NodeAddr;

    /// Answers greetings with the node's hello, as the node's own `Inbound` does.
    struct Greeter(Hello);

    impl Inbound for Greeter {
        fn call(&self, _: NodeId, call: Call) -> BoxFuture<'static, CallReply> {
            let reply = match call {
                Call::Hello(_) => CallReply::Hello(self.0.clone()),
                _ => CallReply::Failed("only greetings here".into()),
            };
            Box::pin(async move { reply })
        }
        fn cast(&self, _: NodeId, _: Cast) {}
    }

    async fn ask(endpoint: &ActorRef<EndpointMsg>, call: Call) -> CallReply {
        let bytes = codec::encode(&Envelope { from: 0xfeed, traceparent: None, body: call });
        let answer = endpoint
            .call(|reply| EndpointMsg::Call(bytes, reply), Some(RactorDuration::from_secs(30)))
            .await
            .expect("the endpoint takes calls");
        let CallResult::Success(bytes) = answer else { panic!("no answer: {answer:?}") };
        codec::decode::<Envelope<CallReply>>("answer", &bytes).expect("a readable answer").body
    }

    /// A node listens before its groups are open. A peer that dials in then must get its
    /// greeting answered once the node serves: a greeting dropped instead left the peer
    /// waiting while this node counted it up, until a timeout closed the session.
    #[tokio::test]
    async fn a_greeting_waits_for_the_node_to_serve_and_other_calls_are_refused_until_then() {
        let me: NodeId = 0x5eed_0001;
        let listen = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let addr = NodeAddr {
            name: "starting".into(),
            cluster_addr: listen.to_string(),
            client_url: "ws://127.0.0.1:1/v1/ws".into(),
            admin_url: "http://127.0.0.1:1".into(),
        };
        let hello = Hello { node: me, addr, cluster_id: 7 };
        let (events, _) = mpsc::unbounded_channel();
        let transport =
            Transport::start(me, hello.clone(), listen, "cookie".into(), None, events, Arc::new(PeerFaults::default()))
                .await
                .expect("the transport starts");
        let endpoint = ractor::pg::get_members(&endpoint_group(me))
            .into_iter()
            .find(|cell| cell.get_id().is_local())
            .map(ActorRef::<EndpointMsg>::from)
            .expect("the endpoint joined its group");

        // The greeting goes into the endpoint's mailbox first; the endpoint takes calls in
        // order, so once the second call is answered, the greeting was taken.
        let (port, mut greeting) = ractor::concurrency::oneshot::<Vec<u8>>();
        let bytes = codec::encode(&Envelope { from: 0xfeed, traceparent: None, body: Call::Hello(hello.clone()) });
        endpoint.send_message(EndpointMsg::Call(bytes, port.into())).expect("the endpoint takes calls");
        let refused = ask(&endpoint, Call::Heartbeat { reports: vec![] }).await;
        assert!(matches!(&refused, CallReply::Failed(why) if why == STARTING), "got {refused:?}");
        assert!(greeting.try_recv().is_err(), "a greeting is not answered before the node serves");

        transport.set_inbound(Arc::new(Greeter(hello.clone())));
        let bytes = tokio::time::timeout(Duration::from_secs(30), greeting)
            .await
            .expect("the greeting is answered once the node serves")
            .expect("the greeting is answered, not dropped");
        match codec::decode::<Envelope<CallReply>>("answer", &bytes).expect("a readable answer").body {
            CallReply::Hello(answered) => assert_eq!(answered.node, me),
            other => panic!("the greeting got {other:?}"),
        }
        let served = ask(&endpoint, Call::Heartbeat { reports: vec![] }).await;
        assert!(matches!(&served, CallReply::Failed(why) if why == "only greetings here"), "got {served:?}");
    }

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
