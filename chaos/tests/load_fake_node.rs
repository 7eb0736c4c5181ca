//! The load run end to end against a small in-process stand-in for a node: it checks tokens,
//! opens groups, commits sends with per-group seqs (idempotent by client_msg_id), pushes `msg`
//! events to members, and answers every tenth first attempt with `unavailable`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use convoy_chaos::load::{self, LoadArgs, LoadConfig};
use convoy_chaos::token::Claims;
use futures::{SinkExt, StreamExt};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

const SECRET: &str = "fake-node-secret";

#[derive(Default)]
struct Group {
    members: Vec<String>,
    seq: u64,
    sent: HashMap<(String, String), u64>,
}

#[derive(Default)]
struct Node {
    devices: Mutex<HashMap<String, Vec<mpsc::UnboundedSender<String>>>>,
    groups: Mutex<HashMap<String, Group>>,
    first_attempts: AtomicU64,
}

fn error(id: &Value, code: &str, retry_after_ms: Option<u64>) -> Value {
    let mut err = json!({"code": code, "message": code});
    if let Some(ms) = retry_after_ms {
        err["retry_after_ms"] = json!(ms);
    }
    json!({"re": id, "ok": false, "error": err})
}

impl Node {
    fn handle(&self, req: &Value, me: &mut Option<Claims>, out: &mpsc::UnboundedSender<String>) -> Value {
        let id = &req["id"];
        let op = req["op"].as_str().unwrap_or_default();
        if op == "hello" {
            let mut validation = Validation::new(Algorithm::HS256);
            validation.set_required_spec_claims(&["exp"]);
            let token = req["token"].as_str().unwrap_or_default();
            return match jsonwebtoken::decode::<Claims>(
                token,
                &DecodingKey::from_secret(SECRET.as_bytes()),
                &validation,
            ) {
                Ok(data) => {
                    let claims = data.claims;
                    self.devices.lock().unwrap().entry(claims.sub.clone()).or_default().push(out.clone());
                    let reply =
                        json!({"re": id, "ok": true, "user": claims.sub, "roles": claims.roles, "node": "fake"});
                    *me = Some(claims);
                    reply
                }
                Err(_) => error(id, "unauthorized", None),
            };
        }
        let Some(claims) = me.as_ref() else {
            return error(id, "unauthorized", None);
        };
        match op {
            "group.open" => {
                if !claims.roles.iter().any(|r| r == "dispatcher") {
                    return error(id, "forbidden", None);
                }
                let name = req["group"].as_str().unwrap_or_default().to_string();
                let mut members = vec![claims.sub.clone()];
                for m in req["members"].as_array().into_iter().flatten() {
                    assert_eq!(m["role"], "driver");
                    members.push(m["user"].as_str().unwrap_or_default().to_string());
                }
                assert_eq!(req["kind"], "chat");
                let mut groups = self.groups.lock().unwrap();
                let created = !groups.contains_key(&name);
                groups.entry(name.clone()).or_insert_with(|| Group { members, ..Default::default() });
                json!({"re": id, "ok": true, "group": name, "created": created})
            }
            "msg.send" => {
                let group_id = req["group"].as_str().unwrap_or_default();
                let cmid = req["client_msg_id"].as_str().unwrap_or_default().to_string();
                let mut groups = self.groups.lock().unwrap();
                let Some(group) = groups.get_mut(group_id) else {
                    return error(id, "forbidden", None);
                };
                if !group.members.contains(&claims.sub) {
                    return error(id, "forbidden", None);
                }
                let key = (claims.sub.clone(), cmid.clone());
                if let Some(&seq) = group.sent.get(&key) {
                    return json!({"re": id, "ok": true, "seq": seq, "ts": 1, "duplicate": true});
                }
                if self.first_attempts.fetch_add(1, Ordering::Relaxed) % 10 == 9 {
                    return error(id, "unavailable", Some(5));
                }
                group.seq += 1;
                let seq = group.seq;
                group.sent.insert(key, seq);
                let event = json!({"ev": "msg", "group": group_id, "seq": seq, "from": claims.sub,
                    "ts": 1, "client_msg_id": cmid, "body": req["body"], "require_receipt": req["require_receipt"]})
                .to_string();
                let devices = self.devices.lock().unwrap();
                for member in &group.members {
                    for device in devices.get(member).into_iter().flatten() {
                        let _ = device.send(event.clone());
                    }
                }
                json!({"re": id, "ok": true, "seq": seq, "ts": 1, "duplicate": false})
            }
            _ => error(id, "bad_request", None),
        }
    }
}

/// Starts the stand-in node; returns its URL.
async fn start_node() -> (String, Arc<Node>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/v1/ws", listener.local_addr().unwrap());
    let node = Arc::new(Node::default());
    let accepting = node.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let node = accepting.clone();
            tokio::spawn(async move {
                let _ = tcp.set_nodelay(true);
                let Ok(ws) = tokio_tungstenite::accept_async(tcp).await else { return };
                let (mut sink, mut stream) = ws.split();
                let (out_tx, mut out_rx) = mpsc::unbounded_channel::<String>();
                tokio::spawn(async move {
                    while let Some(text) = out_rx.recv().await {
                        if sink.send(Message::text(text)).await.is_err() {
                            break;
                        }
                    }
                });
                let mut me = None;
                while let Some(Ok(message)) = stream.next().await {
                    if let Message::Text(text) = message {
                        let req: Value = serde_json::from_str(text.as_str()).unwrap_or(Value::Null);
                        // A sprinkle of noise the client must count and survive.
                        if req["op"] == "hello" {
                            let _ = out_tx.send("garbage".into());
                        }
                        let reply = node.handle(&req, &mut me, &out_tx);
                        let _ = out_tx.send(reply.to_string());
                    }
                }
            });
        }
    });
    (url, node)
}

fn args(url: &str, extra: &[&str]) -> LoadConfig {
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        load: LoadArgs,
    }
    let mut argv = vec!["load", "--url", url, "--secret", SECRET, "--quiet", "--warmup", "300ms", "--duration", "1s"];
    argv.extend_from_slice(extra);
    LoadConfig::from_args(Cli::try_parse_from(argv).unwrap().load).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_loop_run_against_a_fake_node() {
    let (url, node) = start_node().await;
    let pid = std::process::id().to_string();
    let json_path = std::env::temp_dir().join(format!("convoy-load-{}.json", std::process::id()));
    let cfg =
        args(&url, &["-c", "20", "-g", "10", "-m", "3", "--inflight", "2", "--run-id", "t1", "--server-pid", &pid]);
    let report = load::run(cfg).await.unwrap();

    assert_eq!((report.connections, report.connections_requested), (20, 20));
    assert_eq!((report.groups, report.groups_opened), (10, 10));
    assert_eq!(report.mode, "closed");
    assert_eq!(report.senders, 20);
    assert!(report.acked > 50, "{report:?}");
    assert_eq!(report.ack_latency_ms.count, report.acked);
    assert!(report.ack_latency_ms.p50_ms > 0.0);
    assert!(report.ack_latency_ms.p50_ms <= report.ack_latency_ms.p99_ms);
    assert!(report.ack_latency_ms.p99_ms <= report.ack_latency_ms.max_ms);
    // Every committed message reaches its 3 members (the window edges blur this a little).
    assert!(report.deliveries * 10 > report.acked * 3 * 9, "{report:?}");
    assert!(report.push_latency_ms.count > 0);
    assert_eq!(report.unparsed_deliveries, 0);
    assert!(report.errors.get("unavailable").copied().unwrap_or(0) > 0, "{report:?}");
    assert!(report.retries > 0);
    assert_eq!(report.timeouts, 0);
    assert_eq!(report.malformed_frames, 20, "one garbage frame per connection");
    assert!(report.duration_s >= 0.9 && report.duration_s < 2.0, "{}", report.duration_s);
    assert!(report.acked_per_s > 0.0);
    assert_eq!(report.server_rss.len(), 1);
    assert!(report.server_rss[0].before_kb.is_some() && report.server_rss[0].end_kb.is_some());
    assert!(report.rss_per_connection_kb.is_some());
    // Group ids carry the run id.
    assert!(node.groups.lock().unwrap().keys().all(|g| g.starts_with("t1-g")));

    report.write_json(&json_path).unwrap();
    let written: Value = serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    let _ = std::fs::remove_file(&json_path);
    assert_eq!(written["acked"], report.acked);
    assert_eq!(written["run_id"], "t1");
    let value = serde_json::to_value(&report).unwrap();
    assert_eq!(value["acked"], report.acked);
    assert!(value["ack_latency_ms"]["p99_ms"].is_number());
    let table = report.table().to_string();
    assert!(table.contains("acked msgs/s"), "{table}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_loop_run_keeps_the_rate() {
    let (url, _node) = start_node().await;
    let report =
        load::run(args(&url, &["-c", "10", "-g", "5", "-m", "2", "--rate", "200", "--run-id", "t2"])).await.unwrap();
    assert_eq!(report.mode, "open");
    assert_eq!(report.senders, 10);
    // 200 msgs/s for 1 s, give or take the window edges.
    assert!((120..=280).contains(&report.acked), "{report:?}");
    assert!(report.deliveries >= report.acked, "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_run_only_holds_connections() {
    let (url, node) = start_node().await;
    let report = load::run(args(&url, &["-c", "30", "--idle", "--run-id", "t3"])).await.unwrap();
    assert_eq!(report.mode, "idle");
    assert_eq!(report.connections, 30);
    assert_eq!((report.acked, report.deliveries, report.groups), (0, 0, 0));
    assert!(node.groups.lock().unwrap().is_empty());
    assert_eq!(node.devices.lock().unwrap().len(), 30);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_secret_is_fatal_with_a_hint() {
    let (url, _node) = start_node().await;
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        load: LoadArgs,
    }
    let argv = ["load", "--url", &url, "--secret", "not-the-secret", "-q", "-c", "4", "-g", "1", "-m", "2"];
    let cfg = LoadConfig::from_args(Cli::try_parse_from(argv).unwrap().load).unwrap();
    let err = load::run(cfg).await.unwrap_err();
    assert!(err.0.contains("unauthorized"), "{err}");
    assert!(err.0.contains("--secret"), "{err}");
}

#[test]
fn claims_round_trip_through_the_fake_nodes_validation() {
    let claims = Claims::new("u", ["driver"], Duration::from_secs(60));
    let token = convoy_chaos::token::mint(SECRET.as_bytes(), &claims);
    let mut validation = Validation::new(Algorithm::HS256);
    validation.set_required_spec_claims(&["exp"]);
    let back = jsonwebtoken::decode::<Claims>(&token, &DecodingKey::from_secret(SECRET.as_bytes()), &validation);
    assert_eq!(back.unwrap().claims, claims);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_runs_a_load_and_writes_json() {
    let (url, _node) = start_node().await;
    let json_path = std::env::temp_dir().join(format!("convoy-load-cli-{}.json", std::process::id()));
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_convoy-chaos"))
        .args(["load", "--url", &url, "-c", "8", "-g", "4", "-m", "2", "--warmup", "0s", "--duration", "500ms"])
        // The generator as the benchmarks run it, on one thread.
        .args(["--threads", "1"])
        .arg("--json")
        .arg(&json_path)
        .env("CONVOY_AUTH_SECRET", SECRET)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("acked msgs/s"), "{stdout}");
    assert!(stdout.contains("ack ms p50 / p99 / p99.9 / max"), "{stdout}");
    let written: Value = serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    let _ = std::fs::remove_file(&json_path);
    assert_eq!(written["connections"], 8);
    assert!(written["acked"].as_u64().unwrap() > 0);

    // Usage errors exit with 2, unreachable nodes with 1.
    let usage = std::process::Command::new(env!("CARGO_BIN_EXE_convoy-chaos"))
        .args(["load", "--secret", "s", "--members", "0"])
        .output()
        .unwrap();
    assert_eq!(usage.status.code(), Some(2));
    let no_threads = std::process::Command::new(env!("CARGO_BIN_EXE_convoy-chaos"))
        .args(["load", "--secret", "s", "--threads", "0"])
        .output()
        .unwrap();
    assert_eq!(no_threads.status.code(), Some(2));
    // Refused as a value of --threads (an unknown option would say "unexpected argument").
    assert!(String::from_utf8_lossy(&no_threads.stderr).contains("invalid value '0' for '--threads"));
    let fatal = std::process::Command::new(env!("CARGO_BIN_EXE_convoy-chaos"))
        .args(["load", "--secret", "s", "-q", "--url", "ws://127.0.0.1:1/v1/ws", "-c", "2", "-m", "2"])
        .output()
        .unwrap();
    assert_eq!(fatal.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&fatal.stderr).contains("check --url"));
}
