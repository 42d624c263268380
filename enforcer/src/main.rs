//! `enforcer`: serve, check-config, hash-key, check-budgets, report, keys, audit.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand, ValueEnum};
use enforcer::config::Config;
use ledger::store::{Ledger, Period};

// mimalloc for the small buffers the proxy allocates and frees on every request (headers, JSON,
// tokenizer scratch; glibc malloc spent ~15% of the enforcer's CPU at 2,700 req/s), and a mapping
// of its own for each block of 256 KiB or more, such as a large body (enforcer::alloc).
#[global_allocator]
static GLOBAL: enforcer::alloc::Split = enforcer::alloc::Split;

/// llmwarden enforcer: an LLM SDK base URL with hard budgets.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Config file (serve).
    #[arg(long, global = true, default_value = "enforcer.toml")]
    config: PathBuf,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum PeriodArg {
    Day,
    Month,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Validate the config and print the effective config (secrets elided).
    CheckConfig,
    /// Read a key on stdin and print its lowercase hex sha256 for [[keys]].
    HashKey,
    /// Validate the budgets stored in Redis (`llmw:budgets`): prints every malformed entry and
    /// exits 1 if there is one (the enforcer refuses calls while one exists).
    CheckBudgets,
    /// Print the ledger of the current period.
    Report {
        /// Only this tenant.
        #[arg(long)]
        tenant: Option<String>,
        /// day or month.
        #[arg(long, value_enum, default_value = "month")]
        period: PeriodArg,
        /// One JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Manage runtime proxy keys in Redis: create, list, get, revoke, rotate.
    Keys {
        #[command(subcommand)]
        cmd: enforcer::admin_keys::KeysCmd,
    },
    /// Stream the audit records of a time range in time order (docs/audit.md).
    Audit {
        /// First commit time included: RFC 3339, a UTC day (2026-12-04) or unix ms.
        #[arg(long)]
        since: String,
        /// First commit time excluded (same forms).
        #[arg(long)]
        until: String,
        /// Only this tenant.
        #[arg(long)]
        tenant: Option<String>,
        /// Only this path: enforcer, observer or unmetered.
        #[arg(long)]
        path: Option<String>,
        /// jsonl or csv.
        #[arg(long, value_enum, default_value = "jsonl")]
        format: FormatArg,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum FormatArg {
    Jsonl,
    Csv,
}

/// Logs go to stderr in batches from a dedicated thread (`enforcer::logs`), so a slow reader (a
/// full pipe to the journal) never blocks a proxy worker and a line costs no wake-up; lines
/// beyond the buffer are dropped and counted rather than stall calls. The returned guard writes
/// what is buffered when dropped at exit.
fn init_logs(format: &str) -> anyhow::Result<enforcer::logs::LogGuard> {
    let filter = tracing_subscriber::EnvFilter::try_from_env("ENFORCER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let (writer, guard) = enforcer::logs::batched_stderr().context("starting the log writer")?;
    let direct = writer.clone();
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    if format == "text" {
        b.init();
    } else {
        b.json().flatten_event(true).with_current_span(false).init();
        // The per-call line builds the formatter's JSON itself (enforcer::call::CallLog).
        enforcer::logs::enable_direct(&direct);
    }
    Ok(guard)
}

/// Runs `f` on a one-thread runtime with the ledger the config at `path` names (only
/// `redis_url` and its credentials are needed): the commands that read or write Redis.
fn with_ledger<F, Fut>(path: &Path, timeout: Duration, f: F) -> anyhow::Result<()>
where
    F: FnOnce(Ledger) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let cfg = Config::load_for_reading(path)
        .with_context(|| format!("invalid config {}", path.display()))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let lcfg = cfg.ledger_config(timeout)?;
        let ledger = Ledger::connect_with(&cfg.redis_url, lcfg)
            .await
            .with_context(|| format!("connecting to {}", cfg.redis_url))?;
        f(ledger).await
    })
}

fn main() -> anyhow::Result<()> {
    // Before any big block: each is mapped alone and unmapped when freed (enforcer::alloc).
    enforcer::alloc::map_big_blocks_alone();
    let cli = Cli::parse();
    match cli.cmd {
        Some(Cmd::HashKey) => {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .context("reading the key from stdin")?;
            let key = s.trim_end_matches(['\n', '\r']);
            if key.is_empty() {
                bail!("no key on stdin: echo -n \"$KEY\" | enforcer hash-key");
            }
            println!("{}", enforcer::auth::hash_key(key));
            Ok(())
        }
        Some(Cmd::CheckConfig) => {
            let cfg = Config::load(&cli.config)
                .with_context(|| format!("invalid config {}", cli.config.display()))?;
            print!("{}", cfg.effective_toml());
            eprintln!("config {} is valid", cli.config.display());
            Ok(())
        }
        Some(Cmd::CheckBudgets) => {
            with_ledger(&cli.config, Duration::from_secs(2), |ledger| async move {
                let problems = ledger.check_budgets().await?;
                if problems.is_empty() {
                    println!("budgets: every entry of llmw:budgets is valid");
                    return Ok(());
                }
                for p in &problems {
                    println!("{}: {}", p.field, p.problem);
                }
                bail!(
                    "{} malformed budget entr{}",
                    problems.len(),
                    if problems.len() == 1 { "y" } else { "ies" }
                )
            })
        }
        Some(Cmd::Keys { cmd }) => {
            with_ledger(&cli.config, Duration::from_secs(2), |ledger| async move {
                enforcer::admin_keys::run_cli(&ledger, cmd).await
            })
        }
        Some(Cmd::Report {
            tenant,
            period,
            json,
        }) => {
            let period = match period {
                PeriodArg::Day => Period::Day,
                PeriodArg::Month => Period::Month,
            };
            with_ledger(&cli.config, Duration::from_secs(2), |ledger| async move {
                let r =
                    enforcer::report::build(&ledger, tenant.as_deref(), period, chrono::Utc::now())
                        .await?;
                if json {
                    println!("{r}");
                } else {
                    print!("{}", enforcer::report::text(&r));
                }
                Ok(())
            })
        }
        Some(Cmd::Audit {
            since,
            until,
            tenant,
            path,
            format,
        }) => {
            let q = ledger::store::AuditQuery {
                since: enforcer::audit_export::parse_time(&since)
                    .map_err(|e| anyhow::anyhow!("--since: {e}"))?,
                until: enforcer::audit_export::parse_time(&until)
                    .map_err(|e| anyhow::anyhow!("--until: {e}"))?,
                tenant,
                path,
            };
            if let Some(p) = &q.path {
                enforcer::audit_export::check_path(p)
                    .map_err(|e| anyhow::anyhow!("--path: {e}"))?;
            }
            let format = match format {
                FormatArg::Jsonl => enforcer::audit_export::Format::Jsonl,
                FormatArg::Csv => enforcer::audit_export::Format::Csv,
            };
            with_ledger(&cli.config, Duration::from_secs(5), |ledger| async move {
                let mut out = std::io::BufWriter::new(std::io::stdout().lock());
                let n = enforcer::audit_export::export(&ledger, q, format, &mut out).await?;
                eprintln!("{n} audit records");
                Ok(())
            })
        }
        None => {
            let cfg = Config::load(&cli.config)
                .with_context(|| format!("invalid config {}", cli.config.display()))?;
            let _logs = init_logs(&cfg.log_format)?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                let app = enforcer::App::build(cfg).await?;
                enforcer::server::run(app).await?;
                Ok(())
            })
        }
    }
}
