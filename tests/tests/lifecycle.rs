//! Node and entity lifecycle: admin endpoints, passivation of idle entities, token expiry.

use std::time::{Duration, Instant};

use convoy_tests::http;
use convoy_tests::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints_report_health_readiness_and_metrics() {
    let node = Node::start(NodeOptions::new());
    let healthz = http::get(&format!("{}/healthz", node.admin_url())).await.unwrap();
    assert_eq!(healthz.status, 200, "{healthz:?}");
    let readyz = http::get(&format!("{}/readyz", node.admin_url())).await.unwrap();
    assert_eq!(readyz.status, 200, "/readyz once the node printed its ready line: {readyz:?}");
    let missing = http::get(&format!("{}/no-such-endpoint", node.admin_url())).await.unwrap();
    assert_eq!(missing.status, 404);

    // Some traffic, then the metrics show it.
    let user = unique("u");
    let client = connect(&node, &user, &["driver"]).await;
    let g = unique("g");
    open_group(&client, &g, vec![]).await;
    for i in 0..3 {
        client.msg_send(&g, &format!("m{i}"), text("x"), false).await.unwrap();
    }
    let metrics = http::get(&format!("{}/metrics", node.admin_url())).await.unwrap();
    assert_eq!(metrics.status, 200);
    let series: Vec<&str> = metrics.body.lines().filter(|l| !l.starts_with('#') && l.starts_with("convoy_")).collect();
    assert!(series.len() >= 5, "few convoy_ metrics:\n{}", metrics.body);
    for line in &series {
        let value = line.rsplit(' ').next().unwrap();
        assert!(value.parse::<f64>().is_ok(), "unparsable sample {line:?}");
    }
    assert!(metric(&node, "convoy_requests_total").await >= 4.0, "requests are counted:\n{}", metrics.body);
    assert!(metric(&node, "convoy_connections").await >= 1.0, "the open connection is counted");
    client.close().await;
    assert!(
        wait_until(Duration::from_secs(5), || async { metric(&node, "convoy_connections").await == 0.0 }).await,
        "convoy_connections did not drop to 0 after the client left"
    );
}

/// Waits until more entities were passivated than `seen` (when `grow`) and none is active any more.
async fn wait_for_passivation(node: &Node, seen: &mut f64, grow: bool) {
    let before = *seen;
    let idle = wait_until(Duration::from_secs(10), || async {
        (!grow || metric(node, "convoy_entity_passivations_total").await > before)
            && metric(node, "convoy_entities_active").await == 0.0
    })
    .await;
    let now = metric(node, "convoy_entity_passivations_total").await;
    let active = metric(node, "convoy_entities_active").await;
    assert!(idle, "entity_idle = 300ms: passivations {before} -> {now}, {active} entities still active after 10 s");
    *seen = now;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_entities_are_passivated_and_come_back_intact() {
    let node = Node::start(NodeOptions::new().set("timeouts.entity_idle", "300ms"));
    let (a, b) = (unique("a"), unique("b"));
    let g = unique("idle");
    let ac = connect(&node, &a, &["dispatcher"]).await;
    let bc = connect(&node, &b, &["driver"]).await;
    open_group(&ac, &g, drivers(&[&b])).await;
    let mut first = None;
    for i in 0..5 {
        let sent = ac.msg_send(&g, &format!("m{i}"), text(&format!("before idle {i}")), i == 4).await.unwrap();
        first.get_or_insert(sent);
    }
    let first = first.unwrap();
    bc.msg_read(&g, first.seq + 2).await.unwrap();
    let info_before = ac.group_info(&g).await.unwrap();
    let log_before = sync_all(&ac, &g, 0, 500).await;
    let inbox_before = bc.inbox_sync().await.unwrap();

    let passivated = metric(&node, "convoy_entity_passivations_total").await;
    let mut seen = passivated;
    wait_for_passivation(&node, &mut seen, true).await;
    // The passivated group comes back with everything.
    let info = bc.group_info(&g).await.unwrap();
    assert_eq!(info, info_before, "group.info changed across passivation");
    assert_eq!(sync_all(&bc, &g, 0, 500).await, log_before, "the log changed across passivation");
    let mut inbox = bc.inbox_sync().await.unwrap();
    let mut inbox_before = inbox_before;
    inbox.sort_by(|x, y| x.group.cmp(&y.group));
    inbox_before.sort_by(|x, y| x.group.cmp(&y.group));
    assert_eq!(inbox, inbox_before, "inbox.sync changed across passivation");

    // ...and keeps serving: the dedupe table, the seq counter and read positions are intact.
    wait_for_passivation(&node, &mut seen, false).await;
    let again = ac.msg_send(&g, "m0", text("before idle 0"), false).await.unwrap();
    assert_eq!((again.seq, again.duplicate), (first.seq, true), "dedupe lost across passivation");
    wait_for_passivation(&node, &mut seen, true).await;
    let next = bc.msg_send(&g, "after-idle", text("still here"), false).await.unwrap();
    assert_eq!((next.seq, next.duplicate), (info_before.last_seq + 1, false));
    wait_for_passivation(&node, &mut seen, true).await;
    bc.msg_read(&g, first.seq + 1).await.unwrap();
    let info = ac.group_info(&g).await.unwrap();
    let b_read = info.members.iter().find(|m| m.user == b).unwrap().read_seq;
    assert_eq!(b_read, next.seq, "B's read position after its own send");
    assert!(seen > passivated);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expiring_token_closes_the_connection_with_4401() {
    let node = Node::start(NodeOptions::new());
    let user = unique("u");
    let claims = Claims::new(&user, ["driver"], Duration::from_secs(2));
    let exp = claims.exp;
    let client = open(&node).await;
    client.hello(&mint(node.secret().as_bytes(), &claims), "test").await.expect("hello with a 2 s token");
    client.ping().await.expect("ping while the token is valid");
    let started = Instant::now();
    let code = closed_with(&client, Duration::from_secs(10)).await;
    assert_eq!(code, Some(4401), "close code when the token expired");
    let closed_at = unix_now_secs();
    assert!(
        closed_at + 1 >= exp,
        "closed at {closed_at}, token expires at {exp} ({:?} after hello)",
        started.elapsed()
    );
    let r = client.request("ping", json!({})).await;
    assert!(matches!(r, Err(ClientError::Closed { .. })), "{r:?}");
    // A fresh token works for the same user.
    connect(&node, &user, &["driver"]).await.ping().await.unwrap();
}

/// An entity actor that fails is forgotten by its supervisor and the next request starts a
/// fresh one from the stored state: seqs continue, nothing is lost, the failure is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_entity_actor_restarts_from_stored_state() {
    let node = Node::start(NodeOptions::new().set("chaos.enabled", true));
    let user = unique("u");
    let client = connect(&node, &user, &["dispatcher"]).await;
    let g = unique("g");
    open_group(&client, &g, vec![]).await;
    for i in 0..3 {
        client.msg_send(&g, &format!("m{i}"), text("before"), false).await.unwrap();
    }
    let reply = admin_post(&node, &format!("/v1/chaos/entities/group/{g}/crash")).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert!(reply.body.contains(r#""crashed":true"#), "the group's actor was active: {reply:?}");
    assert!(
        wait_until(Duration::from_secs(5), || async { metric(&node, "convoy_entity_failures_total").await >= 1.0 })
            .await,
        "the supervisor saw the failure"
    );
    let sent = client.msg_send(&g, "m3", text("after"), false).await.unwrap();
    assert_eq!((sent.seq, sent.duplicate), (5, false), "seqs continue after the restart (seq 1 is the open entry)");
    let retry = client.msg_send(&g, "m1", text("before"), false).await.unwrap();
    assert_eq!((retry.seq, retry.duplicate), (3, true), "dedupe survives the restart");
    let all = sync_all(&client, &g, 0, 100).await;
    assert_eq!(all.iter().map(seq_of).collect::<Vec<_>>(), vec![1, 2, 3, 4, 5]);
    // Crashing an entity that is not active does nothing, and unknown kinds are refused.
    let idle = admin_post(&node, &format!("/v1/chaos/entities/group/{}/crash", unique("nobody"))).await;
    assert!(idle.body.contains(r#""crashed":false"#), "{idle:?}");
    let bad = admin_post(&node, "/v1/chaos/entities/planet/x/crash").await;
    assert_eq!(bad.status, 404, "{bad:?}");
    let bad_hang = admin_post(&node, &format!("/v1/chaos/entities/group/{g}/crash?ms=0")).await;
    assert_eq!(bad_hang.status, 400, "{bad_hang:?}");
    assert!(bad_hang.body.contains("from 1 to 10000"), "the refusal says what to pass: {bad_hang:?}");
}

/// Requests caught in an entity actor's failure (queued in its mailbox while it hangs, then
/// fails) are answered `unavailable`, never left without an answer; retried, each is stored once.
/// The node itself retries such a request until `timeouts.leader_wait` has passed: a hang longer
/// than that makes the client see the `unavailable`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_caught_in_an_actor_failure_get_unavailable_not_silence() {
    const IN_FLIGHT: usize = 64;
    let node = Node::start(
        NodeOptions::new()
            .set("chaos.enabled", true)
            .set("timeouts.leader_wait", "100ms")
            .set("limits.requests_per_second", 100_000)
            .set("limits.request_burst", 100_000),
    );
    let user = unique("u");
    let client = connect(&node, &user, &["dispatcher"]).await;
    let g = unique("g");
    open_group(&client, &g, vec![]).await;

    // The actor hangs long enough for every send below to queue behind it, then fails.
    let crash = admin_post(&node, &format!("/v1/chaos/entities/group/{g}/crash?ms=500")).await;
    assert_eq!(crash.status, 200, "{crash:?}");
    assert!(crash.body.contains(r#""crashed":true"#) && crash.body.contains(r#""hang_ms":500"#), "{crash:?}");
    let sends = (0..IN_FLIGHT).map(|i| {
        let (client, g, cmid) = (client.clone(), g.clone(), format!("m{i}"));
        async move {
            let result = client.msg_send(&g, &cmid, text(&cmid), false).await;
            (cmid, result)
        }
    });
    let mut acked: Vec<(String, u64)> = Vec::new();
    let mut caught: Vec<String> = Vec::new();
    for (cmid, result) in futures::future::join_all(sends).await {
        match result {
            Ok(sent) => acked.push((cmid, sent.seq)),
            Err(ClientError::Server { code, .. }) if code == "unavailable" => caught.push(cmid),
            Err(e) => panic!("{cmid}, sent while the actor hung: {e} (only ok or unavailable may come back)"),
        }
    }
    assert!(!caught.is_empty(), "none of {IN_FLIGHT} sends queued behind the hanging actor was answered unavailable");
    // The callers learn of the failure when the mailbox is dropped; the supervisor hears of it
    // by a message of its own, which may come a moment later.
    wait_until(Duration::from_secs(5), || async { metric(&node, "convoy_entity_failures_total").await >= 1.0 }).await;
    assert_eq!(metric(&node, "convoy_entity_failures_total").await, 1.0, "the supervisor saw the failure, once");

    // Nothing caught was stored: every retry is new, and the log holds each send once.
    for cmid in &caught {
        let sent = client.msg_send(&g, cmid, text(cmid), false).await.expect("a retry after the restart");
        assert!(!sent.duplicate, "{cmid} was answered unavailable but had been stored");
        acked.push((cmid.clone(), sent.seq));
    }
    let log = sync_all(&client, &g, 0, 500).await;
    assert_eq!(log.len(), 1 + IN_FLIGHT, "the open entry and every send once");
    for (cmid, seq) in &acked {
        let entry = log.iter().find(|e| seq_of(e) == *seq).unwrap_or_else(|| panic!("seq {seq} missing"));
        assert_eq!(entry["client_msg_id"], cmid.as_str(), "seq {seq}");
    }
    eprintln!("{} of {IN_FLIGHT} sends queued behind a failing actor, all answered unavailable", caught.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_injection_is_refused_unless_enabled() {
    let node = Node::start(NodeOptions::new());
    let reply = admin_post(&node, "/v1/chaos/entities/group/g1/crash").await;
    assert_eq!(reply.status, 403, "{reply:?}");
    assert!(reply.body.contains("chaos.enabled"), "the refusal says how to enable it: {reply:?}");
    let anonymous = http::post(&format!("{}/v1/chaos/entities/group/g1/crash", node.admin_url())).await.unwrap();
    assert_eq!(anonymous.status, 401, "the admin API needs a token: {anonymous:?}");
    let url = format!("{}/v1/cluster", node.admin_url());
    let driver = http::request_with_token("GET", &url, Some(&token(&node, "d", &["driver"]))).await.unwrap();
    assert_eq!(driver.status, 403, "a token without the admin role is refused: {driver:?}");
}

/// A `convoy dev` process and what it printed before its ready line.
struct DevNode {
    process: std::process::Child,
    printed: Vec<String>,
}

/// Runs `convoy dev` in `dir` with nothing configured but the addresses, and waits for its
/// ready line.
fn convoy_dev(dir: &std::path::Path, ports: &Ports) -> DevNode {
    use std::io::BufRead;
    let mut process = std::process::Command::new(convoy_tests::node::convoy_bin())
        .args(["dev", "--data-dir", "data", "--client-addr"])
        .arg(format!("127.0.0.1:{}", ports.client))
        .arg("--admin-addr")
        .arg(format!("127.0.0.1:{}", ports.admin))
        .env_remove("CONVOY_AUTH_SECRET")
        .env("CONVOY_CLUSTER_LISTEN", format!("127.0.0.1:{}", ports.cluster))
        .current_dir(dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("running convoy dev");
    let mut lines = std::io::BufReader::new(process.stdout.take().unwrap()).lines();
    let mut printed = Vec::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        let ready = line.starts_with("convoy ready ");
        printed.push(line);
        if ready {
            // Keep draining stdout so that the node never blocks on a full pipe.
            std::thread::spawn(move || lines.for_each(drop));
            return DevNode { process, printed };
        }
    }
    let status = process.wait();
    panic!("convoy dev exited ({status:?}) before it was ready; it printed:\n{}", printed.join("\n"));
}

impl DevNode {
    fn stop(mut self) -> std::process::ExitStatus {
        // SAFETY: kill(2) on the pid of a child we own.
        unsafe { libc::kill(self.process.id() as i32, libc::SIGTERM) };
        self.process.wait().unwrap()
    }
}

impl Drop for DevNode {
    /// A failed test leaves no node behind (after `stop` this finds it gone).
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

/// `convoy dev` needs no configuration: it prints where it listens and a demo token that
/// works, keeps the secret it generated in its data directory (so `convoy token` mints
/// tokens it accepts, before and after a restart), and stops cleanly on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn convoy_dev_needs_no_configuration_and_its_tokens_work_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let ports = Ports::free();
    let url = format!("ws://127.0.0.1:{}/v1/ws", ports.client);
    let dev = tokio::task::block_in_place(|| convoy_dev(dir.path(), &ports));
    let ready = dev.printed.last().unwrap();
    assert_eq!(ready, &format!("convoy ready node=n1 client={url} admin=http://127.0.0.1:{}", ports.admin));
    let demo_line = dev.printed.iter().find(|l| l.contains("token for user \"demo\"")).expect("a demo token line");
    let demo_token = demo_line.rsplit(' ').next().unwrap().to_string();

    let demo = Client::connect(&url, ClientOptions::default()).await.unwrap();
    assert_eq!(demo.hello(&demo_token, "cli").await.expect("the printed token works").user, "demo");
    let g = unique("dev");
    open_group(&demo, &g, vec![]).await;
    let sent = demo.msg_send(&g, "m1", text("kept"), false).await.unwrap();
    drop(demo);
    assert!(tokio::task::block_in_place(|| dev.stop()).success(), "SIGTERM ends convoy dev with exit 0");

    let minted = std::process::Command::new(convoy_tests::node::convoy_bin())
        .args(["token", "--user", "u-17", "--role", "driver", "--ttl", "10m", "--data-dir", "data"])
        .env_remove("CONVOY_AUTH_SECRET")
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(minted.status.success(), "convoy token: {}", String::from_utf8_lossy(&minted.stderr));
    let minted = String::from_utf8(minted.stdout).unwrap().trim().to_string();

    let dev = tokio::task::block_in_place(|| convoy_dev(dir.path(), &ports));
    let driver = Client::connect(&url, ClientOptions::default()).await.unwrap();
    assert_eq!(driver.hello(&minted, "cli").await.expect("a token from convoy token").user, "u-17");
    let demo = Client::connect(&url, ClientOptions::default()).await.unwrap();
    demo.hello(&demo_token, "cli").await.expect("the first run's token works after a restart");
    assert_eq!(demo.msg_sync(&g, 0, 10).await.unwrap().last_seq, sent.seq, "the data survived the restart");
    assert!(tokio::task::block_in_place(|| dev.stop()).success());
}

/// The shard count is fixed once data exists: a node restarted with another
/// `cluster.shards` stops with an error naming both values instead of serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_with_another_shard_count_stops_with_an_error() {
    let mut node = Node::start(NodeOptions::new());
    let c = connect(&node, &unique("a"), &["dispatcher"]).await;
    open_group(&c, &unique("g"), vec![]).await;
    drop(c);
    assert!(tokio::task::block_in_place(|| node.terminate()).success());
    let config_path = node.dir().join("convoy.toml");
    let mut config: toml::Table = std::fs::read_to_string(&config_path).unwrap().parse().unwrap();
    let cluster = config.entry("cluster").or_insert_with(|| toml::Value::Table(Default::default()));
    cluster.as_table_mut().unwrap().insert("shards".into(), toml::Value::Integer(16));
    std::fs::write(&config_path, toml::to_string(&config).unwrap()).unwrap();
    let out = tokio::task::block_in_place(|| {
        std::process::Command::new(convoy_tests::node::convoy_bin())
            .args(["start", "--config"])
            .arg(&config_path)
            .env_remove("CONVOY_AUTH_SECRET")
            .output()
            .unwrap()
    });
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a node with a changed shard count started: {said}");
    assert!(said.contains("cluster.shards is 16 on this node but the cluster was formed with 8"), "{said}");
}
