//! Which Raft groups this node hosts. The metadata group always; a shard when placement
//! puts a replica here, until the shard's Raft membership no longer includes this node
//! (then its data is deleted). Also reports every hosted group's state to the view, and
//! starts again, from what it stored, a shard whose Raft stopped on an error.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::{Duration, Instant};

use openraft::type_config::async_runtime::WatchReceiver;
use parking_lot::Mutex;
use tokio::sync::watch;

use super::meta::ClusterState;
use super::raft_net::PeerRaft;
use super::view::ClusterView;
use super::wire::GroupReport;
use crate::entity::{EntityHost, EntityLimits, NodeRuntime};
use crate::router::Router;
use crate::shard::{NodeAddr, NodeId, RaftGroupId, RaftSettings, ShardError, ShardHost, ShardParts};
use crate::store::log_files::{LogWrite, Record};
use crate::store::{Durability, Store, WriteBatch, keys};

/// How often hosted groups are compared with placement even without a change.
const RECONCILE_EVERY: Duration = Duration::from_millis(500);
/// The wait before a stopped shard is started again; it doubles, up to the maximum, while
/// the shard keeps stopping soon after each start (a disk that still fails).
const RESTART_BACKOFF_MIN: Duration = Duration::from_secs(1);
const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A shard that ran this long since its last start waits the minimum again when it stops.
const RESTART_FORGOTTEN_AFTER: Duration = Duration::from_secs(60);

/// A shard whose Raft stopped on an error, on its way back.
#[derive(Debug, Clone, Copy)]
struct Recovery {
    /// When it is started again; `None` while it runs.
    due: Option<Instant>,
    backoff: Duration,
    started_at: Option<Instant>,
}

impl Recovery {
    /// Schedules the next start of a shard just seen stopped; returns the wait.
    fn schedule(&mut self, now: Instant) -> Duration {
        let recently_started = self.started_at.is_some_and(|t| now.duration_since(t) < RESTART_FORGOTTEN_AFTER);
        self.backoff = if recently_started { (self.backoff * 2).min(RESTART_BACKOFF_MAX) } else { RESTART_BACKOFF_MIN };
        self.due = Some(now + self.backoff);
        self.backoff
    }
}

/// What starting a shard host needs.
pub struct ShardResources {
    pub me: NodeId,
    pub store: Store,
    pub raft: Arc<PeerRaft>,
    pub settings: RaftSettings,
    pub snapshot_root: PathBuf,
    pub cache_entities: usize,
    pub entity_limits: EntityLimits,
    pub runtime: NodeRuntime,
}

pub struct Shards {
    res: ShardResources,
    router: Router,
    view: Arc<ClusterView>,
    active_entities: Arc<AtomicUsize>,
    /// Serializes starting and stopping hosts.
    lifecycle: tokio::sync::Mutex<()>,
    /// Groups found empty (no replica of ours left) at the last look, for a second look.
    retiring: Mutex<BTreeMap<RaftGroupId, u32>>,
    /// Shards that stopped on an error, and when each was last started again.
    recoveries: Mutex<BTreeMap<RaftGroupId, Recovery>>,
}

impl Shards {
    pub fn new(res: ShardResources, router: Router, view: Arc<ClusterView>) -> Arc<Shards> {
        Arc::new(Shards {
            res,
            router,
            view,
            active_entities: Arc::new(AtomicUsize::new(0)),
            lifecycle: tokio::sync::Mutex::new(()),
            retiring: Mutex::new(BTreeMap::new()),
            recoveries: Mutex::new(BTreeMap::new()),
        })
    }

    pub fn me(&self) -> NodeId {
        self.res.me
    }

    pub fn host(&self, group: RaftGroupId) -> Option<Arc<ShardHost>> {
        self.router.local(group)
    }

    /// The host of `group`, started if this node does not host it yet.
    pub async fn ensure(&self, group: RaftGroupId) -> Result<Arc<ShardHost>, ShardError> {
        if let Some(h) = self.router.local(group) {
            return Ok(h);
        }
        let _guard = self.lifecycle.lock().await;
        if let Some(h) = self.router.local(group) {
            return Ok(h);
        }
        let entities =
            EntityHost::new(group, self.res.runtime.clone(), self.res.entity_limits, self.active_entities.clone())
                .await
                .map_err(|e| ShardError::Raft(format!("starting the entity supervisor of {group}: {e}")))?;
        let host = ShardHost::start(ShardParts {
            group,
            node: self.res.me,
            store: self.res.store.clone(),
            transport: self.res.raft.clone(),
            settings: self.res.settings.clone(),
            snapshot_root: self.res.snapshot_root.clone(),
            cache_entities: self.res.cache_entities,
            entities,
        })
        .await?;
        tracing::info!(%group, "hosting");
        self.router.add_local(host.clone());
        Ok(host)
    }

    /// Stops hosting `group` and deletes everything stored for it.
    async fn retire(&self, group: RaftGroupId) {
        let _guard = self.lifecycle.lock().await;
        let Some(host) = self.router.remove_local(group) else { return };
        tracing::info!(%group, "no longer a replica here: stopping and deleting its data");
        host.shutdown().await;
        for gauge in ["convoy_raft_leader", "convoy_raft_follower_lag_entries", "convoy_raft_stopped"] {
            metrics::gauge!(gauge, "group" => group.to_string()).set(0.0);
        }
        let mut batch = WriteBatch::new();
        let (lo, hi) = keys::state_machine(group);
        batch.delete_range(lo, hi);
        let writer = self.res.store.writer();
        let dropped = writer.write_log(vec![LogWrite::record(Record::Drop { group })], Durability::Durable).await;
        if let Err(e) = dropped.and(writer.write(batch, Durability::Durable).await) {
            tracing::error!(%group, error = %e, "deleting a retired group's data failed");
        }
        let _ = std::fs::remove_dir_all(self.res.snapshot_root.join(group.to_string()));
        self.view.forget_group(self.res.me, group);
    }

    /// What this node sees of every group it hosts.
    pub fn reports(&self) -> Vec<GroupReport> {
        self.router.local_hosts().iter().map(|h| report(h)).collect()
    }

    /// Keeps hosted groups in line with placement, and the view fed with local reports.
    /// Ends once `shutdown` is set.
    pub async fn run(
        self: Arc<Self>,
        mut cluster: watch::Receiver<Arc<ClusterState>>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        while !*shutdown.borrow_and_update() {
            let state = cluster.borrow_and_update().clone();
            self.reconcile(&state).await;
            self.restart_stopped().await;
            self.view.update(self.res.me, self.reports());
            for host in self.router.local_hosts() {
                record_raft_gauges(&host);
            }
            tokio::select! {
                _ = cluster.changed() => {}
                _ = shutdown.changed() => {}
                _ = tokio::time::sleep(RECONCILE_EVERY) => {}
            }
        }
    }

    async fn reconcile(&self, state: &ClusterState) {
        if !state.is_bootstrapped() {
            return;
        }
        for s in 0..state.shards {
            let group = RaftGroupId(s);
            if state.replicas(group).contains(&self.res.me)
                && let Err(e) = self.ensure(group).await
            {
                tracing::error!(%group, error = %e, "cannot host a shard placed here");
            }
        }
        // A group placed elsewhere stays until its membership let this node go (and a
        // second look agrees), so an in-progress move never loses a replica.
        for host in self.router.local_hosts() {
            let group = host.group();
            if group.is_meta() || state.replicas(group).contains(&self.res.me) {
                self.retiring.lock().remove(&group);
                continue;
            }
            let r = report(&host);
            let member = r.voters.contains(&self.res.me) || r.learners.contains(&self.res.me);
            let led_elsewhere = self.view.group(group).and_then(|g| g.leader).is_some_and(|l| l != self.res.me);
            if member || !led_elsewhere {
                self.retiring.lock().remove(&group);
                continue;
            }
            let looks = {
                let mut retiring = self.retiring.lock();
                let n = retiring.entry(group).or_insert(0);
                *n += 1;
                *n
            };
            if looks >= 2 {
                self.retiring.lock().remove(&group);
                self.retire(group).await;
            }
        }
    }

    /// Starts again every shard whose Raft stopped on an error (a storage write that failed),
    /// after a back-off: the new Raft reads what the old one stored, as after a restart of
    /// the node, and Raft brings it up to date from its peers. The metadata group is not
    /// restarted here: the controller and every cluster watcher hold on to it, so only a
    /// restart of the node brings it back (`/readyz` says so).
    async fn restart_stopped(&self) {
        let now = Instant::now();
        for host in self.router.local_hosts() {
            let group = host.group();
            let Some(fatal) = host.stopped() else { continue };
            if group.is_meta() {
                continue;
            }
            let due = {
                let mut recoveries = self.recoveries.lock();
                let r = recoveries.entry(group).or_insert(Recovery {
                    due: None,
                    backoff: RESTART_BACKOFF_MIN,
                    started_at: None,
                });
                match r.due {
                    Some(due) => due,
                    None => {
                        let wait = r.schedule(now);
                        tracing::error!(%group, error = %fatal, restart_in_ms = wait.as_millis() as u64,
                            "the shard's Raft stopped on an error; starting it again from what it stored");
                        now + wait
                    }
                }
            };
            if now >= due {
                self.restart(group).await;
            }
        }
    }

    /// Replaces `group`'s stopped host with a new one started from storage.
    async fn restart(&self, group: RaftGroupId) {
        {
            let _guard = self.lifecycle.lock().await;
            if let Some(stopped) = self.router.remove_local(group) {
                stopped.shutdown().await;
            }
        }
        if let Some(r) = self.recoveries.lock().get_mut(&group) {
            r.due = None;
            r.started_at = Some(Instant::now());
        }
        metrics::counter!("convoy_raft_group_restarts_total", "group" => group.to_string()).increment(1);
        match self.ensure(group).await {
            Ok(_) => tracing::warn!(%group, "the shard's Raft started again; it catches up from its peers"),
            // No host now: reconciling starts it once it can be.
            Err(e) => tracing::error!(%group, error = %e, "starting a stopped shard again failed; retrying"),
        }
    }

    /// Makes `group` a Raft group of `members` if it never was one (on the first member).
    pub async fn init(&self, group: RaftGroupId, members: Vec<(NodeId, NodeAddr)>) -> Result<(), ShardError> {
        let host = self.ensure(group).await?;
        host.initialize(members.into_iter().collect()).await
    }
}

/// A hosted group's state from its Raft metrics.
/// Per-shard Raft gauges: this replica's log and applied index, whether it leads, and as
/// leader how far its slowest follower is behind (0 elsewhere, so no stale lag lingers).
fn record_raft_gauges(host: &ShardHost) {
    let m = host.raft().metrics().borrow_watched().clone();
    let group = host.group().to_string();
    let last_log = m.last_log_index.unwrap_or(0);
    let leading = m.current_leader == Some(host.node()) && m.state == openraft::ServerState::Leader;
    let slowest = match (&m.replication, leading) {
        (Some(replication), true) => replication
            .iter()
            .filter(|(node, _)| **node != host.node())
            .map(|(_, matched)| last_log.saturating_sub(matched.as_ref().map_or(0, |l| l.index)))
            .max()
            .unwrap_or(0),
        _ => 0,
    };
    metrics::gauge!("convoy_raft_last_log_index", "group" => group.clone()).set(last_log as f64);
    metrics::gauge!("convoy_raft_applied_index", "group" => group.clone())
        .set(m.last_applied.map_or(0, |l| l.index) as f64);
    metrics::gauge!("convoy_raft_leader", "group" => group.clone()).set(if leading { 1.0 } else { 0.0 });
    metrics::gauge!("convoy_raft_stopped", "group" => group.clone()).set(if m.running_state.is_err() {
        1.0
    } else {
        0.0
    });
    metrics::gauge!("convoy_raft_follower_lag_entries", "group" => group).set(slowest as f64);
}

pub fn report(host: &ShardHost) -> GroupReport {
    let m = host.raft().metrics().borrow_watched().clone();
    let membership = m.membership_config.membership();
    GroupReport {
        group: host.group(),
        term: m.current_term,
        leader: m.current_leader,
        voters: membership.voter_ids().collect(),
        learners: membership.learner_ids().collect(),
        last_applied: m.last_applied.map_or(0, |l| l.index),
        last_log: m.last_log_index.unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stopped_after(r: &mut Recovery, started: Instant, ran: Duration) -> Duration {
        r.started_at = Some(started);
        r.schedule(started + ran)
    }

    #[test]
    fn a_shard_that_keeps_stopping_waits_longer_each_time_up_to_the_maximum() {
        let start = Instant::now();
        let mut r = Recovery { due: None, backoff: RESTART_BACKOFF_MIN, started_at: None };
        assert_eq!(r.schedule(start), RESTART_BACKOFF_MIN, "the first stop waits the minimum");
        assert_eq!(r.due, Some(start + RESTART_BACKOFF_MIN));
        let mut waits = Vec::new();
        for _ in 0..8 {
            waits.push(stopped_after(&mut r, start, Duration::from_millis(10)));
        }
        assert_eq!(waits[0], RESTART_BACKOFF_MIN * 2);
        assert!(waits.windows(2).all(|w| w[1] >= w[0]), "{waits:?}");
        assert_eq!(*waits.last().unwrap(), RESTART_BACKOFF_MAX);
    }

    #[test]
    fn a_shard_that_ran_long_enough_waits_the_minimum_again() {
        let start = Instant::now();
        let mut r = Recovery { due: None, backoff: RESTART_BACKOFF_MAX, started_at: None };
        let wait = stopped_after(&mut r, start, RESTART_FORGOTTEN_AFTER + Duration::from_secs(1));
        assert_eq!(wait, RESTART_BACKOFF_MIN);
    }
}
