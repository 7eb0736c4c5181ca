//! The protocol client against a scripted in-process WebSocket server.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use convoy_chaos::client::{Client, ClientError, ClientOptions};
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

type Ws = WebSocketStream<TcpStream>;

/// Accepts one connection on 127.0.0.1 and runs `script` on it. Returns the URL and the peer
/// address the server saw.
async fn serve_one<F, Fut>(script: F) -> (String, oneshot::Receiver<SocketAddr>)
where
    F: FnOnce(Ws) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (peer_tx, peer_rx) = oneshot::channel();
    tokio::spawn(async move {
        let (tcp, peer) = listener.accept().await.unwrap();
        let _ = peer_tx.send(peer);
        let ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
        script(ws).await;
    });
    (format!("ws://{addr}/v1/ws"), peer_rx)
}

/// The next text frame from the client, parsed.
async fn next_request(ws: &mut Ws) -> Value {
    loop {
        match ws.next().await.expect("client hung up").expect("read failed") {
            Message::Text(text) => return serde_json::from_str(text.as_str()).expect("client sent invalid JSON"),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected frame {other:?}"),
        }
    }
}

async fn send_json(ws: &mut Ws, v: Value) {
    ws.send(Message::text(v.to_string())).await.unwrap();
}

fn opts(timeout_ms: u64) -> ClientOptions {
    ClientOptions { request_timeout: Duration::from_millis(timeout_ms), ..ClientOptions::default() }
}

#[tokio::test]
async fn replies_are_matched_by_id_out_of_order() {
    let (url, _) = serve_one(|mut ws| async move {
        let mut requests = Vec::new();
        for _ in 0..4 {
            requests.push(next_request(&mut ws).await);
        }
        // Answer in reverse order, with noise in between.
        requests.reverse();
        for (i, req) in requests.iter().enumerate() {
            let id = req["id"].clone();
            let op = req["op"].as_str().unwrap().to_string();
            if op == "fail" {
                send_json(
                    &mut ws,
                    json!({"re": id, "ok": false, "error": {"code": "unavailable", "message": "moving", "retry_after_ms": 250}}),
                )
                .await;
            } else {
                send_json(&mut ws, json!({"re": id, "ok": true, "echo": op, "n": req["n"]})).await;
            }
            if i == 0 {
                send_json(&mut ws, json!({"ev": "msg", "group": "g", "seq": 1})).await;
                ws.send(Message::text("this is not json")).await.unwrap();
                ws.send(Message::binary(vec![1u8, 2, 3])).await.unwrap();
                send_json(&mut ws, json!({"re": 5, "ok": true})).await;
                send_json(&mut ws, json!({"re": null, "ok": false, "error": {"code": "bad_request", "message": "x"}}))
                    .await;
            }
        }
        // Keep the connection open until the client goes away.
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;

    let client = Client::connect(&url, opts(5_000)).await.unwrap();
    let mut events = client.events().unwrap();
    assert!(client.events().is_none(), "the event queue has one consumer");

    let clone = client.clone();
    let (a, b, c, f) = tokio::join!(
        client.request("op.a", json!({"n": 1})),
        client.request("op.b", json!({"n": 2})),
        clone.request("op.c", json!({"n": 3})),
        client.request("fail", Value::Null),
    );
    assert_eq!(a.unwrap()["echo"], "op.a");
    assert_eq!(b.unwrap()["n"], 2);
    assert_eq!(c.unwrap()["echo"], "op.c");
    match f {
        Err(ClientError::Server { code, message, retry_after_ms }) => {
            assert_eq!(code, "unavailable");
            assert_eq!(message, "moving");
            assert_eq!(retry_after_ms, Some(250));
        }
        other => panic!("expected a server error, got {other:?}"),
    }

    let event = tokio::time::timeout(Duration::from_secs(5), events.recv()).await.unwrap().unwrap();
    assert_eq!(event["ev"], "msg");
    let raw = tokio::time::timeout(Duration::from_secs(5), client.next_raw_reply()).await.unwrap().unwrap();
    assert_eq!(raw["re"], Value::Null);
    assert_eq!(raw["error"]["code"], "bad_request");

    let stats = client.stats();
    assert_eq!(stats.malformed_frames, 3, "{stats:?}");
    assert_eq!(client.malformed_frames(), 3);
    assert_eq!(stats.events_received, 1);
    assert_eq!(stats.unmatched_replies, 1);
    assert_eq!(client.pending_requests(), 0);
    assert!(!client.is_closed());
}

#[tokio::test]
async fn request_ids_are_unique_on_the_wire() {
    let (url, _) = serve_one(|mut ws| async move {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..200 {
            let req = next_request(&mut ws).await;
            let id = req["id"].as_str().unwrap().to_string();
            assert!(!id.is_empty() && id.len() <= 64);
            assert!(seen.insert(id.clone()), "duplicate id {id}");
            send_json(&mut ws, json!({"re": id, "ok": true})).await;
        }
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
    let client = Client::connect(&url, opts(5_000)).await.unwrap();
    let results = futures::future::join_all((0..200).map(|_| client.request("ping", Value::Null))).await;
    assert!(results.iter().all(Result::is_ok));
}

#[tokio::test]
async fn a_request_without_reply_times_out_and_its_late_reply_is_unmatched() {
    let (url, _) = serve_one(|mut ws| async move {
        let req = next_request(&mut ws).await;
        tokio::time::sleep(Duration::from_millis(400)).await;
        send_json(&mut ws, json!({"re": req["id"], "ok": true, "late": true})).await;
        let req = next_request(&mut ws).await;
        send_json(&mut ws, json!({"re": req["id"], "ok": true})).await;
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
    let client = Client::connect(&url, opts(150)).await.unwrap();
    let started = std::time::Instant::now();
    assert_eq!(client.request("slow", Value::Null).await, Err(ClientError::Timeout));
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(client.pending_requests(), 0);

    let late = tokio::time::timeout(Duration::from_secs(5), client.next_raw_reply()).await.unwrap().unwrap();
    assert_eq!(late["late"], true);
    // The connection is still usable.
    client.request_with_timeout("ping", Value::Null, Duration::from_secs(5)).await.unwrap();
}

#[tokio::test]
async fn close_4401_fails_pending_and_later_requests() {
    let (url, _) = serve_one(|mut ws| async move {
        let hello = next_request(&mut ws).await;
        assert_eq!(hello["op"], "hello");
        assert_eq!(hello["token"], "tkn");
        assert_eq!(hello["device"], "dev-1");
        send_json(&mut ws, json!({"re": hello["id"], "ok": true, "user": "u-17", "roles": ["driver"], "node": "n2"}))
            .await;
        // A request arrives; instead of answering, the token "expires".
        let _pending = next_request(&mut ws).await;
        ws.close(Some(CloseFrame { code: CloseCode::from(4401), reason: "token expired".into() })).await.unwrap();
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
    let client = Client::connect(&url, opts(5_000)).await.unwrap();
    let hello = client.hello("tkn", "dev-1").await.unwrap();
    assert_eq!((hello.user.as_str(), hello.node.as_str()), ("u-17", "n2"));
    assert_eq!(hello.roles, vec!["driver".to_string()]);

    let pending = client.msg_send("g", "m-1", json!({"type": "text", "text": "hi"}), false).await;
    assert_eq!(pending, Err(ClientError::Closed { code: Some(4401), reason: "token expired".into() }));
    assert_eq!(client.closed().await, Some((4401, "token expired".to_string())));
    assert!(client.is_closed());
    let later = client.request("ping", Value::Null).await;
    assert!(matches!(later, Err(ClientError::Closed { code: Some(4401), .. })), "{later:?}");
    assert!(matches!(client.send_raw_text("{}").await, Err(ClientError::Closed { .. })));
    // The event queue ends with the connection.
    let mut events = client.events().unwrap();
    assert!(tokio::time::timeout(Duration::from_secs(5), events.recv()).await.unwrap().is_none());
}

#[tokio::test]
async fn abrupt_disconnect_reports_closed_without_code() {
    let (url, _) = serve_one(|mut ws| async move {
        let _ = next_request(&mut ws).await;
        drop(ws);
    })
    .await;
    let client = Client::connect(&url, opts(5_000)).await.unwrap();
    let result = client.request("ping", Value::Null).await;
    assert!(matches!(result, Err(ClientError::Closed { code: None, .. })), "{result:?}");
    assert_eq!(client.closed().await, None);
}

#[tokio::test]
async fn typed_helpers_and_malformed_replies() {
    let (url, _) = serve_one(|mut ws| async move {
        loop {
            let req = next_request(&mut ws).await;
            let id = req["id"].clone();
            let reply = match req["op"].as_str().unwrap() {
                "msg.send" if req["group"] == "bad" => json!({"re": id, "ok": true, "seq": "one"}),
                "msg.send" => {
                    assert_eq!(req["group"], "g-1");
                    assert_eq!(req["client_msg_id"], "c-1");
                    assert_eq!(req["require_receipt"], true);
                    assert_eq!(req["body"]["text"], "hello");
                    json!({"re": id, "ok": true, "seq": 57, "ts": 1795000000123u64, "duplicate": true})
                }
                "msg.sync" => {
                    assert_eq!((req["after"].as_u64(), req["limit"].as_u64()), (Some(50), Some(200)));
                    json!({"re": id, "ok": true, "messages": [{"seq": 51}, {"seq": 52}], "last_seq": 52})
                }
                "inbox.sync" => json!({"re": id, "ok": true, "groups": [
                    {"group": "g-1", "kind": "chat", "title": "t", "state": "open", "last_seq": 57, "read_seq": 50, "unread": 7}
                ]}),
                "msg.read" => json!({"re": id, "ok": true}),
                "group.info" => json!({"re": id, "ok": true, "group": "g-1", "kind": "chat", "state": "open",
                    "members": [{"user": "u-1", "role": "owner", "read_seq": 0}], "last_seq": 57}),
                "group.open" => {
                    assert_eq!(req["kind"], "chat");
                    assert_eq!(req["members"][0]["role"], "driver");
                    json!({"re": id, "ok": true, "group": req["group"], "created": true})
                }
                // Replies that break the protocol.
                "no-ok" => json!({"re": id, "seq": 1}),
                "bad-error" => json!({"re": id, "ok": false, "error": "nope"}),
                "bye" => break,
                other => panic!("unexpected op {other}"),
            };
            send_json(&mut ws, reply).await;
        }
    })
    .await;
    let client = Client::connect(&url, opts(5_000)).await.unwrap();
    let sent = client.msg_send("g-1", "c-1", json!({"type": "text", "text": "hello"}), true).await.unwrap();
    assert_eq!((sent.seq, sent.ts, sent.duplicate), (57, 1_795_000_000_123, true));
    let page = client.msg_sync("g-1", 50, 200).await.unwrap();
    assert_eq!((page.messages.len(), page.last_seq), (2, 52));
    let inbox = client.inbox_sync().await.unwrap();
    assert_eq!((inbox[0].group.as_str(), inbox[0].unread), ("g-1", 7));
    client.msg_read("g-1", 57).await.unwrap();
    let info = client.group_info("g-1").await.unwrap();
    assert_eq!((info.members.len(), info.last_seq), (1, 57));
    let open = convoy_chaos::client::GroupOpen::chat("g-2", vec![convoy_chaos::client::Member::new("u-2", "driver")]);
    let opened = client.group_open(&open).await.unwrap();
    assert!(opened.created);
    assert_eq!(opened.group, "g-2");

    assert!(matches!(client.request("no-ok", Value::Null).await, Err(ClientError::Protocol(_))));
    assert!(matches!(client.request("bad-error", Value::Null).await, Err(ClientError::Protocol(_))));
    assert_eq!(client.malformed_frames(), 2);
    // A well-formed reply whose fields do not fit the op is a protocol error too.
    assert!(matches!(client.msg_send("bad", "c", json!({}), false).await, Err(ClientError::Protocol(_))));
    assert!(matches!(client.request("x", json!([1, 2])).await, Err(ClientError::InvalidRequest(_))));
    let _ = client.send_raw_text(r#"{"id":"x1","op":"bye"}"#).await;
}

#[tokio::test]
async fn raw_frames_pings_and_event_overflow() {
    let (url, _) = serve_one(|mut ws| async move {
        // A raw malformed text frame and a binary frame from the client.
        match ws.next().await.unwrap().unwrap() {
            Message::Text(t) => assert_eq!(t.as_str(), "{not json"),
            other => panic!("unexpected {other:?}"),
        }
        match ws.next().await.unwrap().unwrap() {
            Message::Binary(b) => assert_eq!(&b[..], &[0xde, 0xad]),
            other => panic!("unexpected {other:?}"),
        }
        send_json(&mut ws, json!({"re": null, "ok": false, "error": {"code": "bad_request", "message": "not JSON"}}))
            .await;
        // The client answers pings while it reads.
        ws.send(Message::Ping(b"hb".to_vec().into())).await.unwrap();
        let mut request = None;
        loop {
            match ws.next().await.unwrap().unwrap() {
                Message::Pong(p) => {
                    assert_eq!(&p[..], b"hb");
                    break;
                }
                // The client's next request may overtake the pong.
                Message::Text(t) => request = Some(serde_json::from_str::<Value>(t.as_str()).unwrap()),
                other => panic!("expected a pong, got {other:?}"),
            }
        }
        // More events than the client buffers, then a reply to sync on.
        for seq in 0..5 {
            send_json(&mut ws, json!({"ev": "msg", "group": "g", "seq": seq})).await;
        }
        let req = match request {
            Some(req) => req,
            None => next_request(&mut ws).await,
        };
        send_json(&mut ws, json!({"re": req["id"], "ok": true})).await;
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
    let options = ClientOptions { event_buffer: 2, ..opts(5_000) };
    let client = Client::connect(&url, options).await.unwrap();
    client.send_raw_text("{not json").await.unwrap();
    client.send_raw_binary(vec![0xde, 0xad]).await.unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(5), client.next_raw_reply()).await.unwrap().unwrap();
    assert_eq!(reply["error"]["code"], "bad_request");

    client.request("sync", Value::Null).await.unwrap();
    assert_eq!(client.events_dropped(), 3);
    let mut events = client.events().unwrap();
    assert_eq!(events.recv().await.unwrap()["seq"], 0);
    assert_eq!(events.recv().await.unwrap()["seq"], 1);
}

#[tokio::test]
async fn binds_the_requested_source_address() {
    let (url, peer) = serve_one(|mut ws| async move { while let Some(Ok(_)) = ws.next().await {} }).await;
    let source = if cfg!(target_os = "linux") { "127.0.0.2" } else { "127.0.0.1" };
    let options = ClientOptions { local_addr: Some(source.parse().unwrap()), ..opts(5_000) };
    let client = Client::connect(&url, options).await.unwrap();
    assert_eq!(client.local_addr().ip().to_string(), source);
    assert_eq!(peer.await.unwrap().ip().to_string(), source);
    client.close().await;
    assert_eq!(
        tokio::time::timeout(Duration::from_secs(5), client.closed()).await.unwrap(),
        Some((1000, String::new()))
    );
}

#[tokio::test]
async fn connect_errors_name_the_url() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let url = format!("ws://127.0.0.1:{port}/v1/ws");
    match Client::connect(&url, ClientOptions::default()).await {
        Err(ClientError::Connect { url: u, .. }) => assert_eq!(u, url),
        other => panic!("expected a connect error, got {other:?}"),
    }
    for bad in ["http://127.0.0.1:1/v1/ws", "wss://127.0.0.1:1/v1/ws", "not a url"] {
        assert!(matches!(Client::connect(bad, ClientOptions::default()).await, Err(ClientError::Connect { .. })));
    }
}
