//! Load generation against running nodes: many connections, groups, closed- or open-loop
//! senders, and a measurement of ack latency, push latency, throughput and server memory.

pub mod peer;
pub mod report;
pub mod stats;

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rand::RngExt;
use serde_json::Value;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::MissedTickBehavior;

use crate::client::{Client, ClientError, ClientOptions, GroupOpen, Member};
use crate::sys;
use crate::token::{Claims, mint};

pub use report::{LoadReport, ProcessRss};
use stats::{PHASE_DONE, PHASE_MEASURE, PHASE_WARMUP, Stats};

/// Lifetime of the tokens minted for a run.
const TOKEN_TTL: Duration = Duration::from_secs(3600);
/// Attempts to open one connection when the server resets or refuses it.
const CONNECT_ATTEMPTS: u32 = 3;
const CONNECT_RETRY_DELAY: Duration = Duration::from_millis(200);
/// Attempts to open one group before giving up on it.
const GROUP_OPEN_ATTEMPTS: u32 = 5;
/// Pause before retrying when the server gives no `retry_after_ms`.
const DEFAULT_RETRY_DELAY: Duration = Duration::from_millis(100);
/// Open loop: sends one sender may have outstanding before further ones are skipped.
const MAX_OUTSTANDING_PER_SENDER: usize = 10_000;
/// Time given to in-flight sends to finish after the run ends.
const DRAIN_TIME: Duration = Duration::from_secs(2);

const LOAD_AFTER_HELP: &str = "\
Setup: every connection says hello as its own user \"{run}-u{i}\" (role driver); the first
member of each group \"{run}-g{j}\" (role driver + dispatcher) opens it as a chat with the
other members as drivers. Members of group j are users (j*M + k) mod N, k < M, so every user
is in about G*M/N groups. Then each sender owns one connection and sends text messages to its
user's groups; every connection counts the `msg` events it receives and their push latency
(receive time minus the send time carried in the body; same machine clock).

Latencies and rates cover the measurement window only (--warmup excluded). Sends that fail
with unavailable, rate_limited or a timeout are retried with the same client_msg_id after
retry_after_ms (or 100 ms); the ack latency of a send includes its retries. In the open loop
it is measured from when the send was due, and \"sends late\" says how much of it the
generator added itself (it shares the machine's cores with what it measures).

Examples:
  # 128 connections, 32 groups of 4, one send in flight per connection, for 30 s
  convoy-chaos load --secret dev-secret

  # Three nodes, 2000 connections, open loop at 5000 msgs/s, results as JSON
  convoy-chaos load --url ws://10.0.0.1:7600/v1/ws --url ws://10.0.0.2:7600/v1/ws \\
      --url ws://10.0.0.3:7600/v1/ws --connections 2000 --groups 500 --rate 5000 \\
      --duration 60s --json results.json

  # Memory per idle connection: 40k connections from two source addresses
  CONVOY_AUTH_SECRET=dev-secret convoy-chaos load --idle --connections 40000 \\
      --source-ips 127.0.0.1,127.0.0.2 --server-pid $NODE_PID --duration 20s

Exit status: 0 when the run completed (errors are counted, not fatal), 2 on usage errors,
1 when the run could not be carried out (nothing connected, no group could be opened, ...).";

/// Options of `convoy-chaos load`.
#[derive(Debug, Clone, clap::Args)]
#[command(after_help = LOAD_AFTER_HELP)]
pub struct LoadArgs {
    /// WebSocket URL of a node; repeat it to spread connections over several nodes (round-robin)
    #[arg(long = "url", value_name = "URL", default_value = "ws://127.0.0.1:7600/v1/ws")]
    pub urls: Vec<String>,

    /// The cluster's shared client secret (HS256 key for the tokens)
    #[arg(long, env = "CONVOY_AUTH_SECRET", hide_env_values = true, value_name = "SECRET")]
    pub secret: String,

    /// PEM file of the CA (or self-signed certificate) to trust for wss:// URLs
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,

    /// Number of connections, one user each
    #[arg(long, short = 'c', default_value_t = 128, value_name = "N")]
    pub connections: usize,

    /// Number of chat groups
    #[arg(long, short = 'g', default_value_t = 32, value_name = "G")]
    pub groups: usize,

    /// Members per group, chosen among the users round-robin
    #[arg(long, short = 'm', default_value_t = 4, value_name = "M")]
    pub members: usize,

    /// Number of sending connections [default: all connections]
    #[arg(long, short = 's', value_name = "S", conflicts_with = "idle")]
    pub senders: Option<usize>,

    /// Closed loop: sends each sender keeps in flight
    #[arg(long, short = 'k', default_value_t = 1, value_name = "K", conflicts_with_all = ["rate", "idle"])]
    pub inflight: usize,

    /// Open loop: total messages per second, spread evenly over the senders (pipelined)
    #[arg(long, short = 'r', value_name = "R", conflicts_with = "idle")]
    pub rate: Option<f64>,

    #[command(flatten)]
    pub window: Window,

    /// Send messages with require_receipt: true
    #[arg(long, conflicts_with = "idle")]
    pub require_receipt: bool,

    /// Only connect and hello all connections, hold them for --duration, send nothing
    /// (measures server memory per idle connection with --server-pid)
    #[arg(long)]
    pub idle: bool,

    /// Server process to sample VmRSS of (before connecting, after setup, at the end); repeatable
    #[arg(long = "server-pid", value_name = "PID")]
    pub server_pids: Vec<u32>,

    /// Source addresses to spread connections over (each gives ~28k ports towards one server)
    #[arg(long, value_delimiter = ',', value_name = "IP,IP,...")]
    pub source_ips: Vec<IpAddr>,

    /// Also write the results to FILE as JSON
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,

    /// Prefix of the user and group ids, so that runs do not collide [default: random]
    #[arg(long, value_name = "ID")]
    pub run_id: Option<String>,

    /// Time a request waits for its reply
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub request_timeout: Duration,

    /// Connections opened (and groups set up) at a time
    #[arg(long, default_value_t = 256, value_name = "N")]
    pub connect_concurrency: usize,

    /// No progress bars or live line
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

/// How long a run measures, after how much warm-up, with what size of message, on how many
/// threads; the same for `load` and `peer`, so their figures compare.
#[derive(Debug, Clone, clap::Args)]
pub struct Window {
    /// Length of the measurement window (e.g. 30s, 5m)
    #[arg(long, short = 'd', default_value = "30s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub duration: Duration,

    /// Load applied before the measurement window, not counted
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub warmup: Duration,

    /// Length of each message's text
    #[arg(long, default_value_t = 100, value_name = "BYTES")]
    pub body_bytes: usize,

    /// Worker threads of the load generator [default: one per core]. On the machine of the
    /// server under test, 1 leaves it the most CPU: fewer wake-ups cross cores
    #[arg(long, value_name = "N")]
    pub threads: Option<std::num::NonZeroUsize>,
}

/// A validated load run.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    pub urls: Vec<String>,
    pub secret: Vec<u8>,
    pub connections: usize,
    pub groups: usize,
    pub members: usize,
    pub senders: usize,
    pub inflight: usize,
    pub rate: Option<f64>,
    pub duration: Duration,
    pub warmup: Duration,
    pub body_bytes: usize,
    pub require_receipt: bool,
    pub idle: bool,
    pub server_pids: Vec<u32>,
    pub source_ips: Vec<IpAddr>,
    pub json: Option<PathBuf>,
    pub run_id: String,
    pub request_timeout: Duration,
    pub connect_concurrency: usize,
    /// Whom to trust for wss:// URLs.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// Draw progress bars and the live line (on a terminal) or print plain lines (otherwise).
    pub progress: bool,
}

/// A short random run id: 6 lowercase letters and digits.
pub fn random_run_id() -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..6).map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char).collect()
}

fn valid_id_chars(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'))
}

impl LoadConfig {
    /// Checks the options; the error is a usage message.
    pub fn from_args(args: LoadArgs) -> Result<LoadConfig, String> {
        if args.urls.is_empty() {
            return Err("give at least one --url".into());
        }
        for url in &args.urls {
            if url.starts_with("wss://") && args.tls_ca.is_none() {
                return Err(format!("--url {url}: a wss:// URL needs --tls-ca FILE, the CA to trust"));
            }
            if !url.starts_with("ws://") && !url.starts_with("wss://") {
                return Err(format!("--url {url}: expected ws://HOST:PORT/v1/ws or wss://HOST:PORT/v1/ws"));
            }
        }
        let tls = match &args.tls_ca {
            Some(ca) => Some(crate::client::tls_trusting(ca).map_err(|e| format!("--tls-ca: {e}"))?),
            None => None,
        };
        if args.secret.is_empty() {
            return Err("--secret (or CONVOY_AUTH_SECRET) must not be empty".into());
        }
        if args.connections == 0 {
            return Err("--connections must be at least 1".into());
        }
        if !args.idle {
            if args.groups == 0 {
                return Err("--groups must be at least 1".into());
            }
            if args.members == 0 || args.members > args.connections {
                return Err(format!(
                    "--members must be between 1 and --connections ({}), got {}",
                    args.connections, args.members
                ));
            }
        }
        let senders = args.senders.unwrap_or(args.connections);
        if !args.idle && (senders == 0 || senders > args.connections) {
            return Err(format!("--senders must be between 1 and --connections ({}), got {senders}", args.connections));
        }
        if args.inflight == 0 {
            return Err("--inflight must be at least 1".into());
        }
        if let Some(rate) = args.rate
            && !(rate.is_finite() && rate > 0.0)
        {
            return Err(format!("--rate must be a positive number of messages per second, got {rate}"));
        }
        if args.window.duration.is_zero() {
            return Err("--duration must be longer than 0".into());
        }
        if args.request_timeout.is_zero() {
            return Err("--request-timeout must be longer than 0".into());
        }
        if args.connect_concurrency == 0 {
            return Err("--connect-concurrency must be at least 1".into());
        }
        let run_id = args.run_id.unwrap_or_else(random_run_id);
        if run_id.is_empty() || run_id.len() > 40 || !valid_id_chars(&run_id) {
            return Err(format!("--run-id must be 1..40 chars of [A-Za-z0-9_.:-], got {run_id:?}"));
        }
        Ok(LoadConfig {
            urls: args.urls,
            secret: args.secret.into_bytes(),
            connections: args.connections,
            groups: if args.idle { 0 } else { args.groups },
            members: args.members,
            senders: if args.idle { 0 } else { senders },
            inflight: args.inflight,
            rate: args.rate,
            duration: args.window.duration,
            warmup: args.window.warmup,
            body_bytes: args.window.body_bytes,
            require_receipt: args.require_receipt,
            idle: args.idle,
            server_pids: args.server_pids,
            source_ips: args.source_ips,
            json: args.json,
            run_id,
            request_timeout: args.request_timeout,
            connect_concurrency: args.connect_concurrency,
            tls,
            progress: !args.quiet,
        })
    }

    fn mode(&self) -> &'static str {
        if self.idle {
            "idle"
        } else if self.rate.is_some() {
            "open"
        } else {
            "closed"
        }
    }
}

/// A run could not be carried out.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct LoadError(pub String);

/// One group of the run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupPlan {
    pub id: String,
    /// User index of the opener (the first member).
    pub opener: usize,
    /// User indexes, opener first.
    pub members: Vec<usize>,
}

/// Who is who in a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub users: Vec<String>,
    pub groups: Vec<GroupPlan>,
    /// Group indexes of each user.
    pub user_groups: Vec<Vec<usize>>,
    /// Users that open a group (they get the `dispatcher` role too).
    pub openers: Vec<bool>,
    /// User indexes of the senders: the first `senders` users that are in at least one group.
    pub senders: Vec<usize>,
}

impl Plan {
    /// Members of group j are users (j*members + k) mod users, k < members; `members` must not
    /// exceed `users`.
    pub fn new(run_id: &str, users: usize, groups: usize, members: usize, senders: usize) -> Plan {
        let user_ids: Vec<String> = (0..users).map(|i| format!("{run_id}-u{i}")).collect();
        let mut user_groups = vec![Vec::new(); users];
        let mut openers = vec![false; users];
        let mut group_plans = Vec::with_capacity(groups);
        if users > 0 {
            let members = members.min(users);
            for j in 0..groups {
                let member_ids: Vec<usize> = (0..members).map(|k| (j * members + k) % users).collect();
                for &u in &member_ids {
                    user_groups[u].push(j);
                }
                if let Some(&opener) = member_ids.first() {
                    openers[opener] = true;
                    group_plans.push(GroupPlan { id: format!("{run_id}-g{j}"), opener, members: member_ids });
                }
            }
        }
        let senders = (0..users).filter(|&u| !user_groups[u].is_empty()).take(senders).collect();
        Plan { users: user_ids, groups: group_plans, user_groups, openers, senders }
    }
}

/// Progress output: bars and a live line on a terminal, plain lines otherwise, or nothing.
#[derive(Clone, Copy)]
struct Ui {
    enabled: bool,
    terminal: bool,
}

impl Ui {
    fn new(enabled: bool) -> Ui {
        Ui { enabled, terminal: enabled && std::io::stderr().is_terminal() }
    }

    fn bar(&self, len: usize, prefix: &'static str) -> ProgressBar {
        if !self.terminal {
            return ProgressBar::hidden();
        }
        let style =
            ProgressStyle::with_template("{prefix:>12} [{bar:40.cyan/blue}] {pos}/{len} ({per_sec}, {elapsed}) {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> ");
        let bar = ProgressBar::with_draw_target(Some(len as u64), ProgressDrawTarget::stderr()).with_style(style);
        bar.set_prefix(prefix);
        bar
    }

    fn spinner(&self) -> ProgressBar {
        if !self.terminal {
            return ProgressBar::hidden();
        }
        let style =
            ProgressStyle::with_template("{spinner} {msg}").unwrap_or_else(|_| ProgressStyle::default_spinner());
        ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr()).with_style(style)
    }

    fn line(&self, bar: &ProgressBar, line: String) {
        if self.terminal {
            bar.set_message(line);
            bar.tick();
        } else if self.enabled {
            eprintln!("{line}");
        }
    }

    fn note(&self, line: &str) {
        if self.enabled {
            eprintln!("{line}");
        }
    }
}

/// Connection-level failures during setup.
#[derive(Default)]
struct ErrorTally {
    by_code: BTreeMap<String, u64>,
    first: Option<ClientError>,
}

impl ErrorTally {
    fn add(&mut self, e: ClientError) {
        *self.by_code.entry(e.code().to_string()).or_insert(0) += 1;
        self.first.get_or_insert(e);
    }
}

/// What to tell the user when nothing could connect.
fn connect_hint(e: &ClientError, urls: &[String]) -> String {
    match e {
        ClientError::Connect { reason, .. } if reason.contains("Too many open files") => {
            "raise the open-file limit (ulimit -n) or use fewer --connections".into()
        }
        ClientError::Connect { reason, .. } if reason.contains("Cannot assign requested address") => {
            "the source address ran out of ports or does not exist: add --source-ips".into()
        }
        ClientError::Connect { .. } => format!("is a node listening at {}? check --url", urls.join(", ")),
        ClientError::Server { code, .. } if code == "unauthorized" => {
            "hello was rejected: --secret (or CONVOY_AUTH_SECRET) must be the cluster's client auth secret".into()
        }
        ClientError::Closed { code: Some(4401), .. } => {
            "the server closed the connection with 4401 (no valid hello): check --secret".into()
        }
        ClientError::Timeout => "the server did not answer hello in time: is it overloaded or still starting?".into(),
        _ => "check that --url points at a Convoy node's client listener".into(),
    }
}

/// Runs the load described by `cfg` and returns its results.
pub async fn run(cfg: LoadConfig) -> Result<LoadReport, LoadError> {
    let ui = Ui::new(cfg.progress);
    let stats = Arc::new(Stats::new());
    let started_at_unix_ms = stats::unix_nanos() / 1_000_000;
    let setup_started = Instant::now();

    match sys::raise_nofile_limit() {
        Ok(limit) if (limit as usize) < cfg.connections + 64 => ui.note(&format!(
            "warning: the open-file limit is {limit}, too low for {} connections (raise it with ulimit -n)",
            cfg.connections
        )),
        _ => {}
    }

    let plan = Plan::new(&cfg.run_id, cfg.connections, cfg.groups, cfg.members, cfg.senders);
    if !cfg.idle && plan.senders.len() < cfg.senders {
        ui.note(&format!(
            "note: only {} users are in a group, so only {} senders (of {} asked) will send",
            plan.senders.len(),
            plan.senders.len(),
            cfg.senders
        ));
    }

    let mut server_rss: Vec<ProcessRss> =
        cfg.server_pids.iter().map(|&pid| ProcessRss { pid, ..Default::default() }).collect();
    for p in &mut server_rss {
        p.before_kb = sample_rss(p.pid, &ui);
    }

    // Connect and hello.
    let (clients, connect_errors) = connect_all(&cfg, &plan, &ui).await;
    let connected = clients.iter().filter(|c| c.is_some()).count();
    if connected == 0 {
        let hint = connect_errors.first.as_ref().map(|e| connect_hint(e, &cfg.urls)).unwrap_or_default();
        let first = connect_errors.first.map(|e| e.to_string()).unwrap_or_else(|| "no error recorded".into());
        let first = format!("none of the {} connections could be set up: {first}\n  hint: {hint}", cfg.connections);
        return Err(LoadError(first));
    }
    if connected < cfg.connections {
        let first = connect_errors.first.as_ref().map(|e| e.to_string()).unwrap_or_default();
        ui.note(&format!("warning: {connected} of {} connections set up; first failure: {first}", cfg.connections));
    }
    for client in clients.iter().flatten() {
        if let Some(events) = client.events() {
            tokio::spawn(consume_events(events, stats.clone()));
        }
    }

    // Groups.
    let (opened, group_errors) =
        if cfg.idle { (Vec::new(), ErrorTally::default()) } else { open_groups(&cfg, &plan, &clients, &ui).await };
    let groups_opened = opened.iter().filter(|&&o| o).count();
    if !cfg.idle && groups_opened == 0 {
        let first =
            group_errors.first.map(|e| e.to_string()).unwrap_or_else(|| "their openers are not connected".into());
        return Err(LoadError(format!(
            "no group could be opened: {first}\n  hint: the opener of each group needs the dispatcher role and a reachable node"
        )));
    }
    if groups_opened < plan.groups.len() {
        ui.note(&format!("warning: {groups_opened} of {} groups opened", plan.groups.len()));
    }
    let setup_s = setup_started.elapsed().as_secs_f64();

    for p in &mut server_rss {
        p.after_setup_kb = sample_rss(p.pid, &ui);
    }

    // Senders.
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut sender_tasks = JoinSet::new();
    let mut senders = 0usize;
    if !cfg.idle {
        let active: Vec<(usize, Client, Vec<String>)> = plan
            .senders
            .iter()
            .filter_map(|&u| {
                let client = clients[u].clone()?;
                let groups: Vec<String> =
                    plan.user_groups[u].iter().filter(|&&g| opened[g]).map(|&g| plan.groups[g].id.clone()).collect();
                (!groups.is_empty()).then_some((u, client, groups))
            })
            .collect();
        senders = active.len();
        let rate_per_sender = cfg.rate.map(|r| r / senders.max(1) as f64);
        for (index, (_, client, groups)) in active.into_iter().enumerate() {
            let sender = Arc::new(Sender {
                index,
                client,
                groups,
                counter: AtomicU64::new(0),
                body_bytes: cfg.body_bytes,
                require_receipt: cfg.require_receipt,
                stats: stats.clone(),
            });
            match rate_per_sender {
                Some(rate) => {
                    let offset = index as f64 / senders as f64;
                    sender_tasks.spawn(open_loop(sender, rate, offset, stop_rx.clone()));
                }
                None => {
                    for _ in 0..cfg.inflight {
                        sender_tasks.spawn(closed_loop(sender.clone(), stop_rx.clone()));
                    }
                }
            }
        }
    }

    // Warm-up, measurement, live line.
    let measured = drive(cfg.warmup, cfg.duration, &stats, &ui, cfg.idle.then_some(&clients[..])).await;
    stats.set_phase(PHASE_DONE);
    let _ = stop_tx.send(true);

    for p in &mut server_rss {
        p.end_kb = sample_rss(p.pid, &ui);
    }

    let _ = tokio::time::timeout(DRAIN_TIME, async { while sender_tasks.join_next().await.is_some() {} }).await;
    sender_tasks.abort_all();

    let live: Vec<&Client> = clients.iter().flatten().collect();
    let connections_lost = live.iter().filter(|c| c.is_closed()).count();
    let malformed_frames = live.iter().map(|c| c.malformed_frames()).sum();
    let events_dropped = live.iter().map(|c| c.events_dropped()).sum();
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        futures::stream::iter(live.iter()).for_each_concurrent(256, |c| c.close()).await;
    })
    .await;

    let totals = stats.totals();
    let rss_per_connection_kb = report::rss_per_connection_kb(&server_rss, connected);
    Ok(LoadReport {
        run_id: cfg.run_id.clone(),
        urls: cfg.urls.clone(),
        mode: cfg.mode().into(),
        started_at_unix_ms,
        duration_s: measured.as_secs_f64(),
        warmup_s: if cfg.idle { 0.0 } else { cfg.warmup.as_secs_f64() },
        setup_s,
        connections_requested: cfg.connections,
        connections: connected,
        connect_errors: connect_errors.by_code,
        first_connect_error: connect_errors.first.map(|e| e.to_string()),
        connections_lost,
        groups: plan.groups.len(),
        groups_opened,
        group_errors: group_errors.by_code,
        members: cfg.members,
        senders,
        inflight: cfg.inflight,
        rate: cfg.rate,
        body_bytes: cfg.body_bytes,
        require_receipt: cfg.require_receipt,
        acked: totals.acked,
        acked_per_s: stats::per_second(totals.acked, measured),
        ack_latency_ms: totals.ack_latency,
        push_latency_ms: totals.push_latency,
        send_lateness_ms: totals.send_lateness,
        deliveries: totals.deliveries,
        deliveries_per_s: stats::per_second(totals.deliveries, measured),
        unparsed_deliveries: totals.unparsed_deliveries,
        errors: totals.errors,
        timeouts: totals.timeouts,
        retries: totals.retries,
        failed_sends: totals.failed_sends,
        skipped_sends: totals.skipped_sends,
        malformed_frames,
        events_dropped,
        server_rss,
        rss_per_connection_kb,
    })
}

fn sample_rss(pid: u32, ui: &Ui) -> Option<u64> {
    match sys::rss_kb(pid) {
        Ok(kb) => Some(kb),
        Err(e) => {
            ui.note(&format!("warning: cannot read the memory of process {pid}: {e}"));
            None
        }
    }
}

/// Connects and says hello on every connection, `connect_concurrency` at a time.
async fn connect_all(cfg: &LoadConfig, plan: &Plan, ui: &Ui) -> (Vec<Option<Client>>, ErrorTally) {
    let bar = ui.bar(cfg.connections, "connecting");
    let opts = ClientOptions { request_timeout: cfg.request_timeout, tls: cfg.tls.clone(), ..ClientOptions::default() };
    let mut clients: Vec<Option<Client>> = vec![None; cfg.connections];
    let mut errors = ErrorTally::default();
    let mut results = futures::stream::iter(0..cfg.connections)
        .map(|i| {
            let url = &cfg.urls[i % cfg.urls.len()];
            let local_addr = (!cfg.source_ips.is_empty()).then(|| cfg.source_ips[i % cfg.source_ips.len()]);
            let opts = ClientOptions { local_addr, ..opts.clone() };
            let roles: &[&str] = if plan.openers[i] { &["driver", "dispatcher"] } else { &["driver"] };
            let token = mint(&cfg.secret, &Claims::new(plan.users[i].clone(), roles.iter().copied(), TOKEN_TTL));
            async move {
                let result = async {
                    let mut attempt = 1;
                    let client = loop {
                        match Client::connect(url, opts.clone()).await {
                            Ok(client) => break client,
                            // A full accept queue resets or refuses; try again a few times.
                            Err(ClientError::Connect { reason, .. })
                                if attempt < CONNECT_ATTEMPTS
                                    && (reason.contains("reset") || reason.contains("refused")) =>
                            {
                                tokio::time::sleep(CONNECT_RETRY_DELAY * attempt).await;
                                attempt += 1;
                            }
                            Err(e) => return Err(e),
                        }
                    };
                    client.hello(&token, &format!("load-{i}")).await?;
                    Ok::<_, ClientError>(client)
                }
                .await;
                (i, result)
            }
        })
        .buffer_unordered(cfg.connect_concurrency);
    while let Some((i, result)) = results.next().await {
        match result {
            Ok(client) => clients[i] = Some(client),
            Err(e) => {
                errors.add(e);
                bar.set_message(format!("{} failed", errors.by_code.values().sum::<u64>()));
            }
        }
        bar.inc(1);
    }
    bar.finish();
    let ok = clients.iter().filter(|c| c.is_some()).count();
    if !ui.terminal {
        ui.note(&format!("connected {ok} of {} connections", cfg.connections));
    }
    (clients, errors)
}

/// Opens every group from its opener's connection. Returns which groups are open.
async fn open_groups(cfg: &LoadConfig, plan: &Plan, clients: &[Option<Client>], ui: &Ui) -> (Vec<bool>, ErrorTally) {
    let bar = ui.bar(plan.groups.len(), "groups");
    let mut opened = vec![false; plan.groups.len()];
    let mut errors = ErrorTally::default();
    let mut results = futures::stream::iter(plan.groups.iter().enumerate())
        .map(|(j, group)| {
            let client = clients[group.opener].clone();
            let members: Vec<Member> =
                group.members.iter().skip(1).map(|&u| Member::new(plan.users[u].clone(), "driver")).collect();
            let open = GroupOpen::chat(group.id.clone(), members);
            async move {
                let Some(client) = client else {
                    return (j, Err(None));
                };
                let mut attempt = 1;
                loop {
                    match client.group_open(&open).await {
                        Ok(_) => return (j, Ok(())),
                        Err(e) if e.is_retryable() && attempt < GROUP_OPEN_ATTEMPTS => {
                            attempt += 1;
                            tokio::time::sleep(e.retry_after().unwrap_or(DEFAULT_RETRY_DELAY)).await;
                        }
                        Err(e) => return (j, Err(Some(e))),
                    }
                }
            }
        })
        .buffer_unordered(cfg.connect_concurrency);
    while let Some((j, result)) = results.next().await {
        match result {
            Ok(()) => opened[j] = true,
            Err(e) => {
                match e {
                    Some(e) => errors.add(e),
                    None => *errors.by_code.entry("opener_not_connected".into()).or_insert(0) += 1,
                }
                bar.set_message(format!("{} failed", errors.by_code.values().sum::<u64>()));
            }
        }
        bar.inc(1);
    }
    bar.finish();
    if !ui.terminal {
        ui.note(&format!("opened {} of {} groups", opened.iter().filter(|&&o| o).count(), plan.groups.len()));
    }
    (opened, errors)
}

/// Counts `msg` events and their push latency.
async fn consume_events(mut events: mpsc::Receiver<Value>, stats: Arc<Stats>) {
    while let Some(event) = events.recv().await {
        if event.get("ev").and_then(Value::as_str) == Some("msg") {
            stats.record_delivery(stats::push_latency(&event, stats::unix_nanos()));
        }
    }
}

/// Runs the warm-up and the measurement window, printing a live line every second. Returns
/// the length of the measurement window actually run (shorter if interrupted with Ctrl-C).
/// `idle` holds the connections of an idle run (no warm-up; the live line counts the open ones).
async fn drive(
    warmup: Duration,
    duration: Duration,
    stats: &Stats,
    ui: &Ui,
    idle: Option<&[Option<Client>]>,
) -> Duration {
    let warmup = if idle.is_some() { Duration::ZERO } else { warmup };
    let start = tokio::time::Instant::now();
    let measure_start = start + warmup;
    let end = measure_start + duration;
    let mut measure_started: Option<tokio::time::Instant> = None;
    if warmup.is_zero() {
        stats.set_phase(PHASE_MEASURE);
        measure_started = Some(start);
    } else {
        stats.set_phase(PHASE_WARMUP);
    }
    let live = ui.spinner();
    let mut ticker = tokio::time::interval_at(start + Duration::from_secs(1), Duration::from_secs(1));
    ticker.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let mut last = stats.live();
    let mut last_at = start;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);

    loop {
        let next_phase = if measure_started.is_none() { measure_start } else { end };
        tokio::select! {
            _ = tokio::time::sleep_until(next_phase) => {
                if measure_started.is_none() {
                    stats.set_phase(PHASE_MEASURE);
                    measure_started = Some(tokio::time::Instant::now());
                } else {
                    break;
                }
            }
            now = ticker.tick() => {
                let current = stats.live();
                let secs = now.duration_since(last_at).as_secs_f64().max(1e-3);
                let phase = match measure_started {
                    None => format!("warm-up {:>3}s", now.duration_since(start).as_secs()),
                    Some(at) => format!("{:>4}s/{}s", now.duration_since(at).as_secs(), duration.as_secs()),
                };
                let line = if let Some(clients) = idle {
                    let open = clients.iter().flatten().filter(|c| !c.is_closed()).count();
                    format!("[{phase}] idle, {open} connections open")
                } else {
                    let ms = |p: Option<f64>| p.map(|p| format!("{p:.2} ms")).unwrap_or_else(|| "-".into());
                    let (p99, p99_now) = (ms(stats.live_ack_p99_ms()), ms(stats.take_recent_ack_p99_ms()));
                    format!(
                        "[{phase}] acked/s {:>8.0}  p99 ack {p99:>10} (last second {p99_now:>10})  deliveries/s {:>8.0}  errors {}",
                        (current.acked - last.acked) as f64 / secs,
                        (current.deliveries - last.deliveries) as f64 / secs,
                        current.errors,
                    )
                };
                ui.line(&live, line);
                last = current;
                last_at = now;
            }
            _ = &mut ctrl_c => {
                ui.note("interrupted: finishing the run early");
                break;
            }
        }
    }
    live.finish_and_clear();
    measure_started.map(|at| at.elapsed()).unwrap_or_default()
}

/// One sending connection.
struct Sender {
    index: usize,
    client: Client,
    groups: Vec<String>,
    counter: AtomicU64,
    body_bytes: usize,
    require_receipt: bool,
    stats: Arc<Stats>,
}

/// How one send ended.
#[derive(Debug, PartialEq, Eq)]
enum SendOutcome {
    Acked,
    Failed,
    ConnectionClosed,
    Stopped,
}

impl Sender {
    /// Sends the next message, retrying the same `client_msg_id` on `unavailable`,
    /// `rate_limited` and timeouts. Records the ack latency from `issued`.
    async fn send_next(&self, issued: Instant, stop: &mut watch::Receiver<bool>) -> SendOutcome {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let client_msg_id = format!("{}-{n}", self.index);
        let group = &self.groups[(n as usize) % self.groups.len()];
        let body = stats::make_body(stats::unix_nanos(), self.body_bytes);
        loop {
            match self.client.msg_send(group, &client_msg_id, body.clone(), self.require_receipt).await {
                Ok(_) => {
                    self.stats.record_ack(issued.elapsed());
                    return SendOutcome::Acked;
                }
                Err(e) if e.is_retryable() => {
                    if e == ClientError::Timeout {
                        self.stats.record_timeout();
                    } else {
                        self.stats.record_error(e.code());
                    }
                    if *stop.borrow() {
                        return SendOutcome::Stopped;
                    }
                    self.stats.record_retry();
                    let delay = e.retry_after().unwrap_or(DEFAULT_RETRY_DELAY);
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = stop.wait_for(|s| *s) => return SendOutcome::Stopped,
                    }
                }
                Err(e @ ClientError::Closed { .. }) => {
                    self.stats.record_error(e.code());
                    return SendOutcome::ConnectionClosed;
                }
                Err(e) => {
                    self.stats.record_error(e.code());
                    self.stats.record_failed_send();
                    return SendOutcome::Failed;
                }
            }
        }
    }
}

/// Keeps one send in flight until stopped (the sender runs `--inflight` of these).
async fn closed_loop(sender: Arc<Sender>, mut stop: watch::Receiver<bool>) {
    while !*stop.borrow() {
        match sender.send_next(Instant::now(), &mut stop).await {
            SendOutcome::Acked | SendOutcome::Failed => {}
            SendOutcome::ConnectionClosed | SendOutcome::Stopped => break,
        }
    }
}

/// Issues `rate` sends per second without waiting for acks, until stopped. The ack latency is
/// measured from when each send was due, so a slow server is not hidden by a late client.
/// `phase` (0..1) staggers the senders' schedules.
async fn open_loop(sender: Arc<Sender>, rate: f64, phase: f64, mut stop: watch::Receiver<bool>) {
    let period = Duration::from_secs_f64((1.0 / rate).clamp(1e-6, 86_400.0));
    let first = tokio::time::Instant::now() + period.mul_f64(phase.clamp(0.0, 1.0));
    let mut ticker = tokio::time::interval_at(first, period);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Burst);
    let mut in_flight = JoinSet::new();
    let stop_for_sends = stop.clone();
    loop {
        tokio::select! {
            due = ticker.tick() => {
                while in_flight.try_join_next().is_some() {}
                if sender.client.is_closed() {
                    break;
                }
                if in_flight.len() >= MAX_OUTSTANDING_PER_SENDER {
                    sender.stats.record_skipped_send();
                    continue;
                }
                let sender = sender.clone();
                let mut stop = stop_for_sends.clone();
                in_flight.spawn(async move {
                    sender.stats.record_send_lateness(due.elapsed());
                    sender.send_next(due.into_std(), &mut stop).await
                });
            }
            _ = stop.wait_for(|s| *s) => break,
        }
    }
    // Give outstanding sends the drain time the caller allows; dropping the set aborts the rest.
    while in_flight.join_next().await.is_some() {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        load: LoadArgs,
    }

    fn parse(args: &[&str]) -> Result<LoadArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("load").chain(args.iter().copied())).map(|c| c.load)
    }

    #[test]
    fn plan_spreads_members_round_robin() {
        let plan = Plan::new("r", 8, 4, 4, 8);
        assert_eq!(plan.users[3], "r-u3");
        assert_eq!(plan.groups[1].id, "r-g1");
        assert_eq!(plan.groups[0].members, vec![0, 1, 2, 3]);
        assert_eq!(plan.groups[1].members, vec![4, 5, 6, 7]);
        assert_eq!(plan.groups[2].members, vec![0, 1, 2, 3]);
        assert_eq!(plan.groups[3].opener, 4);
        // Every user is in G*M/N = 2 groups.
        assert!(plan.user_groups.iter().all(|g| g.len() == 2));
        assert_eq!(plan.openers, vec![true, false, false, false, true, false, false, false]);
        assert_eq!(plan.senders, (0..8).collect::<Vec<_>>());

        // Wrapping: group members stay distinct.
        let plan = Plan::new("r", 5, 3, 3, 5);
        assert_eq!(plan.groups[1].members, vec![3, 4, 0]);
        assert_eq!(plan.groups[2].members, vec![1, 2, 3]);
        for g in &plan.groups {
            let mut m = g.members.clone();
            m.dedup();
            assert_eq!(m.len(), 3);
        }

        // Fewer memberships than users: users without a group do not send.
        let plan = Plan::new("r", 10, 2, 2, 10);
        assert_eq!(plan.senders, vec![0, 1, 2, 3]);
        let plan = Plan::new("r", 10, 2, 2, 3);
        assert_eq!(plan.senders, vec![0, 1, 2]);
    }

    #[test]
    fn defaults_and_validation() {
        let cfg = LoadConfig::from_args(parse(&["--secret", "s"]).unwrap()).unwrap();
        assert_eq!(cfg.urls, vec!["ws://127.0.0.1:7600/v1/ws".to_string()]);
        assert_eq!((cfg.connections, cfg.groups, cfg.members, cfg.senders, cfg.inflight), (128, 32, 4, 128, 1));
        assert_eq!(cfg.duration, Duration::from_secs(30));
        assert_eq!(cfg.warmup, Duration::from_secs(3));
        assert_eq!(cfg.body_bytes, 100);
        assert_eq!(cfg.run_id.len(), 6);
        assert_eq!(cfg.mode(), "closed");

        let cfg = LoadConfig::from_args(
            parse(&[
                "--secret",
                "s",
                "--url",
                "ws://a:1/v1/ws",
                "--url",
                "ws://b:2/v1/ws",
                "--rate",
                "500",
                "--duration",
                "1m",
                "--source-ips",
                "127.0.0.1,127.0.0.2",
                "--server-pid",
                "10",
                "--server-pid",
                "11",
                "--run-id",
                "bench.1",
            ])
            .unwrap(),
        )
        .unwrap();
        assert_eq!(cfg.urls.len(), 2);
        assert_eq!(cfg.mode(), "open");
        assert_eq!(cfg.duration, Duration::from_secs(60));
        assert_eq!(cfg.source_ips.len(), 2);
        assert_eq!(cfg.server_pids, vec![10, 11]);
        assert_eq!(cfg.run_id, "bench.1");

        for bad in [
            &["--secret", "s", "--members", "200"][..],
            &["--secret", "s", "--senders", "0"],
            &["--secret", "s", "--senders", "129"],
            &["--secret", "s", "--rate", "0"],
            &["--secret", "s", "--rate=-3"],
            &["--secret", "s", "--inflight", "0"],
            &["--secret", "s", "--duration", "0s"],
            &["--secret", "s", "--run-id", "bad id"],
            &["--secret", "s", "--url", "http://x/v1/ws"],
            &["--secret", "", "--idle"],
        ] {
            assert!(LoadConfig::from_args(parse(bad).unwrap()).is_err(), "{bad:?}");
        }
        assert!(parse(&["--secret", "s", "--rate", "10", "--inflight", "2"]).is_err());
        assert!(parse(&["--secret", "s", "--idle", "--rate", "10"]).is_err());
        assert!(parse(&["--secret", "s", "--duration", "soon"]).is_err());

        let idle = LoadConfig::from_args(parse(&["--secret", "s", "--idle", "--members", "500"]).unwrap()).unwrap();
        assert_eq!((idle.groups, idle.senders, idle.mode()), (0, 0, "idle"));
    }

    #[test]
    fn run_ids_are_valid_ids() {
        let a = random_run_id();
        assert!(valid_id_chars(&a) && a.len() == 6);
        assert_ne!(a, random_run_id());
    }

    #[tokio::test]
    async fn nothing_listening_is_a_fatal_error_with_a_hint() {
        // Find a port nobody listens on.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let url = format!("ws://127.0.0.1:{port}/v1/ws");
        let args =
            parse(&["--secret", "s", "--url", &url, "--connections", "3", "--groups", "1", "--members", "2", "-q"])
                .unwrap();
        let err = run(LoadConfig::from_args(args).unwrap()).await.unwrap_err();
        assert!(err.0.contains("none of the 3 connections"), "{err}");
        assert!(err.0.contains("check --url"), "{err}");
    }
}
