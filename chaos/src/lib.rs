//! Convoy's client-side test harness.
//!
//! - [`client`]: an async client for the client protocol (`/v1/ws`), the base of everything else.
//! - [`token`]: client tokens (HS256 JWTs).
//! - [`load`]: the `load` subcommand: many connections, groups and senders against running nodes,
//!   measuring throughput, ack and push latency, and server memory per connection.
//! - [`run`]: `up`, `down` and `run`: local clusters, scenarios, faults and the chaos workload.
//! - [`check`]: the history of a chaos run and the checker that proves nothing was lost.
//! - [`metrics`]: reading the nodes' `/metrics`.
//! - [`sys`]: process memory and file-descriptor helpers.
//!
//! The crate is written against the published protocol document alone, like any third-party
//! client, so that it checks the contract rather than the implementation.

pub mod check;
pub mod client;
pub mod load;
pub mod metrics;
pub mod run;
pub mod sys;
pub mod token;
