//! Traces across the cluster, checked with a real OTLP receiver (`rotel-agent`).

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use convoy_tests::desk::call;
use convoy_tests::otlp::{OtlpReceiver, ReceivedSpan};
use convoy_tests::{Cluster, Member, NodeOptions, connect, next_event, open_group, unique, wait_until};
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

    // A group led by n2, a sender on n1 and a member on n3.
    let mut group = None;
    for _ in 0..60 {
        let candidate = unique("g-trace");
        if cluster.wait_for_leader(0, "group", &candidate, None, Duration::from_secs(10)).await == Some(1) {
            group = Some(candidate);
            break;
        }
    }
    let group = group.expect("some group id hashes to a shard led by n2");
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

    // Spans arrive as each node's exporter flushes its batch.
    let complete = |spans: &[ReceivedSpan]| {
        let nodes: BTreeSet<&str> = spans.iter().map(|s| s.instance.as_str()).collect();
        nodes.len() == 3
            && spans.iter().any(|s| s.name == "push" && s.instance == "n3")
            && spans.iter().any(|s| s.name == "apply" && s.instance != "n2")
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
        ("apply", "n2"),
        ("fanout", "n2"),
        ("fanout.send", "n2"),
        ("deliver", "n3"),
        ("push", "n3"),
    ];
    assert!(in_order(&chain, &path), "the push on n3 descends from the whole path {path:?}; its ancestry: {chain:?}");
    let replica_applies = spans.iter().filter(|s| s.name == "apply" && s.instance != "n2").count();
    assert!(replica_applies >= 1, "followers' applies join the trace too: {spans:#?}");
}
