//! `tollgate`: a caching gateway in front of paid third-party HTTP APIs.
//!
//! This binary only reads config, wires the libraries together and speaks HTTP; the logic
//! lives in `cache-core` and `upstream-client`.

mod auth;
mod config;
mod db;
mod error;
mod gateway;
mod http;
mod keymemo;
mod keys;
mod limits;
mod metrics;
mod response;
mod serve;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::Config;

#[derive(Parser)]
#[command(
    name = "tollgate",
    version,
    about = "Caching gateway for paid HTTP APIs"
)]
struct Cli {
    /// Config file (default: $TOLLGATE_CONFIG, else ./tollgate.toml).
    #[arg(long, global = true, env = "TOLLGATE_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Serve {
        /// Listen address, overriding server.listen (port 0 picks a free port).
        #[arg(long)]
        listen: Option<SocketAddr>,
    },
    /// Apply database migrations to storage.database_url.
    Migrate,
    /// Validate the config and print a summary.
    CheckConfig,
    /// Cache maintenance.
    Cache {
        #[command(subcommand)]
        command: CacheCommand,
    },
    /// API keys.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Issue a key; its plaintext is printed once and never stored.
    Create {
        #[command(flatten)]
        options: keys::CreateKey,
        /// Print JSON: {"id", "key", "name", ...}.
        #[arg(long)]
        json: bool,
    },
    /// List keys (never their plaintext).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Revoke a key by id; running gateways stop accepting it within seconds.
    Revoke {
        id: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum CacheCommand {
    /// Remove cached entries (all of them, or those of one upstream / route).
    Purge {
        #[arg(long)]
        upstream: Option<String>,
        /// Route path as configured, e.g. /properties or /listings/*.
        #[arg(long)]
        route: Option<String>,
        /// One cache key (32 hex characters).
        #[arg(long)]
        cache_key: Option<String>,
        /// Base URL of the running gateway's admin API (default: http://{server.listen}).
        #[arg(long)]
        url: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tollgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn load_config(path: Option<&std::path::Path>) -> anyhow::Result<Config> {
    Config::load(path).map_err(|e| anyhow::anyhow!("invalid config\n{e}"))
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve { listen } => {
            let mut cfg = load_config(cli.config.as_deref())?;
            if let Some(addr) = listen {
                cfg.server.listen = addr;
            }
            serve::serve(cfg)
        }
        Command::Migrate => {
            let cfg = load_config(cli.config.as_deref())?;
            let db = db::Database::parse(&cfg.storage.database_url)?;
            let applied = db.migrate()?;
            if applied.is_empty() {
                println!("{}: up to date", db.backend());
            } else {
                for m in &applied {
                    println!("applied {m}");
                }
            }
            Ok(())
        }
        Command::CheckConfig => {
            let cfg = load_config(cli.config.as_deref())?;
            println!("{}: ok", cfg.source.display());
            println!("  listen {}", cfg.server.listen);
            println!(
                "  database {}",
                db::Database::parse(&cfg.storage.database_url)?.backend()
            );
            for u in &cfg.upstreams {
                println!(
                    "  upstream {} -> {} ({} routes)",
                    u.name,
                    u.base_url,
                    u.routes.len()
                );
                for r in &u.routes {
                    println!(
                        "    {} {} ttl={:?} cost={}",
                        r.methods.join(","),
                        r.path,
                        r.ttl,
                        r.cost
                    );
                }
            }
            Ok(())
        }
        Command::Keys { command } => {
            let cfg = load_config(cli.config.as_deref())?;
            keys_cli(&cfg, command)
        }
        Command::Cache {
            command:
                CacheCommand::Purge {
                    upstream,
                    route,
                    cache_key,
                    url,
                },
        } => {
            let cfg = load_config(cli.config.as_deref())?;
            let req = http::PurgeRequest {
                upstream,
                route,
                cache_key,
            };
            serve::purge_cli(&cfg, req, url.as_deref())
        }
    }
}

fn keys_cli(cfg: &Config, command: KeysCommand) -> anyhow::Result<()> {
    let database = db::Database::parse(&cfg.storage.database_url)?;
    match &database {
        db::Database::Sqlite { .. } => {
            database.migrate()?;
        }
        db::Database::Postgres { .. } => {
            let pending = database.pending()?;
            if !pending.is_empty() {
                anyhow::bail!("the database has pending migrations: run `tollgate migrate` first");
            }
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let store = keys::open_store(&cfg.storage.database_url, 1)?;
        let now = keys::now_millis();
        match command {
            KeysCommand::Create { options, json } => {
                let new = options
                    .to_new_key(now)
                    .map_err(|e| anyhow::anyhow!("invalid key options: {e}"))?;
                let (record, key) = store
                    .create(new, now)
                    .await
                    .map_err(|e| anyhow::anyhow!("creating the key: {e}"))?;
                let created = keys::Created::new(&record, &key, now);
                if json {
                    println!("{}", serde_json::to_string(&created)?);
                } else {
                    println!("created key {} ({})", created.info.id, created.info.name);
                    println!("  {}", created.key);
                    println!("store it now: it is shown only this once");
                }
            }
            KeysCommand::List { json } => {
                let mut records = store
                    .list()
                    .await
                    .map_err(|e| anyhow::anyhow!("listing keys: {e}"))?;
                records.sort_by_key(|r| r.created_at);
                let infos: Vec<_> = records.iter().map(|r| r.info(now)).collect();
                if json {
                    println!("{}", serde_json::to_string(&infos)?);
                } else {
                    for i in &infos {
                        println!(
                            "{}  {:<8}  {}",
                            i.id,
                            format!("{:?}", i.status).to_lowercase(),
                            i.name
                        );
                    }
                }
            }
            KeysCommand::Revoke { id, json } => {
                let key_id = keystore::KeyId::parse(&id)
                    .map_err(|e| anyhow::anyhow!("invalid key id {id:?}: {e}"))?;
                let revoked = store
                    .revoke(&key_id, now)
                    .await
                    .map_err(|e| anyhow::anyhow!("revoking {id}: {e}"))?;
                if !revoked {
                    anyhow::bail!("no active key {id}");
                }
                if json {
                    println!("{}", serde_json::json!({ "id": id, "revoked": true }));
                } else {
                    println!("revoked {id}");
                }
            }
        }
        Ok(())
    })
}
