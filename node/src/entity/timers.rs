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

/// A dispatched timer is not dispatched again for this long (its apply removes it or sets
/// it anew; a timer set anew, with another due time, is dispatched at once).
const REFIRE_AFTER: Duration = Duration::from_secs(2);
/// Timers dispatched per wake-up at most.
const FIRE_BATCH: usize = 256;
/// Longest sleep between looks at the index (clock jumps, missed notifications).
const MAX_SLEEP: Duration = Duration::from_secs(1);

pub async fn run_timers(data: Arc<ShardData>, entities: Arc<EntityHost>) {
    let mut dispatched: HashMap<(EntityKey, Timer), (Instant, Timestamp)> = HashMap::new();
    loop {
        let at = now();
        dispatched.retain(|_, (when, _)| when.elapsed() < REFIRE_AFTER);
        for (due, key, timer) in data.due(at, FIRE_BATCH + dispatched.len()) {
            if dispatched.get(&(key.clone(), timer)).is_some_and(|(_, d)| *d == due) {
                continue;
            }
            dispatched.insert((key.clone(), timer), (Instant::now(), due));
            metrics::counter!("convoy_timers_fired_total").increment(1);
            let entities = entities.clone();
            tokio::spawn(async move {
                if let Err(e) = entities.request(key.clone(), domain::fire(timer)).await {
                    tracing::warn!(entity = %key, ?timer, error = %e, "firing a timer failed; it stays due and is retried");
                }
            });
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
