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
        let (store, _writer) = Store::open(dir.path(), 16 << 20, limits).expect("open store");
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

/// A purge takes effect at once: what it covers is never read again, and what follows it
/// reads back whole, also after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_drops_what_it_covers_and_keeps_the_rest_across_a_restart() {
    use openraft::storage::{IOFlushed, RaftLogReader, RaftLogStorage};
    use openraft::testing::{blank_ent, log_id};

    let dir = tempfile::tempdir().expect("temp dir");
    let limits = WriterLimits { queue_depth: 64, max_batch_bytes: 1 << 20, max_staged_bytes: 1 << 20 };
    let group = RaftGroupId(3);
    {
        let (store, writer) = Store::open(dir.path(), 16 << 20, limits).expect("open store");
        let mut log = RaftLog::new(group, store.clone());
        // One append per entry, as under light load.
        for index in 1..=2_000u64 {
            log.append([blank_ent::<TypeConfig>(1, 1, index)], IOFlushed::noop()).await.expect("append");
        }
        log.purge(log_id::<TypeConfig>(1, 1, 1_500)).await.expect("purge");
        let state = log.get_log_state().await.expect("log state");
        assert_eq!(state.last_purged_log_id.map(|l| l.index), Some(1_500));
        assert_eq!(state.last_log_id.map(|l| l.index), Some(2_000));
        store.writer().stop().await;
        drop((log, store));
        writer.join().expect("the writer ends");
    }
    let (store, _writer) = open_store(dir.path(), limits).await;
    let mut log = RaftLog::new(group, store);
    let state = log.get_log_state().await.expect("log state");
    assert_eq!(state.last_purged_log_id.map(|l| l.index), Some(1_500), "the purge point survives a restart");
    assert_eq!(state.last_log_id.map(|l| l.index), Some(2_000));
    let kept = log.get_log_reader().await.try_get_log_entries(1..2_001).await.expect("read the rest");
    assert_eq!(kept.iter().map(|e| e.log_id.index).collect::<Vec<_>>(), (1_501..=2_000).collect::<Vec<u64>>());
}

/// Opens the store in `dir`. One of the same directory dropped just before may hold sled's
/// lock a moment longer, while sled's I/O threads finish their last jobs: that is waited out.
async fn open_store(dir: &std::path::Path, limits: WriterLimits) -> (Store, std::thread::JoinHandle<()>) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match Store::open(dir, 16 << 20, limits) {
            Ok(opened) => return opened,
            Err(e) if e.to_string().contains("could not acquire lock") && std::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await
            }
            Err(e) => panic!("open store: {e}"),
        }
    }
}

struct Opened {
    store: Store,
    sm: ShardStateMachine,
    data: Arc<ShardData>,
    writer: std::thread::JoinHandle<()>,
}

async fn open_state_machine(dir: &std::path::Path, group: RaftGroupId) -> Opened {
    open_state_machine_with(
        dir,
        group,
        WriterLimits { queue_depth: 64, max_batch_bytes: 1 << 20, max_staged_bytes: 1 << 20 },
    )
    .await
}

/// Staging too small for any batch: every apply batch goes through the writer's queue, and
/// becomes visible only when the writer takes it.
const NO_STAGING: WriterLimits = WriterLimits { queue_depth: 64, max_batch_bytes: 1 << 20, max_staged_bytes: 1 };

async fn open_state_machine_with(dir: &std::path::Path, group: RaftGroupId, limits: WriterLimits) -> Opened {
    let (store, writer) = open_store(dir, limits).await;
    let data = Arc::new(ShardData::new(group, store.clone(), 1024));
    let sm = ShardStateMachine::open(group, store.clone(), data.clone(), dir.join("snapshots")).expect("open sm");
    Opened { store, sm, data, writer }
}

/// Every row of `group`'s state machine, as readers see it.
fn state_machine_rows(store: &Store, group: RaftGroupId) -> Vec<(Vec<u8>, Vec<u8>)> {
    let (lo, hi) = convoy_node::store::keys::state_machine(group);
    store
        .engine()
        .range(std::ops::Bound::Included(&lo), std::ops::Bound::Excluded(&hi), false, usize::MAX)
        .expect("read")
}

/// How many of `rows` are entity log entries or idempotency records.
fn log_rows(rows: &[(Vec<u8>, Vec<u8>)]) -> usize {
    rows.iter().filter(|(k, _)| convoy_node::store::keys::append_only_row(k).is_some()).count()
}

/// Applies protocol requests to a state machine as consecutive log entries, as one user.
struct Requests {
    who: convoy_actors::principal::Principal,
    index: u64,
}

impl Requests {
    fn new() -> Requests {
        let who = convoy_actors::principal::Principal::from_claims("u-1", &["customer".into()], &[], None)
            .expect("principal");
        Requests { who, index: 0 }
    }

    /// Applies the request `op` with `fields` as the next log entry.
    async fn apply(&mut self, sm: &mut ShardStateMachine, op: &str, fields: serde_json::Value) {
        use convoy_actors::Timestamp;
        use convoy_actors::behavior::Request;
        use convoy_actors::domain::{Command, DomainConfig};
        use convoy_actors::ops::{self, Route};
        use convoy_node::shard::{EntityCommand, RaftRequest};
        use openraft::entry::RaftEntry;

        let fields = fields.as_object().expect("an object").clone();
        let Route::Actor { key, request } =
            ops::parse(op, &fields, &self.who, &DomainConfig::default(), |p| format!("{p}-x")).expect(op)
        else {
            panic!("{op} is a query")
        };
        let cmd = match request {
            Request::Group(c) => Command::Group(c),
            other => panic!("{op} gave {other:?}"),
        };
        let at = Timestamp(self.index + 1);
        self.apply_next(sm, |id| {
            convoy_node::shard::Entry::new_normal(
                id,
                RaftRequest::Entity(Box::new(EntityCommand { key, cmd, at, traceparent: None, origin: None })),
            )
        })
        .await;
    }

    /// Applies a membership of `voters` as the next log entry.
    async fn membership(&mut self, sm: &mut ShardStateMachine, voters: &[u64]) {
        use openraft::entry::RaftEntry;

        let voters: std::collections::BTreeSet<u64> = voters.iter().copied().collect();
        let m = openraft::Membership::new_with_defaults(vec![voters], []);
        self.apply_next(sm, |id| convoy_node::shard::Entry::new_membership(id, m)).await;
    }

    /// Applies the entry `entry` builds with the next log id.
    async fn apply_next(
        &mut self,
        sm: &mut ShardStateMachine,
        entry: impl FnOnce(convoy_node::shard::LogId) -> convoy_node::shard::Entry,
    ) {
        use openraft::storage::RaftStateMachine;
        use openraft::testing::log_id;

        self.index += 1;
        let entry = entry(log_id::<TypeConfig>(1, 1, self.index));
        sm.apply(futures::stream::iter([Ok((entry, None))])).await.expect("apply");
    }

    async fn open_group(&mut self, sm: &mut ShardStateMachine, group: &str) {
        let fields = serde_json::json!({"group": group, "kind": "chat", "members": [{"user": "u-2", "role": "agent"}]});
        self.apply(sm, "group.open", fields).await;
    }

    async fn send(&mut self, sm: &mut ShardStateMachine, group: &str, client_msg_id: &str) {
        let fields = serde_json::json!({"group": group, "client_msg_id": client_msg_id, "body": {"type": "text", "text": client_msg_id}});
        self.apply(sm, "msg.send", fields).await;
    }
}

/// A snapshot copies the rows that change at its cut, and the entity logs only when it is
/// read, while applies go on: it must hold exactly what the state machine held at the cut,
/// none of the entries applied after it, and install as that state on another replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_holds_its_cut_and_nothing_applied_while_it_was_built() {
    use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};

    let group = RaftGroupId(3);
    let dir = tempfile::tempdir().expect("temp dir");
    let Opened { store, mut sm, .. } = open_state_machine(dir.path(), group).await;
    let mut requests = Requests::new();
    for g in ["g-1", "g-2"] {
        requests.open_group(&mut sm, g).await;
    }
    for n in 0..300 {
        requests.send(&mut sm, if n % 3 == 0 { "g-2" } else { "g-1" }, &format!("m-{n}")).await;
    }
    let mut builder = sm.get_snapshot_builder().await;
    let at_cut = state_machine_rows(&store, group);
    let cut_index = requests.index;
    assert_eq!(
        log_rows(&at_cut),
        2 + 2 * 300,
        "two groups' opening entries, 300 messages and their idempotency records"
    );

    // After the cut: more entries in both groups, and a group that did not exist.
    for n in 0..200 {
        if n == 2 {
            requests.open_group(&mut sm, "g-3").await;
        }
        requests.send(&mut sm, ["g-1", "g-2", "g-3"][n % 3], &format!("late-{n}")).await;
    }
    store.writer().barrier().await.expect("applies written");
    assert!(log_rows(&state_machine_rows(&store, group)) > 600, "the later entries are stored");

    let snapshot = builder.build_snapshot().await.expect("build");
    assert_eq!(snapshot.meta.last_log_id.map(|l| l.index), Some(cut_index));
    // More entries still, between building the snapshot and reading it.
    for n in 0..50 {
        requests.send(&mut sm, "g-1", &format!("later-{n}")).await;
    }

    let other = tempfile::tempdir().expect("temp dir");
    let Opened { store: replica, sm: mut replica_sm, .. } = open_state_machine(other.path(), group).await;
    replica_sm.install_snapshot(&snapshot.meta, snapshot.snapshot).await.expect("install");
    let installed = state_machine_rows(&replica, group);
    assert_eq!(installed.len(), at_cut.len(), "the installed state has the cut's rows, no more, no fewer");
    assert!(installed == at_cut, "the installed state is the state at the cut, row for row");
}

/// A snapshot's file holds its cut alone: the entity logs it names are in the store, which
/// must keep them through a crash. A crash loses the applies still staged in memory; the
/// snapshot built before it must still read whole after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_reads_whole_after_a_crash_lost_the_staged_applies() {
    use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};

    let group = RaftGroupId(3);
    let dir = tempfile::tempdir().expect("temp dir");
    let Opened { store, mut sm, data, writer } = open_state_machine(dir.path(), group).await;
    let mut requests = Requests::new();
    requests.open_group(&mut sm, "g-1").await;
    for n in 0..100 {
        requests.send(&mut sm, "g-1", &format!("m-{n}")).await;
    }
    let mut builder = sm.get_snapshot_builder().await;
    let at_cut = state_machine_rows(&store, group);
    let snapshot = builder.build_snapshot().await.expect("build");
    let file_bytes: u64 = std::fs::read_dir(dir.path().join("snapshots").join(group.to_string()))
        .expect("snapshot directory")
        .map(|e| e.expect("entry").metadata().expect("metadata").len())
        .sum();
    let logs_bytes: usize = at_cut
        .iter()
        .filter(|(k, _)| convoy_node::store::keys::append_only_row(k).is_some())
        .map(|(k, v)| k.len() + v.len())
        .sum();
    assert!(file_bytes < logs_bytes as u64, "the file ({file_bytes} bytes) holds the logs ({logs_bytes} bytes)");
    for n in 0..20 {
        requests.send(&mut sm, "g-1", &format!("late-{n}")).await;
    }
    // The crash: the writer ends without taking its staged rows to the engine.
    drop((store, sm, data, snapshot, builder));
    writer.join().expect("the writer thread ends");

    let Opened { mut sm, .. } = open_state_machine(dir.path(), group).await;
    let current = sm.get_current_snapshot().await.expect("read").expect("the snapshot survived");
    let other = tempfile::tempdir().expect("temp dir");
    let Opened { store: replica, sm: mut replica_sm, .. } = open_state_machine(other.path(), group).await;
    replica_sm.install_snapshot(&current.meta, current.snapshot).await.expect("install");
    assert!(state_machine_rows(&replica, group) == at_cut, "the snapshot reads as its cut after the crash");
}

/// Idempotency records are known in memory once a background scan after opening has read
/// them, and from then on a first-time send skips the store: a retry must still be found,
/// whether its record was scanned or written since.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_are_found_once_the_stored_idempotency_records_are_known_in_memory() {
    let group = RaftGroupId(3);
    let dir = tempfile::tempdir().expect("temp dir");
    let Opened { store, mut sm, data, writer } = open_state_machine(dir.path(), group).await;
    let mut requests = Requests::new();
    requests.open_group(&mut sm, "g-1").await;
    for n in 0..300 {
        requests.send(&mut sm, "g-1", &format!("m-{n}")).await;
    }
    store.writer().stop().await;
    drop((store, sm, data));
    writer.join().expect("the writer thread ends");

    let Opened { store, mut sm, data, .. } = open_state_machine(dir.path(), group).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !data.idempotency_records_known() {
        assert!(std::time::Instant::now() < deadline, "the stored idempotency records were never scanned");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let stored = log_rows(&state_machine_rows(&store, group));
    assert_eq!(stored, 1 + 2 * 300);
    for n in (0..300).step_by(7) {
        requests.send(&mut sm, "g-1", &format!("m-{n}")).await;
    }
    store.writer().barrier().await.expect("applies written");
    assert_eq!(log_rows(&state_machine_rows(&store, group)), stored, "a retry of a scanned record was stored again");
    requests.send(&mut sm, "g-1", "new").await;
    requests.send(&mut sm, "g-1", "new").await;
    store.writer().barrier().await.expect("applies written");
    assert_eq!(log_rows(&state_machine_rows(&store, group)), stored + 2, "a new message, once, with its record");
}

/// When staging is full the state machine hands a batch to the writer and returns, so
/// openraft may apply the next batch before the last is visible (a restart replays the log
/// in chunks, back to back): the metadata group's next command must build on the state the
/// last one left, not on the last visible one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_applies_queued_behind_each_other_build_on_each_other() {
    use convoy_node::cluster::meta::MetaCommand;
    use convoy_node::shard::{Entry, NodeAddr, RaftRequest};
    use openraft::entry::RaftEntry;
    use openraft::storage::RaftStateMachine;
    use openraft::testing::log_id;

    let dir = tempfile::tempdir().expect("temp dir");
    let Opened { store, mut sm, data, .. } = open_state_machine_with(dir.path(), RaftGroupId::META, NO_STAGING).await;
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

/// Records what the state machine hands on: each effect's appended seqs and whether its
/// pushes are this node's to make.
#[derive(Default)]
struct Recorder(std::sync::Mutex<Vec<(Vec<u64>, convoy_actors::behavior::Pushes)>>);

impl convoy_node::shard::AppliedSink for Recorder {
    fn applied(&self, effects: Vec<Arc<convoy_node::shard::AppliedEffects>>) {
        let mut seen = self.0.lock().unwrap_or_else(|e| e.into_inner());
        seen.extend(effects.into_iter().map(|e| (e.appended.iter().map(|entry| entry.seq).collect(), e.pushes)));
    }
}

/// Every replica pushes what it applies to its own connections, leader or not: the fan-out
/// gets every effect, in log order, once its apply is visible, with or without a leader's sink.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_replica_hands_its_applies_to_its_own_fanout() {
    let dir = tempfile::tempdir().expect("temp dir");
    let Opened { store, mut sm, data, .. } = open_state_machine_with(dir.path(), RaftGroupId(3), NO_STAGING).await;
    let fanout = Arc::new(Recorder::default());
    data.set_fanout(fanout.clone());
    let mut requests = Requests::new();
    requests.open_group(&mut sm, "g-1").await;
    store.writer().barrier().await.expect("the group is written");
    let opened = fanout.0.lock().unwrap().len();

    store.writer().faults().set_stall(true);
    requests.send(&mut sm, "g-1", "m-1").await;
    requests.send(&mut sm, "g-1", "m-2").await;
    assert_eq!(fanout.0.lock().unwrap().len(), opened, "an effect was handed on before its apply was visible");
    store.writer().faults().set_stall(false);
    store.writer().barrier().await.expect("applies written");

    let seen = fanout.0.lock().unwrap()[opened..].to_vec();
    assert_eq!(seen.len(), 2, "one effect per send, on a follower: {seen:?}");
    assert_eq!(seen[1].0, vec![seen[0].0[0] + 1], "in log order: {seen:?}");
}

/// The devices connected to a node, as a replica's fan-out reaches them: what each push
/// carried, by `client_msg_id`.
#[derive(Default)]
struct Devices(std::sync::Mutex<Vec<String>>);

impl convoy_node::entity::Pusher for Devices {
    fn deliver_here(&self, _: &[convoy_actors::ids::UserId], event: &convoy_actors::event::Event) {
        if let convoy_actors::event::Event::Msg { entry, .. } = event {
            let cmid = entry.client_msg_id.as_ref().map(|c| c.as_str().to_string()).unwrap_or_default();
            self.0.lock().unwrap().push(cmid);
        }
    }
    fn send_to_peers(&self, _: &[convoy_actors::ids::UserId], _: &convoy_actors::event::Event, _: &[u64]) {
        panic!("a replica's fan-out sends nothing to other nodes")
    }
    fn peers_beyond(&self, _: &[u64]) -> bool {
        false
    }
}

/// What a fan-out pushed to this node's devices, once `wanted` pushes arrived (or 10 s
/// passed). The fan-out takes batches in log order: once the last is pushed, all were seen.
async fn pushed_once(devices: &Devices, wanted: usize) -> Vec<String> {
    let pushed = || devices.0.lock().unwrap().clone();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while pushed().len() < wanted && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    pushed()
}

/// A state machine whose applies reach node `me`'s devices through its fan-out, with
/// `frontier` as the newest index the node knows of.
async fn fanout_of(dir: &std::path::Path, me: u64, frontier: u64) -> (Store, ShardStateMachine, Arc<Devices>) {
    let Opened { store, sm, data, .. } = open_state_machine_with(dir, RaftGroupId(3), NO_STAGING).await;
    let devices = Arc::new(Devices::default());
    data.set_fanout(convoy_node::entity::ReplicaFanout::start(&data, devices.clone(), me, move || frontier));
    (store, sm, devices)
}

/// A voter pushes to its own devices what it applies, but not a backlog it catches up on
/// (entries far behind the newest it knows of): that would overflow their queues.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_voter_pushes_what_it_applies_but_not_a_backlog_it_catches_up_on() {
    let dir = tempfile::tempdir().expect("temp dir");
    // Node 1 knows of index 1029: what is more than 1024 entries behind it (indexes 1 to 4:
    // the membership, the open and the first two sends) is a backlog.
    let (store, mut sm, devices) = fanout_of(dir.path(), 1, 1029).await;
    let mut requests = Requests::new();
    requests.membership(&mut sm, &[1]).await;
    requests.open_group(&mut sm, "g-1").await;
    for cmid in ["behind", "behind-too", "caught-up", "caught-up-too"] {
        requests.send(&mut sm, "g-1", cmid).await;
    }
    store.writer().barrier().await.expect("applies written");
    assert_eq!(
        pushed_once(&devices, 2).await,
        ["caught-up", "caught-up-too"],
        "pushed by the voter, in log order, only near the frontier"
    );
}

/// Whose an entry is to push is decided by the voters as of that entry, alike on every
/// replica and on the leader: a node pushes only what it applied as a voter (the leader
/// sends it the rest), so its devices get each event once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_pushes_only_the_entries_it_applies_as_a_voter() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (store, mut sm, devices) = fanout_of(dir.path(), 2, 0).await;
    let mut requests = Requests::new();
    requests.membership(&mut sm, &[1]).await;
    requests.open_group(&mut sm, "g-1").await;
    requests.send(&mut sm, "g-1", "while-a-learner").await;
    requests.membership(&mut sm, &[1, 2]).await;
    requests.send(&mut sm, "g-1", "as-a-voter").await;
    requests.membership(&mut sm, &[1]).await;
    requests.send(&mut sm, "g-1", "removed").await;
    requests.membership(&mut sm, &[1, 2]).await;
    requests.send(&mut sm, "g-1", "a-voter-again").await;
    store.writer().barrier().await.expect("applies written");
    assert_eq!(pushed_once(&devices, 2).await, ["as-a-voter", "a-voter-again"], "node 2 pushed what was not its");
}

/// A replica that catches up and is made leader at once can see applies of its follower days
/// become visible after it began serving. Their leader of the time pushed them: pushed again,
/// clients would get them twice, and after newer entries. Only what was applied since the
/// node serves is its to push.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn applies_made_before_the_node_served_are_not_pushed_by_it() {
    use convoy_actors::behavior::Pushes;

    let dir = tempfile::tempdir().expect("temp dir");
    let Opened { store, mut sm, data, .. } = open_state_machine_with(dir.path(), RaftGroupId(3), NO_STAGING).await;
    let mut requests = Requests::new();
    requests.open_group(&mut sm, "g-1").await;
    store.writer().barrier().await.expect("the group is written");

    // Applied as a follower; visible only once the node serves.
    store.writer().faults().set_stall(true);
    requests.send(&mut sm, "g-1", "m-1").await;
    let sink = Arc::new(Recorder::default());
    data.set_sink(Some(sink.clone()));
    requests.send(&mut sm, "g-1", "m-2").await;
    assert!(sink.0.lock().unwrap().is_empty(), "an effect was handed on before its apply was visible");
    store.writer().faults().set_stall(false);
    store.writer().barrier().await.expect("applies written");

    let seen = sink.0.lock().unwrap().clone();
    assert_eq!(seen.len(), 2, "one effect per send: {seen:?}");
    let (first, second) = (&seen[0], &seen[1]);
    assert_eq!(first.1, Pushes::Skip, "the send applied before the node served: {seen:?}");
    assert_eq!(second.1, Pushes::Send, "the send applied since: {seen:?}");
    assert_eq!(first.0.len(), 1);
    assert_eq!(second.0, vec![first.0[0] + 1], "in log order: {seen:?}");
}
