use std::num::NonZeroUsize;
use std::process::ExitCode;

use std::path::PathBuf;

use clap::{Args, CommandFactory, Parser, Subcommand};
use convoy_chaos::load::peer::{self, PeerArgs, PeerConfig};
use convoy_chaos::load::{self, LoadArgs, LoadConfig, LoadError, LoadReport};
use convoy_chaos::run::cluster::LaunchOptions;
use convoy_chaos::run::scenario::Scenario;
use convoy_chaos::run::{self, RunOptions};

const AFTER_HELP: &str = "\
Examples:
  # Drive the local node with the default load for 30 s
  convoy-chaos load --secret dev-secret

  # Same secret from the environment, 1000 connections, 4 sends in flight each, JSON results
  CONVOY_AUTH_SECRET=dev-secret convoy-chaos load -c 1000 -g 250 --inflight 4 --json out.json

  # The same closed loop against NATS JetStream (the throughput targets' peer), side by side
  convoy-chaos peer --nats nats://127.0.0.1:4222 --duration 15s

  # Memory per idle connection of a node
  convoy-chaos load --secret dev-secret --idle -c 10000 --server-pid $NODE_PID

  # Break a cluster on purpose and check that nothing acknowledged was lost
  convoy-chaos run chaos/scenarios/smoke.toml

  # A local cluster to play with (each node in its own network namespace), then remove it
  convoy-chaos up --nodes 3 --netns
  convoy-chaos down

  # Re-check a recorded history
  convoy-chaos check convoy-chaos-run/history.jsonl

Run `convoy-chaos <command> --help` for every option. Logs go to stderr (RUST_LOG=debug for more).";

/// Load and chaos for Convoy clusters: drive nodes with load, launch local clusters, break them
/// with scenarios, and check that nothing acknowledged was lost.
#[derive(Debug, Parser)]
#[command(name = "convoy-chaos", version, after_help = AFTER_HELP, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Drive running nodes with many connections and messages; report throughput, latency and
    /// server memory
    ///
    /// Opens --connections WebSocket connections (one user each), opens --groups chat groups of
    /// --members users, then sends messages from --senders connections for --duration after
    /// --warmup, either closed loop (--inflight sends in flight per sender) or open loop (--rate
    /// messages per second in total). Prints a live line every second and a summary table at
    /// the end.
    Load(LoadArgs),
    /// Drive NATS JetStream, the peer the throughput targets are set against, with the closed
    /// loop of `load`, for a side-by-side figure
    ///
    /// Opens --connections connections to the --nats servers, creates a file-backed stream with
    /// --replicas replicas, and has each connection publish to one of --groups subjects with
    /// one publish in flight, waiting for the stream's ack. Prints the same live line and
    /// summary as `load`.
    Peer(PeerArgs),
    /// Launch a local cluster of `convoy` processes and leave it running
    ///
    /// Writes a configuration per node into --dir, starts the nodes (each in its own network
    /// namespace with --netns: needs root, `ip` and `iptables`), waits until they serve, and
    /// prints how to reach them. `convoy-chaos down` removes it.
    Up(UpArgs),
    /// Stop the cluster `up` launched and remove its network namespaces (data and logs stay)
    Down(DirArgs),
    /// Run a scenario: launch a cluster, drive the workload, inject the faults, heal, check
    ///
    /// The last line printed is the verdict:
    /// `verdict: ok|violated lost=<n> unexpected=<n> duplicated=<n> reordered=<n> divergent=<n>
    /// max_unavailable_ms=<n>`. Exit status: 0 when it is ok, 1 on a violation, 3 when the
    /// checks passed but the faults did not cause what the scenario's `[expect]` asks for (no
    /// snapshot installed in a snapshot scenario, say), 2 when the run could not complete.
    /// The history (history.jsonl) and the report (report.json) are written to --dir.
    Run(RunArgs),
    /// Check a recorded history (history.jsonl) again and print the verdict
    Check {
        /// The history file a run wrote.
        history: PathBuf,
    },
}

#[derive(Debug, Args)]
struct DirArgs {
    /// Where the cluster's configurations, data, logs and cluster.json live.
    #[arg(long, default_value = "convoy-chaos-cluster")]
    dir: PathBuf,
}

#[derive(Debug, Args)]
struct UpArgs {
    /// Number of nodes.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=9))]
    nodes: u16,
    /// Put each node in its own network namespace (needs root), so partitions can be cut with iptables.
    #[arg(long)]
    netns: bool,
    #[command(flatten)]
    dir: DirArgs,
    #[command(flatten)]
    node: NodeArgs,
}

#[derive(Debug, Args)]
struct NodeArgs {
    /// The `convoy` binary [default: next to this one, else `convoy` on the PATH]
    #[arg(long)]
    convoy: Option<PathBuf>,
    /// Client port of n1; node i uses base + 10(i-1) for clients, +1 admin, +2 cluster.
    #[arg(long, default_value_t = 17600)]
    base_port: u16,
}

#[derive(Debug, Args)]
struct RunArgs {
    /// The scenario file (see chaos/scenarios/ and docs/chaos.md).
    scenario: PathBuf,
    /// Seed of the run's names (groups, users); the same seed gives the same names.
    #[arg(long)]
    seed: Option<u64>,
    /// Where the cluster, the history and the report go.
    #[arg(long, default_value = "convoy-chaos-run")]
    dir: PathBuf,
    /// Leave the cluster running after the run (remove it with `convoy-chaos down --dir <dir>/cluster`).
    #[arg(long)]
    keep: bool,
    /// No live progress line.
    #[arg(long, short)]
    quiet: bool,
    /// Run against a running cluster instead of launching one: the admin URL of any node (its
    /// nodes need `chaos.enabled = true`). Only partition, delay and storage faults apply.
    #[arg(long, value_name = "ADMIN_URL", requires = "secret")]
    attach: Option<String>,
    /// The attached cluster's client secret (admin and client tokens are minted from it).
    #[arg(long, env = "CONVOY_AUTH_SECRET", hide_env_values = true)]
    secret: Option<String>,
    #[command(flatten)]
    node: NodeArgs,
}

impl NodeArgs {
    fn convoy(&self) -> PathBuf {
        if let Some(p) = &self.convoy {
            return p.clone();
        }
        let sibling = std::env::current_exe().ok().and_then(|p| p.parent().map(|d| d.join("convoy")));
        sibling.filter(|p| p.exists()).unwrap_or_else(|| PathBuf::from("convoy"))
    }
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    // wss:// uses aws-lc-rs whatever else the build enables (see the node's main).
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    match cli.command {
        Command::Load(args) => run_load(args),
        Command::Peer(args) => run_peer(args),
        Command::Up(args) => block_on(up(args)),
        Command::Down(args) => block_on(async move { run::down(&args.dir).await.map(|()| ExitCode::SUCCESS) }),
        Command::Run(args) => block_on(run_scenario(args)),
        Command::Check { history } => check(&history),
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The async runtime every command runs on, with `threads` workers (default: one per core);
/// the exit code to end with if it cannot start.
fn new_runtime(threads: Option<NonZeroUsize>) -> Result<tokio::runtime::Runtime, ExitCode> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = threads {
        builder.worker_threads(n.get());
    }
    builder.enable_all().build().map_err(|e| {
        eprintln!("error: cannot start the async runtime: {e}");
        ExitCode::from(1)
    })
}

fn block_on(f: impl std::future::Future<Output = Result<ExitCode, BoxError>>) -> ExitCode {
    let runtime = match new_runtime(None) {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    match runtime.block_on(f) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

async fn up(args: UpArgs) -> Result<ExitCode, BoxError> {
    let opts = LaunchOptions {
        nodes: usize::from(args.nodes),
        dir: args.dir.dir.clone(),
        convoy: args.node.convoy(),
        netns: args.netns,
        base_port: args.node.base_port,
        config: toml::Table::new(),
    };
    let cluster = run::up(&opts).await?;
    let mut table = comfy_table::Table::new();
    table.load_style(comfy_table::presets::UTF8_FULL_CONDENSED);
    table.set_header(["node", "pid", "client", "admin", "cluster", "namespace"]);
    for n in &cluster.nodes {
        table.add_row([
            n.name.clone(),
            n.pid.map(|p| p.to_string()).unwrap_or_default(),
            n.client_url.clone(),
            n.admin_url.clone(),
            n.cluster_addr.clone(),
            n.netns.clone().unwrap_or_else(|| "-".into()),
        ]);
    }
    println!("{table}");
    println!("client secret: {}", cluster.secret);
    println!("a token:       convoy token --config {} --user alice --role driver", cluster.nodes[0].config.display());
    println!(
        "status:        convoy cluster status --admin {} --config {}",
        cluster.nodes[0].admin_url,
        cluster.nodes[0].config.display()
    );
    println!("remove it:     convoy-chaos down --dir {}", args.dir.dir.display());
    Ok(ExitCode::SUCCESS)
}

async fn run_scenario(args: RunArgs) -> Result<ExitCode, BoxError> {
    let scenario = Scenario::load(&args.scenario)?;
    let seed = args.seed.unwrap_or_else(rand::random);
    let opts = RunOptions {
        convoy: args.node.convoy(),
        dir: args.dir.clone(),
        base_port: args.node.base_port,
        seed,
        keep: args.keep,
        quiet: args.quiet,
        attach: args.attach.clone().zip(args.secret.clone()),
    };
    eprintln!("scenario {} (seed {seed}): {}", scenario.name, scenario.description);
    let outcome = run::run(&scenario, &opts).await?;
    println!("{}", outcome.verdict.summary());
    println!("history: {}", outcome.history.display());
    println!("report:  {}", outcome.report.display());
    println!("snapshots installed: {}", outcome.snapshots_installed);
    for unmet in &outcome.unmet {
        println!("expectation not met: {unmet}");
    }
    println!("{}", outcome.verdict.line());
    Ok(if !outcome.verdict.ok() {
        ExitCode::from(1)
    } else if !outcome.unmet.is_empty() {
        ExitCode::from(3)
    } else {
        ExitCode::SUCCESS
    })
}

fn check(history: &std::path::Path) -> ExitCode {
    match convoy_chaos::check::history::read_history(history) {
        Ok(records) => {
            let verdict = convoy_chaos::check::check(&records);
            println!("{}", verdict.summary());
            println!("{}", verdict.line());
            if verdict.ok() { ExitCode::SUCCESS } else { ExitCode::from(1) }
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

fn usage_error(subcommand: &str, message: String) -> ! {
    let mut cmd = Cli::command();
    let cmd = cmd.find_subcommand_mut(subcommand).cloned().unwrap_or_else(Cli::command);
    let mut cmd = cmd.bin_name(format!("convoy-chaos {subcommand}"));
    cmd.error(clap::error::ErrorKind::ValueValidation, message).exit()
}

fn run_load(args: LoadArgs) -> ExitCode {
    let threads = args.window.threads;
    let cfg = match LoadConfig::from_args(args) {
        Ok(cfg) => cfg,
        Err(message) => usage_error("load", message),
    };
    let json_path = cfg.json.clone();
    report_run(json_path, threads, load::run(cfg))
}

fn run_peer(args: PeerArgs) -> ExitCode {
    let threads = args.window.threads;
    let cfg = match PeerConfig::from_args(args) {
        Ok(cfg) => cfg,
        Err(message) => usage_error("peer", message),
    };
    let json_path = cfg.json.clone();
    report_run(json_path, threads, peer::run(cfg))
}

/// Runs a load run to its end, then prints its table and writes its JSON.
fn report_run(
    json_path: Option<PathBuf>,
    threads: Option<NonZeroUsize>,
    run: impl std::future::Future<Output = Result<LoadReport, LoadError>>,
) -> ExitCode {
    let runtime = match new_runtime(threads) {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    let result = runtime.block_on(run);
    // In-flight sends and connection tasks are not waited for.
    runtime.shutdown_timeout(std::time::Duration::from_millis(500));
    let report = match result {
        Ok(report) => report,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    println!("{}", report.table());
    if let Some(path) = json_path
        && let Err(e) = report.write_json(&path)
    {
        eprintln!("error: {e}");
        return ExitCode::from(1);
    }
    ExitCode::SUCCESS
}
