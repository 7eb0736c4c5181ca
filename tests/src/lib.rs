//! Integration tests for Convoy: they run real `convoy` node processes and talk to them over the
//! client protocol (PROTOCOL.md) with the `convoy-chaos` client, as any client would.
//!
//! - [`node`]: [`Node`] starts a node from a generated configuration in a temporary data
//!   directory and can stop, kill (-9) and restart it on the same data.
//! - [`http`]: a tiny HTTP client for the admin endpoints (metrics are read with
//!   `convoy_chaos::metrics`).
//! - [`otlp`]: a real OTLP receiver (`rotel-agent`) that collects the spans nodes export.
//! - helpers here: [`connect`] (token + `hello`), [`metric`], [`wait_until`], event and sync
//!   helpers, unique ids.
//!
//! The tests need a release build of the node: `cargo build --release -p convoy-node`. They never
//! build it themselves; see [`node::convoy_bin`] for where the binary is looked for.
//!
//! Tests run in parallel threads: every node gets its own ports and data directory, and ids made
//! with [`unique`] keep cases that share a node apart.

pub mod cluster;
pub mod desk;
pub mod failover_support;
pub mod http;
pub mod node;
pub mod otlp;
pub mod tls;

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub use cluster::Cluster;
pub use convoy_chaos::client::{Client, ClientError, ClientOptions, GroupOpen, Member, SyncPage};
pub use convoy_chaos::token::{Claims, mint, unix_now_secs};
pub use node::{Node, NodeOptions, Ports};

use rand::distr::{Alphanumeric, SampleString};
use serde_json::{Value, json};
use tokio::sync::mpsc;

/// Lifetime of the tokens [`token`] mints.
pub const TOKEN_TTL: Duration = Duration::from_secs(3600);

/// A token for `user` with `roles`, signed with the node's secret, valid for [`TOKEN_TTL`].
pub fn token(node: &Node, user: &str, roles: &[&str]) -> String {
    mint(node.secret().as_bytes(), &Claims::new(user, roles.iter().copied(), TOKEN_TTL))
}

/// An admin token for the node's admin API (`Authorization: Bearer`).
pub fn admin_token(node: &Node) -> String {
    token(node, "test-admin", &["admin"])
}

/// `GET` an admin API path (`/v1/...`) of `node` with an admin token; the JSON body, or the
/// status and body as an error.
pub async fn admin_get(node: &Node, path: &str) -> Result<Value, String> {
    let resp =
        http::request_with_token("GET", &format!("{}{path}", node.admin_url()), Some(&admin_token(node))).await?;
    if resp.status != 200 {
        return Err(format!("GET {path}: {} {}", resp.status, resp.body));
    }
    serde_json::from_str(&resp.body).map_err(|e| format!("GET {path}: not JSON ({e}): {}", resp.body))
}

/// `POST` an admin API path of `node` with an admin token.
pub async fn admin_post(node: &Node, path: &str) -> http::Response {
    http::request_with_token("POST", &format!("{}{path}", node.admin_url()), Some(&admin_token(node)))
        .await
        .unwrap_or_else(|e| panic!("POST {path}: {e}"))
}

/// Connects to `node` as `user` with `roles` from device `"test"` and says hello. Panics on failure.
pub async fn connect(node: &Node, user: &str, roles: &[&str]) -> Client {
    connect_device(node, user, roles, "test").await
}

/// [`connect`] from a named device.
pub async fn connect_device(node: &Node, user: &str, roles: &[&str], device: &str) -> Client {
    let client = open(node).await;
    let hello = client
        .hello(&token(node, user, roles), device)
        .await
        .unwrap_or_else(|e| panic!("hello as {user} on {}: {e}", node.client_url()));
    assert_eq!(hello.user, user, "hello answered for another user");
    client
}

/// Opens a connection to `node` without saying hello. Panics on failure.
pub async fn open(node: &Node) -> Client {
    Client::connect(node.client_url(), ClientOptions::default())
        .await
        .unwrap_or_else(|e| panic!("connecting to {}: {e}", node.client_url()))
}

/// The sum of all samples of metric `name` on `node`'s `/metrics` (0 when it has none yet).
pub async fn metric(node: &Node, name: &str) -> f64 {
    let url = format!("{}/metrics", node.admin_url());
    let response = http::get(&url).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(response.status, 200, "GET {url}: {}", response.body);
    convoy_chaos::metrics::sum_metric(&response.body, name).unwrap_or(0.0)
}

/// Polls `condition` with a short backoff until it holds or `timeout` passes; returns whether it
/// held. For conditions that become true eventually (a push arriving, a timer firing).
pub async fn wait_until<F, Fut>(timeout: Duration, mut condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(5);
    loop {
        if condition().await {
            return true;
        }
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        tokio::time::sleep(pause.min(deadline - now)).await;
        pause = (pause * 2).min(Duration::from_millis(200));
    }
}

/// An id no other call in this process returns, and unlikely in any other: `prefix-xxxxxx-N`.
/// Valid as a user, group or client message id (`[A-Za-z0-9_.:-]`, at most 64 chars for short
/// prefixes).
pub fn unique(prefix: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let salt = Alphanumeric.sample_string(&mut rand::rng(), 6);
    format!("{prefix}-{salt}-{n}")
}

/// A text body.
pub fn text(text: &str) -> Value {
    json!({ "type": "text", "text": text })
}

/// The server's error code of a failed request; panics with `what` if it succeeded or failed for
/// another reason than an error reply.
pub fn server_code<T: std::fmt::Debug>(result: Result<T, ClientError>, what: &str) -> String {
    match result {
        Err(ClientError::Server { code, .. }) => code,
        other => panic!("{what}: expected an error reply, got {other:?}"),
    }
}

/// The whole error of a failed request (code, message, retry_after_ms); panics if it succeeded.
pub fn server_error<T: std::fmt::Debug>(result: Result<T, ClientError>, what: &str) -> (String, String, Option<u64>) {
    match result {
        Err(ClientError::Server { code, message, retry_after_ms }) => (code, message, retry_after_ms),
        other => panic!("{what}: expected an error reply, got {other:?}"),
    }
}

/// Every entry of `group` after `after`, following pages of `page` entries. Checks that each page is
/// ascending and that `last_seq` never goes back.
pub async fn sync_all(client: &Client, group: &str, after: u64, page: u32) -> Vec<Value> {
    let mut out = Vec::new();
    let mut after = after;
    loop {
        let p = until_available(&format!("msg.sync {group}"), || client.msg_sync(group, after, page)).await;
        assert!(p.messages.len() <= page as usize, "msg.sync returned more than limit={page}");
        for m in &p.messages {
            let seq = seq_of(m);
            assert!(seq > after, "msg.sync {group} after {after} returned seq {seq}");
            after = seq;
            out.push(m.clone());
        }
        if p.messages.is_empty() || after >= p.last_seq {
            return out;
        }
    }
}

/// Whether a failed request may be sent again (a send with the same `client_msg_id`), and
/// after how long: what the protocol tells clients to do with `unavailable` and
/// `rate_limited`, and with a request that timed out.
pub fn retry_delay(e: &ClientError) -> Option<Duration> {
    match e {
        ClientError::Timeout => Some(Duration::ZERO),
        ClientError::Server { code, retry_after_ms, .. } if code == "unavailable" || code == "rate_limited" => {
            Some(Duration::from_millis(retry_after_ms.unwrap_or(100).min(1_000)))
        }
        _ => None,
    }
}

/// The result of `request`, sent again while it fails in a way a client retries (a shard
/// leader moving, see `retry_delay`), for up to 10 s; any other error panics with `what`.
pub async fn until_available<T, Fut>(what: &str, mut request: impl FnMut() -> Fut) -> T
where
    Fut: Future<Output = Result<T, ClientError>>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match request().await {
            Ok(value) => return value,
            Err(e) => match retry_delay(&e) {
                Some(delay) if Instant::now() < deadline => tokio::time::sleep(delay).await,
                _ => panic!("{what}: {e}"),
            },
        }
    }
}

/// The `seq` of a message (sync entry or push). Panics if it has none.
pub fn seq_of(message: &Value) -> u64 {
    message["seq"].as_u64().unwrap_or_else(|| panic!("message without a numeric seq: {message}"))
}

/// Waits up to `timeout` for an event matching `pred`, skipping others. `None` on timeout or when
/// the connection ends.
pub async fn next_event(
    events: &mut mpsc::Receiver<Value>,
    timeout: Duration,
    mut pred: impl FnMut(&Value) -> bool,
) -> Option<Value> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Some(ev)) if pred(&ev) => return Some(ev),
            Ok(Some(_)) => continue,
            Ok(None) | Err(_) => return None,
        }
    }
}

/// Events already queued or arriving within `quiet` of each other, matching `pred`.
pub async fn drain_events(
    events: &mut mpsc::Receiver<Value>,
    quiet: Duration,
    mut pred: impl FnMut(&Value) -> bool,
) -> Vec<Value> {
    let mut out = Vec::new();
    while let Ok(Some(ev)) = tokio::time::timeout(quiet, events.recv()).await {
        if pred(&ev) {
            out.push(ev);
        }
    }
    out
}

/// Waits for the next reply that matched no request (replies to raw frames), up to `timeout`.
pub async fn raw_reply(client: &Client, timeout: Duration) -> Option<Value> {
    tokio::time::timeout(timeout, client.next_raw_reply()).await.ok().flatten()
}

/// Waits up to `timeout` for the connection to close; returns the close code (`None` if it closed
/// without one). Panics if it is still open.
pub async fn closed_with(client: &Client, timeout: Duration) -> Option<u16> {
    match tokio::time::timeout(timeout, client.closed()).await {
        Ok(info) => info.map(|(code, _)| code),
        Err(_) => panic!("the connection is still open after {timeout:?}"),
    }
}

/// `users` as members with role `driver`.
pub fn drivers(users: &[&str]) -> Vec<Member> {
    users.iter().map(|u| Member::new(*u, "driver")).collect()
}

/// Opens chat group `group` with `members` as `client`, asserting that it was created.
pub async fn open_group(client: &Client, group: &str, members: Vec<Member>) {
    let opened =
        client.group_open(&GroupOpen::chat(group, members)).await.unwrap_or_else(|e| panic!("group.open {group}: {e}"));
    assert_eq!(opened.group, group);
    assert!(opened.created, "group {group} already existed");
}
