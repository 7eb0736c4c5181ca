//! What an entity does on the leader beyond applying commands: refusing early, asking
//! other entities, pushing events. The runtime hosts one actor per active entity and calls
//! these functions from it; they reach the world only through [`Runtime`].

use std::future::Future;
use std::pin::Pin;

use crate::domain::{Command, DomainConfig, EntityState, Notice, Query, Reply};
use crate::entity::{Caller, EntityKey, Timestamp};
use crate::error::{ErrorCode, Rejection};
use crate::event::Event;
use crate::group::{self, Entry, GroupCommand, GroupState, GroupTimer};
use crate::ids::{GroupId, SkillGroup, TicketId, UserId};
use crate::outbox::{Delivery, DeliveryResult, Lane, Outbox, Pending, Webhook};
use crate::principal::{Principal, Role};
use crate::queue::{QueueCommand, QueueTimer, SkillQueueState, sort_summaries};
use crate::ticket::{OpenTicket, TicketCommand, TicketState, TicketStatus, TicketSummary, TicketTimer};
use crate::user::{UserCommand, UserState};

pub type ReplyFuture = Pin<Box<dyn Future<Output = Result<Reply, Rejection>> + Send + 'static>>;

/// The runtime as entities see it. Failures of the runtime itself (no leader, timeouts)
/// come back as rejections with code `unavailable` or `internal`.
pub trait Runtime: Clone + Send + Sync + 'static {
    /// The leader's clock, stamped into commands.
    fn now(&self) -> Timestamp;
    fn config(&self) -> &DomainConfig;
    /// Appends `cmd` to the log of `key`'s shard; resolves with the reply of applying it.
    fn propose(&self, key: EntityKey, cmd: Command) -> ReplyFuture;
    /// Hands `req` to the actor of `key`, wherever its leader is.
    fn request(&self, key: EntityKey, req: Request) -> ReplyFuture;
    /// A linearizable read of `key`'s committed state.
    fn query(&self, key: EntityKey, q: Query) -> ReplyFuture;
    /// Best effort: every connected device of `users` receives `event`.
    fn push(&self, users: &[UserId], event: &Event);
    /// Runs `task` in the background; its failure is logged, never answered.
    fn spawn(&self, task: ReplyFuture);
    /// Posts `hook` to the configured webhook URL, signed; succeeds at once when none is configured.
    fn webhook(&self, hook: &Webhook) -> ReplyFuture;
}

/// A request to an entity's actor: from a client, another entity or the runtime's timers.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Request {
    Group(GroupCommand),
    User(UserCommand),
    Ticket(TicketCommand),
    Queue(QueueCommand),
    /// `inbox.sync` for the caller.
    Inbox {
        caller: Caller,
    },
    /// `ticket.open`: one ticket per category, opened through the first ticket's actor.
    OpenTickets {
        who: Principal,
        tickets: Vec<(TicketId, OpenTicket)>,
    },
    /// `ticket.list` for the caller, through their own user entity.
    ListTickets {
        who: Principal,
        filter: TicketFilter,
    },
}

/// What `ticket.list` narrows to.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct TicketFilter {
    pub state: Option<TicketStatus>,
    pub skill_group: Option<SkillGroup>,
    pub assignee: Option<UserId>,
}

/// Most tickets one `ticket.list` returns.
pub const LIST_LIMIT: usize = 500;
/// Tickets or queues a list or open asks at once.
const FAN_OUT_CONCURRENCY: usize = 32;

/// How the actor answers: at once, or by a task that runs outside the actor (proposals
/// and calls to other entities), so one slow request never holds up the next.
pub enum Handling {
    Done(Result<Reply, Rejection>),
    Task(ReplyFuture),
}

impl std::fmt::Debug for Handling {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Handling::Done(r) => f.debug_tuple("Done").field(r).finish(),
            Handling::Task(_) => f.write_str("Task(..)"),
        }
    }
}

fn propose<R: Runtime>(rt: &R, key: &EntityKey, cmd: Command) -> Handling {
    Handling::Task(rt.propose(key.clone(), cmd))
}

/// Handles one request on the leader. `state` is the entity's committed state.
pub fn handle<R: Runtime>(key: &EntityKey, state: Option<&EntityState>, req: Request, rt: &R) -> Handling {
    match (key, req) {
        (EntityKey::Group(id), Request::Group(cmd)) => {
            let group = match state {
                Some(EntityState::Group(g)) => Some(g),
                _ => None,
            };
            handle_group(id, group, cmd, rt)
        }
        (EntityKey::User(_), Request::User(cmd)) => {
            let user = match state {
                Some(EntityState::User(u)) => Some(u),
                _ => None,
            };
            match UserState::check(user, &cmd) {
                Err(r) => Handling::Done(Err(r)),
                Ok(()) => propose(rt, key, Command::User(cmd)),
            }
        }
        (EntityKey::User(_), Request::Inbox { caller }) => inbox_sync(key.clone(), caller, rt.clone()),
        (EntityKey::User(_), Request::ListTickets { who, filter }) => list_tickets(who, filter, rt.clone()),
        (EntityKey::Ticket(_), Request::OpenTickets { who, tickets }) => open_tickets(key, who, tickets, rt),
        (EntityKey::Ticket(_), Request::Ticket(cmd)) => {
            let ticket = match state {
                Some(EntityState::Ticket(t)) => Some(t),
                _ => None,
            };
            if let TicketCommand::Fire(TicketTimer::Outbox(lane)) = cmd {
                let outbox = ticket.map(|t| &t.outbox);
                return deliver_outbox(key, outbox, lane, rt, |results, max_attempts| {
                    Command::Ticket(TicketCommand::Settle { results, max_attempts })
                });
            }
            match TicketState::check(ticket, &cmd) {
                Err(r) => Handling::Done(Err(r)),
                Ok(()) => propose(rt, key, Command::Ticket(cmd)),
            }
        }
        (EntityKey::SkillQueue(_), Request::Queue(cmd)) => {
            let queue = match state {
                Some(EntityState::SkillQueue(q)) => Some(q),
                _ => None,
            };
            handle_queue(key, queue, cmd, rt)
        }
        (key, req) => Handling::Done(Err(Rejection::new(ErrorCode::Internal, format!("{key} cannot handle {req:?}")))),
    }
}

fn handle_group<R: Runtime>(id: &GroupId, state: Option<&GroupState>, cmd: GroupCommand, rt: &R) -> Handling {
    if let Err(refused) = GroupState::check(state, &cmd) {
        // A retry of a message sent before the group closed or the sender left still gets
        // its seq back; anything else refused here is refused without a write.
        if let (Some(_), GroupCommand::Send(send)) = (state, &cmd)
            && matches!(refused.code, ErrorCode::Conflict | ErrorCode::Forbidden)
        {
            let sent_before =
                Query::SentBefore { sender: send.from.user.clone(), client_msg_id: send.client_msg_id.clone() };
            let reply = rt.query(EntityKey::Group(id.clone()), sent_before);
            return Handling::Task(Box::pin(async move {
                match reply.await {
                    Err(r) if r.code == ErrorCode::NotFound => Err(refused),
                    other => other,
                }
            }));
        }
        return Handling::Done(Err(refused));
    }
    let key = EntityKey::Group(id.clone());
    if let GroupCommand::Fire(GroupTimer::Outbox(lane)) = cmd {
        return deliver_outbox(&key, state.map(|g| &g.outbox), lane, rt, |results, max_attempts| {
            Command::Group(GroupCommand::Settle { results, max_attempts })
        });
    }
    match cmd {
        // Reopening: the first open listed the group in every inbox before committing.
        GroupCommand::Open(_) if state.is_some() => {
            Handling::Done(Ok(Reply::Opened { group: id.clone(), created: false }))
        }
        GroupCommand::Open(_) | GroupCommand::Invite { .. } => {
            // Inboxes list the group before the group admits anyone, so a member's inbox
            // always names it (see user.rs).
            let joining = group::joining_users(&cmd);
            let members = state.map(|s| &s.members);
            let newcomers: Vec<UserId> =
                joining.iter().filter(|u| !members.is_some_and(|m| m.contains_key(*u))).cloned().collect();
            let rt = rt.clone();
            let group = id.clone();
            Handling::Task(Box::pin(async move {
                let max_groups = rt.config().max_groups_per_user;
                let joins = joining.iter().map(|user| {
                    let join = UserCommand::Join { group: group.clone(), max_groups };
                    let reply = rt.request(EntityKey::User(user.clone()), Request::User(join));
                    async move { reply.await.map_err(|r| Rejection { message: format!("{user}: {}", r.message), ..r }) }
                });
                // The users whose inbox this request listed the group in (it was not there).
                let mut listed = Vec::new();
                let mut refused = None;
                for (user, joined) in joining.iter().zip(futures::future::join_all(joins).await) {
                    match joined {
                        Ok(Reply::Updated { changed: true }) => listed.push(user),
                        Ok(_) => {}
                        Err(r) => drop(refused.get_or_insert(r)),
                    }
                }
                let (outcome, admitted_nobody) = match refused {
                    Some(r) => (Err(r), true),
                    None => {
                        let outcome = rt.propose(key, Command::Group(cmd)).await;
                        // After `unavailable` or `internal` the group may have admitted them.
                        let definite = outcome
                            .as_ref()
                            .is_err_and(|r| !matches!(r.code, ErrorCode::Unavailable | ErrorCode::Internal));
                        (outcome, definite)
                    }
                };
                // Take the group out of the inboxes this request put it in, or it would count
                // against those users' group limit for good. Requests to this group are handled
                // one at a time, so nothing admitted them meanwhile.
                if admitted_nobody {
                    let forgets = listed.into_iter().filter(|u| newcomers.contains(u)).map(|user| {
                        rt.request(
                            EntityKey::User(user.clone()),
                            Request::User(UserCommand::Forget { group: group.clone() }),
                        )
                    });
                    let _ = futures::future::join_all(forgets).await;
                }
                outcome
            }))
        }
        GroupCommand::Remove { ref user, .. } | GroupCommand::Leave { ref user } => {
            let user = user.clone();
            let rt = rt.clone();
            let group = id.clone();
            Handling::Task(Box::pin(async move {
                let reply = rt.propose(key, Command::Group(cmd)).await?;
                // The user is not a member now. Forget even when this request changed nothing:
                // it may retry a removal whose forget was lost in a crash, and a stale listing
                // would count against the user's group limit forever. Best effort: an inbox
                // that still names the group is filtered on read.
                let forget = Request::User(UserCommand::Forget { group });
                let _ = rt.request(EntityKey::User(user), forget).await;
                Ok(reply)
            }))
        }
        cmd => propose(rt, &key, Command::Group(cmd)),
    }
}

fn handle_queue<R: Runtime>(key: &EntityKey, queue: Option<&SkillQueueState>, cmd: QueueCommand, rt: &R) -> Handling {
    match &cmd {
        QueueCommand::Fire(QueueTimer::Outbox(lane)) => {
            return deliver_outbox(key, queue.map(|q| &q.outbox), *lane, rt, |results, max_attempts| {
                Command::Queue(QueueCommand::Settle { results, max_attempts })
            });
        }
        // A report while the last one is still fresh changes nothing worth a write.
        QueueCommand::AgentPresent { agent, capacity, lease_ms, grace_ms } => {
            // Still present for more than half a lease (which implies present now).
            let half_lease_ahead = rt.now().plus_millis(lease_ms / 2);
            let fresh = queue
                .and_then(|q| q.agents.get(agent))
                .is_some_and(|a| a.capacity == *capacity && a.grace_ms == *grace_ms && a.present(half_lease_ahead));
            if fresh {
                return Handling::Done(Ok(Reply::Updated { changed: false }));
            }
        }
        _ => {}
    }
    match SkillQueueState::check(queue, &cmd) {
        Err(r) => Handling::Done(Err(r)),
        Ok(()) => propose(rt, key, Command::Queue(cmd)),
    }
}

/// Delivers what the entity's outbox has due in `lane`, then records how it went. Receivers
/// are idempotent, so a delivery repeated after a leader change does no harm. Requests to
/// one entity go one after another, and stop at the first that does not get through (it is
/// retried first); different receivers are served at once.
fn deliver_outbox<R: Runtime>(
    key: &EntityKey,
    outbox: Option<&Outbox>,
    lane: Lane,
    rt: &R,
    settle: fn(Vec<(u64, DeliveryResult)>, u32) -> Command,
) -> Handling {
    let due = outbox.map(|o| o.due(rt.now(), lane)).unwrap_or_default();
    // In due order; a webhook is a sequence of its own.
    let mut sequences: Vec<Vec<Pending>> = Vec::new();
    for p in due {
        let same = p.delivery.in_order_with().and_then(|to| {
            sequences.iter_mut().find(|s| s.first().and_then(|f| f.delivery.in_order_with()) == Some(to))
        });
        match same {
            Some(sequence) => sequence.push(p),
            None => sequences.push(vec![p]),
        }
    }
    let (key, rt) = (key.clone(), rt.clone());
    Handling::Task(Box::pin(async move {
        let deliveries = sequences.into_iter().map(|sequence| {
            let rt = rt.clone();
            async move {
                let mut results = Vec::with_capacity(sequence.len());
                for p in sequence {
                    let result = match &p.delivery {
                        Delivery::Webhook(hook) => match rt.webhook(hook).await {
                            Ok(_) => DeliveryResult::Delivered,
                            Err(_) => DeliveryResult::Failed,
                        },
                        Delivery::Request { key, request } => match rt.request(key.clone(), request.clone()).await {
                            Ok(_) => DeliveryResult::Delivered,
                            Err(r) => DeliveryResult::of_rejection(r.code),
                        },
                    };
                    results.push((p.id, result));
                    if result == DeliveryResult::Failed {
                        break;
                    }
                }
                results
            }
        });
        let results: Vec<(u64, DeliveryResult)> =
            futures::future::join_all(deliveries).await.into_iter().flatten().collect();
        // Settling with no results still re-arms the timer from the state.
        rt.propose(key, settle(results, rt.config().webhook_max_attempts)).await?;
        Ok(Reply::Fired)
    }))
}

fn open_tickets<R: Runtime>(key: &EntityKey, who: Principal, tickets: Vec<(TicketId, OpenTicket)>, rt: &R) -> Handling {
    let (key, rt) = (key.clone(), rt.clone());
    Handling::Task(Box::pin(async move {
        // Linking a group takes being able to read it.
        if let Some(group) = tickets.iter().find_map(|(_, o)| o.group.clone()) {
            rt.query(EntityKey::Group(group), Query::GroupInfo { caller: who.caller() }).await?;
        }
        let ids = tickets.iter().map(|(id, _)| id.clone()).collect();
        let max_tickets = rt.config().tickets.max_tickets_per_user;
        let listed = UserCommand::AddTickets { tickets: ids, max_tickets };
        rt.request(EntityKey::User(who.user.clone()), Request::User(listed)).await?;
        let opens = tickets.into_iter().map(|(id, open)| {
            let ticket = EntityKey::Ticket(id);
            let cmd = TicketCommand::Open(open);
            if ticket == key {
                rt.propose(ticket, Command::Ticket(cmd))
            } else {
                rt.request(ticket, Request::Ticket(cmd))
            }
        });
        let mut opened = Vec::new();
        for reply in futures::future::join_all(opens).await {
            match reply? {
                Reply::TicketOpened { summary, .. } => opened.push(summary),
                other => {
                    return Err(Rejection::new(ErrorCode::Internal, format!("opening a ticket answered {other:?}")));
                }
            }
        }
        Ok(Reply::TicketsOpened { tickets: opened })
    }))
}

/// Agents see their skill groups' tickets, admins every group's, customers their own.
fn list_tickets<R: Runtime>(who: Principal, filter: TicketFilter, rt: R) -> Handling {
    Handling::Task(Box::pin(async move {
        use futures::StreamExt;
        let staff = who.has(Role::Admin) || who.has(Role::Agent);
        let mut found: Vec<TicketSummary> = Vec::new();
        if staff {
            let mut groups =
                if who.has(Role::Admin) { rt.config().tickets.rules.skill_groups() } else { who.skills.clone() };
            if let Some(only) = &filter.skill_group {
                if !groups.contains(only) {
                    return Err(Rejection::forbidden(format!("{only} is not one of your skill groups")));
                }
                groups = vec![only.clone()];
            }
            let lists: Vec<_> = futures::stream::iter(groups)
                .map(|g| rt.query(EntityKey::SkillQueue(g), Query::QueueList { who: who.clone() }))
                .buffered(FAN_OUT_CONCURRENCY)
                .collect()
                .await;
            for list in lists {
                if let Reply::TicketSummaries(s) = list? {
                    found.extend(s);
                }
            }
        } else {
            let Reply::UserTickets(ids) =
                rt.query(EntityKey::User(who.user.clone()), Query::UserTickets { caller: who.caller() }).await?
            else {
                return Err(Rejection::new(ErrorCode::Internal, "a user's tickets answered something else"));
            };
            let lists: Vec<_> = futures::stream::iter(ids)
                .map(|t| rt.query(EntityKey::Ticket(t), Query::TicketSummary { who: who.clone() }))
                .buffered(FAN_OUT_CONCURRENCY)
                .collect()
                .await;
            for list in lists {
                match list {
                    Ok(Reply::TicketSummaries(s)) => found.extend(s),
                    // The index lists a ticket before opening it: one whose open failed
                    // does not exist. Anything else (unavailable) fails the list.
                    Err(r) if matches!(r.code, ErrorCode::Forbidden | ErrorCode::NotFound) => {}
                    Err(r) => return Err(r),
                    Ok(_) => {}
                }
            }
        }
        found.retain(|t| {
            filter.state.is_none_or(|s| s == t.state)
                && filter.skill_group.as_ref().is_none_or(|g| *g == t.skill_group)
                && filter.assignee.as_ref().is_none_or(|a| t.assignee.as_ref() == Some(a))
        });
        sort_summaries(&mut found);
        found.truncate(LIST_LIMIT);
        Ok(Reply::TicketList { tickets: found })
    }))
}

/// What a node tells the domain when a user's first connection there opens, and again
/// every `presence_refresh_ms` while one stays: agents report to their skill queues.
pub fn presence(who: &Principal, cfg: &DomainConfig) -> Vec<(EntityKey, Request)> {
    if !who.has(Role::Agent) {
        return Vec::new();
    }
    let t = &cfg.tickets;
    who.skills
        .iter()
        .map(|skill| {
            let present = QueueCommand::AgentPresent {
                agent: who.user.clone(),
                capacity: who.capacity.unwrap_or(t.agent_capacity),
                lease_ms: t.presence_refresh_ms.saturating_mul(3),
                grace_ms: t.agent_grace_ms,
            };
            (EntityKey::SkillQueue(skill.clone()), Request::Queue(present))
        })
        .collect()
}

/// What a node tells the domain when a user's last connection there closed.
pub fn absence(who: &Principal) -> Vec<(EntityKey, Request)> {
    if !who.has(Role::Agent) {
        return Vec::new();
    }
    who.skills
        .iter()
        .map(|s| {
            (EntityKey::SkillQueue(s.clone()), Request::Queue(QueueCommand::AgentAway { agent: who.user.clone() }))
        })
        .collect()
}

/// Most groups an `inbox.sync` queries at once.
const INBOX_QUERY_CONCURRENCY: usize = 64;

fn inbox_sync<R: Runtime>(key: EntityKey, caller: Caller, rt: R) -> Handling {
    Handling::Task(Box::pin(async move {
        use futures::StreamExt;
        let user = caller.user.clone();
        let Reply::InboxGroups(groups) = rt.query(key, Query::InboxGroups { caller }).await? else {
            return Err(Rejection::new(ErrorCode::Internal, "inbox query answered something else"));
        };
        let lines: Vec<_> = futures::stream::iter(groups)
            .map(|g| rt.query(EntityKey::Group(g), Query::InboxItem { user: user.clone() }))
            .buffered(INBOX_QUERY_CONCURRENCY)
            .collect()
            .await;
        let mut groups = Vec::with_capacity(lines.len());
        for line in lines {
            if let Reply::InboxItem(Some(line)) = line? {
                groups.push(line);
            }
        }
        Ok(Reply::Inbox { groups })
    }))
}

/// Whether the leader sends the pushes of an applied command to the nodes that hold no
/// replica of its shard (every replica pushes to its own connections as it applies).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pushes {
    /// It was applied while this node led: it sends what the command produced.
    Send,
    /// It was applied while another node led, which sent it (this replica caught up and took
    /// over before the apply became visible), or no node outside the replicas needs it. Sent
    /// again, it would reach clients twice and after newer entries.
    Skip,
}

/// Whether the leader's entity acts on its applied commands for more than their pushes.
pub fn acts_on_applied(key: &EntityKey) -> bool {
    matches!(key, EntityKey::SkillQueue(_))
}

/// Acts on what applying a command produced, on the leader. `state` is the state after it.
pub fn on_applied<R: Runtime>(
    key: &EntityKey,
    state: Option<&EntityState>,
    appended: &[Entry],
    notices: &[Notice],
    pushes: Pushes,
    rt: &R,
) {
    if let (EntityKey::SkillQueue(_), Some(EntityState::SkillQueue(q))) = (key, state) {
        if notices.contains(&Notice::QueueChanged) {
            let offers = q.plan_offers(rt.now());
            if !offers.is_empty() {
                rt.spawn(rt.propose(key.clone(), Command::Queue(QueueCommand::Offer { offers })));
            }
        }
        return;
    }
    if pushes == Pushes::Send {
        for_each_event(key, state, appended, notices, |audience, event| rt.push(audience, &event));
    }
}

/// The events an applied command produced, each with the users it goes to, in log order.
/// `state` is the state after it. Every replica of the entity's shard calls this as it
/// applies, for its own connections; the leader's `on_applied`, for the other nodes.
pub fn for_each_event(
    key: &EntityKey,
    state: Option<&EntityState>,
    appended: &[Entry],
    notices: &[Notice],
    mut push: impl FnMut(&[UserId], Event),
) {
    let (id, g) = match (key, state) {
        (EntityKey::Group(id), Some(EntityState::Group(g))) => (id, g),
        (EntityKey::Ticket(_), _) => {
            for n in notices {
                if let Notice::Ticket(ev) = n {
                    push(&ev.audience, Event::Ticket(ev.clone()));
                }
            }
            return;
        }
        _ => return,
    };
    let mut audience: Vec<UserId> = g.member_ids().cloned().collect();
    // Someone removed still gets the entry that says so.
    for n in notices {
        if let Notice::MemberGone { user } = n {
            audience.push(user.clone());
        }
    }
    for entry in appended {
        push(&audience, Event::Msg { group: id.clone(), entry: entry.clone() });
    }
    for n in notices {
        if let Notice::ReadMoved { user, read_seq } = n {
            push(&audience, Event::Receipt { group: id.clone(), user: user.clone(), read_seq: *read_seq });
        }
    }
}

#[cfg(test)]
mod tests;
