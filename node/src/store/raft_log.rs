//! openraft log storage for one Raft group.
//!
//! Entries are stored in segments: each append writes its (consecutive) entries under the
//! key of the first one, so the log costs one engine insert per append rather than one per
//! entry; that is most of the difference between sled keeping up with the load and not.
//! Reads find the segment holding the first wanted index and walk forward.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;

use openraft::entry::RaftEntry;
use openraft::storage::{IOFlushed, LogState, RaftLogReader, RaftLogStorage};
use parking_lot::Mutex;

use super::engine::WriteBatch;
use super::{Durability, Store, StoreError, codec, keys};
use crate::shard::{Entry, LogId, RaftGroupId, TypeConfig, Vote};

/// Entries per segment at most (an append larger than this is split).
const SEGMENT_ENTRIES: usize = 256;
/// Encoded bytes per segment, roughly at most.
const SEGMENT_BYTES: usize = 1 << 20;
/// Segments fetched from the engine per step while reading.
const READ_STEP: usize = 8;
/// Segments deleted per storage job after a purge. A purge after a snapshot can free tens
/// of thousands of segments: one job deleting them all held every write of the node for
/// 90 to 140 ms; 64 deletes add well under a millisecond to the cycle they ride on.
const PURGE_DELETES_PER_JOB: usize = 64;
/// The pause between two such jobs: the deletes ride on one storage cycle in several.
const PURGE_PACE: std::time::Duration = std::time::Duration::from_millis(4);

/// The newest entries, in memory. `append` returns as soon as its entries are here
/// (openraft requires them readable on return, not durable), so the Raft core never waits
/// for a storage cycle; and applying or replicating recent entries never decodes segments
/// back from the engine.
#[derive(Default)]
struct Tail {
    entries: BTreeMap<u64, Entry>,
    /// One past the last index of the log as openraft sees it, once anything was appended
    /// or truncated: entries the engine still holds beyond it are being truncated.
    end: Option<u64>,
    /// Entries up to here are in the engine too, so they may be evicted.
    visible_through: u64,
}

/// Recent entries kept in memory per group (those not yet written are always kept).
const TAIL_ENTRIES: usize = 4096;

impl Tail {
    fn evict(&mut self) {
        while self.entries.len() > TAIL_ENTRIES {
            match self.entries.first_key_value() {
                Some((&i, _)) if i <= self.visible_through => {
                    self.entries.pop_first();
                }
                _ => break,
            }
        }
    }
}

#[derive(Clone)]
pub struct RaftLog {
    group: RaftGroupId,
    store: Store,
    tail: Arc<Mutex<Tail>>,
}

impl RaftLog {
    pub fn new(group: RaftGroupId, store: Store) -> RaftLog {
        RaftLog { group, store, tail: Arc::default() }
    }

    /// Entries with index in `[start, end)`: the engine's, overlaid by the unwritten tail.
    fn read(&self, start: u64, end: u64) -> Result<Vec<Entry>, StoreError> {
        let (end, pending): (u64, Vec<Entry>) = {
            let tail = self.tail.lock();
            let end = tail.end.map_or(end, |e| e.min(end));
            (
                end,
                if start < end { tail.entries.range(start..end).map(|(_, e)| e.clone()).collect() } else { Vec::new() },
            )
        };
        // The tail is consecutive entries: what it holds from `start` on needs no engine
        // read (applying and replicating recent entries reads only memory).
        let contiguous = match (pending.first(), pending.last()) {
            (Some(first), Some(last)) => last.index() - first.index() + 1 == pending.len() as u64,
            _ => false,
        };
        let stored_end = if contiguous { pending[0].index() } else { end };
        let stored = self.read_stored(start, stored_end)?;
        if pending.is_empty() {
            return Ok(stored);
        }
        if contiguous {
            let mut out = stored;
            out.extend(pending);
            return Ok(out);
        }
        let mut merged: BTreeMap<u64, Entry> = stored.into_iter().map(|e| (e.index(), e)).collect();
        merged.extend(pending.into_iter().map(|e| (e.index(), e)));
        Ok(merged.into_values().collect())
    }

    fn decode_segment(bytes: &[u8]) -> Result<Vec<Entry>, StoreError> {
        codec::decode("raft log segment", bytes)
    }

    /// Entries with index in `[start, end)` the engine holds, ascending.
    fn read_stored(&self, start: u64, end: u64) -> Result<Vec<Entry>, StoreError> {
        let mut out = Vec::new();
        if start >= end {
            return Ok(out);
        }
        let (lo, hi) = keys::segments(self.group);
        let engine = self.store.engine();
        // The segment holding `start` begins at or before it.
        let first = engine.range(Bound::Included(&lo), Bound::Included(&keys::segment(self.group, start)), true, 1)?;
        let mut cursor = match first.into_iter().next() {
            Some((k, _)) => k,
            None => keys::segment(self.group, start),
        };
        loop {
            let batch = engine.range(Bound::Included(&cursor), Bound::Excluded(&hi), false, READ_STEP)?;
            let Some((last_key, _)) = batch.last() else { return Ok(out) };
            let mut next = last_key.clone();
            next.push(0);
            for (_, v) in &batch {
                for e in Self::decode_segment(v)? {
                    let i = e.index();
                    if i >= end {
                        return Ok(out);
                    }
                    if i >= start {
                        out.push(e);
                    }
                }
            }
            if batch.len() < READ_STEP {
                return Ok(out);
            }
            cursor = next;
        }
    }

    fn last_entry(&self) -> Result<Option<Entry>, StoreError> {
        let (lo, hi) = keys::segments(self.group);
        let last = self.store.engine().range(Bound::Included(&lo), Bound::Excluded(&hi), true, 1)?;
        match last.into_iter().next() {
            None => Ok(None),
            Some((_, v)) => Ok(Self::decode_segment(&v)?.pop()),
        }
    }

    /// Deletes the segments whose entries are all at or below `index`, the purge point.
    async fn delete_purged_segments(&self, index: u64) -> Result<(), StoreError> {
        let starts = self.segment_starts_through(index.saturating_add(1))?;
        // A segment is wholly purged when the next one starts at or before index + 1.
        let mut purged: Vec<u64> = starts.windows(2).filter(|pair| pair[1] <= index + 1).map(|pair| pair[0]).collect();
        // The last segment has no successor to tell: look at its last entry.
        if let Some(&last) = starts.last()
            && let Some(e) = self.last_entry()?
            && e.index() <= index
        {
            purged.push(last);
        }
        for starts in purged.chunks(PURGE_DELETES_PER_JOB) {
            let mut batch = WriteBatch::new();
            for &start in starts {
                batch.delete(keys::segment(self.group, start));
            }
            self.store.writer().write(batch, Durability::Visible).await?;
            tokio::time::sleep(PURGE_PACE).await;
        }
        Ok(())
    }

    /// First indexes of the segments starting at or before `index`.
    fn segment_starts_through(&self, index: u64) -> Result<Vec<u64>, StoreError> {
        let (lo, _) = keys::segments(self.group);
        let rows = self.store.engine().range(
            Bound::Included(&lo),
            Bound::Included(&keys::segment(self.group, index)),
            false,
            usize::MAX,
        )?;
        Ok(rows.iter().filter_map(|(k, _)| keys::segment_index(k)).collect())
    }
}

impl RaftLogReader<TypeConfig> for RaftLog {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        let start = match range.start_bound() {
            Bound::Included(x) => *x,
            Bound::Excluded(x) => x.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(x) => x.saturating_add(1),
            Bound::Excluded(x) => *x,
            Bound::Unbounded => u64::MAX,
        };
        Ok(self.read(start, end)?)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        Ok(self.store.get("raft vote", &keys::vote(self.group))?)
    }
}

impl RaftLogStorage<TypeConfig> for RaftLog {
    type LogReader = RaftLog;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let last_purged_log_id: Option<LogId> = self.store.get("raft purged log id", &keys::purged(self.group))?;
        // Entries at or below the purge point may linger in a partly purged segment.
        let last = match self.tail.lock().entries.last_key_value() {
            Some((_, e)) => Some(e.clone()),
            None => self.last_entry()?,
        };
        let last_log_id = match (last, last_purged_log_id) {
            (Some(e), Some(p)) if e.index() <= p.index() => Some(p),
            (Some(e), _) => Some(e.log_id()),
            (None, p) => p,
        };
        Ok(LogState { last_purged_log_id, last_log_id })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        // A vote must be durable before the node acts on it.
        Ok(self.store.put(keys::vote(self.group), vote, Durability::Durable).await?)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        // Not needed for safety: it lets a restarted node apply what it knows is committed
        // without waiting for a leader.
        Ok(self.store.put(keys::committed(self.group), &committed, Durability::Visible).await?)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        Ok(self.store.get::<Option<LogId>>("raft committed log id", &keys::committed(self.group))?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<TypeConfig>) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        // Segments go in index order, so a crash keeps a shorter log, never a gap; nothing
        // in them is acknowledged before the flush.
        let mut batch = WriteBatch::in_order();
        let mut segment: Vec<Entry> = Vec::new();
        let mut segment_bytes = 0;
        let mut appended: Vec<Entry> = Vec::new();
        let flush_segment = |segment: &mut Vec<Entry>, batch: &mut WriteBatch| {
            if let Some(first) = segment.first() {
                batch.put(keys::segment(self.group, first.index()), codec::encode(&*segment));
                segment.clear();
            }
        };
        for entry in entries {
            segment_bytes += entry_size_hint(&entry);
            appended.push(entry.clone());
            segment.push(entry);
            if segment.len() >= SEGMENT_ENTRIES || segment_bytes >= SEGMENT_BYTES {
                flush_segment(&mut segment, &mut batch);
                segment_bytes = 0;
            }
        }
        flush_segment(&mut segment, &mut batch);
        metrics::counter!("convoy_raft_appends_total").increment(1);
        let written: Vec<LogId> = appended.last().map(|e| e.log_id()).into_iter().collect();
        {
            let mut tail = self.tail.lock();
            if let Some(last) = written.last() {
                tail.end = Some(last.index() + 1);
            }
            tail.entries.extend(appended.into_iter().map(|e| (e.index(), e)));
        }
        let started = std::time::Instant::now();
        let tail = self.tail.clone();
        let on_visible = move |r: Result<(), StoreError>| {
            // Now the engine serves them too: they may be evicted from memory.
            if r.is_ok()
                && let Some(last) = written.last()
            {
                let mut tail = tail.lock();
                tail.visible_through = tail.visible_through.max(last.index());
                tail.evict();
            }
        };
        self.store
            .writer()
            .submit_with_visibility(batch, on_visible, move |r| {
                metrics::histogram!("convoy_raft_append_durable_seconds").record(started.elapsed().as_secs_f64());
                callback.io_completed(r.map_err(io::Error::from))
            })
            .await?;
        Ok(())
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        let start = last_log_id.as_ref().map_or(0, |l| l.index() + 1);
        {
            let mut tail = self.tail.lock();
            tail.entries.split_off(&start);
            tail.end = Some(start);
            tail.visible_through = tail.visible_through.min(start.saturating_sub(1));
        }
        let (_, hi) = keys::segments(self.group);
        let mut batch = WriteBatch::new();
        batch.delete_range(keys::segment(self.group, start), hi);
        // A segment that straddles `start` keeps its head.
        if let Some(&first) = self.segment_starts_through(start.saturating_sub(1))?.last()
            && first < start
        {
            let kept: Vec<Entry> = self.read_stored(first, start)?;
            if !kept.is_empty() {
                batch.put(keys::segment(self.group, first), codec::encode(&kept));
            }
        }
        Ok(self.store.writer().write(batch, Durability::Durable).await?)
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        let index = log_id.index();
        {
            let mut tail = self.tail.lock();
            let kept = tail.entries.split_off(&(index + 1));
            tail.entries = kept;
        }
        // Record the purge point first: entries at or below it are never read again, so the
        // segments that hold only such entries go afterwards, in the background, a few per
        // storage cycle. One that a crash leaves behind is found by the next purge.
        let mut batch = WriteBatch::new();
        batch.put(keys::purged(self.group), codec::encode(&log_id));
        self.store.writer().write(batch, Durability::Visible).await?;
        metrics::counter!("convoy_raft_log_purges_total").increment(1);
        let log = self.clone();
        tokio::spawn(async move {
            if let Err(e) = log.delete_purged_segments(index).await {
                tracing::warn!(group = %log.group, error = %e, "deleting purged log segments failed; the next purge retries");
            }
        });
        Ok(())
    }
}

fn entry_size_hint(e: &Entry) -> usize {
    use openraft::EntryPayload;
    match &e.payload {
        EntryPayload::Normal(_) => 256,
        _ => 64,
    }
}
