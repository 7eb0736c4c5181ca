//! Where users are connected, cluster-wide, so a pushed event goes once to each node that
//! has a recipient and nowhere else.
//!
//! Every node tells its peers when a user's first connection opens or last one closes (the
//! full list when a session to a peer opens); a node forgets everything a peer told it
//! when the peer goes down. Soft state: a missed update costs a push, never correctness
//! (clients sync).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use convoy_actors::Timestamp;
use convoy_actors::ids::UserId;
use parking_lot::RwLock;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use super::transport::{PeerEvent, Transport};
use super::wire::{Call, Cast, PresenceUpdate};
use crate::entity::Pusher;
use crate::gateway::hub::Hub;
use crate::shard::NodeId;
use crate::telemetry::trace::{self, TARGET as TRACE};

/// Presence changes are sent at most this often (they batch in between).
const BATCH: Duration = Duration::from_millis(5);
/// How long a peer may take to apply presence changes.
pub const ANNOUNCE_TIMEOUT: Duration = Duration::from_millis(500);

pub struct Presence {
    transport: Arc<Transport>,
    hub: Arc<Hub>,
    /// For every peer, the users connected to it.
    remote: RwLock<HashMap<NodeId, HashSet<UserId>>>,
}

impl Presence {
    pub fn new(transport: Arc<Transport>, hub: Arc<Hub>) -> Arc<Presence> {
        let p = Arc::new(Presence { transport, hub, remote: RwLock::new(HashMap::new()) });
        tokio::spawn(p.clone().run());
        p
    }

    /// Applies what `from` says about its users.
    pub fn apply(&self, from: NodeId, update: PresenceUpdate) {
        let mut remote = self.remote.write();
        let users = remote.entry(from).or_default();
        match update {
            PresenceUpdate::Full(all) => *users = all.into_iter().collect(),
            PresenceUpdate::Delta { connected, disconnected } => {
                for u in disconnected {
                    users.remove(&u);
                }
                users.extend(connected);
            }
        }
        let total: usize = remote.values().map(HashSet::len).sum();
        metrics::gauge!("convoy_presence_remote_users").set(total as f64);
    }

    fn forget(&self, node: NodeId) {
        self.remote.write().remove(&node);
    }

    async fn run(self: Arc<Self>) {
        let mut peers = self.transport.subscribe();
        loop {
            tokio::select! {
                event = peers.recv() => match event {
                    Ok(PeerEvent::Up(hello)) => {
                        let full = PresenceUpdate::Full(self.hub.users());
                        let transport = self.transport.clone();
                        tokio::spawn(async move { let _ = transport.call(hello.node, &Call::Presence(full), ANNOUNCE_TIMEOUT).await; });
                    }
                    Ok(PeerEvent::Down(node)) => self.forget(node),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                },
                _ = self.hub.changed() => {
                    tokio::time::sleep(BATCH).await;
                    let changes = self.hub.take_changes();
                    let through = changes.through;
                    let update = if changes.overflowed {
                        PresenceUpdate::Full(self.hub.users())
                    } else {
                        let (mut connected, mut disconnected) = (Vec::new(), Vec::new());
                        for (user, online) in changes.changes {
                            connected.retain(|u| *u != user);
                            disconnected.retain(|u| *u != user);
                            if online { connected.push(user) } else { disconnected.push(user) }
                        }
                        PresenceUpdate::Delta { connected, disconnected }
                    };
                    // Every reachable peer applies it before the connections that caused it
                    // finish their hello: from then on, pushes from anywhere find them.
                    let call = Call::Presence(update);
                    let sends = self.transport.peers().into_iter().map(|p| self.transport.call(p.node, &call, ANNOUNCE_TIMEOUT));
                    futures::future::join_all(sends).await;
                    self.hub.announced(through);
                }
            }
        }
    }
}

impl Pusher for Presence {
    fn push(&self, users: &[UserId], frame: Arc<str>, committed_at: Option<Timestamp>) {
        let mut by_node: HashMap<NodeId, Vec<UserId>> = HashMap::new();
        {
            let remote = self.remote.read();
            for (node, here) in remote.iter() {
                let mine: Vec<UserId> = users.iter().filter(|u| here.contains(*u)).cloned().collect();
                if !mine.is_empty() {
                    by_node.insert(*node, mine);
                }
            }
        }
        for (node, users) in by_node {
            let _send = trace::child(|| {
                tracing::info_span!(target: TRACE, "fanout.send", to = %format_args!("{node:x}"), users = users.len())
            })
            .entered();
            let cast = Cast::Push { users, frame: frame.to_string(), committed_at };
            if self.transport.cast(node, &cast).is_err() {
                metrics::counter!("convoy_pushes_dropped_total", "reason" => "peer_unreachable").increment(1);
            } else {
                metrics::counter!("convoy_fanout_node_sends_total").increment(1);
            }
        }
        self.hub.deliver(users, &Utf8Bytes::from(String::from(&*frame)), committed_at);
    }
}
