//! Helpers for the ticket tests: tokens with skills and tiers, ticket calls, and a webhook
//! receiver that records what it is sent.

use std::sync::Arc;
use std::time::Duration;

use convoy_chaos::client::{Client, ClientOptions};
use convoy_chaos::token::{Claims, mint};
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Mutex;

use crate::{Node, TOKEN_TTL};

/// Connects as `user` with `roles`, `skills` and `tier` (`vip` or `standard`).
pub async fn connect_as(node: &Node, user: &str, roles: &[&str], skills: &[&str], tier: Option<&str>) -> Client {
    let mut claims = Claims::new(user, roles.iter().copied(), TOKEN_TTL);
    claims.skills = skills.iter().map(|s| s.to_string()).collect();
    claims.tier = tier.map(str::to_string);
    connect_with(node, &claims).await
}

/// Connects with a token carrying exactly `claims`.
pub async fn connect_with(node: &Node, claims: &Claims) -> Client {
    let client = Client::connect(node.client_url(), ClientOptions::default()).await.expect("connect");
    client
        .hello(&mint(node.secret().as_bytes(), claims), "test")
        .await
        .unwrap_or_else(|e| panic!("hello {}: {e}", claims.sub));
    client
}

pub async fn agent(node: &Node, user: &str, skills: &[&str]) -> Client {
    connect_as(node, user, &["agent"], skills, None).await
}

/// An agent whose token claims how many tickets they work at once.
pub async fn agent_with_capacity(node: &Node, user: &str, skills: &[&str], capacity: u32) -> Client {
    let claims = Claims::new(user, ["agent"], TOKEN_TTL).with_skills(skills.iter().copied()).with_capacity(capacity);
    connect_with(node, &claims).await
}

/// `/v1/desk`'s figures for one skill group.
pub async fn desk(node: &Node, skill_group: &str) -> Value {
    let desk = crate::admin_get(node, "/v1/desk").await.unwrap_or_else(|e| panic!("/v1/desk: {e}"));
    let groups = desk["skill_groups"].as_array().unwrap_or_else(|| panic!("/v1/desk: {desk}"));
    groups
        .iter()
        .find(|g| g["skill_group"] == skill_group)
        .cloned()
        .unwrap_or_else(|| panic!("no {skill_group} in {desk}"))
}

/// The samples of gauge `name` labelled with `skill_group` (and `state`, when given) on
/// `/metrics`, summed.
pub async fn desk_gauge(node: &Node, name: &str, skill_group: &str, state: Option<&str>) -> Option<f64> {
    let body = crate::http::get(&format!("{}/metrics", node.admin_url())).await.expect("GET /metrics").body;
    let group = format!("skill_group=\"{skill_group}\"");
    let state = state.map(|s| format!("state=\"{s}\""));
    let labelled: Vec<&str> =
        body.lines().filter(|l| l.contains(&group) && state.as_ref().is_none_or(|s| l.contains(s.as_str()))).collect();
    convoy_chaos::metrics::sum_metric(&labelled.join("\n"), name)
}

/// A ticket op; panics on an error reply.
pub async fn call(client: &Client, op: &str, args: Value) -> Value {
    client.request(op, args.clone()).await.unwrap_or_else(|e| panic!("{op} {args}: {e}"))
}

/// `ticket.get`'s `ticket` object.
pub async fn ticket(client: &Client, id: &str) -> Value {
    call(client, "ticket.get", json!({ "ticket": id })).await["ticket"].clone()
}

/// The history actions of a ticket, in order.
pub async fn actions(client: &Client, id: &str) -> Vec<String> {
    let got = call(client, "ticket.get", json!({ "ticket": id })).await;
    got["history"]
        .as_array()
        .expect("history")
        .iter()
        .map(|h| h["event"]["action"].as_str().unwrap().to_string())
        .collect()
}

/// One webhook POST as received.
#[derive(Debug, Clone)]
pub struct Hook {
    pub event: String,
    pub idempotency_key: String,
    pub signature: String,
    pub body: String,
}

impl Hook {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).expect("webhook bodies are JSON")
    }

    /// The signature header is `sha256=<hex HMAC-SHA256(secret, body)>`.
    pub fn signed_with(&self, secret: &str) -> bool {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(self.body.as_bytes());
        let hex: String = mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect();
        self.signature == format!("sha256={hex}")
    }
}

/// An HTTP server on 127.0.0.1 that answers every POST with `status` and records it.
pub struct WebhookReceiver {
    pub url: String,
    pub hooks: Arc<Mutex<Vec<Hook>>>,
    pub status: Arc<std::sync::atomic::AtomicU16>,
    /// While set, requests get no answer: the receiver holds each until the sender gives up.
    pub hang: Arc<std::sync::atomic::AtomicBool>,
    /// Every request, answered or not, with when it came and when it ended.
    pub attempts: Arc<Mutex<Vec<Attempt>>>,
}

/// One request the receiver saw.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub idempotency_key: String,
    pub arrived: std::time::Instant,
    pub ended: std::time::Instant,
}

impl WebhookReceiver {
    pub async fn start() -> WebhookReceiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hooks", listener.local_addr().unwrap());
        let hooks: Arc<Mutex<Vec<Hook>>> = Arc::default();
        let status = Arc::new(std::sync::atomic::AtomicU16::new(200));
        let hang: Arc<std::sync::atomic::AtomicBool> = Arc::default();
        let attempts: Arc<Mutex<Vec<Attempt>>> = Arc::default();
        let (h, st, hg, at) = (hooks.clone(), status.clone(), hang.clone(), attempts.clone());
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                let (h, st, hg, at) = (h.clone(), st.clone(), hg.clone(), at.clone());
                tokio::spawn(async move {
                    let Some(hook) = read_request(&mut sock).await else { return };
                    let arrived = std::time::Instant::now();
                    let idempotency_key = hook.idempotency_key.clone();
                    if hg.load(std::sync::atomic::Ordering::SeqCst) {
                        // Until the sender closes the connection (its timeout), or a minute.
                        let mut rest = [0u8; 1024];
                        let closed = async { while matches!(sock.read(&mut rest).await, Ok(n) if n > 0) {} };
                        let _ = tokio::time::timeout(Duration::from_secs(60), closed).await;
                        let ended = std::time::Instant::now();
                        at.lock().await.push(Attempt { idempotency_key, arrived, ended });
                        return;
                    }
                    let code = st.load(std::sync::atomic::Ordering::SeqCst);
                    if code == 200 {
                        h.lock().await.push(hook);
                    }
                    let reply = format!("HTTP/1.1 {code} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
                    let _ = sock.write_all(reply.as_bytes()).await;
                    let ended = std::time::Instant::now();
                    at.lock().await.push(Attempt { idempotency_key, arrived, ended });
                });
            }
        });
        WebhookReceiver { url, hooks, status, hang, attempts }
    }

    pub async fn received(&self) -> Vec<Hook> {
        self.hooks.lock().await.clone()
    }
}

async fn read_request(sock: &mut tokio::net::TcpStream) -> Option<Hook> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        let n = tokio::time::timeout(Duration::from_secs(5), sock.read(&mut chunk)).await.ok()?.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let header = |name: &str| {
        head.lines()
            .find_map(|l| {
                l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.trim().to_string())
            })
            .unwrap_or_default()
    };
    let len: usize = header("content-length").parse().ok()?;
    while buf.len() < head_end + len {
        let n = tokio::time::timeout(Duration::from_secs(5), sock.read(&mut chunk)).await.ok()?.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Some(Hook {
        event: header("x-convoy-event"),
        idempotency_key: header("idempotency-key"),
        signature: header("x-convoy-signature"),
        body: String::from_utf8_lossy(&buf[head_end..head_end + len]).to_string(),
    })
}
