//! Typed configuration for a `convoy` node.
//!
//! A configuration is assembled in layers, later layers winning:
//!
//! 1. the defaults embedded in the [`schema`] types (`Config::default()`),
//! 2. an optional TOML file,
//! 3. environment variables `CONVOY_<SECTION>_<KEY>` (for example `CONVOY_AUTH_SECRET` sets `auth.secret`),
//!
//! and is then validated. Every error names the key it is about and says how to fix it: unknown keys,
//! values of the wrong type, and broken rules such as `raft.election_timeout_min` not exceeding
//! `raft.heartbeat_interval`.
//!
//! ```
//! let cfg = convoy_config::Config::from_toml_str("[node]\nid = \"n2\"\n").unwrap();
//! assert_eq!(cfg.node.id, "n2");
//! assert_eq!(cfg.limits.max_frame_bytes, 65_536);
//! ```
//!
//! `examples/single.toml` in this crate documents every key with its default.

mod error;
mod load;
pub mod schema;
mod validate;

pub use error::ConfigError;
pub use load::ENV_PREFIX;
pub use schema::{
    AdminConfig, AuthConfig, ChaosConfig, ClientConfig, ClusterConfig, Config, LimitsConfig, LogFormat, NodeConfig,
    OtlpProtocol, RaftConfig, StorageConfig, TelemetryConfig, TicketsConfig, TimeoutsConfig, WebhooksConfig,
};
