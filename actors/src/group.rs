//! A group: a member list and one totally ordered log.
//!
//! `GroupState::apply` is the only way a group changes. It runs on every replica, in log
//! order, and must be deterministic: everything it depends on is in the state, in the
//! command, or in the group's stored log (`GroupLog`), and wall-clock time comes from the
//! command's `at`, stamped by the leader.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::body::{MemberSpec, MessageBody, SystemEvent};
use crate::entity::{Applied, Caller, StorageFault, Timestamp};
use crate::error::{Limit, Rejection};
use crate::ids::{ClientMsgId, GroupId, UserId, system_user};
use crate::outbox::{Delivery, DeliveryResult, Lane, Outbox, Webhook};

/// Position in a group's log. The first entry is 1; 0 means "nothing yet".
pub type Seq = u64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GroupKind {
    Exception,
    Chat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExceptionType {
    Delay,
    Damage,
    Loss,
    AddressChange,
    Missort,
    RoadClosure,
    Weather,
    Refused,
    Other,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemberRole {
    Owner,
    Agent,
    Dispatcher,
    Driver,
    Customer,
    Station,
    Observer,
}

impl MemberRole {
    pub fn as_str(self) -> &'static str {
        match self {
            MemberRole::Owner => "owner",
            MemberRole::Agent => "agent",
            MemberRole::Dispatcher => "dispatcher",
            MemberRole::Driver => "driver",
            MemberRole::Customer => "customer",
            MemberRole::Station => "station",
            MemberRole::Observer => "observer",
        }
    }

    /// Owners, agents and dispatchers may invite, remove and close.
    pub fn manages(self) -> bool {
        matches!(self, MemberRole::Owner | MemberRole::Agent | MemberRole::Dispatcher)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub role: MemberRole,
    pub read_seq: Seq,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Lifecycle {
    Open,
    Closed { resolution: String },
}

/// Limits fixed when the group is opened, so every replica enforces the same ones even if
/// node configurations differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupLimits {
    pub max_members: u32,
    /// Messages sent with `require_receipt` that still wait for readers.
    pub max_receipt_watches: u32,
}

/// A message sent with `require_receipt` that is not yet read by every other member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceiptWatch {
    pub from: UserId,
    pub due: Timestamp,
}

/// Deadlines a group keeps. Stored in the state; the leader arms them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum GroupTimer {
    ReceiptOverdue {
        seq: Seq,
    },
    /// The group's outbox has deliveries due in this lane.
    Outbox(Lane),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupState {
    pub kind: GroupKind,
    pub title: String,
    pub order_id: Option<String>,
    pub exception_type: Option<ExceptionType>,
    pub opener: UserId,
    pub opened_at: Timestamp,
    pub lifecycle: Lifecycle,
    pub members: BTreeMap<UserId, Member>,
    pub last_seq: Seq,
    pub receipt_watches: BTreeMap<Seq, ReceiptWatch>,
    pub limits: GroupLimits,
    pub outbox: Outbox,
}

/// One entry of a group's log, as stored and served.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub seq: Seq,
    pub from: UserId,
    pub ts: Timestamp,
    pub client_msg_id: Option<ClientMsgId>,
    pub body: MessageBody,
    pub require_receipt: bool,
}

/// What `apply` needs from the group's stored log.
pub trait GroupLog {
    /// The group being applied to.
    fn group_id(&self) -> &GroupId;
    /// The seq and timestamp already assigned to (sender, client_msg_id) in this group.
    fn find_client_msg(&self, sender: &UserId, id: &ClientMsgId) -> Result<Option<(Seq, Timestamp)>, StorageFault>;
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OpenGroup {
    pub opener: Caller,
    pub kind: GroupKind,
    pub title: String,
    pub order_id: Option<String>,
    pub exception_type: Option<ExceptionType>,
    pub members: Vec<MemberSpec>,
    pub limits: GroupLimits,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SendMessage {
    pub from: Caller,
    pub client_msg_id: ClientMsgId,
    pub body: MessageBody,
    pub require_receipt: bool,
    pub receipt_timeout_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum GroupCommand {
    Open(OpenGroup),
    Invite {
        by: Caller,
        user: UserId,
        role: MemberRole,
    },
    Remove {
        by: Caller,
        user: UserId,
    },
    Leave {
        user: UserId,
    },
    Close {
        by: Caller,
        resolution: String,
    },
    Send(SendMessage),
    MarkRead {
        user: UserId,
        seq: Seq,
    },
    /// The leader's timer fired. Applying it twice, or too early, changes nothing.
    Fire(GroupTimer),
    /// Another entity (a ticket) writes a system entry into the group. The body is
    /// rendered before proposing: system events are JSON-tagged and the log stores bytes.
    /// A note with an id is written once, however often it is delivered.
    Note {
        body: MessageBody,
        note_id: Option<ClientMsgId>,
    },
    /// How the outbox's deliveries went.
    Settle {
        results: Vec<(u64, DeliveryResult)>,
        max_attempts: u32,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum GroupReply {
    Opened {
        created: bool,
    },
    /// A membership or lifecycle change; `changed` is false when it was already so.
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
    Fired,
    Noted {
        seq: Seq,
    },
}

/// What an applied group command did, beyond its reply. Storage persists `Append` and
/// the timer effects; the leader's group actor pushes entries and receipts and arms
/// timers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum GroupEffect {
    Append(Entry),
    ReadMoved {
        user: UserId,
        read_seq: Seq,
    },
    /// `user` is now a member; the leader should learn where they are connected.
    MemberAdded {
        user: UserId,
    },
    /// `user` is no longer a member; pushes for this group stop reaching them.
    MemberGone {
        user: UserId,
    },
    TimerSet {
        timer: GroupTimer,
        due: Timestamp,
    },
    TimerCleared {
        timer: GroupTimer,
    },
    ReceiptOverdue {
        seq: Seq,
        pending: Vec<UserId>,
    },
}

/// Whether a group still takes messages, as the protocol names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GroupStatus {
    Open,
    Closed,
}

/// `group.info` as the protocol shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupInfo {
    pub kind: GroupKind,
    pub title: String,
    pub order_id: Option<String>,
    pub exception_type: Option<ExceptionType>,
    pub state: GroupStatus,
    pub members: Vec<MemberInfo>,
    pub last_seq: Seq,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemberInfo {
    pub user: UserId,
    pub role: MemberRole,
    pub read_seq: Seq,
}

/// One group of a user's inbox.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InboxItem {
    pub kind: GroupKind,
    pub title: String,
    pub state: GroupStatus,
    pub last_seq: Seq,
    pub read_seq: Seq,
    pub unread: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Receipts {
    pub read_by: Vec<UserId>,
    pub pending: Vec<UserId>,
}

pub type GroupApplied = Applied<GroupReply, GroupEffect>;

/// Members, then admins, may read a group. Nobody else learns whether it exists.
pub fn authorize_read<'a>(state: Option<&'a GroupState>, caller: &Caller) -> Result<&'a GroupState, Rejection> {
    match state {
        Some(s) if caller.admin || s.members.contains_key(&caller.user) => Ok(s),
        _ => Err(not_a_member()),
    }
}

fn not_a_member() -> Rejection {
    Rejection::forbidden("not a member of this group")
}

impl GroupState {
    pub fn is_open(&self) -> bool {
        matches!(self.lifecycle, Lifecycle::Open)
    }

    fn status(&self) -> GroupStatus {
        if self.is_open() { GroupStatus::Open } else { GroupStatus::Closed }
    }

    pub fn info(&self) -> GroupInfo {
        GroupInfo {
            kind: self.kind,
            title: self.title.clone(),
            order_id: self.order_id.clone(),
            exception_type: self.exception_type,
            state: self.status(),
            members: self
                .members
                .iter()
                .map(|(user, m)| MemberInfo { user: user.clone(), role: m.role, read_seq: m.read_seq })
                .collect(),
            last_seq: self.last_seq,
        }
    }

    /// The inbox line for `user`, or `None` if they are not a member (their inbox may
    /// still name a group they left: inboxes are updated before joins and after leaves).
    pub fn inbox_item(&self, user: &UserId) -> Option<InboxItem> {
        let m = self.members.get(user)?;
        Some(InboxItem {
            kind: self.kind,
            title: self.title.clone(),
            state: self.status(),
            last_seq: self.last_seq,
            read_seq: m.read_seq,
            unread: self.last_seq.saturating_sub(m.read_seq),
        })
    }

    pub fn receipts(&self, seq: Seq, sender: Option<&UserId>) -> Receipts {
        let mut r = Receipts { read_by: Vec::new(), pending: Vec::new() };
        for (user, m) in &self.members {
            if Some(user) == sender {
                continue;
            }
            if m.read_seq >= seq {
                r.read_by.push(user.clone());
            } else {
                r.pending.push(user.clone());
            }
        }
        r
    }

    /// Members that are to receive pushes for new entries.
    pub fn member_ids(&self) -> impl Iterator<Item = &UserId> {
        self.members.keys()
    }

    fn manager_check(&self, by: &Caller) -> Result<(), Rejection> {
        if by.admin {
            return Ok(());
        }
        match self.members.get(&by.user) {
            Some(m) if m.role.manages() => Ok(()),
            Some(m) => Err(Rejection::forbidden(format!(
                "a {} may not manage members or close the group; owners, agents and dispatchers may",
                m.role.as_str()
            ))),
            None => Err(not_a_member()),
        }
    }

    fn open_check(&self) -> Result<(), Rejection> {
        match &self.lifecycle {
            Lifecycle::Open => Ok(()),
            Lifecycle::Closed { .. } => Err(Rejection::conflict("the group is closed")),
        }
    }

    fn append(
        &mut self,
        from: UserId,
        at: Timestamp,
        client_msg_id: Option<ClientMsgId>,
        body: MessageBody,
        require_receipt: bool,
    ) -> Entry {
        self.last_seq += 1;
        Entry { seq: self.last_seq, from, ts: at, client_msg_id, body, require_receipt }
    }

    fn append_system(&mut self, by: UserId, at: Timestamp, event: &SystemEvent, out: &mut Vec<GroupEffect>) -> Seq {
        let entry = self.append(by, at, None, MessageBody::system(event), false);
        let seq = entry.seq;
        out.push(GroupEffect::Append(entry));
        seq
    }

    fn arm_outbox(&self, out: &mut Vec<GroupEffect>) {
        for lane in Lane::ALL {
            out.push(match self.outbox.next_due(lane) {
                Some(due) => GroupEffect::TimerSet { timer: GroupTimer::Outbox(lane), due },
                None => GroupEffect::TimerCleared { timer: GroupTimer::Outbox(lane) },
            });
        }
    }

    /// Drops receipt watches every other member has now read, and says so.
    fn settle_watches(&mut self, out: &mut Vec<GroupEffect>) {
        let members = &self.members;
        let settled: Vec<Seq> = self
            .receipt_watches
            .iter()
            .filter(|(seq, w)| members.iter().all(|(u, m)| *u == w.from || m.read_seq >= **seq))
            .map(|(seq, _)| *seq)
            .collect();
        for seq in settled {
            self.receipt_watches.remove(&seq);
            out.push(GroupEffect::TimerCleared { timer: GroupTimer::ReceiptOverdue { seq } });
        }
    }

    /// Checks a command against the current state without changing it. The leader's actor
    /// runs this to refuse early; `apply` runs it again because other commands may have
    /// been applied in between.
    pub fn check(state: Option<&GroupState>, cmd: &GroupCommand) -> Result<(), Rejection> {
        let Some(s) = state else {
            return match cmd {
                GroupCommand::Open(open) => check_open(open),
                GroupCommand::Fire(_) | GroupCommand::Note { .. } | GroupCommand::Settle { .. } => {
                    Err(Rejection::not_found("no such group"))
                }
                _ => Err(not_a_member()),
            };
        };
        match cmd {
            GroupCommand::Open(open) => {
                if s.opener == open.opener.user && s.kind == open.kind {
                    Ok(())
                } else {
                    Err(Rejection::conflict("a group with this id already exists"))
                }
            }
            GroupCommand::Invite { by, user, role } => {
                s.manager_check(by)?;
                s.open_check()?;
                match s.members.get(user) {
                    Some(m) if m.role == *role => Ok(()),
                    Some(m) => Err(Rejection::conflict(format!("{user} is already a member as {}", m.role.as_str()))),
                    None if s.members.len() as u32 >= s.limits.max_members => {
                        Err(Rejection::conflict(format!("the group is full ({} members)", s.limits.max_members))
                            .at_limit(Limit::MaxMembersPerGroup))
                    }
                    None => Ok(()),
                }
            }
            GroupCommand::Remove { by, user } => {
                s.manager_check(by)?;
                s.open_check()?;
                if *user == s.opener {
                    return Err(Rejection::conflict("the owner cannot be removed; the owner may leave"));
                }
                Ok(())
            }
            // Closed groups still let members go: leaving is how a user frees a place in
            // their group limit.
            GroupCommand::Leave { user } => {
                if !s.members.contains_key(user) {
                    return Err(not_a_member());
                }
                Ok(())
            }
            GroupCommand::Close { by, .. } => s.manager_check(by),
            GroupCommand::Send(send) => {
                if !send.from.admin && !s.members.contains_key(&send.from.user) {
                    return Err(not_a_member());
                }
                s.open_check()?;
                if let Some(r) = send.body.reply_to
                    && r > s.last_seq
                {
                    return Err(Rejection::bad_request(format!(
                        "body.reply_to {r} is beyond the group's last seq {}",
                        s.last_seq
                    )));
                }
                if send.require_receipt && s.receipt_watches.len() as u32 >= s.limits.max_receipt_watches {
                    return Err(Rejection::conflict(format!(
                        "{} messages already wait for receipts in this group",
                        s.limits.max_receipt_watches
                    ))
                    .at_limit(Limit::MaxReceiptWatchesPerGroup));
                }
                Ok(())
            }
            GroupCommand::MarkRead { user, seq } => {
                if !s.members.contains_key(user) {
                    return Err(not_a_member());
                }
                if *seq > s.last_seq {
                    return Err(Rejection::bad_request(format!(
                        "seq {seq} is beyond the group's last seq {}",
                        s.last_seq
                    )));
                }
                Ok(())
            }
            GroupCommand::Fire(_) | GroupCommand::Note { .. } | GroupCommand::Settle { .. } => Ok(()),
        }
    }

    /// Applies one command. `state` is `None` until the group is opened.
    pub fn apply(
        state: &mut Option<GroupState>,
        cmd: GroupCommand,
        at: Timestamp,
        log: &impl GroupLog,
    ) -> Result<GroupApplied, StorageFault> {
        // A message stays sent: its retry answers with its seq even after the group closed or
        // the sender left (the rest of `check` is for new messages).
        if let (Some(_), GroupCommand::Send(send)) = (state.as_ref(), &cmd)
            && let Some((seq, ts)) = log.find_client_msg(&send.from.user, &send.client_msg_id)?
        {
            return Ok(Applied::unchanged(GroupReply::Sent { seq, ts, duplicate: true }));
        }
        if let Err(rejection) = Self::check(state.as_ref(), &cmd) {
            return Ok(Applied::rejected(rejection));
        }
        let mut effects = Vec::new();
        let Some(s) = state.as_mut() else {
            let GroupCommand::Open(open) = cmd else {
                unreachable!("check() lets only Open through for a missing group")
            };
            *state = Some(Self::open(open, at, &mut effects));
            return Ok(Applied::changed(GroupReply::Opened { created: true }, effects));
        };
        let reply = match cmd {
            GroupCommand::Open(_) => {
                return Ok(Applied::unchanged(GroupReply::Opened { created: false }));
            }
            GroupCommand::Invite { by, user, role } => {
                if s.members.contains_key(&user) {
                    return Ok(Applied::unchanged(GroupReply::Updated { changed: false }));
                }
                s.members.insert(user.clone(), Member { role, read_seq: 0 });
                effects.push(GroupEffect::MemberAdded { user: user.clone() });
                s.append_system(
                    by.user.clone(),
                    at,
                    &SystemEvent::MemberJoined { user, role, by: by.user },
                    &mut effects,
                );
                GroupReply::Updated { changed: true }
            }
            GroupCommand::Remove { by, user } => {
                if !s.members.contains_key(&user) {
                    return Ok(Applied::unchanged(GroupReply::Updated { changed: false }));
                }
                // The entry is written while `user` is still a member, so they see it.
                s.append_system(
                    by.user.clone(),
                    at,
                    &SystemEvent::MemberRemoved { user: user.clone(), by: by.user },
                    &mut effects,
                );
                s.members.remove(&user);
                effects.push(GroupEffect::MemberGone { user });
                s.settle_watches(&mut effects);
                GroupReply::Updated { changed: true }
            }
            GroupCommand::Leave { user } => {
                s.append_system(user.clone(), at, &SystemEvent::MemberLeft { user: user.clone() }, &mut effects);
                s.members.remove(&user);
                effects.push(GroupEffect::MemberGone { user });
                s.settle_watches(&mut effects);
                GroupReply::Updated { changed: true }
            }
            GroupCommand::Close { by, resolution } => {
                if !s.is_open() {
                    return Ok(Applied::unchanged(GroupReply::Updated { changed: false }));
                }
                s.append_system(
                    by.user.clone(),
                    at,
                    &SystemEvent::GroupClosed { resolution: resolution.clone(), by: by.user },
                    &mut effects,
                );
                // Receipt watches stay: a message still unread when its time is up gets its
                // `receipt_overdue` entry and webhook even in a closed group.
                s.lifecycle = Lifecycle::Closed { resolution };
                GroupReply::Updated { changed: true }
            }
            GroupCommand::Send(send) => {
                let sender = send.from.user;
                let entry = s.append(sender.clone(), at, Some(send.client_msg_id), send.body, send.require_receipt);
                let seq = entry.seq;
                effects.push(GroupEffect::Append(entry));
                // The sender has read what they wrote; no receipt event for that.
                if let Some(m) = s.members.get_mut(&sender) {
                    m.read_seq = seq;
                }
                let others_exist = s.members.keys().any(|u| *u != sender);
                if send.require_receipt && others_exist {
                    let due = at.plus_millis(send.receipt_timeout_ms);
                    s.receipt_watches.insert(seq, ReceiptWatch { from: sender, due });
                    effects.push(GroupEffect::TimerSet { timer: GroupTimer::ReceiptOverdue { seq }, due });
                }
                GroupReply::Sent { seq, ts: at, duplicate: false }
            }
            GroupCommand::MarkRead { user, seq } => {
                let m = s.members.get_mut(&user).expect("check() ensured membership");
                if seq <= m.read_seq {
                    return Ok(Applied::unchanged(GroupReply::Read { read_seq: m.read_seq }));
                }
                m.read_seq = seq;
                effects.push(GroupEffect::ReadMoved { user, read_seq: seq });
                s.settle_watches(&mut effects);
                GroupReply::Read { read_seq: seq }
            }
            GroupCommand::Fire(GroupTimer::ReceiptOverdue { seq }) => {
                let Some(watch) = s.receipt_watches.get(&seq) else {
                    return Ok(Applied::unchanged(GroupReply::Fired));
                };
                if at < watch.due {
                    // A leader whose clock runs behind fired early; it re-arms from the state.
                    return Ok(Applied::unchanged(GroupReply::Fired));
                }
                let watch = s.receipt_watches.remove(&seq).expect("just looked up");
                effects.push(GroupEffect::TimerCleared { timer: GroupTimer::ReceiptOverdue { seq } });
                let pending = s.receipts(seq, Some(&watch.from)).pending;
                if !pending.is_empty() {
                    s.append_system(
                        system_user(),
                        at,
                        &SystemEvent::ReceiptOverdue { seq, pending: pending.clone() },
                        &mut effects,
                    );
                    let hook = serde_json::json!({
                        "event": "group.receipt_overdue",
                        "idempotency_key": format!("group/{}/receipt_overdue/{seq}", log.group_id()),
                        "group": log.group_id(),
                        "seq": seq,
                        "from": watch.from,
                        "pending": pending,
                        "at": at,
                    });
                    let hook = Webhook {
                        idempotency_key: format!("group/{}/receipt_overdue/{seq}", log.group_id()),
                        event: "group.receipt_overdue".into(),
                        json: hook.to_string(),
                    };
                    s.outbox.push(Delivery::Webhook(hook), at);
                    s.arm_outbox(&mut effects);
                    effects.push(GroupEffect::ReceiptOverdue { seq, pending });
                }
                GroupReply::Fired
            }
            GroupCommand::Fire(GroupTimer::Outbox(_)) => return Ok(Applied::unchanged(GroupReply::Fired)),
            GroupCommand::Settle { results, max_attempts } => {
                if !s.outbox.settle(&results, at, max_attempts) {
                    return Ok(Applied::unchanged(GroupReply::Updated { changed: false }));
                }
                s.arm_outbox(&mut effects);
                GroupReply::Updated { changed: true }
            }
            GroupCommand::Note { body, note_id } => {
                if let Some(id) = &note_id
                    && let Some((seq, _)) = log.find_client_msg(&system_user(), id)?
                {
                    return Ok(Applied::unchanged(GroupReply::Noted { seq }));
                }
                let entry = s.append(system_user(), at, note_id, body, false);
                let seq = entry.seq;
                effects.push(GroupEffect::Append(entry));
                GroupReply::Noted { seq }
            }
        };
        Ok(Applied::changed(reply, effects))
    }

    fn open(open: OpenGroup, at: Timestamp, effects: &mut Vec<GroupEffect>) -> GroupState {
        let opener = open.opener.user;
        let mut members = BTreeMap::new();
        members.insert(opener.clone(), Member { role: MemberRole::Owner, read_seq: 0 });
        for spec in &open.members {
            members.entry(spec.user.clone()).or_insert(Member { role: spec.role, read_seq: 0 });
        }
        let mut s = GroupState {
            kind: open.kind,
            title: open.title,
            order_id: open.order_id,
            exception_type: open.exception_type,
            opener: opener.clone(),
            opened_at: at,
            lifecycle: Lifecycle::Open,
            members,
            last_seq: 0,
            receipt_watches: BTreeMap::new(),
            limits: open.limits,
            outbox: Outbox::default(),
        };
        let listed = s.members.iter().map(|(user, m)| MemberSpec { user: user.clone(), role: m.role }).collect();
        for user in s.members.keys() {
            effects.push(GroupEffect::MemberAdded { user: user.clone() });
        }
        s.append_system(opener.clone(), at, &SystemEvent::GroupOpened { by: opener, members: listed }, effects);
        s
    }
}

pub const MAX_TITLE_CHARS: usize = 200;
pub const MAX_RESOLUTION_CHARS: usize = 2000;

/// Shape checks for `group.open` that need no state.
pub fn check_open(open: &OpenGroup) -> Result<(), Rejection> {
    if open.title.chars().count() > MAX_TITLE_CHARS {
        return Err(Rejection::bad_request(format!("title is longer than {MAX_TITLE_CHARS} characters")));
    }
    if let Some(o) = &open.order_id {
        crate::ids::validate_id("order_id", o).map_err(|e| Rejection::bad_request(e.to_string()))?;
    }
    if open.kind == GroupKind::Chat && open.exception_type.is_some() {
        return Err(Rejection::bad_request("exception_type is only for groups of kind exception"));
    }
    let mut distinct: Vec<&UserId> = open.members.iter().map(|m| &m.user).collect();
    distinct.push(&open.opener.user);
    distinct.sort();
    distinct.dedup();
    if distinct.len() as u32 > open.limits.max_members {
        return Err(Rejection::bad_request(format!(
            "{} members requested, a group holds at most {}",
            distinct.len(),
            open.limits.max_members
        ))
        .at_limit(Limit::MaxMembersPerGroup));
    }
    Ok(())
}

/// Every user a command makes a member, so their inboxes can list the group first.
pub fn joining_users(cmd: &GroupCommand) -> Vec<UserId> {
    match cmd {
        GroupCommand::Open(open) => {
            let mut users: Vec<UserId> = open.members.iter().map(|m| m.user.clone()).collect();
            users.push(open.opener.user.clone());
            users.sort();
            users.dedup();
            users
        }
        GroupCommand::Invite { user, .. } => vec![user.clone()],
        _ => Vec::new(),
    }
}

/// The id a server-assigned group gets: unique without coordination.
pub fn assigned_group_id(node_tag: &str, counter: u64, at: Timestamp) -> GroupId {
    GroupId::parse(&format!("g-{}-{node_tag}-{counter}", at.0)).expect("generated ids use the id grammar")
}

#[cfg(test)]
mod tests;
