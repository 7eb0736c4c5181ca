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

/// A purge records its point at once and deletes the segments it frees afterwards, in small
/// storage jobs; they must all go, and nothing after the purge point with them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_deletes_every_wholly_purged_segment_and_keeps_the_rest() {
    use std::ops::Bound;

    use convoy_node::store::keys;
    use openraft::storage::{IOFlushed, RaftLogReader, RaftLogStorage};
    use openraft::testing::{blank_ent, log_id};

    let dir = tempfile::tempdir().expect("temp dir");
    let limits = WriterLimits { queue_depth: 64, max_batch_bytes: 1 << 20 };
    let (store, _writer) = Store::open(&dir.path().join("db"), 16 << 20, limits).expect("open store");
    let group = RaftGroupId(3);
    let mut log = RaftLog::new(group, store.clone());
    // One append per entry: one segment each, as under light load.
    for index in 1..=2_000u64 {
        log.append([blank_ent::<TypeConfig>(1, 1, index)], IOFlushed::noop()).await.expect("append");
    }
    store.writer().barrier().await.expect("appends written");
    let segments = || {
        let (lo, hi) = keys::segments(group);
        store
            .engine()
            .range(Bound::Included(&lo), Bound::Excluded(&hi), false, usize::MAX)
            .expect("read segments")
            .into_iter()
            .filter_map(|(k, _)| keys::segment_index(&k))
            .collect::<Vec<u64>>()
    };
    assert_eq!(segments().len(), 2_000);

    log.purge(log_id::<TypeConfig>(1, 1, 1_500)).await.expect("purge");
    let state = log.get_log_state().await.expect("log state");
    assert_eq!(state.last_purged_log_id.map(|l| l.index), Some(1_500));
    assert_eq!(state.last_log_id.map(|l| l.index), Some(2_000));

    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while segments().len() > 500 && std::time::Instant::now() < deadline {
        store.writer().barrier().await.expect("barrier");
        tokio::task::yield_now().await;
    }
    assert_eq!(segments(), (1_501..=2_000).collect::<Vec<u64>>(), "exactly the segments after the purge point remain");
    let kept = log.get_log_reader().await.try_get_log_entries(1_501..2_001).await.expect("read the rest");
    assert_eq!(kept.len(), 500);
}
