//! Timers of the shard's entities, fired on the leader. The deadlines are replicated
//! state (the timer index of `ShardData`); this task only notices when one is due and
//! asks the entity to fire it. Firing is a command whose apply is idempotent, so a timer
//! fired twice (by two leaders, or twice by one) takes effect once.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use convoy_actors::domain::{self, Timer};
use convoy_actors::{EntityKey, Timestamp};

use super::EntityHost;
use crate::shard::{ShardData, now};

/// A dispatched timer is not dispatched again for this long, nor while its firing is still
/// running (an outbox firing waits for slow webhook receivers: firing it again meanwhile
/// would post the same events twice at once and spend their retries early). Its apply
/// removes it or sets it anew; a timer set anew, with another due time, is dispatched at once.
const REFIRE_AFTER: Duration = Duration::from_secs(2);
/// A firing still running after this long no longer holds its timer back.
const FIRING_GIVEN_UP: Duration = Duration::from_secs(60);
/// Timers dispatched per wake-up at most.
const FIRE_BATCH: usize = 256;
/// Longest sleep between looks at the index (clock jumps, missed notifications).
const MAX_SLEEP: Duration = Duration::from_secs(1);

/// A timer handed to its entity, and the firing that runs for it.
struct Dispatched {
    at: Instant,
    due: Timestamp,
    firing: tokio::task::JoinHandle<()>,
}

impl Dispatched {
    /// Whether the timer, while still due at the same time, must wait before firing again.
    fn holds_back(&self) -> bool {
        let elapsed = self.at.elapsed();
        elapsed < REFIRE_AFTER || (!self.firing.is_finished() && elapsed < FIRING_GIVEN_UP)
    }
}

pub async fn run_timers(data: Arc<ShardData>, entities: Arc<EntityHost>) {
    let mut dispatched: HashMap<(EntityKey, Timer), Dispatched> = HashMap::new();
    loop {
        let at = now();
        dispatched.retain(|_, d| d.holds_back());
        for (due, key, timer) in data.due(at, FIRE_BATCH + dispatched.len()) {
            if dispatched.get(&(key.clone(), timer)).is_some_and(|d| d.due == due) {
                continue;
            }
            metrics::counter!("convoy_timers_fired_total").increment(1);
            let entities = entities.clone();
            let firing_key = key.clone();
            let firing = tokio::spawn(async move {
                if let Err(e) = entities.request(firing_key.clone(), domain::fire(timer)).await {
                    tracing::warn!(entity = %firing_key, ?timer, error = %e, "firing a timer failed; it stays due and is retried");
                }
            });
            dispatched.insert((key, timer), Dispatched { at: Instant::now(), due, firing });
        }
        let sleep = match data.next_due() {
            Some((due, _, _)) if due > at => Duration::from_millis(at.millis_until(due)).min(MAX_SLEEP),
            Some(_) => Duration::from_millis(100).min(MAX_SLEEP),
            None => MAX_SLEEP,
        };
        tokio::select! {
            _ = tokio::time::sleep(sleep) => {}
            _ = data.timers_changed() => {}
        }
    }
}
