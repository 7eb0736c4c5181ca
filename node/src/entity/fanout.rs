//! Pushes to this node's own connections from what the shard applies here, on every
//! replica, leader or not. Each replica applies every committed entry once and in log
//! order, so the devices connected to it get a group's events in seq order whichever node
//! leads, and the leader sends an event only to the nodes that hold no replica.

use std::sync::{Arc, Weak};

use convoy_actors::behavior;
use tokio::sync::mpsc;

use super::Pusher;
use crate::shard::{AppliedEffects, AppliedSink, ShardData};
use crate::telemetry::trace::{self, TARGET as TRACE};

/// Applied batches waiting for the fan-out task, per shard. When full, pushes are dropped
/// (counted): clients catch up with `msg.sync`.
const QUEUE: usize = 4096;
/// A replica catching up (after a partition, a pause, a restart or a move) applies a
/// backlog at once; pushed, it would overflow its devices' outbound queues. Commands more
/// than this many entries behind the commit frontier the leader reported are not pushed
/// (counted as `stale`): the devices catch up with `msg.sync`. A replica keeping up applies
/// within a batch or two of the frontier.
const CATCH_UP_ENTRIES: u64 = 256;

pub struct ReplicaFanout {
    batches: mpsc::Sender<Vec<Arc<AppliedEffects>>>,
}

impl ReplicaFanout {
    /// Starts the shard's fan-out task; it ends when the shard's data is dropped. `frontier`
    /// is the last log index the leader reported committed (0 when none is known).
    pub fn start(
        data: &Arc<ShardData>,
        pusher: Arc<dyn Pusher>,
        frontier: impl Fn() -> u64 + Send + 'static,
    ) -> Arc<ReplicaFanout> {
        let (batches, rx) = mpsc::channel(QUEUE);
        tokio::spawn(run(Arc::downgrade(data), pusher, frontier, rx));
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
    frontier: impl Fn() -> u64,
    mut batches: mpsc::Receiver<Vec<Arc<AppliedEffects>>>,
) {
    while let Some(batch) = batches.recv().await {
        let Some(data) = data.upgrade() else { return };
        let frontier = frontier();
        for effects in batch {
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
            let span = trace::continued(
                effects.traceparent.as_deref(),
                || tracing::info_span!(target: TRACE, "fanout", entity = %effects.key, trace_id = tracing::field::Empty),
            );
            span.in_scope(|| {
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
