//! openraft's storage test suite, run against Convoy's log store and state machine on
//! sled: vote and log durability semantics, truncation, purging, snapshots.

use std::sync::Arc;

use convoy_node::shard::{RaftGroupId, ShardData, ShardStateMachine, TypeConfig};
use convoy_node::store::raft_log::RaftLog;
use convoy_node::store::{Store, WriterLimits};
use openraft::StorageError;
use openraft::testing::log::{StoreBuilder, Suite};

struct SledBuilder;

impl StoreBuilder<TypeConfig, RaftLog, ShardStateMachine, tempfile::TempDir> for SledBuilder {
    async fn build(&self) -> Result<(tempfile::TempDir, RaftLog, ShardStateMachine), StorageError<TypeConfig>> {
        let dir = tempfile::tempdir().expect("temp dir");
        let limits = WriterLimits { queue_depth: 64, max_batch_bytes: 1 << 20 };
        let (store, _writer) = Store::open(&dir.path().join("db"), 16 << 20, limits).expect("open store");
        let group = RaftGroupId(3);
        let data = Arc::new(ShardData::new(group, store.clone(), 1024));
        let sm = ShardStateMachine::open(group, store.clone(), data, dir.path().join("snapshots")).expect("open sm");
        Ok((dir, RaftLog::new(group, store), sm))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openraft_storage_suite() {
    Suite::test_all(SledBuilder).await.expect("the storage suite passes");
}
