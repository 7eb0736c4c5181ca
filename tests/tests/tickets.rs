//! Tickets over the real protocol: classification with the default rules, the whole case
//! from open to review, skill-queue assignment and the agent grace period, SLA and receipt
//! timers across a leader kill and a full restart, signed webhooks, and authorization.

use std::time::Duration;

use convoy_tests::desk::*;
use convoy_tests::failover_support::serial;
use convoy_tests::*;
use serde_json::{Value, json};

/// Both SLA durations of every priority, for tests that want deadlines in seconds.
fn with_sla(mut opts: NodeOptions, first_response: &str, resolution: &str) -> NodeOptions {
    for p in ["low", "normal", "high", "urgent"] {
        opts = opts
            .set(&format!("tickets.sla.{p}.first_response"), first_response)
            .set(&format!("tickets.sla.{p}.resolution"), resolution);
    }
    opts
}

fn categories(opened: &Value) -> Vec<(String, String, String)> {
    opened["tickets"]
        .as_array()
        .unwrap_or_else(|| panic!("ticket.open without tickets: {opened}"))
        .iter()
        .map(|t| {
            let s = |k: &str| t[k].as_str().unwrap_or_default().to_string();
            (s("category"), s("skill_group"), s("priority"))
        })
        .collect()
}

/// (category, skill group, priority) of one opened ticket.
type Expected = (&'static str, &'static str, &'static str);
/// (subject, vip?, the tickets it must open).
type Case = (&'static str, bool, &'static [Expected]);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_rules_classify_every_category_in_chinese_and_english() {
    let node = Node::start(NodeOptions::new());
    let standard = connect_as(&node, &unique("c"), &["customer"], &[], None).await;
    let vip = connect_as(&node, &unique("v"), &["customer"], &[], Some("vip")).await;
    let table: &[Case] = &[
        ("包裹延误三天了", false, &[("delivery_delay", "delivery", "high")]),
        ("my parcel is late", false, &[("delivery_delay", "delivery", "high")]),
        ("外箱破损，里面的杯子摔坏了", false, &[("damaged_goods", "damage", "high")]),
        ("the box arrived damaged", false, &[("damaged_goods", "damage", "high")]),
        ("快递丢失了", false, &[("lost_goods", "damage", "urgent")]),
        ("one item is missing from my order", false, &[("lost_goods", "damage", "urgent")]),
        ("运费多收费了", false, &[("fee_dispute", "fee", "normal")]),
        ("多收费", false, &[("fee_dispute", "fee", "normal")]),
        ("为什么有超时费", false, &[("fee_dispute", "fee", "normal")]),
        ("I was overcharged", false, &[("fee_dispute", "fee", "normal")]),
        ("我要改地址", false, &[("address_change", "delivery", "normal")]),
        ("please change address to gate 3", false, &[("address_change", "delivery", "normal")]),
        ("客服态度很差", false, &[("service_attitude", "quality", "normal")]),
        ("the courier was rude", false, &[("service_attitude", "quality", "normal")]),
        ("申请退款", false, &[("refund", "fee", "normal")]),
        ("I want a refund", false, &[("refund", "fee", "normal")]),
        ("司机没来取件", false, &[("driver_no_show", "delivery", "high")]),
        ("driver no-show this morning", false, &[("driver_no_show", "delivery", "high")]),
        ("回单拍照看不清", false, &[("receipt_proof", "delivery", "low")]),
        ("need the receipt photo", false, &[("receipt_proof", "delivery", "low")]),
        ("你好", false, &[("other", "general", "normal")]),
        ("hello there", false, &[("other", "general", "normal")]),
        ("my order was delayed", false, &[("delivery_delay", "delivery", "high")]),
        // Latin keywords match whole words; a photo of damage is not a receipt photo.
        ("I'd like to give feedback on the latest app", false, &[("other", "general", "normal")]),
        ("外包装破损，已拍照", false, &[("damaged_goods", "damage", "high")]),
        ("天气恶劣，路上注意安全", false, &[("other", "general", "normal")]),
        // The protocol's example: two categories, two tickets.
        (
            "司机未按约定时间到达且态度恶劣",
            false,
            &[("delivery_delay", "delivery", "high"), ("service_attitude", "quality", "normal")],
        ),
        // Urgency words and the VIP tier each raise one step.
        ("回单拍照 紧急", false, &[("receipt_proof", "delivery", "normal")]),
        ("receipt photo asap", true, &[("receipt_proof", "delivery", "high")]),
        ("运费", true, &[("fee_dispute", "fee", "high")]),
        ("丢件了，马上处理", true, &[("lost_goods", "damage", "urgent")]),
    ];
    for (subject, is_vip, want) in table {
        let client = if *is_vip { &vip } else { &standard };
        let opened = call(client, "ticket.open", json!({ "subject": subject })).await;
        let want: Vec<(String, String, String)> =
            want.iter().map(|(c, s, p)| (c.to_string(), s.to_string(), p.to_string())).collect();
        assert_eq!(categories(&opened), want, "{subject:?} (vip: {is_vip})");
        for t in opened["tickets"].as_array().unwrap() {
            assert_eq!(t["state"], "queued", "{subject}: {t}");
            assert!(t["due_at"].as_u64().is_some(), "{subject}: no due_at in {t}");
        }
    }
    // The description is classified too.
    let opened =
        call(&standard, "ticket.open", json!({ "subject": "工单", "description": "the box is crushed" })).await;
    assert_eq!(categories(&opened), [("damaged_goods".into(), "damage".into(), "high".into())]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_case_from_open_through_rejection_and_escalation_to_a_review_ticket() {
    let node = Node::start(NodeOptions::new());
    whole_case([&node, &node, &node]).await;
}

/// The same case with the customer, the two agents and the quality agent on different nodes
/// of a three-node cluster: the ticket, the skill queues and the linked group live wherever
/// their shards are led.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_case_runs_the_same_across_three_nodes() {
    let _serial = serial().await;
    let cluster = Cluster::start(3, NodeOptions::new());
    whole_case([cluster.node(0), cluster.node(1), cluster.node(2)]).await;
}

/// Customer and dispatcher on `nodes[0]`, the first fee agent on `nodes[1]`, the second and
/// the quality agent on `nodes[2]`.
async fn whole_case(nodes: [&Node; 3]) {
    let [n0, n1, n2] = nodes;
    let (cust, a1, a2, q1, disp) = (unique("c"), unique("a1"), unique("a2"), unique("q1"), unique("d"));
    let customer = connect_as(n0, &cust, &["customer"], &[], None).await;
    let mut customer_events = customer.events().unwrap();
    let dispatcher = connect(n0, &disp, &["dispatcher"]).await;
    let group = unique("exc");
    open_group(&dispatcher, &group, vec![Member::new(&cust, "customer")]).await;

    // Only a1 is connected when the ticket opens: it is assigned to a1.
    let first = agent(n1, &a1, &["fee"]).await;
    let mut first_events = first.events().unwrap();
    let id = unique("t");
    let opened = call(&customer, "ticket.open", json!({ "ticket": id, "subject": "运费多收费", "group": group })).await;
    assert_eq!(categories(&opened), [("fee_dispute".into(), "fee".into(), "normal".into())]);
    let assigned = next_event(&mut first_events, Duration::from_secs(10), |e| {
        e["ev"] == "ticket" && e["ticket"] == id.as_str() && e["state"] == "assigned"
    })
    .await
    .expect("the connected fee agent is assigned the ticket");
    assert_eq!(assigned["assignee"], a1.as_str());
    let notice =
        next_event(&mut customer_events, Duration::from_secs(5), |e| e["ev"] == "ticket" && e["state"] == "assigned")
            .await
            .expect("the customer hears of the assignment");
    assert!(notice["notice"].as_str().unwrap().starts_with("assigned to the fee team, expected within"), "{notice}");

    // a1 replies and proposes; the customer rejects: escalated, priority up, unassigned.
    call(&first, "ticket.reply", json!({ "ticket": id, "text": "checking the invoice" })).await;
    call(&first, "ticket.propose", json!({ "ticket": id, "solution": "refund 5 yuan" })).await;
    let second = agent(n2, &a2, &["fee"]).await;
    let mut second_events = second.events().unwrap();
    let rejected = call(&customer, "ticket.confirm", json!({ "ticket": id, "accepted": false })).await;
    assert_eq!(rejected["state"], "escalated");
    // The queue prefers someone other than the agent whose solution was rejected.
    let reassigned = next_event(&mut second_events, Duration::from_secs(10), |e| {
        e["ev"] == "ticket" && e["ticket"] == id.as_str() && e["state"] == "assigned"
    })
    .await
    .expect("the escalated ticket is reassigned");
    assert_eq!(reassigned["assignee"], a2.as_str());
    assert_eq!(reassigned["priority"], "high");

    call(&second, "ticket.propose", json!({ "ticket": id, "solution": "refund the whole fee" })).await;
    let resolved = call(&customer, "ticket.confirm", json!({ "ticket": id, "accepted": true })).await;
    assert_eq!(resolved["state"], "resolved");
    call(&customer, "ticket.rate", json!({ "ticket": id, "score": 1, "comment": "took too long" })).await;
    call(&second, "ticket.close", json!({ "ticket": id })).await;

    let t = ticket(&customer, &id).await;
    assert_eq!((t["state"].as_str(), t["escalations"].as_u64()), (Some("closed"), Some(1)), "{t}");
    assert_eq!(t["rating"]["score"], 1);
    let review = t["review_ticket"].as_str().expect("a low rating opens a review ticket").to_string();
    assert_eq!(
        actions(&customer, &id).await,
        [
            "opened",
            "assigned",
            "replied",
            "proposed",
            "rejected",
            "escalated",
            "assigned",
            "proposed",
            "confirmed",
            "resolved",
            "rated",
            "closed"
        ]
    );

    // The review ticket appears for the quality team.
    let quality = agent(n2, &q1, &["quality"]).await;
    let found = wait_until(Duration::from_secs(10), || async {
        let list = call(&quality, "ticket.list", json!({})).await;
        list["tickets"].as_array().unwrap().iter().any(|t| t["ticket"] == review.as_str())
    })
    .await;
    assert!(found, "review ticket {review} never listed for the quality group");
    let r = ticket(&quality, &review).await;
    assert_eq!((r["review_of"].as_str(), r["skill_group"].as_str()), (Some(id.as_str()), Some("quality")));

    // The linked group shows the ticket's life as system entries. The ticket's outbox writes
    // them after the ticket's own change commits, so the last one may land a moment later.
    let group_states = || async {
        let entries = sync_all(&dispatcher, &group, 0, 500).await;
        entries
            .iter()
            .filter(|e| e["body"]["event"] == "ticket_changed" || e["body"]["event"] == "ticket_linked")
            .map(|e| e["body"]["state"].as_str().unwrap().to_string())
            .collect::<Vec<String>>()
    };
    wait_until(Duration::from_secs(10), || async { group_states().await.last().map(String::as_str) == Some("closed") })
        .await;
    let states = group_states().await;
    assert_eq!(
        states,
        [
            "queued",
            "assigned",
            "awaiting_confirmation",
            "escalated",
            "assigned",
            "awaiting_confirmation",
            "resolved",
            "closed"
        ]
    );

    // The service desk figures count it, on any node: the fee queue learns of the rating
    // and the close a moment after the ticket.
    let counted = wait_until(Duration::from_secs(10), || async { desk(n1, "fee").await["csat_count"] == 1 }).await;
    let fee = desk(n1, "fee").await;
    assert!(counted, "{fee}");
    assert_eq!((fee["csat_average"].as_f64(), fee["resolved_total"].as_u64()), (Some(1.0), Some(1)), "{fee}");
    assert!(fee["first_response_median_ms"].as_u64().is_some() && fee["resolution_median_ms"].as_u64().is_some());
    assert_eq!(fee["by_state"]["escalated"], 0, "{fee}");
    // Each queue's figures are on the /metrics of the node that leads it.
    let mut distinct = nodes.to_vec();
    distinct.dedup_by_key(|n| n.admin_url().to_string());
    let mut opened = 0.0;
    for node in distinct {
        opened += metric(node, "convoy_desk_tickets_opened_total").await;
    }
    assert!(opened >= 2.0, "the fee ticket and its review: {opened}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_away_past_the_grace_period_has_their_tickets_returned_and_reassigned() {
    let node =
        Node::start(NodeOptions::new().set("tickets.agent_grace", "1s").set("tickets.presence_refresh", "300ms"));
    let (cust, away, stays) = (unique("c"), unique("away"), unique("stays"));
    let customer = connect_as(&node, &cust, &["customer"], &[], None).await;
    let leaving = agent(&node, &away, &["damage"]).await;
    let mut leaving_events = leaving.events().unwrap();
    let id = unique("t");
    call(&customer, "ticket.open", json!({ "ticket": id, "subject": "box damaged" })).await;
    next_event(&mut leaving_events, Duration::from_secs(10), |e| {
        e["ticket"] == id.as_str() && e["state"] == "assigned"
    })
    .await
    .expect("assigned to the only damage agent");
    // A full agent gets nothing more; the second agent joins, then the first leaves.
    let staying = agent(&node, &stays, &["damage"]).await;
    leaving.close().await;
    let mut staying_events = staying.events().unwrap();
    let moved = next_event(&mut staying_events, Duration::from_secs(15), |e| {
        e["ticket"] == id.as_str() && e["state"] == "assigned"
    })
    .await
    .expect("the ticket of the agent who left is reassigned after the grace period");
    assert_eq!(moved["assignee"], stays.as_str());
    let history = actions(&staying, &id).await;
    assert_eq!(history, ["opened", "assigned", "returned", "assigned"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn customers_and_agents_act_only_on_what_is_theirs() {
    let node = Node::start(NodeOptions::new());
    let (c1, c2, fee, damage) = (unique("c1"), unique("c2"), unique("fee"), unique("dmg"));
    let owner = connect_as(&node, &c1, &["customer"], &[], None).await;
    let stranger = connect_as(&node, &c2, &["customer"], &[], None).await;
    let id = unique("t");
    call(&owner, "ticket.open", json!({ "ticket": id, "subject": "运费" })).await;
    let damage_agent = agent(&node, &damage, &["damage"]).await;

    let code = |r| server_code(r, "refused");
    assert_eq!(code(stranger.request("ticket.get", json!({ "ticket": id })).await), "forbidden");
    assert_eq!(code(stranger.request("ticket.get", json!({ "ticket": unique("none") })).await), "forbidden");
    assert_eq!(code(damage_agent.request("ticket.get", json!({ "ticket": id })).await), "forbidden");
    assert_eq!(code(damage_agent.request("ticket.claim", json!({ "ticket": id })).await), "forbidden");
    assert_eq!(code(damage_agent.request("ticket.reply", json!({ "ticket": id, "text": "hi" })).await), "forbidden");
    assert_eq!(code(owner.request("ticket.claim", json!({ "ticket": id })).await), "forbidden");
    assert_eq!(code(owner.request("ticket.propose", json!({ "ticket": id, "solution": "x" })).await), "forbidden");
    assert_eq!(code(damage_agent.request("ticket.list", json!({ "skill_group": "fee" })).await), "forbidden");
    let others = call(&stranger, "ticket.list", json!({})).await;
    assert_eq!(others["tickets"], json!([]), "a customer lists only their own tickets");

    // Illegal transitions say which state the ticket is in.
    let (code_, message, _) =
        server_error(owner.request("ticket.confirm", json!({ "ticket": id, "accepted": true })).await, "confirm");
    assert_eq!(code_, "conflict");
    assert!(message.contains("queued"), "{message}");
    // The fee agent connects and the queue assigns the ticket to them.
    let fee_agent = agent(&node, &fee, &["fee"]).await;
    assert!(wait_until(Duration::from_secs(10), || async { ticket(&owner, &id).await["state"] == "assigned" }).await);
    let (code_, message, _) =
        server_error(fee_agent.request("ticket.claim", json!({ "ticket": id })).await, "claim twice");
    assert_eq!((code_.as_str(), message.contains("assigned")), ("conflict", true), "{message}");
    // Bad arguments are bad requests.
    for (op, args) in [
        ("ticket.open", json!({})),
        ("ticket.open", json!({ "subject": "" })),
        ("ticket.rate", json!({ "ticket": id, "score": 9 })),
        ("ticket.list", json!({ "state": "lost" })),
        ("ticket.confirm", json!({ "ticket": id, "accepted": "yes" })),
    ] {
        assert_eq!(code(owner.request(op, args.clone()).await), "bad_request", "{op} {args}");
    }
    // The owner reads it, the fee agent lists it, reopening with the same id is idempotent.
    assert_eq!(ticket(&owner, &id).await["assignee"], fee.as_str());
    // The queue behind an agent's list learns of the assignment a moment after the ticket.
    let listed = wait_until(Duration::from_secs(10), || async {
        let listed = call(&fee_agent, "ticket.list", json!({ "assignee": fee })).await;
        listed["tickets"].as_array().unwrap().iter().any(|t| t["ticket"] == id.as_str())
    })
    .await;
    assert!(listed, "the fee agent's list never showed {id}");
    let again = call(&owner, "ticket.open", json!({ "ticket": id, "subject": "运费" })).await;
    assert_eq!(again["tickets"][0]["state"], "assigned");
    assert_eq!(code(stranger.request("ticket.open", json!({ "ticket": id, "subject": "运费" })).await), "conflict");
}

/// The `sla_breached` history lines of a ticket.
async fn breaches(client: &Client, id: &str) -> usize {
    actions(client, id).await.iter().filter(|a| *a == "sla_breached").count()
}

async fn overdue_entries(client: &Client, group: &str) -> usize {
    sync_all(client, group, 0, 500).await.iter().filter(|e| e["body"]["event"] == "receipt_overdue").count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sla_and_receipt_timers_fire_once_across_a_full_restart_and_call_the_webhook() {
    let hooks = WebhookReceiver::start().await;
    let secret = "webhook-signing-secret-0123456789";
    let opts = with_sla(NodeOptions::new(), "2s", "60s")
        .set("timeouts.receipt_timeout", "2s")
        .set("webhooks.url", hooks.url.as_str())
        .set("webhooks.secret", secret);
    let mut node = Node::start(opts);
    let (cust, disp) = (unique("c"), unique("d"));
    let id = unique("t");
    let group = unique("g");
    {
        let customer = connect_as(&node, &cust, &["customer"], &[], None).await;
        let dispatcher = connect(&node, &disp, &["dispatcher"]).await;
        open_group(&dispatcher, &group, vec![Member::new(&cust, "customer")]).await;
        dispatcher.msg_send(&group, "rr", text("confirm the address"), true).await.unwrap();
        call(&customer, "ticket.open", json!({ "ticket": id, "subject": "运费" })).await;
    }
    // Both deadlines are 2 s away: the node dies before either, and comes back.
    node.kill9();
    node.restart();
    let customer = connect_as(&node, &cust, &["customer"], &[], None).await;
    let dispatcher = connect(&node, &disp, &["dispatcher"]).await;
    assert!(wait_until(Duration::from_secs(15), || async { breaches(&customer, &id).await >= 1 }).await, "no breach");
    assert!(wait_until(Duration::from_secs(15), || async { overdue_entries(&dispatcher, &group).await >= 1 }).await);
    // Nothing fires twice: give any second firing time to show up.
    let got_hooks = wait_until(Duration::from_secs(10), || async {
        let h = hooks.received().await;
        h.iter().any(|h| h.event == "ticket.sla_breached") && h.iter().any(|h| h.event == "group.receipt_overdue")
    })
    .await;
    assert!(got_hooks, "webhooks: {:?}", hooks.received().await);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(breaches(&customer, &id).await, 1);
    assert_eq!(overdue_entries(&dispatcher, &group).await, 1);
    let t = ticket(&customer, &id).await;
    assert_eq!(
        (t["breaches"].as_u64(), t["state"].as_str(), t["priority"].as_str()),
        (Some(1), Some("escalated"), Some("high"))
    );

    let received = hooks.received().await;
    for h in &received {
        assert!(h.signed_with(secret), "bad signature on {h:?}");
        assert_eq!(h.json()["idempotency_key"], h.idempotency_key.as_str());
    }
    let breach_keys: std::collections::BTreeSet<&str> =
        received.iter().filter(|h| h.event == "ticket.sla_breached").map(|h| h.idempotency_key.as_str()).collect();
    assert_eq!(breach_keys.len(), 1, "one breach, one idempotency key: {breach_keys:?}");
    let overdue = received.iter().find(|h| h.event == "group.receipt_overdue").unwrap().json();
    assert_eq!(overdue["pending"], json!([cust]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_webhook_receiver_is_retried_and_never_blocks_the_ticket() {
    let hooks = WebhookReceiver::start().await;
    hooks.status.store(503, std::sync::atomic::Ordering::SeqCst);
    let secret = "webhook-signing-secret-0123456789";
    let node = Node::start(NodeOptions::new().set("webhooks.url", hooks.url.as_str()).set("webhooks.secret", secret));
    let customer = connect_as(&node, &unique("c"), &["customer"], &[], None).await;
    let fee = agent(&node, &unique("a"), &["fee"]).await;
    let id = unique("t");
    call(&customer, "ticket.open", json!({ "ticket": id, "subject": "运费" })).await;
    // The ticket keeps working while every delivery fails.
    assert!(wait_until(Duration::from_secs(10), || async { ticket(&fee, &id).await["state"] == "assigned" }).await);
    call(&fee, "ticket.propose", json!({ "ticket": id, "solution": "refund" })).await;
    assert!(metric(&node, "convoy_webhooks_total").await >= 1.0);
    // The receiver comes back: the retries deliver every change, each key once or more.
    hooks.status.store(200, std::sync::atomic::Ordering::SeqCst);
    let delivered = wait_until(Duration::from_secs(20), || async {
        let keys: std::collections::BTreeSet<String> = hooks
            .received()
            .await
            .into_iter()
            .filter(|h| h.event == "ticket.changed")
            .map(|h| h.idempotency_key)
            .collect();
        keys.len() >= 3
    })
    .await;
    assert!(delivered, "got {:?}", hooks.received().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sla_and_receipt_timers_fire_once_across_a_leader_kill() {
    let _serial = serial().await;
    let opts = with_sla(NodeOptions::new(), "3s", "60s").set("timeouts.receipt_timeout", "3s");
    let mut cluster = Cluster::start(3, opts);
    let (cust, disp) = (unique("c"), unique("d"));
    let id = unique("t");
    let leader = |kind: &'static str, id: String| {
        let cluster = &cluster;
        async move { cluster.wait_for_leader(0, kind, &id, None, Duration::from_secs(20)).await.expect("a leader") }
    };
    let ticket_leader = leader("ticket", id.clone()).await;
    // A group led by the same node, so one kill moves both timers to a new leader.
    let mut group = unique("g");
    while leader("group", group.clone()).await != ticket_leader {
        group = unique("g");
    }
    // Clients on another node, so they survive the kill.
    let via = (ticket_leader + 1) % 3;
    let customer = connect_as(cluster.node(via), &cust, &["customer"], &[], None).await;
    let dispatcher = connect(cluster.node(via), &disp, &["dispatcher"]).await;
    open_group(&dispatcher, &group, vec![Member::new(&cust, "customer")]).await;
    dispatcher.msg_send(&group, "rr", text("confirm the address"), true).await.unwrap();
    call(&customer, "ticket.open", json!({ "ticket": id, "subject": "运费" })).await;
    // Kill the leader of both before their deadlines.
    cluster.node_mut(ticket_leader).kill9();
    assert!(
        wait_until(Duration::from_secs(20), || async {
            customer
                .request("ticket.get", json!({ "ticket": id }))
                .await
                .is_ok_and(|t| t["history"].as_array().unwrap().iter().any(|h| h["event"]["action"] == "sla_breached"))
        })
        .await
    );
    assert!(
        wait_until(Duration::from_secs(20), || async {
            dispatcher
                .msg_sync(&group, 0, 500)
                .await
                .is_ok_and(|p| p.messages.iter().any(|e| e["body"]["event"] == "receipt_overdue"))
        })
        .await
    );
    cluster.node_mut(ticket_leader).restart();
    // The restarted node catches up; give a second firing every chance to appear.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(breaches(&customer, &id).await, 1);
    assert_eq!(overdue_entries(&dispatcher, &group).await, 1);
}

/// The ids of the next `n` tickets `events` says were assigned to `agent`, in the order told
/// (fewer if they do not come within 10 s each).
async fn assigned_to(events: &mut tokio::sync::mpsc::Receiver<Value>, agent: &str, n: usize) -> Vec<String> {
    let mut got = Vec::new();
    while got.len() < n {
        let Some(e) = next_event(events, Duration::from_secs(10), |e| {
            e["ev"] == "ticket" && e["state"] == "assigned" && e["assignee"] == agent
        })
        .await
        else {
            break;
        };
        got.push(e["ticket"].as_str().unwrap().to_string());
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_assigns_by_priority_then_age_within_each_agents_capacity_to_the_least_loaded() {
    let node = Node::start(NodeOptions::new());
    let (cust, other) = (unique("c"), unique("c2"));
    let customer = connect_as(&node, &cust, &["customer"], &[], None).await;
    // Four delivery tickets wait before any delivery agent is connected, oldest first.
    let mut ids = std::collections::BTreeMap::new();
    for (name, subject, priority) in [
        ("low", "回单", "low"),
        ("normal", "改地址", "normal"),
        ("high1", "包裹延误", "high"),
        ("high2", "司机没来", "high"),
    ] {
        let id = unique(name);
        let opened = call(&customer, "ticket.open", json!({ "ticket": id, "subject": subject })).await;
        assert_eq!(opened["tickets"][0]["priority"], priority, "{opened}");
        ids.insert(name, id);
    }
    // The queue learns of each ticket a moment after it opens.
    assert!(wait_until(Duration::from_secs(10), || async { desk(&node, "delivery").await["waiting"] == 4 }).await);
    assert_eq!(desk(&node, "delivery").await["by_state"]["queued"], 4);
    assert_eq!(desk_gauge(&node, "convoy_desk_queue_length", "delivery", None).await, Some(4.0));
    assert_eq!(desk_gauge(&node, "convoy_desk_tickets", "delivery", Some("queued")).await, Some(4.0));

    // An agent with room for one gets the most urgent, oldest ticket and nothing more.
    let (d1, d2, d3, d4) = (unique("d1"), unique("d2"), unique("d3"), unique("d4"));
    let first = agent_with_capacity(&node, &d1, &["delivery"], 1).await;
    let mut first_events = first.events().unwrap();
    assert_eq!(assigned_to(&mut first_events, &d1, 1).await, [ids["high1"].as_str()]);
    // One with room for two gets the next two (offered together, so told in either order);
    // the low one keeps waiting.
    let second = agent_with_capacity(&node, &d2, &["delivery"], 2).await;
    let mut second_events = second.events().unwrap();
    let mut got = assigned_to(&mut second_events, &d2, 2).await;
    got.sort();
    let mut want = [ids["high2"].as_str(), ids["normal"].as_str()];
    want.sort();
    assert_eq!(got, want);
    assert_eq!(ticket(&customer, &ids["low"]).await["state"], "queued");
    assert!(
        wait_until(Duration::from_secs(10), || async { desk(&node, "delivery").await["waiting"] == 1 }).await,
        "{}",
        desk(&node, "delivery").await
    );
    assert!(desk(&node, "delivery").await["oldest_waiting_ms"].as_u64().unwrap() > 0);
    // Claiming is not bound by capacity: the full agent takes the low one.
    let claimed = call(&first, "ticket.claim", json!({ "ticket": ids["low"] })).await;
    assert_eq!((claimed["state"].as_str(), claimed["changed"].as_bool()), (Some("assigned"), Some(true)));
    let t = ticket(&customer, &ids["low"]).await;
    assert_eq!(t["assignee"], d1.as_str());
    assert_eq!(actions(&customer, &ids["low"]).await, ["opened", "assigned"]);

    // With two agents that have room, the one holding fewer tickets gets the next.
    let third = agent(&node, &d3, &["delivery"]).await;
    let mut third_events = third.events().unwrap();
    let next = unique("high3");
    call(&customer, "ticket.open", json!({ "ticket": next, "subject": "延误" })).await;
    assert_eq!(assigned_to(&mut third_events, &d3, 1).await, [next.as_str()]);
    let fourth = agent(&node, &d4, &["delivery"]).await;
    let mut fourth_events = fourth.events().unwrap();
    let last = unique("high4");
    call(&customer, "ticket.open", json!({ "ticket": last, "subject": "延误" })).await;
    assert_eq!(assigned_to(&mut fourth_events, &d4, 1).await, [last.as_str()], "d3 holds one, d4 none");

    // Lists: the customer sees their six, another customer none, an admin every group's.
    let someone = connect_as(&node, &other, &["customer"], &[], None).await;
    let theirs = call(&someone, "ticket.open", json!({ "subject": "运费" })).await["tickets"][0]["ticket"].clone();
    let mine = call(&customer, "ticket.list", json!({})).await;
    let mine: Vec<&str> = mine["tickets"].as_array().unwrap().iter().map(|t| t["ticket"].as_str().unwrap()).collect();
    assert_eq!(mine.len(), 6, "{mine:?}");
    assert!(!mine.contains(&theirs.as_str().unwrap()));
    let admin = connect_as(&node, &unique("adm"), &["admin"], &[], None).await;
    let everything = wait_until(Duration::from_secs(10), || async {
        let all = call(&admin, "ticket.list", json!({})).await;
        let all: Vec<Value> = all["tickets"].as_array().unwrap().iter().map(|t| t["ticket"].clone()).collect();
        all.len() == 7 && all.contains(&theirs)
    })
    .await;
    assert!(everything, "{}", call(&admin, "ticket.list", json!({})).await);
    let waiting_fee = call(&admin, "ticket.list", json!({ "skill_group": "fee", "state": "queued" })).await;
    assert_eq!(waiting_fee["tickets"].as_array().unwrap().len(), 1, "{waiting_fee}");
    // The desk counts what happened.
    let figures = desk(&node, "delivery").await;
    assert_eq!(
        (figures["by_state"]["assigned"].as_u64(), figures["waiting"].as_u64(), figures["agents_connected"].as_u64()),
        (Some(6), Some(0), Some(4)),
        "{figures}"
    );
    assert_eq!(desk_gauge(&node, "convoy_desk_agents_connected", "delivery", None).await, Some(4.0));
    assert_eq!(desk_gauge(&node, "convoy_desk_tickets", "delivery", Some("assigned")).await, Some(6.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_escalates_a_ticket_to_another_agent_and_a_rating_after_the_close_counts() {
    let node = Node::start(NodeOptions::new());
    let (cust, a1, a2) = (unique("c"), unique("a1"), unique("a2"));
    let customer = connect_as(&node, &cust, &["customer"], &[], None).await;
    let mut customer_events = customer.events().unwrap();
    let first = agent(&node, &a1, &["fee"]).await;
    let mut first_events = first.events().unwrap();
    let id = unique("t");
    call(&customer, "ticket.open", json!({ "ticket": id, "subject": "运费" })).await;
    assert_eq!(assigned_to(&mut first_events, &a1, 1).await, [id.as_str()]);
    call(&first, "ticket.reply", json!({ "ticket": id, "text": "looking into it" })).await;
    // Escalating needs a reason, and only staff of the group may do it.
    assert_eq!(
        server_code(first.request("ticket.escalate", json!({ "ticket": id })).await, "no reason"),
        "bad_request"
    );
    assert_eq!(
        server_code(customer.request("ticket.escalate", json!({ "ticket": id, "reason": "x" })).await, "customer"),
        "forbidden"
    );
    let second = agent(&node, &a2, &["fee"]).await;
    let mut second_events = second.events().unwrap();
    let escalated = call(&first, "ticket.escalate", json!({ "ticket": id, "reason": "needs a supervisor" })).await;
    assert_eq!(escalated["state"], "escalated");
    let told =
        next_event(&mut customer_events, Duration::from_secs(10), |e| e["ev"] == "ticket" && e["state"] == "escalated")
            .await
            .expect("the customer hears of the escalation");
    assert_eq!(told["priority"], "high");
    assert!(told["notice"].as_str().unwrap().contains("escalated to high priority"), "{told}");
    // The queue gives it to the other agent, at the raised priority.
    assert_eq!(assigned_to(&mut second_events, &a2, 1).await, [id.as_str()]);
    let t = call(&customer, "ticket.get", json!({ "ticket": id })).await;
    let escalation = t["history"].as_array().unwrap().iter().find(|h| h["event"]["action"] == "escalated").unwrap();
    assert_eq!(
        (escalation["event"]["reason"].as_str(), escalation["by"].as_str()),
        (Some("needs a supervisor"), Some(a1.as_str()))
    );
    assert_eq!((t["ticket"]["priority"].as_str(), t["ticket"]["escalations"].as_u64()), (Some("high"), Some(1)));
    // The new assignee resolves and closes it; the customer rates it afterwards.
    call(&second, "ticket.propose", json!({ "ticket": id, "solution": "refunded" })).await;
    call(&customer, "ticket.confirm", json!({ "ticket": id, "accepted": true })).await;
    call(&second, "ticket.close", json!({ "ticket": id })).await;
    let (code, message, _) =
        server_error(first.request("ticket.escalate", json!({ "ticket": id, "reason": "again" })).await, "closed");
    assert_eq!(code, "conflict");
    assert!(message.contains("closed"), "{message}");
    call(&customer, "ticket.rate", json!({ "ticket": id, "score": 4 })).await;
    let (code, message, _) =
        server_error(customer.request("ticket.rate", json!({ "ticket": id, "score": 5 })).await, "twice");
    assert_eq!(code, "conflict");
    assert!(message.contains("closed"), "{message}");
    let rated = wait_until(Duration::from_secs(10), || async { desk(&node, "fee").await["csat_count"] == 1 }).await;
    let fee = desk(&node, "fee").await;
    assert!(rated, "a rating after the close never reached the desk: {fee}");
    assert_eq!(fee["csat_average"].as_f64(), Some(4.0), "{fee}");
    assert_eq!(desk_gauge(&node, "convoy_desk_csat_average", "fee", None).await, Some(4.0));
    assert_eq!(desk_gauge(&node, "convoy_desk_csat_ratings_total", "fee", None).await, Some(1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlines_follow_the_tickets_priority_and_a_missed_resolution_is_a_breach() {
    // Urgent tickets: both deadlines in 5 s; low ones in a minute.
    let node = Node::start(
        with_sla(NodeOptions::new(), "60s", "60s")
            .set("tickets.sla.urgent.first_response", "5s")
            .set("tickets.sla.urgent.resolution", "5s"),
    );
    let customer = connect_as(&node, &unique("c"), &["customer"], &[], None).await;
    let damage = agent(&node, &unique("a"), &["damage"]).await;
    let (lost, receipt) = (unique("lost"), unique("pod"));
    let opened = call(&customer, "ticket.open", json!({ "ticket": lost, "subject": "快递丢失了" })).await;
    assert_eq!(opened["tickets"][0]["priority"], "urgent");
    let low = call(&customer, "ticket.open", json!({ "ticket": receipt, "subject": "回单" })).await;
    assert_eq!(low["tickets"][0]["priority"], "low");
    let (urgent_due, low_due) =
        (opened["tickets"][0]["due_at"].as_u64().unwrap(), low["tickets"][0]["due_at"].as_u64().unwrap());
    assert!(low_due >= urgent_due + 50_000, "resolution due: urgent {urgent_due}, low {low_due}");
    // The agent answers the urgent one in time; its resolution deadline still passes.
    assert!(
        wait_until(Duration::from_secs(10), || async { ticket(&customer, &lost).await["state"] == "assigned" }).await
    );
    call(&damage, "ticket.reply", json!({ "ticket": lost, "text": "searching the hub" })).await;
    assert!(wait_until(Duration::from_secs(15), || async { breaches(&customer, &lost).await == 1 }).await);
    let got = call(&customer, "ticket.get", json!({ "ticket": lost })).await;
    let breach = got["history"].as_array().unwrap().iter().find(|h| h["event"]["action"] == "sla_breached").unwrap();
    assert_eq!(breach["event"]["deadline"], "resolution");
    assert!(breach["at"].as_u64().unwrap() >= urgent_due, "fired before its deadline: {breach}");
    // Escalated, and (the only damage agent having room) assigned to them again.
    assert_eq!((got["ticket"]["escalations"].as_u64(), got["ticket"]["breaches"].as_u64()), (Some(1), Some(1)));
    let after: Vec<&str> =
        got["history"].as_array().unwrap().iter().map(|h| h["event"]["action"].as_str().unwrap()).collect();
    let breached = after.iter().position(|a| *a == "sla_breached").unwrap();
    assert_eq!(after.get(breached + 1), Some(&"escalated"), "{after:?}");
    assert!(
        wait_until(Duration::from_secs(10), || async { desk(&node, "damage").await["sla_breaches_total"] == 1 }).await
    );
    assert_eq!(desk_gauge(&node, "convoy_desk_sla_breaches_total", "damage", None).await, Some(1.0));
    // The low ticket, opened at the same moment, has not breached anything.
    assert_eq!(breaches(&customer, &receipt).await, 0);
    assert_eq!(ticket(&customer, &receipt).await["state"], "queued");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_webhook_receiver_gets_one_attempt_at_a_time_with_backoff_and_the_ticket_goes_on() {
    let hooks = WebhookReceiver::start().await;
    hooks.hang.store(true, std::sync::atomic::Ordering::SeqCst);
    // A timeout longer than the timers' re-fire interval (2 s).
    let node = Node::start(
        NodeOptions::new()
            .set("webhooks.url", hooks.url.as_str())
            .set("webhooks.secret", "webhook-signing-secret-0123456789")
            .set("webhooks.timeout", "3s"),
    );
    let customer = connect_as(&node, &unique("c"), &["customer"], &[], None).await;
    let id = unique("t");
    call(&customer, "ticket.open", json!({ "ticket": id, "subject": "运费" })).await;
    let key = format!("ticket/{id}/rev/1");
    let of_key = |attempts: Vec<Attempt>| -> Vec<Attempt> {
        let mut a: Vec<Attempt> = attempts.into_iter().filter(|a| a.idempotency_key == key).collect();
        a.sort_by_key(|a| a.arrived);
        a
    };
    // The entity is not held up meanwhile.
    call(&customer, "ticket.reply", json!({ "ticket": id, "text": "any news?" })).await;
    assert!(
        wait_until(Duration::from_secs(40), || async { of_key(hooks.attempts.lock().await.clone()).len() >= 3 }).await
    );
    let attempts = of_key(hooks.attempts.lock().await.clone());
    for pair in attempts.windows(2) {
        // The next attempt starts after the last one ended and its backoff (1 s, then 2 s) passed.
        let gap = pair[1].arrived.saturating_duration_since(pair[0].ended);
        assert!(
            pair[1].arrived >= pair[0].ended && gap >= Duration::from_millis(800),
            "attempts overlap or come early: {:?}",
            attempts.iter().map(|a| (a.arrived, a.ended)).collect::<Vec<_>>()
        );
    }
    // The receiver recovers: the event is delivered.
    hooks.hang.store(false, std::sync::atomic::Ordering::SeqCst);
    let delivered = wait_until(Duration::from_secs(30), || async {
        hooks.received().await.iter().any(|h| h.idempotency_key == key)
    })
    .await;
    assert!(delivered, "never delivered after the receiver recovered");
}
