//! A peer that sends garbage: a ractor_cluster node in this test process (not a Convoy node:
//! it only greets and then sends unreadable batches and requests) connects to a real node with
//! the cluster's cookie. Each unreadable message is counted and dropped, an unreadable request
//! gets a clear answer, a request to hand a shard's leadership to a node that cannot take it is
//! refused, and the node goes on serving its clients.
//!
//! One test in this binary: ractor_cluster's registry is process-wide.

use std::time::{Duration, Instant};

use convoy_node::cluster::transport::{EndpointMsg, endpoint_group};
use convoy_node::cluster::wire::{Batch, Call, CallReply, Control, Envelope, Hello};
use convoy_node::shard::{NodeAddr, RaftGroupId};
use convoy_node::store::codec;
use convoy_tests::*;
use ractor::rpc::CallResult;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use ractor_cluster::NodeServer;
use ractor_cluster::node::NodeConnectionMode;

const COOKIE: &str = "bad-peer-test-cookie";
const ROGUE: u64 = 0x0bad_0bad_0bad_0bad;

/// The rogue's endpoint: answers the node's greeting so that the node keeps the session;
/// ignores everything else.
struct RogueEndpoint;

impl Actor for RogueEndpoint {
    type Msg = EndpointMsg;
    type State = ();
    type Arguments = ();

    async fn pre_start(&self, myself: ActorRef<EndpointMsg>, _: ()) -> Result<(), ActorProcessingErr> {
        ractor::pg::join(endpoint_group(ROGUE), vec![myself.get_cell()]);
        Ok(())
    }

    async fn handle(&self, _: ActorRef<EndpointMsg>, msg: EndpointMsg, _: &mut ()) -> Result<(), ActorProcessingErr> {
        if let EndpointMsg::Call(bytes, reply) = msg
            && let Ok(Envelope { body: Call::Hello(_), .. }) = codec::decode::<Envelope<Call>>("hello", &bytes)
        {
            let addr = NodeAddr {
                name: "rogue".into(),
                cluster_addr: "127.0.0.1:1".into(),
                client_url: "ws://127.0.0.1:1/v1/ws".into(),
                admin_url: "http://127.0.0.1:1".into(),
            };
            let hello = Hello { node: ROGUE, addr, cluster_id: 0 };
            let _ =
                reply.send(codec::encode(&Envelope { from: ROGUE, traceparent: None, body: CallReply::Hello(hello) }));
        }
        Ok(())
    }
}

/// Sends `request` (the bytes of a call) to the node's endpoint and reads its answer.
async fn ask(endpoint: &ActorRef<EndpointMsg>, request: Vec<u8>) -> CallReply {
    let answer = endpoint
        .call(|reply| EndpointMsg::Call(request, reply), Some(Duration::from_secs(5)))
        .await
        .expect("the call went out");
    let CallResult::Success(bytes) = answer else { panic!("no answer to a request") };
    let reply: Envelope<CallReply> = codec::decode("answer", &bytes).expect("the answer is readable");
    reply.body
}

async fn garbage_count(node: &Node) -> f64 {
    let page = http::get(&format!("{}/metrics", node.admin_url())).await.expect("metrics");
    convoy_chaos::metrics::sum_metric(&page.body, "convoy_peer_garbage_total").unwrap_or(0.0)
}

#[tokio::test]
async fn a_peer_sending_garbage_is_answered_counted_and_harms_nothing() {
    // A long failure timeout: the rogue never answers heartbeats, and the node must not drop
    // its session before the garbage arrives.
    let node = Node::start(NodeOptions::new().set("cluster.cookie", COOKIE).set("cluster.failure_timeout", "30s"));
    let port = Ports::free().cluster;
    let server = NodeServer::new(
        port,
        COOKIE.into(),
        format!("{ROGUE:016x}.00000001"),
        "127.0.0.1".into(),
        None,
        Some(NodeConnectionMode::Isolated),
    );
    let (server, _) = Actor::spawn(None, server, ()).await.expect("the rogue's node server");
    Actor::spawn(None, RogueEndpoint, ()).await.expect("the rogue's endpoint");
    ractor_cluster::client_connect(&server, node.cluster_addr()).await.expect("connecting to the node");

    // The node's endpoint shows up in the rogue's registry once the session is ready.
    let deadline = Instant::now() + Duration::from_secs(10);
    let endpoint: ActorRef<EndpointMsg> = loop {
        let theirs = ractor::pg::which_groups()
            .into_iter()
            .filter(|g| g.starts_with("convoy.peer:") && *g != endpoint_group(ROGUE))
            .find_map(|g| ractor::pg::get_members(&g).into_iter().find(|c| !c.get_id().is_local()));
        if let Some(cell) = theirs {
            break cell.into();
        }
        assert!(Instant::now() < deadline, "the node's endpoint never appeared; node log:\n{}", node.log_tail(30));
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let before = garbage_count(&node).await;

    // A length cut short; a frame of an unknown format version; a known version followed by
    // bytes that are no envelope. Three unreadable frames, each dropped on its own.
    endpoint.cast(EndpointMsg::Frames(vec![0xff, 0xff])).expect("cast");
    let mut batch = Batch::default();
    batch.push(&[0x7f, 1, 2, 3]);
    let mut valid_version = codec::encode(&0u8);
    valid_version.truncate(1);
    valid_version.extend_from_slice(&[0xff; 16]);
    batch.push(&valid_version);
    endpoint.cast(EndpointMsg::Frames(batch.into_bytes())).expect("cast");

    // An unreadable request gets an answer that says so.
    let reply = ask(&endpoint, vec![0xde, 0xad]).await;
    assert!(
        matches!(&reply, CallReply::Failed(why) if why.contains("unreadable request")),
        "answer to garbage: {reply:?}"
    );

    let deadline = Instant::now() + Duration::from_secs(10);
    while garbage_count(&node).await < before + 4.0 {
        assert!(Instant::now() < deadline, "garbage not counted: {} -> {}", before, garbage_count(&node).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(garbage_count(&node).await, before + 4.0, "three frames and one request, each counted once");

    // Handing a shard's leadership to a node that has never answered its replication (the
    // rogue is no replica at all) is refused: a leader takes no writes while it hands over.
    for shard in 0..8 {
        let group = RaftGroupId(shard);
        let call = Call::Control(Control::TransferLeader { group, to: ROGUE });
        let reply = ask(&endpoint, codec::encode(&Envelope { from: ROGUE, traceparent: None, body: call })).await;
        assert!(
            matches!(&reply, CallReply::Failed(why) if why.contains("never answered")),
            "answer to a hand-over of {group} to a node that is no replica: {reply:?}"
        );
    }

    // The node still serves a client end to end.
    let client = connect(&node, &unique("after-garbage"), &["driver"]).await;
    let g = unique("after-garbage");
    open_group(&client, &g, vec![]).await;
    let sent = client.msg_send(&g, "m1", text("still fine"), false).await.expect("msg.send after garbage");
    let page = client.msg_sync(&g, 0, 10).await.expect("msg.sync after garbage");
    assert_eq!(page.last_seq, sent.seq);
    assert!(node.log_tail(200).contains("a peer sent an unreadable message"), "the garbage is logged");
    server.stop(None);
}
