//! Shard hosts: one Raft group per shard, and what the node does for the shards it leads.
//!
//! A `ShardHost` owns its group's Raft, its state machine data and, while this node leads
//! the group, the entity actors and timers of the shard's entities. Leadership is only
//! trusted after a linearizable read barrier: by then every entry of earlier terms is
//! applied, so actors start from the replicated state.

mod data;
mod idempotency;
pub mod network;
mod state_machine;
mod timer_grid;
mod types;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use convoy_actors::behavior::Request;
use convoy_actors::domain::{self, Command, Query, Reply};
use convoy_actors::{EntityKey, ErrorCode, Rejection, Timestamp};
pub use data::ShardData;
use openraft::error::{ClientWriteError, RaftError};
use openraft::type_config::async_runtime::WatchReceiver;
use openraft::vote::RaftLeaderId;
use openraft::{ChangeMembers, Config, ReadPolicy, ServerState};
pub use state_machine::{AppliedEffects, AppliedSink, ShardStateMachine};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::Instrument;
pub use types::*;

use crate::cluster::meta::MetaCommand;
use crate::entity::EntityHost;
use crate::store::raft_log::RaftLog;
use crate::store::{Store, StoreError};
use crate::telemetry::trace::{self, TARGET as TRACE};
use network::{Network, NetworkFactory, RaftTransport};

/// Raft timing and sizing, from `raft.*` in the configuration.
#[derive(Debug, Clone)]
pub struct RaftSettings {
    pub heartbeat: Duration,
    pub election_min: Duration,
    pub election_max: Duration,
    pub snapshot_every_entries: u64,
    pub keep_entries_after_snapshot: u64,
    pub max_payload_entries: u64,
}

impl RaftSettings {
    fn openraft_config(&self, group: RaftGroupId) -> Result<Arc<Config>, ShardError> {
        timer_grid::set_spacing_for_heartbeat(self.heartbeat);
        let config = Config {
            cluster_name: format!("convoy-{group}"),
            heartbeat_interval: self.heartbeat.as_millis() as u64,
            election_timeout_min: self.election_min.as_millis() as u64,
            election_timeout_max: self.election_max.as_millis() as u64,
            max_payload_entries: self.max_payload_entries,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(self.snapshot_every_entries),
            max_in_snapshot_log_to_keep: self.keep_entries_after_snapshot,
            enable_pre_vote: Some(true),
            ..Default::default()
        };
        Ok(Arc::new(config.validate().map_err(|e| ShardError::Config(e.to_string()))?))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    #[error("invalid raft configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("raft: {0}")]
    Raft(String),
}

/// Whether this node may serve the shard's entities.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Leadership {
    /// Someone else leads (or nobody yet).
    Following { leader: Option<NodeId> },
    /// This node leads and has passed the read barrier of its term.
    Leading { term: u64 },
}

pub struct ShardHost {
    group: RaftGroupId,
    node: NodeId,
    raft: Raft,
    data: Arc<ShardData>,
    entities: Arc<EntityHost>,
    leadership: watch::Receiver<Leadership>,
    /// A leader that has not heard from a majority for this long is cut off: it answers
    /// `unavailable` at once instead of holding requests it cannot commit.
    cut_off_after: Duration,
    tasks: Vec<JoinHandle<()>>,
    reconciling: std::sync::atomic::AtomicBool,
    /// `convoy_raft_commit_seconds{group}`, registered once (not looked up per command).
    commit_seconds: metrics::Histogram,
}

pub fn now() -> Timestamp {
    Timestamp(SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0))
}

fn unavailable(message: impl Into<String>) -> Rejection {
    Rejection::new(ErrorCode::Unavailable, message)
}

/// Everything a shard host needs to start.
pub struct ShardParts<T> {
    pub group: RaftGroupId,
    pub node: NodeId,
    pub store: Store,
    pub transport: Arc<T>,
    pub settings: RaftSettings,
    pub snapshot_root: PathBuf,
    pub cache_entities: usize,
    pub entities: Arc<EntityHost>,
}

impl ShardHost {
    pub async fn start<T: RaftTransport>(parts: ShardParts<T>) -> Result<Arc<ShardHost>, ShardError> {
        let ShardParts { group, node, store, transport, settings, snapshot_root, cache_entities, entities } = parts;
        let data = Arc::new(ShardData::new(group, store.clone(), cache_entities));
        let sm = ShardStateMachine::open(group, store.clone(), data.clone(), snapshot_root)?;
        let log = RaftLog::new(group, store);
        let network = NetworkFactory::new(Network::new(transport), group);
        let raft = Raft::new(node, settings.openraft_config(group)?, network, log, sm)
            .await
            .map_err(|e| ShardError::Raft(e.to_string()))?;
        let (tx, rx) = watch::channel(Leadership::Following { leader: None });
        entities.attach(data.clone(), node, &raft);
        let watcher = tokio::spawn(watch_leadership(group, node, raft.clone(), data.clone(), entities.clone(), tx));
        Ok(Arc::new(ShardHost {
            group,
            node,
            raft,
            data,
            entities,
            leadership: rx,
            cut_off_after: settings.election_max * 2,
            tasks: vec![watcher],
            reconciling: Default::default(),
            commit_seconds: metrics::histogram!("convoy_raft_commit_seconds", "group" => group.to_string()),
        }))
    }

    pub fn group(&self) -> RaftGroupId {
        self.group
    }

    pub fn node(&self) -> NodeId {
        self.node
    }

    pub fn raft(&self) -> &Raft {
        &self.raft
    }

    pub fn data(&self) -> &Arc<ShardData> {
        &self.data
    }

    pub fn entities(&self) -> &Arc<EntityHost> {
        &self.entities
    }

    pub fn leadership(&self) -> Leadership {
        self.leadership.borrow().clone()
    }

    pub fn watch_leadership(&self) -> watch::Receiver<Leadership> {
        self.leadership.clone()
    }

    /// Why the group's Raft stopped (a storage error it cannot go on from), if it did.
    pub fn stopped(&self) -> Option<String> {
        self.raft.metrics().borrow_watched().running_state.as_ref().err().map(|fatal| fatal.to_string())
    }

    /// Makes the group a Raft group of `members` if it never was one. Idempotent.
    pub async fn initialize(&self, members: BTreeMap<NodeId, NodeAddr>) -> Result<(), ShardError> {
        if self.raft.is_initialized().await.map_err(|e| ShardError::Raft(e.to_string()))? {
            return Ok(());
        }
        match self.raft.initialize(members).await {
            Ok(()) => Ok(()),
            Err(RaftError::APIError(openraft::error::InitializeError::NotAllowed(_))) => Ok(()),
            Err(e) => Err(ShardError::Raft(e.to_string())),
        }
    }

    /// Appends a cluster metadata command (metadata group, on its leader).
    pub async fn propose_meta(&self, cmd: MetaCommand) -> Result<(), String> {
        match self.raft.client_write(RaftRequest::Meta(cmd)).await {
            Ok(resp) => match resp.response() {
                ApplyResult::Meta(r) => r.clone().map_err(|e| e.to_string()),
                other => Err(format!("a metadata command applied to {other:?}")),
            },
            Err(e) => Err(format!("{}: {e}", self.group)),
        }
    }

    /// Adds `node` as a learner without waiting for it to catch up.
    pub async fn add_learner(&self, node: NodeId, addr: NodeAddr) -> Result<(), String> {
        self.raft.add_learner(node, addr, false).await.map(|_| ()).map_err(|e| format!("{}: {e}", self.group))
    }

    /// Makes `voters` the group's voters (every one must already be a member).
    pub async fn change_voters(&self, voters: BTreeSet<NodeId>) -> Result<(), String> {
        self.raft
            .change_membership(ChangeMembers::ReplaceAllVoters(voters), false)
            .await
            .map(|_| ())
            .map_err(|e| format!("{}: {e}", self.group))
    }

    /// As the leader: makes the group's voters exactly `members`: the new ones join as
    /// learners and catch up first, then one membership change swaps the voters. Runs in
    /// the background (catching up can take long); one at a time per group.
    pub async fn reconcile(self: &Arc<Self>, members: Vec<(NodeId, NodeAddr)>) -> Result<(), String> {
        if self.reconciling.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return Ok(());
        }
        let host = self.clone();
        tokio::spawn(async move {
            let result = async {
                let m = host.raft.metrics().borrow_watched().clone();
                let current = m.membership_config.membership().clone();
                for (node, addr) in &members {
                    if current.get_node(node).is_none() {
                        tracing::info!(group = %host.group, node = %addr, "adding a replica; it catches up as a learner first");
                        host.raft.add_learner(*node, addr.clone(), true).await.map_err(|e| e.to_string())?;
                    }
                }
                let voters: BTreeSet<NodeId> = members.iter().map(|(n, _)| *n).collect();
                host.change_voters(voters).await
            }
            .await;
            if let Err(e) = result {
                tracing::warn!(group = %host.group, error = %e, "moving replicas failed; the controller will retry");
            }
            host.reconciling.store(false, std::sync::atomic::Ordering::SeqCst);
        });
        Ok(())
    }

    /// As the leader: hands leadership to `to`, only if `to` answers this leader's replication.
    /// openraft stops taking writes the moment a transfer begins and takes them again only
    /// after an election, so handing over to a replica that cannot take over (one that does
    /// not host the shard yet, or has gone) would cost the shard its writes for that long.
    pub async fn transfer_leader(&self, to: NodeId) -> Result<(), String> {
        let silence = {
            let metrics = self.raft.metrics();
            let m = metrics.borrow_watched();
            let answered = m.heartbeat.as_ref().and_then(|h| h.get(&to)).and_then(Option::as_ref);
            answered.map(|t| openraft::Instant::elapsed(&**t))
        };
        match silence {
            Some(silence) if silence <= self.cut_off_after => {
                self.raft.trigger().transfer_leader(to).await.map_err(|e| format!("{}: {e}", self.group))
            }
            Some(silence) => Err(format!(
                "{}: {to:x} last answered this leader {} ms ago; not handing it the leadership",
                self.group,
                silence.as_millis()
            )),
            None => {
                Err(format!("{}: {to:x} has never answered this leader; not handing it the leadership", self.group))
            }
        }
    }

    fn check_leading(&self) -> Result<(), Rejection> {
        match &*self.leadership.borrow() {
            Leadership::Leading { .. } => {}
            Leadership::Following { .. } => return Err(unavailable(format!("{} is not led here", self.group))),
        }
        match self.cut_off_for() {
            Some(silence) => Err(unavailable(format!(
                "{} is led here but no majority has answered for {} ms (this node may be cut off); retry",
                self.group,
                silence.as_millis()
            ))),
            None => Ok(()),
        }
    }

    /// How long no majority has acknowledged this leader, once that is past the cut-off time
    /// (this node is likely the one cut off); `None` before that, and for a single voter.
    pub fn cut_off_for(&self) -> Option<Duration> {
        self.quorum_silence().filter(|silence| *silence > self.cut_off_after)
    }

    /// How long since a majority last acknowledged this leader; `None` for a single voter.
    fn quorum_silence(&self) -> Option<Duration> {
        let metrics = self.raft.metrics();
        let m = metrics.borrow_watched();
        if m.membership_config.membership().voter_ids().count() <= 1 {
            return None;
        }
        m.last_quorum_acked.as_ref().map(|t| openraft::Instant::elapsed(&**t))
    }

    /// Runs `op` while this node leads: gives up with `unavailable` as soon as it stops
    /// leading or is cut off from the majority, rather than when the caller's timeout ends.
    async fn while_leading<T>(&self, op: impl Future<Output = Result<T, Rejection>>) -> Result<T, Rejection> {
        let watchdog = async {
            // The caller checked just now: the first look is one period later.
            let period = Duration::from_millis(100);
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
            loop {
                tick.tick().await;
                if let Err(r) = self.check_leading() {
                    return r;
                }
            }
        };
        tokio::select! {
            result = op => result,
            lost = watchdog => Err(lost),
        }
    }

    /// Hands `req` to the entity's actor (started on demand).
    pub async fn request(&self, key: EntityKey, req: Request) -> Result<Reply, Rejection> {
        self.check_leading()?;
        self.entities.request(key, req).await
    }

    /// Appends a command for `key` and waits for it to be applied.
    pub async fn propose(&self, key: EntityKey, cmd: Command) -> Result<Reply, Rejection> {
        self.check_leading()?;
        let span = trace::child(
            || tracing::info_span!(target: TRACE, "raft.commit", shard = %self.group, index = tracing::field::Empty, batch_size = tracing::field::Empty),
        );
        let req = RaftRequest::Entity(Box::new(EntityCommand {
            key,
            cmd,
            at: now(),
            traceparent: span.in_scope(trace::traceparent),
            origin: RequestOrigin::current(),
        }));
        let started = std::time::Instant::now();
        let written =
            self.while_leading(async { Ok(self.raft.client_write(req).await) }).instrument(span.clone()).await?;
        self.commit_seconds.record(started.elapsed().as_secs_f64());
        match written {
            Ok(resp) => match resp.response() {
                ApplyResult::Entity { reply, batch } => {
                    span.record("index", resp.log_id().index()).record("batch_size", batch);
                    (**reply).clone()
                }
                ApplyResult::Meta(_) | ApplyResult::Nothing => {
                    Err(Rejection::new(ErrorCode::Internal, "an entity command applied to something else"))
                }
            },
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                Err(unavailable(format!("{} moved to another leader ({:?}); retry", self.group, f.leader_id)))
            }
            Err(e) => Err(unavailable(format!("{} could not commit: {e}", self.group))),
        }
    }

    /// A linearizable read of `key`'s committed state.
    pub async fn query(&self, key: EntityKey, q: Query) -> Result<Reply, Rejection> {
        self.check_leading()?;
        self.while_leading(async {
            let read = self
                .raft
                .ensure_linearizable(ReadPolicy::ReadIndex)
                .await
                .map_err(|e| unavailable(format!("{} cannot confirm its leadership: {e}", self.group)))?;
            self.data.visible_through(read.index()).await;
            Ok(())
        })
        .await?;
        let state = self.data.state(&key).map_err(|e| Rejection::new(ErrorCode::Internal, e.to_string()))?;
        domain::query(&key, state.as_deref(), q, &*self.data)
            .map_err(|e| Rejection::new(ErrorCode::Internal, e.to_string()))?
    }

    pub async fn shutdown(&self) {
        for t in &self.tasks {
            t.abort();
        }
        self.entities.stop_all();
        self.data.set_sink(None);
        let _ = self.raft.shutdown().await;
    }
}

/// How long a new leader waits for the entries its read barrier covers to become visible
/// before it looks at its leadership again (a backlog it caught up on is still being written).
const BARRIER_VISIBLE_WAIT: Duration = Duration::from_secs(2);

/// Follows the group's Raft metrics. On gaining leadership: read barrier, then serve
/// entities and run timers. On losing it: stop every entity actor of the shard at once,
/// so none acts on a stale view.
async fn watch_leadership(
    group: RaftGroupId,
    node: NodeId,
    raft: Raft,
    data: Arc<ShardData>,
    entities: Arc<EntityHost>,
    tx: watch::Sender<Leadership>,
) {
    // Server metrics change with state, vote, leader and membership only; the full metrics
    // also change with every heartbeat a leader hears back, which would wake this task for
    // nothing several times per heartbeat interval.
    let mut metrics = raft.server_metrics();
    let mut timers: Option<JoinHandle<()>> = None;
    loop {
        let (state, term, leader) = {
            let m = metrics.borrow_and_update();
            (m.state, m.vote.leader_id().term(), m.current_leader)
        };
        let leading = state == ServerState::Leader && leader == Some(node);
        let was_leading_term = match &*tx.borrow() {
            Leadership::Leading { term } => Some(*term),
            Leadership::Following { .. } => None,
        };
        if leading && was_leading_term != Some(term) {
            // Entities start from states that hold everything committed before this term.
            let confirmed = match raft.ensure_linearizable(ReadPolicy::ReadIndex).await {
                Ok(read) => {
                    tokio::time::timeout(BARRIER_VISIBLE_WAIT, data.visible_through(read.index())).await.is_ok()
                }
                Err(_) => false,
            };
            if !confirmed {
                // Not confirmed yet (or lost again): look again shortly, metrics may not move.
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            tracing::info!(%group, term, "leading");
            metrics::counter!("convoy_leader_changes_total", "group" => group.to_string()).increment(1);
            entities.start_serving();
            timers.get_or_insert_with(|| tokio::spawn(crate::entity::run_timers(data.clone(), entities.clone())));
            let _ = tx.send(Leadership::Leading { term });
        } else if !leading && was_leading_term.is_some() {
            tracing::info!(%group, ?leader, "stepped down");
            if let Some(t) = timers.take() {
                t.abort();
            }
            entities.stop_all();
            let _ = tx.send(Leadership::Following { leader });
        } else if !leading {
            tx.send_if_modified(|l| {
                let next = Leadership::Following { leader };
                if *l != next {
                    *l = next;
                    true
                } else {
                    false
                }
            });
        }
        if metrics.changed().await.is_err() {
            if let Some(t) = timers.take() {
                t.abort();
            }
            entities.stop_all();
            return;
        }
    }
}
