//! What this node knows about every Raft group: its leader, term and members, from the
//! groups it hosts (their Raft metrics) and from the reports peers send with heartbeats.
//! The router uses it to find a shard's leader; the controller to see what to reconcile.

use std::collections::HashMap;

use parking_lot::RwLock;
use tokio::sync::watch;

use super::wire::GroupReport;
use crate::shard::{NodeId, RaftGroupId};

#[derive(Debug, Clone, PartialEq)]
pub struct GroupView {
    pub term: u64,
    pub leader: Option<NodeId>,
    pub voters: Vec<NodeId>,
    pub learners: Vec<NodeId>,
    /// Highest last-applied index any replica reported.
    pub applied: u64,
}

pub struct ClusterView {
    me: NodeId,
    /// Every reporter's latest report per group (this node's own included).
    reports: RwLock<HashMap<NodeId, HashMap<RaftGroupId, GroupReport>>>,
    changed: watch::Sender<u64>,
}

impl ClusterView {
    pub fn new(me: NodeId) -> ClusterView {
        ClusterView { me, reports: RwLock::new(HashMap::new()), changed: watch::channel(0).0 }
    }

    /// Replaces what `from` reported (for the groups it reported).
    pub fn update(&self, from: NodeId, reports: Vec<GroupReport>) {
        let mut all = self.reports.write();
        let mine = all.entry(from).or_default();
        let mut changed = false;
        for r in reports {
            if mine.get(&r.group) != Some(&r) {
                changed = true;
                mine.insert(r.group, r);
            }
        }
        drop(all);
        if changed {
            self.changed.send_modify(|v| *v += 1);
        }
    }

    /// `from` no longer hosts `group`.
    pub fn forget_group(&self, from: NodeId, group: RaftGroupId) {
        if self.reports.write().get_mut(&from).and_then(|m| m.remove(&group)).is_some() {
            self.changed.send_modify(|v| *v += 1);
        }
    }

    /// A peer went down: its reports, and any leadership it claimed, are void.
    pub fn forget(&self, node: NodeId) {
        if self.reports.write().remove(&node).is_some() {
            self.changed.send_modify(|v| *v += 1);
        }
    }

    /// Resolves when anything changed.
    pub fn watch(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// The best-known state of `group`: from the report with the highest term, preferring
    /// a leader's report about itself. Leadership claimed by a node that is not reporting
    /// (down) is not trusted.
    pub fn group(&self, group: RaftGroupId) -> Option<GroupView> {
        let all = self.reports.read();
        let mut best: Option<(&NodeId, &GroupReport)> = None;
        for (reporter, groups) in all.iter() {
            let Some(r) = groups.get(&group) else { continue };
            let better = match best {
                None => true,
                Some((b_rep, b)) => (r.term, r.leader == Some(*reporter)) > (b.term, b.leader == Some(*b_rep)),
            };
            if better {
                best = Some((reporter, r));
            }
        }
        let (_, r) = best?;
        let applied = all.values().filter_map(|g| g.get(&group)).map(|r| r.last_applied).max().unwrap_or(0);
        let leader = r.leader.filter(|l| all.contains_key(l));
        Some(GroupView { term: r.term, leader, voters: r.voters.clone(), learners: r.learners.clone(), applied })
    }

    pub fn leader(&self, group: RaftGroupId) -> Option<NodeId> {
        self.group(group).and_then(|g| g.leader)
    }

    /// Every group anyone reported.
    pub fn groups(&self) -> Vec<RaftGroupId> {
        let mut groups: Vec<RaftGroupId> = self.reports.read().values().flat_map(|g| g.keys().copied()).collect();
        groups.sort();
        groups.dedup();
        groups
    }

    /// What `node` reported about `group`.
    pub fn report(&self, node: NodeId, group: RaftGroupId) -> Option<GroupReport> {
        self.reports.read().get(&node).and_then(|g| g.get(&group)).cloned()
    }

    pub fn me(&self) -> NodeId {
        self.me
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(group: u16, term: u64, leader: Option<NodeId>) -> GroupReport {
        GroupReport {
            group: RaftGroupId(group),
            term,
            leader,
            voters: vec![1, 2, 3],
            learners: vec![],
            last_applied: term * 10,
            last_log: term * 10,
        }
    }

    #[test]
    fn the_newest_term_wins_and_silent_leaders_do_not_count() {
        let v = ClusterView::new(1);
        v.update(1, vec![report(0, 3, Some(2))]);
        v.update(2, vec![report(0, 3, Some(2))]);
        v.update(3, vec![report(0, 2, Some(3))]);
        assert_eq!(v.leader(RaftGroupId(0)), Some(2));
        v.update(3, vec![report(0, 4, Some(3))]);
        assert_eq!(v.leader(RaftGroupId(0)), Some(3));
        assert_eq!(v.group(RaftGroupId(0)).unwrap().applied, 40);
        v.forget(3);
        // Node 3 is gone: the best remaining report names 2, which still reports.
        assert_eq!(v.leader(RaftGroupId(0)), Some(2));
        v.forget(2);
        assert_eq!(v.leader(RaftGroupId(0)), None, "2 claims leadership but no longer reports");
    }
}
