//! What operators see: traces across the cluster (checked with a real OTLP receiver,
//! `rotel-agent`), and metrics that are exported, documented and on the dashboard.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::time::Duration;

use convoy_tests::desk::call;
use convoy_tests::otlp::{OtlpReceiver, ReceivedSpan};
use convoy_tests::{
    Cluster, Member, Node, NodeOptions, admin_post, connect, connect_device, http, next_event, open_group, server_code,
    unique, wait_until,
};
use serde_json::json;

fn random_hex(bytes: usize) -> String {
    (0..bytes).map(|_| format!("{:02x}", rand::random::<u8>())).collect()
}

/// From `span` up to the root: each span's (name, node).
fn ancestry(span: &ReceivedSpan, by_id: &HashMap<&str, &ReceivedSpan>) -> Vec<(String, String)> {
    let mut chain = vec![(span.name.clone(), span.instance.clone())];
    let mut at = span;
    while let Some(parent) = by_id.get(at.parent_id.as_str()) {
        chain.push((parent.name.clone(), parent.instance.clone()));
        at = parent;
        assert!(chain.len() < 100, "a cycle in the span tree");
    }
    chain.reverse();
    chain
}

/// Whether `want` appears in `chain` in order (other spans may sit between).
fn in_order(chain: &[(String, String)], want: &[(&str, &str)]) -> bool {
    let mut rest = chain.iter();
    want.iter().all(|(name, node)| rest.any(|(n, i)| n == name && i == node))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_is_one_trace_across_the_three_nodes_it_touches() {
    let otlp = OtlpReceiver::start().await;
    // n2 exports over HTTP/protobuf, the others over gRPC: the trace needs both to arrive.
    let cluster = Cluster::start_each(3, |i| {
        let (endpoint, protocol) =
            if i == 1 { (&otlp.http_endpoint, "http_protobuf") } else { (&otlp.grpc_endpoint, "grpc") };
        NodeOptions::new().set("telemetry.otlp_endpoint", endpoint.as_str()).set("telemetry.otlp_protocol", protocol)
    });

    // A group led by n2, a sender on n1 and a member on n3. Right after start n2 may lead no
    // shard yet: the cluster spreads leaders shortly after.
    let mut group = None;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while group.is_none() && std::time::Instant::now() < deadline {
        let candidate = unique("g-trace");
        if cluster.wait_for_leader(0, "group", &candidate, None, Duration::from_secs(10)).await == Some(1) {
            group = Some(candidate);
        }
    }
    let group = group.expect("some group id hashes to a shard led by n2 within 30 s");
    let (sender_id, member_id) = (unique("d"), unique("c"));
    let sender = connect(cluster.node(0), &sender_id, &["dispatcher"]).await;
    let member = connect(cluster.node(2), &member_id, &["customer"]).await;
    let mut events = member.events().expect("events");
    open_group(&sender, &group, vec![Member::new(&member_id, "customer")]).await;

    // The client starts the trace: the server's spans are children of the client's span.
    let (trace_id, client_span) = (random_hex(16), random_hex(8));
    let sent = call(
        &sender,
        "msg.send",
        json!({
            "group": group, "client_msg_id": "traced-1", "body": {"type": "text", "text": "where is my parcel?"},
            "traceparent": format!("00-{trace_id}-{client_span}-01"),
        }),
    )
    .await;
    let seq = sent["seq"].as_u64().expect("msg.send answers a seq");
    let pushed = next_event(&mut events, Duration::from_secs(10), |ev| ev["ev"] == "msg" && ev["seq"] == seq).await;
    assert!(pushed.is_some(), "the member on n3 got the message");

    // Spans arrive as each node's exporter flushes its batch, each node on its own clock:
    // wait until every span's parent has arrived too (or is the client's).
    let complete = |spans: &[ReceivedSpan]| {
        let nodes: BTreeSet<&str> = spans.iter().map(|s| s.instance.as_str()).collect();
        let ids: BTreeSet<&str> = spans.iter().map(|s| s.span_id.as_str()).collect();
        nodes.len() == 3
            && spans.iter().any(|s| s.name == "push" && s.instance == "n3")
            && spans.iter().any(|s| s.name == "apply" && s.instance != "n2")
            && spans.iter().all(|s| s.parent_id == client_span || ids.contains(s.parent_id.as_str()))
    };
    let arrived = wait_until(Duration::from_secs(30), || async { complete(&otlp.trace(&trace_id)) }).await;
    let spans = otlp.trace(&trace_id);
    assert!(
        arrived,
        "spans from n1, n2 and n3 with a push on n3 in trace {trace_id}; got {spans:#?}\nreceiver output: {}",
        otlp.output().display()
    );

    assert!(spans.iter().all(|s| s.service == "convoy"), "service.name is convoy on every span: {spans:#?}");
    let by_id: HashMap<&str, &ReceivedSpan> = spans.iter().map(|s| (s.span_id.as_str(), s)).collect();
    let roots: Vec<&ReceivedSpan> = spans.iter().filter(|s| !by_id.contains_key(s.parent_id.as_str())).collect();
    assert_eq!(roots.len(), 1, "one connected tree; roots: {roots:#?}");
    assert_eq!(
        (roots[0].name.as_str(), roots[0].instance.as_str(), roots[0].parent_id.as_str()),
        ("request", "n1", client_span.as_str()),
        "the gateway's request span on n1 is the child of the client's span"
    );

    let push = spans.iter().find(|s| s.name == "push" && s.instance == "n3").expect("checked above");
    let chain = ancestry(push, &by_id);
    let path = [
        ("request", "n1"),
        ("route", "n1"),
        ("hop", "n1"),
        ("serve", "n2"),
        ("entity", "n2"),
        ("raft.commit", "n2"),
        // n3 holds a replica: it pushes to its own connections from its own apply.
        ("apply", "n3"),
        ("fanout", "n3"),
        ("push", "n3"),
    ];
    assert!(in_order(&chain, &path), "the push on n3 descends from the whole path {path:?}; its ancestry: {chain:?}");
    let replica_applies = spans.iter().filter(|s| s.name == "apply" && s.instance != "n2").count();
    assert!(replica_applies >= 1, "followers' applies join the trace too: {spans:#?}");
}

/// Every `convoy_*` name in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    text.match_indices("convoy_")
        .map(|(at, _)| text[at..].chars().take_while(|c| c.is_ascii_lowercase() || *c == '_').collect::<String>())
        .filter(|name| name.len() > "convoy_".len())
        .collect()
}

/// The metric families an exposition declares (`# TYPE <name> <type>`).
fn families(exposition: &str) -> BTreeSet<String> {
    exposition
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.split_whitespace().next().map(str::to_string))
        .collect()
}

/// The family a dashboard series belongs to (`x_bucket` -> `x`).
fn family_of(series: &str) -> &str {
    ["_bucket", "_sum", "_count"].iter().find_map(|s| series.strip_suffix(s)).unwrap_or(series)
}

fn repo_file(path: &str) -> String {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("reading {}: {e}", full.display()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_operators_need_are_exported_documented_and_on_the_dashboard() {
    let cluster = Cluster::start(3, NodeOptions::new());
    let group = unique("g-metrics");
    let (sender_id, member_id) = (unique("d"), unique("c"));
    let sender = connect_device(cluster.node(0), &sender_id, &["dispatcher"], "phone-1").await;
    let _same_device = connect_device(cluster.node(0), &sender_id, &["dispatcher"], "phone-1").await;
    let member = connect(cluster.node(2), &member_id, &["customer"]).await;
    let mut events = member.events().expect("events");
    open_group(&sender, &group, vec![Member::new(&member_id, "customer")]).await;
    for i in 0..5 {
        let body =
            json!({"group": group, "client_msg_id": format!("m{i}"), "body": {"type": "text", "text": "on my way"}});
        let seq = call(&sender, "msg.send", body).await["seq"].as_u64().expect("seq");
        let pushed = next_event(&mut events, Duration::from_secs(10), |ev| ev["ev"] == "msg" && ev["seq"] == seq).await;
        assert!(pushed.is_some(), "message {seq} reached the member");
    }

    let required = [
        "convoy_connections",
        "convoy_devices_connected",
        "convoy_users_connected",
        "convoy_requests_total",
        "convoy_request_seconds",
        "convoy_push_seconds",
        "convoy_raft_commit_seconds",
        "convoy_apply_batch_entries",
        "convoy_leader_changes_total",
        "convoy_raft_follower_lag_entries",
        "convoy_raft_leader",
        "convoy_storage_fsync_seconds",
        "convoy_storage_batch_jobs",
        "convoy_entities_alive",
        "convoy_entity_activations_total",
        "convoy_entity_mailbox_depth",
        "convoy_push_deliveries_total",
        "convoy_fanout_node_sends_total",
        "convoy_peer_heartbeats_total",
        "convoy_peers_connected",
    ];
    let scrape = || async {
        let mut all = Vec::new();
        for node in &cluster.nodes {
            let url = format!("{}/metrics", node.admin_url());
            let r = http::get(&url).await.unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(r.status, 200, "GET {url}");
            all.push(r.body);
        }
        all
    };
    let exported = |pages: &[String]| pages.iter().flat_map(|p| families(p)).collect::<BTreeSet<String>>();
    let all_there = wait_until(Duration::from_secs(10), || async {
        let pages = scrape().await;
        let have = exported(&pages);
        required.iter().all(|r| have.contains(*r))
    })
    .await;
    let pages = scrape().await;
    let have = exported(&pages);
    let missing: Vec<&&str> = required.iter().filter(|r| !have.contains(**r)).collect();
    assert!(all_there, "metrics missing from every node: {missing:?}");

    // Labels carry what the dashboard groups by.
    let sender_node = &pages[0];
    assert!(sender_node.contains(r#"convoy_requests_total{op="msg.send",code="ok"} 5"#), "{sender_node}");
    assert_eq!(convoy_chaos::metrics::sum_metric(sender_node, "convoy_connections"), Some(2.0));
    assert_eq!(
        convoy_chaos::metrics::sum_metric(sender_node, "convoy_devices_connected"),
        Some(1.0),
        "two connections, one device"
    );
    assert!(pages.iter().any(|p| p.contains(r#"convoy_entities_alive{kind="group"} 1"#)), "the group's actor is alive");
    assert!(pages.iter().all(|p| p.contains(r#"convoy_raft_follower_lag_entries{group="shard-"#)), "lag per shard");
    assert!(
        convoy_chaos::metrics::sum_metric(&pages[2], "convoy_push_seconds_count").unwrap_or(0.0) >= 5.0,
        "push latency measured"
    );

    // Everything exported is documented; everything the dashboard plots is documented.
    let documented = metric_names(&repo_file("docs/operations.md"));
    let undocumented: Vec<&String> =
        have.iter().filter(|m| m.starts_with("convoy_") && !documented.contains(*m)).collect();
    assert!(undocumented.is_empty(), "exported but not in docs/operations.md: {undocumented:?}");
    let dashboard = repo_file("deploy/grafana/convoy.json");
    let _: serde_json::Value = serde_json::from_str(&dashboard).expect("the dashboard is JSON");
    let plotted: BTreeSet<String> = metric_names(&dashboard).iter().map(|s| family_of(s).to_string()).collect();
    let unknown: Vec<&String> = plotted.iter().filter(|m| !documented.contains(*m)).collect();
    assert!(unknown.is_empty(), "the dashboard plots metrics that do not exist: {unknown:?}");
    let off_dashboard: Vec<&&str> = required.iter().filter(|r| !plotted.contains(**r)).collect();
    assert!(off_dashboard.is_empty(), "not on the dashboard: {off_dashboard:?}");
}

/// A `msg.send` carrying `traceparent`.
fn traced_send(group: &str, client_msg_id: &str, traceparent: &str) -> serde_json::Value {
    json!({
        "group": group, "client_msg_id": client_msg_id, "body": {"type": "text", "text": "traced"},
        "traceparent": traceparent,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampling_keeps_no_new_traces_at_zero_but_follows_a_clients_sampled_flag() {
    let otlp = OtlpReceiver::start().await;
    let node = Node::start(
        NodeOptions::new()
            .set("telemetry.otlp_endpoint", otlp.grpc_endpoint.as_str())
            .set("telemetry.sampling_ratio", 0.0),
    );
    let client = connect(&node, &unique("d"), &["dispatcher"]).await;
    let mut events = client.events().expect("events");
    let group = unique("g-sampled");
    open_group(&client, &group, vec![]).await;
    let unsampled = random_hex(16);
    call(&client, "msg.send", traced_send(&group, "m1", &format!("00-{unsampled}-{}-00", random_hex(8)))).await;
    let kept = random_hex(16);
    let sent = call(&client, "msg.send", traced_send(&group, "m2", &format!("00-{kept}-{}-01", random_hex(8)))).await;
    let seq = sent["seq"].as_u64().expect("seq");
    assert!(next_event(&mut events, Duration::from_secs(10), |ev| ev["seq"] == seq).await.is_some());

    // Spans leave in the order they end: once the kept trace's push is there, anything
    // sampled before it would be too.
    let arrived =
        wait_until(Duration::from_secs(30), || async { otlp.trace(&kept).iter().any(|s| s.name == "push") }).await;
    assert!(arrived, "the client's sampled trace is exported: {:#?}", otlp.spans());
    let names: BTreeSet<String> = otlp.trace(&kept).iter().map(|s| s.name.clone()).collect();
    for name in ["request", "route", "entity", "raft.commit", "apply", "fanout", "push"] {
        assert!(names.contains(name), "{name} in the kept trace: {names:?}");
    }
    let others: Vec<ReceivedSpan> = otlp.spans().into_iter().filter(|s| s.trace_id != kept).collect();
    assert!(others.is_empty(), "nothing but the client's sampled trace is kept at ratio 0: {others:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_lines_name_the_node_the_entity_and_the_trace() {
    let otlp = OtlpReceiver::start().await;
    let node = Node::start(
        NodeOptions::new()
            .set("telemetry.otlp_endpoint", otlp.grpc_endpoint.as_str())
            .set("telemetry.log_format", "json")
            .set("chaos.enabled", true)
            .set("timeouts.request_timeout", "1s"),
    );
    let client = connect(&node, &unique("d"), &["dispatcher"]).await;
    let group = unique("g-logged");
    open_group(&client, &group, vec![]).await;

    // A stalled disk makes the send time out inside the node, which logs it.
    assert_eq!(admin_post(&node, "/v1/chaos/storage/stall").await.status, 200);
    let trace_id = random_hex(16);
    let sending = traced_send(&group, "stuck", &format!("00-{trace_id}-{}-01", random_hex(8)));
    let code = server_code(client.request("msg.send", sending).await, "a send while the disk stalls");
    assert_eq!(code, "unavailable");
    assert_eq!(admin_post(&node, "/v1/chaos/storage/heal").await.status, 200);

    let log = std::fs::read_to_string(node.log_path()).expect("the node's log");
    let lines: Vec<serde_json::Value> =
        log.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("a JSON log line ({e}): {l}"))).collect();
    assert!(lines.iter().all(|l| l["node"] == "n1"), "every line names the node");
    let timed_out = lines
        .iter()
        .find(|l| l["message"] == "request timed out inside the cluster")
        .unwrap_or_else(|| panic!("the timeout is logged:\n{log}"));
    assert_eq!(timed_out["level"], "WARN");
    assert_eq!(timed_out["entity"], format!("group/{group}"), "{timed_out}");
    assert_eq!(
        timed_out["span"]["trace_id"],
        trace_id.as_str(),
        "the line carries the request's trace id: {timed_out}"
    );
}
