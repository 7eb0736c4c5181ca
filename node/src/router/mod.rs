//! The router: entity -> shard (a stable hash over a fixed shard count) -> the node that
//! leads the shard. Requests for shards led here go to the local shard host; others are
//! forwarded to the leader's node. While a shard has no leader a request waits (up to
//! `leader_wait`, following leadership changes rather than polling blindly) and then
//! answers `unavailable`.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use convoy_actors::behavior::Request;
use convoy_actors::domain::{Command, Query, Reply};
use convoy_actors::ops::Route;
use convoy_actors::{EntityKey, ErrorCode, Rejection};
use parking_lot::RwLock;
use tokio::time::Instant;

use crate::shard::{Leadership, NodeId, RaftGroupId, ShardHost};

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

#[derive(Clone)]
pub struct Router {
    inner: Arc<Inner>,
}

struct Inner {
    shards: u16,
    leader_wait: Duration,
    local: RwLock<HashMap<RaftGroupId, Arc<ShardHost>>>,
}

fn unavailable(message: String) -> Rejection {
    Rejection::new(ErrorCode::Unavailable, message)
}

impl Router {
    pub fn new(shards: u16, leader_wait: Duration) -> Router {
        assert!(shards > 0, "a cluster has at least one shard");
        Router { inner: Arc::new(Inner { shards, leader_wait, local: RwLock::new(HashMap::new()) }) }
    }

    pub fn shards(&self) -> u16 {
        self.inner.shards
    }

    pub fn add_local(&self, host: Arc<ShardHost>) {
        self.inner.local.write().insert(host.group(), host);
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

    fn target(&self, group: RaftGroupId) -> Target {
        match self.local(group) {
            Some(host) => match host.leadership() {
                Leadership::Leading { .. } => Target::Local(host),
                Leadership::Following { leader: Some(node) } => Target::Remote(node),
                Leadership::Following { leader: None } => Target::Nobody,
            },
            None => Target::Nobody,
        }
    }

    /// Runs `call` on the shard's leader, waiting for one to exist.
    async fn on_leader<F, Fut>(&self, key: &EntityKey, call: F) -> Result<Reply, Rejection>
    where
        F: Fn(Arc<ShardHost>) -> Fut,
        Fut: Future<Output = Result<Reply, Rejection>>,
    {
        let group = self.shard_of(key);
        let deadline = Instant::now() + self.inner.leader_wait;
        loop {
            let waited = match self.target(group) {
                Target::Local(host) => {
                    let result = call(host.clone()).await;
                    match result {
                        // Leadership moved while the request was on its way: follow it.
                        Err(r)
                            if r.code == ErrorCode::Unavailable
                                && !matches!(host.leadership(), Leadership::Leading { .. }) =>
                        {
                            Some(r)
                        }
                        other => return other,
                    }
                }
                Target::Remote(node) => {
                    Some(unavailable(format!("{group} is led by node {node:x}, which this node cannot reach yet")))
                }
                Target::Nobody => Some(unavailable(format!("{group} has no leader yet (an election is under way)"))),
            };
            if Instant::now() >= deadline {
                metrics::counter!("convoy_router_unavailable_total").increment(1);
                return Err(waited.unwrap_or_else(|| unavailable(format!("{group} is unavailable"))));
            }
            self.wait_for_change(group, deadline).await;
        }
    }

    /// Sleeps until the shard's leadership changes, a short backoff passes, or `deadline`.
    async fn wait_for_change(&self, group: RaftGroupId, deadline: Instant) {
        let backoff = tokio::time::sleep_until(deadline.min(Instant::now() + Duration::from_millis(50)));
        match self.local(group) {
            Some(host) => {
                let mut watch = host.watch_leadership();
                tokio::select! {
                    _ = watch.changed() => {}
                    _ = backoff => {}
                }
            }
            None => backoff.await,
        }
    }

    pub async fn request(&self, key: EntityKey, req: Request) -> Result<Reply, Rejection> {
        self.on_leader(&key, |host| {
            let (key, req) = (key.clone(), req.clone());
            async move { host.request(key, req).await }
        })
        .await
    }

    pub async fn propose(&self, key: EntityKey, cmd: Command) -> Result<Reply, Rejection> {
        self.on_leader(&key, |host| {
            let (key, cmd) = (key.clone(), cmd.clone());
            async move { host.propose(key, cmd).await }
        })
        .await
    }

    pub async fn query(&self, key: EntityKey, q: Query) -> Result<Reply, Rejection> {
        self.on_leader(&key, |host| {
            let (key, q) = (key.clone(), q.clone());
            async move { host.query(key, q).await }
        })
        .await
    }

    /// Serves a parsed client operation.
    pub async fn dispatch(&self, route: Route) -> Result<Reply, Rejection> {
        match route {
            Route::Actor { key, request } => self.request(key, request).await,
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
