//! openraft log storage for one Raft group, over the node's Raft log files
//! (`log_files.rs`), which the storage writer appends to.
//!
//! Each append is written as records of at most `RECORD_ENTRIES` consecutive entries. The
//! newest entries also stay in memory, so applying or replicating them never reads a file.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;

use openraft::entry::RaftEntry;
use openraft::storage::{IOFlushed, LogState, RaftLogReader, RaftLogStorage};
use parking_lot::Mutex;

use super::log_files::{LogFiles, LogWrite, Record};
use super::{Durability, Store, StoreError};
use crate::shard::{Entry, LogId, RaftGroupId, TypeConfig, Vote};

/// Entries per record at most (an append larger than this is split).
const RECORD_ENTRIES: usize = 256;
/// Encoded bytes per record, roughly at most.
const RECORD_BYTES: usize = 1 << 20;

/// The newest entries, in memory. `append` returns as soon as its entries are here
/// (openraft requires them readable on return, not durable), so the Raft core never waits
/// for a storage cycle; and applying or replicating recent entries never reads a file.
#[derive(Default)]
struct Tail {
    entries: BTreeMap<u64, Entry>,
    /// One past the last index of the log as openraft sees it, once anything was appended
    /// or truncated: entries the files still hold beyond it are being truncated.
    end: Option<u64>,
    /// Entries up to here are in the files too, so they may be evicted.
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

    fn files(&self) -> &LogFiles {
        self.store.log_files()
    }

    /// Entries with index in `[start, end)`: the files', overlaid by the unwritten tail.
    fn read(&self, start: u64, end: u64) -> Result<Vec<Entry>, StoreError> {
        let (end, pending): (u64, Vec<Entry>) = {
            let tail = self.tail.lock();
            let end = tail.end.map_or(end, |e| e.min(end));
            (
                end,
                if start < end { tail.entries.range(start..end).map(|(_, e)| e.clone()).collect() } else { Vec::new() },
            )
        };
        // The tail is consecutive entries: what it holds from `start` on needs no file read
        // (applying and replicating recent entries reads only memory).
        let contiguous = match (pending.first(), pending.last()) {
            (Some(first), Some(last)) => last.index() - first.index() + 1 == pending.len() as u64,
            _ => false,
        };
        let stored_end = if contiguous { pending[0].index() } else { end };
        let stored = if start < stored_end { self.files().read(self.group, start, stored_end)? } else { Vec::new() };
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
        Ok(self.files().vote(self.group))
    }
}

impl RaftLogStorage<TypeConfig> for RaftLog {
    type LogReader = RaftLog;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let (last_purged_log_id, stored_last) = self.files().log_state(self.group);
        let last = match self.tail.lock().entries.last_key_value() {
            Some((_, e)) => Some(e.log_id()),
            None => stored_last,
        };
        let last_log_id = match (last, &last_purged_log_id) {
            (Some(l), Some(p)) if l.index() <= p.index() => Some(*p),
            (l, p) => l.or(*p),
        };
        Ok(LogState { last_purged_log_id, last_log_id })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        // A vote must be durable before the node acts on it.
        let write = LogWrite::record(Record::Vote { group: self.group, vote: *vote });
        Ok(self.store.writer().write_log(vec![write], Durability::Durable).await?)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        // Not needed for safety: it lets a restarted node apply what it knows is committed
        // without waiting for a leader. It rides on the next sync.
        let write = LogWrite::record(Record::Committed { group: self.group, committed });
        Ok(self.store.writer().write_log(vec![write], Durability::Visible).await?)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        Ok(self.files().committed(self.group))
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<TypeConfig>) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let appended: Vec<Entry> = entries.into_iter().collect();
        let Some(last) = appended.last().map(|e| e.log_id()) else {
            callback.io_completed(Ok(()));
            return Ok(());
        };
        // Records in index order: a crash keeps a shorter log, never a gap; nothing in them
        // is acknowledged before the sync.
        let mut writes = Vec::new();
        let mut from = 0;
        let mut bytes = 0;
        for (i, entry) in appended.iter().enumerate() {
            bytes += entry_size_hint(entry);
            if i + 1 - from >= RECORD_ENTRIES || bytes >= RECORD_BYTES || i + 1 == appended.len() {
                writes.extend(LogWrite::entries(self.group, &appended[from..=i]));
                from = i + 1;
                bytes = 0;
            }
        }
        metrics::counter!("convoy_raft_appends_total").increment(1);
        {
            let mut tail = self.tail.lock();
            tail.end = Some(last.index() + 1);
            tail.entries.extend(appended.into_iter().map(|e| (e.index(), e)));
        }
        let started = std::time::Instant::now();
        let tail = self.tail.clone();
        let on_visible = move |r: Result<(), StoreError>| {
            // Now the files serve them too: they may be evicted from memory.
            if r.is_ok() {
                let mut tail = tail.lock();
                tail.visible_through = tail.visible_through.max(last.index());
                tail.evict();
            }
        };
        self.store
            .writer()
            .append_log(writes, on_visible, move |r| {
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
        let write = LogWrite::record(Record::Truncate { group: self.group, after: last_log_id });
        Ok(self.store.writer().write_log(vec![write], Durability::Durable).await?)
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        let index = log_id.index();
        {
            let mut tail = self.tail.lock();
            let kept = tail.entries.split_off(&(index + 1));
            tail.entries = kept;
        }
        // Entries at or below the purge point are never read again; the files holding only
        // such entries are deleted as the writer moves on to new files.
        let write = LogWrite::record(Record::Purge { group: self.group, upto: log_id });
        self.store.writer().write_log(vec![write], Durability::Visible).await?;
        metrics::counter!("convoy_raft_log_purges_total").increment(1);
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
