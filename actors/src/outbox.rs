//! Deliveries an entity owes the world (requests to other entities, webhooks), kept in its
//! replicated state until they are done.
//!
//! A change that must reach another entity or a webhook receiver is pushed here by `apply`,
//! in the same command as the change itself, and the entity's `Outbox` timer is set. The
//! leader's timer fires it: the entity's actor delivers what is due and proposes
//! `settled`, which drops what was delivered and reschedules the rest with backoff. A
//! leader that dies midway leaves the items in the state, so the next leader delivers
//! them: delivery is at least once, and every receiver is idempotent (entity commands by
//! revision or state, webhooks by their idempotency key).
//!
//! Requests and webhooks go in separate [`Lane`]s, each with its own timer: a firing waits
//! for every delivery it started, so a webhook receiver that hangs until the timeout must
//! not hold up the entity's requests to other entities (assignments, group notes).

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::behavior::Request;
use crate::entity::{EntityKey, Timestamp};
use crate::error::ErrorCode;

/// Items an outbox holds at most; beyond it the oldest webhook is dropped (and counted).
pub const MAX_ITEMS: usize = 256;
/// Items delivered per firing at most.
pub const DELIVER_BATCH: usize = 32;
const FIRST_RETRY_MS: u64 = 500;
const MAX_RETRY_MS: u64 = 60_000;

/// A signed JSON POST to the configured webhook URL.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Webhook {
    /// Receivers deduplicate on it: the same event always carries the same key.
    pub idempotency_key: String,
    /// `ticket.changed`, `ticket.sla_breached`, `group.receipt_overdue`.
    pub event: String,
    /// The whole request body, rendered when the event happened.
    pub json: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Delivery {
    Webhook(Webhook),
    Request { key: EntityKey, request: Request },
}

/// Which of an entity's two outbox timers delivers an item.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Lane {
    Requests,
    Webhooks,
}

impl Lane {
    pub const ALL: [Lane; 2] = [Lane::Requests, Lane::Webhooks];
}

impl Delivery {
    pub fn lane(&self) -> Lane {
        match self {
            Delivery::Webhook(_) => Lane::Webhooks,
            Delivery::Request { .. } => Lane::Requests,
        }
    }

    /// Requests to one entity are delivered in the order they were pushed (a ticket's notes
    /// in its group follow its changes); each webhook stands alone.
    pub fn in_order_with(&self) -> Option<&EntityKey> {
        match self {
            Delivery::Webhook(_) => None,
            Delivery::Request { key, .. } => Some(key),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pending {
    pub id: u64,
    pub delivery: Delivery,
    pub attempts: u32,
    pub due: Timestamp,
}

/// How one delivery went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeliveryResult {
    Delivered,
    /// The receiver said no for good (a rejection other than unavailable): never retried.
    Refused(ErrorCode),
    /// Try again later.
    Failed,
}

impl DeliveryResult {
    /// Rejections that may go away by themselves are retried; the rest are answers.
    pub fn of_rejection(code: ErrorCode) -> DeliveryResult {
        match code {
            ErrorCode::Unavailable | ErrorCode::Internal | ErrorCode::RateLimited => DeliveryResult::Failed,
            code => DeliveryResult::Refused(code),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Outbox {
    next_id: u64,
    items: VecDeque<Pending>,
    /// Items dropped because the outbox was full or they failed `max_attempts` times.
    pub dropped: u64,
}

impl Outbox {
    pub fn push(&mut self, delivery: Delivery, at: Timestamp) {
        if self.items.len() >= MAX_ITEMS {
            // Requests to entities keep the system consistent; webhooks are notifications.
            let victim = self.items.iter().position(|p| matches!(p.delivery, Delivery::Webhook(_))).unwrap_or(0);
            self.items.remove(victim);
            self.dropped += 1;
        }
        self.next_id += 1;
        self.items.push_back(Pending { id: self.next_id, delivery, attempts: 0, due: at });
        debug_assert!(self.items.len() <= MAX_ITEMS);
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// The items of `lane` that may go next: each webhook, and the first item for each
    /// entity (what follows it waits for it).
    fn heads(&self, lane: Lane) -> impl Iterator<Item = &Pending> {
        let mut seen: Vec<&EntityKey> = Vec::new();
        self.items.iter().filter(move |p| {
            if p.delivery.lane() != lane {
                return false;
            }
            match p.delivery.in_order_with() {
                Some(key) if seen.contains(&key) => false,
                Some(key) => {
                    seen.push(key);
                    true
                }
                None => true,
            }
        })
    }

    /// When `lane`'s timer must fire next, if it has anything to deliver.
    pub fn next_due(&self, lane: Lane) -> Option<Timestamp> {
        self.heads(lane).map(|p| p.due).min()
    }

    /// What `lane` has due at `now`, oldest first, at most [`DELIVER_BATCH`]: every due
    /// webhook, and for each entity the items due before the first one that is not (an
    /// item retried later holds back those pushed after it).
    pub fn due(&self, now: Timestamp, lane: Lane) -> Vec<Pending> {
        let mut held: Vec<&EntityKey> = Vec::new();
        let mut due = Vec::new();
        for p in self.items.iter().filter(|p| p.delivery.lane() == lane) {
            match p.delivery.in_order_with() {
                Some(key) if held.contains(&key) => continue,
                Some(key) if p.due > now => held.push(key),
                _ if p.due > now => {}
                _ => due.push(p.clone()),
            }
            if due.len() == DELIVER_BATCH {
                break;
            }
        }
        due
    }

    pub fn get(&self, id: u64) -> Option<&Pending> {
        self.items.iter().find(|p| p.id == id)
    }

    /// Records how deliveries went: done and refused ones leave, failed ones are retried
    /// with exponential backoff until `max_attempts`. Ids already gone are ignored, so
    /// settling twice changes nothing.
    pub fn settle(&mut self, results: &[(u64, DeliveryResult)], at: Timestamp, max_attempts: u32) -> bool {
        let mut changed = false;
        for (id, result) in results {
            let Some(pos) = self.items.iter().position(|p| p.id == *id) else { continue };
            changed = true;
            match result {
                DeliveryResult::Delivered | DeliveryResult::Refused(_) => {
                    self.items.remove(pos);
                }
                DeliveryResult::Failed => {
                    let p = &mut self.items[pos];
                    p.attempts += 1;
                    if p.attempts >= max_attempts {
                        self.items.remove(pos);
                        self.dropped += 1;
                    } else {
                        let backoff = FIRST_RETRY_MS.saturating_mul(1 << p.attempts.min(20)).min(MAX_RETRY_MS);
                        p.due = at.plus_millis(backoff);
                    }
                }
            }
        }
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hook(n: u32) -> Delivery {
        Delivery::Webhook(Webhook { idempotency_key: format!("k{n}"), event: "e".into(), json: "{}".into() })
    }

    #[test]
    fn delivered_items_leave_failed_ones_back_off_then_drop() {
        let mut o = Outbox::default();
        o.push(hook(1), Timestamp(10));
        o.push(hook(2), Timestamp(10));
        let due = o.due(Timestamp(10), Lane::Webhooks);
        assert_eq!(due.len(), 2);
        assert!(o.due(Timestamp(10), Lane::Requests).is_empty());
        assert!(o.settle(
            &[(due[0].id, DeliveryResult::Delivered), (due[1].id, DeliveryResult::Failed)],
            Timestamp(20),
            2
        ));
        assert_eq!(o.len(), 1);
        assert_eq!(o.next_due(Lane::Webhooks), Some(Timestamp(20 + 1000)));
        assert_eq!(o.next_due(Lane::Requests), None);
        assert!(o.due(Timestamp(500), Lane::Webhooks).is_empty());
        // Settling an id twice, or one that left, changes nothing.
        assert!(!o.settle(&[(due[0].id, DeliveryResult::Delivered)], Timestamp(30), 2));
        assert!(o.settle(&[(due[1].id, DeliveryResult::Failed)], Timestamp(2000), 2));
        assert!(o.is_empty());
        assert_eq!(o.dropped, 1);
    }

    #[test]
    fn requests_to_one_entity_go_in_order_and_a_retried_one_holds_back_the_rest() {
        let to = |user: &str| EntityKey::User(crate::ids::UserId::parse(user).unwrap());
        let req = |user: &str| Delivery::Request {
            key: to(user),
            request: Request::Inbox {
                caller: crate::Caller { user: crate::ids::UserId::parse(user).unwrap(), admin: false },
            },
        };
        let mut o = Outbox::default();
        for (user, at) in [("a", 1), ("a", 1), ("b", 1), ("a", 1)] {
            o.push(req(user), Timestamp(at));
        }
        let ids = |due: Vec<Pending>| due.iter().map(|p| p.id).collect::<Vec<_>>();
        assert_eq!(ids(o.due(Timestamp(1), Lane::Requests)), [1, 2, 3, 4]);
        // The first for "a" fails and is retried at 1001: the later ones for "a" wait for it.
        assert!(o.settle(&[(1, DeliveryResult::Failed), (3, DeliveryResult::Delivered)], Timestamp(1), 5));
        assert_eq!(ids(o.due(Timestamp(2), Lane::Requests)), Vec::<u64>::new());
        assert_eq!(o.next_due(Lane::Requests), Some(Timestamp(1001)));
        assert_eq!(ids(o.due(Timestamp(1001), Lane::Requests)), [1, 2, 4]);
    }

    #[test]
    fn a_full_outbox_drops_webhooks_before_requests() {
        let mut o = Outbox::default();
        let req = Delivery::Request {
            key: EntityKey::User(crate::ids::UserId::parse("u").unwrap()),
            request: Request::Inbox {
                caller: crate::Caller { user: crate::ids::UserId::parse("u").unwrap(), admin: false },
            },
        };
        o.push(req.clone(), Timestamp(1));
        for n in 0..MAX_ITEMS as u32 {
            o.push(hook(n), Timestamp(1));
        }
        assert_eq!(o.len(), MAX_ITEMS);
        assert_eq!(o.dropped, 1);
        assert_eq!(o.due(Timestamp(1), Lane::Requests), [o.get(1).unwrap().clone()]);
        assert_eq!(o.get(1).unwrap().delivery, req);
        assert_eq!(o.next_due(Lane::Webhooks), Some(Timestamp(1)));
    }
}
