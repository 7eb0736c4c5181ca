//! Validation: rules that types alone do not express. The first broken rule is reported, naming the key,
//! its value, and what to change.

use std::fmt::Display;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::error::ConfigError;
use crate::schema::{
    AuthConfig, ClientConfig, ClusterConfig, Config, LimitsConfig, NodeConfig, RaftConfig, StorageConfig,
    TelemetryConfig, TicketsConfig, TimeoutsConfig, WebhooksConfig,
};

const MIB: usize = 1024 * 1024;
const MIN_AUTH_SECRET_BYTES: usize = 32;
const MIN_WEBHOOK_SECRET_BYTES: usize = 16;
const MAX_CATEGORIES: usize = 32;
const MAX_KEYWORDS: usize = 64;
const MAX_KEYWORD_CHARS: usize = 64;
/// Upper bound of `limits.sync_limit_max`, fixed by the client protocol.
const PROTOCOL_SYNC_LIMIT: u32 = 500;

type Check = Result<(), ConfigError>;

impl Config {
    /// Checks every rule and returns the first problem found.
    pub fn validate(&self) -> Result<(), ConfigError> {
        node(&self.node)?;
        client(&self.client)?;
        listeners(self)?;
        auth(&self.auth)?;
        cluster(&self.cluster)?;
        raft(&self.raft)?;
        storage(&self.storage)?;
        limits(&self.limits)?;
        timeouts(&self.timeouts)?;
        telemetry(&self.telemetry)?;
        webhooks(&self.webhooks)?;
        tickets(&self.tickets)?;
        Ok(())
    }
}

fn node(n: &NodeConfig) -> Check {
    let id_ok = (1..=32).contains(&n.id.len())
        && n.id.starts_with(|c: char| c.is_ascii_lowercase())
        && n.id.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    ensure(id_ok, "node.id", quoted(&n.id), || {
        "must be 1 to 32 characters of a-z, 0-9 and '-', starting with a letter (for example \"n1\")".into()
    })?;
    ensure(!n.data_dir.as_os_str().is_empty(), "node.data_dir", quoted(""), || {
        "must name a directory (for example \"./convoy-data\")".into()
    })
}

fn client(c: &ClientConfig) -> Check {
    cert_and_key("client", &c.tls_cert, &c.tls_key)
}

/// The three listeners must not collide (port 0, "pick any free port", never collides).
fn listeners(c: &Config) -> Check {
    let named =
        [("client.listen", c.client.listen), ("admin.listen", c.admin.listen), ("cluster.listen", c.cluster.listen)];
    for (i, (key, addr)) in named.iter().enumerate() {
        for (other, other_addr) in &named[..i] {
            ensure(addr.port() == 0 || addr != other_addr, key, quoted(addr), || {
                format!("is already used by {other}; give each listener its own port")
            })?;
        }
    }
    Ok(())
}

fn auth(a: &AuthConfig) -> Check {
    min_secret("auth.secret", a.secret.as_deref(), MIN_AUTH_SECRET_BYTES)?;
    positive_duration("auth.hello_timeout", a.hello_timeout)?;
    positive_duration("auth.max_token_ttl", a.max_token_ttl)
}

fn cluster(c: &ClusterConfig) -> Check {
    if let Some(advertise) = &c.advertise {
        ensure(is_host_port(advertise), "cluster.advertise", quoted(advertise), || {
            "must be host:port with a non-zero port (for example \"10.0.0.5:7700\"), or be left out to use \
             cluster.listen"
                .into()
        })?;
    }
    let cookie_len = c.cookie.chars().count();
    ensure((8..=128).contains(&cookie_len), "cluster.cookie", redacted(&c.cookie), || {
        "must be 8 to 128 characters, the same on every node of the cluster".into()
    })?;
    for (i, seed) in c.seeds.iter().enumerate() {
        ensure(is_host_port(seed), &format!("cluster.seeds[{i}]"), quoted(seed), || {
            "must be host:port of another node with a non-zero port (for example \"127.0.0.1:7710\")".into()
        })?;
    }
    ensure((1..=256).contains(&c.shards), "cluster.shards", c.shards, || "must be between 1 and 256".into())?;
    ensure((1..=7).contains(&c.replication_factor), "cluster.replication_factor", c.replication_factor, || {
        "must be between 1 and 7".into()
    })?;
    positive_duration("cluster.heartbeat_interval", c.heartbeat_interval)?;
    ensure(
        c.failure_timeout > c.heartbeat_interval * 2,
        "cluster.failure_timeout",
        duration(c.failure_timeout),
        || {
            format!(
                "must be more than twice cluster.heartbeat_interval ({}), or a single late heartbeat marks a peer down",
                duration(c.heartbeat_interval)
            )
        },
    )?;
    positive_duration("cluster.reconnect_backoff_max", c.reconnect_backoff_max)?;
    cert_and_key("cluster", &c.tls_cert, &c.tls_key)?;
    ensure(c.tls_cert.is_none() || c.tls_ca.is_some(), "cluster.tls_ca", "(not set)", || {
        "must be set when cluster.tls_cert is set: peers are verified against this CA bundle".into()
    })?;
    ensure(c.tls_ca.is_none() || c.tls_cert.is_some(), "cluster.tls_cert", "(not set)", || {
        "must be set when cluster.tls_ca is set: node-to-node TLS needs the node's certificate and key too".into()
    })
}

fn raft(r: &RaftConfig) -> Check {
    let min_heartbeat = Duration::from_millis(10);
    ensure(r.heartbeat_interval >= min_heartbeat, "raft.heartbeat_interval", duration(r.heartbeat_interval), || {
        format!("must be at least {}", duration(min_heartbeat))
    })?;
    ensure(
        r.election_timeout_min > r.heartbeat_interval,
        "raft.election_timeout_min",
        duration(r.election_timeout_min),
        || format!("must be greater than raft.heartbeat_interval ({})", duration(r.heartbeat_interval)),
    )?;
    ensure(
        r.election_timeout_max > r.election_timeout_min,
        "raft.election_timeout_max",
        duration(r.election_timeout_max),
        || format!("must be greater than raft.election_timeout_min ({})", duration(r.election_timeout_min)),
    )?;
    positive("raft.snapshot_every_entries", r.snapshot_every_entries)?;
    positive("raft.max_payload_entries", r.max_payload_entries)
}

fn storage(s: &StorageConfig) -> Check {
    positive("storage.cache_capacity_bytes", s.cache_capacity_bytes)?;
    positive("storage.max_batch_bytes", s.max_batch_bytes)?;
    positive("storage.max_staged_bytes", s.max_staged_bytes)?;
    positive("storage.queue_depth", s.queue_depth)
}

fn limits(l: &LimitsConfig) -> Check {
    ensure((1024..=16 * MIB).contains(&l.max_frame_bytes), "limits.max_frame_bytes", l.max_frame_bytes, || {
        format!("must be between 1024 and {} (16 MiB)", 16 * MIB)
    })?;
    positive("limits.max_text_chars", l.max_text_chars)?;
    positive("limits.max_members_per_group", l.max_members_per_group)?;
    positive("limits.max_groups_per_user", l.max_groups_per_user)?;
    positive("limits.requests_per_second", l.requests_per_second)?;
    positive("limits.request_burst", l.request_burst)?;
    positive("limits.rate_limit_strikes", l.rate_limit_strikes)?;
    positive("limits.max_pending_requests", l.max_pending_requests)?;
    positive("limits.outbound_queue", l.outbound_queue)?;
    positive("limits.max_connections", l.max_connections)?;
    positive("limits.max_active_entities", l.max_active_entities)?;
    positive("limits.entity_mailbox", l.entity_mailbox)?;
    positive("limits.max_receipt_watches_per_group", l.max_receipt_watches_per_group)?;
    ensure((1..=PROTOCOL_SYNC_LIMIT).contains(&l.sync_limit_max), "limits.sync_limit_max", l.sync_limit_max, || {
        format!("must be between 1 and {PROTOCOL_SYNC_LIMIT} (the protocol maximum)")
    })
}

fn timeouts(t: &TimeoutsConfig) -> Check {
    positive_duration("timeouts.receipt_timeout", t.receipt_timeout)?;
    positive_duration("timeouts.entity_idle", t.entity_idle)?;
    positive_duration("timeouts.ping_interval", t.ping_interval)?;
    ensure(t.pong_timeout > t.ping_interval, "timeouts.pong_timeout", duration(t.pong_timeout), || {
        format!(
            "must be greater than timeouts.ping_interval ({}), or healthy connections are closed between pings",
            duration(t.ping_interval)
        )
    })?;
    positive_duration("timeouts.request_timeout", t.request_timeout)?;
    positive_duration("timeouts.leader_wait", t.leader_wait)?;
    positive_duration("timeouts.shutdown_grace", t.shutdown_grace)
}

fn telemetry(t: &TelemetryConfig) -> Check {
    ensure(!t.log_level.trim().is_empty(), "telemetry.log_level", quoted(&t.log_level), || {
        "must be a log filter such as \"info\" or \"convoy=debug,warn\"".into()
    })?;
    if let Some(endpoint) = &t.otlp_endpoint {
        ensure(is_http_url(endpoint), "telemetry.otlp_endpoint", quoted(endpoint), || {
            "must be an http:// or https:// URL (for example \"http://127.0.0.1:4317\"), or be left out".into()
        })?;
    }
    ensure(!t.service_name.trim().is_empty(), "telemetry.service_name", quoted(&t.service_name), || {
        "must not be empty".into()
    })?;
    ensure((0.0..=1.0).contains(&t.sampling_ratio), "telemetry.sampling_ratio", t.sampling_ratio, || {
        "must be between 0.0 (sample nothing) and 1.0 (sample everything)".into()
    })
}

fn webhooks(w: &WebhooksConfig) -> Check {
    if let Some(url) = &w.url {
        ensure(is_http_url(url), "webhooks.url", quoted(url), || {
            "must be an http:// or https:// URL, or be left out to disable webhooks".into()
        })?;
        ensure(w.secret.is_some(), "webhooks.secret", "(not set)", || {
            format!("must be set when webhooks.url is set, at least {MIN_WEBHOOK_SECRET_BYTES} bytes")
        })?;
    }
    min_secret("webhooks.secret", w.secret.as_deref(), MIN_WEBHOOK_SECRET_BYTES)?;
    positive_duration("webhooks.timeout", w.timeout)?;
    positive("webhooks.max_attempts", w.max_attempts)?;
    positive("webhooks.queue", w.queue)
}

fn tickets(t: &TicketsConfig) -> Check {
    positive("tickets.agent_capacity", t.agent_capacity)?;
    positive_duration("tickets.agent_grace", t.agent_grace)?;
    positive_duration("tickets.presence_refresh", t.presence_refresh)?;
    positive("tickets.max_tickets_per_user", t.max_tickets_per_user)?;
    positive("tickets.max_history", t.max_history)?;
    ensure(t.urgency_words.len() <= MAX_KEYWORDS, "tickets.urgency_words", t.urgency_words.len(), || {
        format!("lists too many words: at most {MAX_KEYWORDS}")
    })?;
    for w in &t.urgency_words {
        keyword("tickets.urgency_words", w)?;
    }
    for (name, sla) in [("urgent", t.sla.urgent), ("high", t.sla.high), ("normal", t.sla.normal), ("low", t.sla.low)] {
        positive_duration(&format!("tickets.sla.{name}.first_response"), sla.first_response)?;
        ensure(
            sla.resolution >= sla.first_response,
            &format!("tickets.sla.{name}.resolution"),
            duration(sla.resolution),
            || "must not be shorter than first_response".into(),
        )?;
    }
    ensure((1..=MAX_CATEGORIES).contains(&t.categories.len()), "tickets.categories", t.categories.len(), || {
        format!("must list 1 to {MAX_CATEGORIES} categories")
    })?;
    let mut names = std::collections::BTreeSet::new();
    for (i, c) in t.categories.iter().chain(std::iter::once(&t.fallback)).enumerate() {
        let at = if i < t.categories.len() { format!("tickets.categories[{i}]") } else { "tickets.fallback".into() };
        let name_ok = (1..=32).contains(&c.name.len())
            && c.name.chars().all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '_');
        ensure(name_ok, &format!("{at}.name"), quoted(&c.name), || {
            "must be 1 to 32 characters of a-z, 0-9 and '_' (for example \"fee_dispute\")".into()
        })?;
        ensure(names.insert(c.name.clone()), &format!("{at}.name"), quoted(&c.name), || {
            "names another category already: category names must be unique".into()
        })?;
        let skill_ok = (1..=64).contains(&c.skill_group.len())
            && c.skill_group.chars().all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '_' | '.' | ':' | '-'));
        ensure(skill_ok, &format!("{at}.skill_group"), quoted(&c.skill_group), || {
            "must be 1 to 64 characters of A-Z a-z 0-9 _ . : - (for example \"fee\")".into()
        })?;
        ensure(c.keywords.len() <= MAX_KEYWORDS, &format!("{at}.keywords"), c.keywords.len(), || {
            format!("lists too many keywords: at most {MAX_KEYWORDS}")
        })?;
        ensure(i == t.categories.len() || !c.keywords.is_empty(), &format!("{at}.keywords"), "[]", || {
            "must list at least one keyword (only the fallback matches without one)".into()
        })?;
        for k in &c.keywords {
            keyword(&format!("{at}.keywords"), k)?;
        }
    }
    Ok(())
}

fn keyword(key: &str, word: &str) -> Check {
    let len = word.chars().count();
    ensure(!word.trim().is_empty() && len <= MAX_KEYWORD_CHARS, key, quoted(word), || {
        format!("each entry must be 1 to {MAX_KEYWORD_CHARS} characters and not blank")
    })
}

// Rule helpers.

fn ensure(ok: bool, key: &str, value: impl Display, problem: impl FnOnce() -> String) -> Check {
    if ok {
        return Ok(());
    }
    Err(ConfigError::Invalid { key: key.to_owned(), value: value.to_string(), problem: problem() })
}

fn positive<N: Default + PartialOrd + Display>(key: &str, value: N) -> Check {
    ensure(value > N::default(), key, value, || "must be at least 1".into())
}

fn positive_duration(key: &str, value: Duration) -> Check {
    ensure(!value.is_zero(), key, duration(value), || "must be greater than zero".into())
}

fn min_secret(key: &str, secret: Option<&str>, min_bytes: usize) -> Check {
    match secret {
        Some(secret) => ensure(secret.len() >= min_bytes, key, redacted(secret), || {
            format!("must be at least {min_bytes} bytes; generate one with `openssl rand -hex 32`")
        }),
        None => Ok(()),
    }
}

fn cert_and_key(section: &str, cert: &Option<PathBuf>, key: &Option<PathBuf>) -> Check {
    match (cert, key) {
        (Some(_), None) => ensure(false, &format!("{section}.tls_key"), "(not set)", || {
            format!("must be set when {section}.tls_cert is set: give both or neither")
        }),
        (None, Some(_)) => ensure(false, &format!("{section}.tls_cert"), "(not set)", || {
            format!("must be set when {section}.tls_key is set: give both or neither")
        }),
        _ => Ok(()),
    }
}

/// `host:port` with a non-empty host and a non-zero port.
fn is_host_port(text: &str) -> bool {
    if text.parse::<SocketAddr>().is_ok_and(|addr| addr.port() != 0) {
        return true;
    }
    match text.rsplit_once(':') {
        Some((host, port)) => {
            !host.is_empty()
                && !host.contains(|c: char| c.is_whitespace() || c == '/' || c == ':')
                && port.parse::<u16>().is_ok_and(|port| port != 0)
        }
        None => false,
    }
}

fn is_http_url(text: &str) -> bool {
    let rest = text.strip_prefix("http://").or_else(|| text.strip_prefix("https://"));
    rest.is_some_and(|rest| !rest.is_empty() && !rest.starts_with('/') && !rest.contains(char::is_whitespace))
}

// Value renderings, as the value would be written in the file.

fn duration(value: Duration) -> String {
    humantime::format_duration(value).to_string()
}

fn quoted(value: impl Display) -> String {
    format!("{:?}", value.to_string())
}

/// Secrets are never echoed back; only their length is shown.
fn redacted(secret: &str) -> String {
    format!("<{} bytes, not shown>", secret.len())
}
