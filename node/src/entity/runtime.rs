//! The runtime as the domain sees it (`convoy_actors::behavior::Runtime`): proposals,
//! requests and queries go through the router to wherever the entity's leader is; pushes
//! go to the nodes where the users are connected and that were not voters of the shard as
//! of the entry (the voters push from their own apply, `fanout.rs`).

use std::sync::{Arc, OnceLock};

use convoy_actors::behavior::{ReplyFuture, Request, Runtime};
use convoy_actors::domain::{Command, DomainConfig, Query};
use convoy_actors::event::Event;
use convoy_actors::ids::UserId;
use convoy_actors::outbox::Webhook;
use convoy_actors::{EntityKey, Timestamp};

use crate::router::Router;
use crate::shard::NodeId;
use crate::webhook::WebhookSender;

/// Delivers events to the connected devices of users.
pub trait Pusher: Send + Sync + 'static {
    /// To this node's connections of `users`.
    fn deliver_here(&self, users: &[UserId], event: &Event);
    /// To the other nodes where some of `users` are connected, except `voters`, which
    /// deliver it themselves.
    fn send_to_peers(&self, users: &[UserId], event: &Event, voters: &[NodeId]);
    /// Whether a node outside `voters` (and not this one) has users connected, so that a
    /// leader has pushes to send at all.
    fn peers_beyond(&self, voters: &[NodeId]) -> bool;
}

#[derive(Clone)]
pub struct NodeRuntime {
    inner: Arc<Inner>,
    /// The nodes that push the events at hand themselves (the voters as of the applied
    /// entry): pushes go to the other nodes only.
    voters: Arc<[NodeId]>,
}

struct Inner {
    config: DomainConfig,
    router: OnceLock<Router>,
    pusher: Arc<dyn Pusher>,
    webhooks: WebhookSender,
}

impl NodeRuntime {
    pub fn new(config: DomainConfig, pusher: Arc<dyn Pusher>, webhooks: WebhookSender) -> NodeRuntime {
        NodeRuntime {
            inner: Arc::new(Inner { config, router: OnceLock::new(), pusher, webhooks }),
            voters: Arc::from([]),
        }
    }

    /// This runtime, for pushing the events of an entry whose voters were `voters`.
    pub fn with_voters(&self, voters: Arc<[NodeId]>) -> NodeRuntime {
        NodeRuntime { inner: self.inner.clone(), voters }
    }

    pub fn pusher(&self) -> Arc<dyn Pusher> {
        self.inner.pusher.clone()
    }

    /// The router exists after the shard hosts, which need this runtime: bind it once.
    pub fn bind_router(&self, router: Router) {
        let _ = self.inner.router.set(router);
    }

    fn router(&self) -> Router {
        self.inner.router.get().expect("the router is bound before any shard serves").clone()
    }
}

impl Runtime for NodeRuntime {
    fn now(&self) -> Timestamp {
        crate::shard::now()
    }

    fn config(&self) -> &DomainConfig {
        &self.inner.config
    }

    fn propose(&self, key: EntityKey, cmd: Command) -> ReplyFuture {
        let router = self.router();
        Box::pin(async move { router.propose(key, cmd).await })
    }

    fn request(&self, key: EntityKey, req: Request) -> ReplyFuture {
        let router = self.router();
        Box::pin(async move { router.request(key, req).await })
    }

    fn query(&self, key: EntityKey, q: Query) -> ReplyFuture {
        let router = self.router();
        Box::pin(async move { router.query(key, q).await })
    }

    fn push(&self, users: &[UserId], event: &Event) {
        if users.is_empty() {
            return;
        }
        self.inner.pusher.send_to_peers(users, event, &self.voters);
    }

    fn spawn(&self, task: ReplyFuture) {
        tokio::spawn(async move {
            if let Err(e) = task.await {
                tracing::debug!(error = %e, "background entity task failed; the entity retries from its state");
            }
        });
    }

    fn webhook(&self, hook: &Webhook) -> ReplyFuture {
        let (rt, hook) = (self.clone(), hook.clone());
        Box::pin(async move {
            rt.inner.webhooks.post(&hook).await?;
            Ok(convoy_actors::domain::Reply::Fired)
        })
    }
}
