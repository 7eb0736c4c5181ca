//! Pushes to this node's own connections from what the shard applies here, on every voter
//! of the shard, leader or not. Each replica applies every committed entry once and in log
//! order, so the devices connected to it get a group's events in seq order whichever node
//! leads. Whether an entry is this node's to push is decided by the voters as of that
//! entry, which every replica and the leader read alike: a voter pushes it, and the leader
//! sends it to every other node (learners, nodes without a replica), so each node gets each
//! event once.

use std::sync::{Arc, Weak};

use convoy_actors::behavior;
use tokio::sync::mpsc;

use super::Pusher;
use crate::shard::{AppliedEffects, AppliedSink, NodeId, ShardData};
use crate::telemetry::trace::{self, TARGET as TRACE};

/// Applied batches waiting for the fan-out task, per shard. When full, pushes are dropped
/// (counted): clients catch up with `msg.sync`.
const QUEUE: usize = 4096;
/// A replica catching up (after a partition, a pause or a restart) applies a backlog at
/// once; pushed, it would overflow its devices' outbound queues. Entries more than this many
/// behind the newest this node knows of (the commit the leader reported, or its own log) are
/// not pushed (counted as `stale`): the devices catch up with `msg.sync`. A replica keeping
/// up applies within a batch or two of it (`raft.max_payload_entries` is 512 at most per
/// append).
const CATCH_UP_ENTRIES: u64 = 1024;

pub struct ReplicaFanout {
    batches: mpsc::Sender<Vec<Arc<AppliedEffects>>>,
}

impl ReplicaFanout {
    /// Starts the shard's fan-out task on node `me`; it ends when the shard's data is
    /// dropped. `frontier` is the newest log index the node knows of.
    pub fn start(
        data: &Arc<ShardData>,
        pusher: Arc<dyn Pusher>,
        me: NodeId,
        frontier: impl Fn() -> u64 + Send + 'static,
    ) -> Arc<ReplicaFanout> {
        let (batches, rx) = mpsc::channel(QUEUE);
        tokio::spawn(run(Arc::downgrade(data), pusher, me, frontier, rx));
        Arc::new(ReplicaFanout { batches })
    }
}

impl AppliedSink for ReplicaFanout {
    fn applied(&self, effects: Vec<Arc<AppliedEffects>>) {
        if self.batches.try_send(effects).is_err() {
            metrics::counter!("convoy_pushes_dropped_total", "reason" => "effects_queue_full").increment(1);
        }
    }
}

async fn run(
    data: Weak<ShardData>,
    pusher: Arc<dyn Pusher>,
    me: NodeId,
    frontier: impl Fn() -> u64,
    mut batches: mpsc::Receiver<Vec<Arc<AppliedEffects>>>,
) {
    while let Some(batch) = batches.recv().await {
        let Some(data) = data.upgrade() else { return };
        let frontier = frontier();
        for effects in batch {
            if !effects.voters.contains(&me) {
                // Not a voter at this entry: the leader sends it here.
                continue;
            }
            if frontier.saturating_sub(effects.index) > CATCH_UP_ENTRIES {
                metrics::counter!("convoy_pushes_dropped_total", "reason" => "stale").increment(1);
                continue;
            }
            // The state now, as the leader's actors read it: at least as new as the apply.
            let state = match data.state(&effects.key) {
                Ok(state) => state,
                Err(e) => {
                    tracing::warn!(entity = %effects.key, error = %e, "reading state to push applied events; they are dropped, clients catch up with sync");
                    continue;
                }
            };
            span(&effects).in_scope(|| {
                behavior::for_each_event(
                    &effects.key,
                    state.as_deref(),
                    &effects.appended,
                    &effects.notices,
                    |users, event| pusher.deliver_here(users, &event),
                )
            });
        }
    }
}

/// The `fanout` span of an applied command's pushes, in the command's trace: on a voter for
/// its own devices, on the leader for the other nodes.
pub(super) fn span(effects: &AppliedEffects) -> tracing::Span {
    trace::continued(
        effects.traceparent.as_deref(),
        || tracing::info_span!(target: TRACE, "fanout", entity = %effects.key, trace_id = tracing::field::Empty),
    )
}
