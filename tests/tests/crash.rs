//! Crashes and restarts: nothing acknowledged is lost, duplicated or moved by kill -9 or a
//! graceful stop, and retries after a restart append at most once.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use convoy_tests::*;
use rand::RngExt;
use serde_json::{Value, json};

/// Fast enough for bursts: the default per-connection rate limit is not what these tests are about.
fn burst_options() -> NodeOptions {
    NodeOptions::new()
        .set("limits.requests_per_second", 100_000)
        .set("limits.request_burst", 100_000)
        .set("timeouts.shutdown_grace", "2s")
}

/// One acknowledged send.
#[derive(Debug, Clone)]
struct Ack {
    group: String,
    user: String,
    cmid: String,
    seq: u64,
}

/// What a burst of senders did: every send attempted (acked or not) and every ack.
struct Record {
    attempted: Mutex<BTreeSet<(String, String, String)>>,
    acks: Mutex<Vec<Ack>>,
    ack_count: AtomicUsize,
    /// `reached` is notified when this many sends have been acked.
    notify_at: usize,
    reached: Notify,
}

impl Record {
    fn new(notify_at: usize) -> Arc<Record> {
        Arc::new(Record {
            attempted: Mutex::default(),
            acks: Mutex::default(),
            ack_count: AtomicUsize::new(0),
            notify_at,
            reached: Notify::new(),
        })
    }

    /// Waits until `notify_at` sends have been acked; panics after `timeout`.
    async fn wait_reached(&self, timeout: Duration) {
        if tokio::time::timeout(timeout, self.reached.notified()).await.is_err() {
            panic!("only {} of {} acks after {timeout:?}", self.ack_count.load(Ordering::SeqCst), self.notify_at);
        }
    }
}

/// Sends to `group` as `user` on `client`, one at a time, as fast as acks come back, until an error
/// (the node dies) or `max` sends.
async fn send_until_error(
    client: Client,
    group: String,
    user: String,
    prefix: String,
    max: usize,
    record: Arc<Record>,
) {
    for i in 0..max {
        let cmid = format!("{prefix}-{i}");
        record.attempted.lock().unwrap().insert((group.clone(), user.clone(), cmid.clone()));
        match client.msg_send(&group, &cmid, text(&cmid), false).await {
            Ok(sent) => {
                assert!(!sent.duplicate, "{cmid} was sent once but acked as a duplicate");
                record.acks.lock().unwrap().push(Ack { group: group.clone(), user: user.clone(), cmid, seq: sent.seq });
                if record.ack_count.fetch_add(1, Ordering::SeqCst) + 1 == record.notify_at {
                    record.reached.notify_one();
                }
            }
            Err(_) => return,
        }
    }
}

/// Checks `group`'s whole log against everything known: contiguous seqs, every ack at its seq,
/// every earlier observed entry unchanged, every client entry attempted exactly once. Adds the
/// entries seen to `observed`; returns the number of entries and the (sender, client_msg_id) of
/// the client entries.
async fn check_group(
    client: &Client,
    group: &str,
    acks: &[Ack],
    attempted: &BTreeSet<(String, String, String)>,
    observed: &mut BTreeMap<(String, u64), Value>,
) -> (usize, BTreeSet<(String, String)>) {
    let entries = sync_all(client, group, 0, 500).await;
    let last = client.group_info(group).await.expect("group.info").last_seq;
    let seqs: Vec<u64> = entries.iter().map(seq_of).collect();
    assert_eq!(seqs, (1..=last).collect::<Vec<_>>(), "{group}: seqs are not 1..={last}");

    let by_seq: BTreeMap<u64, &Value> = entries.iter().map(|e| (seq_of(e), e)).collect();
    for ack in acks.iter().filter(|a| a.group == group) {
        let entry = by_seq
            .get(&ack.seq)
            .unwrap_or_else(|| panic!("{group}: acked seq {} ({}) is missing; last_seq {last}", ack.seq, ack.cmid));
        assert_eq!(entry["client_msg_id"], ack.cmid.as_str(), "{group}: acked seq {} holds {entry}", ack.seq);
        assert_eq!(entry["from"], ack.user.as_str(), "{group}: seq {}", ack.seq);
        assert_eq!(entry["body"], text(&ack.cmid), "{group}: seq {}", ack.seq);
    }
    let mut keys = BTreeSet::new();
    for entry in &entries {
        match entry["client_msg_id"].as_str() {
            Some(cmid) => {
                let from = entry["from"].as_str().unwrap_or_default().to_string();
                assert!(
                    attempted.contains(&(group.to_string(), from.clone(), cmid.to_string())),
                    "{group}: unexpected entry {entry}"
                );
                assert!(keys.insert((from, cmid.to_string())), "{group}: {cmid} is stored twice");
            }
            None => assert_eq!(entry["body"]["type"], "system", "{group}: entry without client_msg_id: {entry}"),
        }
        let key = (group.to_string(), seq_of(entry));
        if let Some(before) = observed.get(&key) {
            assert_eq!(before, entry, "{group}: seq {} changed across a restart", key.1);
        } else {
            observed.insert(key, entry.clone());
        }
    }
    (entries.len(), keys)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_during_bursts_loses_no_acked_message() {
    const ROUNDS: usize = 6;
    const CONNECTIONS: usize = 6;
    const GROUPS: usize = 3;
    let mut node = Node::start(burst_options());
    let users: Vec<String> = (0..CONNECTIONS).map(|i| unique(&format!("s{i}"))).collect();
    let groups: Vec<String> = (0..GROUPS).map(|i| unique(&format!("burst{i}"))).collect();
    {
        let owner = connect(&node, &users[0], &["dispatcher"]).await;
        for g in &groups {
            open_group(&owner, g, users[1..].iter().map(|u| Member::new(u, "driver")).collect()).await;
        }
    }

    let mut all_acks: Vec<Ack> = Vec::new();
    let mut attempted = BTreeSet::new();
    let mut observed = BTreeMap::new();
    for round in 0..ROUNDS {
        let (target, jitter_us) = {
            let mut rng = rand::rng();
            (rng.random_range(150..400), rng.random_range(0..3_000))
        };
        let record = Record::new(target);
        let mut tasks = Vec::new();
        for (i, user) in users.iter().enumerate() {
            let client = connect(&node, user, &["driver"]).await;
            let group = groups[i % GROUPS].clone();
            let prefix = format!("r{round}-c{i}");
            tasks.push(tokio::spawn(send_until_error(client, group, user.clone(), prefix, 5_000, record.clone())));
        }
        record.wait_reached(Duration::from_secs(60)).await;
        tokio::time::sleep(Duration::from_micros(jitter_us)).await;
        node.kill9();
        for task in tasks {
            task.await.expect("sender task");
        }
        let acked_this_round = record.acks.lock().unwrap().len();
        all_acks.extend(record.acks.lock().unwrap().iter().cloned());
        attempted.extend(record.attempted.lock().unwrap().iter().cloned());

        node.restart();
        let checker = connect(&node, &users[0], &["dispatcher"]).await;
        let mut stored = 0;
        for g in &groups {
            stored += check_group(&checker, g, &all_acks, &attempted, &mut observed).await.0;
        }
        let unacked = attempted.len() - all_acks.len();
        eprintln!(
            "round {round}: {acked_this_round} acks, {} in total, {unacked} sends never acked, {stored} entries",
            all_acks.len()
        );
        assert!(
            stored >= all_acks.len() + GROUPS,
            "round {round}: {stored} entries stored for {} acks ({acked_this_round} this round)",
            all_acks.len()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_zero_and_keeps_everything_acked() {
    let node = Node::start(burst_options().set("chaos.enabled", true));
    let users: Vec<String> = (0..3).map(|i| unique(&format!("t{i}"))).collect();
    let g = unique("term");
    {
        let owner = connect(&node, &users[0], &["dispatcher"]).await;
        open_group(&owner, &g, drivers(&[&users[1], &users[2]])).await;
    }
    let record = Record::new(100);
    let mut clients = Vec::new();
    let mut tasks = Vec::new();
    for (i, user) in users.iter().enumerate() {
        let client = connect(&node, user, &["driver"]).await;
        clients.push(client.clone());
        tasks.push(tokio::spawn(send_until_error(
            client,
            g.clone(),
            user.clone(),
            format!("t{i}"),
            5_000,
            record.clone(),
        )));
    }
    record.wait_reached(Duration::from_secs(30)).await;

    // Writes in flight when the signal comes: the storage stalls so that sends wait in it, the
    // signal comes, and the writes go through only once the node is draining.
    let stalled = admin_post(&node, "/v1/chaos/storage/stall").await;
    assert_eq!(stalled.status, 200, "{stalled:?}");
    let waiting = wait_until(Duration::from_secs(10), || async {
        metric(&node, "convoy_requests_in_flight").await >= users.len() as f64
    })
    .await;
    assert!(waiting, "the senders' requests never all waited in the node");
    let acked_at_signal = record.ack_count.load(Ordering::SeqCst);
    let (readyz, heal, admin) = (
        format!("{}/readyz", node.admin_url()),
        format!("{}/v1/chaos/storage/heal", node.admin_url()),
        admin_token(&node),
    );
    let terminated = tokio::task::spawn_blocking(move || {
        let mut node = node;
        let status = node.terminate();
        (node, status)
    });
    let draining =
        wait_until(Duration::from_secs(10), || async { http::get(&readyz).await.is_ok_and(|r| r.status == 503) }).await;
    assert!(draining, "the node never said it was draining on /readyz");
    let healed = http::request_with_token("POST", &heal, Some(&admin)).await.expect("healing the storage");
    assert_eq!(healed.status, 200, "{healed:?}");
    let (mut node, status) = terminated.await.unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
    assert!(status.success(), "SIGTERM: exit status {status}");
    assert!(
        record.ack_count.load(Ordering::SeqCst) > acked_at_signal,
        "the sends waiting in storage when SIGTERM came were never answered"
    );
    let log = std::fs::read_to_string(node.log_path()).expect("reading the node's log");
    let errors: Vec<&str> = log.lines().filter(|l| l.contains(" ERROR ")).collect();
    assert!(errors.is_empty(), "a clean stop logs no errors:\n{}", errors.join("\n"));
    for task in tasks {
        task.await.expect("sender task");
    }
    for client in &clients {
        let code = closed_with(client, Duration::from_secs(5)).await;
        assert_eq!(code, Some(1001), "a client of a node shutting down gets close code 1001");
    }

    node.restart();
    let checker = connect(&node, &users[0], &["dispatcher"]).await;
    let acks = record.acks.lock().unwrap().clone();
    let attempted = record.attempted.lock().unwrap().clone();
    let (_, stored) = check_group(&checker, &g, &acks, &attempted, &mut BTreeMap::new()).await;
    // Requests in flight when the signal came were finished and answered: a message stored
    // without an ack would be one whose reply the shutdown dropped.
    let acked: BTreeSet<(String, String)> = acks.iter().map(|a| (a.user.clone(), a.cmid.clone())).collect();
    let unanswered: Vec<&(String, String)> = stored.difference(&acked).collect();
    assert!(unanswered.is_empty(), "stored but never acknowledged across SIGTERM: {unanswered:?}");
}

/// A storage that never comes back cannot hold a stopping node forever: after the drain and
/// another `timeouts.shutdown_grace` the node gives up, says why, exits 1, and has lost nothing
/// it acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_storage_stuck_for_good_exits_1_and_keeps_everything_acked() {
    let node = Node::start(burst_options().set("chaos.enabled", true));
    let user = unique("stuck");
    let g = unique("stuck");
    {
        let owner = connect(&node, &user, &["driver"]).await;
        open_group(&owner, &g, vec![]).await;
    }
    let record = Record::new(50);
    let client = connect(&node, &user, &["driver"]).await;
    let sender = tokio::spawn(send_until_error(client, g.clone(), user.clone(), "s".into(), 5_000, record.clone()));
    record.wait_reached(Duration::from_secs(30)).await;

    let stalled = admin_post(&node, "/v1/chaos/storage/stall").await;
    assert_eq!(stalled.status, 200, "{stalled:?}");
    let waiting =
        wait_until(Duration::from_secs(10), || async { metric(&node, "convoy_requests_in_flight").await >= 1.0 }).await;
    assert!(waiting, "the sender's request never waited in the node");
    // Node::terminate panics if the process outlives STOP_TIMEOUT: the node must give up by itself.
    let (mut node, status) = tokio::task::spawn_blocking(move || {
        let mut node = node;
        let status = node.terminate();
        (node, status)
    })
    .await
    .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
    assert_eq!(status.code(), Some(1), "SIGTERM with storage stuck: exit status {status}");
    let log = std::fs::read_to_string(node.log_path()).expect("reading the node's log");
    assert!(
        log.contains("storage did not finish its writes within timeouts.shutdown_grace"),
        "the node did not say why it gave up:\n{log}"
    );
    sender.await.expect("sender task");

    node.restart();
    let checker = connect(&node, &user, &["driver"]).await;
    let acks = record.acks.lock().unwrap().clone();
    let attempted = record.attempted.lock().unwrap().clone();
    check_group(&checker, &g, &acks, &attempted, &mut BTreeMap::new()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacked_sends_retried_after_a_crash_are_stored_at_most_once() {
    const ROUNDS: usize = 3;
    const SENDS: usize = 50;
    let mut node = Node::start(burst_options());
    let user = unique("u");
    let g = unique("retry");
    {
        let client = connect(&node, &user, &["driver"]).await;
        open_group(&client, &g, vec![]).await;
    }
    for round in 0..ROUNDS {
        // Pipeline a burst and crash as soon as the first ack is back: the rest may or may not be
        // committed, and the client cannot know which.
        let client = connect(&node, &user, &["driver"]).await;
        let base = client.group_info(&g).await.unwrap().last_seq;
        let cmids: Vec<String> = (0..SENDS).map(|i| format!("r{round}-m{i}")).collect();
        for (i, cmid) in cmids.iter().enumerate() {
            let frame = json!({"id": format!("x{i}"), "op": "msg.send", "group": g, "client_msg_id": cmid,
                               "body": text(cmid)});
            client.send_raw_text(&frame.to_string()).await.unwrap();
        }
        let first = raw_reply(&client, Duration::from_secs(10)).await.expect("a first ack");
        assert_eq!(first["ok"], true, "{first}");
        let first_id = first["re"].as_str().unwrap().trim_start_matches('x').parse::<usize>().unwrap();
        let first_seq = seq_of(&first);
        node.kill9();
        drop(client);
        node.restart();

        // Retry everything with the same client_msg_ids.
        let client = connect(&node, &user, &["driver"]).await;
        let mut retried = BTreeMap::new();
        for cmid in &cmids {
            let sent = client.msg_send(&g, cmid, text(cmid), false).await.expect("retry after restart");
            retried.insert(cmid.clone(), sent);
        }
        let again = &retried[&cmids[first_id]];
        assert_eq!((again.seq, again.duplicate), (first_seq, true), "the acked send moved or was stored again");

        let entries = sync_all(&client, &g, base, 500).await;
        let seqs: Vec<u64> = entries.iter().map(seq_of).collect();
        assert_eq!(
            seqs,
            (base + 1..=base + SENDS as u64).collect::<Vec<_>>(),
            "round {round}: {SENDS} sends, once each"
        );
        for entry in &entries {
            let cmid = entry["client_msg_id"].as_str().unwrap_or_else(|| panic!("unexpected entry {entry}"));
            let sent = retried.get(cmid).unwrap_or_else(|| panic!("unexpected entry {entry}"));
            assert_eq!(sent.seq, seq_of(entry), "the retry of {cmid} answered another seq than where it is stored");
        }
        let committed_before = retried.values().filter(|s| s.duplicate).count();
        assert!(committed_before >= 1, "round {round}: the acked send was not recognized as a duplicate");
    }
}

/// Runs `op` for every item concurrently on one connection and kills the node once `kill_after` of
/// them have succeeded. Returns the items whose op succeeded before the kill.
async fn pipeline_then_kill<F, Fut>(node: &mut Node, items: &[String], kill_after: usize, op: F) -> BTreeSet<String>
where
    F: Fn(String) -> Fut,
    Fut: Future<Output = bool> + Send + 'static,
{
    let record = Record::new(kill_after);
    let mut tasks = Vec::new();
    for item in items {
        let fut = op(item.clone());
        let record = record.clone();
        let item = item.clone();
        tasks.push(tokio::spawn(async move {
            let ok = fut.await;
            if ok && record.ack_count.fetch_add(1, Ordering::SeqCst) + 1 == record.notify_at {
                record.reached.notify_one();
            }
            ok.then_some(item)
        }));
    }
    record.wait_reached(Duration::from_secs(30)).await;
    node.kill9();
    let mut done = BTreeSet::new();
    for task in tasks {
        done.extend(task.await.expect("op task"));
    }
    done
}

/// The groups among `groups` that exist, with whether `user` is a member, as their owner sees them.
async fn memberships(owner: &Client, groups: &[String], user: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let (mut existing, mut member) = (BTreeSet::new(), BTreeSet::new());
    for g in groups {
        match owner.group_info(g).await {
            Ok(info) => {
                existing.insert(g.clone());
                if info.members.iter().any(|m| m.user == user) {
                    member.insert(g.clone());
                }
            }
            Err(e) => assert_eq!(e.code(), "forbidden", "group.info {g}: {e}"),
        }
    }
    (existing, member)
}

async fn inbox_of(client: &Client) -> BTreeSet<String> {
    client.inbox_sync().await.expect("inbox.sync").into_iter().map(|i| i.group).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inboxes_agree_with_memberships_across_kill9() {
    const GROUPS: usize = 40;
    let mut node = Node::start(burst_options().set("limits.max_groups_per_user", GROUPS as i64));
    let (owner, member, second_owner) = (unique("own"), unique("mem"), unique("own2"));
    let groups: Vec<String> = (0..GROUPS).map(|i| unique(&format!("inbox{i}"))).collect();

    // Opens listing the member, interrupted by a crash.
    let oc = connect(&node, &owner, &["dispatcher"]).await;
    let opened = pipeline_then_kill(&mut node, &groups, GROUPS / 2, |g| {
        let oc = oc.clone();
        let member = member.clone();
        async move { oc.group_open(&GroupOpen::chat(g, drivers(&[&member]))).await.is_ok() }
    })
    .await;
    node.restart();
    let oc = connect(&node, &owner, &["dispatcher"]).await;
    let mc = connect(&node, &member, &["driver"]).await;
    let (existing, member_of) = memberships(&oc, &groups, &member).await;
    assert!(opened.is_subset(&existing), "acked opens lost: {:?}", opened.difference(&existing).collect::<Vec<_>>());
    assert_eq!(member_of, existing, "a group was created without its listed member");
    assert_eq!(inbox_of(&mc).await, member_of, "the member's inbox disagrees with the groups after a crash");
    // Retrying every open is idempotent and completes the set.
    for g in &groups {
        let r = oc.group_open(&GroupOpen::chat(g, drivers(&[&member]))).await.expect("retried open");
        assert_eq!(r.created, !existing.contains(g), "{g}: created={} on retry", r.created);
    }
    let all: BTreeSet<String> = groups.iter().cloned().collect();
    assert_eq!(inbox_of(&mc).await, all);

    // Removals, interrupted by a crash.
    let removed = pipeline_then_kill(&mut node, &groups, GROUPS / 2, |g| {
        let oc = oc.clone();
        let member = member.clone();
        async move { oc.request("group.remove", json!({"group": g, "user": member})).await.is_ok() }
    })
    .await;
    node.restart();
    let oc = connect(&node, &owner, &["dispatcher"]).await;
    let mc = connect(&node, &member, &["driver"]).await;
    let (_, member_of) = memberships(&oc, &groups, &member).await;
    assert!(member_of.is_disjoint(&removed), "acked removals undone: {:?}", member_of.intersection(&removed));
    assert_eq!(inbox_of(&mc).await, member_of, "the member's inbox disagrees with the groups after a crash");
    for g in &groups {
        oc.request("group.remove", json!({"group": g, "user": member})).await.expect("retried remove");
    }
    assert!(inbox_of(&mc).await.is_empty());
    let (_, member_of) = memberships(&oc, &groups, &member).await;
    assert!(member_of.is_empty());

    // The member is in no group: it can join as many as the limit allows again.
    let o2 = connect(&node, &second_owner, &["dispatcher"]).await;
    for i in 0..GROUPS {
        let g = unique(&format!("again{i}"));
        o2.group_open(&GroupOpen::chat(&g, drivers(&[&member])))
            .await
            .unwrap_or_else(|e| panic!("group {} of {GROUPS} for a user in no group: {e}", i + 1));
    }
    assert_eq!(inbox_of(&mc).await.len(), GROUPS);
}
