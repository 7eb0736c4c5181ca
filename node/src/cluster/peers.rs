//! The peer manager: dials the cluster's addresses, greets every session that opens,
//! sends heartbeats, and closes sessions to peers that fall silent.
//!
//! A peer is up once a session to it is ready and it answered `Hello`. It is down when the
//! session closes (a killed process is noticed in milliseconds) or when nothing was heard
//! from it for `failure_timeout` (a paused or cut-off process, which ractor_cluster alone
//! never notices): then we close the session ourselves and dial again with backoff.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::ActorId;
use ractor_cluster::node::NodeServerSessionInformation;
use tokio::sync::{mpsc, watch};

use super::transport::{SessionEvent, Transport};
use super::wire::{Call, CallReply, GroupReport};
use crate::shard::NodeId;

#[derive(Debug, Clone)]
pub struct PeerSettings {
    pub heartbeat: Duration,
    pub failure_timeout: Duration,
    pub backoff_max: Duration,
}

/// How long a TCP connect and a session handshake may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const TICK: Duration = Duration::from_millis(100);

/// Reports for heartbeats, and what to do with a peer's.
pub trait Reports: Send + Sync + 'static {
    fn local(&self) -> Vec<GroupReport>;
    fn received(&self, from: NodeId, reports: Vec<GroupReport>);
}

struct Slot {
    backoff: Duration,
    next_attempt: Instant,
    dialing: bool,
    /// Since when this address has had no session.
    unconnected_since: Instant,
}

/// Two nodes that dial each other at once end with one session killed by ractor's session
/// election; so the node with the greater address dials, and the other waits this long for
/// it before dialing too (the other may not list it as a seed).
const DIAL_FALLBACK: Duration = Duration::from_secs(3);

enum Internal {
    Dialed { addr: String, ok: bool },
    Greeted { session: ActorId, ok: bool },
}

pub fn spawn(
    transport: Arc<Transport>,
    settings: PeerSettings,
    mut sessions: mpsc::UnboundedReceiver<SessionEvent>,
    addrs: watch::Receiver<Vec<String>>,
    reports: Arc<dyn Reports>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let my_addr = transport.hello().addr.cluster_addr;
        let (internal_tx, mut internal) = mpsc::unbounded_channel::<Internal>();
        let mut slots: HashMap<String, Slot> = HashMap::new();
        // Sessions not greeted yet: when they opened, and whether the transport authenticated
        // them (the cookie matched) and our greeting is under way.
        let mut pending: HashMap<ActorId, (NodeServerSessionInformation, Instant, bool)> = HashMap::new();
        let mut tick = tokio::time::interval(TICK);
        let mut beat = tokio::time::interval(settings.heartbeat);
        loop {
            tokio::select! {
                event = sessions.recv() => match event {
                    None => return,
                    Some(SessionEvent::Opened(s)) => {
                        pending.insert(s.actor.get_id(), (s, Instant::now(), false));
                    }
                    Some(SessionEvent::Ready(s)) => {
                        if let Some((_, _, authenticated)) = pending.get_mut(&s.actor.get_id()) {
                            *authenticated = true;
                        }
                        let (t, tx) = (transport.clone(), internal_tx.clone());
                        tokio::spawn(async move {
                            let result = t.greet(&s, HANDSHAKE_TIMEOUT).await;
                            if let Err(e) = &result {
                                tracing::debug!(peer = ?s.peer_name.as_ref().map(|n| n.name.clone()), error = %e, "session not greeted; closing it");
                                s.actor.stop(Some(e.clone()));
                            }
                            let _ = tx.send(Internal::Greeted { session: s.actor.get_id(), ok: result.is_ok() });
                        });
                    }
                    Some(SessionEvent::Disconnected(s)) => {
                        let peer = s.peer_name.as_ref().and_then(|n| super::transport::node_of(&n.name));
                        let duplicate = peer.is_some_and(|n| transport.is_up(n));
                        // A peer whose traffic is dropped on purpose is refused by our greeting.
                        let dropped = peer.is_some_and(|n| transport.faults().is_dropped(n));
                        match pending.remove(&s.actor.get_id()) {
                            // Not a second session to a peer we already have.
                            _ if duplicate || dropped => {}
                            Some((_, _, false)) => {
                                // Closed before it was authenticated: most often a cookie mismatch.
                                metrics::counter!("convoy_peer_handshakes_refused_total").increment(1);
                                tracing::warn!(
                                    peer = %s.peer_addr,
                                    name = ?s.peer_name.as_ref().map(|n| n.name.clone()),
                                    "a node-to-node session closed before it was authenticated: this node and the peer \
                                     have different cluster.cookie values, or one uses TLS and the other does not; \
                                     check that every node has the same cluster.cookie and the same TLS settings"
                                );
                            }
                            Some((_, _, true)) => tracing::warn!(
                                peer = %s.peer_addr,
                                name = ?s.peer_name.as_ref().map(|n| n.name.clone()),
                                "a node-to-node session closed while its greeting was under way (the cookie \
                                 matched): the peer restarted or stalled; it is dialed again"
                            ),
                            None => {}
                        }
                        transport.session_closed(&s);
                    }
                },
                Some(msg) = internal.recv() => match msg {
                    Internal::Dialed { addr, ok } => {
                        let slot = slots.entry(addr).or_insert_with(new_slot);
                        slot.dialing = false;
                        if ok {
                            // The session greets itself; if it does not, try again later.
                            slot.next_attempt = Instant::now() + HANDSHAKE_TIMEOUT;
                        } else {
                            back_off(slot, settings.backoff_max);
                        }
                    }
                    Internal::Greeted { session, ok } => {
                        pending.remove(&session);
                        if ok {
                            for hello in transport.peers() {
                                if let Some(slot) = slots.get_mut(&hello.addr.cluster_addr) {
                                    slot.backoff = BACKOFF_MIN;
                                    slot.unconnected_since = Instant::now();
                                }
                            }
                        }
                    }
                },
                _ = tick.tick() => {
                    // Handshakes that never finished.
                    pending.retain(|_, (s, opened, _)| {
                        let stuck = opened.elapsed() > HANDSHAKE_TIMEOUT;
                        if stuck {
                            s.actor.stop(Some("handshake timed out".into()));
                        }
                        !stuck
                    });
                    // Dial what is not connected.
                    let connected: Vec<String> = transport.peers().into_iter().map(|h| h.addr.cluster_addr).collect();
                    for addr in addrs.borrow().iter() {
                        if *addr == my_addr {
                            continue;
                        }
                        if connected.contains(addr) {
                            if let Some(slot) = slots.get_mut(addr) {
                                slot.unconnected_since = Instant::now();
                            }
                            continue;
                        }
                        let slot = slots.entry(addr.clone()).or_insert_with(new_slot);
                        let my_turn = my_addr.as_str() > addr.as_str() || slot.unconnected_since.elapsed() > DIAL_FALLBACK;
                        if slot.dialing || Instant::now() < slot.next_attempt || !my_turn {
                            continue;
                        }
                        slot.dialing = true;
                        let (t, addr, tx) = (transport.clone(), addr.clone(), internal_tx.clone());
                        tokio::spawn(async move {
                            let dialed = tokio::time::timeout(CONNECT_TIMEOUT, t.dial(&addr)).await;
                            let ok = matches!(dialed, Ok(Ok(())));
                            if let Ok(Err(e)) = &dialed {
                                tracing::debug!(%addr, error = %e, "dialing a peer failed; backing off");
                            }
                            let _ = tx.send(Internal::Dialed { addr, ok });
                        });
                    }
                }
                _ = beat.tick() => {
                    let now = transport.millis();
                    let limit = settings.failure_timeout.as_millis() as u64;
                    let links: Vec<_> = transport.links.read().iter().map(|(n, l)| (*n, l.last_heard.clone())).collect();
                    for (node, last_heard) in links {
                        let silent = now.saturating_sub(last_heard.load(std::sync::atomic::Ordering::Relaxed));
                        if silent > limit {
                            transport.drop_link(node, &format!("nothing heard for {silent} ms"));
                            continue;
                        }
                        let (t, r) = (transport.clone(), reports.clone());
                        let timeout = settings.failure_timeout;
                        tokio::spawn(async move {
                            let call = Call::Heartbeat { reports: r.local() };
                            let answered = match t.call(node, &call, timeout).await {
                                Ok(CallReply::Heartbeat { reports }) => {
                                    r.received(node, reports);
                                    "ok"
                                }
                                Ok(_) => "odd_reply",
                                Err(_) => "failed",
                            };
                            metrics::counter!("convoy_peer_heartbeats_total", "result" => answered).increment(1);
                        });
                    }
                }
            }
        }
    })
}

fn new_slot() -> Slot {
    Slot { backoff: BACKOFF_MIN, next_attempt: Instant::now(), dialing: false, unconnected_since: Instant::now() }
}

fn back_off(slot: &mut Slot, max: Duration) {
    // Jitter keeps nodes that lost each other at once from dialing in lockstep.
    let jitter = 0.8 + rand::random::<f64>() * 0.4;
    slot.next_attempt = Instant::now() + slot.backoff.mul_f64(jitter);
    slot.backoff = (slot.backoff * 2).min(max);
}
