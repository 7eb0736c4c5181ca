//! Fault injection through the admin API (`chaos.enabled = true`) in clusters of real node
//! processes: a shard leader cut off from its peers in both directions, a delay on the traffic
//! to a leader, and a follower whose storage stalls or fails. Clients keep sending through all
//! of it; every acknowledged message must end up in every replica at its acknowledged seq.
//!
//! The tests take the process-wide cluster lock ([`serial`]).

use std::time::{Duration, Instant};

use convoy_tests::failover_support::*;
use convoy_tests::*;
use serde_json::Value;

/// Cluster options with fault injection on.
fn chaos_options() -> NodeOptions {
    burst_options().set("chaos.enabled", true)
}

/// Opens chat group `group` through `node` as dispatcher `owner`, with `members` as drivers.
async fn open_on(node: &Node, owner: &str, group: &str, members: &[String]) {
    let client = connect(node, owner, &["dispatcher"]).await;
    let members: Vec<&str> = members.iter().map(String::as_str).collect();
    open_group(&client, group, drivers(&members)).await;
}

/// `POST path` on `node`, asserting a 200 answer; its JSON body.
async fn chaos_post(node: &Node, path: &str) -> Value {
    let reply = admin_post(node, path).await;
    assert_eq!(reply.status, 200, "POST {path} on {}: {reply:?}", node.id());
    serde_json::from_str(&reply.body).unwrap_or_else(|e| panic!("POST {path}: not JSON ({e}): {}", reply.body))
}

/// `GET /v1/chaos` on `node`.
async fn faults_on(node: &Node) -> Value {
    admin_get(node, "/v1/chaos").await.unwrap_or_else(|e| panic!("{}: {e}", node.id()))
}

/// Whether `GET /v1/chaos` reports nothing in force.
fn no_faults(v: &Value) -> bool {
    v["active"] == false
        && v["peers"]["dropped"].as_array().is_some_and(Vec::is_empty)
        && v["peers"]["delayed_ms"].as_object().is_some_and(serde_json::Map::is_empty)
        && v["storage"]["failing"] == false
        && v["storage"]["stalled"] == false
}

/// Waits until the shard leaderships have settled (see [`leaders_settled`]).
async fn settle_leaders(cluster: &Cluster) {
    let settled = wait_until(Duration::from_secs(30), || leaders_settled(cluster, 0)).await;
    assert!(settled, "the shard leaders did not settle: {}", cluster.status(0).await);
}

/// Errors other than the retryable ones, for assertion messages.
fn unexpected_errors(ledger: &Ledger) -> Vec<String> {
    ledger
        .errors_other_than(&["unavailable", "timeout"])
        .iter()
        .map(|a| format!("{} {} (try {}): {:?}", a.sender, a.cmid, a.retry, a.outcome))
        .collect()
}

/// Waits until `ledger` holds `n` more acks than `base`; panics with `what` otherwise.
async fn more_acks(ledger: &Ledger, base: usize, n: usize, timeout: Duration, what: &str) {
    let ok = wait_until(timeout, || async { ledger.ack_count() >= base + n }).await;
    assert!(
        ok,
        "{what}: only {} of {n} more acks within {timeout:?}; errors {:?}",
        ledger.ack_count() - base,
        ledger.errors()
    );
}

/// The median time `client` takes to get `n` sends to `group` acknowledged, one at a time.
async fn median_send(client: &Client, group: &str, prefix: &str, n: usize) -> Duration {
    let mut took = Vec::new();
    for i in 0..n {
        let cmid = format!("{prefix}-{i}");
        let began = Instant::now();
        client.msg_send(group, &cmid, text(&cmid), false).await.unwrap_or_else(|e| panic!("sending {cmid}: {e}"));
        took.push(began.elapsed());
    }
    took.sort();
    took[took.len() / 2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_and_storage_faults_are_refused_unless_enabled() {
    let _serial = serial().await;
    let node = Node::start(NodeOptions::new());
    for path in ["/v1/chaos/peers/n2/drop", "/v1/chaos/peers/n2/delay?ms=100", "/v1/chaos/peers/heal"] {
        let reply = admin_post(&node, path).await;
        assert_eq!(reply.status, 403, "POST {path}: {reply:?}");
        assert!(reply.body.contains("chaos.enabled"), "the refusal of {path} says how to enable it: {reply:?}");
    }
    for path in ["/v1/chaos/storage/fail", "/v1/chaos/storage/stall", "/v1/chaos/storage/heal"] {
        let reply = admin_post(&node, path).await;
        assert_eq!(reply.status, 403, "POST {path}: {reply:?}");
    }
    let listing = admin_get(&node, "/v1/chaos").await.expect_err("GET /v1/chaos is refused");
    assert!(listing.contains("403") && listing.contains("chaos.enabled"), "{listing}");
    let anonymous = http::post(&format!("{}/v1/chaos/peers/n2/drop", node.admin_url())).await.unwrap();
    assert_eq!(anonymous.status, 401, "the admin API needs a token: {anonymous:?}");
    // Nothing was injected: writes go through.
    let client = connect(&node, &unique("u"), &["dispatcher"]).await;
    let g = unique("g");
    open_group(&client, &g, vec![]).await;
    client.msg_send(&g, "m0", text("still fine"), false).await.expect("a send");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_isolated_leader_is_replaced_and_catches_up_after_heal() {
    const SENDERS_PER_NODE: usize = 2;
    let _serial = serial().await;
    let cluster = Cluster::start(3, chaos_options());
    settle_leaders(&cluster).await;
    let g = unique("iso");
    let owner = unique("own");
    let users: Vec<String> = (0..2 * SENDERS_PER_NODE).map(|i| unique(&format!("s{i}"))).collect();
    open_on(cluster.node(0), &owner, &g, &users).await;
    let l = cluster.wait_for_leader(0, "group", &g, None, Duration::from_secs(10)).await.expect("a leader");
    let others: Vec<usize> = (0..3).filter(|&i| i != l).collect();
    let l_name = cluster.node(l).id().to_string();
    let other_names: Vec<String> = others.iter().map(|&i| cluster.node(i).id().to_string()).collect();

    let ledger = Ledger::new();
    let stop = Stop::new();
    let via: Vec<usize> = (0..users.len()).map(|k| others[k % 2]).collect();
    let tasks = start_senders(&cluster, &via, &users, std::slice::from_ref(&g), "iso", &ledger, &stop).await;
    more_acks(&ledger, 0, 50, Duration::from_secs(30), "before the isolation").await;
    let client_of_l = connect_with_timeout(cluster.node(l), &users[0], &["driver"], Duration::from_secs(10)).await;

    // Cut L off: L drops both peers, and each of them drops L.
    let acked_before = ledger.ack_count();
    let isolated_at = Instant::now();
    for (&o, o_name) in others.iter().zip(&other_names) {
        let reply = chaos_post(cluster.node(l), &format!("/v1/chaos/peers/{o_name}/drop")).await;
        assert_eq!(reply["fault"], "drop", "{reply}");
        chaos_post(cluster.node(o), &format!("/v1/chaos/peers/{l_name}/drop")).await;
    }
    let on_l = faults_on(cluster.node(l)).await;
    let mut dropped: Vec<String> =
        on_l["peers"]["dropped"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect();
    dropped.sort();
    assert_eq!(dropped, other_names, "GET /v1/chaos on {l_name}: {on_l}");
    assert_eq!(on_l["active"], true, "{on_l}");

    // The others mark L down, elect a new leader and take writes again.
    let down = time_until_seen(&cluster, &others, &l_name, false, isolated_at, Duration::from_secs(10)).await;
    assert!(down.iter().all(Option::is_some), "the others did not mark {l_name} down: {down:?}");
    let l_sees = wait_until(Duration::from_secs(10), || async {
        let status = cluster.status(l).await;
        other_names.iter().all(|n| member_up(&status, n) == Some(false))
    })
    .await;
    assert!(l_sees, "{l_name} does not see its peers down: {}", cluster.status(l).await);
    let seen_by_l = cluster.status(l).await;
    for n in &other_names {
        let down = format!("{n} is down");
        let listed = seen_by_l["unsettled"].as_array().is_some_and(|u| u.iter().any(|r| r == down.as_str()));
        assert!(listed, "{l_name}'s status lists `{down}` among what is unsettled: {seen_by_l}");
    }

    // A client of L itself is told promptly that L cannot commit, instead of being held until
    // the node's request timeout (5 s): a cut-off leader answers `unavailable` on its own.
    let asked = Instant::now();
    let answer = client_of_l.msg_send(&g, "to-the-cut-off-leader", text("anyone there?"), false).await;
    let took = asked.elapsed();
    match &answer {
        Err(e) if e.code() == "unavailable" => {}
        other => panic!("a send to the cut-off {l_name} answered {other:?}; want unavailable"),
    }
    assert!(
        took < Duration::from_secs(3),
        "the cut-off {l_name} held a send for {} ms before answering unavailable: {answer:?}",
        took.as_millis()
    );
    let new_leader = cluster.wait_for_leader(others[0], "group", &g, Some(l), Duration::from_secs(10)).await;
    assert!(new_leader.is_some_and(|n| n != l), "no new leader for {g} apart from {l_name}");
    more_acks(&ledger, acked_before, 100, Duration::from_secs(30), "while the leader is isolated").await;
    let resumed = ledger.first_ack_issued_after(isolated_at, &[]).expect("acks of sends issued after the isolation");

    // Heal everywhere: L on all peers at once, the others L by name.
    let healed = chaos_post(cluster.node(l), "/v1/chaos/peers/heal").await;
    assert_eq!(healed["healed"].as_object().map(|h| h.len()), Some(2), "{healed}");
    for &o in &others {
        let reply = chaos_post(cluster.node(o), &format!("/v1/chaos/peers/{l_name}/heal")).await;
        assert_eq!(reply["healed"]["dropped"], true, "{reply}");
    }
    let healed_at = Instant::now();
    for i in 0..3 {
        let v = faults_on(cluster.node(i)).await;
        assert!(no_faults(&v), "faults left on {} after healing: {v}", cluster.node(i).id());
    }
    let up = time_until_seen(&cluster, &others, &l_name, true, healed_at, Duration::from_secs(20)).await;
    assert!(up.iter().all(Option::is_some), "the others do not see {l_name} up again: {up:?}");
    let whole = wait_until(Duration::from_secs(20), || healthy(&cluster, &[0, 1, 2], &g)).await;
    assert!(whole, "the cluster is not healthy after the heal: {}", cluster.status(l).await);
    let base = ledger.ack_count();
    more_acks(&ledger, base, 50, Duration::from_secs(20), "after the heal").await;
    stop.stop();
    let ends = join_senders(tasks).await;
    assert!(ends.iter().all(Option::is_none), "senders ended with errors: {ends:?}");
    let unexpected = unexpected_errors(&ledger);
    assert!(unexpected.is_empty(), "errors other than unavailable and timeouts: {unexpected:#?}");

    let log = converged(&cluster, &[0, 1, 2], &g, Duration::from_secs(30)).await;
    let stored = check_log("the replicas after the heal", &g, &log, &ledger.acks(), &ledger.issued());
    assert!(stored >= ledger.acks().len(), "{stored} messages stored for {} acks", ledger.acks().len());
    let injected = metric(cluster.node(l), "convoy_chaos_faults_injected_total").await;
    assert!(injected >= 3.0, "{l_name} counted {injected} fault changes (2 drops, 1 heal)");
    println!(
        "an_isolated_leader: {l_name} isolated; seen down after {:?} ms; writes back {} ms after the isolation; \
         seen up {:?} ms after the heal; {} acks, {stored} stored, errors {:?}",
        down.iter().map(|d| d.map(|d| d.as_millis())).collect::<Vec<_>>(),
        resumed.as_millis(),
        up.iter().map(|d| d.map(|d| d.as_millis())).collect::<Vec<_>>(),
        ledger.ack_count(),
        ledger.errors()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delay_towards_the_leader_slows_forwarded_sends() {
    const DELAY_MS: u64 = 200;
    const SAMPLES: usize = 7;
    let _serial = serial().await;
    let cluster = Cluster::start(3, chaos_options());
    // The leader must stay where it is while the latencies are measured.
    settle_leaders(&cluster).await;
    let g = unique("delay");
    let (owner, user) = (unique("own"), unique("drv"));
    open_on(cluster.node(0), &owner, &g, std::slice::from_ref(&user)).await;
    // The controller may still move a shard leader after the spread looked settled; a
    // measurement taken while the leader moved says nothing, so it is taken again.
    let mut attempt = 0;
    let (f, f_name) = loop {
        attempt += 1;
        let l = cluster.wait_for_leader(0, "group", &g, None, Duration::from_secs(10)).await.expect("a leader");
        let f = (l + 1) % 3;
        let (l_name, f_name) = (cluster.node(l).id().to_string(), cluster.node(f).id().to_string());
        let knows =
            wait_until(Duration::from_secs(10), || async { cluster.leader_of(f, "group", &g).await == Some(l) }).await;
        assert!(knows, "{f_name} does not know {l_name} leads the shard of {g}");
        let client = connect(cluster.node(f), &user, &["driver"]).await;
        median_send(&client, &g, &format!("{attempt}-warmup"), 3).await;
        let before = median_send(&client, &g, &format!("{attempt}-before"), SAMPLES).await;

        // Requests the API refuses, with the reason.
        for (path, status, says) in [
            (format!("/v1/chaos/peers/{l_name}/delay"), 400, "ms="),
            (format!("/v1/chaos/peers/{l_name}/delay?ms=0"), 400, "out of range"),
            (format!("/v1/chaos/peers/{l_name}/delay?ms=10001"), 400, "out of range"),
            (format!("/v1/chaos/peers/{l_name}/delay?ms=soon"), 400, "not a whole number"),
            (format!("/v1/chaos/peers/{l_name}/explode"), 404, "drop, delay or heal"),
            (format!("/v1/chaos/peers/{f_name}/drop"), 400, "is this node"),
            ("/v1/chaos/peers/nobody/drop".to_string(), 404, "members: n1, n2, n3"),
            ("/v1/chaos/storage/melt".to_string(), 404, "fail, stall or heal"),
        ] {
            let reply = admin_post(cluster.node(f), &path).await;
            assert_eq!(reply.status, status, "POST {path}: {reply:?}");
            assert!(reply.body.contains(says), "POST {path} should say {says:?}: {reply:?}");
            assert!(serde_json::from_str::<Value>(&reply.body).is_ok(), "POST {path}: the refusal is JSON: {reply:?}");
        }
        assert!(no_faults(&faults_on(cluster.node(f)).await), "a refused request changed nothing");

        // Every request F forwards to the leader now waits 200 ms on its way.
        let reply = chaos_post(cluster.node(f), &format!("/v1/chaos/peers/{l_name}/delay?ms={DELAY_MS}")).await;
        assert_eq!(reply["delay_ms"], DELAY_MS, "{reply}");
        let v = faults_on(cluster.node(f)).await;
        assert_eq!(v["peers"]["delayed_ms"][&l_name], DELAY_MS, "GET /v1/chaos on {f_name}: {v}");
        assert_eq!(v["active"], true, "{v}");
        let delayed = median_send(&client, &g, &format!("{attempt}-delayed"), SAMPLES).await;

        chaos_post(cluster.node(f), &format!("/v1/chaos/peers/{l_name}/heal")).await;
        let v = faults_on(cluster.node(f)).await;
        assert!(no_faults(&v), "GET /v1/chaos on {f_name} after the heal: {v}");
        let after = median_send(&client, &g, &format!("{attempt}-after"), SAMPLES).await;
        println!(
            "a_delay_towards_the_leader: median send through {f_name} (leader {l_name}): {} ms before, {} ms with a \
             {DELAY_MS} ms delay, {} ms after the heal",
            before.as_millis(),
            delayed.as_millis(),
            after.as_millis()
        );
        let stayed =
            cluster.leader_of(f, "group", &g).await == Some(l) && cluster.leader_of(l, "group", &g).await == Some(l);
        if !stayed {
            assert!(attempt < 3, "the leader of {g} moved during each of {attempt} measurements");
            println!("the leader of {g} moved away from {l_name} during the measurement; measuring again");
            settle_leaders(&cluster).await;
            continue;
        }
        assert!(
            delayed >= before + Duration::from_millis(150),
            "a {DELAY_MS} ms delay took the median send from {before:?} only to {delayed:?}"
        );
        assert!(
            after + Duration::from_millis(100) <= delayed,
            "after the heal the median send still takes {after:?} (with the delay {delayed:?})"
        );
        break (f, f_name);
    };
    let injected = metric(cluster.node(f), "convoy_chaos_faults_injected_total").await;
    assert!(injected >= 2.0, "{f_name} counted {injected} fault changes (a delay, a heal)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_whose_storage_stalls_or_fails_rejoins() {
    let _serial = serial().await;
    let mut cluster = Cluster::start(3, chaos_options());
    // F must stay a follower of the group's shard: no leadership moves onto it later.
    settle_leaders(&cluster).await;
    let g = unique("disk");
    let owner = unique("own");
    let users: Vec<String> = (0..4).map(|i| unique(&format!("s{i}"))).collect();
    open_on(cluster.node(0), &owner, &g, &users).await;
    let l = cluster.wait_for_leader(0, "group", &g, None, Duration::from_secs(10)).await.expect("a leader");
    let f = (l + 1) % 3;
    let o = (l + 2) % 3;
    let f_name = cluster.node(f).id().to_string();
    let shard = shard_of_group(cluster.node(0), &g).await;
    let ledger = Ledger::new();
    // Senders go through the leader and the other follower: F only replicates.
    let via = [l, o];

    // 1. Storage stalls on F: the leader and O still make a majority.
    let stop = Stop::new();
    let tasks = start_senders(&cluster, &via, &users[..2], std::slice::from_ref(&g), "stall", &ledger, &stop).await;
    more_acks(&ledger, 0, 30, Duration::from_secs(30), "before the stall").await;
    let reply = chaos_post(cluster.node(f), "/v1/chaos/storage/stall").await;
    assert_eq!(reply["in_force"]["storage"]["stalled"], true, "{reply}");
    let stalled_at = Instant::now();
    let base = ledger.ack_count();
    more_acks(&ledger, base, 100, Duration::from_secs(30), "while F's storage stalls").await;
    assert!(ledger.first_ack_issued_after(stalled_at, &[]).is_some(), "sends issued after the stall were acked");
    let on_f = cluster.replica_entries(f, "group", &g).await.expect("F's replica");
    let on_l = cluster.replica_entries(l, "group", &g).await.expect("the leader's replica");
    assert!(
        on_f.len() < on_l.len(),
        "{f_name} applied {} entries while stalled, the leader {}",
        on_f.len(),
        on_l.len()
    );
    let reply = chaos_post(cluster.node(f), "/v1/chaos/storage/heal").await;
    assert_eq!(reply["healed"]["stalled"], true, "{reply}");
    assert!(no_faults(&reply["in_force"]), "{reply}");
    stop.stop();
    let ends = join_senders(tasks).await;
    assert!(ends.iter().all(Option::is_none), "senders ended with errors: {ends:?}");
    let healed_at = Instant::now();
    let log = converged(&cluster, &[0, 1, 2], &g, Duration::from_secs(30)).await;
    check_log("the replicas after the stall", &g, &log, &ledger.acks(), &ledger.issued());
    println!(
        "a_follower_whose_storage_stalls: {f_name} was {} entries behind; caught up {} ms after the heal",
        on_l.len() - on_f.len(),
        healed_at.elapsed().as_millis()
    );

    // 2. Storage fails on F: writes still commit; F's groups that hit a failed write stop.
    let f_pid = cluster.node(f).pid();
    let stop = Stop::new();
    let tasks = start_senders(&cluster, &via, &users[2..], std::slice::from_ref(&g), "fail", &ledger, &stop).await;
    let base = ledger.ack_count();
    more_acks(&ledger, base, 30, Duration::from_secs(30), "before the failure").await;
    let reply = chaos_post(cluster.node(f), "/v1/chaos/storage/fail").await;
    assert_eq!(reply["in_force"]["storage"]["failing"], true, "{reply}");
    let failed_at = Instant::now();
    let base = ledger.ack_count();
    more_acks(&ledger, base, 100, Duration::from_secs(30), "while F's storage fails").await;
    assert!(ledger.first_ack_issued_after(failed_at, &[]).is_some(), "sends issued after the failure were acked");
    let stopped = wait_until(Duration::from_secs(10), || async {
        let v = faults_on(cluster.node(f)).await;
        v["storage"]["stopped_groups"].as_array().is_some_and(|s| s.iter().any(|g| g == shard.as_str()))
    })
    .await;
    assert!(stopped, "{f_name} does not report {shard} stopped: {}", faults_on(cluster.node(f)).await);
    let log_text = std::fs::read_to_string(cluster.node(f).log_path()).unwrap_or_default();
    assert!(log_text.contains("injected storage failure"), "{f_name}'s log does not mention the failed writes");
    let v = faults_on(cluster.node(f)).await;
    assert_eq!(v["storage"]["restart_needed"], false, "only a shard stopped, not the metadata group: {v}");
    let reply = chaos_post(cluster.node(f), "/v1/chaos/storage/heal").await;
    assert_eq!(reply["healed"]["failing"], true, "{reply}");
    let healed_at = Instant::now();

    // The stopped shard starts again by itself (no restart of the node) and catches up while
    // the senders go on.
    let running = wait_until(Duration::from_secs(40), || async {
        let v = faults_on(cluster.node(f)).await;
        v["storage"]["stopped_groups"].as_array().is_some_and(Vec::is_empty)
    })
    .await;
    assert!(running, "{shard} on {f_name} did not start again after the heal: {}", faults_on(cluster.node(f)).await);
    let base = ledger.ack_count();
    more_acks(&ledger, base, 30, Duration::from_secs(30), "after the heal").await;
    stop.stop();
    let ends = join_senders(tasks).await;
    assert!(ends.iter().all(Option::is_none), "senders ended with errors: {ends:?}");
    let unexpected = unexpected_errors(&ledger);
    assert!(unexpected.is_empty(), "errors other than unavailable and timeouts: {unexpected:#?}");
    let log = converged(&cluster, &[0, 1, 2], &g, Duration::from_secs(30)).await;
    let caught_up = healed_at.elapsed();
    let stored = check_log("the replicas after the heal", &g, &log, &ledger.acks(), &ledger.issued());
    assert!(stored >= ledger.acks().len(), "{stored} messages stored for {} acks", ledger.acks().len());
    assert!(cluster.node_mut(f).is_running() && cluster.node(f).pid() == f_pid, "{f_name} was restarted");
    let restarts = metric(cluster.node(f), "convoy_raft_group_restarts_total").await;
    assert!(restarts >= 1.0, "{f_name} counts no shard restart");
    let log_text = std::fs::read_to_string(cluster.node(f).log_path()).unwrap_or_default();
    assert!(log_text.contains("starting it again from what it stored"), "{f_name}'s log does not name the restart");
    let v = faults_on(cluster.node(f)).await;
    assert!(no_faults(&v), "faults in force after the heal: {v}");
    println!(
        "a_follower_whose_storage_fails: {f_name}'s {shard} started again {restarts} times; back in sync {} ms after \
         the heal; {} acks, {stored} stored, errors {:?}",
        caught_up.as_millis(),
        ledger.ack_count(),
        ledger.errors()
    );
}

/// A presence update that does not reach a peer, the session to it staying up (here: traffic
/// with it dropped for the moment of a hello), is repaired by itself: pushes from that peer
/// reach the user within seconds, without a reconnect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_presence_update_lost_between_nodes_is_repaired_without_a_reconnect() {
    let _serial = serial().await;
    let cluster = Cluster::start(3, chaos_options());
    settle_leaders(&cluster).await;
    let g = unique("pres");
    let (owner, reader) = (unique("own"), unique("rd"));
    open_on(cluster.node(0), &owner, &g, std::slice::from_ref(&reader)).await;
    let l = cluster.wait_for_leader(0, "group", &g, None, Duration::from_secs(10)).await.expect("a leader");
    let a = (l + 1) % 3;
    let (l_name, a_name) = (cluster.node(l).id().to_string(), cluster.node(a).id().to_string());

    // The reader says hello to A while A drops its traffic with L: L misses that the reader
    // is connected there.
    chaos_post(cluster.node(a), &format!("/v1/chaos/peers/{l_name}/drop")).await;
    let reading = connect(cluster.node(a), &reader, &["driver"]).await;
    chaos_post(cluster.node(a), "/v1/chaos/peers/heal").await;
    let mut events = reading.events().expect("the first call");
    let healed_at = Instant::now();

    // The owner sends through L, the group's leader, until a push reaches the reader on A.
    let sending = connect(cluster.node(l), &owner, &["dispatcher"]).await;
    let mut sent = 0;
    let pushed = loop {
        assert!(
            healed_at.elapsed() < Duration::from_secs(15),
            "{sent} messages sent through {l_name} in 15 s after the heal, none pushed to the reader on {a_name}"
        );
        sent += 1;
        let cmid = format!("m-{sent}");
        until_available("a send through the leader", || sending.msg_send(&g, &cmid, text("anyone there?"), false))
            .await;
        let got = tokio::time::timeout(Duration::from_millis(250), async {
            while let Some(event) = events.recv().await {
                if event["ev"] == "msg" && event["group"] == g.as_str() {
                    return Some(event);
                }
            }
            None
        })
        .await;
        if let Ok(Some(event)) = got {
            break event;
        }
    };
    let status = cluster.status(a).await;
    assert_eq!(member_up(&status, &l_name), Some(true), "{a_name} still sees {l_name} up: {status}");
    println!(
        "a_presence_update_lost: the reader on {a_name} got seq {} from {l_name} {} ms after the heal ({sent} sends)",
        pushed["seq"],
        healed_at.elapsed().as_millis()
    );
}
