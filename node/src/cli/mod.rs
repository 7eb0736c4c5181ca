//! The `convoy` command line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "convoy",
    version,
    about = "Convoy: a clustered messaging runtime for logistics customer service",
    long_about = "Convoy runs exception groups, user inboxes and support tickets as supervised actors whose \
state lives in replicated, fsynced Raft logs. Clients speak protocol v1 (JSON over WebSocket at /v1/ws) to any node.",
    after_help = "Examples:\n  convoy dev                                  # one node, embedded defaults, ./convoy-data\n  \
convoy start --config cluster-config/examples/local-3/n1.toml\n  \
convoy token --user u-17 --role driver --data-dir ./convoy-data\n"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run one node with embedded defaults: no configuration needed.
    ///
    /// Clients connect to ws://127.0.0.1:7600/v1/ws, admin HTTP is on 127.0.0.1:7601, data goes to
    /// ./convoy-data. The client secret comes from CONVOY_AUTH_SECRET, or is generated once and kept in
    /// the data directory so tokens survive restarts. Prints a ready-to-use token for a demo user.
    Dev(DevArgs),
    /// Run a node from a TOML configuration file (environment variables such as CONVOY_CLUSTER_SEEDS override its values).
    Start(StartArgs),
    /// Mint a client token (HS256 JWT) signed with the node's client secret.
    Token(TokenArgs),
    /// Look at and operate a cluster through a node's admin API.
    #[command(subcommand)]
    Cluster(ClusterCommand),
}

#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Print the cluster as tables: nodes (up or down, address, shards led and held, lag) and
    /// every shard's leader and replicas.
    #[command(
        after_help = "Example:\n  convoy cluster status --admin http://127.0.0.1:7601 \\\n      --config cluster-config/examples/local-3/n1.toml\n"
    )]
    Status(AdminArgs),
    /// Move every shard replica off NODE; it leaves the cluster once it holds none (then stop it).
    Drain {
        /// The node's name (node.id).
        node: String,
        /// Wait, showing progress, until the node has left.
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Forget NODE for good (it is dead and will not come back): its replicas are re-placed.
    Remove {
        /// The node's name (node.id).
        node: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

/// How to reach a node's admin API and prove to it you are an admin.
#[derive(Debug, Args)]
pub struct AdminArgs {
    /// The node's admin URL (any node of the cluster).
    #[arg(long, default_value = "http://127.0.0.1:7601")]
    pub admin: String,
    /// An admin token; without one, a short-lived token is minted from the client secret
    /// (CONVOY_AUTH_SECRET, auth.secret of --config, or the secret in --data-dir).
    #[arg(long, env = "CONVOY_ADMIN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Configuration file whose auth.secret mints the token.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Data directory of a `convoy dev` node whose generated secret mints the token.
    #[arg(long, default_value = "./convoy-data")]
    pub data_dir: PathBuf,
    /// Print the raw JSON instead of tables.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct DevArgs {
    /// Where the node keeps its data.
    #[arg(long, default_value = "./convoy-data")]
    pub data_dir: PathBuf,
    /// WebSocket listener for clients.
    #[arg(long, default_value = "127.0.0.1:7600")]
    pub client_addr: SocketAddr,
    /// Admin HTTP listener (/healthz, /readyz, /metrics).
    #[arg(long, default_value = "127.0.0.1:7601")]
    pub admin_addr: SocketAddr,
}

#[derive(Debug, Args)]
pub struct StartArgs {
    /// The node's configuration file (see cluster-config/examples/).
    #[arg(long, short)]
    pub config: PathBuf,
    /// Overrides node.data_dir from the file.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
#[command(after_help = "The secret is taken from, in order: CONVOY_AUTH_SECRET, auth.secret of --config, the secret \
`convoy dev` generated in --data-dir.\n\nExample:\n  convoy token --user a-5 --role agent --skill fee --skill damage --capacity 8 --ttl 8h\n")]
pub struct TokenArgs {
    /// The user id (the token's `sub`): 1..64 of A-Z a-z 0-9 _ . : -
    #[arg(long)]
    pub user: String,
    /// A role: customer, driver, agent, dispatcher, station or admin. Repeat for several.
    #[arg(long = "role", required = true)]
    pub roles: Vec<String>,
    /// An agent's skill group (fee, damage, delivery, quality, ...). Repeat for several.
    #[arg(long = "skill")]
    pub skills: Vec<String>,
    /// Customer tier: vip or standard.
    #[arg(long)]
    pub tier: Option<String>,
    /// Tickets this agent works at once (1..100); tickets.agent_capacity when left out.
    #[arg(long)]
    pub capacity: Option<u32>,
    /// How long the token is valid (e.g. 30m, 8h, 7d).
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    pub ttl: Duration,
    /// Configuration file whose auth.secret signs the token.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Data directory of a `convoy dev` node whose generated secret signs the token.
    #[arg(long, default_value = "./convoy-data")]
    pub data_dir: PathBuf,
}
