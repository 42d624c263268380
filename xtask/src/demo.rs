//! `cargo xtask demo`: both paths and one ledger, live, on this machine.
//!
//! Starts redis-server (or uses REDIS_URL), the simulated provider over TLS, the enforcer and (as root)
//! the observer, then drives a scripted workload with the official Python SDK:
//! "checkout-assistant" goes through the enforcer on a small budget (some calls are denied) and
//! "batch-summarizer" calls the provider directly (bypass, seen only by the observer), and
//! "code-agent" calls it with a rustls client no probe decodes (an unmetered connection).

use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::Value;

use crate::command::{self, cargo, is_root, root, step};

/// Options of `cargo xtask demo`.
#[derive(Args)]
pub struct DemoArgs {
    /// End after N seconds instead of running until Ctrl-C (for tests and CI).
    #[arg(long)]
    duration: Option<u64>,
    /// Use the real provider URLs and keys (OPENAI_API_KEY) instead of the simulated provider.
    #[arg(long)]
    real: bool,
    /// Run without the observer even as root (bypass spend then stays invisible, which is the point
    /// the observer makes).
    #[arg(long)]
    no_observer: bool,
    /// Fail unless the run shows what the demo is for (denials, no leftover holds, bypass spend).
    #[arg(long)]
    check: bool,
    /// Calls each service makes.
    #[arg(long, default_value_t = 24)]
    calls: u32,
    /// Set by `cargo xtask test`, whose build step already built these binaries with the tests'
    /// feature resolution: the demo's narrower `cargo build` resolves dependency features
    /// differently and would compile ~80 crates a second time (0.7 GiB, on a disk CI fills).
    #[arg(skip)]
    prebuilt: bool,
}

/// The binaries the demo starts, from `target/debug`.
const DEMO_BINARIES: &[&str] = &["enforcer", "observer", "mock-provider", "rustls-client"];

/// The proxy key the demo's checkout-assistant uses (not a secret: it exists only in this demo).
const DEMO_PROXY_KEY: &str = "lw-demo-checkout-key";
/// The budget of the checkout-assistant feature, small enough that some calls are denied.
const DEMO_FEATURE_BUDGET_USD: &str = "0.02";

/// Kills its process on drop, saying which.
struct Proc(Child, &'static str);
impl Drop for Proc {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            eprintln!("    stopping {}", self.1);
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(name: &'static str, cmd: &mut Command) -> Result<Proc> {
    Ok(Proc(
        cmd.spawn()
            .with_context(|| format!("cannot start {name}"))?,
        name,
    ))
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn wait_log(path: &Path, needle: &str, what: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(90);
    while !std::fs::read_to_string(path).is_ok_and(|s| s.contains(needle)) {
        if Instant::now() > deadline {
            bail!(
                "{what} did not log {needle:?} within 90 s; see {}",
                path.display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

fn wait_port(port: u16, what: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("{what} did not start listening on 127.0.0.1:{port}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

impl DemoArgs {
    /// The non-interactive run `cargo xtask test` makes: short, checked.
    pub fn checked_run() -> DemoArgs {
        DemoArgs {
            duration: Some(30),
            real: false,
            no_observer: false,
            check: true,
            calls: 12,
            prebuilt: true,
        }
    }
}

pub fn run(args: &DemoArgs) -> Result<()> {
    if args.real && std::env::var_os("OPENAI_API_KEY").is_none() {
        bail!(
            "--real calls api.openai.com with your key: set OPENAI_API_KEY (it is never printed)"
        );
    }
    crate::setup::run_for(crate::setup::Needs::DEMO)?;
    let bin = target_dir().join("debug");
    if args.prebuilt {
        for b in DEMO_BINARIES {
            if !bin.join(b).is_file() {
                bail!(
                    "{} is missing: `cargo xtask test` builds it before the demo",
                    bin.join(b).display()
                );
            }
        }
    } else {
        step("building enforcer, observer and the simulated provider");
        let packages: &[&str] = if args.no_observer {
            &["-p", "enforcer", "-p", "llmwarden-tests"]
        } else {
            &["-p", "enforcer", "-p", "observer", "-p", "llmwarden-tests"]
        };
        command::run(cargo().args(["build", "--locked", "--bins"]).args(packages))?;
    }
    let work = tempdir()?;
    step(&format!("demo state in {}", work.display()));

    // Redis: the user's or our own.
    let mut _redis = None;
    let redis_url = if let Ok(url) = std::env::var("REDIS_URL") {
        step(&format!("using REDIS_URL={url}"));
        url
    } else {
        let port = free_port()?;
        step(&format!("starting redis-server on 127.0.0.1:{port}"));
        _redis = Some(spawn(
            "redis-server",
            Command::new("redis-server")
                .args([
                    "--port",
                    &port.to_string(),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ])
                .stdout(Stdio::null()),
        )?);
        wait_port(port, "redis-server")?;
        format!("redis://127.0.0.1:{port}")
    };

    // The provider: the simulated one over real TLS, or (--real) api.openai.com.
    let upstream = if args.real {
        step("--real: the enforcer and batch-summarizer call api.openai.com with OPENAI_API_KEY");
        Upstream::real()
    } else {
        Upstream::simulated(&bin, &work)?
    };
    // The enforcer.
    let (listen, admin) = (free_port()?, free_port()?);
    let key_hash = hash_key(&bin)?;
    let enforcer_toml = work.join("enforcer.toml");
    std::fs::write(
        &enforcer_toml,
        enforcer_config(listen, admin, &redis_url, &upstream, &work, &key_hash),
    )?;
    step(&format!(
        "starting the enforcer on 127.0.0.1:{listen} (admin 127.0.0.1:{admin})"
    ));
    let _enforcer = spawn(
        "enforcer",
        Command::new(bin.join("enforcer"))
            .arg("--config")
            .arg(&enforcer_toml)
            .env("WARDEN_ADMIN_TOKEN", "demo-admin-token")
            .env("DEMO_PROVIDER_KEY", "sk-demo-provider")
            .env("ENFORCER_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(work.join("enforcer.log"))?),
    )?;
    wait_port(listen, "enforcer")?;

    // The observer (root only).
    let observer = if args.no_observer {
        step("--no-observer: bypass calls will not be seen");
        None
    } else if is_root() {
        let metrics = free_port()?;
        let observer_toml = work.join("observer.toml");
        std::fs::write(
            &observer_toml,
            observer_config(&redis_url, metrics, &upstream, &work.join("observer-spool")),
        )?;
        step("starting the observer (eBPF uprobes on OpenSSL)");
        let o = spawn(
            "observer",
            Command::new(bin.join("observer"))
                .arg("--config")
                .arg(&observer_toml)
                .env("RUST_LOG", "info")
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(work.join("observer.log"))?),
        )?;
        wait_port(metrics, "observer")?;
        // Calls made before the probes are attached are not seen; wait for the initial scan.
        wait_log(&work.join("observer.log"), "observer ready", "observer")?;
        Some(o)
    } else {
        step(
            "NOT root: the observer needs root (CAP_SYS_ADMIN for uprobes); running the rest without it",
        );
        None
    };

    // The workload.
    let py = root().join(".venv/bin/python");
    let script = root().join("xtask/demo/workload.py");
    let events = Arc::new(Mutex::new(Vec::<Value>::new()));
    let calls = args.calls.to_string();
    let checkout = spawn(
        "checkout-assistant",
        Command::new(&py)
            .arg(&script)
            .args([
                "checkout",
                &format!("http://127.0.0.1:{listen}/proxy/openai"),
                DEMO_PROXY_KEY,
                &calls,
            ])
            .stdout(Stdio::piped()),
    )?;
    let batch = spawn(
        "batch-summarizer",
        Command::new(&py)
            .arg(&script)
            .args(["batch", &upstream.direct_url])
            .arg(upstream.ca.as_deref().unwrap_or(Path::new("-")))
            .arg(&calls)
            .stdout(Stdio::piped()),
    )?;
    let mut workers = vec![checkout, batch];
    // code-agent: a Rust client whose TLS is rustls, which no probe decodes; the observer can
    // only report its connection as unmetered (simulated provider only: it trusts the demo CA).
    let code_agent = upstream.ca.is_some();
    if let Some(ca) = &upstream.ca {
        let base = upstream.direct_url.trim_end_matches("/v1");
        workers.push(spawn(
            "code-agent",
            Command::new(bin.join("rustls-client"))
                .args([
                    "--url",
                    base,
                    "--calls",
                    "3",
                    "--prompt-bytes",
                    "2000",
                    "--ca",
                ])
                .arg(ca)
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )?);
    }
    // The python services print one JSON event per call (code-agent prints none).
    for w in &mut workers {
        let Some(out) = w.0.stdout.take() else {
            continue;
        };
        let ev = Arc::clone(&events);
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    ev.lock().expect("events lock").push(v);
                }
            }
        });
    }

    let stop = Arc::new(AtomicBool::new(false));
    let s = Arc::clone(&stop);
    ctrlc::set_handler(move || s.store(true, Ordering::SeqCst))
        .context("installing the Ctrl-C handler")?;
    let started = Instant::now();
    let deadline = args.duration.map(|d| started + Duration::from_secs(d));
    let mut footer: Option<String> = None;
    let mut screen = Screen::new(std::io::stdout().is_terminal());
    loop {
        let report = report(&bin, &enforcer_toml);
        if let Some(out) = screen.frame(
            &report,
            &events.lock().expect("events lock"),
            started.elapsed(),
            (observer.is_some(), code_agent),
            footer.as_deref(),
        ) {
            print!("{out}");
            let _ = std::io::stdout().flush();
        }
        let done = workers
            .iter_mut()
            .all(|w| matches!(w.0.try_wait(), Ok(Some(_))));
        if done && footer.is_none() {
            footer = Some(format!(
                "Workload finished. The stack keeps running{}. Point your own SDK at it:\n  \
                 OpenAI(base_url=\"http://127.0.0.1:{listen}/proxy/openai\", api_key=\"{DEMO_PROXY_KEY}\")\n  \
                 report: {} report --config {}",
                if deadline.is_some() {
                    " until --duration ends"
                } else {
                    " until Ctrl-C"
                },
                bin.join("enforcer").display(),
                enforcer_toml.display()
            ));
        }
        if stop.load(Ordering::SeqCst) || deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    let final_report = report(&bin, &enforcer_toml);
    let summary = summarize(&final_report, &events.lock().expect("events lock"));
    println!("DEMO SUMMARY {summary}");
    drop(workers);
    if args.check {
        check(&summary, observer.is_some(), code_agent)?;
        step(
            "demo check passed: denials through the enforcer, bypass spend and an unmetered connection seen by the observer",
        );
    }
    Ok(())
}

/// What a demo run must show (`--check`, run by `cargo xtask test`): the enforcer admitted some
/// checkout calls and denied others, no hold is left, and (with the observer) the direct calls
/// appear as bypass spend in the same ledger.
fn check(summary: &Value, observer_on: bool, code_agent: bool) -> Result<()> {
    let n = |k: &str| summary[k].as_i64().unwrap_or(0);
    let mut problems = Vec::new();
    if n("checkout_ok") == 0 {
        problems.push("no checkout-assistant call got through the enforcer".to_owned());
    }
    if n("denied") == 0 {
        problems.push(
            "the enforcer denied nothing: the small checkout budget never ran out".to_owned(),
        );
    }
    if n("held_nusd") != 0 {
        problems.push(format!(
            "{} nano-USD still held after the workload",
            n("held_nusd")
        ));
    }
    if n("batch_ok") == 0 {
        problems.push("no batch-summarizer call reached the provider".to_owned());
    }
    if observer_on && n("bypass_spend_nusd") <= 0 {
        problems.push("the observer recorded no bypass spend for the direct calls".to_owned());
    }
    if observer_on && code_agent && n("unmetered_connections") <= 0 {
        problems.push(
            "the observer reported no unmetered connection for code-agent's rustls client"
                .to_owned(),
        );
    }
    if problems.is_empty() {
        Ok(())
    } else {
        bail!("demo check failed: {}", problems.join("; "))
    }
}

/// Where cargo puts binaries (CARGO_TARGET_DIR when set).
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root().join("target"), PathBuf::from)
}

fn tempdir() -> Result<PathBuf> {
    let d = std::env::temp_dir().join(format!("llmwarden-demo-{}", std::process::id()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

fn read_mock_addr(out: ChildStdout) -> Result<String> {
    let mut line = String::new();
    BufReader::new(out).read_line(&mut line)?;
    let v: Value = serde_json::from_str(line.trim())
        .with_context(|| format!("mock-provider printed {line:?}"))?;
    for k in ["https", "addr", "tls_addr", "https_addr"] {
        if let Some(a) = v.get(k).and_then(Value::as_str) {
            return Ok(a
                .trim_start_matches("https://")
                .trim_end_matches('/')
                .to_owned());
        }
    }
    bail!("mock-provider did not print its TLS address: {line}")
}

fn hash_key(bin: &Path) -> Result<String> {
    let mut c = Command::new(bin.join("enforcer"))
        .arg("hash-key")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    c.stdin
        .take()
        .context("stdin")?
        .write_all(DEMO_PROXY_KEY.as_bytes())?;
    let out = c.wait_with_output()?;
    Ok(String::from_utf8(out.stdout)?.trim().to_owned())
}

/// Where the LLM calls go: the simulated provider (default) or the real one (`--real`).
struct Upstream {
    /// The provider's OpenAI base URL for direct (bypass) calls.
    direct_url: String,
    /// CA to trust for it (the simulated provider's throw-away CA), if any.
    ca: Option<PathBuf>,
    /// `host:port` the observer must treat as an OpenAI endpoint besides the built-in ones.
    extra_host: Option<String>,
    /// The simulated provider's process.
    _mock: Option<Proc>,
}

impl Upstream {
    fn real() -> Upstream {
        Upstream {
            direct_url: "https://api.openai.com/v1".to_owned(),
            ca: None,
            extra_host: None,
            _mock: None,
        }
    }

    fn simulated(bin: &Path, work: &Path) -> Result<Upstream> {
        step("starting the simulated provider (OpenAI API over TLS, 20 ms latency)");
        let ca = work.join("mock-ca.pem");
        let mut mock = spawn(
            "mock-provider",
            Command::new(bin.join("mock-provider"))
                .args([
                    "--listen",
                    "127.0.0.1:0",
                    "--tls",
                    "--latency-ms",
                    "20",
                    "--print-addr",
                ])
                // Long answers, so the checkout budget runs out within the demo.
                .args(["--output-tokens", "350"])
                .arg("--ca-out")
                .arg(&ca)
                .stdout(Stdio::piped()),
        )?;
        let addr = read_mock_addr(mock.0.stdout.take().context("mock stdout")?)?;
        Ok(Upstream {
            direct_url: format!("https://{addr}/v1"),
            ca: Some(ca),
            extra_host: Some(addr),
            _mock: Some(mock),
        })
    }
}

fn enforcer_config(
    listen: u16,
    admin: u16,
    redis: &str,
    upstream: &Upstream,
    work: &Path,
    key_hash: &str,
) -> String {
    let provider = match &upstream.ca {
        Some(ca) => format!(
            "[providers.openai]\nkind = \"openai\"\nbase_url = \"{}\"\napi_key_env = \"DEMO_PROVIDER_KEY\"\nca_file = \"{}\"\n",
            upstream.direct_url,
            ca.display()
        ),
        None => {
            "[providers.openai]\nkind = \"openai\"\napi_key_env = \"OPENAI_API_KEY\"\n".to_owned()
        }
    };
    format!(
        r#"# Written by `cargo xtask demo`.
listen = "127.0.0.1:{listen}"
admin_listen = "127.0.0.1:{admin}"
admin_token_env = "WARDEN_ADMIN_TOKEN"
redis_url = "{redis}"
spool_dir = "{spool}"

{provider}
[[keys]]
sha256 = "{key_hash}"
tenant = "acme"
allowed_tenants = ["acme"]

[[budgets]]
tenant = "acme"
feature = "checkout-assistant"
period = "day"
limit_usd = {DEMO_FEATURE_BUDGET_USD}

[[budgets]]
tenant = "acme"
period = "month"
limit_usd = 50.0
"#,
        spool = work.join("enforcer-spool").display(),
    )
}

fn observer_config(redis: &str, metrics: u16, upstream: &Upstream, spool: &Path) -> String {
    // api.openai.com is built in; the simulated provider is an extra host.
    let extra = upstream
        .extra_host
        .as_ref()
        .map(|h| format!("[[providers]]\nhost = \"{h}\"\nkind = \"openai\"\n"))
        .unwrap_or_default();
    format!(
        r#"# Written by `cargo xtask demo`.
redis_url = "{redis}"
spool_dir = "{spool}"
metrics_listen = "127.0.0.1:{metrics}"

{extra}
[[attribution]]
comm = "batch-summ*"
tenant = "acme"
service = "batch-summarizer"

[[attribution]]
comm = "rustls-client"
tenant = "acme"
service = "code-agent"
"#,
        spool = spool.display()
    )
}

fn report(bin: &Path, config: &Path) -> Value {
    Command::new(bin.join("enforcer"))
        .args(["report", "--json", "--period", "day", "--config"])
        .arg(config)
        .env("WARDEN_ADMIN_TOKEN", "demo-admin-token")
        .env("DEMO_PROVIDER_KEY", "sk-demo-provider")
        .output()
        .ok()
        .and_then(|o| serde_json::from_slice(&o.stdout).ok())
        .unwrap_or(Value::Null)
}

fn usd(v: &Value) -> String {
    let n = v.as_i64().unwrap_or(0);
    format!("${}.{:09}", n / 1_000_000_000, n % 1_000_000_000)
}

/// The live view: a screen redrawn every second on a terminal; in logs (CI, pipes) a frame every
/// 10 s, with the closing footer printed once rather than under every later frame.
struct Screen {
    tty: bool,
    footer_shown: bool,
}

impl Screen {
    fn new(tty: bool) -> Screen {
        Screen {
            tty,
            footer_shown: false,
        }
    }

    /// The text to print now, if any.
    fn frame(
        &mut self,
        report: &Value,
        events: &[Value],
        elapsed: Duration,
        (observer_on, code_agent): (bool, bool),
        footer: Option<&str>,
    ) -> Option<String> {
        let tty = self.tty;
        if !tty && !elapsed.as_secs().is_multiple_of(10) {
            return None;
        }
        let footer = match footer {
            Some(f) if tty || !self.footer_shown => {
                self.footer_shown = true;
                Some(f)
            }
            _ => None,
        };
        Some(render(
            report,
            events,
            elapsed,
            (observer_on, code_agent),
            footer,
            tty,
        ))
    }
}

fn render(
    report: &Value,
    events: &[Value],
    elapsed: Duration,
    (observer_on, code_agent): (bool, bool),
    footer: Option<&str>,
    tty: bool,
) -> String {
    let mut out = String::from(if tty { "\x1b[2J\x1b[H" } else { "\n" });
    out.push_str(&format!(
        "llmwarden demo: two paths, one ledger ({}s)\n\n",
        elapsed.as_secs()
    ));
    out.push_str(&format!(
        "{:<10} {:>14} {:>14} {:>14} {:>14} {:>8}\n",
        "tenant", "spend", "held", "via enforcer", "bypass", "calls"
    ));
    for t in report
        .get("tenants")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        out.push_str(&format!(
            "{:<10} {:>14} {:>14} {:>14} {:>14} {:>8}\n",
            t["tenant"].as_str().unwrap_or("?"),
            usd(&t["spend_nusd"]),
            usd(&t["held_nusd"]),
            usd(&t["by_source"]["enforcer"]),
            usd(&t["bypass_spend_nusd"]),
            t["requests"].as_i64().unwrap_or(0)
        ));
        if let Some(f) = t.get("by_feature").and_then(Value::as_object) {
            for (name, v) in f {
                out.push_str(&format!("  feature {name:<22} {:>14}\n", usd(v)));
            }
        }
        for l in t
            .get("limits")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            out.push_str(&format!(
                "  budget {} {} {}: limit {}, spent {}, remaining {}\n",
                l["scope"].as_str().unwrap_or("?"),
                l["feature"].as_str().unwrap_or(""),
                l["period"].as_str().unwrap_or("?"),
                usd(&l["limit_nusd"]),
                usd(&l["spend_nusd"]),
                usd(&l["remaining_nusd"]),
            ));
        }
    }
    let bypass = report
        .get("tenants")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|t| t["bypass_spend_nusd"].as_i64().unwrap_or(0))
        .sum::<i64>();
    for service in ["checkout-assistant", "batch-summarizer"] {
        let mine: Vec<&Value> = events.iter().filter(|e| e["service"] == service).collect();
        let ok = mine.iter().filter(|e| e["ok"] == true).count();
        let denied = mine.iter().filter(|e| e["status"] == 402).count();
        let note = match (service, observer_on) {
            ("checkout-assistant", _) => "via the enforcer".to_owned(),
            (_, true) if bypass > 0 => format!(
                "\x1b[1;31mBYPASS ALERT\x1b[0m: the observer saw {} of direct provider spend",
                usd(&Value::from(bypass))
            ),
            (_, true) => "direct to the provider; nothing seen by the observer yet".to_owned(),
            (_, false) => "direct to the provider; invisible without the observer".to_owned(),
        };
        out.push_str(&format!(
            "\nservice {service:<20} calls {:>3}  ok {ok:>3}  denied (402) {denied:>3}  {note}",
            mine.len()
        ));
    }
    if code_agent {
        out.push_str(&code_agent_line(report, observer_on));
    }
    if let Some(f) = footer {
        out.push_str("\n\n");
        out.push_str(f);
    }
    out.push('\n');
    out
}

/// code-agent's line (the rustls client): what the observer saw of it, its unmetered
/// connections.
fn code_agent_line(report: &Value, observer_on: bool) -> String {
    let (mut conns, mut bytes_out, mut bytes_in) = (0, 0, 0);
    for t in report
        .get("tenants")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        conns += t["unmetered_connections"].as_i64().unwrap_or(0);
        bytes_out += t["unmetered_bytes_out"].as_i64().unwrap_or(0);
        bytes_in += t["unmetered_bytes_in"].as_i64().unwrap_or(0);
    }
    let note = match (observer_on, conns) {
        (false, _) => "rustls, direct to the provider; invisible without the observer".to_owned(),
        (true, 0) => "rustls, direct to the provider; no connection reported yet".to_owned(),
        (true, n) => format!(
            "\x1b[1;31mUNMETERED\x1b[0m: {n} connection(s) no probe could decode, {} KiB out / {} KiB in",
            bytes_out / 1024,
            bytes_in / 1024
        ),
    };
    format!("\nservice {:<20} {note}", "code-agent")
}

fn summarize(report: &Value, events: &[Value]) -> Value {
    let acme = report
        .get("tenants")
        .and_then(Value::as_array)
        .and_then(|ts| ts.iter().find(|t| t["tenant"] == "acme"))
        .cloned()
        .unwrap_or(Value::Null);
    serde_json::json!({
        "denied": events.iter().filter(|e| e["status"] == 402).count(),
        "checkout_ok": events.iter().filter(|e| e["service"] == "checkout-assistant" && e["ok"] == true).count(),
        "batch_ok": events.iter().filter(|e| e["service"] == "batch-summarizer" && e["ok"] == true).count(),
        "bypass_spend_nusd": acme["bypass_spend_nusd"],
        "unmetered_connections": acme["unmetered_connections"],
        "spend_nusd": acme["spend_nusd"],
        "held_nusd": acme["held_nusd"],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_shows_the_closing_footer_once() {
        let report = serde_json::json!({"tenants": []});
        let mut log = Screen::new(false);
        let mut out = String::new();
        for secs in 0..=40 {
            let footer = (secs >= 12).then_some("Workload finished.");
            if let Some(f) = log.frame(
                &report,
                &[],
                Duration::from_secs(secs),
                (true, false),
                footer,
            ) {
                out.push_str(&f);
            }
        }
        assert_eq!(out.matches("llmwarden demo").count(), 5, "{out}");
        assert_eq!(out.matches("Workload finished").count(), 1, "{out}");
        // A terminal redraws the whole screen, footer included, every second.
        let mut tty = Screen::new(true);
        for secs in 0..3 {
            let f = tty.frame(
                &report,
                &[],
                Duration::from_secs(secs),
                (true, false),
                Some("done"),
            );
            assert!(f.is_some_and(|f| f.contains("done")));
        }
    }
}
