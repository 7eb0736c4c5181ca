//! A three-node cluster: any client on any node reaches any entity, reads are
//! linearizable across nodes, pushes reach every device wherever it is connected, and every
//! replica holds the same log.

use std::time::Duration;

use convoy_tests::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_on_any_node_share_one_system() {
    let cluster = Cluster::start(3, NodeOptions::new());
    let g = unique("exc");
    let (disp, drv, cust) = (unique("disp"), unique("drv"), unique("cust"));
    let on_n1 = connect(cluster.node(0), &disp, &["dispatcher"]).await;
    let on_n2 = connect(cluster.node(1), &drv, &["driver"]).await;
    let cust_n3 = connect_device(cluster.node(2), &cust, &["customer"], "phone").await;
    let cust_n1 = connect_device(cluster.node(0), &cust, &["customer"], "web").await;
    let mut drv_events = on_n2.events().unwrap();
    let mut phone_events = cust_n3.events().unwrap();
    let mut web_events = cust_n1.events().unwrap();

    on_n1
        .request(
            "group.open",
            json!({"group": g, "kind": "exception", "exception_type": "damage",
                   "members": [{"user": drv, "role": "driver"}, {"user": cust, "role": "customer"}]}),
        )
        .await
        .expect("open through n1");

    // Every ack is visible to a sync on another node right away (linearizable reads).
    for i in 0..20 {
        let sent = on_n2.msg_send(&g, &format!("m{i}"), text(&format!("t{i}")), false).await.expect("send via n2");
        let page = cust_n3.msg_sync(&g, sent.seq - 1, 10).await.expect("sync via n3");
        assert_eq!(page.last_seq, sent.seq, "an ack of seq {} then a sync on another node", sent.seq);
        assert_eq!(seq_of(&page.messages[0]), sent.seq);
    }

    // The inbox, gathered from the user's shard and the group's, answers on every node.
    for client in [&on_n2, &cust_n3] {
        let inbox = client.inbox_sync().await.expect("inbox.sync across nodes");
        let line = inbox.iter().find(|l| l.group == g).unwrap_or_else(|| panic!("{g} missing from {inbox:?}"));
        assert_eq!(line.last_seq, 21, "{line:?}");
    }

    // Pushes reach each device, wherever it is connected, in seq order.
    for (name, events) in
        [("driver on n2", &mut drv_events), ("phone on n3", &mut phone_events), ("web on n1", &mut web_events)]
    {
        let mut seqs = Vec::new();
        while seqs.len() < 21 {
            let ev = next_event(events, Duration::from_secs(5), |ev| ev["ev"] == "msg" && ev["group"] == g.as_str())
                .await
                .unwrap_or_else(|| panic!("{name}: only {} of 21 msg events: {seqs:?}", seqs.len()));
            seqs.push(seq_of(&ev));
        }
        assert_eq!(seqs, (1..=21).collect::<Vec<_>>(), "{name} got pushes out of order");
    }
    // Every node holds a replica of every shard, so each pushed from its own apply: no node
    // sent another one a push.
    assert_eq!(cluster.metric_total("convoy_fanout_node_sends_total").await, 0.0, "pushes crossed between nodes");

    // A read on one device shows on the other device (another node) and in group.info.
    cust_n3.msg_read(&g, 21).await.unwrap();
    let receipt = next_event(&mut web_events, Duration::from_secs(5), |ev| ev["ev"] == "receipt")
        .await
        .expect("receipt on the web device");
    assert_eq!((receipt["user"].as_str(), receipt["read_seq"].as_u64()), (Some(cust.as_str()), Some(21)));

    // Every replica (read locally, no Raft round) holds the same 21 entries.
    let wanted = wait_until(Duration::from_secs(5), || async {
        let mut logs = Vec::new();
        for i in 0..3 {
            logs.push(cluster.replica_entries(i, "group", &g).await.unwrap_or_default());
        }
        logs.iter().all(|l| l.len() == 21) && logs.windows(2).all(|w| w[0] == w[1])
    })
    .await;
    assert!(wanted, "the three replicas of {g} did not converge to the same 21 entries");

    let status = cluster.status(1).await;
    assert_eq!(status["members"].as_array().map(Vec::len), Some(3), "{status}");
    assert!(status["members"].as_array().unwrap().iter().all(|m| m["up"] == true), "{status}");
    assert!(
        status["groups"].as_array().unwrap().iter().all(|g| g["leader"].is_string()),
        "every group has a leader: {status}"
    );
}

/// With fewer replicas than nodes, a node that holds no replica of a group's shard gets the
/// group's pushes from the leader, and its devices see the same events in the same order as
/// those on the replicas, which push from their own apply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_without_a_replica_get_pushes_from_the_leader() {
    let cluster = Cluster::start(3, NodeOptions::new().set("cluster.replication_factor", 2));
    let g = unique("exc");
    let (disp, cust) = (unique("disp"), unique("cust"));
    let sender = connect(cluster.node(0), &disp, &["dispatcher"]).await;
    let mut devices = Vec::new();
    for i in 0..3 {
        let device = connect_device(cluster.node(i), &cust, &["customer"], &format!("device-{i}")).await;
        let events = device.events().unwrap();
        devices.push((i, device, events));
    }
    open_group(&sender, &g, vec![Member::new(&cust, "customer")]).await;
    let mut last = 0;
    for i in 0..20 {
        last = sender.msg_send(&g, &format!("m{i}"), text(&format!("t{i}")), false).await.expect("send").seq;
    }
    for (node, _, events) in &mut devices {
        let mut seqs = Vec::new();
        while seqs.last() != Some(&last) {
            let ev = next_event(events, Duration::from_secs(5), |ev| ev["ev"] == "msg" && ev["group"] == g.as_str())
                .await
                .unwrap_or_else(|| panic!("the device on n{} got only {seqs:?} of 1..={last}", *node + 1));
            seqs.push(seq_of(&ev));
        }
        assert_eq!(seqs, (1..=last).collect::<Vec<_>>(), "the device on n{} got pushes out of order", *node + 1);
    }
    // One node of the three holds no replica of the group's shard: the leader sent it each
    // event, once.
    let sends = cluster.metric_total("convoy_fanout_node_sends_total").await;
    assert!(sends >= last as f64, "{sends} pushes sent between nodes for {last} entries");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_talk_over_tls_and_refuse_plain_peers() {
    let dir = tempfile::tempdir().unwrap();
    let files = tls::material(dir.path());
    let tls = NodeOptions::new()
        .set("cluster.tls_cert", files.cert)
        .set("cluster.tls_key", files.key)
        .set("cluster.tls_ca", files.ca);
    let cluster = Cluster::start(3, tls);
    let g = unique("tls");
    let a = connect(cluster.node(0), &unique("a"), &["dispatcher"]).await;
    open_group(&a, &g, vec![]).await;
    for i in 0..10 {
        a.msg_send(&g, &format!("m{i}"), text("over tls"), false).await.expect("a send through a TLS cluster");
    }
    assert!(
        wait_until(Duration::from_secs(5), || async {
            let mut logs = Vec::new();
            for i in 0..3 {
                logs.push(cluster.replica_entries(i, "group", &g).await.unwrap_or_default().len());
            }
            logs == [11, 11, 11]
        })
        .await,
        "every replica got the entries over TLS"
    );
    // A node that dials without TLS is refused, and says what to check.
    let mut plain = NodeOptions::new().set("cluster.seeds", vec![toml::Value::from(cluster.node(0).cluster_addr())]);
    plain.id = "n9".into();
    refuses_outsider(&cluster, plain, REFUSED).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_another_cookie_is_refused_and_both_sides_say_why() {
    let cluster = Cluster::start(3, NodeOptions::new());
    let mut stranger = NodeOptions::new()
        .set("cluster.cookie", "not-the-cluster-cookie")
        .set("cluster.seeds", vec![toml::Value::from(cluster.node(0).cluster_addr())]);
    stranger.id = "n9".into();
    refuses_outsider(&cluster, stranger, REFUSED).await;
    let refused = wait_until(Duration::from_secs(10), || async {
        metric(cluster.node(0), "convoy_peer_handshakes_refused_total").await >= 1.0
    })
    .await;
    assert!(refused, "n1 counted no refused handshake:\n{}", cluster.node(0).log_tail(30));
    assert!(
        std::fs::read_to_string(cluster.node(0).log_path()).unwrap().contains(REFUSED),
        "n1 says why it refused the outsider:\n{}",
        cluster.node(0).log_tail(30)
    );
    // The cluster never noticed anything else.
    let c = connect(cluster.node(0), &unique("a"), &["dispatcher"]).await;
    open_group(&c, &unique("g"), vec![]).await;
}

/// What a node logs when a node-to-node session ends before it is authenticated.
const REFUSED: &str = "check that every node has the same cluster.cookie and the same TLS settings";

/// Runs a node with `opts` (its seeds name the cluster) and asserts that its log `says` why it
/// cannot join and that the cluster keeps its three members. A node that cannot join never
/// becomes ready, so it runs as a bare process.
async fn refuses_outsider(cluster: &Cluster, opts: NodeOptions, says: &str) {
    let outsider = Node::configure(opts, Ports::free(), cluster.node(0).secret().to_string());
    let log = std::fs::File::create(outsider.log_path()).unwrap();
    let mut process = std::process::Command::new(convoy_tests::node::convoy_bin())
        .args(["start", "--config"])
        .arg(outsider.dir().join("convoy.toml"))
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let refused = wait_until(Duration::from_secs(20), || async {
        std::fs::read_to_string(outsider.log_path()).unwrap_or_default().contains(says)
    })
    .await;
    let _ = process.kill();
    let _ = process.wait();
    assert!(refused, "the outsider says why it cannot join:\n{}", outsider.log_tail(20));
    let status = cluster.status(0).await;
    assert_eq!(status["members"].as_array().map(Vec::len), Some(3), "the outsider did not join: {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_counts_shards_differently_is_refused_and_says_so() {
    let cluster = Cluster::start(3, NodeOptions::new());
    let g = unique("before");
    let c = connect(cluster.node(0), &unique("a"), &["dispatcher"]).await;
    open_group(&c, &g, vec![]).await;

    let mut opts = NodeOptions::new()
        .set("cluster.cookie", cluster.cookie())
        .set("cluster.seeds", vec![toml::Value::from(cluster.node(0).cluster_addr())])
        .set("cluster.shards", 16);
    opts.id = "n4".into();
    refuses_outsider(&cluster, opts, "refused: cluster.shards is 16 on n4 but the cluster was formed with 8").await;
    // The cluster goes on serving what it had.
    c.msg_send(&g, "after", text("still here"), false).await.expect("a send after the odd node left");
}

/// The controller spreads shard leaders once and then leaves them alone: it must not count a
/// shard whose leadership is being handed over as led by nobody, move more leaderships for the
/// same imbalance, and move them back later (a leader a test or an operator just looked up would
/// move away under it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shard_leaders_are_spread_once_and_then_left_alone() {
    let cluster = Cluster::start(3, NodeOptions::new());
    let settled = wait_until(Duration::from_secs(30), || failover_support::leaders_settled(&cluster, 0)).await;
    assert!(settled, "shard leaders did not settle within 30 s: {}", cluster.status(0).await);
    let leaders = |status: serde_json::Value| -> Vec<(String, String)> {
        let groups = status["groups"].as_array().cloned().unwrap_or_default();
        groups.iter().map(|g| (g["group"].to_string(), g["leader"].to_string())).collect()
    };
    let spread = leaders(cluster.status(0).await);
    let transfers = cluster.metric_total("convoy_shard_leader_transfers_total").await;
    // A move is asked for within a controller round (0.3 s) of the imbalance being seen; 5 s
    // covers the controller's 3 s pause after acting on a shard.
    let moved = wait_until(Duration::from_secs(5), || async { leaders(cluster.status(0).await) != spread }).await;
    let transfers_after = cluster.metric_total("convoy_shard_leader_transfers_total").await;
    assert!(
        !moved && transfers_after == transfers,
        "a shard leader moved after the leaders had settled ({transfers} transfers before, {transfers_after} after): \
         {spread:?} then {}",
        cluster.status(0).await
    );
}
