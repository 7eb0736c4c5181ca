//! The cluster's metadata, replicated by the metadata Raft group: who the members are,
//! the (fixed) shard count and replication factor, and from those, where every shard's
//! replicas belong.
//!
//! Placement is not stored: a shard's replicas are the top `replication_factor` active
//! members by rendezvous hash, so every node computes the same answer from the same
//! members, and a join or a drain moves only the shards whose top members changed.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::shard::{NodeAddr, NodeId, RaftGroupId};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemberStatus {
    /// Holds replicas and may lead.
    Active,
    /// Being emptied: holds no place in new placements; leaves once it holds nothing.
    Draining,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub addr: NodeAddr,
    pub status: MemberStatus,
}

/// What the metadata group agrees on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ClusterState {
    /// Random, chosen at bootstrap; 0 until then.
    pub cluster_id: u64,
    pub shards: u16,
    pub replication_factor: u8,
    pub members: BTreeMap<NodeId, Member>,
    /// Bumped by every change.
    pub version: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaCommand {
    /// Founds the cluster. Applies once; later bootstraps are refused.
    Bootstrap { cluster_id: u64, shards: u16, replication_factor: u8, members: Vec<(NodeId, NodeAddr)> },
    /// A node joins (or comes back under a new address).
    Join { node: NodeId, addr: NodeAddr },
    /// Move every replica off `node`.
    Drain { node: NodeId },
    /// Forget `node` (after its shards moved, or because it is gone for good).
    Remove { node: NodeId },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetaError {
    #[error("the cluster is already bootstrapped")]
    AlreadyBootstrapped,
    #[error("the cluster is not bootstrapped yet")]
    NotBootstrapped,
    #[error("node {0:x} is not a member")]
    UnknownNode(NodeId),
    #[error("node {node:x} uses the name {name:?}, which member {other:x} already has: remove {other:x} first")]
    NameTaken { node: NodeId, name: String, other: NodeId },
    #[error("draining {0:x} would leave fewer active members than the replication factor")]
    TooFewMembers(NodeId),
}

impl ClusterState {
    pub fn is_bootstrapped(&self) -> bool {
        self.cluster_id != 0
    }

    pub fn active(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.members.iter().filter(|(_, m)| m.status == MemberStatus::Active).map(|(id, _)| *id)
    }

    pub fn name_of(&self, node: NodeId) -> Option<&str> {
        self.members.get(&node).map(|m| m.addr.name.as_str())
    }

    /// Where `shard`'s replicas belong: the top active members by rendezvous hash.
    pub fn replicas(&self, shard: RaftGroupId) -> Vec<NodeId> {
        placement(shard, self.active(), self.replication_factor as usize)
    }

    /// Applies one command; deterministic on every replica.
    pub fn apply(&mut self, cmd: MetaCommand) -> Result<(), MetaError> {
        match cmd {
            MetaCommand::Bootstrap { cluster_id, shards, replication_factor, members } => {
                if self.is_bootstrapped() {
                    return Err(MetaError::AlreadyBootstrapped);
                }
                assert!(cluster_id != 0 && shards > 0 && replication_factor > 0, "validated before proposing");
                self.cluster_id = cluster_id;
                self.shards = shards;
                self.replication_factor = replication_factor;
                for (node, addr) in members {
                    self.members.insert(node, Member { addr, status: MemberStatus::Active });
                }
            }
            MetaCommand::Join { node, addr } => {
                if !self.is_bootstrapped() {
                    return Err(MetaError::NotBootstrapped);
                }
                if let Some((&other, _)) = self.members.iter().find(|(id, m)| **id != node && m.addr.name == addr.name)
                {
                    return Err(MetaError::NameTaken { node, name: addr.name, other });
                }
                let status = self.members.get(&node).map_or(MemberStatus::Active, |m| m.status);
                self.members.insert(node, Member { addr, status });
            }
            MetaCommand::Drain { node } => {
                let Some(m) = self.members.get(&node) else { return Err(MetaError::UnknownNode(node)) };
                if m.status == MemberStatus::Active && self.active().count() <= self.replication_factor as usize {
                    return Err(MetaError::TooFewMembers(node));
                }
                self.members.get_mut(&node).expect("looked up").status = MemberStatus::Draining;
            }
            MetaCommand::Remove { node } => {
                if self.members.remove(&node).is_none() {
                    return Err(MetaError::UnknownNode(node));
                }
            }
        }
        self.version += 1;
        Ok(())
    }
}

/// Rendezvous (highest random weight) placement: each node scores `xxh3(shard, node)`;
/// the best `rf` hold the shard, best first.
pub fn placement(shard: RaftGroupId, nodes: impl Iterator<Item = NodeId>, rf: usize) -> Vec<NodeId> {
    let mut scored: Vec<(u64, NodeId)> = nodes
        .map(|n| {
            let mut key = [0u8; 10];
            key[..2].copy_from_slice(&shard.0.to_be_bytes());
            key[2..].copy_from_slice(&n.to_be_bytes());
            (xxhash_rust::xxh3::xxh3_64(&key), n)
        })
        .collect();
    scored.sort_unstable_by(|a, b| b.cmp(a));
    scored.into_iter().take(rf).map(|(_, n)| n).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(name: &str) -> NodeAddr {
        NodeAddr { name: name.into(), cluster_addr: format!("{name}:1"), ..Default::default() }
    }

    fn cluster(n: u64) -> ClusterState {
        let mut c = ClusterState::default();
        let members = (1..=n).map(|i| (i * 1000 + 7, addr(&format!("n{i}")))).collect();
        c.apply(MetaCommand::Bootstrap { cluster_id: 42, shards: 32, replication_factor: 3, members }).unwrap();
        c
    }

    #[test]
    fn every_shard_gets_distinct_replicas_spread_over_members() {
        let c = cluster(5);
        let mut load: BTreeMap<NodeId, usize> = BTreeMap::new();
        for s in 0..c.shards {
            let r = c.replicas(RaftGroupId(s));
            assert_eq!(r.len(), 3);
            let mut d = r.clone();
            d.sort();
            d.dedup();
            assert_eq!(d.len(), 3, "distinct replicas");
            for n in r {
                *load.entry(n).or_default() += 1;
            }
        }
        // 96 replicas over 5 nodes: nobody holds far more than its share.
        assert!(load.values().all(|&l| (10..=30).contains(&l)), "{load:?}");
    }

    #[test]
    fn a_join_moves_only_shards_the_newcomer_wins() {
        let before = cluster(3);
        let mut after = before.clone();
        after.apply(MetaCommand::Join { node: 99_999, addr: addr("n4") }).unwrap();
        for s in 0..before.shards {
            let (b, a) = (before.replicas(RaftGroupId(s)), after.replicas(RaftGroupId(s)));
            let moved: Vec<_> = b.iter().filter(|n| !a.contains(n)).collect();
            assert!(moved.len() <= 1, "shard {s}: {b:?} -> {a:?}");
            if !moved.is_empty() {
                assert!(a.contains(&99_999), "only the newcomer takes a place");
            }
        }
    }

    #[test]
    fn draining_keeps_enough_members_and_bootstrap_happens_once() {
        let mut c = cluster(3);
        assert_eq!(c.apply(MetaCommand::Drain { node: 1007 }), Err(MetaError::TooFewMembers(1007)));
        c.apply(MetaCommand::Join { node: 4007, addr: addr("n4") }).unwrap();
        c.apply(MetaCommand::Drain { node: 1007 }).unwrap();
        assert!((0..c.shards).all(|s| !c.replicas(RaftGroupId(s)).contains(&1007)));
        assert_eq!(
            c.apply(MetaCommand::Bootstrap { cluster_id: 1, shards: 1, replication_factor: 1, members: vec![] }),
            Err(MetaError::AlreadyBootstrapped)
        );
        let taken = c.apply(MetaCommand::Join { node: 5007, addr: addr("n2") });
        assert!(matches!(taken, Err(MetaError::NameTaken { other: 2007, .. })), "{taken:?}");
    }
}
