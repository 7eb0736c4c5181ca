//! The storage writer: one thread that writes the Raft log files, and one that writes the
//! engine. Every write in the node (Raft log appends, votes, state machine applies,
//! snapshots) is a job on one of their queues, or staged in memory (`staged.rs`).
//!
//! Why one thread per store: sled's batches and flushes deadlock when issued concurrently
//! from many tasks (upstream #1308, #1412). Each thread is also a group commit: jobs that
//! queue while a sync is running are merged into one round, written with one `write` to the
//! log files and made durable by the next single sync, so syncs per second stay flat while
//! writes per second grow. Two threads, because the engine's large batches (staged rows
//! taken to sled) would otherwise hold up the log syncs every acknowledged write waits for.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use super::StoreError;
use super::engine::{KvEngine, WriteBatch};
use super::log_files::{LogAppender, LogWrite};

/// A cycle (apply plus flush) this long is logged: every write of the node waited for it.
const SLOW_CYCLE: Duration = Duration::from_millis(50);
/// At most one such line per this long (a failing disk makes every cycle slow).
const SLOW_CYCLE_LOG_EVERY: Duration = Duration::from_secs(10);
/// Engine rows written since the last flush are flushed after this long. Nothing waits for
/// it (the state machines replay their log after a crash); it bounds how much they replay
/// after a power loss.
const ENGINE_FLUSH_EVERY: Duration = Duration::from_secs(1);

/// When a job's completion is signalled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Readers see it (it may still be staged in memory); a crash may lose it.
    Visible,
    /// Flushed: it survives a crash.
    Durable,
}

type Callback = Box<dyn FnOnce(Result<(), StoreError>) + Send>;

/// What a job writes: rows of the engine, or records of the Raft log files.
enum Work {
    Rows(WriteBatch),
    Log(Vec<LogWrite>),
}

impl Work {
    fn ops(&self) -> usize {
        match self {
            Work::Rows(batch) => batch.len(),
            Work::Log(writes) => writes.len(),
        }
    }
    fn bytes(&self) -> usize {
        match self {
            Work::Rows(batch) => batch.bytes(),
            Work::Log(writes) => writes.iter().map(LogWrite::bytes).sum(),
        }
    }
}

struct Job {
    work: Work,
    durability: Durability,
    /// Runs once the work is applied, before the flush (only for durable jobs that also
    /// need to know when readers can see them).
    on_visible: Option<Callback>,
    done: Callback,
}

/// What the writer can be told to do wrong, for fault injection (`chaos.enabled`).
#[derive(Debug, Default)]
pub struct WriterFaults {
    /// Every job fails with an I/O error while set.
    pub fail: AtomicBool,
    /// Each cycle sleeps this many milliseconds before flushing.
    pub stall_ms: AtomicU64,
    /// While set, the writer applies nothing: it waits before its next batch (jobs queue up,
    /// then submitters wait for room) until the stall is cleared.
    stall: AtomicBool,
    stall_lock: parking_lot::Mutex<()>,
    unstalled: parking_lot::Condvar,
}

impl WriterFaults {
    /// Stalls the writer (`true`) or lets it go on (`false`), waking it at once.
    pub fn set_stall(&self, stall: bool) {
        {
            let _guard = self.stall_lock.lock();
            self.stall.store(stall, Ordering::SeqCst);
        }
        if !stall {
            self.unstalled.notify_all();
        }
    }

    pub fn is_stalled(&self) -> bool {
        self.stall.load(Ordering::SeqCst)
    }

    pub fn is_failing(&self) -> bool {
        self.fail.load(Ordering::SeqCst)
    }

    /// Blocks the calling (writer) thread while stalled; whether it had to wait.
    fn wait_while_stalled(&self) -> bool {
        if !self.is_stalled() {
            return false;
        }
        let mut guard = self.stall_lock.lock();
        while self.is_stalled() {
            self.unstalled.wait(&mut guard);
        }
        true
    }
}

enum Command {
    Write(Job),
    /// Flush what came before, then end the thread.
    Stop(oneshot::Sender<()>),
}

#[derive(Clone)]
pub struct StorageWriter {
    /// The log thread's queue, and the engine thread's.
    log_tx: mpsc::Sender<Command>,
    rows_tx: mpsc::Sender<Command>,
    faults: Arc<WriterFaults>,
}

/// Writer limits (from `storage.*` in the configuration).
#[derive(Debug, Clone, Copy)]
pub struct WriterLimits {
    /// Jobs waiting in the queue before writers wait.
    pub queue_depth: usize,
    /// Bytes merged into one engine batch.
    pub max_batch_bytes: usize,
    /// Bytes of visible-only writes staged before they go to the engine (`staged.rs`).
    pub max_staged_bytes: usize,
}

impl StorageWriter {
    /// Starts the writer threads over the engine and the Raft log files. They end when
    /// every `StorageWriter` clone is dropped and their queues are drained; the handle
    /// returned joins both.
    pub fn start(
        engine: Arc<dyn KvEngine>,
        log: LogAppender,
        limits: WriterLimits,
    ) -> (StorageWriter, std::thread::JoinHandle<()>) {
        let (rows_tx, rows_rx) = mpsc::channel(limits.queue_depth);
        let (log_tx, log_rx) = mpsc::channel(limits.queue_depth);
        let faults = Arc::new(WriterFaults::default());
        let rows_faults = faults.clone();
        let rows_engine = engine.clone();
        let rows_thread = std::thread::Builder::new()
            .name("storage-engine".into())
            .spawn(move || run(Stores { engine: rows_engine, log: None }, rows_rx, limits, rows_faults))
            .expect("spawning the engine writer thread");
        let log_faults = faults.clone();
        let handle = std::thread::Builder::new()
            .name("storage-log".into())
            .spawn(move || {
                run(Stores { engine, log: Some(log) }, log_rx, limits, log_faults);
                let _ = rows_thread.join();
            })
            .expect("spawning the log writer thread");
        (StorageWriter { log_tx, rows_tx, faults }, handle)
    }

    pub fn faults(&self) -> &Arc<WriterFaults> {
        &self.faults
    }

    fn queue_of(&self, work: &Work) -> &mpsc::Sender<Command> {
        match work {
            Work::Rows(_) => &self.rows_tx,
            Work::Log(_) => &self.log_tx,
        }
    }

    async fn queue(&self, job: Job) -> Result<(), StoreError> {
        let tx = self.queue_of(&job.work);
        metrics::gauge!("convoy_storage_queue_depth").set((tx.max_capacity() - tx.capacity()) as f64);
        tx.send(Command::Write(job)).await.map_err(|_| StoreError::WriterStopped)
    }

    /// Asks the engine thread to take the staged rows to the engine, without waiting; `done`
    /// runs once it did (or could not take the request).
    pub fn drain_staged(&self, done: impl FnOnce(Result<(), StoreError>) + Send + 'static) {
        let job = Job {
            work: Work::Rows(WriteBatch::checkpoint()),
            durability: Durability::Visible,
            on_visible: None,
            done: Box::new(done),
        };
        if let Err(
            mpsc::error::TrySendError::Full(Command::Write(job))
            | mpsc::error::TrySendError::Closed(Command::Write(job)),
        ) = self.rows_tx.try_send(Command::Write(job))
        {
            // A full queue is a busy thread: it looks at the staged rows after each round anyway.
            (job.done)(Err(StoreError::WriterStopped));
        }
    }

    /// Queues `batch`; `done` runs on the writer thread once it is `durability`.
    pub async fn submit(
        &self,
        batch: WriteBatch,
        durability: Durability,
        done: impl FnOnce(Result<(), StoreError>) + Send + 'static,
    ) -> Result<(), StoreError> {
        self.queue(Job { work: Work::Rows(batch), durability, on_visible: None, done: Box::new(done) }).await
    }

    /// Makes everything queued so far durable and ends the writer thread. Later writes
    /// fail with `WriterStopped`. An injected stall holds the stop as a stuck disk would, until
    /// healed: the node's shutdown bounds that wait, not the writer.
    pub async fn stop(&self) {
        for queue in [&self.rows_tx, &self.log_tx] {
            let (tx, rx) = oneshot::channel();
            if queue.send(Command::Stop(tx)).await.is_ok() {
                let _ = rx.await;
            }
        }
    }

    /// Queues Raft log records, durably: `on_visible` runs once readers find them in the
    /// files, `on_durable` once they are synced (both on the writer thread; keep them short).
    pub async fn append_log(
        &self,
        writes: Vec<LogWrite>,
        on_visible: impl FnOnce(Result<(), StoreError>) + Send + 'static,
        on_durable: impl FnOnce(Result<(), StoreError>) + Send + 'static,
    ) -> Result<(), StoreError> {
        let job = Job {
            work: Work::Log(writes),
            durability: Durability::Durable,
            on_visible: Some(Box::new(on_visible)),
            done: Box::new(on_durable),
        };
        self.queue(job).await
    }

    /// Writes Raft log records and waits until they are `durability`.
    pub async fn write_log(&self, writes: Vec<LogWrite>, durability: Durability) -> Result<(), StoreError> {
        let (tx, rx) = oneshot::channel();
        let done = move |r| {
            let _ = tx.send(r);
        };
        self.queue(Job { work: Work::Log(writes), durability, on_visible: None, done: Box::new(done) }).await?;
        rx.await.map_err(|_| StoreError::WriterStopped)?
    }

    /// Waits until everything queued before is visible to readers.
    pub async fn barrier(&self) -> Result<(), StoreError> {
        self.write(WriteBatch::new(), Durability::Visible).await
    }

    /// Waits until every engine row queued before is durable, staged rows included: the
    /// engine takes them in and flushes.
    pub async fn checkpoint(&self) -> Result<(), StoreError> {
        self.write(WriteBatch::checkpoint(), Durability::Durable).await
    }

    /// Queues `batch` and waits until it is `durability`.
    pub async fn write(&self, batch: WriteBatch, durability: Durability) -> Result<(), StoreError> {
        let (tx, rx) = oneshot::channel();
        self.submit(batch, durability, move |r| {
            let _ = tx.send(r);
        })
        .await?;
        rx.await.map_err(|_| StoreError::WriterStopped)?
    }
}

/// What a writer thread writes to: the engine, and the log files for the log thread.
struct Stores {
    engine: Arc<dyn KvEngine>,
    log: Option<LogAppender>,
}

/// Applies the batches of a round of jobs, in order and as cheaply as each allows: one that
/// need only be visible is staged when the engine takes it (`staged.rs` says why), a durable
/// single write goes on its own, and the rest are merged into one atomic batch. Once that
/// batch has begun, what follows joins it, so nothing overtakes it.
fn apply(engine: &dyn KvEngine, batches: Vec<(Durability, WriteBatch)>) -> Result<(), StoreError> {
    let mut atomic = WriteBatch::new();
    for (durability, batch) in batches {
        if atomic.is_empty() {
            match durability {
                Durability::Visible if !batch.is_checkpoint() && engine.stage(&batch)? => continue,
                Durability::Durable if batch.may_keep_a_prefix() => {
                    engine.apply_in_order(batch)?;
                    continue;
                }
                _ => {}
            }
        }
        atomic.extend(batch);
    }
    if atomic.is_empty() && !atomic.is_checkpoint() { Ok(()) } else { engine.apply(atomic) }
}

/// Writes a round of jobs: the engine's rows, then the log's records (one `write`).
fn write_round(stores: &mut Stores, faults: &WriterFaults, round: Vec<(Durability, Work)>) -> Outcome {
    if faults.is_failing() {
        let failed = Err(StoreError::Engine("injected storage failure".into()));
        return Outcome { rows: failed.clone(), log: failed };
    }
    let mut batches = Vec::new();
    let mut records = 0;
    for (durability, work) in round {
        match work {
            Work::Rows(batch) => batches.push((durability, batch)),
            Work::Log(writes) => {
                let log = stores.log.as_mut().expect("log records are queued only for the log thread");
                records += writes.len();
                for write in writes {
                    log.add(write);
                }
            }
        }
    }
    let rows = if batches.is_empty() { Ok(()) } else { apply(&*stores.engine, batches) };
    let log = match stores.log.as_mut() {
        Some(log) if records > 0 => log.write(),
        _ => Ok(()),
    };
    Outcome { rows, log }
}

/// How a round of writes went, for each kind of job.
struct Outcome {
    rows: Result<(), StoreError>,
    log: Result<(), StoreError>,
}

impl Outcome {
    fn merge(&mut self, other: Outcome) {
        if self.rows.is_ok() {
            self.rows = other.rows;
        }
        if self.log.is_ok() {
            self.log = other.log;
        }
    }
    fn is_ok(&self) -> bool {
        self.rows.is_ok() && self.log.is_ok()
    }
}

/// Which store a job wrote to: its outcome and flush are that store's.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Rows,
    Log,
}

/// The jobs one cycle took from the queue: how to answer each, and what they add up to.
#[derive(Default)]
struct Taken {
    answers: Vec<(Kind, Durability, Option<Callback>, Callback)>,
    /// Whether any job needs the engine, or the log, flushed.
    rows_durable: bool,
    log_durable: bool,
    ops: usize,
}

impl Taken {
    /// Takes `first` (if any) and the jobs queued after it into one round, up to
    /// `max_bytes`. A range delete only sees what is already in the engine, so a queued job
    /// holding one is left in `pending` to start the next cycle; a stop ends the round.
    fn gather(
        &mut self,
        first: Option<Job>,
        rx: &mut mpsc::Receiver<Command>,
        max_bytes: usize,
        pending: &mut Option<Job>,
        stop: &mut Option<oneshot::Sender<()>>,
    ) -> Vec<(Durability, Work)> {
        let mut round = Vec::new();
        let mut bytes = 0;
        let mut next = first;
        loop {
            if let Some(job) = next.take() {
                let kind = match job.work {
                    Work::Rows(_) => Kind::Rows,
                    Work::Log(_) => Kind::Log,
                };
                if job.durability == Durability::Durable {
                    match kind {
                        Kind::Rows => self.rows_durable = true,
                        Kind::Log => self.log_durable = true,
                    }
                }
                self.ops += job.work.ops();
                bytes += job.work.bytes();
                round.push((job.durability, job.work));
                self.answers.push((kind, job.durability, job.on_visible, job.done));
            }
            if bytes >= max_bytes || stop.is_some() {
                return round;
            }
            match rx.try_recv() {
                Ok(Command::Write(job)) if matches!(&job.work, Work::Rows(b) if b.has_range_delete()) => {
                    *pending = Some(job);
                    return round;
                }
                Ok(Command::Write(job)) => next = Some(job),
                Ok(Command::Stop(done)) => {
                    *stop = Some(done);
                    return round;
                }
                Err(_) => return round,
            }
        }
    }
}

fn run(mut stores: Stores, mut rx: mpsc::Receiver<Command>, limits: WriterLimits, faults: Arc<WriterFaults>) {
    let mut pending: Option<Job> = None;
    let mut stop: Option<oneshot::Sender<()>> = None;
    let mut slow = SlowCycles::default();
    let mut engine_flushed = Instant::now();
    loop {
        if pending.is_none()
            && let Some(done) = stop.take()
        {
            match stores.log.as_mut() {
                Some(log) => {
                    let _ = log.write().and_then(|()| log.sync());
                }
                // The empty batch takes any staged rows along.
                None => {
                    let _ = stores.engine.apply(WriteBatch::new()).and_then(|()| stores.engine.flush());
                }
            }
            let _ = done.send(());
            return;
        }
        let first = match pending.take() {
            Some(job) => job,
            None => match rx.blocking_recv() {
                Some(Command::Write(job)) => job,
                Some(Command::Stop(done)) => {
                    stop = Some(done);
                    continue;
                }
                None => return,
            },
        };
        if faults.wait_while_stalled() {
            tracing::info!("storage writer resumes after a stall");
        }
        let mut taken = Taken::default();
        let round = taken.gather(Some(first), &mut rx, limits.max_batch_bytes, &mut pending, &mut stop);
        let cycle = Instant::now();
        let mut outcome = write_round(&mut stores, &faults, round);
        // Jobs that queued while that round was written ride on the same flush: they would
        // wait for it anyway.
        while outcome.is_ok() && pending.is_none() && stop.is_none() && !faults.is_stalled() {
            let more = taken.gather(None, &mut rx, limits.max_batch_bytes, &mut pending, &mut stop);
            if more.is_empty() {
                break;
            }
            outcome.merge(write_round(&mut stores, &faults, more));
        }
        let Taken { answers, rows_durable, log_durable, ops } = taken;
        let applied_in = cycle.elapsed();
        metrics::histogram!("convoy_storage_batch_ops").record(ops as f64);
        metrics::histogram!("convoy_storage_batch_jobs").record(answers.len() as f64);
        let outcome_of = |kind: Kind| match kind {
            Kind::Rows => &outcome.rows,
            Kind::Log => &outcome.log,
        };
        let mut waiting_for_flush = Vec::new();
        for (kind, durability, on_visible, done) in answers {
            let written = outcome_of(kind);
            if let Some(on_visible) = on_visible {
                on_visible(written.clone());
            }
            match (written, durability) {
                (Err(e), _) => done(Err(e.clone())),
                (Ok(()), Durability::Visible) => done(Ok(())),
                (Ok(()), Durability::Durable) => waiting_for_flush.push((kind, done)),
            }
        }
        if !waiting_for_flush.is_empty() {
            let stall = faults.stall_ms.load(Ordering::Relaxed);
            if stall > 0 {
                std::thread::sleep(Duration::from_millis(stall));
            }
        }
        let log_synced = if let Some(log) = stores.log.as_mut().filter(|_| log_durable && outcome.log.is_ok()) {
            let started = Instant::now();
            let synced = log.sync();
            metrics::histogram!("convoy_storage_fsync_seconds").record(started.elapsed().as_secs_f64());
            synced
        } else {
            Ok(())
        };
        // Staged rows past the limit go to the engine now, off every writer's path.
        let drained = if stores.log.is_none() && stores.engine.staged_bytes() >= limits.max_staged_bytes {
            stores.engine.apply(WriteBatch::checkpoint())
        } else {
            Ok(())
        };
        if let Err(e) = drained {
            tracing::error!(error = %e, "taking staged rows to the engine failed; later writes retry it");
        }
        // Only the engine thread touches the engine: a flush from the log thread could meet a
        // batch of the engine thread's (the deadlock this writer exists to avoid).
        let flush_engine =
            stores.log.is_none() && (rows_durable || (ops > 0 && engine_flushed.elapsed() >= ENGINE_FLUSH_EVERY));
        let rows_flushed = if flush_engine && outcome.rows.is_ok() {
            let started = Instant::now();
            let flushed = stores.engine.flush();
            metrics::histogram!("convoy_storage_engine_flush_seconds").record(started.elapsed().as_secs_f64());
            engine_flushed = Instant::now();
            flushed
        } else {
            Ok(())
        };
        for (kind, done) in waiting_for_flush {
            done(match kind {
                Kind::Rows => rows_flushed.clone(),
                Kind::Log => log_synced.clone(),
            });
        }
        let took = cycle.elapsed();
        metrics::histogram!("convoy_storage_cycle_seconds").record(took.as_secs_f64());
        if took >= SLOW_CYCLE {
            slow.seen(took, applied_in, ops);
        }
    }
}

/// Slow cycles since the last line about them.
#[derive(Default)]
struct SlowCycles {
    unreported: u64,
    logged_at: Option<Instant>,
}

impl SlowCycles {
    fn seen(&mut self, took: Duration, applying: Duration, ops: usize) {
        self.unreported += 1;
        if self.logged_at.is_some_and(|t| t.elapsed() < SLOW_CYCLE_LOG_EVERY) {
            return;
        }
        tracing::warn!(
            took_ms = took.as_millis() as u64,
            apply_ms = applying.as_millis() as u64,
            ops,
            slow_cycles = self.unreported,
            "a storage cycle took long: every write of the node waited for it"
        );
        self.unreported = 0;
        self.logged_at = Some(Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use std::ops::Bound;
    use std::sync::atomic::AtomicUsize;

    use super::*;
    use crate::store::engine::SledEngine;
    use crate::store::log_files::LogFiles;
    use crate::store::staged::StagedEngine;

    /// A writer over a staging engine, as a node has it; the engine reads as the node does.
    fn writer() -> (tempfile::TempDir, Arc<dyn KvEngine>, StorageWriter) {
        let (dir, _, engine, w) = writer_over_sled();
        (dir, engine, w)
    }

    fn writer_over_sled() -> (tempfile::TempDir, Arc<dyn KvEngine>, Arc<dyn KvEngine>, StorageWriter) {
        let dir = tempfile::tempdir().unwrap();
        let sled: Arc<dyn KvEngine> = Arc::new(SledEngine::open(&dir.path().join("db"), 8 << 20).unwrap());
        let engine: Arc<dyn KvEngine> = Arc::new(StagedEngine::new(sled.clone(), 1 << 20));
        let (_, log) = LogFiles::open(&dir.path().join("raft-log")).unwrap();
        let (w, _) = StorageWriter::start(
            engine.clone(),
            log,
            WriterLimits { queue_depth: 64, max_batch_bytes: 1 << 20, max_staged_bytes: 1 << 20 },
        );
        (dir, sled, engine, w)
    }

    #[tokio::test]
    async fn visible_writes_wait_in_memory_for_an_atomic_durable_one() {
        let (_dir, sled, engine, w) = writer_over_sled();
        let mut b = WriteBatch::new();
        b.put(b"state".to_vec(), b"1".to_vec());
        b.put(b"applied".to_vec(), b"1".to_vec());
        w.write(b, Durability::Visible).await.unwrap();
        assert_eq!(engine.get(b"state").unwrap(), Some(b"1".to_vec()), "readers see it at once");
        assert_eq!(sled.get(b"state").unwrap(), None, "staged: no sled batch of its own");

        let mut b = WriteBatch::new();
        b.put(b"identity".to_vec(), b"n1".to_vec());
        w.write(b, Durability::Durable).await.unwrap();
        assert_eq!(sled.get(b"identity").unwrap(), Some(b"n1".to_vec()), "a single write goes straight to the engine");
        assert_eq!(sled.get(b"state").unwrap(), None, "and leaves the staged rows staged");

        let mut b = WriteBatch::new();
        b.put(b"a".to_vec(), b"3".to_vec());
        b.put(b"b".to_vec(), b"3".to_vec());
        w.write(b, Durability::Durable).await.unwrap();
        assert_eq!(sled.get(b"state").unwrap(), Some(b"1".to_vec()), "carried by the atomic durable batch");
        assert_eq!(sled.get(b"applied").unwrap(), Some(b"1".to_vec()));
        assert_eq!(sled.get(b"b").unwrap(), Some(b"3".to_vec()));
    }

    #[tokio::test]
    async fn stopping_takes_the_staged_rows_to_disk() {
        let (_dir, sled, _engine, w) = writer_over_sled();
        let mut b = WriteBatch::new();
        b.put(b"state".to_vec(), b"1".to_vec());
        w.write(b, Durability::Visible).await.unwrap();
        w.stop().await;
        assert_eq!(sled.get(b"state").unwrap(), Some(b"1".to_vec()));
    }

    #[tokio::test]
    async fn a_checkpoint_takes_the_staged_rows_to_the_engine() {
        let (_dir, sled, _engine, w) = writer_over_sled();
        let mut b = WriteBatch::new();
        b.put(b"state".to_vec(), b"1".to_vec());
        w.write(b, Durability::Visible).await.unwrap();
        let mut single = WriteBatch::new();
        single.put(b"identity".to_vec(), b"n1".to_vec());
        w.write(single, Durability::Durable).await.unwrap();
        assert_eq!(sled.get(b"state").unwrap(), None, "a single durable write leaves staged rows staged");
        w.checkpoint().await.unwrap();
        assert_eq!(sled.get(b"state").unwrap(), Some(b"1".to_vec()), "a checkpoint takes them in before its flush");
    }

    #[tokio::test]
    async fn writes_become_visible_and_durable_in_order() {
        let (_dir, engine, w) = writer();
        let mut b = WriteBatch::new();
        b.put(b"a1".to_vec(), b"x".to_vec());
        b.put(b"a2".to_vec(), b"y".to_vec());
        w.write(b, Durability::Durable).await.unwrap();
        let mut b = WriteBatch::new();
        b.delete_range(b"a".to_vec(), b"a2".to_vec());
        b.put(b"a3".to_vec(), b"z".to_vec());
        w.write(b, Durability::Visible).await.unwrap();
        let all = engine.range(Bound::Unbounded, Bound::Unbounded, false, 10).unwrap();
        assert_eq!(all, vec![(b"a2".to_vec(), b"y".to_vec()), (b"a3".to_vec(), b"z".to_vec())]);
    }

    #[tokio::test]
    async fn concurrent_writers_are_merged_and_all_complete() {
        let (_dir, engine, w) = writer();
        let done = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for t in 0..32u32 {
            let w = w.clone();
            let done = done.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..50u32 {
                    let mut b = WriteBatch::new();
                    b.put(format!("k{t:02}-{i:03}").into_bytes(), vec![0; 100]);
                    w.write(b, if i % 2 == 0 { Durability::Durable } else { Durability::Visible }).await.unwrap();
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(done.load(Ordering::Relaxed), 32 * 50);
        assert_eq!(engine.range(Bound::Unbounded, Bound::Unbounded, false, 10_000).unwrap().len(), 32 * 50);
    }

    #[tokio::test]
    async fn a_stalled_writer_applies_nothing_until_the_stall_is_cleared() {
        let (_dir, engine, w) = writer();
        w.faults().set_stall(true);
        let mut b = WriteBatch::new();
        b.put(b"k".to_vec(), b"v".to_vec());
        let pending = tokio::spawn({
            let w = w.clone();
            async move { w.write(b, Durability::Durable).await }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!pending.is_finished(), "a write completed while the writer was stalled");
        assert_eq!(engine.get(b"k").unwrap(), None);
        w.faults().set_stall(false);
        let done = tokio::time::timeout(Duration::from_secs(5), pending).await;
        assert!(matches!(done, Ok(Ok(Ok(())))), "the write did not complete after the stall cleared: {done:?}");
        assert_eq!(engine.get(b"k").unwrap(), Some(b"v".to_vec()));
    }

    #[tokio::test]
    async fn stopping_a_stalled_writer_waits_for_the_heal_then_finishes() {
        let (_dir, engine, w) = writer();
        w.faults().set_stall(true);
        let mut b = WriteBatch::new();
        b.put(b"k".to_vec(), b"v".to_vec());
        w.submit(b, Durability::Durable, |_| {}).await.unwrap();
        let w = Arc::new(w);
        let stopping = tokio::spawn({
            let w = w.clone();
            async move { w.stop().await }
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!stopping.is_finished(), "the stop went through a stall nobody healed");
        assert_eq!(engine.get(b"k").unwrap(), None);
        w.faults().set_stall(false);
        tokio::time::timeout(Duration::from_secs(5), stopping).await.expect("stop returns").unwrap();
        assert_eq!(engine.get(b"k").unwrap(), Some(b"v".to_vec()));
    }

    #[tokio::test]
    async fn injected_failures_reach_every_waiter() {
        let (_dir, _engine, w) = writer();
        w.faults().fail.store(true, Ordering::Relaxed);
        let mut b = WriteBatch::new();
        b.put(b"k".to_vec(), b"v".to_vec());
        assert!(w.write(b, Durability::Durable).await.is_err());
    }
}
