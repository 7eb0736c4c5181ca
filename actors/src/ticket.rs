//! Tickets: support cases with a lifecycle, owned by a customer and worked by the agents
//! of one skill group.
//!
//! A ticket is a deterministic state machine like a group. Its history (replies and every
//! change) is its log; its SLA deadlines are timers in its state; what other entities
//! must learn (its skill queue, a linked group, a review ticket) and webhooks go through
//! its outbox, so each reaches its receiver even if the leader dies in between.

mod classify;

use serde::{Deserialize, Serialize};

pub use classify::{Category, Classified, Rules, classify};

use crate::behavior::Request;
use crate::body::{MessageBody, SystemEvent};
use crate::entity::Timestamp;
use crate::error::Rejection;
use crate::group::{Entry, GroupCommand, Seq};
use crate::ids::{ClientMsgId, GroupId, SkillGroup, TicketId, UserId, system_user};
use crate::outbox::{Delivery, DeliveryResult, Lane, Outbox, Webhook};
use crate::principal::{Principal, Role, Tier};
use crate::queue::QueueCommand;

pub const MAX_SUBJECT_CHARS: usize = 200;
pub const MAX_TEXT_CHARS: usize = 4000;
pub const MAX_REASON_CHARS: usize = 1000;
/// System changes a ticket still records in its history once replies are refused.
const HISTORY_SLACK: Seq = 64;

/// The skill group that reviews low-rated tickets.
pub fn review_skill_group() -> SkillGroup {
    SkillGroup::parse("quality").expect("a valid skill group")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    Low,
    Normal,
    High,
    Urgent,
}

impl Priority {
    pub fn raised(self) -> Priority {
        match self {
            Priority::Low => Priority::Normal,
            Priority::Normal => Priority::High,
            Priority::High | Priority::Urgent => Priority::Urgent,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Low => "low",
            Priority::Normal => "normal",
            Priority::High => "high",
            Priority::Urgent => "urgent",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TicketStatus {
    Queued,
    Assigned,
    AwaitingConfirmation,
    Resolved,
    Closed,
    Escalated,
}

impl TicketStatus {
    pub const ALL: [TicketStatus; 6] = [
        TicketStatus::Queued,
        TicketStatus::Assigned,
        TicketStatus::AwaitingConfirmation,
        TicketStatus::Resolved,
        TicketStatus::Closed,
        TicketStatus::Escalated,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TicketStatus::Queued => "queued",
            TicketStatus::Assigned => "assigned",
            TicketStatus::AwaitingConfirmation => "awaiting_confirmation",
            TicketStatus::Resolved => "resolved",
            TicketStatus::Closed => "closed",
            TicketStatus::Escalated => "escalated",
        }
    }

    /// Waiting in the skill queue for an agent.
    pub fn is_waiting(self) -> bool {
        matches!(self, TicketStatus::Queued | TicketStatus::Escalated)
    }

    /// Still needs work (counts toward SLAs).
    pub fn is_open(self) -> bool {
        !matches!(self, TicketStatus::Resolved | TicketStatus::Closed)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sla {
    pub first_response_ms: u64,
    pub resolution_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlaTable {
    pub low: Sla,
    pub normal: Sla,
    pub high: Sla,
    pub urgent: Sla,
}

impl SlaTable {
    pub fn of(&self, p: Priority) -> Sla {
        match p {
            Priority::Low => self.low,
            Priority::Normal => self.normal,
            Priority::High => self.high,
            Priority::Urgent => self.urgent,
        }
    }
}

/// Settings fixed when the ticket opens, so every replica applies the same ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TicketSettings {
    pub sla: SlaTable,
    pub max_history: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenTicket {
    pub customer: UserId,
    pub tier: Tier,
    pub subject: String,
    pub description: String,
    pub order_id: Option<String>,
    pub group: Option<GroupId>,
    pub class: Classified,
    pub review_of: Option<TicketId>,
    pub settings: TicketSettings,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rating {
    pub score: u8,
    pub comment: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TicketState {
    pub customer: UserId,
    pub tier: Tier,
    pub subject: String,
    pub description: String,
    pub order_id: Option<String>,
    pub group: Option<GroupId>,
    pub review_of: Option<TicketId>,
    pub category: String,
    pub skill_group: SkillGroup,
    pub priority: Priority,
    pub status: TicketStatus,
    pub assignee: Option<UserId>,
    /// Who had it before it was escalated or returned: the queue prefers someone else.
    pub previous_assignee: Option<UserId>,
    pub opened_at: Timestamp,
    pub first_response_at: Option<Timestamp>,
    pub resolved_at: Option<Timestamp>,
    pub closed_at: Option<Timestamp>,
    /// Pending deadlines; `None` once met or breached.
    pub first_response_due: Option<Timestamp>,
    pub resolution_due: Option<Timestamp>,
    pub breaches: u32,
    pub escalations: u32,
    pub rating: Option<Rating>,
    pub review_ticket: Option<TicketId>,
    pub settings: TicketSettings,
    /// Bumped whenever the summary the skill queue keeps changes.
    pub rev: u64,
    /// History entries so far.
    pub last_seq: Seq,
    pub outbox: Outbox,
}

/// What the skill queue (and `ticket.list`) knows of a ticket. Stored and sent between
/// nodes in a binary encoding: no field may be skipped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TicketSummary {
    pub ticket: TicketId,
    pub customer: UserId,
    pub category: String,
    pub skill_group: SkillGroup,
    pub priority: Priority,
    pub state: TicketStatus,
    pub assignee: Option<UserId>,
    pub opened_at: Timestamp,
    pub due_at: Option<Timestamp>,
    pub review_of: Option<TicketId>,
    pub first_response_ms: Option<u64>,
    pub resolution_ms: Option<u64>,
    pub rating: Option<u8>,
    pub breaches: u32,
    /// Who had it before it was escalated or returned: the queue prefers someone else.
    pub previous_assignee: Option<UserId>,
}

/// Deadlines a ticket keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum TicketTimer {
    FirstResponse,
    Resolution,
    Outbox(Lane),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TicketCommand {
    Open(OpenTicket),
    /// From the skill queue: valid only while the ticket still is at revision `rev`.
    Assign {
        agent: UserId,
        rev: u64,
    },
    Claim {
        by: Principal,
    },
    Reply {
        by: Principal,
        text: String,
    },
    Propose {
        by: Principal,
        solution: String,
    },
    Confirm {
        by: Principal,
        accepted: bool,
    },
    Escalate {
        by: Principal,
        reason: String,
    },
    Rate {
        by: Principal,
        score: u8,
        comment: String,
    },
    Close {
        by: Principal,
    },
    /// From the skill queue: `agent` stayed away past the grace period.
    Return {
        agent: UserId,
    },
    Fire(TicketTimer),
    Settle {
        results: Vec<(u64, DeliveryResult)>,
        max_attempts: u32,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TicketReply {
    Opened { summary: TicketSummary, created: bool },
    Changed { state: TicketStatus, changed: bool },
    Fired,
}

/// A change pushed to the customer's and the assignee's devices.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TicketEvent {
    pub ticket: TicketId,
    pub state: TicketStatus,
    pub assignee: Option<UserId>,
    pub priority: Priority,
    pub skill_group: SkillGroup,
    pub category: String,
    pub action: &'static str,
    /// For the customer: what happens next, in words.
    pub notice: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(skip)]
    pub audience: Vec<UserId>,
}

/// Everything applying one ticket command produced.
#[derive(Debug, Clone, PartialEq)]
pub struct TicketApplied {
    pub reply: Result<TicketReply, Rejection>,
    pub state_changed: bool,
    pub history: Vec<Entry>,
    /// Timers to set (`Some(due)`) or clear (`None`).
    pub timers: Vec<(TicketTimer, Option<Timestamp>)>,
    pub event: Option<TicketEvent>,
}

impl TicketApplied {
    fn rejected(r: Rejection) -> Self {
        TicketApplied { reply: Err(r), state_changed: false, history: Vec::new(), timers: Vec::new(), event: None }
    }
    fn unchanged(reply: TicketReply) -> Self {
        TicketApplied { reply: Ok(reply), state_changed: false, history: Vec::new(), timers: Vec::new(), event: None }
    }
}

/// One line of a ticket's history, as `ticket.get` shows it under `event`.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "action", rename_all = "snake_case")]
enum HistoryEvent<'a> {
    Opened { category: &'a str, skill_group: &'a SkillGroup, priority: Priority },
    Assigned { agent: &'a UserId, claimed: bool },
    Replied { text: &'a str },
    Proposed { solution: &'a str },
    Confirmed,
    Rejected,
    Escalated { reason: &'a str, priority: Priority },
    SlaBreached { deadline: &'static str },
    Returned { agent: &'a UserId },
    Rated { score: u8, comment: &'a str },
    Resolved,
    Closed,
}

impl HistoryEvent<'_> {
    fn action(&self) -> &'static str {
        match self {
            HistoryEvent::Opened { .. } => "opened",
            HistoryEvent::Assigned { .. } => "assigned",
            HistoryEvent::Replied { .. } => "replied",
            HistoryEvent::Proposed { .. } => "proposed",
            HistoryEvent::Confirmed => "confirmed",
            HistoryEvent::Rejected => "rejected",
            HistoryEvent::Escalated { .. } => "escalated",
            HistoryEvent::SlaBreached { .. } => "sla_breached",
            HistoryEvent::Returned { .. } => "returned",
            HistoryEvent::Rated { .. } => "rated",
            HistoryEvent::Resolved => "resolved",
            HistoryEvent::Closed => "closed",
        }
    }
}

/// Agents of the ticket's skill group and admins work a ticket.
pub fn is_staff(p: &Principal, skill_group: &SkillGroup) -> bool {
    p.has(Role::Admin) || (p.has(Role::Agent) && p.skills.contains(skill_group))
}

/// The customer, the assignee, agents of the skill group and admins may read a ticket;
/// nobody else learns whether it exists.
pub fn authorize_read<'a>(state: Option<&'a TicketState>, p: &Principal) -> Result<&'a TicketState, Rejection> {
    match state {
        Some(s) if s.customer == p.user || s.assignee.as_ref() == Some(&p.user) || is_staff(p, &s.skill_group) => Ok(s),
        None if p.has(Role::Admin) => Err(Rejection::not_found("no such ticket")),
        _ => Err(not_yours()),
    }
}

fn not_yours() -> Rejection {
    Rejection::forbidden("not your ticket, and not one of your skill groups")
}

fn in_state(s: &TicketState, what: &str) -> Rejection {
    Rejection::conflict(format!("cannot {what}: the ticket is {}", s.status.as_str()))
}

/// The id of the review ticket a low rating of `ticket` opens: fixed, so opening it is idempotent.
pub fn review_ticket_id(ticket: &TicketId) -> TicketId {
    let base = ticket.as_str();
    let keep = base.len().min(crate::ids::MAX_ID_LEN - 7);
    TicketId::parse(&format!("review-{}", &base[..keep])).expect("ids are ASCII and within the grammar")
}

/// "2 hours", "30 minutes", "3 days".
fn in_words(ms: u64) -> String {
    let plural = |n: u64, unit: &str| if n == 1 { format!("1 {unit}") } else { format!("{n} {unit}s") };
    let minutes = ms.div_ceil(60_000);
    if minutes < 60 {
        plural(minutes.max(1), "minute")
    } else if minutes < 48 * 60 {
        plural(minutes.div_ceil(60), "hour")
    } else {
        plural(minutes.div_ceil(24 * 60), "day")
    }
}

impl TicketState {
    pub fn summary(&self, id: &TicketId) -> TicketSummary {
        TicketSummary {
            ticket: id.clone(),
            customer: self.customer.clone(),
            category: self.category.clone(),
            skill_group: self.skill_group.clone(),
            priority: self.priority,
            state: self.status,
            assignee: self.assignee.clone(),
            opened_at: self.opened_at,
            due_at: self.resolution_due,
            review_of: self.review_of.clone(),
            first_response_ms: self.first_response_at.map(|t| self.opened_at.millis_until(t)),
            resolution_ms: self.resolved_at.map(|t| self.opened_at.millis_until(t)),
            rating: self.rating.as_ref().map(|r| r.score),
            breaches: self.breaches,
            previous_assignee: self.previous_assignee.clone(),
        }
    }

    fn notice(&self, at: Timestamp) -> String {
        let team = self.skill_group.as_str();
        let within = |due: Option<Timestamp>| due.map(|d| in_words(at.millis_until(d)));
        match self.status {
            TicketStatus::Queued => match within(self.first_response_due) {
                Some(w) => format!("received by the {team} team, first response expected within {w}"),
                None => format!("waiting for an agent of the {team} team"),
            },
            TicketStatus::Assigned => match within(self.resolution_due) {
                Some(w) => format!("assigned to the {team} team, expected within {w}"),
                None => format!("assigned to the {team} team"),
            },
            TicketStatus::AwaitingConfirmation => "a solution was proposed: please confirm or reject it".into(),
            TicketStatus::Escalated => {
                format!("escalated to {} priority; the {team} team's next agent takes it over", self.priority.as_str())
            }
            TicketStatus::Resolved => "resolved: please rate how we did".into(),
            TicketStatus::Closed => "closed".into(),
        }
    }

    /// Checks a command against the current state. The leader's actor runs it to refuse
    /// early; `apply` runs it again.
    pub fn check(state: Option<&TicketState>, cmd: &TicketCommand) -> Result<(), Rejection> {
        let Some(s) = state else {
            return match cmd {
                TicketCommand::Open(_) => Ok(()),
                TicketCommand::Claim { by }
                | TicketCommand::Reply { by, .. }
                | TicketCommand::Propose { by, .. }
                | TicketCommand::Confirm { by, .. }
                | TicketCommand::Escalate { by, .. }
                | TicketCommand::Rate { by, .. }
                | TicketCommand::Close { by } => authorize_read(None, by).map(|_| ()),
                _ => Err(Rejection::not_found("no such ticket")),
            };
        };
        let staff = |by: &Principal| if is_staff(by, &s.skill_group) { Ok(()) } else { Err(not_yours()) };
        let customer = |by: &Principal, what: &str| {
            if by.user == s.customer {
                Ok(())
            } else {
                authorize_read(state, by)?;
                Err(Rejection::forbidden(format!("only the ticket's customer may {what}")))
            }
        };
        match cmd {
            TicketCommand::Open(open) if open.customer == s.customer => Ok(()),
            TicketCommand::Open(_) => Err(Rejection::conflict("a ticket with this id already exists")),
            TicketCommand::Assign { rev, .. } => {
                if !s.status.is_waiting() {
                    Err(in_state(s, "assign"))
                } else if *rev != s.rev {
                    Err(Rejection::conflict(format!("the ticket changed (revision {} now, not {rev})", s.rev)))
                } else {
                    Ok(())
                }
            }
            TicketCommand::Claim { by } => {
                if !by.has(Role::Agent) || !by.skills.contains(&s.skill_group) {
                    authorize_read(state, by)?;
                    return Err(Rejection::forbidden(format!(
                        "only agents of the {} skill group may claim this ticket",
                        s.skill_group
                    )));
                }
                if s.status.is_waiting() { Ok(()) } else { Err(in_state(s, "claim")) }
            }
            TicketCommand::Reply { by, .. } => {
                if by.user != s.customer {
                    staff(by)?;
                }
                if s.status == TicketStatus::Closed {
                    Err(in_state(s, "reply"))
                } else if s.last_seq >= Seq::from(s.settings.max_history) {
                    Err(Rejection::conflict(format!(
                        "the ticket's history is full ({} entries); open a new ticket",
                        s.settings.max_history
                    )))
                } else {
                    Ok(())
                }
            }
            TicketCommand::Propose { by, .. } => {
                staff(by)?;
                if s.status != TicketStatus::Assigned {
                    return Err(in_state(s, "propose a solution"));
                }
                if s.assignee.as_ref() != Some(&by.user) && !by.has(Role::Admin) {
                    return Err(Rejection::forbidden("only the ticket's assignee may propose a solution"));
                }
                Ok(())
            }
            TicketCommand::Confirm { by, .. } => {
                customer(by, "confirm a solution")?;
                if s.status == TicketStatus::AwaitingConfirmation { Ok(()) } else { Err(in_state(s, "confirm")) }
            }
            TicketCommand::Escalate { by, .. } => {
                staff(by)?;
                match s.status {
                    TicketStatus::Queued | TicketStatus::Assigned | TicketStatus::AwaitingConfirmation => Ok(()),
                    _ => Err(in_state(s, "escalate")),
                }
            }
            TicketCommand::Rate { by, .. } => {
                customer(by, "rate it")?;
                if !matches!(s.status, TicketStatus::Resolved | TicketStatus::Closed) {
                    Err(in_state(s, "rate"))
                } else if s.rating.is_some() {
                    Err(Rejection::conflict(format!(
                        "cannot rate: the ticket is {} and rated already",
                        s.status.as_str()
                    )))
                } else {
                    Ok(())
                }
            }
            TicketCommand::Close { by } => {
                staff(by)?;
                match s.status {
                    TicketStatus::Resolved => Ok(()),
                    TicketStatus::Closed => Err(in_state(s, "close")),
                    _ if by.has(Role::Admin) => Ok(()),
                    _ => Err(in_state(s, "close (agents close resolved tickets)")),
                }
            }
            TicketCommand::Return { .. } | TicketCommand::Fire(_) | TicketCommand::Settle { .. } => Ok(()),
        }
    }

    pub fn apply(state: &mut Option<TicketState>, id: &TicketId, cmd: TicketCommand, at: Timestamp) -> TicketApplied {
        if let Err(r) = Self::check(state.as_ref(), &cmd) {
            return TicketApplied::rejected(r);
        }
        let Some(s) = state.as_mut() else {
            let TicketCommand::Open(open) = cmd else { unreachable!("check() lets only Open through without state") };
            let (s, out) = Self::open(id, open, at);
            *state = Some(s);
            return out;
        };
        let before = s.summary(id);
        let mut out = TicketApplied {
            reply: Ok(TicketReply::Changed { state: s.status, changed: true }),
            state_changed: true,
            history: Vec::new(),
            timers: Vec::new(),
            event: None,
        };
        let mut change = Change { id, s, at, out: &mut out, actions: Vec::new(), text: None };
        match cmd {
            TicketCommand::Open(_) => {
                return TicketApplied::unchanged(TicketReply::Opened { summary: before, created: false });
            }
            TicketCommand::Assign { agent, .. } => change.assign(agent, false),
            TicketCommand::Claim { by } => change.assign(by.user, true),
            TicketCommand::Reply { by, text } => {
                if by.user != change.s.customer {
                    change.responded();
                }
                change.record(&by.user, HistoryEvent::Replied { text: &text });
                change.text = Some(text);
            }
            TicketCommand::Propose { by, solution } => {
                change.responded();
                change.s.status = TicketStatus::AwaitingConfirmation;
                change.record(&by.user, HistoryEvent::Proposed { solution: &solution });
                change.text = Some(solution);
            }
            TicketCommand::Confirm { by, accepted: true } => {
                change.record(&by.user, HistoryEvent::Confirmed);
                change.resolve();
            }
            TicketCommand::Confirm { by, accepted: false } => {
                change.record(&by.user, HistoryEvent::Rejected);
                change.escalate(&by.user, "the customer rejected the proposed solution");
            }
            TicketCommand::Escalate { by, reason } => change.escalate(&by.user, &reason),
            TicketCommand::Rate { by, score, comment } => change.rate(&by.user, score, comment),
            TicketCommand::Close { by } => change.close(&by.user),
            TicketCommand::Return { agent } => {
                if change.s.status != TicketStatus::Assigned || change.s.assignee.as_ref() != Some(&agent) {
                    return TicketApplied::unchanged(TicketReply::Changed { state: change.s.status, changed: false });
                }
                change.s.status = TicketStatus::Queued;
                change.s.previous_assignee = change.s.assignee.take();
                change.record(&system_user(), HistoryEvent::Returned { agent: &agent });
            }
            TicketCommand::Fire(timer) => {
                if !change.fire(timer) {
                    return TicketApplied::unchanged(TicketReply::Fired);
                }
            }
            TicketCommand::Settle { results, max_attempts } => {
                let changed = change.s.outbox.settle(&results, at, max_attempts);
                change.arm_outbox();
                let state = change.s.status;
                out.reply = Ok(TicketReply::Changed { state, changed });
                out.state_changed = changed;
                return out;
            }
        }
        change.finish(before);
        out
    }

    fn open(id: &TicketId, open: OpenTicket, at: Timestamp) -> (TicketState, TicketApplied) {
        let sla = open.settings.sla.of(open.class.priority);
        let mut s = TicketState {
            customer: open.customer.clone(),
            tier: open.tier,
            subject: open.subject,
            description: open.description,
            order_id: open.order_id,
            group: open.group,
            review_of: open.review_of,
            category: open.class.category,
            skill_group: open.class.skill_group,
            priority: open.class.priority,
            status: TicketStatus::Queued,
            assignee: None,
            previous_assignee: None,
            opened_at: at,
            first_response_at: None,
            resolved_at: None,
            closed_at: None,
            first_response_due: Some(at.plus_millis(sla.first_response_ms)),
            resolution_due: Some(at.plus_millis(sla.resolution_ms)),
            breaches: 0,
            escalations: 0,
            rating: None,
            review_ticket: None,
            settings: open.settings,
            rev: 0,
            last_seq: 0,
            outbox: Outbox::default(),
        };
        let mut out = TicketApplied {
            reply: Ok(TicketReply::Fired),
            state_changed: true,
            history: Vec::new(),
            timers: vec![
                (TicketTimer::FirstResponse, s.first_response_due),
                (TicketTimer::Resolution, s.resolution_due),
            ],
            event: None,
        };
        let mut change = Change { id, s: &mut s, at, out: &mut out, actions: Vec::new(), text: None };
        let (category, skill_group, priority) =
            (change.s.category.clone(), change.s.skill_group.clone(), change.s.priority);
        change
            .record(&open.customer, HistoryEvent::Opened { category: &category, skill_group: &skill_group, priority });
        if let Some(group) = change.s.group.clone() {
            let linked = SystemEvent::TicketLinked {
                ticket: id.clone(),
                category: category.clone(),
                state: TicketStatus::Queued.as_str().into(),
            };
            change.note_group(group, &linked, "linked");
        }
        // Every summary differs from "nothing": the queue, webhook and event follow.
        change.finish_with(None);
        let summary = s.summary(id);
        out.reply = Ok(TicketReply::Opened { summary, created: true });
        (s, out)
    }
}

/// One command's changes to a ticket, and what they produce.
struct Change<'a> {
    id: &'a TicketId,
    s: &'a mut TicketState,
    at: Timestamp,
    out: &'a mut TicketApplied,
    actions: Vec<&'static str>,
    text: Option<String>,
}

impl Change<'_> {
    fn record(&mut self, by: &UserId, event: HistoryEvent<'_>) {
        self.actions.push(event.action());
        if self.s.last_seq >= Seq::from(self.s.settings.max_history) + HISTORY_SLACK {
            return;
        }
        #[derive(Serialize)]
        struct Tagged<'e> {
            #[serde(rename = "type")]
            kind: &'static str,
            #[serde(flatten)]
            event: &'e HistoryEvent<'e>,
        }
        let json = serde_json::to_string(&Tagged { kind: "ticket", event: &event }).expect("history always serializes");
        self.s.last_seq += 1;
        self.out.history.push(Entry {
            seq: self.s.last_seq,
            from: by.clone(),
            ts: self.at,
            client_msg_id: None,
            body: MessageBody { json: json.into(), reply_to: None },
            require_receipt: false,
        });
    }

    fn assign(&mut self, agent: UserId, claimed: bool) {
        self.s.status = TicketStatus::Assigned;
        self.record(&agent, HistoryEvent::Assigned { agent: &agent, claimed });
        self.s.assignee = Some(agent);
    }

    /// An agent answered: the first-response deadline is met.
    fn responded(&mut self) {
        if self.s.first_response_at.is_none() {
            self.s.first_response_at = Some(self.at);
        }
        if self.s.first_response_due.take().is_some() {
            self.out.timers.push((TicketTimer::FirstResponse, None));
        }
    }

    fn resolve(&mut self) {
        self.s.status = TicketStatus::Resolved;
        self.s.resolved_at = Some(self.at);
        self.record(&system_user(), HistoryEvent::Resolved);
        self.clear_deadlines();
    }

    /// Raises the priority a step and puts the ticket back in its queue, ahead of others.
    fn escalate(&mut self, by: &UserId, reason: &str) {
        self.s.priority = self.s.priority.raised();
        self.s.escalations += 1;
        if self.s.status.is_open() {
            if let Some(a) = self.s.assignee.take() {
                self.s.previous_assignee = Some(a);
            }
            self.s.status = TicketStatus::Escalated;
        }
        let priority = self.s.priority;
        self.record(by, HistoryEvent::Escalated { reason, priority });
    }

    /// The ticket is done: no deadline is pending any more.
    fn clear_deadlines(&mut self) {
        for (timer, due) in [
            (TicketTimer::FirstResponse, self.s.first_response_due.take()),
            (TicketTimer::Resolution, self.s.resolution_due.take()),
        ] {
            if due.is_some() {
                self.out.timers.push((timer, None));
            }
        }
    }

    fn rate(&mut self, by: &UserId, score: u8, comment: String) {
        self.record(by, HistoryEvent::Rated { score, comment: &comment });
        if score <= 2 {
            let review = review_ticket_id(self.id);
            let open = OpenTicket {
                customer: self.s.customer.clone(),
                tier: self.s.tier,
                subject: format!("Review of {}: rated {score} of 5", self.id),
                description: comment.clone(),
                order_id: self.s.order_id.clone(),
                group: None,
                class: Classified {
                    category: "quality_review".into(),
                    skill_group: review_skill_group(),
                    priority: Priority::High,
                },
                review_of: Some(self.id.clone()),
                settings: self.s.settings,
            };
            let request = Request::Ticket(TicketCommand::Open(open));
            self.s.outbox.push(Delivery::Request { key: crate::EntityKey::Ticket(review.clone()), request }, self.at);
            self.s.review_ticket = Some(review);
        }
        self.s.rating = Some(Rating { score, comment });
    }

    fn close(&mut self, by: &UserId) {
        if self.s.status.is_open() {
            self.s.resolved_at.get_or_insert(self.at);
        }
        self.s.status = TicketStatus::Closed;
        self.s.closed_at = Some(self.at);
        self.record(by, HistoryEvent::Closed);
        self.clear_deadlines();
    }

    /// A deadline came. False if there was nothing to do (met already, or fired early).
    fn fire(&mut self, timer: TicketTimer) -> bool {
        let (due, name) = match timer {
            TicketTimer::FirstResponse => (&mut self.s.first_response_due, "first_response"),
            TicketTimer::Resolution => (&mut self.s.resolution_due, "resolution"),
            TicketTimer::Outbox(_) => return false,
        };
        match *due {
            Some(d) if d <= self.at => *due = None,
            // Gone (met), or a leader whose clock runs behind fired early: it stays armed.
            _ => return false,
        }
        self.out.timers.push((timer, None));
        self.s.breaches += 1;
        self.record(&system_user(), HistoryEvent::SlaBreached { deadline: name });
        if self.s.status.is_open() {
            self.escalate(&system_user(), &format!("the {name} deadline passed"));
        }
        let hook = serde_json::json!({
            "event": "ticket.sla_breached",
            "ticket": self.id,
            "deadline": name,
            "at": self.at,
            "priority": self.s.priority,
            "skill_group": self.s.skill_group,
            "assignee": self.s.assignee,
        });
        self.webhook("ticket.sla_breached", format!("ticket/{}/breach/{name}", self.id), hook);
        true
    }

    fn webhook(&mut self, event: &str, idempotency_key: String, body: serde_json::Value) {
        let mut body = body;
        body["idempotency_key"] = serde_json::Value::String(idempotency_key.clone());
        let hook = Webhook { idempotency_key, event: event.into(), json: body.to_string() };
        self.s.outbox.push(Delivery::Webhook(hook), self.at);
    }

    /// A system entry in the linked group; idempotent by a note id derived from the change.
    fn note_group(&mut self, group: GroupId, event: &SystemEvent, what: &str) {
        let rev = self.s.rev;
        // A long ticket id does not fit beside the rest: a stable hash of it stands in.
        let note_id = ClientMsgId::parse(&format!("tk.{rev}.{what}.{}", self.id))
            .or_else(|_| {
                let hash = xxhash_rust::xxh3::xxh3_64(self.id.as_str().as_bytes());
                ClientMsgId::parse(&format!("tk.{rev}.{what}.h{hash:016x}"))
            })
            .expect("a note id of at most 64 characters is valid");
        let request = Request::Group(GroupCommand::Note { body: MessageBody::system(event), note_id: Some(note_id) });
        self.s.outbox.push(Delivery::Request { key: crate::EntityKey::Group(group), request }, self.at);
    }

    fn arm_outbox(&mut self) {
        let outbox = &self.s.outbox;
        self.out.timers.extend(Lane::ALL.map(|lane| (TicketTimer::Outbox(lane), outbox.next_due(lane))));
    }

    fn finish(mut self, before: TicketSummary) {
        self.finish_with(Some(before));
    }

    /// Whatever changed the summary bumps the revision and tells the queue, the linked
    /// group and the webhook; every change is pushed to the people on the ticket.
    fn finish_with(&mut self, before: Option<TicketSummary>) {
        let after = self.s.summary(self.id);
        if before.as_ref() != Some(&after) {
            self.s.rev += 1;
            let update = QueueCommand::Update { rev: self.s.rev, summary: after.clone() };
            let key = crate::EntityKey::SkillQueue(self.s.skill_group.clone());
            self.s.outbox.push(Delivery::Request { key, request: Request::Queue(update) }, self.at);
            let state_moved = before.as_ref().is_some_and(|b| b.state != after.state);
            if let (true, Some(group)) = (state_moved, self.s.group.clone()) {
                let changed =
                    SystemEvent::TicketChanged { ticket: self.id.clone(), state: after.state.as_str().into() };
                self.note_group(group, &changed, after.state.as_str());
            }
            let hook = serde_json::json!({
                "event": "ticket.changed",
                "ticket": after,
                "actions": self.actions,
                "at": self.at,
            });
            self.webhook("ticket.changed", format!("ticket/{}/rev/{}", self.id, self.s.rev), hook);
        }
        self.arm_outbox();
        let mut audience = vec![self.s.customer.clone()];
        audience.extend(self.s.assignee.iter().cloned());
        if let Some(b) = &before {
            audience.extend(b.assignee.iter().filter(|a| Some(*a) != self.s.assignee.as_ref()).cloned());
        }
        self.out.event = Some(TicketEvent {
            ticket: self.id.clone(),
            state: self.s.status,
            assignee: self.s.assignee.clone(),
            priority: self.s.priority,
            skill_group: self.s.skill_group.clone(),
            category: self.s.category.clone(),
            action: self.actions.last().copied().unwrap_or("changed"),
            notice: self.s.notice(self.at),
            text: self.text.take(),
            audience,
        });
        self.out.reply = Ok(TicketReply::Changed { state: self.s.status, changed: true });
    }
}

/// The ticket as `ticket.get` shows it.
#[derive(Debug, Serialize)]
pub struct TicketView<'a> {
    pub ticket: &'a TicketId,
    pub customer: &'a UserId,
    pub subject: &'a str,
    pub description: &'a str,
    pub order_id: &'a Option<String>,
    pub group: &'a Option<GroupId>,
    pub category: &'a str,
    pub skill_group: &'a SkillGroup,
    pub priority: Priority,
    pub state: TicketStatus,
    pub assignee: &'a Option<UserId>,
    pub opened_at: Timestamp,
    pub first_response_at: Option<Timestamp>,
    pub resolved_at: Option<Timestamp>,
    pub closed_at: Option<Timestamp>,
    pub first_response_due: Option<Timestamp>,
    pub resolution_due: Option<Timestamp>,
    pub breaches: u32,
    pub escalations: u32,
    pub rating: &'a Option<Rating>,
    pub review_of: &'a Option<TicketId>,
    pub review_ticket: &'a Option<TicketId>,
}

impl TicketState {
    pub fn view<'a>(&'a self, id: &'a TicketId) -> TicketView<'a> {
        TicketView {
            ticket: id,
            customer: &self.customer,
            subject: &self.subject,
            description: &self.description,
            order_id: &self.order_id,
            group: &self.group,
            category: &self.category,
            skill_group: &self.skill_group,
            priority: self.priority,
            state: self.status,
            assignee: &self.assignee,
            opened_at: self.opened_at,
            first_response_at: self.first_response_at,
            resolved_at: self.resolved_at,
            closed_at: self.closed_at,
            first_response_due: self.first_response_due,
            resolution_due: self.resolution_due,
            breaches: self.breaches,
            escalations: self.escalations,
            rating: &self.rating,
            review_of: &self.review_of,
            review_ticket: &self.review_ticket,
        }
    }
}

#[cfg(test)]
mod tests;
