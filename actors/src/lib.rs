//! Convoy's domain: the entities clients talk to, as deterministic state machines, and
//! what those entities do when they are active on their shard's leader.
//!
//! Nothing here knows about sockets, Raft or storage engines. The runtime (`convoy-node`)
//! parses frames with [`ops::parse`], feeds commands in log order to [`domain::apply`],
//! persists what comes out, answers reads with [`domain::query`], and hosts one actor per
//! active entity that calls [`behavior::handle`] and [`behavior::on_applied`]. The domain
//! reaches the runtime only through [`behavior::Runtime`] and reads stored logs through
//! [`domain::LogIndex`] and [`domain::LogReader`].

pub mod behavior;
pub mod body;
pub mod domain;
pub mod entity;
pub mod error;
pub mod event;
pub mod group;
pub mod ids;
pub mod ops;
pub mod outbox;
pub mod principal;
pub mod queue;
pub mod ticket;
pub mod user;

pub use entity::{Applied, Caller, EntityKey, EntityKind, StorageFault, Timestamp};
pub use error::{ErrorCode, Rejection};
