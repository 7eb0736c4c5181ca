//! The one entry point the runtime uses for every kind of entity: apply a command, answer
//! a query, describe what a timer fires. Each kind's logic lives in its own module; this
//! module only dispatches, so the runtime never matches on entity kinds.

use serde::{Deserialize, Serialize};

use crate::body::BodyLimits;
use crate::entity::{EntityKey, StorageFault, Timestamp};
use crate::error::Rejection;
use crate::event::WireEntries;
use crate::group::{
    self, Entry, GroupApplied, GroupCommand, GroupEffect, GroupInfo, GroupLimits, GroupLog, GroupReply, GroupState,
    GroupTimer, InboxItem, Receipts, Seq,
};
use crate::ids::{ClientMsgId, GroupId, SkillGroup, TicketId, UserId};
use crate::queue::{DeskView, QueueCommand, QueueReply, QueueTimer, SkillQueueState};
use crate::ticket::{
    self, Rules, TicketCommand, TicketEvent, TicketReply, TicketSettings, TicketState, TicketStatus, TicketSummary,
    TicketTimer,
};
use crate::user::{UserCommand, UserReply, UserState};

/// Limits and timeouts the domain applies, taken from the node's configuration.
#[derive(Debug, Clone)]
pub struct DomainConfig {
    pub body: BodyLimits,
    pub group: GroupLimits,
    pub max_groups_per_user: u32,
    pub receipt_timeout_ms: u64,
    pub sync_limit_max: u32,
    pub tickets: TicketsConfig,
    /// Failed webhook deliveries are retried until this many attempts.
    pub webhook_max_attempts: u32,
}

/// How tickets are classified, timed and assigned.
#[derive(Debug, Clone)]
pub struct TicketsConfig {
    pub rules: Rules,
    pub settings: TicketSettings,
    pub agent_capacity: u32,
    pub agent_grace_ms: u64,
    /// Connected agents are reported to their queues this often.
    pub presence_refresh_ms: u64,
    pub max_tickets_per_user: u32,
}

impl Default for DomainConfig {
    fn default() -> Self {
        let sla = |first_response_ms, resolution_ms| ticket::Sla { first_response_ms, resolution_ms };
        let fallback = ticket::Category {
            name: "other".into(),
            skill_group: SkillGroup::parse("general").expect("valid"),
            priority: ticket::Priority::Normal,
            keywords: Vec::new(),
        };
        DomainConfig {
            body: BodyLimits { max_text_chars: 4000 },
            group: GroupLimits { max_members: 200, max_receipt_watches: 1000 },
            max_groups_per_user: 1000,
            receipt_timeout_ms: 5 * 60 * 1000,
            sync_limit_max: 500,
            tickets: TicketsConfig {
                rules: Rules::new(Vec::new(), fallback, Vec::new()),
                settings: TicketSettings {
                    sla: ticket::SlaTable {
                        low: sla(8 * 3_600_000, 72 * 3_600_000),
                        normal: sla(2 * 3_600_000, 24 * 3_600_000),
                        high: sla(1_800_000, 2 * 3_600_000),
                        urgent: sla(600_000, 3_600_000),
                    },
                    max_history: 500,
                },
                agent_capacity: 5,
                agent_grace_ms: 120_000,
                presence_refresh_ms: 5_000,
                max_tickets_per_user: 1000,
            },
            webhook_max_attempts: 8,
        }
    }
}

/// The replicated state of one entity. (Held behind `Arc`s in the runtime's cache, so the
/// size of the largest variant is paid once per entity, not per copy.)
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum EntityState {
    Group(GroupState),
    User(UserState),
    Ticket(TicketState),
    SkillQueue(SkillQueueState),
}

impl EntityState {
    /// How many entries the entity's log holds: exactly the seqs `1..=log_len()` are stored
    /// (groups' messages, tickets' history). Entries are written once and never changed,
    /// so the runtime copies a log for a snapshot up to this length, from a copied state,
    /// while later entries are still being applied.
    pub fn log_len(&self) -> Seq {
        match self {
            EntityState::Group(g) => g.last_seq,
            EntityState::Ticket(t) => t.last_seq,
            EntityState::User(_) | EntityState::SkillQueue(_) => 0,
        }
    }
}

/// A replicated command: one Raft log entry changes one entity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Command {
    Group(GroupCommand),
    User(UserCommand),
    Ticket(TicketCommand),
    Queue(QueueCommand),
}

/// A deadline an entity keeps in its state. The runtime stores the index of all of them
/// and, on the leader, asks the entity to fire each one when it is due.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Timer {
    Group(GroupTimer),
    Ticket(TicketTimer),
    Queue(QueueTimer),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TimerChange {
    Set { timer: Timer, due: Timestamp },
    Cleared { timer: Timer },
}

/// Things that happened, for the leader's entity actor to act on (pushes, webhooks).
#[derive(Debug, Clone, PartialEq)]
pub enum Notice {
    ReadMoved {
        user: UserId,
        read_seq: Seq,
    },
    MemberAdded {
        user: UserId,
    },
    MemberGone {
        user: UserId,
    },
    ReceiptOverdue {
        seq: Seq,
        pending: Vec<UserId>,
    },
    Ticket(TicketEvent),
    /// A skill queue changed: its leader plans assignments.
    QueueChanged,
}

/// Everything applying one command produced.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub reply: Result<Reply, Rejection>,
    pub state_changed: bool,
    /// New log entries, in seq order. The runtime stores them and their idempotency keys.
    pub appended: Vec<Entry>,
    pub timers: Vec<TimerChange>,
    pub notices: Vec<Notice>,
}

impl Outcome {
    fn rejected(r: Rejection) -> Outcome {
        Outcome { reply: Err(r), state_changed: false, appended: Vec::new(), timers: Vec::new(), notices: Vec::new() }
    }
}

/// What a request answered. Crosses nodes (serde, any format); clients see it through
/// [`Reply::protocol`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Reply {
    Opened {
        group: GroupId,
        created: bool,
    },
    Updated {
        changed: bool,
    },
    Sent {
        seq: Seq,
        ts: Timestamp,
        duplicate: bool,
    },
    Read {
        read_seq: Seq,
    },
    Info {
        group: GroupId,
        info: GroupInfo,
    },
    Messages {
        messages: Vec<Entry>,
        last_seq: Seq,
    },
    Receipts(Receipts),
    Inbox {
        groups: Vec<InboxLine>,
    },
    /// Internal: one line of an inbox, or nothing if the user is not a member.
    InboxItem(Option<InboxLine>),
    /// Internal: the groups a user's inbox lists.
    InboxGroups(Vec<GroupId>),
    /// Internal: a timer fired (or had nothing left to do).
    Fired,
    /// Internal: a system entry was written.
    Noted {
        seq: Seq,
    },
    /// `ticket.open`: one ticket per category the text matched.
    TicketsOpened {
        tickets: Vec<TicketSummary>,
    },
    /// Internal: one ticket opened (or found opened before).
    TicketOpened {
        summary: TicketSummary,
        created: bool,
    },
    TicketChanged {
        ticket: TicketId,
        state: TicketStatus,
        changed: bool,
    },
    TicketDetail {
        ticket: TicketId,
        state: Box<TicketState>,
        history: Vec<Entry>,
    },
    /// `ticket.list`.
    TicketList {
        tickets: Vec<TicketSummary>,
    },
    /// Internal: summaries of tickets (one ticket's, or a queue's).
    TicketSummaries(Vec<TicketSummary>),
    /// Internal: the tickets a customer opened.
    UserTickets(Vec<TicketId>),
    /// The service desk figures of one skill group.
    Desk(DeskView),
}

/// The result fields of a successful reply as the protocol shows them
/// (`{"re":..,"ok":true, <these>}`).
/// Lives only while a reply is rendered.
#[allow(clippy::large_enum_variant)]
#[derive(Serialize)]
#[serde(untagged)]
pub enum ProtocolReply<'a> {
    Opened {
        group: &'a GroupId,
        created: bool,
    },
    Updated {
        changed: bool,
    },
    Sent {
        seq: Seq,
        ts: Timestamp,
        duplicate: bool,
    },
    Read {
        read_seq: Seq,
    },
    Info {
        group: &'a GroupId,
        #[serde(flatten)]
        info: &'a GroupInfo,
    },
    Messages {
        messages: WireEntries<'a>,
        last_seq: Seq,
    },
    Receipts(&'a Receipts),
    Inbox {
        groups: Vec<WireInboxLine<'a>>,
    },
    Tickets {
        tickets: &'a [TicketSummary],
    },
    TicketChanged {
        ticket: &'a TicketId,
        state: TicketStatus,
        changed: bool,
    },
    TicketDetail {
        ticket: ticket::TicketView<'a>,
        history: Vec<crate::event::WireHistoryLine<'a>>,
    },
    Desk(&'a DeskView),
    /// Replies that never reach a client.
    Internal {},
}

impl Reply {
    pub fn protocol(&self) -> ProtocolReply<'_> {
        match self {
            Reply::Opened { group, created } => ProtocolReply::Opened { group, created: *created },
            Reply::Updated { changed } => ProtocolReply::Updated { changed: *changed },
            Reply::Sent { seq, ts, duplicate } => ProtocolReply::Sent { seq: *seq, ts: *ts, duplicate: *duplicate },
            Reply::Read { read_seq } => ProtocolReply::Read { read_seq: *read_seq },
            Reply::Info { group, info } => ProtocolReply::Info { group, info },
            Reply::Messages { messages, last_seq } => {
                ProtocolReply::Messages { messages: WireEntries(messages), last_seq: *last_seq }
            }
            Reply::Receipts(r) => ProtocolReply::Receipts(r),
            Reply::Inbox { groups } => ProtocolReply::Inbox {
                groups: groups.iter().map(|l| WireInboxLine { group: &l.group, item: &l.item }).collect(),
            },
            Reply::TicketsOpened { tickets } | Reply::TicketList { tickets } => ProtocolReply::Tickets { tickets },
            Reply::TicketChanged { ticket, state, changed } => {
                ProtocolReply::TicketChanged { ticket, state: *state, changed: *changed }
            }
            Reply::TicketDetail { ticket, state, history } => ProtocolReply::TicketDetail {
                ticket: state.view(ticket),
                history: history.iter().map(crate::event::WireHistoryLine).collect(),
            },
            Reply::Desk(d) => ProtocolReply::Desk(d),
            Reply::InboxItem(_)
            | Reply::InboxGroups(_)
            | Reply::Fired
            | Reply::Noted { .. }
            | Reply::TicketOpened { .. }
            | Reply::TicketSummaries(_)
            | Reply::UserTickets(_) => ProtocolReply::Internal {},
        }
    }
}

/// One group of a user's inbox. Replies cross nodes in a length-prefixed binary encoding,
/// which cannot hold flattened fields: the protocol's flat shape is [`WireInboxLine`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InboxLine {
    pub group: GroupId,
    pub item: InboxItem,
}

/// An inbox line as the protocol shows it: the item's fields beside `group`.
#[derive(Debug, Serialize)]
pub struct WireInboxLine<'a> {
    group: &'a GroupId,
    #[serde(flatten)]
    item: &'a InboxItem,
}

/// Read-only requests, answered from committed state after a linearizable read barrier.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Query {
    GroupInfo {
        caller: crate::Caller,
    },
    GroupSync {
        caller: crate::Caller,
        after: Seq,
        limit: u32,
    },
    GroupReceipts {
        caller: crate::Caller,
        seq: Seq,
    },
    InboxItem {
        user: UserId,
    },
    InboxGroups {
        caller: crate::Caller,
    },
    /// `ticket.get`: the ticket and up to `history_limit` history entries.
    TicketGet {
        who: crate::principal::Principal,
        history_limit: u32,
    },
    TicketSummary {
        who: crate::principal::Principal,
    },
    /// Every ticket a skill queue lists, for its agents and admins.
    QueueList {
        who: crate::principal::Principal,
    },
    UserTickets {
        caller: crate::Caller,
    },
    /// Service desk figures as of `now` (the admin API asks).
    Desk {
        now: Timestamp,
    },
    /// The seq of a message `sender` sent with `client_msg_id`, as a duplicate `Sent` reply.
    /// Asked by the group itself for a retry that its checks for new messages refuse.
    SentBefore {
        sender: UserId,
        client_msg_id: ClientMsgId,
    },
}

/// What `apply` may read from an entity's stored log.
pub trait LogIndex {
    /// The (seq, ts) of the entry stored under this idempotency key, if any.
    fn find_idempotent(&self, key: &EntityKey, idempotency_key: &str)
    -> Result<Option<(Seq, Timestamp)>, StorageFault>;
}

/// What a query may read from an entity's stored log.
pub trait LogReader {
    /// Entries with seq > `after`, ascending, at most `limit`.
    fn read_entries(&self, key: &EntityKey, after: Seq, limit: u32) -> Result<Vec<Entry>, StorageFault>;
}

/// The idempotency key of a client message: (sender, client_msg_id) within its group.
/// A user id has no `/`, so the first `/` ends it whatever the client_msg_id holds.
pub fn client_msg_key(sender: &UserId, id: &ClientMsgId) -> String {
    format!("{sender}/{id}")
}

impl Entry {
    pub fn idempotency_key(&self) -> Option<String> {
        self.client_msg_id.as_ref().map(|id| client_msg_key(&self.from, id))
    }
}

struct GroupLogOf<'a, I> {
    id: &'a GroupId,
    key: &'a EntityKey,
    index: &'a I,
}

impl<I: LogIndex> GroupLog for GroupLogOf<'_, I> {
    fn group_id(&self) -> &GroupId {
        self.id
    }

    fn find_client_msg(&self, sender: &UserId, id: &ClientMsgId) -> Result<Option<(Seq, Timestamp)>, StorageFault> {
        self.index.find_idempotent(self.key, &client_msg_key(sender, id))
    }
}

fn mismatch(key: &EntityKey) -> Rejection {
    Rejection::new(crate::ErrorCode::Internal, format!("{key} holds state or a command of another kind"))
}

/// Takes the typed state of one kind out of `state`, or answers a mismatch.
macro_rules! take_state {
    ($state:ident, $variant:ident, $key:ident) => {
        match $state.take() {
            None => None,
            Some(EntityState::$variant(s)) => Some(s),
            Some(other) => {
                *$state = Some(other);
                return Ok(Outcome::rejected(mismatch($key)));
            }
        }
    };
}

/// Applies `cmd` to the entity `key`. Deterministic: every replica computes the same
/// outcome from the same state, command and `at`.
pub fn apply(
    key: &EntityKey,
    state: &mut Option<EntityState>,
    cmd: Command,
    at: Timestamp,
    index: &impl LogIndex,
) -> Result<Outcome, StorageFault> {
    let outcome = apply_to(key, state, cmd, at, index)?;
    if let Some(last) = outcome.appended.last() {
        let log_len = state.as_ref().map(EntityState::log_len);
        assert!(
            outcome.state_changed && log_len == Some(last.seq),
            "{key}: appended up to seq {} but the state holds a log of {log_len:?} (changed: {})",
            last.seq,
            outcome.state_changed
        );
    }
    Ok(outcome)
}

fn apply_to(
    key: &EntityKey,
    state: &mut Option<EntityState>,
    cmd: Command,
    at: Timestamp,
    index: &impl LogIndex,
) -> Result<Outcome, StorageFault> {
    match (key, cmd) {
        (EntityKey::Group(id), Command::Group(cmd)) => {
            let mut group = take_state!(state, Group, key);
            let applied = GroupState::apply(&mut group, cmd, at, &GroupLogOf { id, key, index });
            *state = group.map(EntityState::Group);
            Ok(group_outcome(id, applied?))
        }
        (EntityKey::Ticket(id), Command::Ticket(cmd)) => {
            let mut t = take_state!(state, Ticket, key);
            let applied = TicketState::apply(&mut t, id, cmd, at);
            *state = t.map(EntityState::Ticket);
            Ok(ticket_outcome(id, applied))
        }
        (EntityKey::SkillQueue(_), Command::Queue(cmd)) => {
            let mut q = take_state!(state, SkillQueue, key);
            let applied = SkillQueueState::apply(&mut q, cmd, at);
            *state = q.map(EntityState::SkillQueue);
            let timers = applied.timers.into_iter().map(|(t, due)| timer_change(Timer::Queue(t), due)).collect();
            Ok(Outcome {
                reply: applied.reply.map(|QueueReply::Updated { changed }| Reply::Updated { changed }),
                state_changed: applied.state_changed,
                appended: Vec::new(),
                timers,
                notices: if applied.state_changed { vec![Notice::QueueChanged] } else { Vec::new() },
            })
        }
        (EntityKey::User(_), Command::User(cmd)) => {
            let mut user = take_state!(state, User, key);
            let applied = UserState::apply(&mut user, cmd);
            *state = user.map(EntityState::User);
            Ok(Outcome {
                reply: applied.reply.map(|UserReply::Updated { changed }| Reply::Updated { changed }),
                state_changed: applied.state_changed,
                appended: Vec::new(),
                timers: Vec::new(),
                notices: Vec::new(),
            })
        }
        _ => Ok(Outcome::rejected(mismatch(key))),
    }
}

fn timer_change(timer: Timer, due: Option<Timestamp>) -> TimerChange {
    match due {
        Some(due) => TimerChange::Set { timer, due },
        None => TimerChange::Cleared { timer },
    }
}

fn ticket_outcome(id: &TicketId, applied: ticket::TicketApplied) -> Outcome {
    Outcome {
        reply: applied.reply.map(|r| match r {
            TicketReply::Opened { summary, created } => Reply::TicketOpened { summary, created },
            TicketReply::Changed { state, changed } => Reply::TicketChanged { ticket: id.clone(), state, changed },
            TicketReply::Fired => Reply::Fired,
        }),
        state_changed: applied.state_changed,
        appended: applied.history,
        timers: applied.timers.into_iter().map(|(t, due)| timer_change(Timer::Ticket(t), due)).collect(),
        notices: applied.event.into_iter().map(Notice::Ticket).collect(),
    }
}

fn group_outcome(id: &GroupId, applied: GroupApplied) -> Outcome {
    let mut out = Outcome {
        reply: applied.reply.map(|r| match r {
            GroupReply::Opened { created } => Reply::Opened { group: id.clone(), created },
            GroupReply::Updated { changed } => Reply::Updated { changed },
            GroupReply::Sent { seq, ts, duplicate } => Reply::Sent { seq, ts, duplicate },
            GroupReply::Read { read_seq } => Reply::Read { read_seq },
            GroupReply::Fired => Reply::Fired,
            GroupReply::Noted { seq } => Reply::Noted { seq },
        }),
        state_changed: applied.state_changed,
        appended: Vec::new(),
        timers: Vec::new(),
        notices: Vec::new(),
    };
    for effect in applied.effects {
        match effect {
            GroupEffect::Append(entry) => out.appended.push(entry),
            GroupEffect::TimerSet { timer, due } => {
                out.timers.push(TimerChange::Set { timer: Timer::Group(timer), due })
            }
            GroupEffect::TimerCleared { timer } => out.timers.push(TimerChange::Cleared { timer: Timer::Group(timer) }),
            GroupEffect::ReadMoved { user, read_seq } => out.notices.push(Notice::ReadMoved { user, read_seq }),
            GroupEffect::MemberAdded { user } => out.notices.push(Notice::MemberAdded { user }),
            GroupEffect::MemberGone { user } => out.notices.push(Notice::MemberGone { user }),
            GroupEffect::ReceiptOverdue { seq, pending } => out.notices.push(Notice::ReceiptOverdue { seq, pending }),
        }
    }
    out
}

/// Answers a query from committed state (the runtime has passed a read barrier).
pub fn query(
    key: &EntityKey,
    state: Option<&EntityState>,
    q: Query,
    log: &(impl LogReader + LogIndex),
) -> Result<Result<Reply, Rejection>, StorageFault> {
    let group = match state {
        Some(EntityState::Group(g)) => Some(g),
        _ => None,
    };
    Ok(match (key, q) {
        (EntityKey::Group(id), Query::GroupInfo { caller }) => {
            group::authorize_read(group, &caller).map(|g| Reply::Info { group: id.clone(), info: g.info() })
        }
        (EntityKey::Group(_), Query::GroupSync { caller, after, limit }) => match group::authorize_read(group, &caller)
        {
            Err(r) => Err(r),
            Ok(g) => {
                let messages = if after >= g.last_seq { Vec::new() } else { log.read_entries(key, after, limit)? };
                Ok(Reply::Messages { messages, last_seq: g.last_seq })
            }
        },
        (EntityKey::Group(_), Query::GroupReceipts { caller, seq }) => {
            group::authorize_read(group, &caller).and_then(|g| {
                if seq == 0 || seq > g.last_seq {
                    return Err(Rejection::bad_request(format!("seq must be within 1..{}", g.last_seq)));
                }
                Ok(Reply::Receipts(g.receipts(seq, None)))
            })
        }
        (EntityKey::Group(_), Query::SentBefore { sender, client_msg_id }) => {
            match log.find_idempotent(key, &client_msg_key(&sender, &client_msg_id))? {
                Some((seq, ts)) => Ok(Reply::Sent { seq, ts, duplicate: true }),
                None => Err(Rejection::not_found("no message with this client_msg_id from this sender")),
            }
        }
        (EntityKey::Group(id), Query::InboxItem { user }) => Ok(Reply::InboxItem(
            group.and_then(|g| g.inbox_item(&user)).map(|item| InboxLine { group: id.clone(), item }),
        )),
        (EntityKey::Ticket(id), Query::TicketGet { who, history_limit }) => {
            let t = state.and_then(|s| if let EntityState::Ticket(t) = s { Some(t) } else { None });
            match ticket::authorize_read(t, &who) {
                Err(r) => Err(r),
                Ok(t) => Ok(Reply::TicketDetail {
                    ticket: id.clone(),
                    state: Box::new(t.clone()),
                    history: log.read_entries(key, 0, history_limit)?,
                }),
            }
        }
        (EntityKey::Ticket(id), Query::TicketSummary { who }) => {
            let t = state.and_then(|s| if let EntityState::Ticket(t) = s { Some(t) } else { None });
            ticket::authorize_read(t, &who).map(|t| Reply::TicketSummaries(vec![t.summary(id)]))
        }
        (EntityKey::SkillQueue(skill), Query::QueueList { who }) => {
            if !ticket::is_staff(&who, skill) {
                Err(Rejection::forbidden(format!("only agents of the {skill} skill group and admins list its tickets")))
            } else {
                let summaries = match state {
                    Some(EntityState::SkillQueue(q)) => q.summaries().cloned().collect(),
                    _ => Vec::new(),
                };
                Ok(Reply::TicketSummaries(summaries))
            }
        }
        (EntityKey::SkillQueue(skill), Query::Desk { now }) => {
            let empty = SkillQueueState::default();
            let q = match state {
                Some(EntityState::SkillQueue(q)) => q,
                _ => &empty,
            };
            Ok(Reply::Desk(q.desk(skill, now)))
        }
        (EntityKey::User(id), Query::UserTickets { caller }) => {
            if caller.user != *id && !caller.admin {
                Err(Rejection::forbidden("a user's tickets are listed for that user only"))
            } else {
                let tickets = match state {
                    Some(EntityState::User(u)) => u.tickets.iter().cloned().collect(),
                    _ => Vec::new(),
                };
                Ok(Reply::UserTickets(tickets))
            }
        }
        (EntityKey::User(id), Query::InboxGroups { caller }) => {
            if caller.user != *id && !caller.admin {
                Err(Rejection::forbidden("an inbox is readable by its user only"))
            } else {
                let groups = match state {
                    Some(EntityState::User(u)) => u.groups.iter().cloned().collect(),
                    _ => Vec::new(),
                };
                Ok(Reply::InboxGroups(groups))
            }
        }
        _ => Err(mismatch(key)),
    })
}

/// Entities whose figures the admin API (`/v1/desk`) and `/metrics` report: the skill queues.
pub fn reported_entities(cfg: &DomainConfig) -> Vec<EntityKey> {
    cfg.tickets.rules.skill_groups().into_iter().map(EntityKey::SkillQueue).collect()
}

/// One figure of an entity, for `/metrics`.
#[derive(Debug, Clone, PartialEq)]
pub struct Gauge {
    pub name: &'static str,
    pub help: &'static str,
    pub labels: Vec<(&'static str, String)>,
    pub value: f64,
}

/// The figures of a reported entity as of `now` (its leader renders them).
pub fn gauges(key: &EntityKey, state: Option<&EntityState>, now: Timestamp) -> Vec<Gauge> {
    let (EntityKey::SkillQueue(skill), Some(EntityState::SkillQueue(q))) = (key, state) else {
        return Vec::new();
    };
    let d = q.desk(skill, now);
    let sg = || vec![("skill_group", skill.to_string())];
    let mut out: Vec<Gauge> = d
        .by_state
        .iter()
        .map(|(state, n)| Gauge {
            name: "convoy_desk_tickets",
            help: "Tickets of the skill group that are not closed, by state.",
            labels: vec![("skill_group", skill.to_string()), ("state", state.clone())],
            value: *n as f64,
        })
        .collect();
    let seconds = |ms: Option<u64>| ms.map(|ms| ms as f64 / 1000.0);
    let figures: [(&'static str, &'static str, Option<f64>); 10] = [
        ("convoy_desk_queue_length", "Tickets waiting for an agent.", Some(d.waiting as f64)),
        ("convoy_desk_oldest_waiting_seconds", "Age of the oldest waiting ticket.", seconds(Some(d.oldest_waiting_ms))),
        ("convoy_desk_agents_connected", "Agents of the skill group connected now.", Some(d.agents_connected as f64)),
        ("convoy_desk_tickets_opened_total", "Tickets the queue has seen opened.", Some(d.opened_total as f64)),
        ("convoy_desk_tickets_resolved_total", "Tickets the queue has seen resolved.", Some(d.resolved_total as f64)),
        ("convoy_desk_sla_breaches_total", "SLA deadlines breached.", Some(d.sla_breaches_total as f64)),
        (
            "convoy_desk_first_response_median_seconds",
            "Median time to first response (last 1000 tickets).",
            seconds(d.first_response_median_ms),
        ),
        (
            "convoy_desk_resolution_median_seconds",
            "Median time to resolution (last 1000 tickets).",
            seconds(d.resolution_median_ms),
        ),
        ("convoy_desk_csat_average", "Average customer rating, 1 to 5.", d.csat_average),
        ("convoy_desk_csat_ratings_total", "Customer ratings received.", Some(d.csat_count as f64)),
    ];
    for (name, help, value) in figures {
        if let Some(value) = value {
            out.push(Gauge { name, help, labels: sg(), value });
        }
    }
    out
}

/// Users whose connections the runtime should track for this entity's pushes.
pub fn audience(state: Option<&EntityState>) -> Vec<UserId> {
    match state {
        Some(EntityState::Group(g)) => g.member_ids().cloned().collect(),
        _ => Vec::new(),
    }
}

/// The request that fires `timer` in its entity.
pub fn fire(timer: Timer) -> crate::behavior::Request {
    match timer {
        Timer::Group(t) => crate::behavior::Request::Group(GroupCommand::Fire(t)),
        Timer::Ticket(t) => crate::behavior::Request::Ticket(TicketCommand::Fire(t)),
        Timer::Queue(t) => crate::behavior::Request::Queue(QueueCommand::Fire(t)),
    }
}

impl From<UserCommand> for Command {
    fn from(c: UserCommand) -> Self {
        Command::User(c)
    }
}

impl From<TicketCommand> for Command {
    fn from(c: TicketCommand) -> Self {
        Command::Ticket(c)
    }
}

impl From<QueueCommand> for Command {
    fn from(c: QueueCommand) -> Self {
        Command::Queue(c)
    }
}

impl From<GroupCommand> for Command {
    fn from(c: GroupCommand) -> Self {
        Command::Group(c)
    }
}
