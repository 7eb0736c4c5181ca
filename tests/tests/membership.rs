//! Operators change the cluster under load: a node joins and takes replicas, a node is drained
//! with `convoy cluster drain --wait` and leaves, and requests the cluster cannot honour are
//! refused with a reason. Clients keep sending through all of it; every acknowledged message
//! must be in every replica's log at its acknowledged seq.

use std::collections::BTreeSet;
use std::process::Command;
use std::time::{Duration, Instant};

use convoy_tests::failover_support::*;
use convoy_tests::node::convoy_bin;
use convoy_tests::*;
use serde_json::Value;

/// The names in a JSON array of strings.
fn names(v: &Value) -> BTreeSet<String> {
    v.as_array().map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_string)).collect()).unwrap_or_default()
}

/// Why the placement in `status` is not settled on exactly `members` yet, or `None` when every
/// shard has `replication_factor` voters, all of them `members`, equal to its placement, no
/// learners, and a leader.
fn unsettled(status: &Value, members: &BTreeSet<String>) -> Option<String> {
    let listed: BTreeSet<String> =
        status["members"].as_array()?.iter().filter_map(|m| m["name"].as_str().map(str::to_string)).collect();
    if listed != *members {
        return Some(format!("members are {listed:?}, want {members:?}"));
    }
    let rf = status["replication_factor"].as_u64()? as usize;
    for g in status["groups"].as_array()? {
        let (voters, placed, learners) = (names(&g["voters"]), names(&g["placed"]), names(&g["learners"]));
        let group = g["group"].as_str().unwrap_or("?");
        if group == "meta" {
            // The metadata group is not placed: its voters follow the members.
            if voters != *members {
                return Some(format!("meta: voters {voters:?}"));
            }
            continue;
        }
        if voters.len() != rf || voters != placed || !learners.is_empty() || !voters.is_subset(members) {
            return Some(format!("{group}: voters {voters:?}, placed {placed:?}, learners {learners:?}"));
        }
        if g["leader"].as_str().is_none() {
            return Some(format!("{group} has no leader"));
        }
    }
    None
}

/// Waits until node `via` reports the placement settled on `members`, as this test reads its
/// status document and as the node itself says (`unsettled` empty: leaders spread too).
async fn settle(cluster: &Cluster, via: usize, members: &BTreeSet<String>, timeout: Duration) -> Duration {
    let began = Instant::now();
    let last = std::sync::Mutex::new(String::new());
    let ok = wait_until(timeout, || async {
        match try_status(cluster, via).await {
            Some(status) => match unsettled(&status, members) {
                None => {
                    let reasons = status["unsettled"].as_array().cloned().unwrap_or_default();
                    *last.lock().unwrap() = format!("the node says it is settling: {reasons:?}");
                    status["unsettled"].as_array().is_some_and(Vec::is_empty)
                }
                Some(why) => {
                    *last.lock().unwrap() = why;
                    false
                }
            },
            None => false,
        }
    })
    .await;
    let last = last.into_inner().unwrap();
    assert!(ok, "the placement did not settle on {members:?} within {timeout:?}: {last}");
    began.elapsed()
}

/// Runs `convoy cluster <args>` to completion (at most `timeout`); its exit status and output.
fn convoy_cli(args: &[&str], timeout: Duration) -> (bool, String) {
    let mut child = Command::new(convoy_bin())
        .arg("cluster")
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("running convoy cluster");
    let deadline = Instant::now() + timeout;
    loop {
        if child.try_wait().expect("waiting for convoy cluster").is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().expect("convoy cluster output");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_joins_and_a_drained_node_leaves_while_clients_send() {
    const GROUPS: usize = 4;
    const SENDERS: usize = 6;
    let _serial = serial().await;
    let mut cluster = Cluster::start(3, burst_options());
    let first_three: BTreeSet<String> = cluster.nodes.iter().map(|n| n.id().to_string()).collect();
    settle(&cluster, 0, &first_three, Duration::from_secs(20)).await;
    // What an operator sees: both tables and the verdict.
    let (token, admin) = (admin_token(cluster.node(0)), cluster.node(0).admin_url().to_string());
    let (ok, out) = tokio::task::block_in_place(|| {
        convoy_cli(&["status", "--admin", &admin, "--token", &token], Duration::from_secs(30))
    });
    assert!(ok, "convoy cluster status failed: {out}");
    for expected in ["n1", "n2", "n3", "shard-0", "shard-7", "meta", "shards led", "settled: every shard has a leader"]
    {
        assert!(out.contains(expected), "convoy cluster status shows {expected:?}:\n{out}");
    }
    // The counts are of shards: eight led, eight times three held, and one metadata leader.
    let status = cluster.status(0).await;
    let members = status["members"].as_array().unwrap();
    let sum = |key: &str| members.iter().map(|m| m[key].as_u64().unwrap()).sum::<u64>();
    assert_eq!((sum("leads"), sum("holds")), (8, 24), "{status}");
    assert_eq!(members.iter().filter(|m| m["meta_leader"] == true).count(), 1, "{status}");
    assert!(members.iter().all(|m| m["lag"].is_u64()), "every member is up, so its lag is known: {status}");

    // Draining one of three would leave too few nodes for three replicas: refused, with the reason.
    let refused = admin_post(cluster.node(0), "/v1/cluster/nodes/n3/drain").await;
    assert_eq!(refused.status, 409, "draining below the replication factor: {}", refused.body);
    assert!(refused.body.contains("replication factor"), "the refusal says why: {}", refused.body);
    let unknown = admin_post(cluster.node(0), "/v1/cluster/nodes/n9/drain").await;
    assert_eq!(unknown.status, 404, "draining an unknown node: {}", unknown.body);
    assert!(unknown.body.contains("n1"), "the refusal lists the members: {}", unknown.body);

    let owner = unique("own");
    let groups: Vec<String> = (0..GROUPS).map(|i| unique(&format!("mem{i}"))).collect();
    let users: Vec<String> = (0..SENDERS).map(|i| unique(&format!("s{i}"))).collect();
    for g in &groups {
        let client = connect(cluster.node(0), &owner, &["dispatcher"]).await;
        let members: Vec<&str> = users.iter().map(String::as_str).collect();
        open_group(&client, g, drivers(&members)).await;
    }
    let ledger = Ledger::new();
    let stop = Stop::new();
    let via: Vec<usize> = (0..users.len()).map(|k| k % 3).collect();
    let tasks = start_senders(&cluster, &via, &users, &groups, "mem", &ledger, &stop).await;
    let flowing = wait_until(Duration::from_secs(30), || async { ledger.ack_count() >= 200 }).await;
    assert!(flowing, "only {} acks before the join; errors {:?}", ledger.ack_count(), ledger.errors());

    // n4 joins: the placement moves replicas onto it, and it serves clients.
    let joined_at = Instant::now();
    let n4 = tokio::task::block_in_place(|| cluster.add_node(burst_options()));
    let ready = joined_at.elapsed();
    let all_four: BTreeSet<String> = cluster.nodes.iter().map(|n| n.id().to_string()).collect();
    let settled = settle(&cluster, 0, &all_four, Duration::from_secs(60)).await;
    let status = cluster.status(0).await;
    let n4_holds = status["members"]
        .as_array()
        .and_then(|ms| ms.iter().find(|m| m["name"] == "n4"))
        .and_then(|m| m["holds"].as_u64())
        .unwrap_or(0);
    assert!(n4_holds > 0, "n4 joined but holds no replica: {status}");
    let reader = connect(cluster.node(n4), &owner, &["dispatcher"]).await;
    for g in &groups {
        // Acks before the read must be in it; everything read must have been sent by then.
        let acks = ledger.acks();
        let log = synced_log(&reader, g).await;
        check_log("msg.sync on n4", g, &log, &acks, &ledger.issued());
    }
    let acks_at_join = ledger.ack_count();
    println!(
        "membership: n4 ready {} ms after start, placement settled {} ms later; n4 holds {n4_holds} replicas",
        ready.as_millis(),
        settled.as_millis()
    );

    // n4 is drained with the CLI, under load; it leaves once it holds nothing.
    let flowing = wait_until(Duration::from_secs(30), || async { ledger.ack_count() >= acks_at_join + 200 }).await;
    assert!(flowing, "the senders stalled after the join; errors {:?}", ledger.errors());
    let drain_began = Instant::now();
    let (ok, out) = tokio::task::block_in_place(|| {
        convoy_cli(&["drain", "n4", "--wait", "--admin", &admin, "--token", &token], Duration::from_secs(90))
    });
    assert!(ok, "convoy cluster drain n4 --wait failed: {out}");
    assert!(out.contains("has left the cluster"), "drain --wait says when the node has left: {out}");
    let drained = drain_began.elapsed();
    settle(&cluster, 0, &first_three, Duration::from_secs(30)).await;
    cluster.node_mut(n4).terminate();

    let base = ledger.ack_count();
    let flowing = wait_until(Duration::from_secs(30), || async { ledger.ack_count() >= base + 200 }).await;
    stop.stop();
    let ends = join_senders(tasks).await;
    assert!(flowing, "the senders stalled after the drain; errors {:?}", ledger.errors());
    assert!(ends.iter().all(Option::is_none), "senders ended with errors: {ends:?}");
    let unexpected: Vec<String> = ledger
        .errors_other_than(&["unavailable", "timeout"])
        .iter()
        .map(|a| format!("{} {}: {:?}", a.sender, a.cmid, a.outcome))
        .collect();
    assert!(unexpected.is_empty(), "errors other than unavailable and timeouts: {unexpected:#?}");

    let mut stored = 0;
    for g in &groups {
        let log = converged(&cluster, &[0, 1, 2], g, Duration::from_secs(30)).await;
        stored += check_log("the replicas after the drain", g, &log, &ledger.acks(), &ledger.issued());
    }
    println!(
        "membership: drain of n4 took {} ms; {} acks, {stored} messages stored, errors {:?}",
        drained.as_millis(),
        ledger.ack_count(),
        ledger.errors()
    );
    assert!(stored >= ledger.acks().len(), "{stored} messages stored for {} acks", ledger.acks().len());
}
