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
    let client = Client::connect(node.client_url(), ClientOptions::default()).await.expect("connect");
    client
        .hello(&mint(node.secret().as_bytes(), &claims), "test")
        .await
        .unwrap_or_else(|e| panic!("hello {user}: {e}"));
    client
}

pub async fn agent(node: &Node, user: &str, skills: &[&str]) -> Client {
    connect_as(node, user, &["agent"], skills, None).await
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
}

impl WebhookReceiver {
    pub async fn start() -> WebhookReceiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hooks", listener.local_addr().unwrap());
        let hooks: Arc<Mutex<Vec<Hook>>> = Arc::default();
        let status = Arc::new(std::sync::atomic::AtomicU16::new(200));
        let (h, st) = (hooks.clone(), status.clone());
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                let (h, st) = (h.clone(), st.clone());
                tokio::spawn(async move {
                    let Some(hook) = read_request(&mut sock).await else { return };
                    let code = st.load(std::sync::atomic::Ordering::SeqCst);
                    if code == 200 {
                        h.lock().await.push(hook);
                    }
                    let reply = format!("HTTP/1.1 {code} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
                    let _ = sock.write_all(reply.as_bytes()).await;
                });
            }
        });
        WebhookReceiver { url, hooks, status }
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
