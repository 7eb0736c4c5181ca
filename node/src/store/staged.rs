//! Writes that need only be visible wait in memory, and reach the engine together in one
//! atomic batch: when staging is full, or ahead of any other atomic batch.
//!
//! Why: every sled batch seals two of its log buffers, and each sealed buffer is written by
//! sled's I/O thread pool, whose every job wakes all of its idle threads. A state machine
//! apply (visible, never flushed on its own) cost as much as a Raft append. Staged, it costs
//! a map insert; many applies reach sled as one batch, and rewrites of the same row (an
//! entity's state, the applied position) as one write.
//!
//! A crash loses what is staged, which `Durability::Visible` allows: the rows of one apply
//! stay together (they are staged and taken to the engine whole), and a state machine that
//! lost applies replays them from its log, whose purge is staged along with them.
//!
//! Reads see staged rows over the engine's. Only the storage writer applies and flushes;
//! rows may be staged from any thread (a state machine stages its applies itself, so an
//! apply does not wait for the writer), and reads come from anywhere.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::Arc;

use parking_lot::RwLock;

use super::StoreError;
use super::engine::{KeyValue, KvEngine, Op, WriteBatch};

/// The latest staged value of each key (`None` is a delete), with the number of the stage
/// call that put it there.
#[derive(Default)]
struct Staged {
    rows: BTreeMap<Vec<u8>, (u64, Option<Vec<u8>>)>,
    bytes: usize,
    stages: u64,
}

pub struct StagedEngine {
    inner: Arc<dyn KvEngine>,
    staged: RwLock<Staged>,
    /// Staged bytes at most; a batch that would go over is applied, taking the rest along.
    /// The writer takes them to the engine long before, from a quarter of this on.
    max_staged_bytes: usize,
}

/// How many times the bytes at which the writer takes staged rows to the engine may be
/// staged before staging refuses: room for what is staged while it does.
pub const STAGED_HEADROOM: usize = 4;

impl StagedEngine {
    pub fn new(inner: Arc<dyn KvEngine>, max_staged_bytes: usize) -> StagedEngine {
        StagedEngine { inner, staged: RwLock::new(Staged::default()), max_staged_bytes }
    }

    /// Takes the staged rows to the engine, ahead of `batch`, in one atomic batch (two when
    /// `batch` deletes a range: a range delete sees only what the engine already holds).
    fn apply_with_staged(&self, batch: WriteBatch) -> Result<(), StoreError> {
        let mut held = WriteBatch::new();
        let mut taken = Vec::new();
        for (key, (stage, value)) in &self.staged.read().rows {
            match value {
                Some(value) => held.put(key.clone(), value.clone()),
                None => held.delete(key.clone()),
            }
            taken.push((key.clone(), *stage));
        }
        if held.is_empty() {
            return if batch.is_empty() { Ok(()) } else { self.inner.apply(batch) };
        }
        if batch.has_range_delete() {
            self.inner.apply(held)?;
            self.forget(taken);
            return self.inner.apply(batch);
        }
        let mut all = held;
        all.extend(batch);
        self.inner.apply(all)?;
        // Forgotten only now: until the engine holds them, readers find them here.
        self.forget(taken);
        Ok(())
    }

    /// Forgets staged rows the engine now holds, unless staged again meanwhile.
    fn forget(&self, taken: Vec<(Vec<u8>, u64)>) {
        let mut staged = self.staged.write();
        for (key, stage) in taken {
            if let Some((now, value)) = staged.rows.get(&key)
                && *now == stage
            {
                let bytes = key.len() + value.as_ref().map_or(0, Vec::len);
                staged.bytes = staged.bytes.saturating_sub(bytes);
                staged.rows.remove(&key);
            }
        }
        if staged.rows.is_empty() {
            staged.bytes = 0;
        }
        metrics::gauge!("convoy_storage_staged_bytes").set(staged.bytes as f64);
    }
}

impl KvEngine for StagedEngine {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        if let Some((_, value)) = self.staged.read().rows.get(key) {
            return Ok(value.clone());
        }
        self.inner.get(key)
    }

    fn range(
        &self,
        start: Bound<&[u8]>,
        end: Bound<&[u8]>,
        reverse: bool,
        limit: usize,
    ) -> Result<Vec<KeyValue>, StoreError> {
        // Copied, not held: a long read must not hold up the writer. Staged rows reach the
        // engine with the same values, so a copy taken before they are cleared stays right.
        let staged: Vec<(Vec<u8>, Option<Vec<u8>>)> =
            self.staged.read().rows.range::<[u8], _>((start, end)).map(|(k, (_, v))| (k.clone(), v.clone())).collect();
        if staged.is_empty() {
            return self.inner.range(start, end, reverse, limit);
        }
        // Each staged delete may hide one engine row: read that many more. Past the last
        // engine row read, engine rows may be missing, but at least `limit` rows come before
        // it, so the first `limit` of the merge are exact.
        let rows = self.inner.range(start, end, reverse, limit.saturating_add(staged.len()))?;
        let mut merged: BTreeMap<Vec<u8>, Vec<u8>> = rows.into_iter().collect();
        for (key, value) in staged {
            match value {
                Some(value) => merged.insert(key, value),
                None => merged.remove(&key),
            };
        }
        Ok(if reverse {
            merged.into_iter().rev().take(limit).collect()
        } else {
            merged.into_iter().take(limit).collect()
        })
    }

    fn apply(&self, batch: WriteBatch) -> Result<(), StoreError> {
        self.apply_with_staged(batch)
    }

    fn apply_in_order(&self, batch: WriteBatch) -> Result<(), StoreError> {
        // A key that is also staged must reach the engine after its staged value.
        let overlaps = {
            let staged = self.staged.read();
            batch.ops().iter().any(|op| match op {
                Op::Put(key, _) | Op::Delete(key) => staged.rows.contains_key(key),
                Op::DeleteRange(..) => true,
            })
        };
        if overlaps { self.apply_with_staged(batch) } else { self.inner.apply_in_order(batch) }
    }

    fn staged_bytes(&self) -> usize {
        self.staged.read().bytes
    }

    fn stage(&self, batch: &WriteBatch) -> Result<bool, StoreError> {
        fn op_key(op: &Op) -> &[u8] {
            match op {
                Op::Put(key, _) | Op::Delete(key) | Op::DeleteRange(key, _) => key,
            }
        }
        if batch.has_range_delete() {
            return Ok(false);
        }
        let mut staged = self.staged.write();
        if staged.bytes + batch.bytes() > self.max_staged_bytes {
            return Ok(false);
        }
        staged.stages += 1;
        let stage = staged.stages;
        for op in batch.ops() {
            let replaced = match op {
                Op::Put(key, value) => staged.rows.insert(key.clone(), (stage, Some(value.clone()))),
                Op::Delete(key) => staged.rows.insert(key.clone(), (stage, None)),
                Op::DeleteRange(..) => unreachable!("checked above"),
            };
            if let Some((_, old)) = replaced {
                staged.bytes = staged.bytes.saturating_sub(op_key(op).len() + old.map_or(0, |v| v.len()));
            }
            staged.bytes += match op {
                Op::Put(key, value) => key.len() + value.len(),
                Op::Delete(key) | Op::DeleteRange(key, _) => key.len(),
            };
        }
        metrics::gauge!("convoy_storage_staged_bytes").set(staged.bytes as f64);
        Ok(true)
    }

    /// Staged rows are not applied yet: they stay staged (`apply` an empty batch first to
    /// make them durable too).
    fn flush(&self) -> Result<(), StoreError> {
        self.inner.flush()
    }

    fn size_on_disk(&self) -> Result<u64, StoreError> {
        self.inner.size_on_disk()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::engine::SledEngine;

    fn engine() -> (tempfile::TempDir, Arc<dyn KvEngine>, StagedEngine) {
        let dir = tempfile::tempdir().unwrap();
        let sled: Arc<dyn KvEngine> = Arc::new(SledEngine::open(dir.path(), 8 << 20).unwrap());
        let staged = StagedEngine::new(sled.clone(), 1 << 10);
        (dir, sled, staged)
    }

    fn batch(ops: &[(&str, Option<&str>)]) -> WriteBatch {
        let mut b = WriteBatch::new();
        for (k, v) in ops {
            match v {
                Some(v) => b.put(k.as_bytes().to_vec(), v.as_bytes().to_vec()),
                None => b.delete(k.as_bytes().to_vec()),
            }
        }
        b
    }

    fn keys(rows: Vec<KeyValue>) -> Vec<String> {
        rows.into_iter()
            .map(|(k, v)| format!("{}={}", String::from_utf8(k).unwrap(), String::from_utf8(v).unwrap()))
            .collect()
    }

    #[test]
    fn staged_rows_are_read_over_the_engine_and_reach_it_with_the_next_apply() {
        let (_dir, sled, staged) = engine();
        staged.apply(batch(&[("a", Some("1")), ("b", Some("1")), ("c", Some("1")), ("d", Some("1"))])).unwrap();
        assert!(staged.stage(&batch(&[("b", None), ("c", Some("2")), ("e", Some("2"))])).unwrap());
        assert_eq!(staged.get(b"b").unwrap(), None);
        assert_eq!(staged.get(b"c").unwrap(), Some(b"2".to_vec()));
        assert_eq!(sled.get(b"c").unwrap(), Some(b"1".to_vec()), "not in the engine before the next apply");
        let all = |reverse, limit| keys(staged.range(Bound::Unbounded, Bound::Unbounded, reverse, limit).unwrap());
        assert_eq!(all(false, usize::MAX), ["a=1", "c=2", "d=1", "e=2"]);
        assert_eq!(all(false, 2), ["a=1", "c=2"]);
        assert_eq!(all(true, 3), ["e=2", "d=1", "c=2"]);
        let from_b = staged.range(Bound::Included(b"b"), Bound::Excluded(b"e"), false, 10).unwrap();
        assert_eq!(keys(from_b), ["c=2", "d=1"]);

        staged.apply(batch(&[("f", Some("3"))])).unwrap();
        let on_disk = keys(sled.range(Bound::Unbounded, Bound::Unbounded, false, usize::MAX).unwrap());
        assert_eq!(on_disk, ["a=1", "c=2", "d=1", "e=2", "f=3"]);
        assert!(staged.staged.read().rows.is_empty());
    }

    #[test]
    fn a_range_delete_sees_the_staged_rows_and_is_never_staged() {
        let (_dir, sled, staged) = engine();
        assert!(staged.stage(&batch(&[("k1", Some("1")), ("k2", Some("1")), ("z", Some("1"))])).unwrap());
        let mut wipe = WriteBatch::new();
        wipe.delete_range(b"k".to_vec(), b"l".to_vec());
        assert!(!staged.stage(&wipe).unwrap());
        staged.apply(wipe).unwrap();
        let left = keys(sled.range(Bound::Unbounded, Bound::Unbounded, false, usize::MAX).unwrap());
        assert_eq!(left, ["z=1"], "staged rows in the range are deleted with it");
    }

    #[test]
    fn staging_is_bounded_and_only_an_atomic_apply_takes_the_staged_rows_to_disk() {
        let (_dir, sled, staged) = engine();
        let big = "x".repeat(600);
        assert!(staged.stage(&batch(&[("a", Some(&big))])).unwrap());
        assert!(!staged.stage(&batch(&[("b", Some(&big))])).unwrap(), "over the 1 KiB limit: apply it instead");
        staged.flush().unwrap();
        assert_eq!(sled.get(b"a").unwrap(), None, "a flush leaves staged rows staged");
        staged.apply(WriteBatch::new()).unwrap();
        assert_eq!(sled.get(b"a").unwrap(), Some(big.into_bytes()), "an empty atomic batch takes them along");
        assert!(staged.staged.read().rows.is_empty());
    }

    #[test]
    fn a_row_staged_again_while_the_engine_took_it_stays_staged() {
        let (_dir, sled, staged) = engine();
        assert!(staged.stage(&batch(&[("state", Some("1")), ("other", Some("1"))])).unwrap());
        // What a drain takes, as it begins.
        let taken: Vec<(Vec<u8>, u64)> =
            staged.staged.read().rows.iter().map(|(k, (stage, _))| (k.clone(), *stage)).collect();
        // Staged by another thread while the drain writes to the engine.
        assert!(staged.stage(&batch(&[("state", Some("2"))])).unwrap());
        staged.forget(taken);
        assert_eq!(staged.get(b"state").unwrap(), Some(b"2".to_vec()), "the newer value is still read");
        assert_eq!(staged.staged.read().rows.len(), 1, "only what the drain took is forgotten");
        assert_eq!(staged.staged_bytes(), "state".len() + 1);
        staged.apply(WriteBatch::new()).unwrap();
        assert_eq!(sled.get(b"state").unwrap(), Some(b"2".to_vec()));
        assert_eq!(staged.staged_bytes(), 0);
    }

    #[test]
    fn rewrites_of_a_row_count_once() {
        let (_dir, _sled, staged) = engine();
        for n in 0..100 {
            assert!(staged.stage(&batch(&[("state", Some(&format!("{n:03}")))])).unwrap(), "staging filled up at {n}");
        }
        assert_eq!(staged.staged_bytes(), "state".len() + 3);
    }

    #[test]
    fn single_writes_pass_the_staged_rows_unless_they_touch_a_staged_key() {
        let (_dir, sled, staged) = engine();
        assert!(staged.stage(&batch(&[("state", Some("1")), ("purged", Some("1"))])).unwrap());
        let mut single = WriteBatch::new();
        single.put(b"identity".to_vec(), b"n1".to_vec());
        staged.apply_in_order(single).unwrap();
        assert_eq!(sled.get(b"identity").unwrap(), Some(b"n1".to_vec()));
        assert_eq!(sled.get(b"state").unwrap(), None, "staged rows stay staged");

        // The same key staged and then written on its own: the later write must win.
        let mut rewrite = WriteBatch::new();
        rewrite.put(b"purged".to_vec(), b"2".to_vec());
        staged.apply_in_order(rewrite).unwrap();
        assert_eq!(sled.get(b"purged").unwrap(), Some(b"2".to_vec()));
        assert_eq!(sled.get(b"state").unwrap(), Some(b"1".to_vec()), "taken along, ahead of the write");
        assert_eq!(staged.get(b"purged").unwrap(), Some(b"2".to_vec()));
    }
}
