//! Entity actors: one local ractor actor per active entity of a shard this node leads.
//!
//! An actor serializes its entity's requests and effects: it runs the domain's
//! `behavior::handle` against the committed state, lets proposals and calls to other
//! entities run as tasks of their own, and acts on what the state machine applied
//! (pushes to nodes that are not voters, queue offers) in log order. Pushes to this node's
//! own connections come from its own apply while it is a voter (`fanout.rs`), leader or not.
//! Actors start on the first request, stop after `entity_idle`
//! without work, and all stop at once when the node loses the shard's leadership. A
//! supervisor removes failed actors; their queued requests are answered `unavailable`
//! (the caller sees the reply channel close), and the next request starts a fresh actor
//! from the stored state.

mod fanout;
mod runtime;
mod timers;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use convoy_actors::behavior::{self, Handling, Pushes, Request};
use convoy_actors::domain::Reply;
use convoy_actors::{EntityKey, ErrorCode, Rejection};
pub use fanout::ReplicaFanout;
use parking_lot::Mutex;
use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, SupervisionEvent};
use ractor_cluster::RactorMessage;
pub use runtime::{NodeRuntime, Pusher};
pub use timers::run_timers;
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;

use openraft::type_config::async_runtime::WatchReceiver;

use crate::shard::{AppliedEffects, AppliedSink, NodeId, Raft, RaftGroupId, ShardData};
use crate::telemetry::trace::{self, TARGET as TRACE};

/// Bounds on entity actors, from the configuration.
#[derive(Debug, Clone, Copy)]
pub struct EntityLimits {
    /// Requests queued for one entity before new ones are refused.
    pub mailbox: usize,
    /// Actors alive on this node, over every shard.
    pub max_active: usize,
    /// An actor with nothing to do for this long stops.
    pub idle: Duration,
}

/// Applied effects waiting for the dispatcher, per shard.
const EFFECTS_QUEUE: usize = 4096;

#[derive(RactorMessage)]
pub enum EntityMsg {
    /// The actor answers with how to finish the request; a proposal or a call to another
    /// entity runs in the caller's task, not in the actor.
    Request { req: Box<Request>, reply: oneshot::Sender<Handling> },
    /// What the shard applied; `pushes` says whether to send its pushes to other nodes.
    Applied { effects: Arc<AppliedEffects>, pushes: Pushes },
    /// Fail on purpose (fault injection), after hanging this long: the supervisor forgets
    /// the actor, the next request starts a fresh one from the stored state.
    Crash { hang: Duration },
}

struct Handle {
    actor: ActorRef<EntityMsg>,
    queued: Arc<AtomicUsize>,
    last_used: Arc<AtomicU64>,
}

/// The entity actors of one shard.
pub struct EntityHost {
    group: RaftGroupId,
    runtime: NodeRuntime,
    limits: EntityLimits,
    active_on_node: Arc<AtomicUsize>,
    data: OnceLock<Arc<ShardData>>,
    actors: Mutex<HashMap<EntityKey, Handle>>,
    by_id: Mutex<HashMap<ActorId, EntityKey>>,
    serving: AtomicBool,
    supervisor: OnceLock<ActorRef<SupervisorMsg>>,
    effects: mpsc::Sender<Vec<(Arc<AppliedEffects>, Pushes)>>,
    started: Instant,
}

fn unavailable(message: impl Into<String>) -> Rejection {
    Rejection::new(ErrorCode::Unavailable, message)
}

/// The supervisor holds the host only weakly: without this it would outlive a shard that
/// stopped (a retired or restarted shard).
impl Drop for EntityHost {
    fn drop(&mut self) {
        if let Some(supervisor) = self.supervisor.get() {
            supervisor.stop(None);
        }
    }
}

impl EntityHost {
    pub async fn new(
        group: RaftGroupId,
        runtime: NodeRuntime,
        limits: EntityLimits,
        active_on_node: Arc<AtomicUsize>,
    ) -> Result<Arc<EntityHost>, ractor::SpawnErr> {
        let (effects, effects_rx) = mpsc::channel(EFFECTS_QUEUE);
        let host = Arc::new(EntityHost {
            group,
            runtime,
            limits,
            active_on_node,
            data: OnceLock::new(),
            actors: Mutex::new(HashMap::new()),
            by_id: Mutex::new(HashMap::new()),
            serving: AtomicBool::new(false),
            supervisor: OnceLock::new(),
            effects,
            started: Instant::now(),
        });
        let (supervisor, _) = Actor::spawn(None, Supervisor, Arc::downgrade(&host)).await?;
        let _ = host.supervisor.set(supervisor);
        tokio::spawn(dispatch_effects(Arc::downgrade(&host), effects_rx));
        tokio::spawn(sweep_idle(Arc::downgrade(&host)));
        Ok(host)
    }

    /// Binds the host to its shard's data (once, when the shard starts), and this node's
    /// connections to what the shard applies.
    pub fn attach(&self, data: Arc<ShardData>, me: NodeId, raft: &Raft) {
        // The newest entry this node knows of: the commit the leader reported, or its own log
        // (after a restart the former is unknown until the leader speaks).
        let metrics = raft.data_metrics();
        let frontier = move || {
            let m = metrics.borrow_watched();
            m.cluster_committed.max(m.last_log).map_or(0, |l| l.index())
        };
        data.set_fanout(fanout::ReplicaFanout::start(&data, self.runtime.pusher(), me, frontier));
        let _ = self.data.set(data);
    }

    fn data(&self) -> &Arc<ShardData> {
        self.data.get().expect("the shard attaches its data before serving")
    }

    fn millis(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// The node leads the shard (barrier passed): take requests and applied effects.
    pub fn start_serving(self: &Arc<Self>) {
        self.serving.store(true, Ordering::SeqCst);
        self.data().set_sink(Some(self.clone() as Arc<dyn AppliedSink>));
    }

    /// The node lost the shard: stop every actor now.
    pub fn stop_all(&self) {
        self.serving.store(false, Ordering::SeqCst);
        if let Some(data) = self.data.get() {
            data.set_sink(None);
        }
        let stopped: Vec<(EntityKey, Handle)> = self.actors.lock().drain().collect();
        self.by_id.lock().clear();
        self.active_on_node.fetch_sub(stopped.len(), Ordering::SeqCst);
        for (key, h) in stopped {
            metrics::gauge!("convoy_entities_alive", "kind" => key.kind().as_str()).decrement(1.0);
            h.actor.stop(Some("shard leadership lost".into()));
        }
        metrics::gauge!("convoy_entities_active", "group" => self.group.to_string()).set(0.0);
    }

    /// Makes the active actor of `key` fail after hanging for `hang` (requests queue behind
    /// it meanwhile). False if it was not active.
    pub fn crash(&self, key: &EntityKey, hang: Duration) -> bool {
        let actor = self.actors.lock().get(key).map(|h| h.actor.clone());
        actor.is_some_and(|a| a.cast(EntityMsg::Crash { hang }).is_ok())
    }

    pub fn active(&self) -> usize {
        self.actors.lock().len()
    }

    pub fn is_active(&self, key: &EntityKey) -> bool {
        self.actors.lock().contains_key(key)
    }

    async fn actor_for(&self, key: &EntityKey) -> Result<(ActorRef<EntityMsg>, Arc<AtomicUsize>), Rejection> {
        if let Some(h) = self.actors.lock().get(key) {
            h.last_used.store(self.millis(), Ordering::Relaxed);
            return Ok((h.actor.clone(), h.queued.clone()));
        }
        if !self.serving.load(Ordering::SeqCst) {
            return Err(unavailable(format!("{} is not led here", self.group)));
        }
        if self.active_on_node.fetch_add(1, Ordering::SeqCst) >= self.limits.max_active {
            self.active_on_node.fetch_sub(1, Ordering::SeqCst);
            metrics::counter!("convoy_limit_hits_total", "limit" => "max_active_entities").increment(1);
            return Err(unavailable("this node holds as many active entities as it may; retry shortly"));
        }
        let queued = Arc::new(AtomicUsize::new(0));
        let last_used = Arc::new(AtomicU64::new(self.millis()));
        let args = EntityArgs {
            key: key.clone(),
            data: self.data().clone(),
            runtime: self.runtime.clone(),
            queued: queued.clone(),
        };
        let supervisor = self.supervisor.get().expect("set at construction").get_cell();
        let spawned = Actor::spawn_linked(None, EntityActor, args, supervisor).await;
        let (actor, _) = match spawned {
            Ok(a) => a,
            Err(e) => {
                self.active_on_node.fetch_sub(1, Ordering::SeqCst);
                return Err(Rejection::new(ErrorCode::Internal, format!("starting {key}: {e}")));
            }
        };
        let mut actors = self.actors.lock();
        // Another request may have started it meanwhile: keep the first, stop ours.
        if let Some(h) = actors.get(key) {
            self.active_on_node.fetch_sub(1, Ordering::SeqCst);
            actor.stop(None);
            return Ok((h.actor.clone(), h.queued.clone()));
        }
        if !self.serving.load(Ordering::SeqCst) {
            self.active_on_node.fetch_sub(1, Ordering::SeqCst);
            actor.stop(None);
            return Err(unavailable(format!("{} is not led here", self.group)));
        }
        self.by_id.lock().insert(actor.get_id(), key.clone());
        actors.insert(key.clone(), Handle { actor: actor.clone(), queued: queued.clone(), last_used });
        metrics::counter!("convoy_entity_activations_total", "kind" => key.kind().as_str()).increment(1);
        metrics::gauge!("convoy_entities_alive", "kind" => key.kind().as_str()).increment(1.0);
        metrics::gauge!("convoy_entities_active", "group" => self.group.to_string()).set(actors.len() as f64);
        Ok((actor, queued))
    }

    /// Delivers `req` to `key`'s actor and waits for the answer.
    pub async fn request(&self, key: EntityKey, req: Request) -> Result<Reply, Rejection> {
        let span = trace::child(|| tracing::info_span!(target: TRACE, "entity", entity = %key));
        self.request_in_actor(key, req).instrument(span).await
    }

    async fn request_in_actor(&self, key: EntityKey, req: Request) -> Result<Reply, Rejection> {
        let (actor, queued) = self.actor_for(&key).await?;
        let depth = queued.fetch_add(1, Ordering::SeqCst);
        metrics::histogram!("convoy_entity_mailbox_depth").record(depth as f64);
        if depth >= self.limits.mailbox {
            queued.fetch_sub(1, Ordering::SeqCst);
            metrics::counter!("convoy_limit_hits_total", "limit" => "entity_mailbox").increment(1);
            return Err(Rejection::new(ErrorCode::RateLimited, format!("{key} has too many requests queued")));
        }
        let (tx, rx) = oneshot::channel();
        let started = std::time::Instant::now();
        if actor.cast(EntityMsg::Request { req: Box::new(req), reply: tx }).is_err() {
            queued.fetch_sub(1, Ordering::SeqCst);
            self.forget_actor(&actor.get_id());
            return Err(unavailable(format!("{key} was restarting; retry")));
        }
        let handling = rx.await;
        metrics::histogram!("convoy_entity_mailbox_seconds").record(started.elapsed().as_secs_f64());
        match handling {
            Ok(Handling::Done(r)) => r,
            Ok(Handling::Task(task)) => task.await,
            Err(_) => Err(unavailable(format!("{key} stopped before answering; retry"))),
        }
    }

    fn forget_actor(&self, id: &ActorId) -> Option<EntityKey> {
        let key = self.by_id.lock().remove(id)?;
        let mut actors = self.actors.lock();
        if actors.get(&key).is_some_and(|h| h.actor.get_id() == *id) {
            actors.remove(&key);
            metrics::gauge!("convoy_entities_alive", "kind" => key.kind().as_str()).decrement(1.0);
            self.active_on_node.fetch_sub(1, Ordering::SeqCst);
            metrics::gauge!("convoy_entities_active", "group" => self.group.to_string()).set(actors.len() as f64);
        }
        Some(key)
    }

    fn sweep(&self) {
        let now = self.millis();
        let idle_ms = self.limits.idle.as_millis() as u64;
        let idle: Vec<(&'static str, ActorRef<EntityMsg>)> = self
            .actors
            .lock()
            .iter()
            .filter(|(_, h)| {
                now.saturating_sub(h.last_used.load(Ordering::Relaxed)) >= idle_ms
                    && h.queued.load(Ordering::SeqCst) == 0
            })
            .map(|(k, h)| (k.kind().as_str(), h.actor.clone()))
            .collect();
        for (kind, actor) in idle {
            // The supervisor forgets it when it has stopped.
            actor.stop(Some("idle".into()));
            metrics::counter!("convoy_entity_passivations_total", "kind" => kind).increment(1);
        }
    }
}

impl AppliedSink for EntityHost {
    fn applied(&self, effects: Vec<Arc<AppliedEffects>>) {
        // The voters push to their own connections; the actors send to the other nodes,
        // when one of them has users connected, and act for the entities that act.
        let pusher = self.runtime.pusher();
        let effects: Vec<(Arc<AppliedEffects>, Pushes)> = effects
            .into_iter()
            .map(|e| {
                let pushes = if pusher.peers_beyond(&e.voters) { e.pushes } else { Pushes::Skip };
                (e, pushes)
            })
            .filter(|(e, pushes)| *pushes == Pushes::Send || behavior::acts_on_applied(&e.key))
            .collect();
        if effects.is_empty() {
            return;
        }
        if self.effects.try_send(effects).is_err() {
            // Pushes are best effort; sync is the guarantee.
            metrics::counter!("convoy_pushes_dropped_total", "reason" => "effects_queue_full").increment(1);
        }
    }
}

/// Hands applied effects to actors in log order, starting actors that are not active
/// (entries committed by a previous leader and applied here since this node leads still get
/// sent to the nodes that are not voters).
async fn dispatch_effects(host: Weak<EntityHost>, mut rx: mpsc::Receiver<Vec<(Arc<AppliedEffects>, Pushes)>>) {
    while let Some(batch) = rx.recv().await {
        let Some(host) = host.upgrade() else { return };
        for (effects, pushes) in batch {
            let Ok((actor, _)) = host.actor_for(&effects.key).await else { continue };
            let _ = actor.cast(EntityMsg::Applied { effects, pushes });
        }
    }
}

async fn sweep_idle(host: Weak<EntityHost>) {
    loop {
        let period = match host.upgrade() {
            Some(h) => (h.limits.idle / 4).max(Duration::from_millis(100)),
            None => return,
        };
        tokio::time::sleep(period).await;
        match host.upgrade() {
            Some(h) => h.sweep(),
            None => return,
        }
    }
}

struct EntityArgs {
    key: EntityKey,
    data: Arc<ShardData>,
    runtime: NodeRuntime,
    queued: Arc<AtomicUsize>,
}

struct EntityActor;

impl Actor for EntityActor {
    type Msg = EntityMsg;
    type State = EntityArgs;
    type Arguments = EntityArgs;

    async fn pre_start(&self, _: ActorRef<EntityMsg>, args: EntityArgs) -> Result<EntityArgs, ActorProcessingErr> {
        Ok(args)
    }

    async fn handle(
        &self,
        _: ActorRef<EntityMsg>,
        msg: EntityMsg,
        s: &mut EntityArgs,
    ) -> Result<(), ActorProcessingErr> {
        let state = s.data.state(&s.key).map_err(|e| format!("{}: reading state: {e}", s.key))?;
        match msg {
            EntityMsg::Request { req, reply } => {
                s.queued.fetch_sub(1, Ordering::SeqCst);
                let _ = reply.send(behavior::handle(&s.key, state.as_deref(), *req, &s.runtime));
            }
            EntityMsg::Applied { effects, pushes } => {
                fanout::span(&effects).in_scope(|| {
                    behavior::on_applied(
                        &s.key,
                        state.as_deref(),
                        &effects.appended,
                        &effects.notices,
                        pushes,
                        &s.runtime.with_voters(effects.voters.clone()),
                    )
                });
            }
            EntityMsg::Crash { hang } => {
                tokio::time::sleep(hang).await;
                return Err(format!("{}: crash injected through the chaos admin API", s.key).into());
            }
        }
        Ok(())
    }
}

#[derive(RactorMessage)]
pub struct SupervisorMsg;

/// Watches the shard's entity actors; forgets those that stop, logs those that fail.
struct Supervisor;

impl Actor for Supervisor {
    type Msg = SupervisorMsg;
    type State = Weak<EntityHost>;
    type Arguments = Weak<EntityHost>;

    async fn pre_start(
        &self,
        _: ActorRef<SupervisorMsg>,
        host: Weak<EntityHost>,
    ) -> Result<Weak<EntityHost>, ActorProcessingErr> {
        Ok(host)
    }

    async fn handle_supervisor_evt(
        &self,
        _: ActorRef<SupervisorMsg>,
        event: SupervisionEvent,
        host: &mut Weak<EntityHost>,
    ) -> Result<(), ActorProcessingErr> {
        let Some(host) = host.upgrade() else { return Ok(()) };
        match event {
            SupervisionEvent::ActorFailed(cell, err) => {
                let key = host.forget_actor(&cell.get_id());
                tracing::error!(entity = ?key.map(|k| k.to_string()), error = %err, "entity actor failed; the next request restarts it from stored state");
                metrics::counter!("convoy_entity_failures_total").increment(1);
            }
            SupervisionEvent::ActorTerminated(cell, _, _) => {
                host.forget_actor(&cell.get_id());
            }
            _ => {}
        }
        Ok(())
    }
}
