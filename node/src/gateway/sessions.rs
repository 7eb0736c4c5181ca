//! Sessions the domain wants to hear about (agents, whose skill queues assign them work):
//! the domain's `behavior::presence` requests go out when a user's first connection here
//! opens and again every refresh while one stays; `behavior::absence` requests go out when
//! the last one closes. Users the domain has nothing to say about cost nothing here.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use convoy_actors::EntityKey;
use convoy_actors::behavior::{self, Request};
use convoy_actors::domain::DomainConfig;
use convoy_actors::ids::UserId;
use convoy_actors::principal::Principal;
use parking_lot::Mutex;

use crate::router::Router;

#[derive(Clone)]
pub struct Sessions {
    inner: Arc<Inner>,
}

struct Inner {
    router: Router,
    domain: DomainConfig,
    /// Users with presence requests, and how many of their connections are open here.
    open: Mutex<HashMap<UserId, (Principal, usize)>>,
}

/// Ends the session's presence when dropped (the connection closed).
pub struct SessionGuard {
    sessions: Sessions,
    user: UserId,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        let mut open = self.sessions.inner.open.lock();
        let Some((_, count)) = open.get_mut(&self.user) else { return };
        *count -= 1;
        if *count == 0 {
            let principal = open.remove(&self.user).expect("just found").0;
            drop(open);
            self.sessions.send(behavior::absence(&principal));
        }
    }
}

impl Sessions {
    pub fn new(router: Router, domain: DomainConfig) -> Sessions {
        let sessions = Sessions { inner: Arc::new(Inner { router, domain, open: Mutex::new(HashMap::new()) }) };
        tokio::spawn(sessions.clone().refresh());
        sessions
    }

    /// A connection of `principal` authenticated. `None` when the domain does not care.
    pub fn opened(&self, principal: &Principal) -> Option<SessionGuard> {
        let requests = behavior::presence(principal, &self.inner.domain);
        if requests.is_empty() {
            return None;
        }
        let mut open = self.inner.open.lock();
        let entry = open.entry(principal.user.clone()).or_insert_with(|| (principal.clone(), 0));
        entry.1 += 1;
        let first = entry.1 == 1;
        drop(open);
        if first {
            self.send(requests);
        }
        Some(SessionGuard { sessions: self.clone(), user: principal.user.clone() })
    }

    fn send(&self, requests: Vec<(EntityKey, Request)>) {
        for (key, req) in requests {
            let router = self.inner.router.clone();
            tokio::spawn(async move {
                if let Err(e) = router.request(key.clone(), req).await {
                    // The next refresh reports again.
                    tracing::debug!(entity = %key, error = %e, "presence report failed");
                }
            });
        }
    }

    async fn refresh(self) {
        let every = Duration::from_millis(self.inner.domain.tickets.presence_refresh_ms.max(100));
        loop {
            tokio::time::sleep(every).await;
            if Arc::strong_count(&self.inner) == 1 {
                return;
            }
            let principals: Vec<Principal> = self.inner.open.lock().values().map(|(p, _)| p.clone()).collect();
            for p in principals {
                self.send(behavior::presence(&p, &self.inner.domain));
            }
        }
    }
}
