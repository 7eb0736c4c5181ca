//! The router: entity -> shard (a stable hash over a fixed shard count) -> the node that
//! leads the shard. Requests for shards led here go to the local shard host; others are
//! forwarded to the leader's node. While a shard has no leader a request waits (up to
//! `leader_wait`, following leadership changes rather than polling blindly) and then
//! answers `unavailable`.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use convoy_actors::behavior::Request;
use convoy_actors::domain::{Command, Query, Reply};
use convoy_actors::ops::Route;
use convoy_actors::{EntityKey, ErrorCode, Rejection};
use parking_lot::RwLock;
use tokio::time::Instant;
use tracing::Instrument;

use crate::cluster::transport::Transport;
use crate::cluster::view::ClusterView;
use crate::cluster::wire::{Call, CallReply, Routed};
use crate::shard::{Leadership, NodeId, RaftGroupId, RequestOrigin, ShardHost};
use crate::telemetry::trace::{self, TARGET as TRACE};

/// The shard an entity lives in. Stable across versions and nodes: xxh3 of the kind and
/// the id, modulo the cluster's fixed shard count.
pub fn shard_of(key: &EntityKey, shards: u16) -> RaftGroupId {
    let mut bytes = Vec::with_capacity(key.id().len() + 1);
    bytes.push(key.kind() as u8);
    bytes.extend_from_slice(key.id().as_bytes());
    RaftGroupId((xxhash_rust::xxh3::xxh3_64(&bytes) % u64::from(shards)) as u16)
}

/// Where a shard's leader is, as this node sees it.
enum Target {
    Local(Arc<ShardHost>),
    Remote(NodeId),
    Nobody,
}

/// One routed operation, cloned for each attempt.
#[derive(Debug, Clone)]
enum Op {
    Request(EntityKey, Request),
    Propose(EntityKey, Command),
    Query(EntityKey, Query),
}

impl Op {
    fn key(&self) -> &EntityKey {
        match self {
            Op::Request(k, _) | Op::Propose(k, _) | Op::Query(k, _) => k,
        }
    }

    async fn run(self, host: &ShardHost) -> Result<Reply, Rejection> {
        match self {
            Op::Request(key, req) => host.request(key, req).await,
            Op::Propose(key, cmd) => host.propose(key, cmd).await,
            Op::Query(key, q) => host.query(key, q).await,
        }
    }

    fn routed(self) -> Routed {
        match self {
            Op::Request(key, request) => Routed::Request { key, request },
            Op::Propose(key, command) => Routed::Propose { key, command },
            Op::Query(key, query) => Routed::Query { key, query },
        }
    }

    fn from_routed(r: Routed) -> Op {
        match r {
            Routed::Request { key, request } => Op::Request(key, request),
            Routed::Propose { key, command } => Op::Propose(key, command),
            Routed::Query { key, query } => Op::Query(key, query),
        }
    }
}

/// How the router reaches other nodes.
struct Remote {
    transport: Arc<Transport>,
    view: Arc<ClusterView>,
}

#[derive(Clone)]
pub struct Router {
    inner: Arc<Inner>,
}

struct Inner {
    shards: u16,
    leader_wait: Duration,
    request_timeout: Duration,
    local: RwLock<HashMap<RaftGroupId, Arc<ShardHost>>>,
    remote: OnceLock<Remote>,
}

fn unavailable(message: String) -> Rejection {
    Rejection::new(ErrorCode::Unavailable, message)
}

impl Router {
    pub fn new(shards: u16, leader_wait: Duration, request_timeout: Duration) -> Router {
        assert!(shards > 0, "a cluster has at least one shard");
        Router {
            inner: Arc::new(Inner {
                shards,
                leader_wait,
                request_timeout,
                local: RwLock::new(HashMap::new()),
                remote: OnceLock::new(),
            }),
        }
    }

    /// Lets the router forward to other nodes (once the transport runs).
    pub fn connect(&self, transport: Arc<Transport>, view: Arc<ClusterView>) {
        let _ = self.inner.remote.set(Remote { transport, view });
    }

    pub fn shards(&self) -> u16 {
        self.inner.shards
    }

    pub fn add_local(&self, host: Arc<ShardHost>) {
        self.inner.local.write().insert(host.group(), host);
    }

    pub fn remove_local(&self, group: RaftGroupId) -> Option<Arc<ShardHost>> {
        self.inner.local.write().remove(&group)
    }

    pub fn local(&self, group: RaftGroupId) -> Option<Arc<ShardHost>> {
        self.inner.local.read().get(&group).cloned()
    }

    pub fn local_hosts(&self) -> Vec<Arc<ShardHost>> {
        let mut hosts: Vec<_> = self.inner.local.read().values().cloned().collect();
        hosts.sort_by_key(|h| h.group());
        hosts
    }

    pub fn shard_of(&self, key: &EntityKey) -> RaftGroupId {
        shard_of(key, self.inner.shards)
    }

    /// The node that leads `group`, as far as this node knows.
    pub fn leader_of(&self, group: RaftGroupId) -> Option<NodeId> {
        match self.target(group) {
            Target::Local(host) => Some(host.node()),
            Target::Remote(node) => Some(node),
            Target::Nobody => None,
        }
    }

    fn target(&self, group: RaftGroupId) -> Target {
        let local = self.local(group);
        if let Some(host) = &local
            && let Leadership::Leading { .. } = host.leadership()
        {
            return Target::Local(host.clone());
        }
        let Some(remote) = self.inner.remote.get() else { return Target::Nobody };
        // A replica here knows its leader first-hand; otherwise ask the view.
        let leader = match local.map(|h| h.leadership()) {
            Some(Leadership::Following { leader: Some(l) }) => Some(l),
            _ => remote.view.leader(group),
        };
        match leader {
            Some(l) if l != remote.transport.me() && remote.transport.is_up(l) => Target::Remote(l),
            _ => Target::Nobody,
        }
    }

    /// Runs `op` on the shard's leader, wherever it is, waiting for one to exist.
    async fn route(&self, op: Op) -> Result<Reply, Rejection> {
        let group = self.shard_of(op.key());
        let span = trace::child(|| tracing::info_span!(target: TRACE, "route", entity = %op.key(), shard = %group));
        self.route_to(group, op).instrument(span).await
    }

    async fn route_to(&self, group: RaftGroupId, op: Op) -> Result<Reply, Rejection> {
        let deadline = Instant::now() + self.inner.leader_wait;
        loop {
            let failure = match self.target(group) {
                // Leadership moved while the request was on its way (Raft may know before this
                // host's leadership watch does), or the actor failed: try again, as for a remote.
                // A leader cut off from the majority says so at once: its client does better
                // on another node than waiting here.
                Target::Local(host) => match op.clone().run(&host).await {
                    Err(r) if r.code == ErrorCode::Unavailable && host.cut_off_for().is_none() => r,
                    other => return other,
                },
                Target::Remote(node) => match self.forward(node, op.clone()).await {
                    Ok(Err(r)) if r.code == ErrorCode::Unavailable => r,
                    Ok(result) => return result,
                    Err(r) => r,
                },
                Target::Nobody => {
                    unavailable(format!("{group} has no reachable leader yet (an election may be under way)"))
                }
            };
            if Instant::now() >= deadline {
                metrics::counter!("convoy_router_unavailable_total").increment(1);
                return Err(failure);
            }
            self.wait_for_change(group, deadline).await;
        }
    }

    /// Sends `op` to `node`. `Err` when it did not get there or `node` does not lead.
    async fn forward(&self, node: NodeId, op: Op) -> Result<Result<Reply, Rejection>, Rejection> {
        let remote = self.inner.remote.get().expect("a remote target implies a transport");
        let call = Call::Route(op.routed(), RequestOrigin::current());
        metrics::counter!("convoy_router_forwards_total").increment(1);
        let hop = trace::child(|| tracing::info_span!(target: TRACE, "hop", to = %format_args!("{node:x}")));
        match remote.transport.call(node, &call, self.inner.request_timeout).instrument(hop).await {
            Ok(CallReply::Routed(result)) => Ok(result),
            Ok(CallReply::NotHere { reason, .. }) => Err(unavailable(reason)),
            // Busy with other peers' requests, or could not read ours: try again shortly.
            Ok(CallReply::Failed(reason)) => Err(unavailable(format!("node {node:x} could not take it: {reason}"))),
            Ok(other) => Err(Rejection::new(ErrorCode::Internal, format!("node {node:x} answered oddly: {other:?}"))),
            Err(e) => Err(unavailable(e.to_string())),
        }
    }

    /// Serves an operation another node forwarded: only if this node leads the shard.
    pub async fn serve_local(&self, routed: Routed, origin: Option<RequestOrigin>) -> CallReply {
        let op = Op::from_routed(routed);
        let group = self.shard_of(op.key());
        match self.local(group) {
            Some(host) if matches!(host.leadership(), Leadership::Leading { .. }) => {
                let result = match origin {
                    Some(origin) => origin.scope(op.run(&host)).await,
                    None => op.run(&host).await,
                };
                CallReply::Routed(result)
            }
            Some(host) => {
                let leader = match host.leadership() {
                    Leadership::Following { leader } => leader,
                    Leadership::Leading { .. } => None,
                };
                CallReply::NotHere { leader, reason: format!("{group} is not led by this node") }
            }
            None => CallReply::NotHere { leader: None, reason: format!("{group} is not hosted on this node") },
        }
    }

    /// Sleeps until the shard's leadership changes (here or in the view), a short backoff
    /// passes, or `deadline`.
    async fn wait_for_change(&self, group: RaftGroupId, deadline: Instant) {
        let backoff = tokio::time::sleep_until(deadline.min(Instant::now() + Duration::from_millis(50)));
        let mut local = self.local(group).map(|h| h.watch_leadership());
        let mut view = self.inner.remote.get().map(|r| r.view.watch());
        tokio::select! {
            _ = async { match &mut local { Some(w) => { let _ = w.changed().await; } None => std::future::pending().await } } => {}
            _ = async { match &mut view { Some(w) => { let _ = w.changed().await; } None => std::future::pending().await } } => {}
            _ = backoff => {}
        }
    }

    pub async fn request(&self, key: EntityKey, req: Request) -> Result<Reply, Rejection> {
        self.route(Op::Request(key, req)).await
    }

    pub async fn propose(&self, key: EntityKey, cmd: Command) -> Result<Reply, Rejection> {
        self.route(Op::Propose(key, cmd)).await
    }

    pub async fn query(&self, key: EntityKey, q: Query) -> Result<Reply, Rejection> {
        self.route(Op::Query(key, q)).await
    }

    /// Serves a parsed client operation: every attempt the cluster makes on its behalf
    /// carries one [`RequestOrigin`].
    pub async fn dispatch(&self, route: Route) -> Result<Reply, Rejection> {
        match route {
            Route::Actor { key, request } => RequestOrigin::random().scope(self.request(key, request)).await,
            Route::Query { key, query } => self.query(key, query).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_are_stable_and_spread() {
        let key = |i: usize| EntityKey::Group(format!("g-{i}").parse().unwrap());
        // Pinned: changing the hash would move every entity of an existing cluster.
        assert_eq!(shard_of(&key(1), 16), shard_of(&key(1), 16));
        let mut counts = [0usize; 16];
        for i in 0..16_000 {
            counts[shard_of(&key(i), 16).0 as usize] += 1;
        }
        assert!(counts.iter().all(|&c| (800..1200).contains(&c)), "{counts:?}");
        let user = EntityKey::User("g-1".parse().unwrap());
        let _ = shard_of(&user, 16);
    }
}
