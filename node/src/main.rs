use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use convoy_config::Config;
use convoy_node::cli::{Cli, Command, TokenArgs};
use convoy_node::gateway::auth::TokenKeys;
use convoy_node::node::{self, SecretPolicy};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("building the tokio runtime");
    match runtime.block_on(run(cli)) {
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
            convoy_node::telemetry::init_logs(&cfg.telemetry);
            let secret = node::client_secret(&cfg, SecretPolicy::GenerateInDataDir)?;
            let keys = TokenKeys::new(secret.as_bytes(), cfg.auth.max_token_ttl);
            let token = keys.mint("demo", &["dispatcher".into()], &[], None, Duration::from_secs(24 * 3600));
            println!("convoy dev: data in {}", cfg.node.data_dir.display());
            println!("  clients: ws://{}/v1/ws", cfg.client.listen);
            println!("  admin:   http://{} (/healthz /readyz /metrics)", cfg.admin.listen);
            println!("  token for user \"demo\" (dispatcher, 24h): {token}");
            println!(
                "  more tokens: convoy token --user u-17 --role driver --data-dir {}",
                cfg.node.data_dir.display()
            );
            let metrics = convoy_node::telemetry::init_metrics();
            node::run(cfg, SecretPolicy::GenerateInDataDir, metrics).await?;
            Ok(())
        }
        Command::Start(args) => {
            let mut cfg =
                Config::load(Some(&args.config)).with_context(|| format!("loading {}", args.config.display()))?;
            if let Some(dir) = args.data_dir {
                cfg.node.data_dir = dir;
                cfg.validate()?;
            }
            convoy_node::telemetry::init_logs(&cfg.telemetry);
            let metrics = convoy_node::telemetry::init_metrics();
            node::run(cfg, SecretPolicy::Required, metrics).await?;
            Ok(())
        }
        Command::Token(args) => token(args),
    }
}

fn token(args: TokenArgs) -> anyhow::Result<()> {
    let mut cfg = Config::load(args.config.as_deref()).context("loading configuration")?;
    if args.config.is_none() {
        cfg.node.data_dir = args.data_dir.clone();
    }
    let secret = node::client_secret(&cfg, SecretPolicy::Required).with_context(|| {
        format!(
            "no client secret found: set CONVOY_AUTH_SECRET, pass --config with auth.secret, or --data-dir of a `convoy dev` node (looked in {})",
            node::secret_file(&cfg.node.data_dir).display()
        )
    })?;
    let keys = TokenKeys::new(secret.as_bytes(), cfg.auth.max_token_ttl);
    if args.ttl > cfg.auth.max_token_ttl {
        anyhow::bail!(
            "--ttl {} exceeds auth.max_token_ttl ({})",
            humantime::format_duration(args.ttl),
            humantime::format_duration(cfg.auth.max_token_ttl)
        );
    }
    let token = keys.mint(&args.user, &args.roles, &args.skills, args.tier.as_deref(), args.ttl);
    keys.verify(&token).map_err(|r| anyhow::anyhow!("{}", r.message))?;
    println!("{token}");
    Ok(())
}
