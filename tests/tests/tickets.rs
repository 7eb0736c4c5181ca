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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_case_from_open_through_rejection_and_escalation_to_a_review_ticket() {
    let node = Node::start(NodeOptions::new());
    let (cust, a1, a2, q1, disp) = (unique("c"), unique("a1"), unique("a2"), unique("q1"), unique("d"));
    let customer = connect_as(&node, &cust, &["customer"], &[], None).await;
    let mut customer_events = customer.events().unwrap();
    let dispatcher = connect(&node, &disp, &["dispatcher"]).await;
    let group = unique("exc");
    open_group(&dispatcher, &group, vec![Member::new(&cust, "customer")]).await;

    // Only a1 is connected when the ticket opens: it is assigned to a1.
    let first = agent(&node, &a1, &["fee"]).await;
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
    let second = agent(&node, &a2, &["fee"]).await;
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
    let quality = agent(&node, &q1, &["quality"]).await;
    let found = wait_until(Duration::from_secs(10), || async {
        let list = call(&quality, "ticket.list", json!({})).await;
        list["tickets"].as_array().unwrap().iter().any(|t| t["ticket"] == review.as_str())
    })
    .await;
    assert!(found, "review ticket {review} never listed for the quality group");
    let r = ticket(&quality, &review).await;
    assert_eq!((r["review_of"].as_str(), r["skill_group"].as_str()), (Some(id.as_str()), Some("quality")));

    // The linked group shows the ticket's life as system entries.
    let entries = sync_all(&dispatcher, &group, 0, 500).await;
    let states: Vec<&str> = entries
        .iter()
        .filter(|e| e["body"]["event"] == "ticket_changed" || e["body"]["event"] == "ticket_linked")
        .map(|e| e["body"]["state"].as_str().unwrap())
        .collect();
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

    // The service desk figures count it.
    let desk = admin_get(&node, "/v1/desk").await.unwrap();
    let fee = desk["skill_groups"].as_array().unwrap().iter().find(|g| g["skill_group"] == "fee").unwrap().clone();
    assert!(fee["csat_count"].as_u64().unwrap() >= 1, "{fee}");
    assert!(fee["resolution_median_ms"].as_u64().is_some(), "{fee}");
    assert!(metric(&node, "convoy_desk_tickets_opened_total").await >= 1.0);
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
