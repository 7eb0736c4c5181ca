//! Network faults injected by an operator (`chaos.enabled`): traffic to and from a peer
//! dropped, or messages to it delayed. The transport consults this on every send and on
//! every message received; with no fault in force that costs one atomic load.
//!
//! A drop is seen from this node only: calls and casts to the peer fail at once as if it
//! were unreachable, and whatever it sends (its answers, requests and heartbeats) is
//! ignored, so the failure detector here marks it down and the peer's marks this node down
//! in turn. A delay holds every outbound message to the peer (requests, answers to its
//! requests, pushes) for that long before it is sent, in order (a call still goes out when
//! its caller stopped waiting meanwhile, as on a slow network); what the peer sends is not
//! delayed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use parking_lot::RwLock;

use crate::shard::NodeId;

/// The longest delay that can be injected.
pub const MAX_DELAY: Duration = Duration::from_secs(10);

/// The faults in force towards one peer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PeerFault {
    /// Nothing goes to the peer and nothing from it is taken in.
    pub dropped: bool,
    /// Every outbound message to the peer waits this long first.
    pub delay: Option<Duration>,
}

impl PeerFault {
    fn is_none(&self) -> bool {
        !self.dropped && self.delay.is_none()
    }
}

#[derive(Debug, Default)]
pub struct PeerFaults {
    /// Whether `peers` holds anything: the fast path when it does not.
    active: AtomicBool,
    peers: RwLock<HashMap<NodeId, PeerFault>>,
}

impl PeerFaults {
    /// The faults in force towards `node`, if any.
    pub fn get(&self, node: NodeId) -> Option<PeerFault> {
        if !self.active.load(Ordering::Acquire) {
            return None;
        }
        self.peers.read().get(&node).copied()
    }

    /// Whether traffic with `node` is dropped.
    pub fn is_dropped(&self, node: NodeId) -> bool {
        self.get(node).is_some_and(|f| f.dropped)
    }

    /// Whether any fault is in force.
    pub fn any(&self) -> bool {
        self.active.load(Ordering::Acquire)
    }

    fn change(&self, node: NodeId, f: impl FnOnce(&mut PeerFault)) {
        let mut peers = self.peers.write();
        let fault = peers.entry(node).or_default();
        f(fault);
        if fault.is_none() {
            peers.remove(&node);
        }
        self.active.store(!peers.is_empty(), Ordering::Release);
    }

    /// Drops all traffic with `node` until healed.
    pub fn drop_traffic(&self, node: NodeId) {
        self.change(node, |f| f.dropped = true);
    }

    /// Delays every outbound message to `node` by `delay` until healed.
    pub fn set_delay(&self, node: NodeId, delay: Duration) {
        self.change(node, |f| f.delay = Some(delay));
    }

    /// Clears every fault towards `node`; what was in force.
    pub fn heal(&self, node: NodeId) -> Option<PeerFault> {
        let mut peers = self.peers.write();
        let was = peers.remove(&node);
        self.active.store(!peers.is_empty(), Ordering::Release);
        was
    }

    /// Clears every fault towards every peer; what was in force.
    pub fn heal_all(&self) -> Vec<(NodeId, PeerFault)> {
        let mut peers = self.peers.write();
        let was = peers.drain().collect();
        self.active.store(false, Ordering::Release);
        was
    }

    /// Every fault in force, by peer.
    pub fn snapshot(&self) -> Vec<(NodeId, PeerFault)> {
        let mut all: Vec<(NodeId, PeerFault)> = self.peers.read().iter().map(|(n, f)| (*n, *f)).collect();
        all.sort_by_key(|(n, _)| *n);
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_come_and_go() {
        let faults = PeerFaults::default();
        assert!(!faults.any());
        assert_eq!(faults.get(1), None);
        faults.drop_traffic(1);
        faults.set_delay(2, Duration::from_millis(200));
        assert!(faults.any());
        assert!(faults.is_dropped(1));
        assert!(!faults.is_dropped(2));
        assert_eq!(faults.get(2).and_then(|f| f.delay), Some(Duration::from_millis(200)));
        faults.set_delay(1, Duration::from_millis(5));
        assert_eq!(faults.get(1), Some(PeerFault { dropped: true, delay: Some(Duration::from_millis(5)) }));
        assert_eq!(faults.heal(1).map(|f| f.dropped), Some(true));
        assert_eq!(faults.heal(1), None);
        assert!(faults.any());
        assert_eq!(faults.heal_all().len(), 1);
        assert!(!faults.any());
        assert!(faults.snapshot().is_empty());
    }
}
