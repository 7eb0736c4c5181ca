//! `GET /v1/cluster`: the cluster as this node sees it, in one document that
//! `convoy cluster status` prints as tables.

use serde::{Deserialize, Serialize};

use super::ClusterHandles;
use crate::cluster::controller::{LeaderMove, leader_to_move};
use crate::cluster::meta::MemberStatus;
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
    /// What still differs from what placement wants (a member down or draining, a shard
    /// without a leader, replicas moving, shard leaders to spread); empty once settled.
    #[serde(default)]
    pub unsettled: Vec<String>,
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
    /// Shards it leads.
    pub leads: usize,
    /// Whether it leads the metadata group (not counted in `leads`).
    pub meta_leader: bool,
    /// Shards it holds a replica of.
    pub holds: usize,
    /// Most entries it is behind the furthest replica, over the groups it holds; `None`
    /// while it is down (its reports are not heard).
    pub lag: Option<u64>,
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
    let mut meta_leader = None;
    let mut unsettled = Vec::new();
    // The shards each node leads, as the controller spreads them: every active member is
    // listed, leading none or more.
    let mut shards_led: std::collections::BTreeMap<NodeId, Vec<RaftGroupId>> =
        state.active().map(|n| (n, Vec::new())).collect();
    for (id, m) in &state.members {
        if *id != me && !c.transport.is_up(*id) {
            unsettled.push(format!("{} is down", m.addr.name));
        }
        if m.status == MemberStatus::Draining {
            unsettled.push(format!("{} is draining", m.addr.name));
        }
    }
    for g in groups {
        let view = c.view.group(g);
        let leader = if g.is_meta() { view.as_ref().and_then(|v| v.leader) } else { router.leader_of(g) };
        match leader {
            Some(l) if g.is_meta() => meta_leader = Some(l),
            Some(l) => *leads.entry(l).or_default() += 1,
            None => {}
        }
        let (voters, learners, term, applied) =
            view.as_ref().map_or((vec![], vec![], 0, 0), |v| (v.voters.clone(), v.learners.clone(), v.term, v.applied));
        for n in voters.iter().chain(&learners) {
            if !g.is_meta() {
                *holds.entry(*n).or_default() += 1;
            }
            let behind = c.view.report(*n, g).map_or(0, |r| applied.saturating_sub(r.last_applied));
            let l = lag.entry(*n).or_default();
            *l = (*l).max(behind);
        }
        let placed = if g.is_meta() { Vec::new() } else { state.replicas(g) };
        if !g.is_meta() && state.is_bootstrapped() {
            match leader {
                Some(l) => shards_led.entry(l).or_default().push(g),
                None => unsettled.push(format!("{g} has no leader")),
            }
            let as_set = |ns: &[NodeId]| ns.iter().copied().collect::<std::collections::BTreeSet<_>>();
            if as_set(&placed) != as_set(&voters) {
                unsettled.push(format!(
                    "{g} moves its replicas from {} to {}",
                    list(&names(&voters)),
                    list(&names(&placed))
                ));
            }
            if !learners.is_empty() {
                unsettled.push(format!("{g} has learners catching up: {}", list(&names(&learners))));
            }
        }
        rows.push(GroupRow {
            group: g.to_string(),
            leader: leader.map(name),
            term,
            placed: names(&placed),
            voters: names(&voters),
            learners: names(&learners),
            applied,
        });
    }
    let movable = |g: RaftGroupId, to: NodeId| c.view.group(g).is_some_and(|v| v.voters.contains(&to));
    if let Some(LeaderMove { from, to, .. }) = leader_to_move(&state, &shards_led, movable) {
        let leads = |n: NodeId| shards_led.get(&n).map_or(0, Vec::len);
        unsettled.push(format!(
            "shard leaders are being spread: {} leads {}, {} leads {}",
            name(from),
            leads(from),
            name(to),
            leads(to)
        ));
    }
    let up = |id: NodeId| id == me || c.transport.is_up(id);
    let members = state
        .members
        .iter()
        .map(|(id, m)| MemberRow {
            id: format!("{id:016x}"),
            name: m.addr.name.clone(),
            status: match m.status {
                MemberStatus::Active => "active".into(),
                MemberStatus::Draining => "draining".into(),
            },
            up: up(*id),
            cluster_addr: m.addr.cluster_addr.clone(),
            client_url: m.addr.client_url.clone(),
            admin_url: m.addr.admin_url.clone(),
            leads: leads.get(id).copied().unwrap_or(0),
            meta_leader: meta_leader == Some(*id),
            holds: holds.get(id).copied().unwrap_or(0),
            lag: up(*id).then(|| lag.get(id).copied().unwrap_or(0)),
        })
        .collect();
    ClusterStatus {
        node: name(me),
        cluster_id: format!("{:016x}", state.cluster_id),
        shards: state.shards,
        replication_factor: state.replication_factor,
        members,
        groups: rows,
        unsettled,
    }
}

fn list(names: &[String]) -> String {
    if names.is_empty() { "none".into() } else { names.join(" ") }
}
