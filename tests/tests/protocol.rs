//! The client protocol (PROTOCOL.md), operation by operation, with the documented reply shapes.

use std::collections::BTreeSet;
use std::time::Duration;

use convoy_tests::*;
use serde_json::{Value, json};

const PUSH_WAIT: Duration = Duration::from_secs(5);

/// The `{type:"system"}` entries of a sync page.
fn system_entries(entries: &[Value]) -> Vec<&Value> {
    entries.iter().filter(|e| e["body"]["type"] == "system").collect()
}

/// Whether `entry` is a system entry whose body names `user` (in any field).
fn system_entry_about(entry: &Value, user: &str) -> bool {
    entry["body"]["type"] == "system"
        && entry["body"]["event"].is_string()
        && entry["body"].as_object().is_some_and(|b| b.values().any(|v| v == user))
}

fn member_roles(info: &convoy_chaos::client::GroupInfo) -> Vec<(String, String)> {
    info.members.iter().map(|m| (m.user.clone(), m.role.clone())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_ping_and_group_management() {
    let node = Node::start(NodeOptions::new());
    let owner = unique("own");
    let (b, c, d, outsider) = (unique("b"), unique("c"), unique("d"), unique("out"));

    // hello: the reply names the user, the roles and the node.
    let client = open(&node).await;
    let hello = client
        .request("hello", json!({ "token": token(&node, &owner, &["driver", "dispatcher"]), "device": "pixel-7" }))
        .await
        .expect("hello");
    assert_eq!(hello["ok"], true);
    assert_eq!(hello["user"], owner.as_str());
    let roles: BTreeSet<&str> =
        hello["roles"].as_array().expect("roles array").iter().filter_map(Value::as_str).collect();
    assert_eq!(roles, BTreeSet::from(["driver", "dispatcher"]));
    assert_eq!(hello["node"], "n1");

    // ping
    let pong = client.request("ping", Value::Null).await.expect("ping");
    assert_eq!(pong["ok"], true);
    assert!(pong["re"].is_string());

    // group.open with a client-chosen id.
    let g = unique("exc");
    let opened = client
        .request(
            "group.open",
            json!({
                "group": g, "kind": "exception", "title": "Parcel damaged at Wuhan hub",
                "order_id": "ord-88231", "exception_type": "damage",
                "members": [{"user": b, "role": "driver"}, {"user": c, "role": "customer"}],
            }),
        )
        .await
        .expect("group.open");
    assert_eq!(opened["ok"], true);
    assert_eq!(opened["group"], g.as_str());
    assert_eq!(opened["created"], true);

    // group.info has every documented field.
    let info = client.request("group.info", json!({ "group": g })).await.expect("group.info");
    assert_eq!(info["group"], g.as_str());
    assert_eq!(info["kind"], "exception");
    assert_eq!(info["title"], "Parcel damaged at Wuhan hub");
    assert_eq!(info["order_id"], "ord-88231");
    assert_eq!(info["exception_type"], "damage");
    assert_eq!(info["state"], "open");
    assert!(info["last_seq"].is_u64(), "last_seq: {info}");
    let members = info["members"].as_array().expect("members array");
    for m in members {
        assert!(m["user"].is_string() && m["role"].is_string() && m["read_seq"].is_u64(), "member shape: {m}");
    }
    let info = client.group_info(&g).await.expect("group.info");
    let roles: BTreeSet<(String, String)> = member_roles(&info).into_iter().collect();
    let want: BTreeSet<(String, String)> =
        [(owner.clone(), "owner".into()), (b.clone(), "driver".into()), (c.clone(), "customer".into())].into();
    assert_eq!(roles, want);

    // Idempotent reopen by the same opener with the same kind.
    let again = client
        .group_open(&GroupOpen {
            group: Some(g.clone()),
            kind: "exception".into(),
            title: Some("Parcel damaged at Wuhan hub".into()),
            order_id: Some("ord-88231".into()),
            exception_type: Some("damage".into()),
            members: vec![Member::new(&b, "driver"), Member::new(&c, "customer")],
        })
        .await
        .expect("reopen");
    assert_eq!(again.group, g);
    assert!(!again.created, "reopen must answer created:false");
    assert_eq!(client.group_info(&g).await.unwrap().last_seq, info.last_seq, "a reopen appends nothing");

    // Same id, other kind: conflict.
    let other_kind = client.group_open(&GroupOpen::chat(&g, vec![])).await;
    assert_eq!(server_code(other_kind, "reopen with another kind"), "conflict");

    // Same id, another opener (even a member): conflict.
    let bc = connect(&node, &b, &["driver"]).await;
    let by_member = bc
        .group_open(&GroupOpen { kind: "exception".into(), ..GroupOpen::chat(&g, vec![Member::new(&owner, "driver")]) })
        .await;
    assert_eq!(server_code(by_member, "reopen by another user"), "conflict");
    let oc = connect(&node, &outsider, &["customer"]).await;
    let by_outsider = oc.group_open(&GroupOpen { kind: "exception".into(), ..GroupOpen::chat(&g, vec![]) }).await;
    assert_eq!(server_code(by_outsider, "reopen by a non-member"), "conflict");

    // Server-assigned ids: valid, distinct, created.
    let mut assigned = BTreeSet::new();
    for _ in 0..2 {
        let opened = client
            .group_open(&GroupOpen { group: None, ..GroupOpen::chat("", drivers(&[&b])) })
            .await
            .expect("group.open without id");
        assert!(opened.created);
        let id = &opened.group;
        assert!(
            (1..=64).contains(&id.len()) && id.chars().all(|ch| ch.is_ascii_alphanumeric() || "_.:-".contains(ch)),
            "server-assigned id {id:?} is not a valid group id"
        );
        assert_eq!(client.group_info(id).await.expect("info of assigned group").group, *id);
        assigned.insert(opened.group);
    }
    assert_eq!(assigned.len(), 2, "two opens without id must create two groups");

    // group.invite by the owner: the member appears with the role and a system entry is written.
    let before = client.group_info(&g).await.unwrap().last_seq;
    let invited = client.request("group.invite", json!({ "group": g, "user": d, "role": "station" })).await;
    assert_eq!(invited.expect("group.invite")["ok"], true);
    let info = client.group_info(&g).await.unwrap();
    assert!(member_roles(&info).contains(&(d.clone(), "station".into())), "{info:?}");
    assert_eq!(info.last_seq, before + 1, "an invite writes one system entry");

    // A driver may not invite, remove or close.
    let e = unique("e");
    let code =
        server_code(bc.request("group.invite", json!({ "group": g, "user": e, "role": "driver" })).await, "invite");
    assert_eq!(code, "forbidden");
    let code = server_code(bc.request("group.remove", json!({ "group": g, "user": c })).await, "remove");
    assert_eq!(code, "forbidden");
    let code = server_code(bc.request("group.close", json!({ "group": g, "resolution": "x" })).await, "close");
    assert_eq!(code, "forbidden");

    // group.remove by the owner.
    let removed = client.request("group.remove", json!({ "group": g, "user": c })).await;
    assert_eq!(removed.expect("group.remove")["ok"], true);
    let info = client.group_info(&g).await.unwrap();
    assert!(!info.members.iter().any(|m| m.user == c), "{c} still listed after group.remove: {info:?}");
    assert_eq!(info.last_seq, before + 2);

    // group.leave by a member.
    let dc = connect(&node, &d, &["station"]).await;
    let left = dc.request("group.leave", json!({ "group": g })).await;
    assert_eq!(left.expect("group.leave")["ok"], true);
    let info = client.group_info(&g).await.unwrap();
    assert!(!info.members.iter().any(|m| m.user == d), "{d} still listed after group.leave: {info:?}");
    assert_eq!(info.last_seq, before + 3);

    // group.close
    let closed = client.request("group.close", json!({ "group": g, "resolution": "parcel replaced" })).await;
    assert_eq!(closed.expect("group.close")["ok"], true);
    let info = client.group_info(&g).await.unwrap();
    assert_eq!(info.state, "closed");
    assert_eq!(info.last_seq, before + 4);

    // Every change above is a system entry in the log, in order.
    let entries = sync_all(&client, &g, 0, 500).await;
    assert_eq!(entries.len() as u64, info.last_seq);
    let seqs: Vec<u64> = entries.iter().map(seq_of).collect();
    assert_eq!(seqs, (1..=info.last_seq).collect::<Vec<_>>());
    let tail: Vec<&Value> = entries.iter().filter(|e| seq_of(e) > before).collect();
    assert_eq!(tail.len(), 4, "{tail:?}");
    assert!(tail.iter().all(|e| e["body"]["type"] == "system"), "{tail:?}");
    assert!(system_entry_about(tail[0], &d), "invite entry should name {d}: {}", tail[0]);
    assert!(system_entry_about(tail[1], &c), "remove entry should name {c}: {}", tail[1]);
    assert!(system_entry_about(tail[2], &d), "leave entry should name {d}: {}", tail[2]);
    assert!(tail[3]["body"]["event"].is_string(), "close entry: {}", tail[3]);
    assert!(
        tail[3]["body"].as_object().unwrap().values().any(|v| v == "parcel replaced"),
        "close entry should carry the resolution: {}",
        tail[3]
    );
    let events: BTreeSet<&str> = tail.iter().filter_map(|e| e["body"]["event"].as_str()).collect();
    assert_eq!(events.len(), 4, "invite, remove, leave and close are four different events: {events:?}");
    assert!(!system_entries(&entries).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_sync_and_pushes() {
    let node = Node::start(NodeOptions::new());
    let (a, b, c, d) = (unique("a"), unique("b"), unique("c"), unique("d"));
    let ac = connect(&node, &a, &["dispatcher"]).await;
    let b1 = connect_device(&node, &b, &["driver"], "phone").await;
    let b2 = connect_device(&node, &b, &["driver"], "tablet").await;
    let cc = connect(&node, &c, &["customer"]).await;
    let dc = connect(&node, &d, &["customer"]).await;
    let mut listeners = Vec::new();
    for (name, client) in [("a", &ac), ("b/phone", &b1), ("b/tablet", &b2), ("c", &cc)] {
        listeners.push((name, client.events().expect("events")));
    }
    let mut outsider_events = dc.events().expect("events");

    let g = unique("chat");
    open_group(&ac, &g, vec![Member::new(&b, "driver"), Member::new(&c, "customer")]).await;
    let base = ac.group_info(&g).await.unwrap().last_seq;

    let bodies = [
        json!({"type":"text","text":"外包装破损，已拍照"}),
        json!({"type":"image","url":"https://img.example/p/1.jpg","width":1280,"height":960,
               "sha256":"a3f1c2d4e5b6a7980112233445566778899aabbccddeeff00112233445566778"}),
        json!({"type":"image","url":"https://img.example/p/2.jpg"}),
        json!({"type":"voice","url":"https://media.example/v/1.ogg","duration_ms":5200}),
        json!({"type":"video","url":"https://media.example/v/2.mp4","duration_ms":31000}),
        json!({"type":"location","lat":30.5928,"lng":114.3055,"accuracy_m":12.5}),
        json!({"type":"location","lat":-33.8688,"lng":151.2093}),
        json!({"type":"file","url":"https://files.example/f/claim.pdf","name":"claim.pdf","size":48213}),
        json!({"type":"action","prompt":"The parcel will be late. What would you like?",
               "choices":[{"id":"wait","label":"keep waiting"},{"id":"resched","label":"reschedule"},
                          {"id":"gate","label":"leave at the gate"}]}),
        json!({"type":"choice","reply_to":base + 9,"choice":"gate"}),
    ];
    let mut sent = Vec::new();
    for (i, body) in bodies.iter().enumerate() {
        let cmid = format!("m-{i}");
        let require_receipt = i % 3 == 0;
        // msg.send with the raw reply, to check its exact shape.
        let reply = ac
            .request(
                "msg.send",
                json!({ "group": g, "client_msg_id": cmid, "body": body, "require_receipt": require_receipt }),
            )
            .await
            .unwrap_or_else(|e| panic!("msg.send {body}: {e}"));
        assert_eq!(reply["ok"], true);
        assert_eq!(reply["seq"], base + 1 + i as u64, "seq of body {i}: {reply}");
        assert_eq!(reply["duplicate"], false);
        let ts = reply["ts"].as_u64().expect("ts");
        let now_ms = unix_now_secs() * 1000;
        assert!(ts + 60_000 > now_ms && ts < now_ms + 60_000, "ts {ts} is not a current Unix time in ms");
        sent.push((base + 1 + i as u64, cmid, body.clone(), require_receipt, ts));
    }
    let last = base + bodies.len() as u64;

    // msg.sync returns every entry, ascending, exactly as sent.
    let page = ac.msg_sync(&g, base, 500).await.expect("msg.sync");
    assert_eq!(page.last_seq, last);
    assert_eq!(page.messages.len(), bodies.len());
    for (m, (seq, cmid, body, rr, ts)) in page.messages.iter().zip(&sent) {
        assert_eq!(seq_of(m), *seq);
        assert_eq!(m["from"], a.as_str(), "{m}");
        assert_eq!(m["client_msg_id"], cmid.as_str(), "{m}");
        assert_eq!(&m["body"], body, "body stored or served differently: {m}");
        assert_eq!(m["ts"], *ts, "{m}");
        assert_eq!(m["require_receipt"].as_bool().unwrap_or(false), *rr, "{m}");
    }

    // after / limit
    let page = b1.msg_sync(&g, base + 2, 3).await.expect("msg.sync after/limit");
    assert_eq!(page.messages.iter().map(seq_of).collect::<Vec<_>>(), vec![base + 3, base + 4, base + 5]);
    assert_eq!(page.last_seq, last);
    let page = b1.msg_sync(&g, last, 10).await.expect("msg.sync at the end");
    assert!(page.messages.is_empty());
    assert_eq!(page.last_seq, last);
    let page = b1.msg_sync(&g, 0, 1).await.expect("msg.sync from the start");
    assert_eq!(page.messages.iter().map(seq_of).collect::<Vec<_>>(), vec![1]);
    let all = sync_all(&cc, &g, 0, 4).await;
    assert_eq!(all.iter().map(seq_of).collect::<Vec<_>>(), (1..=last).collect::<Vec<_>>());
    for limit in [0, 501] {
        let r = ac.request("msg.sync", json!({ "group": g, "after": 0, "limit": limit })).await;
        assert_eq!(server_code(r, &format!("msg.sync limit={limit}")), "bad_request");
    }

    // Pushes: every connected device of every member gets every entry, in seq order.
    for (name, events) in &mut listeners {
        let mut seqs = Vec::new();
        while seqs.last() != Some(&last) {
            let ev = next_event(events, PUSH_WAIT, |ev| ev["ev"] == "msg" && ev["group"] == g.as_str())
                .await
                .unwrap_or_else(|| panic!("{name}: no msg push after seqs {seqs:?} (want up to {last})"));
            let seq = seq_of(&ev);
            if let Some((_, cmid, body, rr, ts)) = sent.iter().find(|s| s.0 == seq) {
                assert_eq!(ev["from"], a.as_str(), "{name}: {ev}");
                assert_eq!(ev["client_msg_id"], cmid.as_str(), "{name}: {ev}");
                assert_eq!(&ev["body"], body, "{name}: {ev}");
                assert_eq!(ev["ts"], *ts, "{name}: {ev}");
                assert_eq!(ev["require_receipt"].as_bool().unwrap_or(false), *rr, "{name}: {ev}");
            }
            seqs.push(seq);
        }
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{name}: pushes out of seq order: {seqs:?}");
        for (seq, ..) in &sent {
            assert!(seqs.contains(seq), "{name}: no push for seq {seq}: {seqs:?}");
        }
    }
    // Nothing about the group reaches a non-member.
    let leaked = drain_events(&mut outsider_events, Duration::from_millis(300), |ev| ev["group"] == g.as_str()).await;
    assert!(leaked.is_empty(), "a non-member received pushes: {leaked:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbox_reads_and_receipts() {
    let node = Node::start(NodeOptions::new());
    let (a, b, c) = (unique("a"), unique("b"), unique("c"));
    let ac = connect(&node, &a, &["dispatcher"]).await;
    let b1 = connect_device(&node, &b, &["driver"], "phone").await;
    let b2 = connect_device(&node, &b, &["driver"], "tablet").await;
    let cc = connect(&node, &c, &["customer"]).await;
    let mut a_events = ac.events().unwrap();
    let mut b2_events = b2.events().unwrap();

    let g = unique("g");
    let other = unique("g");
    open_group(&ac, &g, vec![Member::new(&b, "driver"), Member::new(&c, "customer")]).await;
    open_group(&ac, &other, vec![Member::new(&c, "customer")]).await;
    let mut seqs = Vec::new();
    for i in 0..4 {
        seqs.push(ac.msg_send(&g, &format!("m{i}"), text(&format!("update {i}")), false).await.unwrap().seq);
    }
    let last = *seqs.last().unwrap();

    // inbox.sync: B sees the group with nothing read yet; not the group it is not in.
    let inbox = b1.inbox_sync().await.expect("inbox.sync");
    assert!(!inbox.iter().any(|i| i.group == other), "{inbox:?}");
    let item = inbox.iter().find(|i| i.group == g).unwrap_or_else(|| panic!("{g} missing from {inbox:?}"));
    assert_eq!(item.kind, "chat");
    assert_eq!(item.state, "open");
    assert_eq!(item.last_seq, last);
    assert_eq!(item.read_seq, 0);
    assert_eq!(item.unread, last);
    let raw = b1.request("inbox.sync", Value::Null).await.unwrap();
    let raw_item = raw["groups"].as_array().unwrap().iter().find(|i| i["group"] == g.as_str()).unwrap().clone();
    for key in ["group", "kind", "title", "state", "last_seq", "read_seq", "unread"] {
        assert!(raw_item.get(key).is_some(), "inbox item without {key}: {raw_item}");
    }
    let c_inbox = cc.inbox_sync().await.unwrap();
    let c_groups: BTreeSet<&str> = c_inbox.iter().map(|i| i.group.as_str()).collect();
    assert!(c_groups.contains(g.as_str()) && c_groups.contains(other.as_str()), "{c_inbox:?}");

    // msg.read from one device: the other device and the other members get the receipt.
    let read_to = seqs[1];
    let reply = b1.request("msg.read", json!({ "group": g, "seq": read_to })).await.expect("msg.read");
    assert_eq!(reply["ok"], true);
    for (name, events) in [("b/tablet", &mut b2_events), ("a", &mut a_events)] {
        let ev = next_event(events, PUSH_WAIT, |ev| ev["ev"] == "receipt" && ev["group"] == g.as_str())
            .await
            .unwrap_or_else(|| panic!("{name}: no receipt event"));
        assert_eq!(ev["user"], b.as_str(), "{name}: {ev}");
        assert_eq!(ev["read_seq"], read_to, "{name}: {ev}");
    }
    // The same read position on both devices.
    for (name, dev) in [("phone", &b1), ("tablet", &b2)] {
        let info = dev.group_info(&g).await.unwrap();
        let me = info.members.iter().find(|m| m.user == b).unwrap();
        assert_eq!(me.read_seq, read_to, "{name}: {info:?}");
        let item = dev.inbox_sync().await.unwrap().into_iter().find(|i| i.group == g).unwrap();
        assert_eq!((item.read_seq, item.unread), (read_to, last - read_to), "{name}: {item:?}");
    }

    // Going back is accepted but changes nothing and announces nothing.
    match b2.msg_read(&g, read_to - 1).await {
        Ok(()) => {}
        Err(ClientError::Server { code, .. }) if code != "internal" => {}
        Err(e) => panic!("msg.read backwards: {e}"),
    }
    let info = ac.group_info(&g).await.unwrap();
    assert_eq!(info.members.iter().find(|m| m.user == b).unwrap().read_seq, read_to);
    let back = drain_events(&mut b2_events, Duration::from_millis(300), |ev| ev["ev"] == "receipt").await;
    assert!(back.is_empty(), "a read that moves nothing must not announce a receipt: {back:?}");

    // msg.receipts: who read a seq and who has not.
    let r = ac.request("msg.receipts", json!({ "group": g, "seq": read_to })).await.expect("msg.receipts");
    let read_by: BTreeSet<&str> = r["read_by"].as_array().expect("read_by").iter().filter_map(Value::as_str).collect();
    let pending: BTreeSet<&str> = r["pending"].as_array().expect("pending").iter().filter_map(Value::as_str).collect();
    assert!(read_by.contains(b.as_str()), "{r}");
    assert!(pending.contains(c.as_str()), "{r}");
    assert!(!pending.contains(b.as_str()), "{r}");
    assert!(read_by.is_disjoint(&pending), "{r}");
    let r = ac.request("msg.receipts", json!({ "group": g, "seq": last })).await.expect("msg.receipts");
    let pending: BTreeSet<&str> = r["pending"].as_array().expect("pending").iter().filter_map(Value::as_str).collect();
    assert!(pending.contains(b.as_str()) && pending.contains(c.as_str()), "{r}");

    cc.msg_read(&g, last).await.unwrap();
    let r = ac.request("msg.receipts", json!({ "group": g, "seq": read_to })).await.unwrap();
    let read_by: BTreeSet<&str> = r["read_by"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    assert!(read_by.contains(b.as_str()) && read_by.contains(c.as_str()), "{r}");
    assert!(!r["pending"].as_array().unwrap().iter().any(|u| u == b.as_str() || u == c.as_str()), "{r}");

    // A removed member no longer sees the group in its inbox, nor can read it.
    ac.request("group.remove", json!({ "group": g, "user": c })).await.expect("group.remove");
    let c_inbox = cc.inbox_sync().await.unwrap();
    assert!(!c_inbox.iter().any(|i| i.group == g), "removed member still sees {g}: {c_inbox:?}");
    assert!(c_inbox.iter().any(|i| i.group == other), "{c_inbox:?}");
    assert_eq!(server_code(cc.msg_sync(&g, 0, 10).await, "msg.sync after removal"), "forbidden");
    // The remaining member's unread count includes the removal entry.
    let item = b1.inbox_sync().await.unwrap().into_iter().find(|i| i.group == g).unwrap();
    assert_eq!(item.last_seq, last + 1);
    assert_eq!(item.unread, last + 1 - read_to);
}

/// With `client.tls_cert` and `tls_key` set, the node serves `wss://` (its ready line says so)
/// and nothing else: a plain `ws://` client and a client that does not trust the certificate
/// both fail before `hello`, and the node goes on serving the trusting client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_a_client_certificate_serves_wss_only() {
    let dir = tempfile::tempdir().unwrap();
    let files = tls::material(dir.path());
    let node = Node::start(NodeOptions::new().set("client.tls_cert", files.cert).set("client.tls_key", files.key));
    assert!(
        node.client_url().starts_with("wss://"),
        "the harness checked the ready line against {}",
        node.client_url()
    );
    let trusting = ClientOptions {
        tls: Some(convoy_chaos::client::tls_trusting(std::path::Path::new(&files.ca)).unwrap()),
        ..ClientOptions::default()
    };

    let user = unique("tls");
    let client = Client::connect(node.client_url(), trusting.clone()).await.expect("connecting over wss");
    client.hello(&token(&node, &user, &["dispatcher"]), "web").await.expect("hello over wss");
    let group = unique("g");
    open_group(&client, &group, vec![]).await;
    let sent = client.msg_send(&group, "m1", text("over TLS"), false).await.expect("a send over wss");
    let page = client.msg_sync(&group, 0, 10).await.unwrap();
    assert_eq!(page.last_seq, sent.seq);
    assert_eq!(page.messages.last().unwrap()["body"]["text"], "over TLS");

    let quick = ClientOptions { connect_timeout: Duration::from_secs(5), ..ClientOptions::default() };
    let plain = node.client_url().replacen("wss://", "ws://", 1);
    let refused = Client::connect(&plain, quick.clone()).await;
    assert!(refused.is_err(), "a plain ws:// client of a TLS node got through: {refused:?}");

    let other = tempfile::tempdir().unwrap();
    let stranger_ca = tls::material(other.path()).ca;
    let untrusting = ClientOptions {
        tls: Some(convoy_chaos::client::tls_trusting(std::path::Path::new(&stranger_ca)).unwrap()),
        ..quick
    };
    let refused = Client::connect(node.client_url(), untrusting).await;
    let Err(ClientError::Connect { reason, .. }) = &refused else {
        panic!("an untrusted certificate was accepted: {refused:?}")
    };
    assert!(reason.contains("TLS handshake failed"), "{reason}");

    let again = client.msg_send(&group, "m2", text("still serving"), false).await.expect("the node still serves");
    assert_eq!(again.seq, sent.seq + 1);
}
