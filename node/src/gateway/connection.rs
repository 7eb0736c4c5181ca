//! One client connection: authentication, limits, pipelined requests and pushes.
//!
//! Everything a connection does happens in one task: reading frames, answering them as
//! their requests complete (in any order), writing pushed events, pinging, and enforcing
//! the deadlines (hello, token expiry, pong). Each resource it holds is bounded: requests
//! in flight, queued outbound frames, the rate of requests.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use convoy_actors::principal::Principal;
use convoy_actors::{ErrorCode, Rejection, ops};
use futures::stream::FuturesUnordered;
use futures::{FutureExt, SinkExt, StreamExt};
use governor::{Quota, RateLimiter};
use serde::Serialize;
use tokio::sync::{Notify, mpsc};
use tokio::time::{Instant, sleep_until, timeout};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message, Utf8Bytes, error::CapacityError};
use tracing::Instrument;

use super::hub::Registration;
use super::sessions::SessionGuard;
use super::{ClientStream, Gateway, frame};
use crate::cluster::presence::ANNOUNCE_TIMEOUT;
use crate::telemetry::trace::{self, TARGET as TRACE};

/// Close codes of protocol v1 (and Convoy's additions, documented in docs/protocol.md).
pub mod close {
    pub const GOING_AWAY: u16 = 1001;
    pub const INVALID_PAYLOAD: u16 = 1007;
    pub const TOO_LARGE: u16 = 1009;
    pub const UNAUTHORIZED: u16 = 4401;
    pub const TOO_SLOW: u16 = 4408;
    pub const RATE_LIMITED: u16 = 4429;
}

/// How long one write to the socket may take before the client counts as not reading.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client dropped for reading too slowly has to take its close frame.
const SLOW_READER_CLOSE: Duration = Duration::from_secs(2);
/// Frames drained from the outbound queue per socket flush.
const WRITE_BATCH: usize = 64;

struct Session {
    principal: Principal,
    expires_at: Instant,
    registration: Registration,
    _presence: Option<SessionGuard>,
}

#[derive(Serialize)]
struct HelloReply<'a> {
    user: &'a str,
    roles: &'a [convoy_actors::principal::Role],
    node: &'a str,
}

#[derive(Serialize)]
struct Empty {}

fn unix_to_instant(unix_secs: u64) -> Instant {
    let now_unix = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    Instant::now() + Duration::from_secs(unix_secs.saturating_sub(now_unix))
}

type Outcome = (String, Result<convoy_actors::domain::Reply, Rejection>);

pub async fn serve(ws: WebSocketStream<ClientStream>, gw: Arc<Gateway>, peer: SocketAddr) {
    let limits = &gw.limits;
    let (mut sink, mut stream) = ws.split();
    let (frames_tx, mut frames_rx) = mpsc::channel::<Utf8Bytes>(limits.outbound_queue);
    let overflow = Arc::new(Notify::new());
    let quota = Quota::per_second(NonZeroU32::new(limits.requests_per_second.max(1)).expect("max(1)"))
        .allow_burst(NonZeroU32::new(limits.request_burst.max(1)).expect("max(1)"));
    let limiter = RateLimiter::direct(quota);
    let mut strikes = 0u32;
    let mut session: Option<Session> = None;
    let mut pending: FuturesUnordered<futures::future::BoxFuture<'static, Outcome>> = FuturesUnordered::new();
    let mut in_flight: HashSet<String> = HashSet::new();
    let hello_deadline = Instant::now() + limits.hello_timeout;
    let mut last_heard = Instant::now();
    let mut ping = tokio::time::interval(limits.ping_interval);
    ping.reset();
    let mut shutdown = gw.shutdown.clone();
    metrics::gauge!("convoy_connections").increment(1.0);

    // Sends one text frame; false if the connection is done for.
    macro_rules! send {
        ($text:expr) => {{
            let text: Utf8Bytes = $text.into();
            matches!(timeout(WRITE_TIMEOUT, sink.send(Message::Text(text))).await, Ok(Ok(())))
        }};
    }
    macro_rules! close_with {
        ($code:expr, $reason:expr) => {
            close_with!($code, $reason, WRITE_TIMEOUT)
        };
        ($code:expr, $reason:expr, $within:expr) => {{
            let frame = CloseFrame { code: CloseCode::from($code), reason: Utf8Bytes::from($reason) };
            let _ = timeout($within, sink.send(Message::Close(Some(frame)))).await;
            break;
        }};
    }
    // A client that reads nothing gets a moment for the close frame, not a write timeout.
    macro_rules! drop_slow_reader {
        () => {{
            metrics::counter!("convoy_connections_dropped_total", "reason" => "slow_reader").increment(1);
            let user = session.as_ref().map(|s| s.principal.user.to_string());
            tracing::warn!(%peer, ?user, queue = limits.outbound_queue, "dropping a slow reader: its outbound queue is full");
            close_with!(close::TOO_SLOW, "outbound queue full: read faster", SLOW_READER_CLOSE)
        }};
    }
    // Writes a batch of frames unless the outbound queue overflows first.
    macro_rules! write_out {
        ($write:expr) => {
            match unless_overflowed($write, &overflow).await {
                Written::Done => {}
                Written::Failed => break,
                Written::Overflowed => drop_slow_reader!(),
            }
        };
    }

    // Writes `first` and whatever else is ready (replies, then queued frames, at most
    // `WRITE_BATCH`) with one flush. A reply and the pushes of the same round of messages
    // become ready moments apart: one yield first lets them join this write (at the peak, 1.5
    // socket writes per message instead of 2.3).
    macro_rules! write_ready {
        ($first:expr) => {{
            let first: Utf8Bytes = $first;
            let write = async {
                let mut ok = feed(&mut sink, first).await;
                tokio::task::yield_now().await;
                while ok {
                    let Some(Some((id, result))) = pending.next().now_or_never() else { break };
                    in_flight.remove(&id);
                    ok = feed(&mut sink, reply_text(&id, &result).into()).await;
                }
                let mut n = 1;
                while ok && n < WRITE_BATCH {
                    let Ok(next) = frames_rx.try_recv() else { break };
                    ok = feed(&mut sink, next).await;
                    n += 1;
                }
                ok && flush(&mut sink).await
            };
            write_out!(write);
        }};
    }

    loop {
        let deadline = match &session {
            Some(s) => s.expires_at,
            None => hello_deadline,
        };
        tokio::select! {
            biased;
            _ = shutdown.changed() => {
                // Finish what is in flight, then ask the client to reconnect elsewhere.
                let grace = Instant::now() + gw.limits.request_timeout;
                while let Ok(Some((id, result))) = tokio::time::timeout_at(grace, pending.next()).await {
                    let text = reply_text(&id, &result);
                    if !send!(text) { break; }
                }
                close_with!(close::GOING_AWAY, "node shutting down; reconnect to another node");
            }
            _ = overflow.notified() => drop_slow_reader!(),
            // One timer for both deadlines: the hello or token expiry, and the pong.
            _ = sleep_until(deadline.min(last_heard + gw.limits.pong_timeout)) => {
                if Instant::now() < deadline {
                    metrics::counter!("convoy_connections_dropped_total", "reason" => "no_pong").increment(1);
                    let user = session.as_ref().map(|s| s.principal.user.to_string());
                    tracing::warn!(%peer, ?user, silent_for = ?gw.limits.pong_timeout, "dropping a connection that answers no ping");
                    close_with!(close::TOO_SLOW, "no pong in time");
                }
                let reason = if session.is_some() { "token expired" } else { "no valid hello in time" };
                close_with!(close::UNAUTHORIZED, reason);
            }
            Some((id, result)) = pending.next(), if !pending.is_empty() => {
                in_flight.remove(&id);
                write_ready!(reply_text(&id, &result).into());
            }
            Some(first) = frames_rx.recv() => write_ready!(first),
            _ = ping.tick() => {
                if !matches!(timeout(WRITE_TIMEOUT, sink.send(Message::Ping(Default::default()))).await, Ok(Ok(()))) { break; }
            }
            incoming = stream.next() => {
                let msg = match incoming {
                    None | Some(Ok(Message::Close(_))) => break,
                    Some(Err(WsError::Capacity(CapacityError::MessageTooLong { size, max_size }))) => {
                        metrics::counter!("convoy_limit_hits_total", "limit" => "max_frame_bytes").increment(1);
                        let r = Rejection::new(ErrorCode::TooLarge, format!("frame of {size} bytes exceeds the limit of {max_size}"));
                        let _ = send!(frame::error(None, &r, None));
                        close_with!(close::TOO_LARGE, "frame too large");
                    }
                    Some(Err(WsError::Utf8(_))) => {
                        let r = Rejection::bad_request("a text frame that is not UTF-8");
                        let _ = send!(frame::error(None, &r, None));
                        close_with!(close::INVALID_PAYLOAD, "text frame is not UTF-8");
                    }
                    Some(Err(_)) => break,
                    Some(Ok(m)) => m,
                };
                last_heard = Instant::now();
                let text = match msg {
                    Message::Text(t) => t,
                    Message::Binary(_) => {
                        let r = Rejection::bad_request("binary frames are not part of the protocol: send JSON text frames");
                        if !send!(frame::error(None, &r, None)) { break; }
                        continue;
                    }
                    _ => continue,
                };
                if let Err(wait) = limiter.check() {
                    strikes += 1;
                    metrics::counter!("convoy_limit_hits_total", "limit" => "requests_per_second").increment(1);
                    if strikes >= gw.limits.rate_limit_strikes {
                        metrics::counter!("convoy_connections_dropped_total", "reason" => "rate_limit").increment(1);
                        close_with!(close::RATE_LIMITED, "rate limit exceeded repeatedly");
                    }
                    let retry = wait.wait_time_from(governor::clock::Clock::now(&governor::clock::DefaultClock::default()));
                    let r = Rejection::new(ErrorCode::RateLimited, format!("more than {} requests per second", gw.limits.requests_per_second));
                    let id = frame::parse(&text).ok().map(|f| f.id);
                    if !send!(frame::error(id.as_deref(), &r, Some(retry.as_millis() as u64 + 1))) { break; }
                    continue;
                }
                strikes = 0;
                let req = match frame::parse(&text) {
                    Ok(f) => f,
                    Err(e) => {
                        metrics::counter!("convoy_requests_total", "op" => "invalid", "code" => "bad_request").increment(1);
                        if !send!(frame::error(e.id.as_deref(), &e.rejection, None)) { break; }
                        continue;
                    }
                };
                match req.op.as_str() {
                    "hello" => {
                        let text = match hello(&gw, &req, &mut session, &frames_tx, &overflow) {
                            Ok(t) => {
                                // Answer once peers know this user is here, so pushes for
                                // everything committed after the reply find this connection.
                                if let Some(number) = session.as_ref().and_then(|s| s.registration.announces) {
                                    gw.hub.wait_announced(number, ANNOUNCE_TIMEOUT).await;
                                }
                                t
                            }
                            Err(r) => frame::error(Some(&req.id), &r, None),
                        };
                        if !send!(text) { break; }
                    }
                    _ if session.is_none() => {
                        let r = Rejection::new(ErrorCode::Unauthorized, "the first request on a connection must be hello");
                        if !send!(frame::error(Some(&req.id), &r, None)) { break; }
                    }
                    "ping" => {
                        if !send!(frame::ok(&req.id, &Empty {})) { break; }
                    }
                    _ => {
                        if let Some(refusal) = admit(&gw, &req, pending.len(), &in_flight) {
                            if !send!(frame::error(Some(&req.id), &refusal, None)) { break; }
                            continue;
                        }
                        let principal = &session.as_ref().expect("checked above").principal;
                        match ops::parse(&req.op, &req.fields, principal, &gw.domain, |p| gw.fresh_id(p)) {
                            Err(r) => {
                                metrics::counter!("convoy_requests_total", "op" => "invalid", "code" => r.code.as_str()).increment(1);
                                count_limit(&r);
                                if !send!(frame::error(Some(&req.id), &r, None)) { break; }
                            }
                            Ok(route) => {
                                let span = tracing::info_span!(target: TRACE, "request", op = %req.op, user = %principal.user, id = %req.id, trace_id = tracing::field::Empty);
                                trace::continue_from(&span, req.traceparent.as_deref());
                                let span = trace::if_sampled(span);
                                in_flight.insert(req.id.clone());
                                pending.push(Box::pin(run(gw.clone(), req.id, req.op, route).instrument(span)));
                            }
                        }
                    }
                }
            }
        }
    }
    metrics::gauge!("convoy_connections").decrement(1.0);
    tracing::debug!(%peer, user = ?session.as_ref().map(|s| s.principal.user.to_string()), "connection closed");
}

type WsSink = futures::stream::SplitSink<WebSocketStream<ClientStream>, Message>;

/// How writing a batch of frames to a client ended.
enum Written {
    Done,
    /// The socket failed or a write took longer than `WRITE_TIMEOUT`.
    Failed,
    /// The connection's outbound queue overflowed while the batch waited on the socket.
    Overflowed,
}

/// Runs `write`, unless the outbound queue overflows first: a client that stops reading
/// is dropped as soon as its queue is full, not when a write to it times out.
async fn unless_overflowed(write: impl std::future::Future<Output = bool>, overflow: &Notify) -> Written {
    tokio::select! {
        biased;
        _ = overflow.notified() => Written::Overflowed,
        ok = write => if ok { Written::Done } else { Written::Failed },
    }
}

async fn flush(sink: &mut WsSink) -> bool {
    matches!(timeout(WRITE_TIMEOUT, sink.flush()).await, Ok(Ok(())))
}

/// Queues a frame in the write buffer; false if the connection is done for.
async fn feed(sink: &mut WsSink, text: Utf8Bytes) -> bool {
    matches!(timeout(WRITE_TIMEOUT, sink.feed(Message::Text(text))).await, Ok(Ok(())))
}

/// Refuses a request the connection cannot take now.
fn admit(gw: &Gateway, req: &frame::RequestFrame, pending: usize, in_flight: &HashSet<String>) -> Option<Rejection> {
    if in_flight.contains(&req.id) {
        return Some(Rejection::bad_request(format!(
            "request id {:?} is already in flight on this connection",
            req.id
        )));
    }
    if pending >= gw.limits.max_pending_requests {
        metrics::counter!("convoy_limit_hits_total", "limit" => "max_pending_requests").increment(1);
        return Some(Rejection::new(
            ErrorCode::RateLimited,
            format!("{} requests already in flight on this connection", gw.limits.max_pending_requests),
        ));
    }
    None
}

/// Counts a request in `convoy_requests_in_flight` for as long as it lives, also when it is
/// dropped unanswered because its connection went away.
struct InFlight;

impl InFlight {
    fn begin() -> InFlight {
        metrics::gauge!("convoy_requests_in_flight").increment(1.0);
        InFlight
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        metrics::gauge!("convoy_requests_in_flight").decrement(1.0);
    }
}

async fn run(gw: Arc<Gateway>, id: String, op: String, route: ops::Route) -> Outcome {
    let _in_flight = InFlight::begin();
    let started = Instant::now();
    let entity = route.key().clone();
    let result = match timeout(gw.limits.request_timeout, gw.router.dispatch(route)).await {
        Ok(Err(r)) if r.code == ErrorCode::Internal => {
            tracing::error!(%entity, %op, error = %r.message, "request failed inside the node");
            Err(r)
        }
        Ok(r) => r,
        Err(_) => {
            // Leaderless shards answer within `leader_wait`; a timeout means a stuck shard.
            let limit = gw.limits.request_timeout;
            tracing::warn!(%entity, %op, timeout = ?limit, "request timed out inside the cluster");
            Err(Rejection::new(ErrorCode::Unavailable, "the request timed out inside the cluster; retry"))
        }
    };
    let code = match &result {
        Ok(_) => "ok",
        Err(r) => {
            count_limit(r);
            r.code.as_str()
        }
    };
    // Static labels: nothing allocated per request.
    let op_label: &'static str = ops::OPS.iter().copied().find(|o| *o == op).unwrap_or("other");
    metrics::counter!("convoy_requests_total", "op" => op_label, "code" => code).increment(1);
    metrics::histogram!("convoy_request_seconds", "op" => op_label).record(started.elapsed().as_secs_f64());
    (id, result)
}

/// Counts a refusal by the configured limit behind it, if any.
fn count_limit(r: &Rejection) {
    if let Some(limit) = r.limit {
        metrics::counter!("convoy_limit_hits_total", "limit" => limit.as_str()).increment(1);
    }
}

fn reply_text(id: &str, result: &Result<convoy_actors::domain::Reply, Rejection>) -> String {
    match result {
        Ok(reply) => frame::reply(id, reply),
        Err(r) => frame::error(Some(id), r, None),
    }
}

fn hello(
    gw: &Arc<Gateway>,
    req: &frame::RequestFrame,
    session: &mut Option<Session>,
    frames_tx: &mpsc::Sender<Utf8Bytes>,
    overflow: &Arc<Notify>,
) -> Result<String, Rejection> {
    let token = match req.fields.get("token") {
        Some(serde_json::Value::String(t)) => t,
        _ => return Err(Rejection::new(ErrorCode::Unauthorized, "hello needs a token (a JWT string)")),
    };
    let device: Option<Arc<str>> = match req.fields.get("device") {
        None => None,
        Some(serde_json::Value::String(d)) if !d.is_empty() && d.chars().count() <= 64 => Some(Arc::from(d.as_str())),
        Some(_) => return Err(Rejection::bad_request("device must be a string of 1..64 characters")),
    };
    let verified = gw.keys.verify(token)?;
    let principal = verified.principal;
    if let Some(s) = session.as_mut() {
        // A second hello refreshes the token of the same user.
        if s.principal.user != principal.user {
            return Err(Rejection::bad_request(format!("this connection is authenticated as {}", s.principal.user)));
        }
        s.expires_at = unix_to_instant(verified.expires_at);
        s.principal = principal;
    } else {
        let registration = gw.hub.register(principal.user.clone(), device, frames_tx.clone(), overflow.clone());
        let presence = gw.sessions.opened(&principal);
        *session = Some(Session {
            principal,
            expires_at: unix_to_instant(verified.expires_at),
            registration,
            _presence: presence,
        });
    }
    let p = &session.as_ref().expect("set above").principal;
    Ok(frame::ok(&req.id, &HelloReply { user: p.user.as_str(), roles: &p.roles, node: &gw.node_name }))
}
