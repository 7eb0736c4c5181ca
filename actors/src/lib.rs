//! Convoy's domain: the entities clients talk to, as deterministic state machines.
//!
//! Nothing here knows about sockets, Raft or storage engines. The runtime (`convoy-node`)
//! feeds commands in log order to `apply`, persists what comes out and carries out the
//! effects; it reaches back into stored data only through the small traits defined here
//! (`group::GroupLog`).

pub mod body;
pub mod entity;
pub mod error;
pub mod group;
pub mod ids;
pub mod user;

pub use entity::{Applied, Caller, EntityKey, EntityKind, StorageFault, Timestamp};
pub use error::{ErrorCode, Rejection};
