//! Where users are connected, cluster-wide, so a leader sends a pushed event once to each
//! node that has a recipient and was not a voter of the entity's shard as of the entry
//! (voters push from their own apply), and nowhere else.
//!
//! Every node tells its peers when a user's first connection opens or last one closes (the
//! full list when a session to a peer opens); a node forgets everything a peer told it
//! when the peer goes down. Soft state: a missed update costs a push, never correctness
//! (clients sync).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use convoy_actors::event::Event;
use convoy_actors::ids::UserId;
use parking_lot::RwLock;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use super::transport::{PeerEvent, Transport};
use super::wire::{Call, CallReply, Cast, PresenceUpdate};
use crate::entity::Pusher;
use crate::gateway::hub::Hub;
use crate::shard::NodeId;
use crate::telemetry::trace::{self, TARGET as TRACE};

/// Presence changes are sent at most this often (they batch in between).
const BATCH: Duration = Duration::from_millis(5);
/// How long a peer may take to apply presence changes.
pub const ANNOUNCE_TIMEOUT: Duration = Duration::from_millis(500);
/// How often a peer that missed an update (its call failed or timed out, the session staying
/// up) is sent the full list again, until it takes one.
const REPAIR_EVERY: Duration = Duration::from_secs(1);

pub struct Presence {
    transport: Arc<Transport>,
    hub: Arc<Hub>,
    /// For every peer, the users connected to it.
    remote: RwLock<HashMap<NodeId, HashSet<UserId>>>,
}

impl Presence {
    pub fn new(transport: Arc<Transport>, hub: Arc<Hub>) -> Arc<Presence> {
        let p = Arc::new(Presence { transport, hub, remote: RwLock::new(HashMap::new()) });
        // Exported from the start: with every node a replica of every shard it stays 0.
        metrics::counter!("convoy_fanout_node_sends_total").increment(0);
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
        // Peers that may hold a stale list of our users: each gets the full list until one
        // arrives. Without this a lost update would cost its pushes until the session reopened.
        let mut stale: HashSet<NodeId> = HashSet::new();
        let mut repair = tokio::time::interval(REPAIR_EVERY);
        repair.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                event = peers.recv() => match event {
                    Ok(PeerEvent::Up(hello)) => {
                        stale.insert(hello.node);
                        self.send_full(&mut stale).await;
                    }
                    Ok(PeerEvent::Down(node)) => {
                        stale.remove(&node);
                        self.forget(node);
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        stale.extend(self.transport.peers().into_iter().map(|p| p.node));
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                },
                _ = repair.tick(), if !stale.is_empty() => self.send_full(&mut stale).await,
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
                    let targets: Vec<NodeId> =
                        self.transport.peers().into_iter().map(|p| p.node).filter(|n| !stale.contains(n)).collect();
                    for node in self.send(targets, update).await {
                        tracing::debug!(peer = %format_args!("{node:x}"), "a presence update did not arrive; the full list follows");
                        stale.insert(node);
                    }
                    // A stale peer gets the full list, which holds this change too.
                    self.send_full(&mut stale).await;
                    self.hub.announced(through);
                }
            }
        }
    }

    /// Sends the full list of our users to every `stale` peer that is up; those that take it
    /// leave `stale`.
    async fn send_full(&self, stale: &mut HashSet<NodeId>) {
        stale.retain(|&n| self.transport.is_up(n));
        if stale.is_empty() {
            return;
        }
        let targets: Vec<NodeId> = stale.iter().copied().collect();
        let missed = self.send(targets, PresenceUpdate::Full(self.hub.users())).await;
        metrics::counter!("convoy_presence_repairs_failed_total").increment(missed.len() as u64);
        stale.retain(|n| missed.contains(n));
    }

    /// Sends `update` to each of `targets` at once; those it did not reach.
    async fn send(&self, targets: Vec<NodeId>, update: PresenceUpdate) -> Vec<NodeId> {
        let call = Call::Presence(update);
        let sends = targets.iter().map(|&node| self.transport.call(node, &call, ANNOUNCE_TIMEOUT));
        let answers = futures::future::join_all(sends).await;
        targets
            .into_iter()
            .zip(answers)
            .filter(|(_, answer)| !matches!(answer, Ok(CallReply::Done)))
            .map(|(n, _)| n)
            .collect()
    }
}

impl Pusher for Presence {
    fn deliver_here(&self, users: &[UserId], event: &Event) {
        // Rendered only for someone here: a replica applies every group's entries.
        if !self.hub.any_connected(users) {
            return;
        }
        self.hub.deliver(users, &Utf8Bytes::from(event.to_frame()), event.committed_at());
    }

    fn send_to_peers(&self, users: &[UserId], event: &Event, voters: &[NodeId]) {
        let mut by_node: Vec<(NodeId, Vec<UserId>)> = Vec::new();
        {
            let remote = self.remote.read();
            for (node, here) in remote.iter().filter(|(node, _)| !voters.contains(node)) {
                let mine: Vec<UserId> = users.iter().filter(|u| here.contains(*u)).cloned().collect();
                if !mine.is_empty() {
                    by_node.push((*node, mine));
                }
            }
        }
        if by_node.is_empty() {
            return;
        }
        let (frame, committed_at) = (event.to_frame(), event.committed_at());
        for (node, users) in by_node {
            let _send = trace::child(|| {
                tracing::info_span!(target: TRACE, "fanout.send", to = %format_args!("{node:x}"), users = users.len())
            })
            .entered();
            let cast = Cast::Push { users, frame: frame.clone(), committed_at };
            if self.transport.cast(node, &cast).is_err() {
                metrics::counter!("convoy_pushes_dropped_total", "reason" => "peer_unreachable").increment(1);
            } else {
                metrics::counter!("convoy_fanout_node_sends_total").increment(1);
            }
        }
    }

    fn peers_beyond(&self, voters: &[NodeId]) -> bool {
        self.remote.read().iter().any(|(node, users)| !users.is_empty() && !voters.contains(node))
    }
}
