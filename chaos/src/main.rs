use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use convoy_chaos::load::{self, LoadArgs, LoadConfig};

const AFTER_HELP: &str = "\
Examples:
  # Drive the local node with the default load for 30 s
  convoy-chaos load --secret dev-secret

  # Same secret from the environment, 1000 connections, 4 sends in flight each, JSON results
  CONVOY_AUTH_SECRET=dev-secret convoy-chaos load -c 1000 -g 250 --inflight 4 --json out.json

  # Memory per idle connection of a node
  convoy-chaos load --secret dev-secret --idle -c 10000 --server-pid $NODE_PID

Run `convoy-chaos load --help` for every option. Logs go to stderr (RUST_LOG=debug for more).";

/// Client-side test harness for Convoy clusters: protocol client, load generator.
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
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    match cli.command {
        Command::Load(args) => run_load(args),
    }
}

fn usage_error(subcommand: &str, message: String) -> ! {
    let mut cmd = Cli::command();
    let cmd = cmd.find_subcommand_mut(subcommand).cloned().unwrap_or_else(Cli::command);
    let mut cmd = cmd.bin_name(format!("convoy-chaos {subcommand}"));
    cmd.error(clap::error::ErrorKind::ValueValidation, message).exit()
}

fn run_load(args: LoadArgs) -> ExitCode {
    let cfg = match LoadConfig::from_args(args) {
        Ok(cfg) => cfg,
        Err(message) => usage_error("load", message),
    };
    let json_path = cfg.json.clone();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(load::run(cfg));
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
