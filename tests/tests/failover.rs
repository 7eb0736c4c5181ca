//! Failover in a three-node cluster: a shard leader killed (-9) or paused (SIGSTOP) while clients
//! on the other nodes keep sending, a node catching up by snapshot, the whole cluster killed at
//! once, and the failure detector noticing a silent peer.
//!
//! Every test checks the log against everything its clients were told: each acknowledged send at
//! the seq of its ack, exactly once, seqs without gaps, nothing no client sent, and every replica
//! holding the same entries. The measured figures (write unavailability after a leader dies,
//! detection of a silent peer) are printed for the benchmark docs.
//!
//! The tests take a process-wide lock ([`serial`]) so that only one cluster runs at a time.

use std::time::{Duration, Instant};

use convoy_tests::failover_support::*;
use convoy_tests::*;
use serde_json::Value;

/// The longest a group may be unable to take writes after its shard leader dies or stops.
const FAILOVER_LIMIT: Duration = Duration::from_secs(2);

/// Opens chat group `group` through `node` as dispatcher `owner`, with `members` as drivers.
async fn open_on(node: &Node, owner: &str, group: &str, members: &[String]) {
    let client = connect(node, owner, &["dispatcher"]).await;
    let members: Vec<&str> = members.iter().map(String::as_str).collect();
    open_group(&client, group, drivers(&members)).await;
}

/// Runs a blocking node operation (start, restart) without stalling this runtime's other tasks.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// Checks the log of `group` as clients connected to each of `nodes` read it with `msg.sync`
/// against the ledger, and that they all read the same log, equal to `replica` (the replicas' log).
async fn check_synced(
    cluster: &Cluster,
    nodes: &[usize],
    owner: &str,
    group: &str,
    ledger: &Ledger,
    replica: &[Value],
) {
    let (acks, issued) = (ledger.acks(), ledger.issued());
    for &i in nodes {
        let reader = connect(cluster.node(i), owner, &["dispatcher"]).await;
        let log = synced_log(&reader, group).await;
        check_log(&format!("msg.sync on {}", cluster.node(i).id()), group, &log, &acks, &issued);
        assert!(
            log == replica,
            "msg.sync on {} returned {} entries, the replicas hold {}; first difference at index {:?}",
            cluster.node(i).id(),
            log.len(),
            replica.len(),
            log.iter().zip(replica).position(|(a, b)| a != b)
        );
    }
}

/// Errors other than the retryable ones, for assertion messages.
fn unexpected_errors(ledger: &Ledger, allowed: &[&str]) -> Vec<String> {
    ledger
        .errors_other_than(allowed)
        .iter()
        .map(|a| format!("{} {} (try {}): {:?}", a.sender, a.cmid, a.retry, a.outcome))
        .collect()
}

/// Which node processes are running, and how the others ended: for failure messages.
fn processes(cluster: &mut Cluster) -> String {
    let mut out = Vec::new();
    for node in cluster.nodes.iter_mut() {
        if node.is_running() {
            out.push(format!("{} running", node.id()));
        } else {
            let status = node.terminate();
            out.push(format!("{} exited: {status}", node.id()));
        }
    }
    out.join(", ")
}

/// A request sent once is never answered `duplicate: true`, not even when the cluster retried
/// it after a leader failed with the entry already replicated: every attempt carries the
/// request's origin, and the entry's idempotency record names it (see docs/protocol.md,
/// `msg.send`). Such an answer is a retry taken for the client's, a real double store, or a
/// lying dedupe table.
fn assert_no_first_try_duplicates(ledger: &Ledger, event: &str, disruptions: &[Instant]) {
    let first = disruptions.first().copied().expect("at least one disruption");
    let offset = |t: Instant| match t.checked_duration_since(first) {
        Some(d) => format!("+{} ms", d.as_millis()),
        None => format!("-{} ms", (first - t).as_millis()),
    };
    let all: Vec<String> = ledger
        .duplicates_on_first_try()
        .iter()
        .map(|a| {
            format!(
                "{} {}: issued {} and answered {} from {event}: {:?}",
                a.sender,
                a.cmid,
                offset(a.issued),
                offset(a.answered),
                a.outcome
            )
        })
        .collect();
    assert!(all.is_empty(), "sends issued once were answered as duplicates: {all:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_group_leader_mid_burst_loses_nothing() {
    const SENDERS_PER_NODE: usize = 3;
    const ACKS_BEFORE_KILL: usize = 150;
    const ACKS_AFTER_KILL: usize = 200;
    let _serial = serial().await;
    let mut cluster = Cluster::start(3, burst_options());
    let g = unique("kill");
    let owner = unique("own");
    let users: Vec<String> = (0..2 * SENDERS_PER_NODE).map(|i| unique(&format!("s{i}"))).collect();
    open_on(cluster.node(0), &owner, &g, &users).await;
    let leader = settled_leader(&cluster, 0, &g).await;
    let survivors: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
    let leader_name = cluster.node(leader).id().to_string();

    let ledger = Ledger::new();
    let stop = Stop::new();
    let via: Vec<usize> = (0..users.len()).map(|k| survivors[k % 2]).collect();
    let tasks = start_senders(&cluster, &via, &users, std::slice::from_ref(&g), "kill", &ledger, &stop).await;
    let started = wait_until(Duration::from_secs(30), || async { ledger.ack_count() >= ACKS_BEFORE_KILL }).await;
    assert!(started, "only {} acks before the kill; errors {:?}", ledger.ack_count(), ledger.errors());

    let acked_before = ledger.ack_count();
    assert_still_leads(&cluster, survivors[0], &g, leader).await;
    let killed_at = Instant::now();
    cluster.node_mut(leader).kill9();
    let resumed =
        wait_until(Duration::from_secs(60), || async { ledger.ack_count() >= acked_before + ACKS_AFTER_KILL }).await;
    stop.stop();
    let ends = join_senders(tasks).await;
    assert!(
        resumed,
        "only {} acks in the minute after {leader_name} was killed; errors {:?}",
        ledger.ack_count() - acked_before,
        ledger.errors()
    );
    assert!(ends.iter().all(Option::is_none), "senders on surviving nodes ended with errors: {ends:?}");
    let unexpected = unexpected_errors(&ledger, &["unavailable", "timeout"]);
    assert!(unexpected.is_empty(), "errors other than unavailable and timeouts: {unexpected:#?}");
    let window = ledger.first_ack_issued_after(killed_at, &[]).expect("acks of sends issued after the kill");

    // The survivors' replicas agree, and clients on both read that log, holding every ack.
    let log = converged(&cluster, &survivors, &g, Duration::from_secs(10)).await;
    check_log("the surviving replicas", &g, &log, &ledger.acks(), &ledger.issued());
    check_synced(&cluster, &survivors, &owner, &g, &ledger, &log).await;
    let acks = ledger.acks().len();
    println!(
        "killing_a_group_leader_mid_burst: {} senders; {acked_before} acks before killing leader {leader_name}, \
         {acks} in all; {} entries; errors {:?}; write unavailability {} ms",
        users.len(),
        log.len(),
        ledger.errors(),
        window.as_millis()
    );

    // The killed node comes back and catches up with the others.
    let restart_began = Instant::now();
    blocking(|| cluster.node_mut(leader).restart());
    let ready = restart_began.elapsed();
    let caught_up = converged(&cluster, &[0, 1, 2], &g, Duration::from_secs(30)).await;
    assert_eq!(caught_up, log, "the restarted node's replica differs from the survivors'");
    println!(
        "killing_a_group_leader_mid_burst: {leader_name} ready {} ms after restart, caught up {} ms after restart",
        ready.as_millis(),
        restart_began.elapsed().as_millis()
    );

    assert!(
        window < FAILOVER_LIMIT,
        "the first send issued after the kill was acked {} ms after it (limit {} ms)",
        window.as_millis(),
        FAILOVER_LIMIT.as_millis()
    );
    assert_no_first_try_duplicates(&ledger, "the kill", &[killed_at]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_time_over_twenty_kills() {
    const ROUNDS: usize = 20;
    const ACKS_PER_ROUND: usize = 20;
    let _serial = serial().await;
    let mut cluster = Cluster::start(3, burst_options());
    let g = unique("twenty");
    let (owner, user) = (unique("own"), unique("drv"));
    open_on(cluster.node(0), &owner, &g, std::slice::from_ref(&user)).await;

    let ledger = Ledger::new();
    // The running sender: the node it sends through, its stop flag, its task, its connection.
    let mut running: Option<(usize, Stop, tokio::task::JoinHandle<Option<ClientError>>, Client)> = None;
    let mut times = Vec::new();
    let mut kills = Vec::new();
    let test_began = Instant::now();
    // A restarted node can start an election of its own now and then, so a leader picked at a
    // round's start may have lost the shard by the time of the kill: the round starts over.
    let (mut round, mut repicks) = (0, 0);
    while round < ROUNDS {
        let leader = settled_leader(&cluster, 0, &g).await;
        // The sender must go through a node that survives this round.
        if running.as_ref().is_none_or(|(via, ..)| *via == leader) {
            if let Some((_, stop, task, _)) = running.take() {
                stop.stop();
                let end = join_senders(vec![task]).await;
                assert_eq!(end, vec![None], "round {round}: the sender ended with an error");
            }
            let via = (leader + 1) % 3;
            let client = connect_with_timeout(cluster.node(via), &user, &["driver"], SEND_TIMEOUT).await;
            let name = format!("r{round}-{}", cluster.node(via).id());
            let stop = Stop::new();
            let sender = Sender {
                name: name.clone(),
                client: client.clone(),
                group: g.clone(),
                user: user.clone(),
                prefix: name,
            };
            let task = spawn_sender(sender, &ledger, &stop);
            running = Some((via, stop, task, client));
        }
        let (via, _, _, client) = running.as_ref().expect("a running sender");
        let base = ledger.ack_count();
        let flowing =
            wait_until(Duration::from_secs(10), || async { ledger.ack_count() >= base + ACKS_PER_ROUND }).await;
        if !flowing {
            let (_, _, task, _) = running.as_ref().expect("a running sender");
            panic!(
                "round {round}: the sender through {} is not getting acks ({}); its last answers, in ms since the \
                 test began:\n{}",
                cluster.node(*via).id(),
                if task.is_finished() { "it has ended" } else { "it is still sending" },
                ledger.last_answers(10, test_began).join("\n")
            );
        }

        if !still_leads(&cluster, *via, &g, leader).await {
            repicks += 1;
            assert!(repicks <= ROUNDS, "the shard's leadership kept moving before the kills");
            println!("failover_time_over_twenty_kills: round {round}: the leader moved before the kill; picking again");
            continue;
        }
        let killed_at = Instant::now();
        kills.push(killed_at);
        cluster.node_mut(leader).kill9();
        // A fresh message, issued right after the kill on the sender's connection.
        let probe = Sender {
            name: format!("probe{round}"),
            client: client.clone(),
            group: g.clone(),
            user: user.clone(),
            prefix: format!("probe{round}"),
        };
        let probe = tokio::spawn(run_sender(probe, ledger.clone(), Stop::new(), 1));
        let acked =
            wait_until(Duration::from_secs(15), || async { ledger.first_ack_issued_after(killed_at, &[]).is_some() })
                .await;
        if !acked {
            let (killed, through) = (cluster.node(leader).id().to_string(), cluster.node(*via).id().to_string());
            panic!(
                "round {round}: after killing {}, no send issued through {} was acked within 15 s; errors {:?}; \
                 processes: {}",
                killed,
                through,
                ledger.errors(),
                processes(&mut cluster)
            );
        }
        let took = ledger.first_ack_issued_after(killed_at, &[]).expect("checked");
        let probed = wait_until(Duration::from_secs(15), || async { probe.is_finished() }).await;
        assert!(probed, "round {round}: the probe send was not acked within 15 s of the kill");
        assert_eq!(join_senders(vec![probe]).await, vec![None], "round {round}: the probe failed");
        println!(
            "failover_time_over_twenty_kills: round {round}: killed leader {}, a new send was acked after {} ms",
            cluster.node(leader).id(),
            took.as_millis()
        );
        times.push(took);

        blocking(|| cluster.node_mut(leader).restart());
        let ok = wait_until(Duration::from_secs(30), || healthy(&cluster, &[0, 1, 2], &g)).await;
        assert!(
            ok,
            "round {round}: after restarting {} the cluster is not healthy: {}",
            cluster.node(leader).id(),
            cluster.status(0).await
        );
        round += 1;
    }
    let (_, stop, task, _) = running.take().expect("a running sender");
    stop.stop();
    assert_eq!(join_senders(vec![task]).await, vec![None], "the sender ended with an error");

    let (sorted, median, max) = spread(&times);
    println!(
        "failover_time_over_twenty_kills: {ROUNDS} leader kills in {} s; failover ms sorted {sorted:?}; \
         median {median} ms, max (p99) {max} ms; {} acks, errors {:?}",
        test_began.elapsed().as_secs(),
        ledger.ack_count(),
        ledger.errors()
    );
    let unexpected = unexpected_errors(&ledger, &["unavailable", "timeout"]);
    assert!(unexpected.is_empty(), "errors other than unavailable and timeouts: {unexpected:#?}");

    let log = converged(&cluster, &[0, 1, 2], &g, Duration::from_secs(30)).await;
    let stored = check_log("the replicas", &g, &log, &ledger.acks(), &ledger.issued());
    check_synced(&cluster, &[0, 1, 2], &owner, &g, &ledger, &log).await;
    assert!(stored >= ledger.acks().len(), "{stored} messages stored for {} acks", ledger.acks().len());

    let slow: Vec<(usize, u128)> =
        times.iter().enumerate().filter(|(_, t)| **t >= FAILOVER_LIMIT).map(|(r, t)| (r, t.as_millis())).collect();
    assert!(
        slow.is_empty(),
        "rounds whose failover took {} ms or more (round, ms): {slow:?}",
        FAILOVER_LIMIT.as_millis()
    );
    assert_no_first_try_duplicates(&ledger, "the kills", &kills);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_leader_cannot_commit_and_replicas_agree_after() {
    const PAUSE: Duration = Duration::from_secs(5);
    const FAILURE_TIMEOUT: Duration = Duration::from_secs(1);
    const DETECTION_MARGIN: Duration = Duration::from_secs(1);
    let _serial = serial().await;
    let cluster = Cluster::start(3, burst_options().set("cluster.failure_timeout", "1s"));
    let g = unique("pause");
    let (owner, on_leader, on_other) = (unique("own"), unique("drvl"), unique("drvo"));
    open_on(cluster.node(0), &owner, &g, &[on_leader.clone(), on_other.clone()]).await;
    let l = settled_leader(&cluster, 0, &g).await;
    let others: Vec<usize> = (0..3).filter(|&i| i != l).collect();
    let o = others[0];
    let l_name = cluster.node(l).id().to_string();
    let pid = cluster.node(l).pid();

    // The sender on L waits long for its replies: its request during the pause must not be given up.
    let ledger = Ledger::new();
    let stop = Stop::new();
    let (name_l, name_o) = (format!("on-{l_name}"), format!("on-{}", cluster.node(o).id()));
    let client_l = connect_with_timeout(cluster.node(l), &on_leader, &["driver"], Duration::from_secs(30)).await;
    let client_o = connect_with_timeout(cluster.node(o), &on_other, &["driver"], SEND_TIMEOUT).await;
    let tasks = vec![
        spawn_sender(
            Sender {
                name: name_l.clone(),
                client: client_l,
                group: g.clone(),
                user: on_leader.clone(),
                prefix: name_l.clone(),
            },
            &ledger,
            &stop,
        ),
        spawn_sender(
            Sender {
                name: name_o.clone(),
                client: client_o,
                group: g.clone(),
                user: on_other.clone(),
                prefix: name_o.clone(),
            },
            &ledger,
            &stop,
        ),
    ];
    let flowing = wait_until(Duration::from_secs(30), || async {
        ledger.acks_of(&name_l) >= 50 && ledger.acks_of(&name_o) >= 50
    })
    .await;
    assert!(
        flowing,
        "senders not getting acks: {} on L, {} on the other node",
        ledger.acks_of(&name_l),
        ledger.acks_of(&name_o)
    );

    assert_still_leads(&cluster, o, &g, l).await;
    cluster.node(l).pause();
    let paused_at = Instant::now();
    // The other nodes notice the silence; writes resume through a new leader.
    let detected = time_until_seen(
        &cluster,
        &others,
        &l_name,
        false,
        paused_at,
        FAILURE_TIMEOUT + DETECTION_MARGIN + Duration::from_secs(3),
    )
    .await;
    let resumed =
        wait_until(Duration::from_secs(4), || async { ledger.first_ack_issued_after(paused_at, &[&name_o]).is_some() })
            .await;
    let writes_back = ledger.first_ack_issued_after(paused_at, &[&name_o]);
    let new_leader = cluster.wait_for_leader(o, "group", &g, Some(l), Duration::from_secs(3)).await;
    tokio::time::sleep_until((paused_at + PAUSE).into()).await;
    // Nothing L's own client sent during the pause can have been answered.
    let outstanding = ledger.outstanding(&name_l);
    let answered_late: Vec<Attempt> = ledger
        .attempts()
        .into_iter()
        .filter(|a| a.sender == name_l && a.answered > paused_at + Duration::from_millis(200))
        .collect();
    cluster.node(l).resume();
    let resumed_at = Instant::now();

    println!(
        "a_paused_leader: {l_name} paused for {} s; seen down by {:?} after {:?}; a send through {} issued after \
         the pause was acked after {:?} ms; new leader {:?}",
        PAUSE.as_secs(),
        others.iter().map(|&i| cluster.node(i).id()).collect::<Vec<_>>(),
        detected.iter().map(|d| d.map(|d| d.as_millis())).collect::<Vec<_>>(),
        cluster.node(o).id(),
        writes_back.map(|d| d.as_millis()),
        new_leader.map(|i| cluster.node(i).id().to_string())
    );
    assert!(
        answered_late.is_empty(),
        "the client of the paused leader got answers during the pause: {answered_late:#?}"
    );
    let outstanding = outstanding.expect("the sender on the paused leader has a request outstanding during the pause");
    for (d, &i) in detected.iter().zip(&others) {
        let d = d.unwrap_or_else(|| panic!("{} never reported {l_name} down during the pause", cluster.node(i).id()));
        assert!(
            d <= FAILURE_TIMEOUT + DETECTION_MARGIN,
            "{} reported {l_name} down {} ms after the pause (failure timeout {} ms + margin {} ms)",
            cluster.node(i).id(),
            d.as_millis(),
            FAILURE_TIMEOUT.as_millis(),
            DETECTION_MARGIN.as_millis()
        );
    }
    assert!(new_leader.is_some(), "no other node took over the shard of {g} during the pause");
    assert!(resumed, "no send through {} issued after the pause was acked within 4 s", cluster.node(o).id());
    let writes_back = writes_back.expect("checked");
    assert!(
        writes_back < FAILOVER_LIMIT,
        "writes resumed {} ms after the pause (limit {} ms)",
        writes_back.as_millis(),
        FAILOVER_LIMIT.as_millis()
    );

    // The request L's client sent during the pause gets an answer: an ack or a retryable failure.
    let is_it = |a: &Attempt| a.sender == name_l && a.cmid == outstanding.cmid && a.retry == outstanding.retry;
    let answered = wait_until(Duration::from_secs(40), || async { ledger.attempts().iter().any(is_it) }).await;
    assert!(answered, "the request outstanding on the paused leader was never answered");
    let attempt = ledger.attempts().into_iter().find(is_it).expect("checked");
    println!(
        "a_paused_leader: the send outstanding on {l_name} during the pause ({}) was answered {} ms after SIGCONT: {:?}",
        attempt.cmid,
        attempt.answered.saturating_duration_since(resumed_at).as_millis(),
        attempt.outcome
    );
    match &attempt.outcome {
        Ok(_) => {}
        Err(e) => assert!(
            matches!(e.code(), "unavailable" | "timeout"),
            "the send outstanding on the paused leader failed with {e:?}; only unavailable or a timeout may end it"
        ),
    }

    // L rejoins by itself: the others see it up again, the same process.
    let back = time_until_seen(&cluster, &others, &l_name, true, resumed_at, Duration::from_secs(15)).await;
    println!(
        "a_paused_leader: {l_name} seen up again after SIGCONT after {:?} ms",
        back.iter().map(|d| d.map(|d| d.as_millis())).collect::<Vec<_>>()
    );
    assert!(back.iter().all(Option::is_some), "{l_name} not reported up within 15 s of SIGCONT: {back:?}");
    assert_eq!(cluster.node(l).pid(), pid, "the paused node was restarted");
    let healthy_again = wait_until(Duration::from_secs(15), || healthy(&cluster, &[0, 1, 2], &g)).await;
    assert!(healthy_again, "the cluster is not healthy after SIGCONT: {}", cluster.status(o).await);

    // Both senders carry on: L's client through its own node again.
    let (base_l, base_o) = (ledger.acks_of(&name_l), ledger.acks_of(&name_o));
    let carry_on = wait_until(Duration::from_secs(20), || async {
        ledger.acks_of(&name_l) >= base_l + 20 && ledger.acks_of(&name_o) >= base_o + 20
    })
    .await;
    stop.stop();
    let ends = join_senders(tasks).await;
    assert!(carry_on, "the senders did not carry on after SIGCONT; errors {:?}", ledger.errors());
    assert_eq!(ends, vec![None, None], "the senders ended with errors");
    let unexpected = unexpected_errors(&ledger, &["unavailable", "timeout"]);
    assert!(unexpected.is_empty(), "errors other than unavailable and timeouts: {unexpected:#?}");

    let log = converged(&cluster, &[0, 1, 2], &g, Duration::from_secs(30)).await;
    let stored = check_log("the replicas", &g, &log, &ledger.acks(), &ledger.issued());
    check_synced(&cluster, &[0, 1, 2], &owner, &g, &ledger, &log).await;
    println!(
        "a_paused_leader: {} acks ({} through {l_name}), {stored} messages stored, errors {:?}",
        ledger.ack_count(),
        ledger.acks_of(&name_l),
        ledger.errors()
    );
    assert_no_first_try_duplicates(&ledger, "the pause", &[paused_at, resumed_at]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_catches_up_by_snapshot() {
    const GROUPS: usize = 3;
    // Leaders snapshot every 100 entries and keep 10 behind the snapshot: once they purge, a
    // follower that missed the first entries can only catch up by installing a snapshot.
    const PER_SENDER: usize = 250;
    let _serial = serial().await;
    let options = burst_options().set("raft.snapshot_every_entries", 100).set("raft.keep_entries_after_snapshot", 10);
    let mut cluster = Cluster::start(3, options);
    let x = 2;
    let x_name = cluster.node(x).id().to_string();
    let others = [0, 1];
    cluster.node_mut(x).kill9();

    // Groups in one shard, so that its log runs far ahead of the killed node.
    let mut groups = vec![unique("snap")];
    let shard = shard_of_group(cluster.node(0), &groups[0]).await;
    while groups.len() < GROUPS {
        let candidate = unique("snap");
        if shard_of_group(cluster.node(0), &candidate).await == shard {
            groups.push(candidate);
        }
    }
    let owner = unique("own");
    let users: Vec<String> = (0..2 * GROUPS).map(|i| unique(&format!("s{i}"))).collect();
    for g in &groups {
        open_on(cluster.node(0), &owner, g, &users).await;
    }
    let ledger = Ledger::new();
    let stop = Stop::new();
    let mut tasks = Vec::new();
    for (k, user) in users.iter().enumerate() {
        let via = others[k % 2];
        let client = connect_with_timeout(cluster.node(via), user, &["driver"], SEND_TIMEOUT).await;
        let name = format!("{}-c{k}", cluster.node(via).id());
        let sender =
            Sender { name: name.clone(), client, group: groups[k % GROUPS].clone(), user: user.clone(), prefix: name };
        tasks.push(tokio::spawn(run_sender(sender, ledger.clone(), stop.clone(), PER_SENDER)));
    }
    let sending_began = Instant::now();
    let ends = join_senders(tasks).await;
    let sending = sending_began.elapsed();
    assert!(ends.iter().all(Option::is_none), "senders ended with errors: {ends:?}");
    assert_eq!(ledger.ack_count(), users.len() * PER_SENDER, "every send is acked");
    let unexpected = unexpected_errors(&ledger, &["unavailable", "timeout"]);
    assert!(unexpected.is_empty(), "errors other than unavailable and timeouts: {unexpected:#?}");

    // A leader purges its log only between replication attempts to the dead follower: keep
    // writing, one send at a time, until both survivors have purged.
    let trickle = connect_with_timeout(cluster.node(0), &users[0], &["driver"], SEND_TIMEOUT).await;
    let mut trickled = 0;
    let purged = wait_until(Duration::from_secs(30), || {
        trickled += 1;
        let sender = Sender {
            name: "trickle".into(),
            client: trickle.clone(),
            group: groups[0].clone(),
            user: users[0].clone(),
            prefix: format!("trickle{trickled}"),
        };
        let ledger = ledger.clone();
        let cluster = &cluster;
        async move {
            let end = run_sender(sender, ledger, Stop::new(), 1).await;
            assert!(end.is_none(), "a trickle send failed: {end:?}");
            metric(cluster.node(0), "convoy_raft_log_purges_total").await >= 1.0
                && metric(cluster.node(1), "convoy_raft_log_purges_total").await >= 1.0
        }
    })
    .await;
    assert!(purged, "the survivors never purged their logs ({trickled} sends after the burst)");

    let restart_began = Instant::now();
    blocking(|| cluster.node_mut(x).restart());
    let mut logs = Vec::new();
    for g in &groups {
        let log = converged(&cluster, &[0, 1, 2], g, Duration::from_secs(60)).await;
        check_log(&format!("the replicas after {x_name} caught up"), g, &log, &ledger.acks(), &ledger.issued());
        logs.push(log);
    }
    let caught_up = restart_began.elapsed();
    let installed = metric(cluster.node(x), "convoy_snapshots_installed_total").await;
    println!(
        "a_restarted_node_catches_up_by_snapshot: {} messages into {GROUPS} groups of {shard} in {} ms while {x_name} \
         was down; {x_name} caught up {} ms after restart, {installed} snapshots installed",
        ledger.ack_count(),
        sending.as_millis(),
        caught_up.as_millis()
    );
    assert!(
        installed >= 1.0,
        "{x_name} caught up without installing a snapshot (convoy_snapshots_installed_total = {installed})"
    );

    // Kill the other two one at a time: the restarted node, with either of them, serves everything.
    for &victim in &others {
        cluster.node_mut(victim).kill9();
        for (g, log) in groups.iter().zip(&logs) {
            let leader = cluster.wait_for_leader(x, "group", g, Some(victim), Duration::from_secs(10)).await;
            assert!(leader.is_some(), "no leader for {g} after killing {}", cluster.node(victim).id());
            let replica = cluster.replica_entries(x, "group", g).await.expect("the restarted node's replica");
            assert!(replica == *log, "{x_name}'s replica of {g} changed after killing {}", cluster.node(victim).id());
            let reader = connect(cluster.node(x), &owner, &["dispatcher"]).await;
            let synced = synced_log(&reader, g).await;
            check_log(&format!("msg.sync on {x_name}"), g, &synced, &ledger.acks(), &ledger.issued());
            assert!(synced == *log, "msg.sync on {x_name} of {g} after killing {} differs", cluster.node(victim).id());
        }
        blocking(|| cluster.node_mut(victim).restart());
        for (g, log) in groups.iter().zip(&logs) {
            assert!(converged(&cluster, &[0, 1, 2], g, Duration::from_secs(30)).await == *log, "{g} changed");
        }
    }
}

/// A leadership moved on purpose is invisible to clients: a new cluster's first node leads every
/// shard, and the controller hands leaderships to the others one at a time while clients open
/// groups and send through all three nodes. A request that reaches the old leader as it hands
/// over follows the new one, so no client is told anything but success.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaders_spread_over_a_new_cluster_without_a_client_seeing_an_error() {
    const GROUPS: usize = 8;
    const SENDERS: usize = 6;
    let _serial = serial().await;
    let cluster = Cluster::start(3, burst_options());
    let owner = unique("own");
    let users: Vec<String> = (0..SENDERS).map(|i| unique(&format!("s{i}"))).collect();
    let groups: Vec<String> = (0..GROUPS).map(|i| unique(&format!("mv{i}"))).collect();
    for (i, g) in groups.iter().enumerate() {
        open_on(cluster.node(i % 3), &owner, g, &users).await;
    }
    let ledger = Ledger::new();
    let stop = Stop::new();
    let via: Vec<usize> = (0..SENDERS).map(|k| k % 3).collect();
    let tasks = start_senders(&cluster, &via, &users, &groups, "mv", &ledger, &stop).await;
    let settled = wait_until(Duration::from_secs(30), || leaders_settled(&cluster, 0)).await;
    let base = ledger.ack_count();
    let flowing = wait_until(Duration::from_secs(30), || async { ledger.ack_count() >= base + 200 }).await;
    stop.stop();
    let ends = join_senders(tasks).await;
    assert!(settled, "the shard leaders did not spread: {}", cluster.status(0).await);
    assert!(flowing, "the senders stalled; errors {:?}", ledger.errors());
    assert!(ends.iter().all(Option::is_none), "senders ended with errors: {ends:?}");
    assert!(ledger.errors().is_empty(), "clients were told of errors while leaders moved: {:?}", ledger.errors());
    println!("leaders_spread: {} acks through the moves, no errors", ledger.ack_count());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_nodes_killed_at_once_lose_nothing() {
    const GROUPS: usize = 3;
    const SENDERS: usize = 6;
    const ACKS_BEFORE_KILL: usize = 300;
    let _serial = serial().await;
    let mut cluster = Cluster::start(3, burst_options());
    let owner = unique("own");
    let groups: Vec<String> = (0..GROUPS).map(|i| unique(&format!("all{i}"))).collect();
    let users: Vec<String> = (0..SENDERS).map(|i| unique(&format!("s{i}"))).collect();
    for g in &groups {
        open_on(cluster.node(0), &owner, g, &users).await;
    }
    let ledger = Ledger::new();
    let stop = Stop::new();
    let via: Vec<usize> = (0..users.len()).map(|k| (k / 2) % 3).collect();
    let tasks = start_senders(&cluster, &via, &users, &groups, "all", &ledger, &stop).await;
    let started = wait_until(Duration::from_secs(30), || async { ledger.ack_count() >= ACKS_BEFORE_KILL }).await;
    assert!(started, "only {} acks; errors {:?}", ledger.ack_count(), ledger.errors());

    let killed_all_at = Instant::now();
    for node in cluster.nodes.iter_mut() {
        node.kill9();
    }
    let ends = join_senders(tasks).await;
    assert!(
        ends.iter().all(|e| e.as_ref().is_some_and(|e| e.code() == "closed")),
        "every sender ends when its node dies: {ends:?}"
    );
    let acks = ledger.acks();
    let issued = ledger.issued();

    let restart_began = Instant::now();
    blocking(|| {
        std::thread::scope(|s| {
            for node in cluster.nodes.iter_mut() {
                s.spawn(|| node.restart());
            }
        })
    });
    let ready = restart_began.elapsed();
    let mut stored = 0;
    for g in &groups {
        let log = converged(&cluster, &[0, 1, 2], g, Duration::from_secs(30)).await;
        stored += check_log("the replicas after a restart of all nodes", g, &log, &acks, &issued);
        check_synced(&cluster, &[0, 1, 2], &owner, g, &ledger, &log).await;
    }
    println!(
        "all_nodes_killed_at_once: {} acks before the kill, {} sends issued, {stored} messages stored; \
         all three ready {} ms after restart",
        acks.len(),
        issued.len(),
        ready.as_millis()
    );
    assert!(stored >= acks.len(), "{stored} messages stored for {} acks", acks.len());
    assert_no_first_try_duplicates(&ledger, "the kill of all nodes", &[killed_all_at]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_peer_is_marked_down_and_comes_back() {
    const DOWN_LIMIT: Duration = Duration::from_secs(2);
    const UP_LIMIT: Duration = Duration::from_secs(5);
    let _serial = serial().await;
    let cluster = Cluster::start(3, NodeOptions::new().set("cluster.failure_timeout", "800ms"));
    let (p, observers) = (2, [0, 1]);
    let name = cluster.node(p).id().to_string();
    let all_up = wait_until(Duration::from_secs(15), || async {
        for via in 0..3 {
            let status = cluster.status(via).await;
            if !cluster.nodes.iter().all(|n| member_up(&status, n.id()) == Some(true)) {
                return false;
            }
        }
        true
    })
    .await;
    assert!(all_up, "the cluster never had all members up: {}", cluster.status(0).await);

    cluster.node(p).pause();
    let paused_at = Instant::now();
    let down = time_until_seen(&cluster, &observers, &name, false, paused_at, Duration::from_secs(10)).await;
    cluster.node(p).resume();
    let resumed_at = Instant::now();
    let up = time_until_seen(&cluster, &observers, &name, true, resumed_at, Duration::from_secs(15)).await;
    let ms = |v: &[Option<Duration>]| v.iter().map(|d| d.map(|d| d.as_millis())).collect::<Vec<_>>();
    println!(
        "a_silent_peer: failure_timeout 800 ms; {name} paused, seen down by n1, n2 after {:?} ms; \
         resumed, seen up after {:?} ms",
        ms(&down),
        ms(&up)
    );
    for (d, via) in down.iter().zip(observers) {
        assert!(
            d.is_some_and(|d| d < DOWN_LIMIT),
            "{} saw the paused {name} down after {:?} (limit {DOWN_LIMIT:?})",
            cluster.node(via).id(),
            d
        );
    }
    for (d, via) in up.iter().zip(observers) {
        assert!(
            d.is_some_and(|d| d < UP_LIMIT),
            "{} saw the resumed {name} up after {:?} (limit {UP_LIMIT:?})",
            cluster.node(via).id(),
            d
        );
    }
    let sees_all = wait_until(Duration::from_secs(10), || async {
        let status = cluster.status(p).await;
        cluster.nodes.iter().all(|n| member_up(&status, n.id()) == Some(true))
    })
    .await;
    assert!(sees_all, "the resumed node does not see its peers up again: {}", cluster.status(p).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_set_before_its_leader_dies_fires_once_on_the_new_leader() {
    const RECEIPT_TIMEOUT: Duration = Duration::from_secs(3);
    let _serial = serial().await;
    let mut cluster = Cluster::start(3, burst_options().set("timeouts.receipt_timeout", "3s"));
    let g = unique("deadline");
    let (owner, reader, late) = (unique("own"), unique("rd"), unique("late"));
    let opener = connect(cluster.node(0), &owner, &["dispatcher"]).await;
    open_group(&opener, &g, vec![Member::new(&reader, "driver"), Member::new(&late, "customer")]).await;
    let leader = settled_leader(&cluster, 0, &g).await;
    let survivor = (leader + 1) % 3;
    let sender = connect(cluster.node(survivor), &owner, &["dispatcher"]).await;
    let reading = connect(cluster.node(survivor), &reader, &["driver"]).await;
    let late_client = connect(cluster.node((leader + 2) % 3), &late, &["customer"]).await;
    let mut events = late_client.events().expect("events");

    // The deadline is set in the shard's state, then its leader dies before it is due.
    let sent_at = Instant::now();
    let seq = sender.msg_send(&g, "needs-receipt", text("please confirm"), true).await.expect("sent").seq;
    reading.msg_read(&g, seq).await.expect("read");
    assert_still_leads(&cluster, survivor, &g, leader).await;
    cluster.node_mut(leader).kill9();

    let overdue = next_event(&mut events, RECEIPT_TIMEOUT + Duration::from_secs(15), |ev| {
        ev["ev"] == "msg" && ev["group"] == g.as_str() && ev["body"]["event"] == "receipt_overdue"
    })
    .await
    .expect("no receipt_overdue pushed within 15 s of the deadline after the leader died");
    let fired_after = sent_at.elapsed();
    println!(
        "a_deadline_set_before_its_leader_dies: receipt_overdue fired {} ms after the send (deadline {} ms)",
        fired_after.as_millis(),
        RECEIPT_TIMEOUT.as_millis()
    );
    assert!(fired_after >= RECEIPT_TIMEOUT, "receipt_overdue after {fired_after:?}, before its deadline");
    assert_eq!(overdue["body"]["seq"], seq, "the overdue entry names the message: {overdue}");
    let pending: Vec<&str> =
        overdue["body"]["pending"].as_array().expect("pending").iter().filter_map(|u| u.as_str()).collect();
    assert_eq!(pending, vec![late.as_str()], "only the customer has not read: {overdue}");

    // Exactly one, also once the killed leader is back and has caught up.
    tokio::task::block_in_place(|| cluster.node_mut(leader).restart());
    let log = converged(&cluster, &[0, 1, 2], &g, Duration::from_secs(30)).await;
    let fired: Vec<&Value> = log.iter().filter(|e| e["body"]["event"] == "receipt_overdue").collect();
    assert_eq!(fired.len(), 1, "receipt_overdue entries after the restart: {fired:?}");
}
