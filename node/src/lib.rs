//! The Convoy node. Data flows gateway -> router -> shard -> entity -> store:
//!
//! - [`gateway`]: WebSocket protocol v1, authentication, per-connection limits, pushes.
//! - [`router`]: entity -> shard -> the node leading it.
//! - [`shard`]: one Raft group per shard; its state machine applies domain commands.
//! - [`entity`]: actors for the active entities of the shards this node leads.
//! - [`store`]: the storage engine and its single writer (group commit).
//!
//! Around them: [`admin`] (health, readiness, metrics), [`telemetry`], [`tls`], [`node`]
//! (start and shutdown), [`cli`]. The domain itself lives in `convoy-actors`; nothing here
//! knows what a ticket is.

pub mod admin;
pub mod cli;
pub mod cluster;
pub mod entity;
pub mod gateway;
pub mod node;
pub mod router;
pub mod shard;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod webhook;
