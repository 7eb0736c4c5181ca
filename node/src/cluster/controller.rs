//! The controller: on whichever node leads the metadata group, it turns the cluster state
//! into Raft memberships. It founds the cluster, admits joining nodes to the metadata
//! group, creates each shard's Raft group on its placed replicas, moves replicas when
//! placement changes (add learners, then change voters), spreads shard leaders evenly by
//! leader transfer, and forgets drained nodes once they hold nothing.
//!
//! It acts on what it sees (the view) and repeats until what it sees matches: every step
//! is idempotent, so a new metadata leader simply carries on.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::meta::{ClusterState, MemberStatus, MetaCommand};
use super::shards::Shards;
use super::transport::Transport;
use super::view::ClusterView;
use super::wire::{Call, CallReply, Control, Hello};
use crate::shard::{Leadership, NodeAddr, NodeId, RaftGroupId, ShardHost};

const ROUND: Duration = Duration::from_millis(300);
/// A group that was just acted on is left alone this long.
const COOLDOWN: Duration = Duration::from_secs(3);
const CONTROL_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Controller {
    meta: Arc<ShardHost>,
    shards: Arc<Shards>,
    view: Arc<ClusterView>,
    transport: Arc<Transport>,
    shard_count: u16,
    replication_factor: u8,
    acted: Mutex<HashMap<RaftGroupId, Instant>>,
    /// The leadership transfer last asked for, and when. Until the view shows it done (or
    /// [`COOLDOWN`] passes) no other leader moves: counted mid-way, the same imbalance
    /// would move a second and a third leadership, and later move them back.
    transfer: Mutex<Option<(LeaderMove, Instant)>>,
}

impl Controller {
    pub fn new(
        meta: Arc<ShardHost>,
        shards: Arc<Shards>,
        view: Arc<ClusterView>,
        transport: Arc<Transport>,
        shard_count: u16,
        replication_factor: u8,
    ) -> Arc<Controller> {
        Arc::new(Controller {
            meta,
            shards,
            view,
            transport,
            shard_count,
            replication_factor,
            acted: Mutex::new(HashMap::new()),
            transfer: Mutex::new(None),
        })
    }

    fn leading(&self) -> bool {
        matches!(self.meta.leadership(), Leadership::Leading { .. })
    }

    fn cooling(&self, group: RaftGroupId) -> bool {
        self.acted.lock().get(&group).is_some_and(|t| t.elapsed() < COOLDOWN)
    }

    fn acted_on(&self, group: RaftGroupId) {
        self.acted.lock().insert(group, Instant::now());
    }

    pub async fn run(self: Arc<Self>) {
        loop {
            tokio::time::sleep(ROUND).await;
            if !self.leading() {
                continue;
            }
            let state = self.meta.data().cluster().map(|c| c.borrow().clone());
            let Some(state) = state else { continue };
            if let Err(e) = self.round(&state).await {
                tracing::debug!(error = %e, "controller round");
            }
        }
    }

    async fn round(&self, state: &ClusterState) -> Result<(), String> {
        let meta_report = super::shards::report(&self.meta);
        if !state.is_bootstrapped() {
            // Found the cluster with the metadata group's voters as its members.
            let members: Vec<(NodeId, NodeAddr)> = meta_members(&self.meta);
            let cluster_id = rand::random::<u64>() | 1;
            tracing::info!(members = members.len(), shards = self.shard_count, "bootstrapping the cluster");
            self.meta
                .propose_meta(MetaCommand::Bootstrap {
                    cluster_id,
                    shards: self.shard_count,
                    replication_factor: self.replication_factor,
                    members,
                })
                .await?;
            return Ok(());
        }
        self.reconcile_meta_group(state, &meta_report.voters, &meta_report.learners).await?;
        let mut led: BTreeMap<NodeId, Vec<RaftGroupId>> = state.active().map(|n| (n, Vec::new())).collect();
        let mut every_shard_led = true;
        for s in 0..state.shards {
            let group = RaftGroupId(s);
            let desired = state.replicas(group);
            if desired.is_empty() {
                continue;
            }
            let view = self.view.group(group).filter(|v| !v.voters.is_empty());
            // Shards just acted on count too: leaving them out makes their leader look idle.
            match view.as_ref().and_then(|v| v.leader) {
                Some(leader) => led.entry(leader).or_default().push(group),
                None => every_shard_led = false,
            }
            if self.cooling(group) {
                continue;
            }
            match view {
                // Never created (nobody reports a member): the first placed replica
                // creates it with all of them.
                None => {
                    let members: Vec<(NodeId, NodeAddr)> =
                        desired.iter().filter_map(|n| state.members.get(n).map(|m| (*n, m.addr.clone()))).collect();
                    self.acted_on(group);
                    self.control(desired[0], Control::InitShard { group, members }).await?;
                }
                Some(view) => {
                    let Some(leader) = view.leader else { continue };
                    let have: BTreeSet<NodeId> = view.voters.iter().copied().collect();
                    let want: BTreeSet<NodeId> = desired.iter().copied().collect();
                    if have != want {
                        let members: Vec<(NodeId, NodeAddr)> =
                            desired.iter().filter_map(|n| state.members.get(n).map(|m| (*n, m.addr.clone()))).collect();
                        tracing::info!(%group, ?have, ?want, "moving replicas");
                        self.acted_on(group);
                        self.control(leader, Control::Reconcile { group, members }).await?;
                    }
                }
            }
        }
        if every_shard_led {
            self.balance_leaders(state, led).await?;
        }
        self.forget_drained(state).await
    }

    /// The metadata group's voters follow the active members (draining ones stay until
    /// they are removed).
    async fn reconcile_meta_group(
        &self,
        state: &ClusterState,
        voters: &[NodeId],
        learners: &[NodeId],
    ) -> Result<(), String> {
        let want: BTreeSet<NodeId> = state.members.keys().copied().collect();
        let have: BTreeSet<NodeId> = voters.iter().copied().collect();
        if want == have || self.cooling(RaftGroupId::META) {
            return Ok(());
        }
        self.acted_on(RaftGroupId::META);
        for node in want.difference(&have) {
            if !learners.contains(node) && self.transport.is_up(*node) {
                let addr = state.members[node].addr.clone();
                self.meta.add_learner(*node, addr).await?;
            }
        }
        // Only nodes that are reachable learners can become voters without stalling.
        let target: BTreeSet<NodeId> =
            want.iter().copied().filter(|n| have.contains(n) || learners.contains(n)).collect();
        if target != have && !target.is_empty() {
            tracing::info!(?have, ?target, "changing the metadata group's voters");
            self.meta.change_voters(target).await?;
        }
        Ok(())
    }

    fn reachable(&self, node: NodeId) -> bool {
        node == self.transport.me() || self.transport.is_up(node)
    }

    /// Moves one leadership from the busiest node to the idlest, when they differ by two or
    /// more, once the previous move is seen done. Not while a member is unreachable:
    /// leadership handed to a node that cannot take it only causes an election.
    async fn balance_leaders(
        &self,
        state: &ClusterState,
        led: BTreeMap<NodeId, Vec<RaftGroupId>>,
    ) -> Result<(), String> {
        if !state.members.keys().all(|n| self.reachable(*n)) {
            return Ok(());
        }
        if let Some((last, asked)) = *self.transfer.lock() {
            let done = self.view.leader(last.group) == Some(last.to);
            if !done && asked.elapsed() < COOLDOWN {
                return Ok(());
            }
        }
        let Some(next @ LeaderMove { group, from: busiest, to: idlest }) = leader_to_move(state, &led, |g, to| {
            !self.cooling(g) && self.view.group(g).is_some_and(|v| v.voters.contains(&to))
        }) else {
            return Ok(());
        };
        tracing::info!(%group, from = format!("{busiest:x}"), to = format!("{idlest:x}"), "spreading shard leaders");
        self.acted_on(group);
        *self.transfer.lock() = Some((next, Instant::now()));
        metrics::counter!("convoy_shard_leader_transfers_total").increment(1);
        self.control(busiest, Control::TransferLeader { group, to: idlest }).await
    }

    /// A draining node that holds no replica anymore leaves the cluster.
    async fn forget_drained(&self, state: &ClusterState) -> Result<(), String> {
        for (node, m) in &state.members {
            if m.status != MemberStatus::Draining {
                continue;
            }
            let holds = (0..state.shards).any(|s| {
                self.view.group(RaftGroupId(s)).is_some_and(|v| v.voters.contains(node) || v.learners.contains(node))
            });
            if !holds {
                tracing::info!(node = %m.addr, "drained: removing it from the cluster");
                self.meta.propose_meta(MetaCommand::Remove { node: *node }).await?;
            }
        }
        Ok(())
    }

    /// Has `node` carry out `control` (this node included).
    async fn control(&self, node: NodeId, control: Control) -> Result<(), String> {
        if node == self.transport.me() {
            return super::inbound::control(&self.shards, &self.view, &self.transport, self.transport.me(), control)
                .await
                .map_err(|e| e.to_string());
        }
        match self.transport.call(node, &Call::Control(control), CONTROL_TIMEOUT).await {
            Ok(CallReply::Done) => Ok(()),
            Ok(CallReply::Failed(e)) | Ok(CallReply::NotHere { reason: e, .. }) => Err(e),
            Ok(other) => Err(format!("unexpected answer {other:?}")),
            Err(e) => Err(e.to_string()),
        }
    }
}

fn meta_members(meta: &ShardHost) -> Vec<(NodeId, NodeAddr)> {
    let m = meta.raft().metrics().borrow_watched().clone();
    m.membership_config.membership().nodes().map(|(id, addr)| (*id, addr.clone())).collect()
}

use openraft::type_config::async_runtime::WatchReceiver;

/// Joins this node to a cluster, or founds one. Runs until this node is a member.
///
/// - Already a member (restart): nothing to do.
/// - No seeds: a cluster of one; the metadata group is initialized here.
/// - Seeds: once every seed answered hello, if one of them belongs to a cluster, ask it to
///   let us in; if none does, the node with the smallest name initializes the metadata
///   group with all of them (the others wait to hear from its leader).
pub async fn join_or_found(meta: Arc<ShardHost>, transport: Arc<Transport>, seeds: Vec<String>, shards: u16) {
    let me = transport.hello();
    let mut refusal_logged: Option<std::time::Instant> = None;
    loop {
        let state = meta.data().cluster().map(|c| c.borrow().clone()).unwrap_or_default();
        if state.members.contains_key(&me.node) {
            return;
        }
        let initialized = meta.raft().is_initialized().await.unwrap_or(false);
        if seeds.is_empty() && !initialized {
            if let Err(e) = meta.initialize(BTreeMap::from([(me.node, me.addr.clone())])).await {
                tracing::error!(error = %e, "initializing the metadata group");
            }
        } else if !seeds.is_empty() {
            let peers = transport.peers();
            if let Some(member) = peers.iter().find(|p| p.cluster_id != 0) {
                if let Err(refused) = ask_to_join(&transport, member, &me, shards).await
                    && refusal_logged.is_none_or(|t| t.elapsed() > Duration::from_secs(10))
                {
                    tracing::error!(via = %member.addr, "{refused}");
                    refusal_logged = Some(std::time::Instant::now());
                }
            } else if !initialized && seeds.iter().all(|s| peers.iter().any(|p| p.addr.cluster_addr == *s)) {
                let mut everyone: Vec<&Hello> = peers.iter().collect();
                everyone.push(&me);
                everyone.sort_by(|a, b| a.addr.name.cmp(&b.addr.name));
                if everyone[0].node == me.node {
                    tracing::info!(
                        members = everyone.len(),
                        "every seed answered and none is in a cluster: founding one"
                    );
                    let members = everyone.iter().map(|h| (h.node, h.addr.clone())).collect();
                    if let Err(e) = meta.initialize(members).await {
                        tracing::error!(error = %e, "initializing the metadata group");
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Asks `member` to let this node in; `Err` when the cluster refuses it for good (its
/// configuration does not fit the cluster).
async fn ask_to_join(transport: &Transport, member: &Hello, me: &Hello, shards: u16) -> Result<(), String> {
    let join = Call::Control(Control::Join { node: me.node, addr: me.addr.clone(), shards });
    match transport.call(member.node, &join, CONTROL_TIMEOUT).await {
        Ok(CallReply::Done) => tracing::info!(via = %member.addr, "asked to join the cluster"),
        Ok(CallReply::Failed(reason)) if reason.starts_with("refused: ") => return Err(reason),
        Ok(other) => tracing::debug!(via = %member.addr, ?other, "join not accepted yet"),
        Err(e) => tracing::debug!(via = %member.addr, error = %e, "join request failed"),
    }
    Ok(())
}

/// A shard leadership to hand from one node to another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaderMove {
    pub group: RaftGroupId,
    pub from: NodeId,
    pub to: NodeId,
}

/// How shard leaders are spread next, given the shards each node leads (`led`, with every
/// active member listed): one leadership from the node leading the most to the active
/// node leading the fewest, when they differ by two or more, of a shard `movable` to it.
/// `None` when the leaders are as even as moves can make them.
pub fn leader_to_move(
    state: &ClusterState,
    led: &BTreeMap<NodeId, Vec<RaftGroupId>>,
    movable: impl Fn(RaftGroupId, NodeId) -> bool,
) -> Option<LeaderMove> {
    let (&from, groups) = led.iter().max_by_key(|(_, g)| g.len())?;
    let (&to, few) = led
        .iter()
        .filter(|(n, _)| state.members.get(n).is_some_and(|m| m.status == MemberStatus::Active))
        .min_by_key(|(_, g)| g.len())?;
    if groups.len() < few.len() + 2 {
        return None;
    }
    let group = *groups.iter().find(|g| movable(**g, to))?;
    Some(LeaderMove { group, from, to })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shard::NodeAddr;

    fn cluster(n: u64) -> ClusterState {
        let mut c = ClusterState::default();
        let members = (1..=n).map(|i| (i, NodeAddr { name: format!("n{i}"), ..Default::default() })).collect();
        c.apply(MetaCommand::Bootstrap { cluster_id: 1, shards: 8, replication_factor: 3, members }).unwrap();
        c
    }

    fn led(spread: &[(NodeId, &[u16])]) -> BTreeMap<NodeId, Vec<RaftGroupId>> {
        spread.iter().map(|(n, gs)| (*n, gs.iter().copied().map(RaftGroupId).collect())).collect()
    }

    #[test]
    fn leaders_move_from_the_busiest_to_the_idlest_only_when_they_differ_by_two() {
        let state = cluster(3);
        let anywhere = |_: RaftGroupId, _: NodeId| true;
        assert_eq!(leader_to_move(&state, &led(&[(1, &[0, 1, 2]), (2, &[3, 4, 5]), (3, &[6, 7])]), anywhere), None);
        assert_eq!(
            leader_to_move(&state, &led(&[(1, &[0, 1, 2, 3, 4]), (2, &[5, 6, 7]), (3, &[])]), anywhere),
            Some(LeaderMove { group: RaftGroupId(0), from: 1, to: 3 })
        );
        // Only a shard the idlest node holds a replica of can move to it; none: as even as it gets.
        let holds_only_7 = |g: RaftGroupId, _: NodeId| g == RaftGroupId(7);
        let uneven = led(&[(1, &[0, 1, 2, 3, 4]), (2, &[5, 6, 7]), (3, &[])]);
        assert_eq!(leader_to_move(&state, &uneven, holds_only_7), None, "n1 is the busiest and holds no movable shard");
        let holds_only_1 = |g: RaftGroupId, _: NodeId| g == RaftGroupId(1);
        assert_eq!(
            leader_to_move(&state, &uneven, holds_only_1),
            Some(LeaderMove { group: RaftGroupId(1), from: 1, to: 3 })
        );
    }

    #[test]
    fn a_draining_node_is_never_given_a_leadership() {
        let mut state = cluster(4);
        state.apply(MetaCommand::Drain { node: 4 }).unwrap();
        let spread = led(&[(1, &[0, 1, 2, 3, 4]), (2, &[5, 6]), (3, &[7]), (4, &[])]);
        assert_eq!(
            leader_to_move(&state, &spread, |_, _| true),
            Some(LeaderMove { group: RaftGroupId(0), from: 1, to: 3 }),
            "the idlest active node gets it, not the draining one"
        );
    }
}
