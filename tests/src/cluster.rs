//! Several `convoy` processes forming one cluster: shared secret and cookie, each node
//! listing the others as seeds. Nodes start in parallel (a node is ready only once the
//! cluster it belongs to serves).

use std::time::Duration;

use rand::distr::{Alphanumeric, SampleString};
use serde_json::Value;

use crate::node::{Node, NodeOptions, Ports};
use crate::{admin_get, http};

pub struct Cluster {
    pub nodes: Vec<Node>,
    /// The shared `cluster.cookie`, for nodes added later.
    cookie: String,
}

impl Cluster {
    /// Starts `n` nodes (`n1`..) with `opts` applied to each, and waits until all are ready.
    pub fn start(n: usize, opts: NodeOptions) -> Cluster {
        Cluster::start_each(n, |_| opts.clone())
    }

    /// Starts `n` nodes (`n1`..), node `i` (from 0) with `options(i)`, and waits until all are ready.
    pub fn start_each(n: usize, options: impl Fn(usize) -> NodeOptions) -> Cluster {
        let secret = Alphanumeric.sample_string(&mut rand::rng(), 48);
        let cookie = Alphanumeric.sample_string(&mut rand::rng(), 24);
        let ports: Vec<Ports> = (0..n).map(|_| Ports::free()).collect();
        let mut nodes: Vec<Node> = (0..n)
            .map(|i| {
                let seeds: Vec<toml::Value> = ports
                    .iter()
                    .enumerate()
                    .filter(|(j, _)| *j != i)
                    .map(|(_, p)| format!("127.0.0.1:{}", p.cluster).into())
                    .collect();
                let mut o = options(i).set("cluster.cookie", cookie.clone()).set("cluster.seeds", seeds);
                o.id = format!("n{}", i + 1);
                Node::configure(o, ports[i], secret.clone())
            })
            .collect();
        std::thread::scope(|s| {
            for node in nodes.iter_mut() {
                s.spawn(|| node.spawn());
            }
        });
        Cluster { nodes, cookie }
    }

    /// Starts one more node (`n<k>`) with `opts`, seeded with every existing node, and waits until
    /// it is ready (it has joined). Returns its index.
    pub fn add_node(&mut self, opts: NodeOptions) -> usize {
        let seeds: Vec<toml::Value> = self.nodes.iter().map(|n| n.cluster_addr().to_string().into()).collect();
        let mut o = opts.set("cluster.cookie", self.cookie.clone()).set("cluster.seeds", seeds);
        o.id = format!("n{}", self.nodes.len() + 1);
        let secret = self.nodes[0].secret().to_string();
        let mut node = Node::configure(o, Ports::free(), secret);
        node.spawn();
        self.nodes.push(node);
        self.nodes.len() - 1
    }

    /// The shared `cluster.cookie`.
    pub fn cookie(&self) -> &str {
        &self.cookie
    }

    pub fn node(&self, i: usize) -> &Node {
        &self.nodes[i]
    }

    pub fn node_mut(&mut self, i: usize) -> &mut Node {
        &mut self.nodes[i]
    }

    /// Index of the node named `name` (`n2` -> 1).
    pub fn index_of(&self, name: &str) -> usize {
        self.nodes.iter().position(|n| n.id() == name).unwrap_or_else(|| panic!("no node named {name}"))
    }

    /// Metric `name` summed over every node of the cluster (see [`crate::metric`]).
    pub async fn metric_total(&self, name: &str) -> f64 {
        let mut total = 0.0;
        for node in &self.nodes {
            total += crate::metric(node, name).await;
        }
        total
    }

    /// The index of the node leading the shard of `kind`/`id`, asked of node `via`.
    pub async fn leader_of(&self, via: usize, kind: &str, id: &str) -> Option<usize> {
        let v = admin_get(self.node(via), &format!("/v1/entities/{kind}/{id}")).await.ok()?;
        v["leader"].as_str().map(|name| self.index_of(name))
    }

    /// Waits until node `via` sees a leader for `kind`/`id` that is not `not` (an index).
    pub async fn wait_for_leader(
        &self,
        via: usize,
        kind: &str,
        id: &str,
        not: Option<usize>,
        timeout: Duration,
    ) -> Option<usize> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(l) = self.leader_of(via, kind, id).await
                && Some(l) != not
            {
                return Some(l);
            }
            if std::time::Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `GET /v1/cluster` from node `via`.
    pub async fn status(&self, via: usize) -> Value {
        admin_get(self.node(via), "/v1/cluster").await.unwrap_or_else(|e| panic!("GET /v1/cluster on node {via}: {e}"))
    }

    /// The entries node `i`'s own replica holds for `kind`/`id` (no Raft round).
    pub async fn replica_entries(&self, i: usize, kind: &str, id: &str) -> Result<Vec<Value>, String> {
        let mut all = Vec::new();
        let mut after = 0;
        loop {
            let page =
                admin_get(self.node(i), &format!("/v1/replicas/{kind}/{id}/entries?after={after}&limit=1000")).await?;
            let entries = page["entries"].as_array().cloned().unwrap_or_default();
            let Some(last) = entries.last() else { return Ok(all) };
            after = last["seq"].as_u64().ok_or("entry without seq")?;
            all.extend(entries);
        }
    }
}

/// Re-exported for tests that probe the admin API directly.
pub use http::Response;
