//! Bad input and limits: every malformed frame gets the documented error and harms nothing
//! else; authentication failures; the hello deadline; frame, rate, in-flight and content limits.

use std::time::{Duration, Instant};

use convoy_tests::http;
use convoy_tests::*;
use futures::future::join_all;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

const REPLY_WAIT: Duration = Duration::from_secs(5);

/// The node still serves a new client normally: connect, open, send, sync.
async fn assert_serves_others(node: &Node) {
    let user = unique("healthy");
    let client = connect(node, &user, &["driver"]).await;
    let g = unique("healthy");
    open_group(&client, &g, vec![]).await;
    let sent = client.msg_send(&g, "ok-1", text("still fine"), false).await.expect("msg.send on a healthy node");
    let page = client.msg_sync(&g, 0, 10).await.expect("msg.sync on a healthy node");
    assert_eq!(page.last_seq, sent.seq);
    assert_eq!(page.messages.last().map(seq_of), Some(sent.seq));
    let health = convoy_tests::http::get(&format!("{}/healthz", node.admin_url())).await.unwrap();
    assert_eq!(health.status, 200);
}

/// Sends `frame` raw and checks the error reply's `re` and code; then a ping must still work.
async fn expect_rejected(client: &Client, frame: &str, re: Option<&str>, code: &str) {
    client.send_raw_text(frame).await.unwrap_or_else(|e| panic!("sending {frame}: {e}"));
    let reply = raw_reply(client, REPLY_WAIT).await.unwrap_or_else(|| panic!("no reply to {frame}"));
    assert_eq!(reply["ok"], false, "{frame} -> {reply}");
    assert_eq!(reply["error"]["code"], code, "{frame} -> {reply}");
    assert!(reply["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{frame} -> {reply}: no message");
    match re {
        Some(id) => assert_eq!(reply["re"], id, "{frame} -> {reply}"),
        None => assert!(reply.get("re").is_some_and(Value::is_null), "{frame} -> {reply}: re must be null"),
    }
    client.ping().await.unwrap_or_else(|e| panic!("ping after {frame}: {e}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_get_errors_and_the_connection_survives() {
    let node = Node::start(NodeOptions::new().set("limits.max_text_chars", 100));
    let (a, b) = (unique("a"), unique("b"));
    let client = connect(&node, &a, &["driver"]).await;
    let g = unique("g");
    open_group(&client, &g, drivers(&[&b])).await;
    let last = client.group_info(&g).await.unwrap().last_seq;

    // Frames that cannot be attributed to a request: `re` is null.
    let long_id = "i".repeat(65);
    let unattributable = [
        "this is not json".to_string(),
        "{\"id\":\"x\",".to_string(),
        "[1,2,3]".to_string(),
        "\"ping\"".to_string(),
        "42".to_string(),
        "null".to_string(),
        json!({"op":"ping"}).to_string(),
        json!({"id":5,"op":"ping"}).to_string(),
        json!({"id":null,"op":"ping"}).to_string(),
        json!({"id":["x"],"op":"ping"}).to_string(),
        json!({"id":"","op":"ping"}).to_string(),
        json!({"id":long_id,"op":"ping"}).to_string(),
    ];
    for frame in &unattributable {
        expect_rejected(&client, frame, None, "bad_request").await;
    }
    // An id of exactly 64 characters is valid.
    let id64 = "j".repeat(64);
    client.send_raw_text(&json!({"id": id64, "op": "ping"}).to_string()).await.unwrap();
    let reply = raw_reply(&client, REPLY_WAIT).await.expect("reply to a 64-char id");
    assert_eq!((reply["re"].as_str(), reply["ok"].as_bool()), (Some(id64.as_str()), Some(true)), "{reply}");

    // Binary frames.
    for bytes in [b"{\"id\":\"b1\",\"op\":\"ping\"}".to_vec(), vec![0, 159, 146, 150]] {
        client.send_raw_binary(bytes).await.unwrap();
        let reply = raw_reply(&client, REPLY_WAIT).await.expect("reply to a binary frame");
        assert_eq!(reply["error"]["code"], "bad_request", "{reply}");
        assert!(reply["re"].is_null(), "{reply}");
        client.ping().await.expect("ping after a binary frame");
    }

    // Attributable frames: `re` is the id.
    let send = |id: &str, extra: Value| {
        let mut frame = json!({"id": id, "op": "msg.send", "group": g, "client_msg_id": format!("c-{id}")});
        for (k, v) in extra.as_object().unwrap() {
            frame[k] = v.clone();
        }
        frame.to_string()
    };
    let cases: Vec<(String, &str)> = vec![
        (json!({"id":"o1"}).to_string(), "missing op"),
        (json!({"id":"o2","op":5}).to_string(), "non-string op"),
        (json!({"id":"o3","op":"msg.explode","group":g}).to_string(), "unknown op"),
        (json!({"id":"o4","op":"MSG.SEND","group":g}).to_string(), "op with the wrong case"),
        (json!({"id":"t1","op":"msg.sync","group":42}).to_string(), "group is a number"),
        (json!({"id":"t2","op":"msg.sync"}).to_string(), "group missing"),
        (json!({"id":"t3","op":"msg.sync","group":"has spaces!"}).to_string(), "invalid group id"),
        (json!({"id":"t4","op":"msg.sync","group":"g".repeat(65)}).to_string(), "group id too long"),
        (json!({"id":"t5","op":"msg.sync","group":g,"after":"zero"}).to_string(), "after is a string"),
        (json!({"id":"t6","op":"msg.sync","group":g,"limit":1.5}).to_string(), "limit is fractional"),
        (json!({"id":"t7","op":"msg.read","group":g,"seq":"five"}).to_string(), "seq is a string"),
        (json!({"id":"t8","op":"msg.read","group":g,"seq":-1}).to_string(), "seq is negative"),
        (json!({"id":"t9","op":"group.open","group":unique("x"),"kind":"party","members":[]}).to_string(), "bad kind"),
        (
            json!({"id":"t10","op":"group.open","group":unique("x"),"kind":"exception","exception_type":"meteor"})
                .to_string(),
            "bad exception_type",
        ),
        (
            json!({"id":"t11","op":"group.open","group":unique("x"),"kind":"chat","members":"all"}).to_string(),
            "members",
        ),
        (json!({"id":"t12","op":"group.invite","group":g,"user":b,"role":"king"}).to_string(), "bad member role"),
        (json!({"id":"t13","op":"group.invite","group":g,"user":"bad user","role":"driver"}).to_string(), "bad user"),
        (send("s1", json!({"client_msg_id": 7, "body": text("x")})), "client_msg_id is a number"),
        (send("s2", json!({"client_msg_id": "", "body": text("x")})), "empty client_msg_id"),
        (send("s3", json!({"client_msg_id": "c".repeat(65), "body": text("x")})), "client_msg_id too long"),
        (
            json!({"id":"s4","op":"msg.send","group":g,"body":text("no client_msg_id")}).to_string(),
            "missing client_msg_id",
        ),
        (send("s5", json!({"body": "hello"})), "body is a string"),
        (send("s6", json!({})), "body missing"),
        (send("s7", json!({"body": text("x"), "require_receipt": "yes"})), "require_receipt is a string"),
        (send("b1", json!({"body": {"type":"sticker","id":"s1"}})), "unknown body type"),
        (send("b2", json!({"body": {"text":"no type"}})), "body without type"),
        (send("b3", json!({"body": {"type":"text","text":""}})), "empty text"),
        (send("b4", json!({"body": {"type":"text"}})), "text missing"),
        (send("b5", json!({"body": {"type":"text","text":17}})), "text is a number"),
        (send("b6", json!({"body": {"type":"text","text":"x".repeat(101)}})), "text over max_text_chars"),
        (send("b7", json!({"body": {"type":"system","event":"group_closed"}})), "clients may not write system entries"),
        (send("b8", json!({"body": {"type":"image"}})), "image without url"),
        (send("b9", json!({"body": {"type":"image","url":5}})), "image url is a number"),
        (send("b10", json!({"body": {"type":"voice","url":"https://x.example/v.ogg"}})), "voice without duration"),
        (send("b11", json!({"body": {"type":"location","lat":"north","lng":1.0}})), "lat is a string"),
        (send("b12", json!({"body": {"type":"location","lat":123.0,"lng":1.0}})), "lat out of range"),
        (send("b13", json!({"body": {"type":"file","url":"https://x.example/f","name":"f"}})), "file without size"),
        (send("b14", json!({"body": {"type":"action","prompt":"?","choices":"yes"}})), "choices not a list"),
        (send("b15", json!({"body": {"type":"choice","reply_to":"one","choice":"a"}})), "reply_to is a string"),
    ];
    for (frame, why) in &cases {
        let id = serde_json::from_str::<Value>(frame).unwrap()["id"].as_str().unwrap().to_string();
        client.send_raw_text(frame).await.unwrap();
        let reply = raw_reply(&client, REPLY_WAIT).await.unwrap_or_else(|| panic!("{why}: no reply to {frame}"));
        assert_eq!(reply["re"], id.as_str(), "{why}: {frame} -> {reply}");
        assert_eq!(reply["ok"], false, "{why}: {frame} -> {reply}");
        assert_eq!(reply["error"]["code"], "bad_request", "{why}: {frame} -> {reply}");
        client.ping().await.unwrap_or_else(|e| panic!("ping after {why}: {e}"));
    }

    // Nothing malformed reached the group, and the connection and the node are fine.
    let info = client.group_info(&g).await.unwrap();
    assert_eq!(info.last_seq, last, "a rejected request changed the group");
    assert_eq!(info.members.len(), 2);
    let ok = client.msg_send(&g, "after-garbage", text(&"x".repeat(100)), false).await.expect("a valid send");
    assert_eq!(ok.seq, last + 1);
    assert_serves_others(&node).await;
}

/// Base64url without padding, for hand-made tokens.
fn b64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authentication_is_required_and_checked() {
    let node = Node::start(NodeOptions::new());
    let user = unique("u");

    // Every op before hello is unauthorized, and answers carry the request id.
    let client = open(&node).await;
    for (op, args) in [
        ("ping", json!({})),
        ("inbox.sync", json!({})),
        ("group.open", json!({"group": unique("g"), "kind": "chat", "members": []})),
        ("msg.sync", json!({"group": "g-1", "after": 0})),
        ("msg.send", json!({"group": "g-1", "client_msg_id": "m", "body": text("x")})),
    ] {
        let code = server_code(client.request(op, args).await, &format!("{op} before hello"));
        assert_eq!(code, "unauthorized", "{op} before hello");
    }

    let now = unix_now_secs();
    let claims = || Claims::new(&user, ["driver"], Duration::from_secs(600));
    let header = b64url(br#"{"alg":"none","typ":"JWT"}"#);
    let payload = b64url(json!({"sub": user, "roles": ["admin"], "exp": now + 600}).to_string().as_bytes());
    let bad_tokens = [
        ("expired an hour ago", mint(node.secret().as_bytes(), &claims().with_exp(now - 3600))),
        ("signed with another secret", mint(b"0123456789abcdef0123456789abcdef-not-the-secret", &claims())),
        ("garbage", "not-a-jwt".to_string()),
        ("empty", String::new()),
        ("three dots of nothing", "a.b.c".to_string()),
        ("alg none", format!("{header}.{payload}.")),
        ("unknown role", mint(node.secret().as_bytes(), &Claims::new(&user, ["pilot"], Duration::from_secs(600)))),
        (
            "invalid user id",
            mint(node.secret().as_bytes(), &Claims::new("not a valid id!", ["driver"], Duration::from_secs(600))),
        ),
        (
            "lifetime beyond auth.max_token_ttl",
            mint(node.secret().as_bytes(), &claims().with_exp(now + 31 * 24 * 3600)),
        ),
    ];
    for (why, token) in &bad_tokens {
        let code = server_code(client.hello(token, "test").await, &format!("hello with a token {why}"));
        assert_eq!(code, "unauthorized", "hello with a token {why}");
        let code = server_code(client.inbox_sync().await, &format!("inbox.sync after a hello {why}"));
        assert_eq!(code, "unauthorized", "a failed hello ({why}) must not authenticate the connection");
    }
    // A tampered payload with the original signature.
    let good = token(&node, &user, &["driver"]);
    let parts: Vec<&str> = good.split('.').collect();
    let forged = b64url(json!({"sub": user, "roles": ["admin"], "exp": now + 600}).to_string().as_bytes());
    let tampered = format!("{}.{forged}.{}", parts[0], parts[2]);
    assert_eq!(server_code(client.hello(&tampered, "test").await, "hello with a tampered token"), "unauthorized");

    // The connection is still usable: a valid hello now succeeds.
    let hello = client.hello(&good, "test").await.expect("valid hello after failed ones");
    assert_eq!(hello.user, user);
    assert_eq!(hello.roles, vec!["driver".to_string()]);
    client.ping().await.unwrap();
    assert_serves_others(&node).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_valid_hello_in_time_closes_with_4401() {
    let node = Node::start(NodeOptions::new().set("auth.hello_timeout", "1s"));
    let started = Instant::now();
    let silent = open(&node).await;
    let failing = open(&node).await;
    let good = open(&node).await;
    let user = unique("u");
    good.hello(&token(&node, &user, &["driver"]), "test").await.expect("hello");
    let wrong =
        mint(b"0123456789abcdef0123456789abcdef-wrong", &Claims::new(&user, ["driver"], Duration::from_secs(60)));
    assert_eq!(server_code(failing.hello(&wrong, "test").await, "bad hello"), "unauthorized");

    assert_eq!(closed_with(&silent, Duration::from_secs(10)).await, Some(4401), "silent connection");
    let elapsed = started.elapsed();
    assert!(elapsed >= Duration::from_millis(900), "closed after {elapsed:?}, before the 1 s hello timeout");
    assert_eq!(closed_with(&failing, Duration::from_secs(10)).await, Some(4401), "connection with a failed hello");
    // The authenticated connection outlives the hello deadline.
    assert!(!good.is_closed(), "an authenticated connection was closed: {:?}", good.close_info());
    good.ping().await.expect("ping on the authenticated connection after the hello deadline");
    assert_serves_others(&node).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_frames_get_too_large_and_close_1009() {
    const LIMIT: usize = 4096;
    let node = Node::start(NodeOptions::new().set("limits.max_frame_bytes", LIMIT as i64));
    let user = unique("u");
    let client = connect(&node, &user, &["driver"]).await;

    // A frame of exactly the limit is served.
    let mut frame = json!({"id": "at-limit", "op": "ping", "pad": ""});
    let pad = LIMIT - frame.to_string().len();
    frame["pad"] = Value::String("p".repeat(pad));
    let frame = frame.to_string();
    assert_eq!(frame.len(), LIMIT);
    client.send_raw_text(&frame).await.unwrap();
    let reply = raw_reply(&client, REPLY_WAIT).await.expect("reply to a frame at the limit");
    assert_eq!((reply["re"].as_str(), reply["ok"].as_bool()), (Some("at-limit"), Some(true)), "{reply}");

    // One byte more is refused with too_large, then the connection is closed with 1009.
    let g = unique("g");
    let big = json!({"id": "too-big", "op": "msg.send", "group": g, "client_msg_id": "big",
                     "body": {"type": "text", "text": "x".repeat(LIMIT)}})
    .to_string();
    client.send_raw_text(&big).await.unwrap();
    let reply = raw_reply(&client, REPLY_WAIT).await.expect("reply to an oversized frame");
    assert_eq!(reply["ok"], false, "{reply}");
    assert_eq!(reply["error"]["code"], "too_large", "{reply}");
    assert!(reply["re"].is_null() || reply["re"] == "too-big", "{reply}");
    assert_eq!(closed_with(&client, Duration::from_secs(5)).await, Some(1009));

    // The same for a frame one byte over the limit, and before hello.
    let early = open(&node).await;
    let mut frame = json!({"id": "over", "op": "ping", "pad": ""});
    let pad = LIMIT + 1 - frame.to_string().len();
    frame["pad"] = Value::String("p".repeat(pad));
    early.send_raw_text(&frame.to_string()).await.unwrap();
    let reply = raw_reply(&early, REPLY_WAIT).await.expect("reply to a frame one byte over");
    assert_eq!(reply["error"]["code"], "too_large", "{reply}");
    assert_eq!(closed_with(&early, Duration::from_secs(5)).await, Some(1009));
    assert_serves_others(&node).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_rate_is_limited_and_floods_are_closed_with_4429() {
    let node = Node::start(
        NodeOptions::new()
            .set("limits.requests_per_second", 5)
            .set("limits.request_burst", 5)
            .set("limits.rate_limit_strikes", 5),
    );
    let user = unique("u");
    let client = connect(&node, &user, &["driver"]).await;

    // A burst beyond the allowance: the first requests pass, the rest get rate_limited with a hint.
    let results = join_all((0..8).map(|_| client.ping())).await;
    let passed = results.iter().filter(|r| r.is_ok()).count();
    let mut retry_after = Duration::ZERO;
    for r in &results {
        if let Err(e) = r {
            assert_eq!(e.code(), "rate_limited", "{e:?}");
            let hint = e.retry_after().unwrap_or_else(|| panic!("rate_limited without retry_after_ms: {e:?}"));
            assert!(hint > Duration::ZERO && hint <= Duration::from_secs(10), "retry_after {hint:?}");
            retry_after = retry_after.max(hint);
        }
    }
    assert!((1..8).contains(&passed), "{passed} of 8 pings passed a limit of 5/s with a burst of 5: {results:?}");
    assert!(!client.is_closed(), "a few rate_limited replies must not close the connection");

    // Waiting as told makes the next request pass.
    tokio::time::sleep(retry_after + Duration::from_millis(50)).await;
    client.ping().await.expect("ping after waiting retry_after_ms");

    // A client that keeps flooding is closed with 4429.
    for i in 0..40 {
        if client.send_raw_text(&json!({"id": format!("f{i}"), "op": "ping"}).to_string()).await.is_err() {
            break;
        }
    }
    assert_eq!(closed_with(&client, Duration::from_secs(5)).await, Some(4429));

    // Other connections of the same user are not affected.
    let other = connect(&node, &user, &["driver"]).await;
    other.ping().await.expect("another connection of the same user");
    assert_serves_others(&node).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_in_flight_are_limited() {
    const MAX_PENDING: usize = 4;
    const SENDS: usize = 60;
    let node = Node::start(
        NodeOptions::new()
            .set("limits.max_pending_requests", MAX_PENDING as i64)
            .set("limits.requests_per_second", 10_000)
            .set("limits.request_burst", 10_000),
    );
    let user = unique("u");
    let client = connect(&node, &user, &["driver"]).await;
    let g = unique("g");
    open_group(&client, &g, vec![]).await;
    let base = client.group_info(&g).await.unwrap().last_seq;

    let ids: Vec<String> = (0..SENDS).map(|i| format!("p{i}")).collect();
    let sends = ids.iter().map(|id| client.msg_send(&g, id, text("pipelined"), false));
    let results = join_all(sends).await;
    let mut seqs = Vec::new();
    let mut limited = 0;
    for r in results {
        match r {
            Ok(sent) => seqs.push(sent.seq),
            Err(e) => {
                assert_eq!(e.code(), "rate_limited", "{e:?}");
                limited += 1;
            }
        }
    }
    assert!(limited > 0, "{SENDS} pipelined sends with max_pending_requests={MAX_PENDING}: none was refused");
    assert!(seqs.len() >= MAX_PENDING, "only {} sends passed", seqs.len());
    seqs.sort_unstable();
    assert_eq!(seqs, (base + 1..=base + seqs.len() as u64).collect::<Vec<_>>(), "accepted sends are gapless");
    // Refused sends were not appended, and the connection keeps working.
    assert_eq!(client.group_info(&g).await.unwrap().last_seq, base + seqs.len() as u64);
    let next = client.msg_send(&g, "after", text("one at a time"), false).await.expect("send after the burst");
    assert_eq!(next.seq, base + seqs.len() as u64 + 1);
    assert_serves_others(&node).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_limits_are_enforced() {
    const MAX_MEMBERS: usize = 5;
    const MAX_GROUPS: usize = 3;
    let node = Node::start(
        NodeOptions::new()
            .set("limits.max_text_chars", 100)
            .set("limits.max_members_per_group", MAX_MEMBERS as i64)
            .set("limits.max_groups_per_user", MAX_GROUPS as i64),
    );
    let owner = unique("own");
    let oc = connect(&node, &owner, &["dispatcher"]).await;

    // Text: max_text_chars counts characters, not bytes.
    let g = unique("text");
    open_group(&oc, &g, vec![]).await;
    oc.msg_send(&g, "t100", text(&"破".repeat(100)), false).await.expect("100 characters");
    let r = oc.msg_send(&g, "t101", text(&"破".repeat(101)), false).await;
    assert_eq!(server_code(r, "101 characters"), "bad_request");

    // Members: the owner plus four others fill a group of five; nobody more gets in.
    let others: Vec<String> = (0..MAX_MEMBERS).map(|i| unique(&format!("m{i}"))).collect();
    let full = unique("full");
    let refs: Vec<&str> = others.iter().map(String::as_str).collect();
    open_group(&oc, &full, drivers(&refs[..MAX_MEMBERS - 1])).await;
    assert_eq!(oc.group_info(&full).await.unwrap().members.len(), MAX_MEMBERS);
    let r = oc.request("group.invite", json!({"group": full, "user": others[MAX_MEMBERS - 1], "role": "driver"})).await;
    let code = server_code(r, "invite beyond max_members_per_group");
    assert!(code == "conflict" || code == "bad_request", "invite beyond the member limit: {code}");
    assert_eq!(oc.group_info(&full).await.unwrap().members.len(), MAX_MEMBERS);
    // Opening with more members than the limit is refused and creates nothing.
    for listed in [MAX_MEMBERS, MAX_MEMBERS + 3] {
        let crowd: Vec<String> = (0..listed).map(|i| unique(&format!("c{i}"))).collect();
        let refs: Vec<&str> = crowd.iter().map(String::as_str).collect();
        let id = unique("crowd");
        let r = oc.group_open(&GroupOpen::chat(&id, drivers(&refs))).await;
        match r {
            Err(ClientError::Server { code, .. }) => {
                assert!(code == "conflict" || code == "bad_request", "open with {listed} others: {code}")
            }
            Ok(_) => {
                let members = oc.group_info(&id).await.unwrap().members.len();
                panic!("group.open with the owner and {listed} others (limit {MAX_MEMBERS}) created {members} members")
            }
            Err(e) => panic!("open with {listed} others: {e}"),
        }
        assert_eq!(server_code(oc.group_info(&id).await, "info of a refused group"), "forbidden");
    }

    // Groups per user: a user in MAX_GROUPS groups can join no more, by any way.
    let busy = unique("busy");
    let mut joined = Vec::new();
    for i in 0..MAX_GROUPS {
        let opener = connect(&node, &unique(&format!("op{i}")), &["dispatcher"]).await;
        let id = unique("mine");
        open_group(&opener, &id, drivers(&[&busy])).await;
        joined.push((opener, id));
    }
    let late_opener = connect(&node, &unique("op-late"), &["dispatcher"]).await;
    let r = late_opener.group_open(&GroupOpen::chat(unique("one-too-many"), drivers(&[&busy]))).await;
    assert_eq!(server_code(r, "group.open listing a user at the group limit"), "conflict");
    let spare = unique("spare");
    open_group(&late_opener, &spare, vec![]).await;
    let r = late_opener.request("group.invite", json!({"group": spare, "user": busy, "role": "driver"})).await;
    assert_eq!(server_code(r, "group.invite of a user at the group limit"), "conflict");
    let bc = connect(&node, &busy, &["driver"]).await;
    let r = bc.group_open(&GroupOpen::chat(unique("own-one"), vec![])).await;
    assert_eq!(server_code(r, "group.open by a user at the group limit"), "conflict");
    let inbox = bc.inbox_sync().await.unwrap();
    assert_eq!(inbox.len(), MAX_GROUPS, "{inbox:?}");
    // Leaving a group makes room again.
    bc.request("group.leave", json!({"group": joined[0].1})).await.expect("group.leave");
    late_opener
        .request("group.invite", json!({"group": spare, "user": busy, "role": "driver"}))
        .await
        .expect("invite after the user left a group");
    assert_eq!(bc.inbox_sync().await.unwrap().len(), MAX_GROUPS);

    // An open refused because one listed user is at the limit lists the group in nobody's
    // inbox: the others can still join as many groups as the limit allows.
    let victim = unique("victim");
    for i in 1..MAX_GROUPS {
        let opener = connect(&node, &unique(&format!("vop{i}")), &["dispatcher"]).await;
        open_group(&opener, &unique("victims"), drivers(&[&victim])).await;
    }
    let r = late_opener.group_open(&GroupOpen::chat(unique("refused"), drivers(&[&victim, &busy]))).await;
    assert_eq!(server_code(r, "group.open listing a user at the group limit"), "conflict");
    let last_one = unique("last-one");
    open_group(&late_opener, &last_one, drivers(&[&victim])).await;
    let vc = connect(&node, &victim, &["driver"]).await;
    assert_eq!(vc.inbox_sync().await.unwrap().len(), MAX_GROUPS);

    // Every refusal above is counted under the limit that refused it.
    let body = http::get(&format!("{}/metrics", node.admin_url())).await.unwrap().body;
    for limit in ["max_text_chars", "max_members_per_group", "max_groups_per_user"] {
        let hits = convoy_chaos::metrics::sum_metric(&body, &format!("convoy_limit_hits_total{{limit=\"{limit}\"}}"))
            .unwrap_or(0.0);
        assert!(hits >= 1.0, "convoy_limit_hits_total{{limit={limit:?}}} = {hits}:\n{body}");
    }
    assert_serves_others(&node).await;
}

/// A WebSocket over a socket with a small receive buffer, said hello as `user`: a client
/// that can be made to stop reading.
async fn sleepy_client(node: &Node, user: &str) -> tokio_tungstenite::WebSocketStream<tokio::net::TcpStream> {
    use futures::{SinkExt, StreamExt};
    let addr = node.client_url().trim_start_matches("ws://").split('/').next().unwrap().to_string();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let tcp = socket.connect(addr.parse().unwrap()).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(node.client_url(), tcp).await.expect("websocket upgrade");
    let hello = json!({"id": "h", "op": "hello", "token": token(node, user, &["driver"]), "device": "sleepy"});
    ws.send(Message::Text(hello.to_string().into())).await.unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(10), ws.next()).await.expect("a hello reply");
    let Some(Ok(Message::Text(reply))) = reply else { panic!("hello reply: {reply:?}") };
    assert!(reply.contains(r#""ok":true"#), "{reply}");
    ws
}

/// Reads what the server still sends until it closes; the close code, if the close frame
/// arrives before the socket ends (the client's automatic pongs may meet a closed socket
/// and reset it first).
async fn close_code_after_draining(ws: &mut tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>) -> Option<u16> {
    use futures::StreamExt;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Ok(Some(Ok(Message::Close(frame)))) => return frame.map(|f| u16::from(f.code)),
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(_)) | None) => return None,
            Err(_) => panic!("the server neither closed nor ended the connection within 30 s"),
        }
    }
}

/// A member who stops reading is dropped once its outbound queue is full (close 4408,
/// counted as `slow_reader`); the sender is never held up on its account.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_dropped_and_holds_nobody_up() {
    let node = Node::start(
        NodeOptions::new()
            .set("limits.outbound_queue", 16)
            .set("limits.requests_per_second", 100_000)
            .set("limits.request_burst", 100_000),
    );
    let (sender, sleeper) = (unique("snd"), unique("slp"));
    let sc = connect(&node, &sender, &["dispatcher"]).await;
    let g = unique("slow");
    open_group(&sc, &g, drivers(&[&sleeper])).await;
    let mut ws = sleepy_client(&node, &sleeper).await;

    let dropped = || metric(&node, "convoy_connections_dropped_total{reason=\"slow_reader\"}");
    let big = "x".repeat(3000);
    let mut sent = 0;
    while dropped().await < 1.0 {
        assert!(sent < 20_000, "{sent} pushes of 3 KB did not overflow a client that reads nothing");
        for _ in 0..100 {
            sc.msg_send(&g, &format!("m{sent}"), text(&big), false).await.expect("the sender is never held up");
            sent += 1;
        }
    }
    let code = close_code_after_draining(&mut ws).await;
    assert!(matches!(code, None | Some(4408)), "closed with {code:?} after {sent} messages");
    // The sender and the group go on.
    let last = sc.msg_send(&g, "after", text("still going"), false).await.expect("a send after the drop");
    assert_eq!(last.seq, sc.group_info(&g).await.unwrap().last_seq);
}

/// A client that answers no ping is dropped `timeouts.pong_timeout` after it fell silent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_answers_no_ping_is_dropped() {
    let node =
        Node::start(NodeOptions::new().set("timeouts.ping_interval", "200ms").set("timeouts.pong_timeout", "1s"));
    let mut ws = sleepy_client(&node, &unique("mute")).await;
    let fell_silent = Instant::now();
    // Not reading means not answering pings: the server hears nothing more from it.
    let dropped = wait_until(Duration::from_secs(10), || async {
        metric(&node, "convoy_connections_dropped_total{reason=\"no_pong\"}").await == 1.0
    })
    .await;
    assert!(dropped, "the silent client was not dropped within 10 s of falling silent");
    assert!(fell_silent.elapsed() >= Duration::from_millis(900), "dropped before pong_timeout");
    let code = close_code_after_draining(&mut ws).await;
    assert!(matches!(code, None | Some(4408)), "closed with {code:?}");
}

/// A text frame that is not UTF-8 breaks the WebSocket protocol: the client gets a
/// `bad_request` error frame, then close 1007; the node goes on serving others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_text_frame_that_is_not_utf8_gets_bad_request_then_close_1007() {
    use futures::StreamExt;
    use tokio::io::AsyncWriteExt;
    let node = Node::start(NodeOptions::new());
    let mut ws = sleepy_client(&node, &unique("bytes")).await;
    // A masked text frame (as clients must send) whose payload is not UTF-8, written raw.
    let (payload, mask) = ([0xffu8, 0xfe, b'{'], [0x11u8, 0x22, 0x33, 0x44]);
    let mut frame = vec![0x81, 0x80 | payload.len() as u8];
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().zip(mask.iter().cycle()).map(|(b, m)| b ^ m));
    ws.get_mut().write_all(&frame).await.unwrap();
    let error = tokio::time::timeout(Duration::from_secs(10), ws.next()).await.expect("an answer");
    let Some(Ok(Message::Text(error))) = error else { panic!("expected an error frame, got {error:?}") };
    let error: Value = serde_json::from_str(&error).unwrap();
    assert_eq!((error["re"].clone(), error["error"]["code"].clone()), (Value::Null, json!("bad_request")), "{error}");
    assert_eq!(close_code_after_draining(&mut ws).await, Some(1007));
    assert_serves_others(&node).await;
}
