//! Storage: one engine per node, written only by the storage writer.
//!
//! `Store` is what the rest of the node holds: reads go straight to the engine, writes
//! are jobs for the writer. `raft_log` implements openraft's log storage on top.

pub mod codec;
pub mod engine;
pub mod keys;
pub mod raft_log;
pub mod staged;
pub mod writer;

use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;

pub use engine::{KvEngine, WriteBatch};
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

#[derive(Clone)]
pub struct Store {
    engine: Arc<dyn KvEngine>,
    writer: StorageWriter,
}

impl Store {
    /// Opens (or creates) the node's database under `dir` and starts its writer.
    pub fn open(
        dir: &Path,
        cache_capacity_bytes: u64,
        limits: WriterLimits,
    ) -> Result<(Store, std::thread::JoinHandle<()>), StoreError> {
        let sled: Arc<dyn KvEngine> = Arc::new(engine::SledEngine::open(dir, cache_capacity_bytes)?);
        let engine: Arc<dyn KvEngine> = Arc::new(staged::StagedEngine::new(sled, limits.max_staged_bytes));
        let (writer, handle) = StorageWriter::start(engine.clone(), limits);
        Ok((Store { engine, writer }, handle))
    }

    pub fn engine(&self) -> &dyn KvEngine {
        &*self.engine
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

    /// Writes one value and waits until it is `durability`.
    pub async fn put<T: Serialize>(&self, key: Vec<u8>, value: &T, durability: Durability) -> Result<(), StoreError> {
        let mut batch = WriteBatch::new();
        batch.put(key, codec::encode(value));
        self.writer.write(batch, durability).await
    }
}
