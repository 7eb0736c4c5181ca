//! What a group's state machine shares with the rest of the node: committed entity
//! states (cached, bounded), stored entries, the timer index, and the
//! hooks that hand applied effects to this node's connections and the leader's entity actors.

use std::collections::{BTreeSet, HashMap};
use std::num::NonZeroUsize;
use std::ops::Bound;
use std::sync::{Arc, OnceLock};

use convoy_actors::domain::{EntityState, LogIndex, LogReader, Timer, TimerChange};
use convoy_actors::group::Entry as LogEntry;
use convoy_actors::{EntityKey, StorageFault, Timestamp};
use lru::LruCache;
use parking_lot::{Mutex, RwLock};
use tokio::sync::{Notify, watch};

use super::idempotency::IdempotencyFilter;
use super::state_machine::{AppliedEffects, AppliedSink};
use super::{IdempotencyRecord, RaftGroupId};
use crate::cluster::meta::ClusterState;
use crate::store::{Store, StoreError, codec, keys};

/// Deadlines of every entity in the group, earliest first.
#[derive(Default)]
struct TimerIndex {
    by_due: BTreeSet<(Timestamp, EntityKey, Timer)>,
    due_of: HashMap<(EntityKey, Timer), Timestamp>,
}

impl TimerIndex {
    fn set(&mut self, key: EntityKey, timer: Timer, due: Timestamp) {
        self.clear(&key, &timer);
        self.by_due.insert((due, key.clone(), timer));
        self.due_of.insert((key, timer), due);
    }
    fn clear(&mut self, key: &EntityKey, timer: &Timer) {
        if let Some(due) = self.due_of.remove(&(key.clone(), *timer)) {
            self.by_due.remove(&(due, key.clone(), *timer));
        }
    }
}

pub struct ShardData {
    group: RaftGroupId,
    /// The metadata group's replicated cluster state (absent for shards).
    cluster: Option<watch::Sender<Arc<ClusterState>>>,
    store: Store,
    cache: Mutex<LruCache<EntityKey, Option<Arc<EntityState>>>>,
    /// The log index through which applied entries are visible to readers. openraft counts
    /// an entry applied once its batch is queued for the writer; readers see it only when
    /// the batch is visible, and batches become visible in order.
    visible: watch::Sender<u64>,
    timers: Mutex<TimerIndex>,
    timers_changed: Notify,
    /// The leader's entity actors, while this node serves the shard.
    sink: RwLock<Option<Arc<dyn AppliedSink>>>,
    /// This node's connections: every voter pushes what it applies to its own clients.
    fanout: OnceLock<Arc<dyn AppliedSink>>,
    idempotency: Arc<IdempotencyFilter>,
    /// The scan filling `idempotency`, if one was started.
    scan: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// A scan under way holds the store: end it, so the store closes with the shard.
impl Drop for ShardData {
    fn drop(&mut self) {
        self.idempotency.invalidate();
        if let Some(scan) = self.scan.get_mut().take() {
            let _ = scan.join();
        }
    }
}

fn fault(e: StoreError) -> StorageFault {
    StorageFault(e.to_string())
}

impl ShardData {
    pub fn new(group: RaftGroupId, store: Store, cache_entities: usize) -> ShardData {
        let cap = NonZeroUsize::new(cache_entities.max(16)).expect("at least 16");
        let cluster = group.is_meta().then(|| watch::channel(Arc::new(ClusterState::default())).0);
        ShardData {
            group,
            cluster,
            store,
            cache: Mutex::new(LruCache::new(cap)),
            visible: watch::Sender::new(0),
            timers: Mutex::new(TimerIndex::default()),
            timers_changed: Notify::new(),
            sink: RwLock::new(None),
            fanout: OnceLock::new(),
            idempotency: Arc::new(IdempotencyFilter::new(group)),
            scan: Mutex::new(None),
        }
    }

    pub fn group(&self) -> RaftGroupId {
        self.group
    }

    /// The cluster state as applied here (metadata group only).
    pub fn cluster(&self) -> Option<watch::Receiver<Arc<ClusterState>>> {
        self.cluster.as_ref().map(|c| c.subscribe())
    }

    pub(super) fn cluster_now(&self) -> Option<Arc<ClusterState>> {
        self.cluster.as_ref().map(|c| c.borrow().clone())
    }

    pub(super) fn publish_cluster(&self, state: Arc<ClusterState>) {
        if let Some(c) = &self.cluster {
            c.send_replace(state);
        }
    }

    /// Loads the stored cluster state (startup, snapshot install).
    pub(super) fn reload_cluster(&self) -> Result<(), StoreError> {
        if self.cluster.is_some() {
            let state: ClusterState =
                self.store.get("cluster state", &keys::cluster_state(self.group))?.unwrap_or_default();
            self.publish_cluster(Arc::new(state));
        }
        Ok(())
    }

    /// The committed state of `key`, `None` if it does not exist. A cache miss reads the
    /// engine and does not fill the cache: only the state machine fills it, so a reader
    /// can never put back a state older than one just applied.
    pub fn state(&self, key: &EntityKey) -> Result<Option<Arc<EntityState>>, StoreError> {
        if let Some(hit) = self.cache.lock().get(key) {
            metrics::counter!("convoy_entity_cache_hits_total").increment(1);
            return Ok(hit.clone());
        }
        metrics::counter!("convoy_entity_cache_misses_total").increment(1);
        Ok(self.store.get::<EntityState>("entity state", &keys::state(self.group, key))?.map(Arc::new))
    }

    /// Entries through `index` are applied and readers see them.
    pub(super) fn made_visible(&self, index: u64) {
        self.visible.send_if_modified(|visible| {
            let advanced = index > *visible;
            if advanced {
                *visible = index;
            }
            advanced
        });
    }

    /// Resolves once readers see every entry through `index`. A linearizable read waits for
    /// this after openraft's read barrier: the barrier waits for entries to be applied, which
    /// here means queued, and a leader still writing a backlog (one that caught up just
    /// before it took over) would otherwise answer from states older than what it acked.
    pub async fn visible_through(&self, index: u64) {
        let mut visible = self.visible.subscribe();
        // The sender lives as long as `self`, which the caller holds.
        let _ = visible.wait_for(|v| *v >= index).await;
    }

    /// Makes states written by the state machine visible to readers.
    pub(super) fn publish(&self, states: impl Iterator<Item = (EntityKey, Option<Arc<EntityState>>)>) {
        let mut cache = self.cache.lock();
        for (k, s) in states {
            cache.put(k, s);
        }
    }

    pub(super) fn apply_timer_changes(&self, changes: Vec<(EntityKey, TimerChange)>) {
        if changes.is_empty() {
            return;
        }
        let mut idx = self.timers.lock();
        for (key, change) in changes {
            match change {
                TimerChange::Set { timer, due } => idx.set(key, timer, due),
                TimerChange::Cleared { timer } => idx.clear(&key, &timer),
            }
        }
        metrics::gauge!("convoy_timers", "group" => self.group.to_string()).set(idx.by_due.len() as f64);
        drop(idx);
        self.timers_changed.notify_waiters();
    }

    /// Rebuilds the timer index from storage (startup, snapshot install).
    pub(super) fn reload_timers(&self) -> Result<(), StoreError> {
        let (lo, hi) = keys::timers(self.group);
        let rows: Vec<(Vec<u8>, (EntityKey, Timer, Timestamp))> = self.store.scan("timer", (&lo, &hi), usize::MAX)?;
        let mut idx = TimerIndex::default();
        for (_, (key, timer, due)) in rows {
            idx.set(key, timer, due);
        }
        *self.timers.lock() = idx;
        self.timers_changed.notify_waiters();
        Ok(())
    }

    /// Forgets cached states after the stored ones were replaced wholesale (after
    /// [`ShardData::replacing`]), and reads the new ones.
    pub(super) fn reset(&self) -> Result<(), StoreError> {
        self.cache.lock().clear();
        self.scan_idempotency_records();
        self.reload_cluster()?;
        self.reload_timers()
    }

    /// The stored rows are about to be replaced wholesale: what is known of them no longer holds.
    pub(super) fn replacing(&self) {
        self.idempotency.invalidate();
    }

    /// Learns the stored idempotency records in the background (startup, snapshot install):
    /// until then every retry check reads the store.
    pub(super) fn scan_idempotency_records(&self) {
        let scan = self.idempotency.scan_in_background(self.group, self.store.clone());
        // A scan of records since replaced has ended or ends at its next record.
        if let Some(previous) = std::mem::replace(&mut *self.scan.lock(), scan) {
            let _ = previous.join();
        }
    }

    /// An idempotency record is being written under `row`.
    pub(super) fn idempotency_recorded(&self, row: &[u8]) {
        self.idempotency.insert(row);
    }

    /// Whether every stored idempotency record is known in memory.
    pub fn idempotency_records_known(&self) -> bool {
        self.idempotency.is_whole()
    }

    /// The earliest deadline, if any.
    pub fn next_due(&self) -> Option<(Timestamp, EntityKey, Timer)> {
        self.timers.lock().by_due.first().cloned()
    }

    /// Deadlines at or before `now`, earliest first, at most `limit`.
    pub fn due(&self, now: Timestamp, limit: usize) -> Vec<(Timestamp, EntityKey, Timer)> {
        self.timers.lock().by_due.iter().take_while(|(due, _, _)| *due <= now).take(limit).cloned().collect()
    }

    /// Resolves when the timer index changes.
    pub async fn timers_changed(&self) {
        self.timers_changed.notified().await
    }

    pub fn set_sink(&self, sink: Option<Arc<dyn AppliedSink>>) {
        *self.sink.write() = sink;
    }

    /// Whether applied effects go anywhere: the node serves the shard.
    pub(super) fn has_sink(&self) -> bool {
        self.sink.read().is_some()
    }

    /// Where this node's own connections get what the shard applies (once, at start).
    pub fn set_fanout(&self, fanout: Arc<dyn AppliedSink>) {
        let _ = self.fanout.set(fanout);
    }

    pub(super) fn deliver(&self, effects: Vec<AppliedEffects>) {
        let effects: Vec<Arc<AppliedEffects>> = effects.into_iter().map(Arc::new).collect();
        if let Some(fanout) = self.fanout.get() {
            fanout.applied(effects.clone());
        }
        if let Some(sink) = self.sink.read().as_ref() {
            sink.applied(effects);
        }
    }
}

impl ShardData {
    /// The stored idempotency record of `idem` in `key`'s log, if any.
    pub(super) fn idempotency_record(
        &self,
        key: &EntityKey,
        idem: &str,
    ) -> Result<Option<IdempotencyRecord>, StorageFault> {
        let row = keys::idempotency(self.group, key, idem);
        if self.idempotency.rules_out(&row) {
            return Ok(None);
        }
        self.store.get("idempotency record", &row).map_err(fault)
    }
}

impl LogIndex for ShardData {
    fn find_idempotent(&self, key: &EntityKey, idem: &str) -> Result<Option<(u64, Timestamp)>, StorageFault> {
        Ok(self.idempotency_record(key, idem)?.map(|r| (r.seq, r.ts)))
    }
}

impl LogReader for ShardData {
    fn read_entries(&self, key: &EntityKey, after: u64, limit: u32) -> Result<Vec<LogEntry>, StorageFault> {
        let start = keys::entry(self.group, key, after.saturating_add(1));
        let (_, end) = keys::entries(self.group, key);
        let rows = self
            .store
            .engine()
            .range(Bound::Included(&start), Bound::Excluded(&end), false, limit as usize)
            .map_err(fault)?;
        rows.into_iter().map(|(_, v)| codec::decode::<LogEntry>("log entry", &v).map_err(fault)).collect()
    }
}

#[cfg(test)]
mod tests {
    use futures::FutureExt;

    use super::*;
    use crate::store::WriterLimits;

    /// A read waits until what its barrier covers is visible, never longer, and visibility
    /// never moves back (a snapshot's index or a late batch cannot undo a later one).
    #[test]
    fn reads_wait_for_visibility_through_their_index() {
        let dir = tempfile::tempdir().unwrap();
        let limits = WriterLimits { queue_depth: 8, max_batch_bytes: 1 << 20, max_staged_bytes: 1 << 20 };
        let (store, _writer) = Store::open(dir.path(), 1 << 20, limits).unwrap();
        let data = ShardData::new(RaftGroupId(1), store, 16);

        data.made_visible(4);
        assert!(data.visible_through(4).now_or_never().is_some(), "index 4 is visible");
        let mut waiting = Box::pin(data.visible_through(7));
        assert!(waiting.as_mut().now_or_never().is_none(), "index 7 is queued, not visible");
        data.made_visible(6);
        assert!(waiting.as_mut().now_or_never().is_none(), "6 is not 7");
        data.made_visible(9);
        assert!(waiting.as_mut().now_or_never().is_some(), "a batch through 9 covers 7");
        data.made_visible(5);
        assert!(data.visible_through(9).now_or_never().is_some(), "visibility never moves back");
    }
}
