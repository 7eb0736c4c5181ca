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
        let limits = WriterLimits { queue_depth: 64, max_batch_bytes: 1 << 20, max_staged_bytes: 1 << 20 };
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
    let limits = WriterLimits { queue_depth: 64, max_batch_bytes: 1 << 20, max_staged_bytes: 1 << 20 };
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

/// A snapshot copies the rows that change at its cut and the entity logs afterwards, while
/// applies go on: it must hold exactly what the state machine held at the cut, none of the
/// entries applied after it, and install as that state on another replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_holds_its_cut_and_nothing_applied_while_it_was_built() {
    use std::ops::Bound;

    use convoy_actors::Timestamp;
    use convoy_actors::behavior::Request;
    use convoy_actors::domain::{Command, DomainConfig};
    use convoy_actors::ops::{self, Route};
    use convoy_actors::principal::Principal;
    use convoy_node::shard::{EntityCommand, RaftRequest};
    use convoy_node::store::keys;
    use openraft::entry::RaftEntry;
    use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};
    use openraft::testing::log_id;

    async fn open(dir: &std::path::Path, group: RaftGroupId) -> (Store, ShardStateMachine) {
        let limits = WriterLimits { queue_depth: 64, max_batch_bytes: 1 << 20, max_staged_bytes: 1 << 20 };
        let (store, _writer) = Store::open(&dir.join("db"), 16 << 20, limits).expect("open store");
        let data = Arc::new(ShardData::new(group, store.clone(), 1024));
        let sm = ShardStateMachine::open(group, store.clone(), data, dir.join("snapshots")).expect("open sm");
        (store, sm)
    }
    fn rows(store: &Store, group: RaftGroupId) -> Vec<(Vec<u8>, Vec<u8>)> {
        let (lo, hi) = keys::state_machine(group);
        store.engine().range(Bound::Included(&lo), Bound::Excluded(&hi), false, usize::MAX).expect("read")
    }
    let who = Principal::from_claims("u-1", &["customer".into()], &[], None).expect("principal");
    let cfg = DomainConfig::default();
    let index = std::cell::Cell::new(0u64);
    // Applies the protocol request `op` with `fields`, as the next log entry.
    let apply = async |sm: &mut ShardStateMachine, op: &str, fields: serde_json::Value| {
        let fields = fields.as_object().expect("an object").clone();
        let Route::Actor { key, request } = ops::parse(op, &fields, &who, &cfg, |p| format!("{p}-x")).expect(op) else {
            panic!("{op} is a query")
        };
        let cmd = match request {
            Request::Group(c) => Command::Group(c),
            other => panic!("{op} gave {other:?}"),
        };
        index.set(index.get() + 1);
        let entry = convoy_node::shard::Entry::new_normal(
            log_id::<TypeConfig>(1, 1, index.get()),
            RaftRequest::Entity(EntityCommand { key, cmd, at: Timestamp(index.get()), traceparent: None }),
        );
        sm.apply(futures::stream::iter([Ok((entry, None))])).await.expect("apply");
    };

    let group = RaftGroupId(3);
    let dir = tempfile::tempdir().expect("temp dir");
    let (store, mut sm) = open(dir.path(), group).await;
    for g in ["g-1", "g-2"] {
        apply(
            &mut sm,
            "group.open",
            serde_json::json!({"group": g, "kind": "chat", "members": [{"user": "u-2", "role": "agent"}]}),
        )
        .await;
    }
    for n in 0..300 {
        let g = if n % 3 == 0 { "g-2" } else { "g-1" };
        apply(&mut sm, "msg.send", serde_json::json!({"group": g, "client_msg_id": format!("m-{n}"), "body": {"type": "text", "text": format!("before {n}")}})).await;
    }
    let mut builder = sm.get_snapshot_builder().await;
    let at_cut = rows(&store, group);
    let cut_index = index.get();
    let logged = |rows: &[(Vec<u8>, Vec<u8>)]| rows.iter().filter(|(k, _)| keys::append_only_row(k).is_some()).count();
    assert_eq!(logged(&at_cut), 2 + 2 * 300, "two groups' opening entries, 300 messages and their idempotency records");

    // After the cut: more entries in both groups, and a group that did not exist.
    for n in 0..200 {
        let g = ["g-1", "g-2", "g-3"][n % 3];
        if n == 2 {
            apply(
                &mut sm,
                "group.open",
                serde_json::json!({"group": "g-3", "kind": "chat", "members": [{"user": "u-2", "role": "agent"}]}),
            )
            .await;
        }
        apply(&mut sm, "msg.send", serde_json::json!({"group": g, "client_msg_id": format!("late-{n}"), "body": {"type": "text", "text": format!("after {n}")}})).await;
    }
    store.writer().barrier().await.expect("applies written");
    assert!(logged(&rows(&store, group)) > 600, "the later entries are stored");

    let snapshot = builder.build_snapshot().await.expect("build");
    assert_eq!(snapshot.meta.last_log_id.map(|l| l.index), Some(cut_index));

    let other = tempfile::tempdir().expect("temp dir");
    let (replica, mut replica_sm) = open(other.path(), group).await;
    replica_sm.install_snapshot(&snapshot.meta, snapshot.snapshot).await.expect("install");
    let installed = rows(&replica, group);
    assert_eq!(installed.len(), at_cut.len(), "the installed state has the cut's rows, no more, no fewer");
    assert!(installed == at_cut, "the installed state is the state at the cut, row for row");
}

/// The state machine hands a batch to the writer and returns, so openraft may apply the
/// next batch before the last is visible (a restart replays the log in chunks, back to
/// back): the metadata group's next command must build on the state the last one left,
/// not on the last visible one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_applies_queued_behind_each_other_build_on_each_other() {
    use convoy_node::cluster::meta::MetaCommand;
    use convoy_node::shard::{Entry, NodeAddr, RaftRequest};
    use openraft::entry::RaftEntry;
    use openraft::storage::RaftStateMachine;
    use openraft::testing::log_id;

    let dir = tempfile::tempdir().expect("temp dir");
    let limits = WriterLimits { queue_depth: 64, max_batch_bytes: 1 << 20, max_staged_bytes: 1 << 20 };
    let (store, _writer) = Store::open(&dir.path().join("db"), 16 << 20, limits).expect("open store");
    let group = RaftGroupId::META;
    let data = Arc::new(ShardData::new(group, store.clone(), 1024));
    let mut sm =
        ShardStateMachine::open(group, store.clone(), data.clone(), dir.path().join("snapshots")).expect("open sm");
    let addr = |name: &str| NodeAddr {
        name: name.into(),
        cluster_addr: format!("{name}:1"),
        client_url: format!("ws://{name}"),
        admin_url: format!("http://{name}"),
    };
    let commands = [
        MetaCommand::Bootstrap { cluster_id: 7, shards: 8, replication_factor: 3, members: vec![(1, addr("n1"))] },
        MetaCommand::Join { node: 2, addr: addr("n2") },
        MetaCommand::Join { node: 3, addr: addr("n3") },
    ];

    // Nothing becomes visible while the writer is stalled; each apply only queues its batch.
    store.writer().faults().set_stall(true);
    for (i, cmd) in commands.into_iter().enumerate() {
        let entry = Entry::new_normal(log_id::<TypeConfig>(1, 1, i as u64 + 1), RaftRequest::Meta(cmd));
        sm.apply(futures::stream::iter([Ok((entry, None))])).await.expect("apply");
    }
    assert!(!data.cluster().expect("the metadata group has a cluster state").borrow().is_bootstrapped());
    store.writer().faults().set_stall(false);
    store.writer().barrier().await.expect("applies written");

    let state = data.cluster().expect("cluster state").borrow().clone();
    assert!(state.is_bootstrapped());
    assert_eq!(state.members.keys().copied().collect::<Vec<_>>(), [1, 2, 3], "every join applied on the one before");
}
