//! Helpers for the failover tests (`tests/failover.rs`): senders that keep sending through node
//! failures and record every attempt in a [`Ledger`], checks of a group's log against that record,
//! and waits on the cluster's state.
//!
//! A sender retries a send that failed with `unavailable`, `rate_limited` or a client timeout with
//! the same `client_msg_id` (sends are idempotent), so every acknowledged message must be in the
//! log exactly once, at the seq its ack named, whatever happened to the nodes in between.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{
    Client, ClientError, ClientOptions, Cluster, Node, NodeOptions, admin_get, retry_delay, seq_of, sync_all, text,
    token, until_available, wait_until,
};

/// Only one cluster test of this process runs at a time: three node processes, their elections and
/// their fsyncs already keep a two-core machine busy, and failover times measured next to another
/// cluster would measure the other cluster.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Takes the process-wide cluster test lock; hold the guard for the whole test.
pub async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    SERIAL.lock().await
}

/// Node options for bursts: the per-connection rate limit is not what failover tests are about.
pub fn burst_options() -> NodeOptions {
    NodeOptions::new().set("limits.requests_per_second", 100_000).set("limits.request_burst", 100_000)
}

/// How long a sender waits for one reply before it retries the same `client_msg_id`.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(3);

/// [`crate::connect`] with `request_timeout` as the connection's reply timeout.
pub async fn connect_with_timeout(node: &Node, user: &str, roles: &[&str], request_timeout: Duration) -> Client {
    let opts = ClientOptions { request_timeout, ..ClientOptions::default() };
    let client = Client::connect(node.client_url(), opts)
        .await
        .unwrap_or_else(|e| panic!("connecting to {}: {e}", node.client_url()));
    let hello = client
        .hello(&token(node, user, roles), "failover")
        .await
        .unwrap_or_else(|e| panic!("hello as {user} on {}: {e}", node.client_url()));
    assert_eq!(hello.user, user, "hello answered for another user");
    client
}

/// One request of a sender and how it ended.
#[derive(Debug, Clone)]
pub struct Attempt {
    /// The sender's name (see [`Sender::name`]).
    pub sender: String,
    pub group: String,
    pub user: String,
    pub cmid: String,
    /// 0 for the first request of this `client_msg_id`, then 1, 2, ... for retries.
    pub retry: u32,
    pub issued: Instant,
    pub answered: Instant,
    pub outcome: Result<convoy_chaos::client::Sent, ClientError>,
}

/// An acknowledged send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    pub sender: String,
    pub group: String,
    pub user: String,
    pub cmid: String,
    pub seq: u64,
}

/// A request that has been sent and not answered yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outstanding {
    pub cmid: String,
    pub retry: u32,
    pub issued: Instant,
}

/// Everything the senders of a test did.
#[derive(Default)]
pub struct Ledger {
    attempts: Mutex<Vec<Attempt>>,
    /// (group, user, client_msg_id) of every send ever issued, answered or not.
    issued: Mutex<BTreeSet<(String, String, String)>>,
    outstanding: Mutex<BTreeMap<String, Outstanding>>,
    acks: AtomicUsize,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Ledger {
    pub fn new() -> Arc<Ledger> {
        Arc::new(Ledger::default())
    }

    fn issue(&self, s: &Sender, cmid: &str, retry: u32) -> Instant {
        lock(&self.issued).insert((s.group.clone(), s.user.clone(), cmid.to_string()));
        let issued = Instant::now();
        lock(&self.outstanding).insert(s.name.clone(), Outstanding { cmid: cmid.to_string(), retry, issued });
        issued
    }

    fn answer(&self, attempt: Attempt) {
        lock(&self.outstanding).remove(&attempt.sender);
        if attempt.outcome.is_ok() {
            self.acks.fetch_add(1, Ordering::SeqCst);
        }
        lock(&self.attempts).push(attempt);
    }

    /// How many sends have been acknowledged so far.
    pub fn ack_count(&self) -> usize {
        self.acks.load(Ordering::SeqCst)
    }

    /// Acknowledgements of sender `name` so far.
    pub fn acks_of(&self, name: &str) -> usize {
        lock(&self.attempts).iter().filter(|a| a.sender == name && a.outcome.is_ok()).count()
    }

    /// Every attempt answered so far, in the order the answers came.
    pub fn attempts(&self) -> Vec<Attempt> {
        lock(&self.attempts).clone()
    }

    /// The request sender `name` is waiting on, if any.
    pub fn outstanding(&self, name: &str) -> Option<Outstanding> {
        lock(&self.outstanding).get(name).cloned()
    }

    /// Every acknowledged send.
    pub fn acks(&self) -> Vec<Ack> {
        lock(&self.attempts)
            .iter()
            .filter_map(|a| {
                let sent = a.outcome.as_ref().ok()?;
                Some(Ack {
                    sender: a.sender.clone(),
                    group: a.group.clone(),
                    user: a.user.clone(),
                    cmid: a.cmid.clone(),
                    seq: sent.seq,
                })
            })
            .collect()
    }

    /// (group, user, client_msg_id) of every send issued, answered or not.
    pub fn issued(&self) -> BTreeSet<(String, String, String)> {
        lock(&self.issued).clone()
    }

    /// How long after `t` the first acknowledgement of a request issued at or after `t` came, over
    /// the senders `names` (all when empty). `None` while there is none.
    pub fn first_ack_issued_after(&self, t: Instant, names: &[&str]) -> Option<Duration> {
        lock(&self.attempts)
            .iter()
            .filter(|a| a.issued >= t && a.outcome.is_ok() && (names.is_empty() || names.contains(&a.sender.as_str())))
            .map(|a| a.answered - t)
            .min()
    }

    /// First requests of a `client_msg_id` that were acknowledged with `duplicate: true`: the
    /// protocol says only a retry is answered so.
    pub fn duplicates_on_first_try(&self) -> Vec<Attempt> {
        lock(&self.attempts)
            .iter()
            .filter(|a| a.retry == 0 && a.outcome.as_ref().is_ok_and(|s| s.duplicate))
            .cloned()
            .collect()
    }

    /// The last `n` answered requests, oldest first, each as sender, `client_msg_id`, retry,
    /// when it was answered (relative to `since`) and its outcome: what a stuck sender last saw.
    pub fn last_answers(&self, n: usize, since: Instant) -> Vec<String> {
        let attempts = lock(&self.attempts);
        attempts[attempts.len().saturating_sub(n)..]
            .iter()
            .map(|a| {
                let at = a.answered.saturating_duration_since(since).as_millis();
                let outcome = match &a.outcome {
                    Ok(sent) => format!("acked seq {}", sent.seq),
                    Err(e) => format!("{e}"),
                };
                format!("{} {} retry {} at {at} ms: {outcome}", a.sender, a.cmid, a.retry)
            })
            .collect()
    }

    /// How many attempts failed, by error code (`unavailable`, `timeout`, `closed`, ...).
    pub fn errors(&self) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        for a in lock(&self.attempts).iter() {
            if let Err(e) = &a.outcome {
                *out.entry(e.code().to_string()).or_default() += 1;
            }
        }
        out
    }

    /// Attempts that failed with an error outside `allowed` (codes as [`ClientError::code`]).
    pub fn errors_other_than(&self, allowed: &[&str]) -> Vec<Attempt> {
        lock(&self.attempts)
            .iter()
            .filter(|a| matches!(&a.outcome, Err(e) if !allowed.contains(&e.code())))
            .cloned()
            .collect()
    }
}

/// A stop flag shared with running senders.
#[derive(Debug, Clone, Default)]
pub struct Stop(Arc<AtomicBool>);

impl Stop {
    pub fn new() -> Stop {
        Stop::default()
    }

    pub fn stop(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    pub fn is_stopped(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// One sending connection: it sends `prefix-0`, `prefix-1`, ... to `group` as `user`.
#[derive(Debug, Clone)]
pub struct Sender {
    /// Unique among the senders of one ledger.
    pub name: String,
    pub client: Client,
    pub group: String,
    pub user: String,
    pub prefix: String,
}

/// Runs `sender`: one message at a time, each as soon as the previous one is acknowledged, until
/// `stop` is set or `max` messages were acknowledged. A send that fails with `unavailable`,
/// `rate_limited` or a timeout is retried with the same `client_msg_id` until it is acknowledged
/// (or `stop` is set). Any other error ends the sender and is returned (a connection to a killed
/// node ends with `closed`). Every request and its outcome goes into `ledger`.
pub async fn run_sender(sender: Sender, ledger: Arc<Ledger>, stop: Stop, max: usize) -> Option<ClientError> {
    for i in 0..max {
        let cmid = format!("{}-{i}", sender.prefix);
        let mut retry = 0;
        loop {
            if stop.is_stopped() {
                return None;
            }
            let issued = ledger.issue(&sender, &cmid, retry);
            let outcome = sender.client.msg_send(&sender.group, &cmid, text(&cmid), false).await;
            let answered = Instant::now();
            let delay = match &outcome {
                Ok(_) => None,
                Err(e) => Some(retry_delay(e)),
            };
            ledger.answer(Attempt {
                sender: sender.name.clone(),
                group: sender.group.clone(),
                user: sender.user.clone(),
                cmid: cmid.clone(),
                retry,
                issued,
                answered,
                outcome: outcome.clone(),
            });
            match delay {
                None => break,
                Some(Some(pause)) => {
                    retry += 1;
                    if !pause.is_zero() {
                        tokio::time::sleep(pause).await;
                    }
                }
                Some(None) => return outcome.err(),
            }
        }
    }
    None
}

/// Starts [`run_sender`] on the current runtime.
pub fn spawn_sender(sender: Sender, ledger: &Arc<Ledger>, stop: &Stop) -> tokio::task::JoinHandle<Option<ClientError>> {
    tokio::spawn(run_sender(sender, ledger.clone(), stop.clone(), usize::MAX))
}

/// Awaits sender tasks, passing on a sender's panic; their final errors (a sender ends without one
/// when stopped).
/// Starts one sender per entry of `via` (node indexes), each as a user of `users` (in order),
/// sender `k` writing to `groups[k % groups.len()]`. `tag` keeps the names (and so the
/// `client_msg_id`s) of separate batches of senders apart.
pub async fn start_senders(
    cluster: &Cluster,
    via: &[usize],
    users: &[String],
    groups: &[String],
    tag: &str,
    ledger: &Arc<Ledger>,
    stop: &Stop,
) -> Vec<tokio::task::JoinHandle<Option<ClientError>>> {
    assert!(!groups.is_empty(), "senders need a group");
    let mut tasks = Vec::new();
    for (k, (&i, user)) in via.iter().zip(users).enumerate() {
        let client = connect_with_timeout(cluster.node(i), user, &["driver"], SEND_TIMEOUT).await;
        let name = format!("{tag}-{}-c{k}", cluster.node(i).id());
        let group = groups[k % groups.len()].clone();
        let sender = Sender { name: name.clone(), client, group, user: user.clone(), prefix: name };
        tasks.push(spawn_sender(sender, ledger, stop));
    }
    tasks
}

pub async fn join_senders(tasks: Vec<tokio::task::JoinHandle<Option<ClientError>>>) -> Vec<Option<ClientError>> {
    let mut out = Vec::new();
    for task in tasks {
        match task.await {
            Ok(end) => out.push(end),
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => panic!("sender task: {e}"),
        }
    }
    out
}

/// Checks a whole log of `group` (from `msg.sync` or a replica; `what` names it in failures):
/// seqs run 1..=n with no gap; every ack of `group` is at its seq with its sender and body; no
/// (sender, client_msg_id) is stored twice; every client entry is a send that was issued, and
/// every other entry is a system entry. Returns the number of client entries.
pub fn check_log(
    what: &str,
    group: &str,
    entries: &[Value],
    acks: &[Ack],
    issued: &BTreeSet<(String, String, String)>,
) -> usize {
    let seqs: Vec<u64> = entries.iter().map(seq_of).collect();
    let n = seqs.len() as u64;
    if seqs != (1..=n).collect::<Vec<_>>() {
        let gap = seqs.iter().zip(1..).find(|(s, want)| **s != *want);
        panic!("{what}: {group}'s seqs are not 1..={n}: first mismatch {gap:?}");
    }
    for ack in acks.iter().filter(|a| a.group == group) {
        let Some(entry) = entries.get((ack.seq as usize).wrapping_sub(1)) else {
            panic!(
                "{what}: {group}: acknowledged seq {} ({} by {}) is missing; the log ends at {n}",
                ack.seq, ack.cmid, ack.sender
            );
        };
        assert_eq!(
            entry["client_msg_id"],
            ack.cmid.as_str(),
            "{what}: {group}: acknowledged seq {} holds {entry}",
            ack.seq
        );
        assert_eq!(entry["from"], ack.user.as_str(), "{what}: {group}: seq {}", ack.seq);
        assert_eq!(entry["body"], text(&ack.cmid), "{what}: {group}: seq {}", ack.seq);
    }
    let mut stored = BTreeSet::new();
    for entry in entries {
        match entry["client_msg_id"].as_str() {
            Some(cmid) => {
                let from = entry["from"].as_str().unwrap_or_default().to_string();
                assert!(
                    issued.contains(&(group.to_string(), from.clone(), cmid.to_string())),
                    "{what}: {group}: an entry no sender issued: {entry}"
                );
                assert!(stored.insert((from, cmid.to_string())), "{what}: {group}: {cmid} is stored twice: {entry}");
            }
            None => {
                assert_eq!(entry["body"]["type"], "system", "{what}: {group}: an entry without client_msg_id: {entry}")
            }
        }
    }
    stored.len()
}

/// The whole log of `group` as `client` reads it with `msg.sync`, checked to reach at least the
/// `last_seq` that `group.info` reported just before (writes may go on meanwhile).
pub async fn synced_log(client: &Client, group: &str) -> Vec<Value> {
    let before = until_available(&format!("group.info {group}"), || client.group_info(group)).await.last_seq;
    let entries = sync_all(client, group, 0, 500).await;
    let reached = entries.last().map(seq_of).unwrap_or(0);
    assert!(
        reached >= before,
        "msg.sync of {group} on {} ended at seq {reached}, before the last_seq {before} group.info reported earlier",
        client.peer_addr()
    );
    entries
}

/// Waits until the replicas of `group` on the nodes `nodes` hold identical, non-empty logs and
/// returns that log. Panics after `timeout` with each replica's length and first difference.
pub async fn converged(cluster: &Cluster, nodes: &[usize], group: &str, timeout: Duration) -> Vec<Value> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(20);
    loop {
        let mut logs = Vec::new();
        for &i in nodes {
            logs.push(cluster.replica_entries(i, "group", group).await);
        }
        if let Some(Ok(first)) = logs.first()
            && !first.is_empty()
            && logs.iter().all(|l| l.as_ref().ok() == Some(first))
        {
            return first.clone();
        }
        if Instant::now() >= deadline {
            let mut report = Vec::new();
            let base = logs.first().and_then(|l| l.as_ref().ok()).cloned().unwrap_or_default();
            for (&i, log) in nodes.iter().zip(&logs) {
                match log {
                    Ok(l) => {
                        let diff = l.iter().zip(&base).position(|(a, b)| a != b);
                        let mut line = format!(
                            "{}: {} entries, first difference from {} at index {diff:?}",
                            cluster.node(i).id(),
                            l.len(),
                            cluster.node(nodes[0]).id()
                        );
                        if let Some(d) = diff {
                            line.push_str(&format!("\n  here:  {:?}", &l[d..(d + 3).min(l.len())]));
                            line.push_str(&format!("\n  there: {:?}", &base[d..(d + 3).min(base.len())]));
                        }
                        report.push(line);
                    }
                    Err(e) => report.push(format!("{}: {e}", cluster.node(i).id())),
                }
            }
            panic!("the replicas of {group} did not converge within {timeout:?}:\n{}", report.join("\n"));
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(200));
    }
}

/// `up` of member `name` in a `GET /v1/cluster` document; `None` when it is not listed.
pub fn member_up(status: &Value, name: &str) -> Option<bool> {
    status["members"].as_array()?.iter().find(|m| m["name"] == name).and_then(|m| m["up"].as_bool())
}

/// `GET /v1/cluster` of node `via`, or `None` when it does not answer.
pub async fn try_status(cluster: &Cluster, via: usize) -> Option<Value> {
    admin_get(cluster.node(via), "/v1/cluster").await.ok()
}

/// Whether node `via` sees every shard led and the shard leaderships spread evenly (no two
/// members' counts differ by two or more), so that the controller moves no leader any more.
pub async fn leaders_settled(cluster: &Cluster, via: usize) -> bool {
    let Some(status) = try_status(cluster, via).await else { return false };
    let mut leads: BTreeMap<String, usize> = cluster.nodes.iter().map(|n| (n.id().to_string(), 0)).collect();
    for g in status["groups"].as_array().into_iter().flatten().filter(|g| g["group"] != "meta") {
        let Some(leader) = g["leader"].as_str() else { return false };
        *leads.entry(leader.to_string()).or_default() += 1;
    }
    let (min, max) = (leads.values().min().copied().unwrap_or(0), leads.values().max().copied().unwrap_or(0));
    max < min + 2
}

/// The leader of `group`'s shard (as node `via` sees it) once the controller has stopped
/// moving shard leaders: a test that kills or pauses "the leader" must not pick a node whose
/// leadership is about to move away.
pub async fn settled_leader(cluster: &Cluster, via: usize, group: &str) -> usize {
    let settled = wait_until(Duration::from_secs(30), || leaders_settled(cluster, via)).await;
    assert!(settled, "shard leaders did not settle within 30 s: {}", cluster.status(via).await);
    cluster.wait_for_leader(via, "group", group, None, Duration::from_secs(10)).await.expect("a leader")
}

/// Whether node `leader` still leads `group`'s shard as node `via` sees it: checked right
/// before `leader` is disrupted, so that a test never measures the loss of a follower.
pub async fn still_leads(cluster: &Cluster, via: usize, group: &str, leader: usize) -> bool {
    cluster.leader_of(via, "group", group).await == Some(leader)
}

/// Panics unless [`still_leads`].
pub async fn assert_still_leads(cluster: &Cluster, via: usize, group: &str, leader: usize) {
    assert!(
        still_leads(cluster, via, group, leader).await,
        "the leadership of {group}'s shard moved before {} was disrupted",
        cluster.node(leader).id()
    );
}

/// Whether every node in `nodes` sees every node of the cluster up and the same leader for the shard of
/// `group`.
pub async fn healthy(cluster: &Cluster, nodes: &[usize], group: &str) -> bool {
    let names: Vec<String> = cluster.nodes.iter().map(|n| n.id().to_string()).collect();
    let mut leaders = BTreeSet::new();
    for &via in nodes {
        let Some(status) = try_status(cluster, via).await else { return false };
        if !names.iter().all(|n| member_up(&status, n) == Some(true)) {
            return false;
        }
        match cluster.leader_of(via, "group", group).await {
            Some(l) => leaders.insert(l),
            None => return false,
        };
    }
    leaders.len() == 1
}

/// The shard (`"shard"` of `GET /v1/entities/group/{id}`) that group `id` lives in, as node `via`
/// computes it.
pub async fn shard_of_group(node: &Node, id: &str) -> String {
    let v = admin_get(node, &format!("/v1/entities/group/{id}")).await.unwrap_or_else(|e| panic!("{e}"));
    v["shard"].as_str().unwrap_or_else(|| panic!("no shard for group {id}: {v}")).to_string()
}

/// Sorted durations with their median and maximum, in milliseconds.
pub fn spread(durations: &[Duration]) -> (Vec<u128>, u128, u128) {
    let mut ms: Vec<u128> = durations.iter().map(Duration::as_millis).collect();
    ms.sort_unstable();
    let median = if ms.is_empty() {
        0
    } else if ms.len() % 2 == 1 {
        ms[ms.len() / 2]
    } else {
        (ms[ms.len() / 2 - 1] + ms[ms.len() / 2]) / 2
    };
    let max = ms.last().copied().unwrap_or(0);
    (ms, median, max)
}

/// Polls `GET /v1/cluster` on each of `observers` (every 20 ms) until it lists member `name` with
/// `up == want`; for each observer, how long after `since` it first did, or `None` if it did not
/// within `timeout` of `since`.
pub async fn time_until_seen(
    cluster: &Cluster,
    observers: &[usize],
    name: &str,
    want: bool,
    since: Instant,
    timeout: Duration,
) -> Vec<Option<Duration>> {
    let mut seen: Vec<Option<Duration>> = vec![None; observers.len()];
    while seen.iter().any(Option::is_none) && since.elapsed() < timeout {
        for (slot, &via) in seen.iter_mut().zip(observers) {
            if slot.is_none()
                && let Some(status) = try_status(cluster, via).await
                && member_up(&status, name) == Some(want)
            {
                *slot = Some(since.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    seen
}
