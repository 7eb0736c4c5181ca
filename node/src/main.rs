use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use convoy_config::Config;
use convoy_node::admin::ClusterStatus;
use convoy_node::cli::{AdminArgs, Cli, ClusterCommand, Command, TokenArgs};
use convoy_node::gateway::auth::{Holder, TokenKeys};
use convoy_node::node::{self, SecretPolicy};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // TLS uses aws-lc-rs whatever else the build enables: rustls picks no default provider
    // when two are compiled in, and would panic at the first handshake.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("building the tokio runtime");
    let result = runtime.block_on(run(cli));
    // A node that gave up on a stuck storage leaves tasks waiting on it: do not wait for them.
    runtime.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Dev(args) => {
            let mut cfg = Config::load(None).context("loading configuration")?;
            cfg.node.data_dir = args.data_dir;
            cfg.client.listen = args.client_addr;
            cfg.admin.listen = args.admin_addr;
            cfg.validate()?;
            let telemetry = convoy_node::telemetry::init(&cfg.telemetry, &cfg.node.id)?;
            let secret = node::client_secret(&cfg, SecretPolicy::GenerateInDataDir)?;
            let keys = TokenKeys::new(secret.as_bytes(), cfg.auth.max_token_ttl);
            let token = keys.mint(
                &Holder { sub: "demo", roles: &["dispatcher".into()], ..Holder::default() },
                Duration::from_secs(24 * 3600),
            );
            println!("convoy dev: data in {}", cfg.node.data_dir.display());
            println!("  clients: ws://{}/v1/ws", cfg.client.listen);
            println!("  admin:   http://{} (/healthz /readyz /metrics)", cfg.admin.listen);
            println!("  token for user \"demo\" (dispatcher, 24h): {token}");
            println!(
                "  more tokens: convoy token --user u-17 --role driver --data-dir {}",
                cfg.node.data_dir.display()
            );
            let metrics = convoy_node::telemetry::init_metrics();
            let result = node::run(cfg, SecretPolicy::GenerateInDataDir, metrics).await;
            telemetry.shutdown().await;
            Ok(result?)
        }
        Command::Start(args) => {
            let mut cfg =
                Config::load(Some(&args.config)).with_context(|| format!("loading {}", args.config.display()))?;
            if let Some(dir) = args.data_dir {
                cfg.node.data_dir = dir;
                cfg.validate()?;
            }
            let telemetry = convoy_node::telemetry::init(&cfg.telemetry, &cfg.node.id)?;
            let metrics = convoy_node::telemetry::init_metrics();
            let result = node::run(cfg, SecretPolicy::Required, metrics).await;
            telemetry.shutdown().await;
            Ok(result?)
        }
        Command::Token(args) => token(args),
        Command::Cluster(ClusterCommand::Status(args)) => cluster_status(args).await,
        Command::Cluster(ClusterCommand::Drain { node, wait, admin }) => drain(&node, wait, admin).await,
        Command::Cluster(ClusterCommand::Remove { node, admin }) => {
            admin_call(&admin, reqwest::Method::POST, &format!("/v1/cluster/nodes/{node}/remove")).await?;
            println!("{node} removed: its replicas are being placed on the other nodes (see `convoy cluster status`)");
            Ok(())
        }
    }
}

/// Token keys from the client secret: the environment, a config file, or a dev data dir.
fn secret_keys(config: Option<&std::path::Path>, data_dir: &std::path::Path) -> anyhow::Result<(TokenKeys, Config)> {
    let mut cfg = Config::load(config).context("loading configuration")?;
    if config.is_none() {
        cfg.node.data_dir = data_dir.to_path_buf();
    }
    let secret = node::client_secret(&cfg, SecretPolicy::Required).with_context(|| {
        format!(
            "no client secret found: set CONVOY_AUTH_SECRET, pass --config with auth.secret, or --data-dir of a `convoy dev` node (looked in {})",
            node::secret_file(&cfg.node.data_dir).display()
        )
    })?;
    Ok((TokenKeys::new(secret.as_bytes(), cfg.auth.max_token_ttl), cfg))
}

/// Calls the admin API with an admin token (given, or minted from the client secret).
async fn admin_call(args: &AdminArgs, method: reqwest::Method, path: &str) -> anyhow::Result<String> {
    let token = match &args.token {
        Some(t) => t.clone(),
        None => {
            let (keys, _) = secret_keys(args.config.as_deref(), &args.data_dir)?;
            keys.mint(
                &Holder { sub: "convoy-cli", roles: &["admin".into()], ..Holder::default() },
                Duration::from_secs(60),
            )
        }
    };
    let url = format!("{}{path}", args.admin.trim_end_matches('/'));
    let resp = reqwest::Client::new()
        .request(method, &url)
        .bearer_auth(token)
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .with_context(|| format!("cannot reach {url}: is a node's admin listener there?"))?;
    let status = resp.status();
    let body = resp.text().await.context("reading the answer")?;
    if !status.is_success() {
        anyhow::bail!("{url} answered {status}: {body}");
    }
    Ok(body)
}

async fn drain(node: &str, wait: bool, args: AdminArgs) -> anyhow::Result<()> {
    admin_call(&args, reqwest::Method::POST, &format!("/v1/cluster/nodes/{node}/drain")).await?;
    println!("{node} is draining: its replicas move to the other nodes");
    if !wait {
        println!("watch it with `convoy cluster status`; stop {node} once it is no longer listed");
        return Ok(());
    }
    let bar = indicatif::ProgressBar::new_spinner();
    bar.enable_steady_tick(Duration::from_millis(200));
    loop {
        let s: ClusterStatus = serde_json::from_str(&admin_call(&args, reqwest::Method::GET, "/v1/cluster").await?)?;
        match s.members.iter().find(|m| m.name == node) {
            None => break,
            Some(m) => bar.set_message(format!("{node} still holds {} replicas", m.holds)),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // The bar is hidden when stdout is not a terminal; the outcome is always printed.
    bar.finish_and_clear();
    println!("{node} has left the cluster: you can stop it");
    Ok(())
}

async fn cluster_status(args: AdminArgs) -> anyhow::Result<()> {
    let body = admin_call(&args, reqwest::Method::GET, "/v1/cluster").await?;
    if args.json {
        println!("{body}");
        return Ok(());
    }
    let s: ClusterStatus =
        serde_json::from_str(&body).with_context(|| format!("{} answered something else: {body}", args.admin))?;
    println!(
        "cluster {} as seen by {}: {} shards, replication factor {}",
        s.cluster_id, s.node, s.shards, s.replication_factor
    );
    let mut nodes = comfy_table::Table::new();
    nodes.load_style(comfy_table::presets::UTF8_FULL_CONDENSED);
    nodes.set_header([
        "node",
        "state",
        "status",
        "cluster address",
        "client URL",
        "shards led",
        "shards held",
        "lag",
        "metadata",
    ]);
    for m in &s.members {
        let state = if m.up { "up" } else { "DOWN" };
        nodes.add_row([
            m.name.clone(),
            state.into(),
            m.status.clone(),
            m.cluster_addr.clone(),
            m.client_url.clone(),
            m.leads.to_string(),
            m.holds.to_string(),
            m.lag.map_or_else(|| "unknown".into(), |l| l.to_string()),
            if m.meta_leader { "leader".into() } else { String::new() },
        ]);
    }
    println!("{nodes}");
    let mut groups = comfy_table::Table::new();
    groups.load_style(comfy_table::presets::UTF8_FULL_CONDENSED);
    groups.set_header(["group", "leader", "term", "voters", "learners", "placed on", "applied"]);
    for g in &s.groups {
        groups.add_row([
            g.group.clone(),
            g.leader.clone().unwrap_or_else(|| "NONE".into()),
            g.term.to_string(),
            g.voters.join(" "),
            g.learners.join(" "),
            g.placed.join(" "),
            g.applied.to_string(),
        ]);
    }
    println!("{groups}");
    if s.unsettled.is_empty() {
        println!("settled: every shard has a leader and its placed replicas, leaders are spread");
    } else {
        println!("settling:");
        for reason in &s.unsettled {
            println!("  - {reason}");
        }
    }
    Ok(())
}

fn token(args: TokenArgs) -> anyhow::Result<()> {
    let (keys, cfg) = secret_keys(args.config.as_deref(), &args.data_dir)?;
    if args.ttl > cfg.auth.max_token_ttl {
        anyhow::bail!(
            "--ttl {} exceeds auth.max_token_ttl ({})",
            humantime::format_duration(args.ttl),
            humantime::format_duration(cfg.auth.max_token_ttl)
        );
    }
    let holder = Holder {
        sub: &args.user,
        roles: &args.roles,
        skills: &args.skills,
        tier: args.tier.as_deref(),
        capacity: args.capacity,
    };
    let token = keys.mint(&holder, args.ttl);
    keys.verify(&token).map_err(|r| anyhow::anyhow!("{}", r.message))?;
    println!("{token}");
    Ok(())
}
