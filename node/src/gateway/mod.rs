//! The gateway: protocol v1 over WebSocket at `/v1/ws`. It authenticates clients, checks
//! frames and limits, parses operations with the domain's op table, and hands them to the
//! router; it also delivers pushed events to the connections of this node (`hub`).

pub mod auth;
pub mod connection;
pub mod frame;
pub mod hub;
pub mod sessions;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use convoy_actors::domain::DomainConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::either::Either;

use crate::router::Router;

/// Per-connection limits and timeouts, from the configuration.
#[derive(Debug, Clone)]
pub struct GatewayLimits {
    pub max_frame_bytes: usize,
    pub requests_per_second: u32,
    pub request_burst: u32,
    pub rate_limit_strikes: u32,
    pub max_pending_requests: usize,
    pub outbound_queue: usize,
    pub max_connections: usize,
    pub hello_timeout: Duration,
    pub ping_interval: Duration,
    pub pong_timeout: Duration,
    pub request_timeout: Duration,
}

/// A client's socket: plain TCP, or TLS when the node has a client certificate.
pub type ClientStream = Either<TcpStream, tokio_rustls::server::TlsStream<TcpStream>>;

/// Read buffer per connection: tungstenite's default (128 KiB, allocated up front) would
/// cost ~90 KB per idle socket.
const READ_BUFFER: usize = 4096;
/// Bytes buffered before tungstenite writes without an explicit flush.
const WRITE_BUFFER: usize = 64 * 1024;

pub struct Gateway {
    pub node_name: String,
    pub limits: GatewayLimits,
    pub domain: DomainConfig,
    pub router: Router,
    pub hub: Arc<hub::Hub>,
    pub keys: Arc<auth::TokenKeys>,
    pub shutdown: watch::Receiver<bool>,
    pub sessions: sessions::Sessions,
    fresh_ids: AtomicU64,
    slots: Arc<Semaphore>,
    /// Distinguishes group ids assigned by this process from those of its restarts.
    incarnation: String,
}

impl Gateway {
    pub fn new(
        node_name: String,
        limits: GatewayLimits,
        domain: DomainConfig,
        router: Router,
        hub: Arc<hub::Hub>,
        keys: Arc<auth::TokenKeys>,
        shutdown: watch::Receiver<bool>,
    ) -> Gateway {
        let incarnation = format!("{:x}", rand::random::<u32>());
        let slots = Arc::new(Semaphore::new(limits.max_connections));
        let sessions = sessions::Sessions::new(router.clone(), domain.clone());
        Gateway {
            node_name,
            limits,
            domain,
            router,
            hub,
            keys,
            shutdown,
            sessions,
            fresh_ids: AtomicU64::new(1),
            slots,
            incarnation,
        }
    }

    /// Client connections open right now (upgrading or established).
    pub fn open_connections(&self) -> usize {
        self.limits.max_connections - self.slots.available_permits()
    }

    /// An id for an entity the client did not name (`g-...` groups, `t-...` tickets):
    /// unique across nodes and restarts.
    pub fn fresh_id(&self, prefix: &str) -> String {
        let n = self.fresh_ids.fetch_add(1, Ordering::Relaxed);
        format!("{prefix}-{}-{}-{n}", self.node_name, self.incarnation)
    }

    fn ws_config(&self) -> WebSocketConfig {
        WebSocketConfig::default()
            .read_buffer_size(READ_BUFFER)
            // Frames queue in the write buffer (it grows on demand) until the connection
            // flushes, once per batch of ready replies and pushes: one syscall, not one per frame.
            .write_buffer_size(WRITE_BUFFER)
            .max_write_buffer_size(self.limits.max_frame_bytes * 4 + (1 << 20))
            .max_message_size(Some(self.limits.max_frame_bytes))
            .max_frame_size(Some(self.limits.max_frame_bytes))
    }

    /// Accepts connections until shutdown; over TLS (`wss://`) when given an acceptor.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, tls: Option<TlsAcceptor>) {
        let slots = self.slots.clone();
        let mut shutdown = self.shutdown.clone();
        loop {
            let (tcp, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "accepting a client connection failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = shutdown.changed() => return,
            };
            let _ = tcp.set_nodelay(true);
            let gw = self.clone();
            let tls = tls.clone();
            let slot = slots.clone().try_acquire_owned().ok();
            tokio::spawn(async move {
                let full = slot.is_none();
                if full {
                    metrics::counter!("convoy_limit_hits_total", "limit" => "max_connections").increment(1);
                }
                let config = gw.ws_config();
                // Boxed: the TLS handshake and the upgrade take more than 8 KB of state, which
                // would otherwise stay in every connection's task for as long as it lives.
                #[allow(clippy::result_large_err)]
                let upgrade = Box::pin(async move {
                    let stream = match tls {
                        Some(tls) => Either::Right(tls.accept(tcp).await.map_err(|e| format!("TLS handshake: {e}"))?),
                        None => Either::Left(tcp),
                    };
                    tokio_tungstenite::accept_hdr_async_with_config(
                        stream,
                        |req: &Request, resp: Response| check_upgrade(req, resp, full),
                        Some(config),
                    )
                    .await
                    .map_err(|e| format!("websocket upgrade: {e}"))
                });
                // The TLS handshake and the upgrade count against the time to say hello.
                match tokio::time::timeout(gw.limits.hello_timeout, upgrade).await {
                    Ok(Ok(ws)) => connection::serve(ws, gw, peer).await,
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "client connection failed before hello"),
                    Err(_) => tracing::debug!(%peer, "client connection timed out before the websocket upgrade"),
                }
                drop(slot);
            });
        }
    }
}

fn refuse(status: StatusCode, body: &str) -> ErrorResponse {
    let mut resp = ErrorResponse::new(Some(body.to_string()));
    *resp.status_mut() = status;
    resp
}

#[allow(clippy::result_large_err)] // the signature tungstenite's handshake callback requires
fn check_upgrade(req: &Request, resp: Response, full: bool) -> Result<Response, ErrorResponse> {
    if req.uri().path() != "/v1/ws" {
        return Err(refuse(StatusCode::NOT_FOUND, "Convoy speaks protocol v1 at /v1/ws"));
    }
    if full {
        return Err(refuse(StatusCode::SERVICE_UNAVAILABLE, "this node is at its connection limit; try another node"));
    }
    Ok(resp)
}

pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}
