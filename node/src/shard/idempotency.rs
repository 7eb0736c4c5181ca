//! Which idempotency records a shard may hold, in memory: a Bloom filter over the key of every
//! record, so that a message sent for the first time (nearly every one) is not looked up in
//! the store while it is applied, on every replica. A record it cannot rule out is looked up
//! as before; it answers only "surely not stored" or "maybe", so it is never wrong.
//!
//! The filter is whole only once a scan of the stored records has finished (in the background
//! after the shard opens, and again after a snapshot replaced the records); until then every
//! lookup goes to the store. Its size is fixed: with more records than it was sized for it
//! rules out fewer keys, and lookups fall back to the store.

use std::sync::Arc;
use std::thread::JoinHandle;

use fastbloom::AtomicBloomFilter;
use parking_lot::RwLock;

use super::RaftGroupId;
use crate::store::{Store, StoreError, keys};

/// Bits per shard: 1 MiB. About 2% of first-time keys still go to the store at a million
/// records per shard; at four million, most do.
const FILTER_BITS: usize = 8 << 20;
/// The record count the number of hash functions is chosen for.
const FILTER_SIZED_FOR: usize = 1 << 20;
/// The nice value of the scan: it takes the cores' spare time.
const SCAN_NICE: libc::c_int = 10;

struct Filter {
    bloom: AtomicBloomFilter,
    /// Bumped each time the stored records are replaced.
    generation: u64,
    /// Every stored record of this generation is in `bloom`.
    whole: bool,
}

pub struct IdempotencyFilter {
    // Inserts and lookups share the lock (the bits are atomic); replacing the records takes
    // it alone, so no lookup sees the bits half cleared.
    inner: RwLock<Filter>,
    ruled_out: metrics::Counter,
    looked_up: metrics::Counter,
}

impl IdempotencyFilter {
    pub fn new(group: RaftGroupId) -> IdempotencyFilter {
        let bloom = AtomicBloomFilter::with_num_bits(FILTER_BITS).expected_items(FILTER_SIZED_FOR);
        let lookups = |by: &'static str| metrics::counter!("convoy_idempotency_lookups_total", "group" => group.to_string(), "answered_by" => by);
        IdempotencyFilter {
            inner: RwLock::new(Filter { bloom, generation: 0, whole: false }),
            ruled_out: lookups("filter"),
            looked_up: lookups("store"),
        }
    }

    /// Records that a record is stored (or about to be) under `row`.
    pub fn insert(&self, row: &[u8]) {
        self.inner.read().bloom.insert(row);
    }

    /// Whether the shard surely holds no record under `row`; counts the answer.
    pub fn rules_out(&self, row: &[u8]) -> bool {
        let filter = self.inner.read();
        let ruled_out = filter.whole && !filter.bloom.contains(row);
        if ruled_out {
            self.ruled_out.increment(1)
        } else {
            self.looked_up.increment(1)
        }
        ruled_out
    }

    /// Whether every stored record is in the filter.
    pub fn is_whole(&self) -> bool {
        self.inner.read().whole
    }

    /// Forgets every key before the stored records are replaced: until a new scan finishes,
    /// every lookup goes to the store.
    pub fn invalidate(&self) {
        let mut filter = self.inner.write();
        filter.bloom.clear();
        filter.whole = false;
        filter.generation += 1;
    }

    /// Scans `group`'s stored records into the filter on a thread of its own; the filter is
    /// whole once the scan ends, unless the records were replaced meanwhile (`invalidate`
    /// also ends a scan under way, at its next record).
    pub fn scan_in_background(self: &Arc<Self>, group: RaftGroupId, store: Store) -> Option<JoinHandle<()>> {
        let filter = self.clone();
        let generation = self.inner.read().generation;
        let spawned = std::thread::Builder::new().name(format!("idem-scan-{}", group.0)).spawn(move || {
            // SAFETY: plain system call; `who = 0` is the calling thread only.
            unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, SCAN_NICE) };
            let started = std::time::Instant::now();
            match filter.scan(group, &store, generation) {
                Ok(Some(records)) => tracing::debug!(%group, records, ms = started.elapsed().as_millis() as u64,
                    "idempotency records scanned: first-time sends skip the store"),
                Ok(None) => {}
                Err(e) => tracing::warn!(%group, error = %e,
                    "scanning idempotency records failed: every retry check reads the store"),
            }
        });
        spawned
            .inspect_err(|e| {
                tracing::warn!(%group, error = %e, "cannot start the idempotency record scan: every retry check reads the store");
            })
            .ok()
    }

    /// Inserts every stored record of `generation`; how many, or `None` if the records were
    /// replaced before the scan ended.
    fn scan(&self, group: RaftGroupId, store: &Store, generation: u64) -> Result<Option<u64>, StoreError> {
        enum Stop {
            Replaced,
            Failed(StoreError),
        }
        impl From<StoreError> for Stop {
            fn from(e: StoreError) -> Stop {
                Stop::Failed(e)
            }
        }
        let (lo, hi) = keys::idempotency_records(group);
        let mut records = 0u64;
        let scanned = store.for_each_row(&lo, &hi, |row, _| {
            let filter = self.inner.read();
            if filter.generation != generation {
                return Err(Stop::Replaced);
            }
            filter.bloom.insert(&row);
            records += 1;
            Ok(())
        });
        match scanned {
            Ok(()) => {}
            Err(Stop::Replaced) => return Ok(None),
            Err(Stop::Failed(e)) => return Err(e),
        }
        let mut filter = self.inner.write();
        if filter.generation != generation {
            return Ok(None);
        }
        filter.whole = true;
        Ok(Some(records))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_out_only_when_whole_and_only_keys_it_never_saw() {
        let filter = IdempotencyFilter::new(RaftGroupId(1));
        filter.insert(b"a");
        assert!(!filter.rules_out(b"b"), "not whole yet: every lookup goes to the store");
        filter.inner.write().whole = true;
        assert!(!filter.rules_out(b"a"), "a key it saw is never ruled out");
        assert!(filter.rules_out(b"b"));
        filter.invalidate();
        assert!(!filter.is_whole());
        assert!(!filter.rules_out(b"b"), "replaced records: the store answers until a new scan");
    }

    #[tokio::test]
    async fn a_scan_covers_every_stored_record_unless_the_records_were_replaced_meanwhile() {
        use crate::store::{Durability, WriteBatch, WriterLimits};
        use convoy_actors::EntityKey;
        use convoy_actors::ids::GroupId;

        let dir = tempfile::tempdir().unwrap();
        let limits = WriterLimits { queue_depth: 64, max_batch_bytes: 1 << 20, max_staged_bytes: 1 << 16 };
        let (store, _writer) = Store::open(dir.path(), 8 << 20, limits).unwrap();
        let group = RaftGroupId(2);
        let entity = EntityKey::Group(GroupId::parse("g-1").unwrap());
        let rows: Vec<Vec<u8>> = (0..5_000).map(|n| keys::idempotency(group, &entity, &format!("u-1/m-{n}"))).collect();
        let mut batch = WriteBatch::new();
        for row in &rows {
            batch.put(row.clone(), vec![1]);
        }
        store.writer().write(batch, Durability::Visible).await.unwrap();

        let filter = Arc::new(IdempotencyFilter::new(group));
        let generation = filter.inner.read().generation;
        assert_eq!(filter.scan(group, &store, generation).unwrap(), Some(5_000));
        assert!(filter.is_whole());
        assert!(rows.iter().all(|row| !filter.rules_out(row)), "a stored record was ruled out");
        let ruled_out =
            (0..1_000).filter(|n| filter.rules_out(&keys::idempotency(group, &entity, &format!("u-2/m-{n}"))));
        assert!(ruled_out.count() > 950, "the filter rules out keys it never saw");

        filter.invalidate();
        assert_eq!(filter.scan(group, &store, generation).unwrap(), None, "a scan of replaced records");
        assert!(!filter.is_whole());
    }
}
