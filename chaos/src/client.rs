//! An async client for the Convoy client protocol, version 1 (JSON over WebSocket).
//!
//! One [`Client`] is one WebSocket connection. It is cheap to clone; clones share the
//! connection, and any number of requests may be in flight at once from any of them
//! (pipelining): each request gets an id unique on the connection and its reply is matched by
//! `re`, whatever order replies arrive in.
//!
//! Two tasks serve a connection: a reader, which answers pings, matches replies to requests,
//! queues events and counts malformed frames, and a writer. Dropping the last clone closes the
//! connection.
//!
//! ```no_run
//! # async fn demo() -> Result<(), convoy_chaos::client::ClientError> {
//! use convoy_chaos::client::{Client, ClientOptions};
//! use convoy_chaos::token::{Claims, mint};
//! use std::time::Duration;
//!
//! let client = Client::connect("ws://127.0.0.1:7600/v1/ws", ClientOptions::default()).await?;
//! let token = mint(b"secret", &Claims::new("u-17", ["driver"], Duration::from_secs(3600)));
//! let hello = client.hello(&token, "laptop").await?;
//! let mut events = client.events().expect("first call");
//! let sent = client.msg_send("g-1", "m-1", serde_json::json!({"type":"text","text":"hi"}), false).await?;
//! println!("{} committed seq {}", hello.user, sent.seq);
//! while let Some(event) = events.recv().await {
//!     println!("{event}");
//! }
//! # Ok(()) }
//! ```

pub mod frame;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_util::either::Either;

use self::frame::{Incoming, ReplyError, parse_incoming, reply_outcome};

/// Socket buffer sizes: small so that ten thousand idle connections stay cheap.
const READ_BUFFER: usize = 4 * 1024;
const WRITE_BUFFER: usize = 4 * 1024;
/// Largest frame accepted from the server (a `msg.sync` page of 500 entries can be large).
const MAX_INCOMING_MESSAGE: usize = 16 << 20;
/// Frames queued for the writer before `request` waits.
const OUTBOX: usize = 256;
/// Replies that match no pending request kept for [`Client::next_raw_reply`].
const RAW_REPLY_BUFFER: usize = 256;

/// Connection settings.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// How long a request waits for its reply before failing with [`ClientError::Timeout`].
    pub request_timeout: Duration,
    /// Capacity of the event queue returned by [`Client::events`]; events beyond it are dropped
    /// and counted ([`Client::events_dropped`]).
    pub event_buffer: usize,
    /// Source address to bind the TCP socket to (e.g. `127.0.0.2`), so that one process can open
    /// more connections to one server than a single source address has ephemeral ports.
    pub local_addr: Option<IpAddr>,
    /// Time allowed for TCP connect plus the WebSocket handshake.
    pub connect_timeout: Duration,
    /// Whom to trust for `wss://` URLs (see [`tls_trusting`]); `wss://` needs it.
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

/// A TLS client configuration that trusts the certificates in the PEM file `ca` (the CA
/// that signed the nodes' client certificates, or a node's self-signed certificate).
pub fn tls_trusting(ca: &std::path::Path) -> Result<Arc<rustls::ClientConfig>, String> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).map_err(|e| format!("cannot read {}: {e}", ca.display()))? {
        let cert = cert.map_err(|e| format!("cannot read {}: {e}", ca.display()))?;
        roots.add(cert).map_err(|e| format!("{}: {e}", ca.display()))?;
    }
    if roots.is_empty() {
        return Err(format!("{} holds no PEM certificate", ca.display()));
    }
    Ok(Arc::new(rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth()))
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            request_timeout: Duration::from_secs(10),
            event_buffer: 4096,
            local_addr: None,
            connect_timeout: Duration::from_secs(10),
            tls: None,
        }
    }
}

/// Why a connection or request failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// TCP connect or the WebSocket handshake failed.
    #[error("could not connect to {url}: {reason}")]
    Connect { url: String, reason: String },
    /// No reply within [`ClientOptions::request_timeout`].
    #[error("request timed out")]
    Timeout,
    /// The server answered with `ok: false`.
    #[error("server error {code}: {message}")]
    Server { code: String, message: String, retry_after_ms: Option<u64> },
    /// The connection is closed; `code` is the close code the server sent, if any.
    #[error("connection closed{}: {reason}", code.map(|c| format!(" ({c})")).unwrap_or_default())]
    Closed { code: Option<u16>, reason: String },
    /// The server's reply does not follow the protocol.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The request could not be built (arguments are not a JSON object, ...).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
}

impl ClientError {
    /// A short label for counting errors: the server's error code, or `timeout`, `closed`,
    /// `connect`, `protocol`, `invalid_request`.
    pub fn code(&self) -> &str {
        match self {
            ClientError::Connect { .. } => "connect",
            ClientError::Timeout => "timeout",
            ClientError::Server { code, .. } => code,
            ClientError::Closed { .. } => "closed",
            ClientError::Protocol(_) => "protocol",
            ClientError::InvalidRequest(_) => "invalid_request",
        }
    }

    /// Whether retrying the same request later may succeed: `unavailable`, `rate_limited` and
    /// timeouts. (Sends are idempotent by `client_msg_id`, so retrying them is always safe.)
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Timeout => true,
            ClientError::Server { code, .. } => code == "unavailable" || code == "rate_limited",
            _ => false,
        }
    }

    /// The server's `retry_after_ms`, if it gave one.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ClientError::Server { retry_after_ms: Some(ms), .. } => Some(Duration::from_millis(*ms)),
            _ => None,
        }
    }
}

/// How the connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseInfo {
    /// Close code from the server's close frame; `None` if the connection ended without one.
    pub code: Option<u16>,
    pub reason: String,
}

impl CloseInfo {
    fn to_error(&self) -> ClientError {
        ClientError::Closed { code: self.code, reason: self.reason.clone() }
    }
}

/// Counters of one connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClientStats {
    /// Frames from the server that were not valid protocol frames (not JSON, not an object,
    /// binary, neither `re` nor `ev`, replies without a proper `ok`/`error`).
    pub malformed_frames: u64,
    /// Events dropped because the event queue was full.
    pub events_dropped: u64,
    /// Replies matching no pending request that were dropped because the raw reply queue was full.
    pub raw_replies_dropped: u64,
    /// Replies matching no pending request (late replies to timed-out requests, `re: null`,
    /// replies to frames sent with [`Client::send_raw_text`]).
    pub unmatched_replies: u64,
    pub events_received: u64,
    pub replies_received: u64,
}

/// Generates request ids unique on one connection: `"1"`, `"2"`, ...
#[derive(Debug)]
pub struct RequestIds {
    next: AtomicU64,
}

impl RequestIds {
    pub fn new() -> Self {
        RequestIds { next: AtomicU64::new(1) }
    }

    pub fn next_id(&self) -> String {
        self.next.fetch_add(1, Ordering::Relaxed).to_string()
    }
}

impl Default for RequestIds {
    fn default() -> Self {
        Self::new()
    }
}

/// The reply to `hello`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct HelloReply {
    pub user: String,
    #[serde(default)]
    pub roles: Vec<String>,
    #[serde(default)]
    pub node: String,
}

/// A group member as listed in `group.open`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub user: String,
    pub role: String,
}

impl Member {
    pub fn new(user: impl Into<String>, role: impl Into<String>) -> Self {
        Member { user: user.into(), role: role.into() }
    }
}

/// The arguments of `group.open`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct GroupOpen {
    /// Group id; `None` lets the server assign one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// `chat` or `exception`.
    pub kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub order_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exception_type: Option<String>,
    pub members: Vec<Member>,
}

impl GroupOpen {
    /// A `chat` group with the given id and members.
    pub fn chat(group: impl Into<String>, members: Vec<Member>) -> Self {
        GroupOpen { group: Some(group.into()), kind: "chat".into(), members, ..Default::default() }
    }
}

/// The reply to `group.open`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct GroupOpened {
    pub group: String,
    #[serde(default)]
    pub created: bool,
}

/// The reply to `msg.send`: the message is committed at `seq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct Sent {
    pub seq: u64,
    #[serde(default)]
    pub ts: u64,
    #[serde(default)]
    pub duplicate: bool,
}

/// The reply to `msg.sync`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct SyncPage {
    pub messages: Vec<Value>,
    pub last_seq: u64,
}

/// One group in the reply to `inbox.sync`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct InboxGroup {
    pub group: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub title: Option<String>,
    #[serde(default)]
    pub state: String,
    #[serde(default)]
    pub last_seq: u64,
    #[serde(default)]
    pub read_seq: u64,
    #[serde(default)]
    pub unread: u64,
}

/// A member as listed by `group.info`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct MemberInfo {
    pub user: String,
    pub role: String,
    #[serde(default)]
    pub read_seq: u64,
}

/// The reply to `group.info`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct GroupInfo {
    pub group: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub title: Option<String>,
    #[serde(default)]
    pub order_id: Option<String>,
    #[serde(default)]
    pub exception_type: Option<String>,
    #[serde(default)]
    pub state: String,
    #[serde(default)]
    pub members: Vec<MemberInfo>,
    #[serde(default)]
    pub last_seq: u64,
}

type ReplySender = oneshot::Sender<Result<Value, ClientError>>;

/// State shared by the client handles and the reader and writer tasks.
struct Shared {
    state: Mutex<State>,
    closed_tx: watch::Sender<Option<CloseInfo>>,
    malformed_frames: AtomicU64,
    events_dropped: AtomicU64,
    raw_replies_dropped: AtomicU64,
    unmatched_replies: AtomicU64,
    events_received: AtomicU64,
    replies_received: AtomicU64,
}

#[derive(Default)]
struct State {
    pending: HashMap<String, ReplySender>,
    closed: Option<CloseInfo>,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        // A poisoned lock only means another thread panicked mid-update of a map of channels;
        // the map itself is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records the end of the connection (first call wins) and fails every pending request.
    fn mark_closed(&self, info: CloseInfo) {
        let drained: Vec<ReplySender> = {
            let mut state = self.state();
            if state.closed.is_some() {
                return;
            }
            state.closed = Some(info.clone());
            state.pending.drain().map(|(_, tx)| tx).collect()
        };
        for tx in drained {
            let _ = tx.send(Err(info.to_error()));
        }
        self.closed_tx.send_replace(Some(info));
    }

    fn closed_error(&self) -> ClientError {
        match &self.state().closed {
            Some(info) => info.to_error(),
            None => ClientError::Closed { code: None, reason: "connection writer stopped".into() },
        }
    }
}

struct Inner {
    shared: Arc<Shared>,
    outbox: mpsc::Sender<Message>,
    ids: RequestIds,
    request_timeout: Duration,
    events: Mutex<Option<mpsc::Receiver<Value>>>,
    raw_replies: tokio::sync::Mutex<mpsc::Receiver<Value>>,
    peer: SocketAddr,
    local: SocketAddr,
}

/// One protocol connection. Clones share it.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("peer", &self.inner.peer).field("local", &self.inner.local).finish()
    }
}

type Ws = WebSocketStream<Either<TcpStream, tokio_rustls::client::TlsStream<TcpStream>>>;

impl Client {
    /// Opens a WebSocket connection to `url` (`ws://HOST:PORT/v1/ws`).
    ///
    /// `wss://` needs [`ClientOptions::tls`]. The caller must send [`Client::hello`] next.
    pub async fn connect(url: &str, opts: ClientOptions) -> Result<Client, ClientError> {
        let connect_err = |reason: String| ClientError::Connect { url: url.to_string(), reason };
        let fut = open_socket(url, opts.local_addr, opts.tls.clone());
        let ws = match tokio::time::timeout(opts.connect_timeout, fut).await {
            Ok(result) => result.map_err(connect_err)?,
            Err(_) => return Err(connect_err(format!("timed out after {:?}", opts.connect_timeout))),
        };
        let tcp = match ws.get_ref() {
            Either::Left(tcp) => tcp,
            Either::Right(tls) => tls.get_ref().0,
        };
        let peer = tcp.peer_addr().map_err(|e| connect_err(e.to_string()))?;
        let local = tcp.local_addr().map_err(|e| connect_err(e.to_string()))?;
        Ok(Self::start(ws, opts, peer, local))
    }

    fn start(ws: Ws, opts: ClientOptions, peer: SocketAddr, local: SocketAddr) -> Client {
        let (closed_tx, _) = watch::channel(None);
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            closed_tx,
            malformed_frames: AtomicU64::new(0),
            events_dropped: AtomicU64::new(0),
            raw_replies_dropped: AtomicU64::new(0),
            unmatched_replies: AtomicU64::new(0),
            events_received: AtomicU64::new(0),
            replies_received: AtomicU64::new(0),
        });
        let (sink, stream) = ws.split();
        let (outbox_tx, outbox_rx) = mpsc::channel(OUTBOX);
        let (events_tx, events_rx) = mpsc::channel(opts.event_buffer.max(1));
        let (raw_tx, raw_rx) = mpsc::channel(RAW_REPLY_BUFFER);
        tokio::spawn(write_loop(sink, outbox_rx, shared.clone()));
        tokio::spawn(read_loop(stream, events_tx, raw_tx, shared.clone()));
        Client {
            inner: Arc::new(Inner {
                shared,
                outbox: outbox_tx,
                ids: RequestIds::new(),
                request_timeout: opts.request_timeout,
                events: Mutex::new(Some(events_rx)),
                raw_replies: tokio::sync::Mutex::new(raw_rx),
                peer,
                local,
            }),
        }
    }

    /// The server's address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.inner.peer
    }

    /// This end's address.
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local
    }

    /// Sends request `op` with `args` (a JSON object, or `null` for none; `id` and `op` are
    /// added) and waits for its reply. Returns the whole reply object when it has `ok: true`.
    pub async fn request(&self, op: &str, args: Value) -> Result<Value, ClientError> {
        self.request_with_timeout(op, args, self.inner.request_timeout).await
    }

    /// [`Client::request`] with a timeout other than the connection's default.
    pub async fn request_with_timeout(&self, op: &str, args: Value, timeout: Duration) -> Result<Value, ClientError> {
        let mut map = match args {
            Value::Object(map) => map,
            Value::Null => Map::new(),
            other => return Err(ClientError::InvalidRequest(format!("arguments must be a JSON object, got {other}"))),
        };
        let id = self.inner.ids.next_id();
        map.insert("id".into(), Value::String(id.clone()));
        map.insert("op".into(), Value::String(op.to_string()));
        let text = Value::Object(map).to_string();

        let shared = &self.inner.shared;
        let (tx, rx) = oneshot::channel();
        {
            let mut state = shared.state();
            if let Some(info) = &state.closed {
                return Err(info.to_error());
            }
            state.pending.insert(id.clone(), tx);
        }
        // Whatever happens from here on, the pending entry must not outlive this call.
        let guard = PendingGuard { shared, id: &id };

        let outcome = tokio::time::timeout(timeout, async {
            if self.inner.outbox.send(Message::text(text)).await.is_err() {
                return Err(shared.closed_error());
            }
            match rx.await {
                Ok(result) => result,
                Err(_) => Err(shared.closed_error()),
            }
        })
        .await;
        drop(guard);
        match outcome {
            Ok(result) => result,
            Err(_) => Err(ClientError::Timeout),
        }
    }

    /// Sends `request` and deserializes the reply into `T`.
    async fn typed<T: DeserializeOwned>(&self, op: &str, args: Value) -> Result<T, ClientError> {
        let reply = self.request(op, args).await?;
        serde_json::from_value(reply).map_err(|e| ClientError::Protocol(format!("bad `{op}` reply: {e}")))
    }

    /// `hello`: authenticates the connection. Must be the first request.
    pub async fn hello(&self, token: &str, device: &str) -> Result<HelloReply, ClientError> {
        self.typed("hello", json!({ "token": token, "device": device })).await
    }

    /// `ping`.
    pub async fn ping(&self) -> Result<(), ClientError> {
        self.request("ping", Value::Null).await.map(drop)
    }

    /// `group.open`.
    pub async fn group_open(&self, open: &GroupOpen) -> Result<GroupOpened, ClientError> {
        let args = serde_json::to_value(open).map_err(|e| ClientError::InvalidRequest(e.to_string()))?;
        self.typed("group.open", args).await
    }

    /// `msg.send`: appends `body` to `group`; retrying with the same `client_msg_id` is safe.
    pub async fn msg_send(
        &self,
        group: &str,
        client_msg_id: &str,
        body: Value,
        require_receipt: bool,
    ) -> Result<Sent, ClientError> {
        let args = json!({
            "group": group,
            "client_msg_id": client_msg_id,
            "body": body,
            "require_receipt": require_receipt,
        });
        self.typed("msg.send", args).await
    }

    /// `msg.sync`: entries of `group` with seq > `after`, ascending, at most `limit` (1..500).
    pub async fn msg_sync(&self, group: &str, after: u64, limit: u32) -> Result<SyncPage, ClientError> {
        self.typed("msg.sync", json!({ "group": group, "after": after, "limit": limit })).await
    }

    /// `inbox.sync`: the caller's groups with their last and read seqs.
    pub async fn inbox_sync(&self) -> Result<Vec<InboxGroup>, ClientError> {
        #[derive(Deserialize)]
        struct Inbox {
            groups: Vec<InboxGroup>,
        }
        self.typed::<Inbox>("inbox.sync", Value::Null).await.map(|inbox| inbox.groups)
    }

    /// `msg.read`: moves the caller's read position in `group` to `seq`.
    pub async fn msg_read(&self, group: &str, seq: u64) -> Result<(), ClientError> {
        self.request("msg.read", json!({ "group": group, "seq": seq })).await.map(drop)
    }

    /// `group.info`.
    pub async fn group_info(&self, group: &str) -> Result<GroupInfo, ClientError> {
        self.typed("group.info", json!({ "group": group })).await
    }

    /// The queue of pushed events (`{"ev": ...}` frames). Returns `None` after the first call:
    /// there is one consumer per connection. The queue holds at most
    /// [`ClientOptions::event_buffer`] events; when the consumer falls behind, further events are
    /// dropped and counted. It ends when the connection closes.
    pub fn events(&self) -> Option<mpsc::Receiver<Value>> {
        self.inner.events.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    /// Events dropped because the event queue was full.
    pub fn events_dropped(&self) -> u64 {
        self.inner.shared.events_dropped.load(Ordering::Relaxed)
    }

    /// Frames from the server that were not valid protocol frames.
    pub fn malformed_frames(&self) -> u64 {
        self.inner.shared.malformed_frames.load(Ordering::Relaxed)
    }

    /// All counters of this connection.
    pub fn stats(&self) -> ClientStats {
        let s = &self.inner.shared;
        ClientStats {
            malformed_frames: s.malformed_frames.load(Ordering::Relaxed),
            events_dropped: s.events_dropped.load(Ordering::Relaxed),
            raw_replies_dropped: s.raw_replies_dropped.load(Ordering::Relaxed),
            unmatched_replies: s.unmatched_replies.load(Ordering::Relaxed),
            events_received: s.events_received.load(Ordering::Relaxed),
            replies_received: s.replies_received.load(Ordering::Relaxed),
        }
    }

    /// Sends `text` as one text frame, as is (for testing how the server treats malformed
    /// frames). Its reply, if any, is read with [`Client::next_raw_reply`]. Ids made of digits
    /// only may collide with the ids of [`Client::request`]; use another form such as `"x1"`.
    pub async fn send_raw_text(&self, text: &str) -> Result<(), ClientError> {
        self.send_message(Message::text(text)).await
    }

    /// Sends `bytes` as one binary frame.
    pub async fn send_raw_binary(&self, bytes: Vec<u8>) -> Result<(), ClientError> {
        self.send_message(Message::binary(bytes)).await
    }

    async fn send_message(&self, message: Message) -> Result<(), ClientError> {
        if let Some(info) = &self.inner.shared.state().closed {
            return Err(info.to_error());
        }
        self.inner.outbox.send(message).await.map_err(|_| self.inner.shared.closed_error())
    }

    /// The next reply that matched no pending request: `{"re": null, ...}` answers to frames the
    /// server could not attribute, replies to frames sent with [`Client::send_raw_text`], and late
    /// replies to requests that timed out. Returns `None` once the connection is closed and all
    /// such replies have been read. Wrap it in a timeout when a reply may not come.
    pub async fn next_raw_reply(&self) -> Option<Value> {
        self.inner.raw_replies.lock().await.recv().await
    }

    /// Starts the closing handshake with status 1000. Pending and later requests fail with
    /// [`ClientError::Closed`].
    pub async fn close(&self) {
        self.close_with(1000, "").await;
    }

    /// Starts the closing handshake with the given status and reason.
    pub async fn close_with(&self, code: u16, reason: &str) {
        let frame = CloseFrame { code: CloseCode::from(code), reason: reason.to_string().into() };
        let _ = self.inner.outbox.send(Message::Close(Some(frame))).await;
    }

    /// Waits until the connection is closed. Returns the server's close code and reason, or
    /// `None` if the connection ended without a close frame.
    pub async fn closed(&self) -> Option<(u16, String)> {
        let mut rx = self.inner.shared.closed_tx.subscribe();
        let info = match rx.wait_for(Option::is_some).await {
            Ok(info) => info.clone(),
            // The sender lives in `Shared`, which this handle keeps alive.
            Err(_) => None,
        };
        info.and_then(|info| info.code.map(|code| (code, info.reason)))
    }

    /// How the connection ended, if it has.
    pub fn close_info(&self) -> Option<CloseInfo> {
        self.inner.shared.state().closed.clone()
    }

    /// Whether the connection has ended.
    pub fn is_closed(&self) -> bool {
        self.inner.shared.state().closed.is_some()
    }

    /// Requests waiting for their reply.
    pub fn pending_requests(&self) -> usize {
        self.inner.shared.state().pending.len()
    }
}

/// Removes a request's pending entry when the request call ends (reply, timeout, cancellation).
struct PendingGuard<'a> {
    shared: &'a Shared,
    id: &'a str,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.shared.state().pending.remove(self.id);
    }
}

/// Resolves `url`, opens a TCP socket (bound to `local_addr` if given), runs the TLS
/// handshake for `wss://` and then the WebSocket handshake.
async fn open_socket(
    url: &str,
    local_addr: Option<IpAddr>,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> Result<Ws, String> {
    let request = url.into_client_request().map_err(|e| format!("invalid URL: {e}"))?;
    let uri = request.uri();
    let (tls, default_port) = match (uri.scheme_str(), tls) {
        (Some("ws"), _) => (None, 80),
        (Some("wss"), Some(tls)) => (Some(tls), 443),
        (Some("wss"), None) => return Err("wss:// needs a CA to trust (--tls-ca)".into()),
        (other, _) => return Err(format!("unsupported scheme {other:?}; expected ws://HOST:PORT/v1/ws")),
    };
    let host = uri.host().ok_or("URL has no host")?.trim_start_matches('[').trim_end_matches(']').to_string();
    let port = uri.port_u16().unwrap_or(default_port);
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), port))
        .await
        .map_err(|e| format!("cannot resolve {host}: {e}"))?
        .collect();
    let addr = addrs
        .iter()
        .copied()
        .find(|a| local_addr.is_none_or(|l| l.is_ipv4() == a.is_ipv4()))
        .ok_or_else(|| format!("{host} has no address of the source address's family"))?;
    let socket = if addr.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }
        .map_err(|e| format!("cannot create socket: {e}"))?;
    if let Some(ip) = local_addr {
        crate::sys::bind_address_no_port(&socket);
        socket.bind(SocketAddr::new(ip, 0)).map_err(|e| format!("cannot bind source address {ip}: {e}"))?;
    }
    let tcp = socket.connect(addr).await.map_err(|e| e.to_string())?;
    let _ = tcp.set_nodelay(true);
    let stream = match tls {
        None => Either::Left(tcp),
        Some(tls) => {
            let name = rustls::pki_types::ServerName::try_from(host.clone())
                .map_err(|e| format!("{host} cannot be checked against a certificate: {e}"))?;
            let tls = tokio_rustls::TlsConnector::from(tls).connect(name, tcp).await;
            Either::Right(tls.map_err(|e| format!("TLS handshake failed: {e}"))?)
        }
    };
    let config = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .max_write_buffer_size(usize::MAX)
        .max_message_size(Some(MAX_INCOMING_MESSAGE))
        .max_frame_size(Some(MAX_INCOMING_MESSAGE));
    let (ws, _response) = tokio_tungstenite::client_async_with_config(request, stream, Some(config))
        .await
        .map_err(|e| format!("WebSocket handshake failed: {e}"))?;
    Ok(ws)
}

async fn write_loop(mut sink: SplitSink<Ws, Message>, mut outbox: mpsc::Receiver<Message>, shared: Arc<Shared>) {
    while let Some(first) = outbox.recv().await {
        // Batch whatever else is already queued into one flush.
        let mut result = sink.feed(first).await;
        while result.is_ok() {
            match outbox.try_recv() {
                Ok(next) => result = sink.feed(next).await,
                Err(_) => break,
            }
        }
        if result.is_ok() {
            result = sink.flush().await;
        }
        match result {
            Ok(()) => {}
            // Sending after a close frame: the reader reports how the connection ends.
            Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed)
            | Err(tungstenite::Error::Protocol(_)) => {}
            Err(e) => {
                shared.mark_closed(CloseInfo { code: None, reason: format!("write failed: {e}") });
                return;
            }
        }
    }
    // Every handle is gone: close politely.
    let _ = sink.send(Message::Close(Some(CloseFrame { code: CloseCode::Normal, reason: "".into() }))).await;
}

async fn read_loop(
    mut stream: SplitStream<Ws>,
    events: mpsc::Sender<Value>,
    raw_replies: mpsc::Sender<Value>,
    shared: Arc<Shared>,
) {
    let mut close: Option<CloseInfo> = None;
    let end_reason = loop {
        let message = match stream.next().await {
            Some(Ok(message)) => message,
            Some(Err(tungstenite::Error::ConnectionClosed)) | None => break "connection closed".to_string(),
            Some(Err(e)) => break format!("connection lost: {e}"),
        };
        match message {
            Message::Text(text) => dispatch(text.as_str(), &events, &raw_replies, &shared),
            Message::Binary(_) => {
                shared.malformed_frames.fetch_add(1, Ordering::Relaxed);
            }
            Message::Close(frame) => {
                close = Some(match frame {
                    Some(frame) => CloseInfo { code: Some(u16::from(frame.code)), reason: frame.reason.to_string() },
                    None => CloseInfo { code: Some(1005), reason: String::new() },
                });
                // Keep reading: tungstenite answers the close and then ends the stream.
            }
            // Pongs to the server's pings are queued by tungstenite and sent as we keep reading.
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
        }
    };
    shared.mark_closed(close.unwrap_or(CloseInfo { code: None, reason: end_reason }));
}

fn dispatch(text: &str, events: &mpsc::Sender<Value>, raw_replies: &mpsc::Sender<Value>, shared: &Shared) {
    let incoming = match parse_incoming(text) {
        Ok(incoming) => incoming,
        Err(e) => {
            shared.malformed_frames.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(error = %e, "malformed frame from server");
            return;
        }
    };
    match incoming {
        Incoming::Event { frame, .. } => {
            shared.events_received.fetch_add(1, Ordering::Relaxed);
            if events.try_send(frame).is_err() {
                shared.events_dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        Incoming::Reply { re, frame } => {
            shared.replies_received.fetch_add(1, Ordering::Relaxed);
            let waiter = re.as_ref().and_then(|id| shared.state().pending.remove(id));
            match waiter {
                Some(tx) => {
                    let outcome = reply_outcome(frame).map_err(|e| match e {
                        ReplyError::Server(e) => {
                            ClientError::Server { code: e.code, message: e.message, retry_after_ms: e.retry_after_ms }
                        }
                        ReplyError::Malformed(why) => {
                            shared.malformed_frames.fetch_add(1, Ordering::Relaxed);
                            ClientError::Protocol(why)
                        }
                    });
                    let _ = tx.send(outcome);
                }
                None => {
                    shared.unmatched_replies.fetch_add(1, Ordering::Relaxed);
                    if raw_replies.try_send(frame).is_err() {
                        shared.raw_replies_dropped.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn request_ids_are_unique_and_valid() {
        let ids = Arc::new(RequestIds::new());
        let mut handles = Vec::new();
        for _ in 0..4 {
            let ids = ids.clone();
            handles.push(std::thread::spawn(move || (0..10_000).map(|_| ids.next_id()).collect::<Vec<_>>()));
        }
        let mut seen = HashSet::new();
        for handle in handles {
            for id in handle.join().unwrap() {
                assert!(!id.is_empty() && id.len() <= 64);
                assert!(seen.insert(id), "duplicate id");
            }
        }
        assert_eq!(seen.len(), 40_000);
    }

    #[test]
    fn error_codes_and_retryability() {
        let unavailable =
            ClientError::Server { code: "unavailable".into(), message: String::new(), retry_after_ms: Some(250) };
        assert_eq!(unavailable.code(), "unavailable");
        assert!(unavailable.is_retryable());
        assert_eq!(unavailable.retry_after(), Some(Duration::from_millis(250)));
        assert!(ClientError::Timeout.is_retryable());
        let forbidden = ClientError::Server { code: "forbidden".into(), message: String::new(), retry_after_ms: None };
        assert!(!forbidden.is_retryable());
        let closed = ClientError::Closed { code: Some(4401), reason: "token expired".into() };
        assert_eq!(closed.code(), "closed");
        assert_eq!(closed.to_string(), "connection closed (4401): token expired");
        assert!(!closed.is_retryable());
    }

    #[test]
    fn typed_replies_deserialize_leniently() {
        let sent: Sent = serde_json::from_value(json!({"re":"3","ok":true,"seq":57,"ts":1795000000123u64})).unwrap();
        assert_eq!(sent, Sent { seq: 57, ts: 1_795_000_000_123, duplicate: false });
        let info: GroupInfo = serde_json::from_value(json!({
            "re":"9","ok":true,"group":"g","kind":"chat","title":null,"state":"open",
            "members":[{"user":"u","role":"owner","read_seq":3}],"last_seq":4
        }))
        .unwrap();
        assert_eq!(info.members[0].read_seq, 3);
        assert_eq!(info.title, None);
        assert!(serde_json::from_value::<Sent>(json!({"re":"3","ok":true})).is_err());
    }

    #[test]
    fn group_open_serializes_only_given_fields() {
        let open = GroupOpen::chat("run-g1", vec![Member::new("run-u2", "driver")]);
        let v = serde_json::to_value(&open).unwrap();
        assert_eq!(v, json!({"group":"run-g1","kind":"chat","members":[{"user":"run-u2","role":"driver"}]}));
    }
}
