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

    pub fn next_due(&self) -> Option<Timestamp> {
        self.items.iter().map(|p| p.due).min()
    }

    /// What is due at `now`, oldest first, at most [`DELIVER_BATCH`].
    pub fn due(&self, now: Timestamp) -> Vec<Pending> {
        self.items.iter().filter(|p| p.due <= now).take(DELIVER_BATCH).cloned().collect()
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
        let due = o.due(Timestamp(10));
        assert_eq!(due.len(), 2);
        assert!(o.settle(
            &[(due[0].id, DeliveryResult::Delivered), (due[1].id, DeliveryResult::Failed)],
            Timestamp(20),
            2
        ));
        assert_eq!(o.len(), 1);
        assert_eq!(o.next_due(), Some(Timestamp(20 + 1000)));
        assert!(o.due(Timestamp(500)).is_empty());
        // Settling an id twice, or one that left, changes nothing.
        assert!(!o.settle(&[(due[0].id, DeliveryResult::Delivered)], Timestamp(30), 2));
        assert!(o.settle(&[(due[1].id, DeliveryResult::Failed)], Timestamp(2000), 2));
        assert!(o.is_empty());
        assert_eq!(o.dropped, 1);
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
        assert_eq!(o.due(Timestamp(1))[0].delivery, req);
    }
}
