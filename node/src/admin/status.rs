//! `GET /v1/cluster`: the cluster as this node sees it, in one document that
//! `convoy cluster status` prints as tables.

use serde::{Deserialize, Serialize};

use super::ClusterHandles;
use crate::router::Router;
use crate::shard::{NodeId, RaftGroupId};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// The node that answered.
    pub node: String,
    pub cluster_id: String,
    pub shards: u16,
    pub replication_factor: u8,
    pub members: Vec<MemberRow>,
    pub groups: Vec<GroupRow>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemberRow {
    pub id: String,
    pub name: String,
    /// `active` or `draining`.
    pub status: String,
    /// Reachable from the answering node.
    pub up: bool,
    pub cluster_addr: String,
    pub client_url: String,
    pub admin_url: String,
    /// Groups it leads (the metadata group included).
    pub leads: usize,
    /// Groups it holds a replica of.
    pub holds: usize,
    /// Most entries it is behind the furthest replica, over the groups it holds.
    pub lag: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GroupRow {
    pub group: String,
    pub leader: Option<String>,
    pub term: u64,
    /// Where placement wants its replicas.
    pub placed: Vec<String>,
    pub voters: Vec<String>,
    pub learners: Vec<String>,
    pub applied: u64,
}

pub fn collect(c: &ClusterHandles, router: &Router) -> ClusterStatus {
    let state = c.state.borrow().clone();
    let me = c.transport.me();
    let name = |n: NodeId| state.name_of(n).map_or_else(|| format!("{n:x}"), str::to_string);
    let names = |ns: &[NodeId]| ns.iter().map(|n| name(*n)).collect::<Vec<_>>();
    let groups: Vec<RaftGroupId> =
        std::iter::once(RaftGroupId::META).chain((0..state.shards).map(RaftGroupId)).collect();
    let mut rows = Vec::new();
    let mut leads: std::collections::HashMap<NodeId, usize> = Default::default();
    let mut holds: std::collections::HashMap<NodeId, usize> = Default::default();
    let mut lag: std::collections::HashMap<NodeId, u64> = Default::default();
    for g in groups {
        let view = c.view.group(g);
        let leader = if g.is_meta() { view.as_ref().and_then(|v| v.leader) } else { router.leader_of(g) };
        if let Some(l) = leader {
            *leads.entry(l).or_default() += 1;
        }
        let (voters, learners, term, applied) =
            view.as_ref().map_or((vec![], vec![], 0, 0), |v| (v.voters.clone(), v.learners.clone(), v.term, v.applied));
        for n in voters.iter().chain(&learners) {
            *holds.entry(*n).or_default() += 1;
            let behind = c.view.report(*n, g).map_or(0, |r| applied.saturating_sub(r.last_applied));
            let l = lag.entry(*n).or_default();
            *l = (*l).max(behind);
        }
        rows.push(GroupRow {
            group: g.to_string(),
            leader: leader.map(name),
            term,
            placed: if g.is_meta() { vec![] } else { names(&state.replicas(g)) },
            voters: names(&voters),
            learners: names(&learners),
            applied,
        });
    }
    let members = state
        .members
        .iter()
        .map(|(id, m)| MemberRow {
            id: format!("{id:016x}"),
            name: m.addr.name.clone(),
            status: match m.status {
                crate::cluster::meta::MemberStatus::Active => "active".into(),
                crate::cluster::meta::MemberStatus::Draining => "draining".into(),
            },
            up: *id == me || c.transport.is_up(*id),
            cluster_addr: m.addr.cluster_addr.clone(),
            client_url: m.addr.client_url.clone(),
            admin_url: m.addr.admin_url.clone(),
            leads: leads.get(id).copied().unwrap_or(0),
            holds: holds.get(id).copied().unwrap_or(0),
            lag: lag.get(id).copied().unwrap_or(0),
        })
        .collect();
    ClusterStatus {
        node: name(me),
        cluster_id: format!("{:016x}", state.cluster_id),
        shards: state.shards,
        replication_factor: state.replication_factor,
        members,
        groups: rows,
    }
}
