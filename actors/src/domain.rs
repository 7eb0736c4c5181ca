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
use crate::ids::{ClientMsgId, GroupId, UserId};
use crate::user::{UserCommand, UserReply, UserState};

/// Limits and timeouts the domain applies, taken from the node's configuration.
#[derive(Debug, Clone)]
pub struct DomainConfig {
    pub body: BodyLimits,
    pub group: GroupLimits,
    pub max_groups_per_user: u32,
    pub receipt_timeout_ms: u64,
    pub sync_limit_max: u32,
}

impl Default for DomainConfig {
    fn default() -> Self {
        DomainConfig {
            body: BodyLimits { max_text_chars: 4000 },
            group: GroupLimits { max_members: 200, max_receipt_watches: 1000 },
            max_groups_per_user: 1000,
            receipt_timeout_ms: 5 * 60 * 1000,
            sync_limit_max: 500,
        }
    }
}

/// The replicated state of one entity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum EntityState {
    Group(GroupState),
    User(UserState),
}

/// A replicated command: one Raft log entry changes one entity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Command {
    Group(GroupCommand),
    User(UserCommand),
}

/// A deadline an entity keeps in its state. The runtime stores the index of all of them
/// and, on the leader, asks the entity to fire each one when it is due.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Timer {
    Group(GroupTimer),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TimerChange {
    Set { timer: Timer, due: Timestamp },
    Cleared { timer: Timer },
}

/// Things that happened, for the leader's entity actor to act on (pushes, webhooks).
#[derive(Debug, Clone, PartialEq)]
pub enum Notice {
    ReadMoved { user: UserId, read_seq: Seq },
    MemberAdded { user: UserId },
    MemberGone { user: UserId },
    ReceiptOverdue { seq: Seq, pending: Vec<UserId> },
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
}

/// The result fields of a successful reply as the protocol shows them
/// (`{"re":..,"ok":true, <these>}`).
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
            Reply::InboxItem(_) | Reply::InboxGroups(_) | Reply::Fired | Reply::Noted { .. } => {
                ProtocolReply::Internal {}
            }
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
    GroupInfo { caller: crate::Caller },
    GroupSync { caller: crate::Caller, after: Seq, limit: u32 },
    GroupReceipts { caller: crate::Caller, seq: Seq },
    InboxItem { user: UserId },
    InboxGroups { caller: crate::Caller },
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
/// `/` is outside the id grammar, so the two parts cannot run into each other.
pub fn client_msg_key(sender: &UserId, id: &ClientMsgId) -> String {
    format!("{sender}/{id}")
}

impl Entry {
    pub fn idempotency_key(&self) -> Option<String> {
        self.client_msg_id.as_ref().map(|id| client_msg_key(&self.from, id))
    }
}

struct GroupLogOf<'a, I> {
    key: &'a EntityKey,
    index: &'a I,
}

impl<I: LogIndex> GroupLog for GroupLogOf<'_, I> {
    fn find_client_msg(&self, sender: &UserId, id: &ClientMsgId) -> Result<Option<(Seq, Timestamp)>, StorageFault> {
        self.index.find_idempotent(self.key, &client_msg_key(sender, id))
    }
}

fn mismatch(key: &EntityKey) -> Rejection {
    Rejection::new(crate::ErrorCode::Internal, format!("{key} holds state or a command of another kind"))
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
    match (key, cmd) {
        (EntityKey::Group(id), Command::Group(cmd)) => {
            let mut group = match state.take() {
                None => None,
                Some(EntityState::Group(g)) => Some(g),
                Some(other) => {
                    *state = Some(other);
                    return Ok(Outcome::rejected(mismatch(key)));
                }
            };
            let applied = GroupState::apply(&mut group, cmd, at, &GroupLogOf { key, index });
            *state = group.map(EntityState::Group);
            Ok(group_outcome(id, applied?))
        }
        (EntityKey::User(_), Command::User(cmd)) => {
            let mut user = match state.take() {
                None => None,
                Some(EntityState::User(u)) => Some(u),
                Some(other) => {
                    *state = Some(other);
                    return Ok(Outcome::rejected(mismatch(key)));
                }
            };
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
    log: &impl LogReader,
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
        (EntityKey::Group(id), Query::InboxItem { user }) => Ok(Reply::InboxItem(
            group.and_then(|g| g.inbox_item(&user)).map(|item| InboxLine { group: id.clone(), item }),
        )),
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
    }
}

impl From<UserCommand> for Command {
    fn from(c: UserCommand) -> Self {
        Command::User(c)
    }
}

impl From<GroupCommand> for Command {
    fn from(c: GroupCommand) -> Self {
        Command::Group(c)
    }
}
