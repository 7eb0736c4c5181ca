//! The storage engine behind a small trait, so a second engine can sit beside sled.
//! Reads may come from any thread; writes come only from the storage writer.

use std::ops::Bound;
use std::path::Path;

use super::StoreError;

pub type KeyValue = (Vec<u8>, Vec<u8>);

/// One change in a batch. `DeleteRange` covers `[start, end)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Put(Vec<u8>, Vec<u8>),
    Delete(Vec<u8>),
    DeleteRange(Vec<u8>, Vec<u8>),
}

/// Changes applied in order and atomically: a crash keeps all of them or none.
#[derive(Debug, Default, Clone)]
pub struct WriteBatch {
    ops: Vec<Op>,
    bytes: usize,
    /// The engine takes in whatever it holds staged with this batch, even if it is empty.
    checkpoint: bool,
}

impl WriteBatch {
    pub fn new() -> Self {
        Self::default()
    }
    /// An empty batch that takes every staged row to the engine: written durably, it makes
    /// everything written before it durable too.
    pub fn checkpoint() -> Self {
        WriteBatch { checkpoint: true, ..Self::default() }
    }
    /// Whether the engine may apply it op by op, which costs sled far less than an atomic
    /// batch: a single op is all or nothing anyway (a range delete is not: the engine expands
    /// it into many; nor is a checkpoint).
    pub fn may_keep_a_prefix(&self) -> bool {
        self.ops.len() <= 1 && !self.has_range_delete() && !self.checkpoint
    }
    pub fn is_checkpoint(&self) -> bool {
        self.checkpoint
    }
    pub fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.bytes += key.len() + value.len();
        self.ops.push(Op::Put(key, value));
    }
    pub fn delete(&mut self, key: Vec<u8>) {
        self.bytes += key.len();
        self.ops.push(Op::Delete(key));
    }
    /// Deletes the keys in `[start, end)` present when the batch is applied. Put it before
    /// any put of the same batch that falls in the range: it does not see those.
    pub fn delete_range(&mut self, start: Vec<u8>, end: Vec<u8>) {
        self.bytes += start.len() + end.len();
        self.ops.push(Op::DeleteRange(start, end));
    }
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
    pub fn len(&self) -> usize {
        self.ops.len()
    }
    pub fn bytes(&self) -> usize {
        self.bytes
    }
    pub fn ops(&self) -> &[Op] {
        &self.ops
    }
    pub fn has_range_delete(&self) -> bool {
        self.ops.iter().any(|op| matches!(op, Op::DeleteRange(..)))
    }
    /// Appends `other`'s ops.
    pub fn extend(&mut self, other: WriteBatch) {
        self.checkpoint |= other.checkpoint;
        self.bytes += other.bytes;
        self.ops.extend(other.ops);
    }
}

pub trait KvEngine: Send + Sync + 'static {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;
    /// Pairs within the bounds, ascending (or descending), at most `limit`.
    fn range(
        &self,
        start: Bound<&[u8]>,
        end: Bound<&[u8]>,
        reverse: bool,
        limit: usize,
    ) -> Result<Vec<KeyValue>, StoreError>;
    /// Applies every op atomically with respect to crashes (an empty batch still takes any
    /// staged rows to the engine).
    fn apply(&self, batch: WriteBatch) -> Result<(), StoreError>;
    /// Applies the ops of a batch that [`WriteBatch::may_keep_a_prefix`] one by one. Engines
    /// with nothing cheaper apply it atomically.
    fn apply_in_order(&self, batch: WriteBatch) -> Result<(), StoreError> {
        self.apply(batch)
    }
    /// Holds `batch`, visible to reads, until an atomic `apply` takes it to the engine ahead
    /// of its own writes. `false`: this engine does not hold it (or is full); apply it
    /// instead, atomically.
    fn stage(&self, _batch: &WriteBatch) -> Result<bool, StoreError> {
        Ok(false)
    }
    /// Bytes held staged (see [`KvEngine::stage`]).
    fn staged_bytes(&self) -> usize {
        0
    }
    /// Makes everything applied so far durable.
    fn flush(&self) -> Result<(), StoreError>;
    fn size_on_disk(&self) -> Result<u64, StoreError>;
}

/// sled 0.34, one tree for everything so one batch is one atomic write. Its background
/// flusher is off: durability is the storage writer's explicit flush.
pub struct SledEngine {
    db: sled::Db,
}

fn io(e: sled::Error) -> StoreError {
    StoreError::Engine(e.to_string())
}

impl SledEngine {
    pub fn open(dir: &Path, cache_capacity_bytes: u64) -> Result<SledEngine, StoreError> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_capacity_bytes)
            .flush_every_ms(None)
            .mode(sled::Mode::HighThroughput)
            .open()
            .map_err(|e| StoreError::Open { path: dir.to_path_buf(), detail: e.to_string() })?;
        Ok(SledEngine { db })
    }
}

impl KvEngine for SledEngine {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.db.get(key).map_err(io)?.map(|v| v.to_vec()))
    }

    fn range(
        &self,
        start: Bound<&[u8]>,
        end: Bound<&[u8]>,
        reverse: bool,
        limit: usize,
    ) -> Result<Vec<KeyValue>, StoreError> {
        let iter = self.db.range::<&[u8], _>((start, end));
        let collect = |it: &mut dyn Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>>| {
            it.take(limit).map(|r| r.map(|(k, v)| (k.to_vec(), v.to_vec())).map_err(io)).collect()
        };
        if reverse { collect(&mut iter.rev()) } else { collect(&mut { iter }) }
    }

    fn apply(&self, batch: WriteBatch) -> Result<(), StoreError> {
        let mut sb = sled::Batch::default();
        for op in batch.ops() {
            match op {
                Op::Put(k, v) => sb.insert(k.as_slice(), v.as_slice()),
                Op::Delete(k) => sb.remove(k.as_slice()),
                Op::DeleteRange(start, end) => {
                    // sled has no range delete: expand it against the current contents.
                    // Earlier puts of this same batch are not in the tree yet, so the
                    // writer never merges a range delete behind other writes.
                    for kv in self.db.range::<&[u8], _>(start.as_slice()..end.as_slice()) {
                        sb.remove(kv.map_err(io)?.0);
                    }
                }
            }
        }
        self.db.apply_batch(sb).map_err(io)
    }

    /// One insert or remove per op: unlike an `apply_batch`, which seals two of sled's log
    /// buffers (each a job that wakes all of sled's idle I/O threads), it seals none.
    fn apply_in_order(&self, batch: WriteBatch) -> Result<(), StoreError> {
        assert!(batch.may_keep_a_prefix(), "an atomic batch applied op by op");
        for op in batch.ops() {
            match op {
                Op::Put(k, v) => self.db.insert(k.as_slice(), v.as_slice()).map(drop).map_err(io)?,
                Op::Delete(k) => self.db.remove(k.as_slice()).map(drop).map_err(io)?,
                Op::DeleteRange(..) => unreachable!("may_keep_a_prefix excludes range deletes"),
            }
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.db.flush().map(|_| ()).map_err(io)
    }

    fn size_on_disk(&self) -> Result<u64, StoreError> {
        self.db.size_on_disk().map_err(io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(b: &mut WriteBatch, k: &str) {
        b.put(k.as_bytes().to_vec(), vec![1]);
    }

    #[test]
    fn only_single_ops_may_go_op_by_op() {
        let mut one = WriteBatch::new();
        put(&mut one, "a");
        assert!(one.may_keep_a_prefix(), "one op is all or nothing anyway");
        let mut two = one.clone();
        put(&mut two, "b");
        assert!(!two.may_keep_a_prefix());
        let mut wipe = WriteBatch::new();
        wipe.delete_range(b"a".to_vec(), b"b".to_vec());
        assert!(!wipe.may_keep_a_prefix(), "a range delete is never cut");
        assert!(!WriteBatch::checkpoint().may_keep_a_prefix(), "a checkpoint takes the staged rows in, atomically");
        let mut merged = WriteBatch::new();
        merged.extend(WriteBatch::checkpoint());
        assert!(merged.is_checkpoint(), "merged with a checkpoint, a batch is one");
    }
}
