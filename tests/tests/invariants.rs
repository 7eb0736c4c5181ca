//! The invariants of DESIGN.md that hold on one node: gapless seqs, idempotent sends,
//! linearizable catch-up reads, monotonic read positions, authorization, closed groups.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use convoy_tests::*;
use futures::future::join_all;
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seqs_are_contiguous_under_concurrent_senders() {
    const SENDERS: usize = 8;
    const PER_SENDER: usize = 40;
    const IN_FLIGHT: usize = 4;
    let node = Node::start(NodeOptions::new());
    let users: Vec<String> = (0..SENDERS).map(|i| unique(&format!("s{i}"))).collect();
    let owner = connect(&node, &users[0], &["dispatcher"]).await;
    let g = unique("busy");
    open_group(&owner, &g, users[1..].iter().map(|u| Member::new(u, "driver")).collect()).await;
    let base = owner.group_info(&g).await.unwrap().last_seq;

    // A member that sends nothing watches the pushes.
    let watcher = connect_device(&node, &users[1], &["driver"], "watcher").await;
    let mut events = watcher.events().expect("events");

    let mut tasks = Vec::new();
    for user in users.clone() {
        let client = connect(&node, &user, &["driver"]).await;
        let g = g.clone();
        tasks.push(tokio::spawn(async move {
            let mut acks = Vec::new();
            for chunk in (0..PER_SENDER).collect::<Vec<_>>().chunks(IN_FLIGHT) {
                let sends = chunk.iter().map(|i| {
                    let cmid = format!("{user}-{i}");
                    let client = client.clone();
                    let g = g.clone();
                    async move {
                        let sent = client.msg_send(&g, &cmid, text(&cmid), false).await;
                        (cmid, sent.unwrap_or_else(|e| panic!("msg.send: {e}")))
                    }
                });
                for (cmid, sent) in join_all(sends).await {
                    assert!(!sent.duplicate, "{cmid} was sent once but acked as a duplicate");
                    acks.push((user.clone(), cmid, sent.seq));
                }
            }
            acks
        }));
    }
    let mut acks = Vec::new();
    for task in tasks {
        acks.extend(task.await.expect("sender task"));
    }
    let total = (SENDERS * PER_SENDER) as u64;
    assert_eq!(acks.len() as u64, total);

    // The acks' seqs are exactly base+1 ..= base+total.
    let by_seq: BTreeMap<u64, (String, String)> =
        acks.iter().map(|(user, cmid, seq)| (*seq, (user.clone(), cmid.clone()))).collect();
    assert_eq!(by_seq.len() as u64, total, "two acks share a seq");
    assert_eq!(by_seq.keys().copied().collect::<Vec<_>>(), (base + 1..=base + total).collect::<Vec<_>>());

    // msg.sync returns exactly those entries, each at its acked seq, from a reader that sent nothing.
    let reader = connect(&node, &users[SENDERS - 1], &["driver"]).await;
    let entries = sync_all(&reader, &g, 0, 100).await;
    let seqs: Vec<u64> = entries.iter().map(seq_of).collect();
    assert_eq!(seqs, (1..=base + total).collect::<Vec<_>>(), "the log has gaps or extra entries");
    for entry in entries.iter().filter(|e| seq_of(e) > base) {
        let (user, cmid) = &by_seq[&seq_of(entry)];
        assert_eq!(entry["client_msg_id"], cmid.as_str(), "entry {entry}");
        assert_eq!(entry["from"], user.as_str(), "entry {entry}");
        assert_eq!(entry["body"], text(cmid), "entry {entry}");
    }
    assert_eq!(reader.group_info(&g).await.unwrap().last_seq, base + total);

    // Pushes arrive in seq order, each entry once (nothing here overloads the node).
    let mut pushed = Vec::new();
    while pushed.last() != Some(&(base + total)) {
        let ev = next_event(&mut events, Duration::from_secs(5), |ev| ev["ev"] == "msg" && ev["group"] == g.as_str())
            .await
            .unwrap_or_else(|| panic!("pushes stopped after {} of {total} entries", pushed.len()));
        pushed.push(seq_of(&ev));
    }
    let sent_pushes: Vec<u64> = pushed.into_iter().filter(|s| *s > base).collect();
    assert!(sent_pushes.windows(2).all(|w| w[0] < w[1]), "pushes out of seq order: {sent_pushes:?}");
    assert_eq!(sent_pushes, (base + 1..=base + total).collect::<Vec<_>>(), "pushes missing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_are_idempotent_across_retries_reconnects_and_crashes() {
    let mut node = Node::start(NodeOptions::new());
    let (a, b) = (unique("a"), unique("b"));
    let g = unique("idem");
    let ac = connect(&node, &a, &["driver"]).await;
    open_group(&ac, &g, drivers(&[&b])).await;

    let first = ac.msg_send(&g, "retry-1", text("original"), false).await.unwrap();
    assert!(!first.duplicate);
    let last = ac.group_info(&g).await.unwrap().last_seq;
    assert_eq!(last, first.seq);

    // Same connection, same id, even with another body: the original seq, nothing appended.
    for body in [text("original"), text("changed on retry")] {
        let again = ac.msg_send(&g, "retry-1", body, false).await.unwrap();
        assert_eq!((again.seq, again.duplicate), (first.seq, true));
    }
    // Concurrent duplicates on one connection: one append, all answers agree.
    let burst = join_all((0..6).map(|_| ac.msg_send(&g, "retry-2", text("burst"), false))).await;
    let burst: Vec<_> = burst.into_iter().map(|r| r.expect("msg.send")).collect();
    let seq2 = burst[0].seq;
    assert!(burst.iter().all(|s| s.seq == seq2), "{burst:?}");
    assert_eq!(burst.iter().filter(|s| !s.duplicate).count(), 1, "exactly one send appends: {burst:?}");
    assert_eq!(seq2, last + 1);

    // The key is (group, sender, client_msg_id): another sender's same id is another message.
    let bc = connect(&node, &b, &["driver"]).await;
    let other = bc.msg_send(&g, "retry-1", text("b's own"), false).await.unwrap();
    assert_eq!((other.seq, other.duplicate), (seq2 + 1, false));
    // Any 1..64 characters make a client_msg_id.
    let odd = "{id/with spaces, 外包装破损}";
    let odd_first = bc.msg_send(&g, odd, text("odd id"), false).await.expect("a send with an unusual client_msg_id");
    let odd_again = bc.msg_send(&g, odd, text("odd id"), false).await.unwrap();
    assert_eq!((odd_again.seq, odd_again.duplicate), (odd_first.seq, true));

    // After the connection is dropped and re-established.
    drop(ac);
    let ac = connect(&node, &a, &["driver"]).await;
    let again = ac.msg_send(&g, "retry-1", text("original"), false).await.unwrap();
    assert_eq!((again.seq, again.duplicate), (first.seq, true));

    // After a kill -9 and restart: the dedupe table is durable state.
    let acked = "acked-before-crash";
    let before_crash = ac.msg_send(&g, acked, text("acked"), false).await.unwrap();
    drop((ac, bc));
    node.kill9();
    node.restart();
    let ac = connect(&node, &a, &["driver"]).await;
    for (cmid, seq) in [("retry-1", first.seq), ("retry-2", seq2), (acked, before_crash.seq)] {
        let again = ac.msg_send(&g, cmid, text("original"), false).await.unwrap();
        assert_eq!((again.seq, again.duplicate), (seq, true), "{cmid} after kill -9");
    }
    let bc = connect(&node, &b, &["driver"]).await;
    let again = bc.msg_send(&g, "retry-1", text("b's own"), false).await.unwrap();
    assert_eq!((again.seq, again.duplicate), (other.seq, true));

    // Nothing was appended by any retry.
    let entries = sync_all(&ac, &g, 0, 500).await;
    assert_eq!(entries.iter().map(seq_of).collect::<Vec<_>>(), (1..=before_crash.seq).collect::<Vec<_>>());
    let mut keys = BTreeSet::new();
    for e in &entries {
        if let Some(cmid) = e["client_msg_id"].as_str() {
            assert!(keys.insert((e["from"].to_string(), cmid.to_string())), "duplicate entry {e}");
        }
    }
    assert_eq!(entries.iter().find(|e| seq_of(e) == first.seq).unwrap()["body"], text("original"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_after_ack_sees_the_acked_seq() {
    let node = Node::start(NodeOptions::new());
    let (a, b) = (unique("a"), unique("b"));
    let g = unique("lin");
    let ac = connect(&node, &a, &["driver"]).await;
    let bc = connect(&node, &b, &["customer"]).await;
    open_group(&ac, &g, vec![Member::new(&b, "customer")]).await;
    for i in 0..100 {
        let cmid = format!("lin-{i}");
        let sent = ac.msg_send(&g, &cmid, text(&cmid), false).await.unwrap();
        // Straight after the ack, from another user's connection.
        let page = bc.msg_sync(&g, sent.seq - 1, 1).await.unwrap();
        assert_eq!(page.messages.len(), 1, "msg.sync after ack of seq {} returned {:?}", sent.seq, page);
        assert_eq!(seq_of(&page.messages[0]), sent.seq);
        assert_eq!(page.messages[0]["client_msg_id"], cmid.as_str());
        assert!(page.last_seq >= sent.seq);
        if i % 10 == 0 {
            assert!(bc.group_info(&g).await.unwrap().last_seq >= sent.seq);
            let item = bc.inbox_sync().await.unwrap().into_iter().find(|i| i.group == g).expect("group in inbox");
            assert!(item.last_seq >= sent.seq, "inbox.sync after ack of {}: {item:?}", sent.seq);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_positions_never_move_back() {
    let node = Node::start(NodeOptions::new());
    let (a, b) = (unique("a"), unique("b"));
    let g = unique("reads");
    let ac = connect(&node, &a, &["driver"]).await;
    open_group(&ac, &g, drivers(&[&b])).await;
    for i in 0..20 {
        ac.msg_send(&g, &format!("r{i}"), text("x"), false).await.unwrap();
    }
    let last = ac.group_info(&g).await.unwrap().last_seq;
    let b1 = connect_device(&node, &b, &["driver"], "phone").await;
    let b2 = connect_device(&node, &b, &["driver"], "tablet").await;
    let read_seq = |info: convoy_chaos::client::GroupInfo| info.members.iter().find(|m| m.user == b).unwrap().read_seq;

    let mut high = 0;
    for target in [5, 3, 5, 9, 1, 8, 12] {
        let _ = b1.msg_read(&g, target).await;
        high = high.max(target);
        assert_eq!(read_seq(ac.group_info(&g).await.unwrap()), high, "after reading {target}");
        let item = b2.inbox_sync().await.unwrap().into_iter().find(|i| i.group == g).unwrap();
        assert_eq!(item.read_seq, high, "inbox on the other device after reading {target}");
        assert_eq!(item.unread, last - high);
    }
    // Two devices racing with pipelined reads in shuffled order end at the highest.
    let mut targets: Vec<u64> = (13..=last).collect();
    targets.reverse();
    let reads = targets.iter().enumerate().map(|(i, t)| {
        let dev = if i % 2 == 0 { b1.clone() } else { b2.clone() };
        let g = g.clone();
        let t = *t;
        async move { dev.msg_read(&g, t).await }
    });
    join_all(reads).await;
    assert_eq!(read_seq(b1.group_info(&g).await.unwrap()), last);
    assert_eq!(read_seq(b2.group_info(&g).await.unwrap()), last);
}

/// Every group op a member can do, with arguments for `group`.
fn group_ops(group: &str, someone: &str) -> Vec<(&'static str, Value)> {
    vec![
        ("group.info", json!({ "group": group })),
        ("msg.sync", json!({ "group": group, "after": 0, "limit": 10 })),
        ("msg.send", json!({ "group": group, "client_msg_id": "intruder-1", "body": text("hi") })),
        ("msg.read", json!({ "group": group, "seq": 1 })),
        ("msg.receipts", json!({ "group": group, "seq": 1 })),
        ("group.invite", json!({ "group": group, "user": someone, "role": "driver" })),
        ("group.remove", json!({ "group": group, "user": someone })),
        ("group.leave", json!({ "group": group })),
        ("group.close", json!({ "group": group, "resolution": "x" })),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_members_and_admins_reach_a_group() {
    let node = Node::start(NodeOptions::new());
    let (a, b, outsider, admin) = (unique("a"), unique("b"), unique("out"), unique("adm"));
    let g = unique("private");
    let missing = unique("private");
    let ac = connect(&node, &a, &["dispatcher"]).await;
    open_group(&ac, &g, drivers(&[&b])).await;
    ac.msg_send(&g, "m1", text("secret"), true).await.unwrap();
    let last = ac.group_info(&g).await.unwrap().last_seq;

    // A non-member (even one with every non-admin role) gets `forbidden` for every op, and the same
    // message whether the group exists or not.
    let oc = connect(&node, &outsider, &["customer", "driver", "agent", "dispatcher", "station"]).await;
    for ((op, args), (_, missing_args)) in group_ops(&g, &b).into_iter().zip(group_ops(&missing, &b)) {
        let (code, message, _) = server_error(oc.request(op, args).await, &format!("{op} on an existing group"));
        let (code2, message2, _) =
            server_error(oc.request(op, missing_args).await, &format!("{op} on a missing group"));
        assert_eq!(code, "forbidden", "{op} on an existing group: {message}");
        assert_eq!(code2, "forbidden", "{op} on a missing group: {message2}");
        assert_eq!(
            message.replace(&g, "<group>"),
            message2.replace(&missing, "<group>"),
            "{op}: the message tells whether the group exists"
        );
    }
    // ...and nothing changed.
    let info = ac.group_info(&g).await.unwrap();
    assert_eq!(info.last_seq, last);
    assert_eq!(info.members.len(), 2);
    assert_eq!(info.state, "open");
    assert!(!oc.inbox_sync().await.unwrap().iter().any(|i| i.group == g || i.group == missing));

    // Admins may read.
    let adm = connect(&node, &admin, &["admin"]).await;
    let info = adm.group_info(&g).await.expect("admin group.info");
    assert_eq!(info.last_seq, last);
    let page = adm.msg_sync(&g, 0, 10).await.expect("admin msg.sync");
    assert_eq!(page.messages.len() as u64, last);
    adm.request("msg.receipts", json!({ "group": g, "seq": last })).await.expect("admin msg.receipts");

    // A removed member loses access.
    let bc = connect(&node, &b, &["driver"]).await;
    bc.msg_sync(&g, 0, 10).await.expect("member msg.sync");
    let sent_by_b = bc.msg_send(&g, "b-while-member", text("from b"), false).await.expect("a send by a member");
    ac.request("group.remove", json!({ "group": g, "user": b })).await.expect("group.remove");
    for (op, args) in group_ops(&g, &a) {
        let code = server_code(bc.request(op, args).await, &format!("{op} by a removed member"));
        assert_eq!(code, "forbidden", "{op} by a removed member");
    }
    // What b sent while a member keeps its seq: a retry of it still answers with it.
    let retried = bc.msg_send(&g, "b-while-member", text("from b"), false).await.expect("a retry by a removed member");
    assert_eq!((retried.seq, retried.duplicate), (sent_by_b.seq, true));
    let info = ac.group_info(&g).await.unwrap();
    assert_eq!(info.last_seq, last + 2, "only b's message and the removal were appended");
    assert!(!info.members.iter().any(|m| m.user == b));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_group_keeps_history_and_refuses_messages() {
    let node = Node::start(NodeOptions::new());
    let (a, b) = (unique("a"), unique("b"));
    let g = unique("closing");
    let ac = connect(&node, &a, &["driver"]).await;
    let bc = connect(&node, &b, &["driver"]).await;
    open_group(&ac, &g, drivers(&[&b])).await;
    let kept = ac.msg_send(&g, "before-close", text("kept"), false).await.unwrap();
    ac.request("group.close", json!({ "group": g, "resolution": "done" })).await.expect("group.close");
    let last = ac.group_info(&g).await.unwrap().last_seq;

    for (who, client, cmid) in [("owner", &ac, "after-close"), ("member", &bc, "after-close")] {
        let r = client.msg_send(&g, cmid, text("too late"), false).await;
        assert_eq!(server_code(r, &format!("msg.send by the {who} to a closed group")), "conflict");
    }
    // A retry of a message sent before closing still answers with its seq, and appends nothing.
    let retried = ac.msg_send(&g, "before-close", text("kept"), false).await.expect("a retry after closing");
    assert_eq!((retried.seq, retried.duplicate), (kept.seq, true));
    // Nobody joins a closed group.
    let invited = ac.request("group.invite", json!({ "group": g, "user": unique("late"), "role": "driver" })).await;
    assert_eq!(server_code(invited, "group.invite to a closed group"), "conflict");
    let info = bc.group_info(&g).await.unwrap();
    assert_eq!(info.state, "closed");
    assert_eq!(info.last_seq, last, "a closed group appended something");
    let entries = sync_all(&bc, &g, 0, 500).await;
    assert_eq!(entries.iter().map(seq_of).collect::<Vec<_>>(), (1..=last).collect::<Vec<_>>());
    assert_eq!(entries.iter().find(|e| seq_of(e) == kept.seq).unwrap()["body"], text("kept"));
    let item = bc.inbox_sync().await.unwrap().into_iter().find(|i| i.group == g).unwrap();
    assert_eq!(item.state, "closed");
}
