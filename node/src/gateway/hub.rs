//! The connections of this node, by user: where pushes for local users are delivered.
//! Each connection has a bounded outbound queue; a connection whose queue is full is told
//! to close (a slow reader is dropped, never buffered without bound).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use convoy_actors::Timestamp;
use convoy_actors::ids::UserId;
use parking_lot::{Mutex, RwLock};
use tokio::sync::{Notify, mpsc};
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::telemetry::trace::{self, TARGET as TRACE};

/// Where the hub delivers one connection's frames.
pub struct ConnSink {
    pub id: u64,
    /// The device the client named in `hello`; connections without one count as devices of
    /// their own.
    pub device: Option<Arc<str>>,
    pub frames: mpsc::Sender<Utf8Bytes>,
    /// Notified when the queue overflowed: the connection must close.
    pub overflow: Arc<Notify>,
}

/// Users who came online here (`true`) or went offline (`false`), in order, for the
/// cluster's presence directory.
#[derive(Default)]
pub struct PresenceChanges {
    pub changes: Vec<(UserId, bool)>,
    /// Too many changes piled up: send the full list instead.
    pub overflowed: bool,
    /// Number of the last change taken.
    pub through: u64,
}

/// Changes kept before the presence directory must resync from the full list.
const MAX_PENDING_CHANGES: usize = 65_536;

pub struct Hub {
    users: RwLock<HashMap<UserId, Vec<ConnSink>>>,
    next_id: AtomicU64,
    changes: Mutex<PresenceChanges>,
    changed: Notify,
    /// Changes are numbered; this is the highest number every reachable peer has applied.
    announced: tokio::sync::watch::Sender<u64>,
    noted: AtomicU64,
}

impl Default for Hub {
    fn default() -> Self {
        Hub {
            users: RwLock::default(),
            next_id: AtomicU64::new(0),
            changes: Mutex::default(),
            changed: Notify::new(),
            announced: tokio::sync::watch::channel(0).0,
            noted: AtomicU64::new(0),
        }
    }
}

/// Unregisters a connection when dropped.
pub struct Registration {
    hub: Arc<Hub>,
    user: UserId,
    id: u64,
    /// The presence change this connection caused, if it was the user's first here.
    pub announces: Option<u64>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.hub.unregister(&self.user, self.id);
    }
}

/// Whether a connection from `device` would be the first of that device among `conns`.
fn is_new_device(conns: &[ConnSink], device: Option<&str>) -> bool {
    device.is_none_or(|d| !conns.iter().any(|c| c.device.as_deref() == Some(d)))
}

impl Hub {
    pub fn register(
        self: &Arc<Self>,
        user: UserId,
        device: Option<Arc<str>>,
        frames: mpsc::Sender<Utf8Bytes>,
        overflow: Arc<Notify>,
    ) -> Registration {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut users = self.users.write();
        let conns = users.entry(user.clone()).or_default();
        let announces = conns.is_empty().then(|| self.note(&user, true));
        if is_new_device(conns, device.as_deref()) {
            metrics::gauge!("convoy_devices_connected").increment(1.0);
        }
        conns.push(ConnSink { id, device, frames, overflow });
        metrics::gauge!("convoy_users_connected").set(users.len() as f64);
        Registration { hub: self.clone(), user, id, announces }
    }

    fn unregister(&self, user: &UserId, id: u64) {
        let mut users = self.users.write();
        if let Some(conns) = users.get_mut(user) {
            if let Some(at) = conns.iter().position(|c| c.id == id) {
                let gone = conns.swap_remove(at);
                if is_new_device(conns, gone.device.as_deref()) {
                    metrics::gauge!("convoy_devices_connected").decrement(1.0);
                }
            }
            if conns.is_empty() {
                users.remove(user);
                self.note(user, false);
            }
        }
        metrics::gauge!("convoy_users_connected").set(users.len() as f64);
    }

    fn note(&self, user: &UserId, online: bool) -> u64 {
        let mut c = self.changes.lock();
        let number = self.noted.fetch_add(1, Ordering::SeqCst) + 1;
        c.through = number;
        if c.changes.len() >= MAX_PENDING_CHANGES {
            c.overflowed = true;
            c.changes.clear();
        }
        if !c.overflowed {
            c.changes.push((user.clone(), online));
        }
        drop(c);
        self.changed.notify_one();
        number
    }

    /// Every reachable peer applied the presence changes through `number`.
    pub fn announced(&self, number: u64) {
        self.announced.send_if_modified(|a| {
            let newer = number > *a;
            if newer {
                *a = number;
            }
            newer
        });
    }

    /// Waits (at most `timeout`) until presence change `number` reached every reachable peer:
    /// from then on, pushes from any node find this connection.
    pub async fn wait_announced(&self, number: u64, timeout: std::time::Duration) {
        let mut rx = self.announced.subscribe();
        let _ = tokio::time::timeout(timeout, rx.wait_for(|a| *a >= number)).await;
    }

    /// Takes the presence changes since the last call.
    pub fn take_changes(&self) -> PresenceChanges {
        std::mem::take(&mut *self.changes.lock())
    }

    /// Resolves when users came or went.
    pub async fn changed(&self) {
        self.changed.notified().await
    }

    /// Every user connected here.
    pub fn users(&self) -> Vec<UserId> {
        self.users.read().keys().cloned().collect()
    }

    /// Whether any of `users` is connected here.
    pub fn any_connected(&self, users: &[UserId]) -> bool {
        let map = self.users.read();
        users.iter().any(|u| map.contains_key(u))
    }

    /// Queues `frame` on every connection of `users`; returns how many took it. A message's
    /// `committed_at` times its push latency.
    pub fn deliver(&self, users: &[UserId], frame: &Utf8Bytes, committed_at: Option<Timestamp>) -> usize {
        let users_map = self.users.read();
        let mut delivered = 0;
        for user in users {
            let Some(conns) = users_map.get(user) else { continue };
            for c in conns {
                let _push =
                    trace::child(|| tracing::info_span!(target: TRACE, "push", user = %user, conn = c.id)).entered();
                match c.frames.try_send(frame.clone()) {
                    Ok(()) => delivered += 1,
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        metrics::counter!("convoy_pushes_dropped_total", "reason" => "slow_reader").increment(1);
                        c.overflow.notify_one();
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => {}
                }
            }
        }
        metrics::counter!("convoy_push_deliveries_total").increment(delivered as u64);
        if let Some(at) = committed_at.filter(|_| delivered > 0) {
            let millis = crate::shard::now().0.saturating_sub(at.0);
            metrics::histogram!("convoy_push_seconds").record(millis as f64 / 1000.0);
        }
        delivered
    }
}
