//! Storage: one engine per node for the state machines, and the Raft log files, both written
//! only by the storage writer.
//!
//! `Store` is what the rest of the node holds: reads go straight to the engine or the files,
//! writes are jobs for the writer. `raft_log` implements openraft's log storage on the files.

pub mod codec;
pub mod engine;
pub mod keys;
pub mod log_files;
pub mod raft_log;
pub mod staged;
pub mod writer;

use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::Serialize;
use serde::de::DeserializeOwned;

pub use engine::{KvEngine, WriteBatch};
use log_files::LogFiles;
pub use writer::{Durability, StorageWriter, WriterLimits};

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the database at {path}: {detail} (is another convoy process using this data directory?)")]
    Open { path: PathBuf, detail: String },
    #[error("storage engine error: {0}")]
    Engine(String),
    #[error("stored {what} cannot be read: {detail}")]
    Corrupt { what: &'static str, detail: String },
    #[error("the storage writer has stopped")]
    WriterStopped,
}

impl From<StoreError> for std::io::Error {
    fn from(e: StoreError) -> Self {
        std::io::Error::other(e)
    }
}

/// Rows read per engine call by [`Store::for_each_row`].
const PAGE_ROWS: usize = 4096;

#[derive(Clone)]
pub struct Store {
    engine: Arc<dyn KvEngine>,
    log_files: Arc<LogFiles>,
    writer: StorageWriter,
    drain: Arc<Drain>,
}

/// When rows staged by [`Store::stage_now`] are taken to the engine.
struct Drain {
    /// Staged bytes from which the engine thread is asked to take them.
    at_bytes: usize,
    /// Asked and not done yet: one request at a time.
    requested: AtomicBool,
}

impl Store {
    /// Opens (or creates) the node's database (`db/`) and Raft log files (`raft-log/`) under
    /// `dir`, and starts their writer.
    pub fn open(
        dir: &Path,
        cache_capacity_bytes: u64,
        limits: WriterLimits,
    ) -> Result<(Store, std::thread::JoinHandle<()>), StoreError> {
        let sled: Arc<dyn KvEngine> = Arc::new(engine::SledEngine::open(&dir.join("db"), cache_capacity_bytes)?);
        let (log_files, appender) = LogFiles::open(&dir.join("raft-log"))?;
        let staged = staged::StagedEngine::new(sled, limits.max_staged_bytes * staged::STAGED_HEADROOM);
        let engine: Arc<dyn KvEngine> = Arc::new(staged);
        let (writer, handle) = StorageWriter::start(engine.clone(), appender, limits);
        let drain = Arc::new(Drain { at_bytes: limits.max_staged_bytes, requested: AtomicBool::new(false) });
        Ok((Store { engine, log_files, writer, drain }, handle))
    }

    pub fn engine(&self) -> &dyn KvEngine {
        &*self.engine
    }

    pub fn log_files(&self) -> &LogFiles {
        &self.log_files
    }

    pub fn writer(&self) -> &StorageWriter {
        &self.writer
    }

    pub fn get<T: DeserializeOwned>(&self, what: &'static str, key: &[u8]) -> Result<Option<T>, StoreError> {
        self.engine.get(key)?.map(|v| codec::decode(what, &v)).transpose()
    }

    /// Decoded values of the keys in `[start, end)`, at most `limit`.
    pub fn scan<T: DeserializeOwned>(
        &self,
        what: &'static str,
        (start, end): (&[u8], &[u8]),
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, T)>, StoreError> {
        self.engine
            .range(Bound::Included(start), Bound::Excluded(end), false, limit)?
            .into_iter()
            .map(|(k, v)| Ok((k, codec::decode(what, &v)?)))
            .collect()
    }

    /// Stages `batch`, which needs only to be visible, for readers at once if the engine
    /// can hold it staged, without waiting for the writer; hands it back if it cannot.
    pub fn stage_now(&self, batch: WriteBatch) -> Result<Option<WriteBatch>, StoreError> {
        if !self.engine.stage(&batch)? {
            return Ok(Some(batch));
        }
        if self.engine.staged_bytes() >= self.drain.at_bytes && !self.drain.requested.swap(true, Ordering::SeqCst) {
            let drain = self.drain.clone();
            self.writer.drain_staged(move |_| drain.requested.store(false, Ordering::SeqCst));
        }
        Ok(None)
    }

    /// Hands every row in `[lo, hi)` to `each`, in key order, reading a page at a time, so a
    /// walk over a large range never holds it all in memory.
    pub fn for_each_row<E: From<StoreError>>(
        &self,
        lo: &[u8],
        hi: &[u8],
        mut each: impl FnMut(Vec<u8>, Vec<u8>) -> Result<(), E>,
    ) -> Result<(), E> {
        let mut after: Option<Vec<u8>> = None;
        loop {
            let start = match &after {
                Some(last) => Bound::Excluded(last.as_slice()),
                None => Bound::Included(lo),
            };
            let page = self.engine.range(start, Bound::Excluded(hi), false, PAGE_ROWS)?;
            let full = page.len() == PAGE_ROWS;
            after = page.last().map(|(k, _)| k.clone());
            for (key, value) in page {
                each(key, value)?;
            }
            if !full {
                return Ok(());
            }
        }
    }

    /// Writes one value and waits until it is `durability`.
    pub async fn put<T: Serialize>(&self, key: Vec<u8>, value: &T, durability: Durability) -> Result<(), StoreError> {
        let mut batch = WriteBatch::new();
        batch.put(key, codec::encode(value));
        self.writer.write(batch, durability).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rows staged directly (a state machine's applies) are taken to the engine by its writer
    /// thread once enough are staged, without anyone waiting for it.
    #[tokio::test]
    async fn rows_staged_directly_reach_the_engine_once_enough_are_staged() {
        let dir = tempfile::tempdir().unwrap();
        let limits = WriterLimits { queue_depth: 8, max_batch_bytes: 1 << 20, max_staged_bytes: 4 << 10 };
        let (store, _writer) = Store::open(dir.path(), 8 << 20, limits).unwrap();
        let mut refused = 0;
        for n in 0..400u32 {
            let mut batch = WriteBatch::new();
            batch.put(format!("row-{n:04}").into_bytes(), vec![7; 100]);
            // Past its bound staging refuses, and the row goes through the writer instead.
            if let Some(batch) = store.stage_now(batch).unwrap() {
                refused += 1;
                store.writer().write(batch, Durability::Visible).await.unwrap();
            }
            assert!(
                store.engine().staged_bytes() <= staged::STAGED_HEADROOM * (4 << 10),
                "staging grew past its bound"
            );
        }
        assert!(refused < 400, "staging refused every row");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while store.engine().staged_bytes() >= 4 << 10 {
            assert!(std::time::Instant::now() < deadline, "the staged rows never went to the engine");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        let rows = store.engine().range(Bound::Unbounded, Bound::Unbounded, false, 1_000).unwrap();
        assert_eq!(rows.len(), 400, "every row reads back, staged or not");
    }
}
