//! The configuration schema: one struct per TOML section, each with its defaults.
//!
//! Every struct accepts partial input (missing keys take their default) and rejects keys it does not
//! know, so a typo in a file is reported instead of silently ignored. Durations are humantime strings
//! ("250ms", "10s", "5m"); sizes are plain byte counts unless the key name says otherwise.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

const fn localhost(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port)
}

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

/// Complete configuration of one node.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub node: NodeConfig,
    pub client: ClientConfig,
    pub admin: AdminConfig,
    pub auth: AuthConfig,
    pub cluster: ClusterConfig,
    pub raft: RaftConfig,
    pub storage: StorageConfig,
    pub limits: LimitsConfig,
    pub timeouts: TimeoutsConfig,
    pub telemetry: TelemetryConfig,
    pub chaos: ChaosConfig,
    pub webhooks: WebhooksConfig,
    pub tickets: TicketsConfig,
}

/// `[node]`: identity and local state.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    /// Node id, unique in the cluster: 1 to 32 characters of `a-z`, `0-9` and `-`, starting with a letter.
    pub id: String,
    /// Directory holding this node's persistent state.
    pub data_dir: PathBuf,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self { id: "n1".into(), data_dir: PathBuf::from("./convoy-data") }
    }
}

/// `[client]`: the WebSocket endpoint clients connect to.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClientConfig {
    pub listen: SocketAddr,
    /// PEM certificate chain; set together with `tls_key` to serve TLS.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key matching `tls_cert`.
    pub tls_key: Option<PathBuf>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self { listen: localhost(7600), tls_cert: None, tls_key: None }
    }
}

/// `[admin]`: the HTTP endpoint for health, metrics and operations.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    pub listen: SocketAddr,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self { listen: localhost(7601) }
    }
}

/// `[auth]`: client authentication.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// HS256 secret for client tokens, at least 32 bytes. `None` leaves the choice to the binary.
    pub secret: Option<String>,
    /// How long a new connection may take to authenticate.
    #[serde(with = "humantime_serde")]
    pub hello_timeout: Duration,
    /// Longest token lifetime accepted.
    #[serde(with = "humantime_serde")]
    pub max_token_ttl: Duration,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            secret: None,
            hello_timeout: Duration::from_secs(10),
            max_token_ttl: Duration::from_secs(30 * 24 * 60 * 60),
        }
    }
}

/// `[cluster]`: membership and node-to-node transport.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    pub listen: SocketAddr,
    /// `host:port` other nodes dial to reach this one; defaults to `listen`.
    pub advertise: Option<String>,
    /// Shared secret all nodes of a cluster must agree on, 8 to 128 characters.
    pub cookie: String,
    /// `host:port` of other nodes to join through; empty for a single node.
    pub seeds: Vec<String>,
    pub shards: u16,
    pub replication_factor: u8,
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// Silence after which a peer is considered down; more than twice `heartbeat_interval`.
    #[serde(with = "humantime_serde")]
    pub failure_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub reconnect_backoff_max: Duration,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// CA bundle used to verify peers; required when `tls_cert` is set.
    pub tls_ca: Option<PathBuf>,
}

impl ClusterConfig {
    /// The address peers should dial: `advertise` when set, otherwise `listen`.
    pub fn advertise_addr(&self) -> String {
        self.advertise.clone().unwrap_or_else(|| self.listen.to_string())
    }
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            listen: localhost(7700),
            advertise: None,
            cookie: "convoy-dev-cookie".into(),
            seeds: Vec::new(),
            shards: 8,
            replication_factor: 3,
            heartbeat_interval: Duration::from_millis(200),
            failure_timeout: Duration::from_secs(1),
            reconnect_backoff_max: Duration::from_secs(2),
            tls_cert: None,
            tls_key: None,
            tls_ca: None,
        }
    }
}

/// `[raft]`: consensus timing and log compaction, per shard group.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RaftConfig {
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub election_timeout_min: Duration,
    #[serde(with = "humantime_serde")]
    pub election_timeout_max: Duration,
    pub snapshot_every_entries: u64,
    /// Entries a leader keeps behind its latest snapshot, so that a briefly lagging follower
    /// catches up from the log instead of receiving a whole snapshot.
    pub keep_entries_after_snapshot: u64,
    pub max_payload_entries: u64,
}

impl Default for RaftConfig {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_millis(150),
            election_timeout_min: Duration::from_millis(300),
            election_timeout_max: Duration::from_millis(550),
            snapshot_every_entries: 20_000,
            keep_entries_after_snapshot: 1000,
            max_payload_entries: 512,
        }
    }
}

/// `[storage]`: the embedded store.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    pub cache_capacity_bytes: u64,
    pub max_batch_bytes: u64,
    pub max_staged_bytes: u64,
    pub queue_depth: usize,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            cache_capacity_bytes: 128 * MIB,
            max_batch_bytes: 4 * MIB,
            max_staged_bytes: 32 * KIB,
            queue_depth: 4096,
        }
    }
}

/// `[limits]`: protocol and resource limits.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    pub max_frame_bytes: usize,
    pub max_text_chars: usize,
    pub max_members_per_group: u32,
    pub max_groups_per_user: u32,
    pub requests_per_second: u32,
    pub request_burst: u32,
    /// `rate_limited` replies in a row before the connection is closed with code 4429.
    pub rate_limit_strikes: u32,
    /// Requests in flight per connection.
    pub max_pending_requests: usize,
    /// Frames queued towards one connection.
    pub outbound_queue: usize,
    pub max_connections: usize,
    pub max_active_entities: usize,
    pub entity_mailbox: usize,
    pub max_receipt_watches_per_group: u32,
    /// Largest `limit` a client may ask for in a sync request (the protocol maximum is 500).
    pub sync_limit_max: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_frame_bytes: 65_536,
            max_text_chars: 4000,
            max_members_per_group: 200,
            max_groups_per_user: 1000,
            requests_per_second: 100,
            request_burst: 200,
            rate_limit_strikes: 20,
            max_pending_requests: 128,
            outbound_queue: 1024,
            max_connections: 19_000,
            max_active_entities: 200_000,
            entity_mailbox: 4096,
            max_receipt_watches_per_group: 1000,
            sync_limit_max: 500,
        }
    }
}

/// `[timeouts]`: timers of the client-facing runtime.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct TimeoutsConfig {
    #[serde(with = "humantime_serde")]
    pub receipt_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub entity_idle: Duration,
    #[serde(with = "humantime_serde")]
    pub ping_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub pong_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// How long a request waits for a shard leader before failing with `unavailable`.
    #[serde(with = "humantime_serde")]
    pub leader_wait: Duration,
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
}

impl Default for TimeoutsConfig {
    fn default() -> Self {
        Self {
            receipt_timeout: Duration::from_secs(5 * 60),
            entity_idle: Duration::from_secs(60),
            ping_interval: Duration::from_secs(20),
            pong_timeout: Duration::from_secs(60),
            request_timeout: Duration::from_secs(5),
            leader_wait: Duration::from_secs(2),
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// OTLP transport used to export traces.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OtlpProtocol {
    #[default]
    Grpc,
    /// Also spelled `http/protobuf`, as `OTEL_EXPORTER_OTLP_PROTOCOL` does.
    #[serde(alias = "http/protobuf")]
    HttpProtobuf,
}

/// `[telemetry]`: logs and traces.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetryConfig {
    pub log_format: LogFormat,
    /// An `EnvFilter` directive such as `info` or `convoy=debug,warn`.
    pub log_level: String,
    /// OTLP collector URL; traces are exported only when set.
    pub otlp_endpoint: Option<String>,
    pub otlp_protocol: OtlpProtocol,
    pub service_name: String,
    /// Fraction of traces sampled, 0.0 to 1.0.
    pub sampling_ratio: f64,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            log_format: LogFormat::Text,
            log_level: "info,openraft=error,ractor=warn,ractor_cluster=warn".into(),
            otlp_endpoint: None,
            otlp_protocol: OtlpProtocol::Grpc,
            service_name: "convoy".into(),
            sampling_ratio: 1.0,
        }
    }
}

/// `[chaos]`: fault injection, for test clusters only.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ChaosConfig {
    pub enabled: bool,
}

/// `[webhooks]`: outgoing event notifications.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebhooksConfig {
    /// `http://` or `https://` URL events are posted to; webhooks are off when unset.
    pub url: Option<String>,
    /// Signing secret, at least 16 bytes; required when `url` is set.
    pub secret: Option<String>,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    pub max_attempts: u32,
    /// Delivery attempts in flight at once on one node; more fail at once and are retried
    /// with backoff (undelivered events wait in their entity's replicated outbox).
    pub queue: usize,
}

impl Default for WebhooksConfig {
    fn default() -> Self {
        Self { url: None, secret: None, timeout: Duration::from_secs(5), max_attempts: 8, queue: 10_000 }
    }
}

/// Ticket priorities, lowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TicketPriority {
    Low,
    Normal,
    High,
    Urgent,
}

/// One SLA: how long until the first agent response and until resolution.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SlaTimes {
    #[serde(with = "humantime_serde")]
    pub first_response: Duration,
    #[serde(with = "humantime_serde")]
    pub resolution: Duration,
}

/// `[tickets.sla]`: deadlines per priority.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct SlaConfig {
    pub urgent: SlaTimes,
    pub high: SlaTimes,
    pub normal: SlaTimes,
    pub low: SlaTimes,
}

impl Default for SlaConfig {
    fn default() -> Self {
        let sla = |first_mins: u64, resolution_hours: u64| SlaTimes {
            first_response: Duration::from_secs(first_mins * 60),
            resolution: Duration::from_secs(resolution_hours * 3600),
        };
        Self { urgent: sla(10, 1), high: sla(30, 2), normal: sla(120, 24), low: sla(480, 72) }
    }
}

/// `[[tickets.categories]]`: a classification rule. A ticket's subject and description
/// match it when they contain any keyword, ignoring case: keywords in Latin letters match
/// whole words only (`late` is not found in "latest"), Chinese ones anywhere.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CategoryConfig {
    /// `a-z`, `0-9` and `_`, such as `fee_dispute`.
    pub name: String,
    /// The agents' skill group that works these tickets.
    pub skill_group: String,
    pub priority: TicketPriority,
    #[serde(default)]
    pub keywords: Vec<String>,
}

/// `[tickets]`: support cases, skill queues and their clocks.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct TicketsConfig {
    /// Open tickets one agent works at once before the queue stops assigning to them.
    pub agent_capacity: u32,
    /// An agent disconnected this long has their open tickets returned to the queue.
    #[serde(with = "humantime_serde")]
    pub agent_grace: Duration,
    /// How often a node tells the skill queues which agents are connected to it; an
    /// agent not reported for three of these counts as disconnected.
    #[serde(with = "humantime_serde")]
    pub presence_refresh: Duration,
    /// Tickets one customer may have opened.
    pub max_tickets_per_user: u32,
    /// History entries (replies and changes) one ticket keeps; replies beyond it are refused.
    pub max_history: u32,
    /// Words that raise a ticket's priority one step (matched like category keywords).
    pub urgency_words: Vec<String>,
    pub sla: SlaConfig,
    /// Matched in order; text that matches several opens one ticket per category.
    pub categories: Vec<CategoryConfig>,
    /// Where text that matches no category goes.
    pub fallback: CategoryConfig,
}

fn category(name: &str, skill_group: &str, priority: TicketPriority, keywords: &[&str]) -> CategoryConfig {
    CategoryConfig {
        name: name.into(),
        skill_group: skill_group.into(),
        priority,
        keywords: keywords.iter().map(|k| k.to_string()).collect(),
    }
}

impl Default for TicketsConfig {
    fn default() -> Self {
        use TicketPriority::*;
        Self {
            agent_capacity: 5,
            agent_grace: Duration::from_secs(120),
            presence_refresh: Duration::from_secs(5),
            max_tickets_per_user: 1000,
            max_history: 500,
            urgency_words: [
                "紧急",
                "加急",
                "急件",
                "着急",
                "马上",
                "立刻",
                "尽快",
                "urgent",
                "asap",
                "immediately",
                "emergency",
            ]
            .iter()
            .map(|w| w.to_string())
            .collect(),
            sla: SlaConfig::default(),
            categories: vec![
                category(
                    "delivery_delay",
                    "delivery",
                    High,
                    &[
                        "延误",
                        "迟到",
                        "未按约定时间",
                        "超时未到",
                        "还没到",
                        "没送到",
                        "delay",
                        "delayed",
                        "delays",
                        "late",
                        "not arrived",
                        "hasn't arrived",
                    ],
                ),
                category(
                    "damaged_goods",
                    "damage",
                    High,
                    &["破损", "损坏", "摔坏", "压坏", "damaged", "damage", "broken", "crushed"],
                ),
                category("lost_goods", "damage", Urgent, &["丢失", "丢件", "找不到货", "少件", "lost", "missing"]),
                category(
                    "fee_dispute",
                    "fee",
                    Normal,
                    &[
                        "运费",
                        "超时费",
                        "多收费",
                        "乱收费",
                        "收费",
                        "overcharge",
                        "overcharged",
                        "fee",
                        "fees",
                        "charged twice",
                    ],
                ),
                category(
                    "address_change",
                    "delivery",
                    Normal,
                    &["改地址", "修改地址", "地址变更", "换地址", "change address", "address change", "wrong address"],
                ),
                category(
                    "service_attitude",
                    "quality",
                    Normal,
                    &["态度", "骂人", "不耐烦", "服务差", "rude", "attitude", "impolite"],
                ),
                category("refund", "fee", Normal, &["退款", "退钱", "退费", "refund", "money back"]),
                category(
                    "driver_no_show",
                    "delivery",
                    High,
                    &["司机没来", "没有上门", "未上门", "放鸽子", "爽约", "no-show", "no show", "didn't show up"],
                ),
                category(
                    "receipt_proof",
                    "delivery",
                    Low,
                    &["回单", "签收单", "签收照片", "签收证明", "proof of delivery", "receipt photo", "pod"],
                ),
            ],
            fallback: category("other", "general", Normal, &[]),
        }
    }
}
