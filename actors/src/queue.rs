//! Skill queues: one per skill group. A queue knows every ticket of its group that is not
//! closed (each ticket tells it, by revision, through its outbox), which agents of the
//! group are connected, and how many tickets each works; it assigns waiting tickets by
//! priority, then age, to the least-loaded connected agent with room.
//!
//! Assignment is an offer: the queue records it and asks the ticket to accept it at the
//! revision the queue saw. A ticket that changed meanwhile refuses, and its newer summary
//! (already on its way) corrects the queue. Agents that stay away past the grace period
//! have their assigned tickets returned.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::behavior::Request;
use crate::entity::{EntityKey, Timestamp};
use crate::error::Rejection;
use crate::ids::{SkillGroup, TicketId, UserId};
use crate::outbox::{Delivery, DeliveryResult, Lane, Outbox};
use crate::ticket::{TicketCommand, TicketStatus, TicketSummary};

/// Tickets one queue tracks at most; beyond it new tickets are refused (they can still be claimed).
pub const MAX_TICKETS: usize = 100_000;
/// Agents one queue tracks at most.
pub const MAX_AGENTS: usize = 10_000;
/// Closed tickets kept for `ticket.list`.
const RECENTLY_CLOSED: usize = 200;
/// Durations kept for the medians.
const SAMPLES: usize = 1000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueuedTicket {
    pub rev: u64,
    pub summary: TicketSummary,
    /// Offered to this agent; the ticket has not answered yet.
    pub offered_to: Option<UserId>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Agent {
    pub capacity: u32,
    /// Connected as of the last report; counts as connected until then.
    pub seen_until: Timestamp,
    /// Disconnected (reported) at.
    pub away_since: Option<Timestamp>,
    pub grace_ms: u64,
}

impl Agent {
    pub fn present(&self, now: Timestamp) -> bool {
        self.away_since.is_none() && now < self.seen_until
    }

    /// When the grace period of an absence ends (from the last report if none came).
    fn gone_at(&self) -> Timestamp {
        let left = self.away_since.map_or(self.seen_until, |a| a.min(self.seen_until));
        left.plus_millis(self.grace_ms)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct DeskStats {
    pub opened: u64,
    pub resolved: u64,
    pub breaches: u64,
    pub first_response_ms: VecDeque<u64>,
    pub resolution_ms: VecDeque<u64>,
    pub csat_sum: u64,
    pub csat_count: u64,
}

fn sample(samples: &mut VecDeque<u64>, v: u64) {
    if samples.len() == SAMPLES {
        samples.pop_front();
    }
    samples.push_back(v);
}

fn median(samples: &VecDeque<u64>) -> Option<u64> {
    let mut v: Vec<u64> = samples.iter().copied().collect();
    v.sort_unstable();
    v.get(v.len() / 2).copied()
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct SkillQueueState {
    pub tickets: BTreeMap<TicketId, QueuedTicket>,
    /// Closed tickets, kept (with their revision) for `ticket.list` and for a rating that
    /// comes after the close.
    pub recently_closed: VecDeque<QueuedTicket>,
    pub agents: BTreeMap<UserId, Agent>,
    pub stats: DeskStats,
    pub outbox: Outbox,
    /// The grace period agents last reported with, for assignees the queue has not heard from.
    pub grace_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum QueueTimer {
    /// The earliest end of an agent's grace period.
    Grace,
    Outbox(Lane),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum QueueCommand {
    /// A ticket's summary at revision `rev`; older revisions change nothing.
    Update {
        rev: u64,
        summary: TicketSummary,
    },
    /// `agent` is connected; counts as connected for `lease_ms` unless reported again.
    AgentPresent {
        agent: UserId,
        capacity: u32,
        lease_ms: u64,
        grace_ms: u64,
    },
    AgentAway {
        agent: UserId,
    },
    /// Assignments the leader planned; each is checked again when applied.
    Offer {
        offers: Vec<(TicketId, UserId)>,
    },
    Fire(QueueTimer),
    Settle {
        results: Vec<(u64, DeliveryResult)>,
        max_attempts: u32,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum QueueReply {
    Updated { changed: bool },
}

#[derive(Debug, Clone, PartialEq)]
pub struct QueueApplied {
    pub reply: Result<QueueReply, Rejection>,
    pub state_changed: bool,
    pub timers: Vec<(QueueTimer, Option<Timestamp>)>,
}

/// The service desk's figures for one skill group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeskView {
    pub skill_group: SkillGroup,
    pub by_state: BTreeMap<String, u64>,
    pub waiting: u64,
    pub oldest_waiting_ms: u64,
    pub agents_connected: u64,
    pub opened_total: u64,
    pub resolved_total: u64,
    pub sla_breaches_total: u64,
    pub first_response_median_ms: Option<u64>,
    pub resolution_median_ms: Option<u64>,
    pub csat_average: Option<f64>,
    pub csat_count: u64,
}

impl SkillQueueState {
    /// How many tickets each agent holds (assigned, awaiting confirmation, or offered), in
    /// one pass over the tickets.
    fn loads(&self) -> BTreeMap<UserId, u32> {
        let mut loads: BTreeMap<UserId, u32> = BTreeMap::new();
        for t in self.tickets.values() {
            let held = t
                .summary
                .assignee
                .as_ref()
                .filter(|_| matches!(t.summary.state, TicketStatus::Assigned | TicketStatus::AwaitingConfirmation));
            for agent in held.into_iter().chain(t.offered_to.as_ref()) {
                *loads.entry(agent.clone()).or_default() += 1;
            }
        }
        loads
    }

    /// Waiting tickets not offered to anyone, most urgent first, then oldest.
    fn waiting(&self) -> Vec<&QueuedTicket> {
        let mut w: Vec<&QueuedTicket> =
            self.tickets.values().filter(|t| t.summary.state.is_waiting() && t.offered_to.is_none()).collect();
        w.sort_by_key(|t| (std::cmp::Reverse(t.summary.priority), t.summary.opened_at, t.summary.ticket.clone()));
        w
    }

    /// The assignments to offer now: each waiting ticket in order goes to the connected
    /// agent with the fewest tickets and room for one more (someone other than its last
    /// assignee when anyone else has room).
    pub fn plan_offers(&self, now: Timestamp) -> Vec<(TicketId, UserId)> {
        let held = self.loads();
        let mut loads: BTreeMap<&UserId, (u32, u32)> = self
            .agents
            .iter()
            .filter(|(_, a)| a.present(now))
            .map(|(id, a)| (id, (held.get(id).copied().unwrap_or(0), a.capacity)))
            .filter(|(_, (load, cap))| load < cap)
            .collect();
        let mut offers = Vec::new();
        for t in self.waiting() {
            let pick = |avoid: Option<&UserId>| {
                loads
                    .iter()
                    .filter(|(id, (load, cap))| load < cap && Some(**id) != avoid)
                    .min_by_key(|(id, (load, _))| (*load, **id))
                    .map(|(id, _)| (*id).clone())
            };
            let Some(agent) = pick(t.summary.previous_assignee.as_ref()).or_else(|| pick(None)) else { break };
            loads.get_mut(&agent).expect("picked from loads").0 += 1;
            offers.push((t.summary.ticket.clone(), agent));
        }
        offers
    }

    pub fn desk(&self, skill_group: &SkillGroup, now: Timestamp) -> DeskView {
        let mut by_state: BTreeMap<String, u64> =
            TicketStatus::ALL.iter().filter(|s| **s != TicketStatus::Closed).map(|s| (s.as_str().into(), 0)).collect();
        for t in self.tickets.values() {
            *by_state.entry(t.summary.state.as_str().into()).or_default() += 1;
        }
        let waiting: Vec<&QueuedTicket> = self.tickets.values().filter(|t| t.summary.state.is_waiting()).collect();
        let oldest = waiting.iter().map(|t| t.summary.opened_at).min();
        DeskView {
            skill_group: skill_group.clone(),
            by_state,
            waiting: waiting.len() as u64,
            oldest_waiting_ms: oldest.map_or(0, |o| o.millis_until(now)),
            agents_connected: self.agents.values().filter(|a| a.present(now)).count() as u64,
            opened_total: self.stats.opened,
            resolved_total: self.stats.resolved,
            sla_breaches_total: self.stats.breaches,
            first_response_median_ms: median(&self.stats.first_response_ms),
            resolution_median_ms: median(&self.stats.resolution_ms),
            csat_average: (self.stats.csat_count > 0)
                .then(|| self.stats.csat_sum as f64 / self.stats.csat_count as f64),
            csat_count: self.stats.csat_count,
        }
    }

    /// Every ticket this queue lists: open ones, then recently closed ones.
    pub fn summaries(&self) -> impl Iterator<Item = &TicketSummary> {
        self.tickets.values().chain(self.recently_closed.iter()).map(|t| &t.summary)
    }

    fn grace_due(&self) -> Option<Timestamp> {
        self.agents.values().map(Agent::gone_at).min()
    }

    pub fn check(state: Option<&SkillQueueState>, cmd: &QueueCommand) -> Result<(), Rejection> {
        let Some(s) = state else { return Ok(()) };
        match cmd {
            QueueCommand::Update { summary, .. }
                if !s.tickets.contains_key(&summary.ticket) && s.tickets.len() >= MAX_TICKETS =>
            {
                Err(Rejection::conflict(format!(
                    "the {} queue tracks {MAX_TICKETS} tickets, its limit",
                    summary.skill_group
                )))
            }
            QueueCommand::AgentPresent { agent, .. }
                if !s.agents.contains_key(agent) && s.agents.len() >= MAX_AGENTS =>
            {
                Err(Rejection::conflict(format!("the queue tracks {MAX_AGENTS} agents, its limit")))
            }
            _ => Ok(()),
        }
    }

    pub fn apply(state: &mut Option<SkillQueueState>, cmd: QueueCommand, at: Timestamp) -> QueueApplied {
        if let Err(r) = Self::check(state.as_ref(), &cmd) {
            return QueueApplied { reply: Err(r), state_changed: false, timers: Vec::new() };
        }
        let s = state.get_or_insert_with(SkillQueueState::default);
        let mut timers = Vec::new();
        let changed = match cmd {
            QueueCommand::Update { rev, summary } => {
                let assigned = summary.state == TicketStatus::Assigned;
                let changed = s.update(rev, summary, at);
                if changed && assigned {
                    timers.push((QueueTimer::Grace, s.grace_due()));
                }
                changed
            }
            QueueCommand::AgentPresent { agent, capacity, lease_ms, grace_ms } => {
                let seen_until = at.plus_millis(lease_ms);
                s.agents.insert(agent, Agent { capacity, seen_until, away_since: None, grace_ms });
                s.grace_ms = grace_ms;
                timers.push((QueueTimer::Grace, s.grace_due()));
                true
            }
            QueueCommand::AgentAway { agent } => match s.agents.get_mut(&agent) {
                Some(a) if a.away_since.is_none() => {
                    a.away_since = Some(at);
                    timers.push((QueueTimer::Grace, s.grace_due()));
                    true
                }
                _ => false,
            },
            QueueCommand::Offer { offers } => {
                let mut any = false;
                let mut loads = s.loads();
                for (ticket, agent) in offers {
                    let load = loads.entry(agent.clone()).or_default();
                    let room = s.agents.get(&agent).is_some_and(|a| a.present(at) && *load < a.capacity);
                    let Some(t) = s.tickets.get_mut(&ticket) else { continue };
                    if !room || !t.summary.state.is_waiting() || t.offered_to.is_some() {
                        continue;
                    }
                    *load += 1;
                    t.offered_to = Some(agent.clone());
                    let request = Request::Ticket(TicketCommand::Assign { agent, rev: t.rev });
                    s.outbox.push(Delivery::Request { key: EntityKey::Ticket(ticket), request }, at);
                    any = true;
                }
                any
            }
            QueueCommand::Fire(QueueTimer::Grace) => {
                let gone: Vec<UserId> =
                    s.agents.iter().filter(|(_, a)| a.gone_at() <= at).map(|(id, _)| id.clone()).collect();
                for agent in &gone {
                    s.agents.remove(agent);
                    for (id, t) in s.tickets.iter_mut() {
                        if t.offered_to.as_ref() == Some(agent) {
                            t.offered_to = None;
                        }
                        if t.summary.assignee.as_ref() == Some(agent) && t.summary.state == TicketStatus::Assigned {
                            let request = Request::Ticket(TicketCommand::Return { agent: agent.clone() });
                            s.outbox.push(Delivery::Request { key: EntityKey::Ticket(id.clone()), request }, at);
                        }
                    }
                }
                timers.push((QueueTimer::Grace, s.grace_due()));
                !gone.is_empty()
            }
            QueueCommand::Fire(QueueTimer::Outbox(_)) => false,
            QueueCommand::Settle { results, max_attempts } => {
                // A refused offer frees the ticket for the next plan.
                for (id, result) in &results {
                    let Some(p) = s.outbox.get(*id) else { continue };
                    let (DeliveryResult::Refused(_), Delivery::Request { key: EntityKey::Ticket(ticket), request }) =
                        (result, &p.delivery)
                    else {
                        continue;
                    };
                    if let Request::Ticket(TicketCommand::Assign { agent, .. }) = request
                        && let Some(t) = s.tickets.get_mut(ticket)
                        && t.offered_to.as_ref() == Some(agent)
                    {
                        t.offered_to = None;
                    }
                }
                s.outbox.settle(&results, at, max_attempts)
            }
        };
        timers.extend(Lane::ALL.map(|lane| (QueueTimer::Outbox(lane), s.outbox.next_due(lane))));
        QueueApplied { reply: Ok(QueueReply::Updated { changed }), state_changed: changed, timers }
    }

    fn update(&mut self, rev: u64, summary: TicketSummary, at: Timestamp) -> bool {
        let closed = self.recently_closed.iter().position(|c| c.summary.ticket == summary.ticket);
        let old = match closed {
            Some(i) => self.recently_closed.get(i),
            None => self.tickets.get(&summary.ticket),
        };
        if old.is_some_and(|o| o.rev >= rev) {
            return false;
        }
        let before = old.map(|o| o.summary.clone());
        let st = &mut self.stats;
        if before.is_none() {
            st.opened += 1;
        }
        let was = |f: fn(&TicketSummary) -> bool| before.as_ref().is_some_and(f);
        if let (Some(ms), false) = (summary.first_response_ms, was(|b| b.first_response_ms.is_some())) {
            sample(&mut st.first_response_ms, ms);
        }
        if let (Some(ms), false) = (summary.resolution_ms, was(|b| b.resolution_ms.is_some())) {
            sample(&mut st.resolution_ms, ms);
            st.resolved += 1;
        }
        if let (Some(score), false) = (summary.rating, was(|b| b.rating.is_some())) {
            st.csat_sum += u64::from(score);
            st.csat_count += 1;
        }
        st.breaches += u64::from(summary.breaches.saturating_sub(before.as_ref().map_or(0, |b| b.breaches)));
        if let Some(i) = closed {
            // Closed already: only a rating changes a closed ticket, and it is counted above.
            self.recently_closed[i] = QueuedTicket { rev, summary, offered_to: None };
        } else if summary.state == TicketStatus::Closed {
            self.tickets.remove(&summary.ticket);
            if self.recently_closed.len() == RECENTLY_CLOSED {
                self.recently_closed.pop_front();
            }
            self.recently_closed.push_back(QueuedTicket { rev, summary, offered_to: None });
        } else {
            // An assignee the queue has not heard from (gone already, or not yet reported)
            // starts a grace period now: a report ends it, silence returns the ticket.
            if let Some(agent) = summary.assignee.as_ref().filter(|_| summary.state == TicketStatus::Assigned)
                && !self.agents.contains_key(agent)
                && self.agents.len() < MAX_AGENTS
            {
                let absent = Agent { capacity: 0, seen_until: at, away_since: Some(at), grace_ms: self.grace_ms };
                self.agents.insert(agent.clone(), absent);
            }
            self.tickets.insert(summary.ticket.clone(), QueuedTicket { rev, summary, offered_to: None });
        }
        debug_assert!(self.recently_closed.len() <= RECENTLY_CLOSED);
        true
    }
}

/// Most urgent first, then oldest: the order agents see and the queue assigns in.
pub fn sort_summaries(list: &mut [TicketSummary]) {
    list.sort_by(|a, b| {
        (std::cmp::Reverse(a.priority), a.opened_at, &a.ticket).cmp(&(
            std::cmp::Reverse(b.priority),
            b.opened_at,
            &b.ticket,
        ))
    });
}
