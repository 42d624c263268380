//! Enforcer overhead (and LiteLLM as a peer): the same requests sent straight to the mock provider,
//! through the pass-through proxy (the floor: the enforcer's stack without its work), through the
//! enforcer with budgets, through the enforcer without budgets, and through LiteLLM, interleaved
//! variant by variant and repeated.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::{Value, json};

use super::loadgen::{self, Load, Target};
use super::memory;
use super::stack::{self, MOCK_KEY, Mock, Proc};
use super::{Env, allocs, litellm, report, streaming};
use crate::command::step;

/// The proxy keys the bench's clients use (not secrets: they exist only in the bench).
pub(super) const KEY_BUDGETS: &str = "lw-bench-budgets-on";
const KEY_NO_BUDGETS: &str = "lw-bench-budgets-off";

/// A variant of the request path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// Client → mock.
    Direct,
    /// Client → pass-through proxy (loadgen's `passthrough`: no auth, budgets or metering) → mock.
    Passthrough,
    /// Client → enforcer (tenant with month and day budgets, lease pool on: `LEASE_POOL`) → mock.
    Budgets,
    /// Client → enforcer (the same tenant and budgets, no lease pool: every call reserves) → mock.
    Reserving,
    /// Client → enforcer (tenant without budgets: metering only) → mock.
    NoBudgets,
    /// Client → LiteLLM proxy → mock.
    LiteLlm,
}

impl Variant {
    /// Key in results.json.
    pub fn name(self) -> &'static str {
        match self {
            Variant::Direct => "direct",
            Variant::Passthrough => "passthrough",
            Variant::Budgets => "enforcer_budgets",
            Variant::Reserving => "enforcer_budgets_reserving",
            Variant::NoBudgets => "enforcer_no_budgets",
            Variant::LiteLlm => "litellm",
        }
    }
}

/// Everything the request-path sections share.
pub struct Stack {
    /// The mock with a fixed 20 ms latency.
    pub mock: Mock,
    /// The mock that streams 64 chunks.
    pub stream_mock: Mock,
    /// Enforcer with budgets (for its CPU and RSS) and its port.
    pub enforcer: (Proc, u16),
    /// Enforcer without budgets.
    pub enforcer_nb: (Proc, u16),
    /// Enforcer with budgets and no lease pool, and its admin port.
    pub enforcer_rs: ((Proc, u16), u16),
    /// The pass-through proxy (routes `openai` and `openai-stream`, as the enforcers).
    pub passthrough: (Proc, u16),
    /// A chat-completions request body.
    pub body: PathBuf,
    /// A streaming chat-completions request body.
    pub stream_body: PathBuf,
    /// The redis-server both enforcers use, for its CPU per call.
    pub redis_pid: u32,
    /// The admin ports of the enforcer with budgets and of the one without.
    pub admin: (u16, u16),
}

impl Stack {
    /// The target for `variant` (`stream`: the streaming provider).
    pub fn target(&self, variant: Variant, stream: bool, litellm_port: Option<u16>) -> Target {
        let timeout = Duration::from_secs(10);
        let body = Some(if stream {
            self.stream_body.clone()
        } else {
            self.body.clone()
        });
        let (url, key) = match variant {
            Variant::Direct => {
                let m = if stream {
                    &self.stream_mock
                } else {
                    &self.mock
                };
                (format!("http://{}/v1/chat/completions", m.addr), MOCK_KEY)
            }
            Variant::Passthrough => {
                let route = if stream { "openai-stream" } else { "openai" };
                (
                    format!(
                        "http://127.0.0.1:{}/{route}/chat/completions",
                        self.passthrough.1
                    ),
                    MOCK_KEY,
                )
            }
            Variant::Budgets | Variant::Reserving | Variant::NoBudgets => {
                let (port, key) = self.enforcer_port_key(variant);
                let provider = if stream { "openai-stream" } else { "openai" };
                (
                    format!("http://127.0.0.1:{port}/proxy/{provider}/chat/completions"),
                    key,
                )
            }
            Variant::LiteLlm => (
                format!(
                    "http://127.0.0.1:{}/v1/chat/completions",
                    litellm_port.unwrap_or(0)
                ),
                litellm::MASTER_KEY,
            ),
        };
        Target {
            url,
            headers: vec![format!("authorization: Bearer {key}")],
            body,
            timeout,
        }
    }

    /// The listening port and caller key of the enforcer serving `variant` (the one without
    /// budgets for any variant that is not an enforcer with budgets).
    fn enforcer_port_key(&self, variant: Variant) -> (u16, &'static str) {
        match variant {
            Variant::Budgets => (self.enforcer.1, KEY_BUDGETS),
            Variant::Reserving => (self.enforcer_rs.0.1, KEY_BUDGETS),
            _ => (self.enforcer_nb.1, KEY_NO_BUDGETS),
        }
    }

    /// A call of `provider`'s own API (`path` below its base URL, e.g. `/v1/messages`) through the
    /// enforcer or pass-through serving `variant`, with the header that provider's SDK sends the
    /// key in. Neither proxy's config changes: both route `anthropic` and `gemini` to the mock.
    pub fn provider_target(
        &self,
        variant: Variant,
        provider: &str,
        path: &str,
        body: PathBuf,
    ) -> Target {
        let (url, header) = match variant {
            Variant::Passthrough => {
                let header = match provider {
                    "anthropic" => format!("x-api-key: {MOCK_KEY}"),
                    "gemini" => format!("x-goog-api-key: {MOCK_KEY}"),
                    _ => format!("authorization: Bearer {MOCK_KEY}"),
                };
                (
                    format!("http://127.0.0.1:{}/{provider}{path}", self.passthrough.1),
                    header,
                )
            }
            _ => {
                let (port, key) = self.enforcer_port_key(variant);
                (
                    format!("http://127.0.0.1:{port}/proxy/{provider}{path}"),
                    format!("authorization: Bearer {key}"),
                )
            }
        };
        Target {
            url,
            headers: vec![header],
            body: Some(body),
            timeout: Duration::from_secs(10),
        }
    }

    /// The admin port of the enforcer serving `variant`.
    fn admin_port(&self, variant: Variant) -> Option<u16> {
        match variant {
            Variant::Budgets => Some(self.admin.0),
            Variant::Reserving => Some(self.enforcer_rs.1),
            Variant::NoBudgets => Some(self.admin.1),
            _ => None,
        }
    }

    /// Stops the four proxies with SIGTERM and waits for each to exit on its own (an instrumented
    /// build writes its profile only then).
    pub fn stop_proxies(&mut self, within: Duration) -> Result<()> {
        for p in [
            &mut self.enforcer.0,
            &mut self.enforcer_nb.0,
            &mut self.enforcer_rs.0.0,
            &mut self.passthrough.0,
        ] {
            p.terminate(within)?;
        }
        Ok(())
    }

    /// The process serving `variant`, when it is ours to measure.
    pub fn pid(&self, variant: Variant) -> Option<u32> {
        match variant {
            Variant::Budgets => Some(self.enforcer.0.pid()),
            Variant::Reserving => Some(self.enforcer_rs.0.0.pid()),
            Variant::NoBudgets => Some(self.enforcer_nb.0.pid()),
            Variant::Passthrough => Some(self.passthrough.0.pid()),
            _ => None,
        }
    }

    /// The mock provider's process (`stream`: the streaming one), whose own CPU per call is
    /// reported next to the proxies'.
    pub fn mock_pid(&self, stream: bool) -> u32 {
        if stream {
            self.stream_mock._proc.pid()
        } else {
            self.mock._proc.pid()
        }
    }
}

/// Which parts of the request-path sections run (each has its `--skip` name).
#[derive(Debug, Clone, Copy)]
pub struct Parts {
    /// LiteLLM as a peer in the matrix.
    pub litellm: bool,
    /// The latency and CPU matrix (`overhead`).
    pub http: bool,
    /// Peak RSS under the worst calls (`memory`).
    pub memory: bool,
    /// SSE streams (`streaming`).
    pub streams: bool,
    /// Allocations per call (`allocations`).
    pub allocations: bool,
}

pub fn run(env: &Env, redis_url: &str, redis_pid: u32, parts: Parts) -> Result<Value> {
    let stack = start(env, redis_url, redis_pid)?;
    let mut out = serde_json::Map::new();
    // LiteLLM starts slowly: spawn it now, wait for it only before the first scenario that uses it.
    let mut lite = Lite {
        proc: None,
        error: None,
    };
    if parts.litellm && parts.http {
        match litellm::spawn(env, &stack.mock) {
            Ok(l) => lite.proc = Some(l),
            Err(e) => lite.error = Some(format!("{e:#}")),
        }
    }
    if parts.http {
        out.insert("overhead".into(), matrix(env, &stack, &mut lite)?);
    }
    if parts.memory {
        let url = format!(
            "http://127.0.0.1:{}/proxy/openai/embeddings",
            stack.enforcer.1
        );
        let pid = stack.enforcer.0.pid();
        out.insert(
            "memory".into(),
            memory::run(env, &url, KEY_BUDGETS, pid)
                .unwrap_or_else(|e| json!({ "error": format!("{e:#}") })),
        );
    }
    if let Some(e) = &lite.error {
        eprintln!("\x1b[1;31mLiteLLM unavailable, peer comparison NOT measured: {e}\x1b[0m");
        out.insert("litellm".into(), json!({ "error": e }));
    } else if lite.proc.is_some() {
        out.insert("litellm".into(), json!({ "version": litellm::version() }));
    }
    drop(lite);
    if parts.streams {
        out.insert("streaming".into(), streaming::run(env, &stack)?);
    }
    // Last: the probes trap every allocation while they are on, and nothing else should run then.
    if parts.allocations {
        let counted = allocs::run(env, &stack).unwrap_or_else(|e| {
            eprintln!("\x1b[1;31mallocations per call NOT counted: {e:#}\x1b[0m");
            json!({ "error": format!("{e:#}") })
        });
        out.insert("allocations".into(), counted);
    }
    Ok(Value::Object(out))
}

/// The LiteLLM process, or why there is none.
struct Lite {
    proc: Option<litellm::LiteLlm>,
    error: Option<String>,
}

impl Lite {
    fn port(&self) -> Option<u16> {
        self.proc.as_ref().map(|l| l.port)
    }

    /// The port and pid of a ready LiteLLM, waiting for it the first time; None (with the error
    /// recorded) when it cannot serve.
    fn ready(&mut self, env: &Env, mock_target: &Target) -> Option<(u16, u32)> {
        let l = self.proc.as_mut()?;
        if let Err(e) = l.wait_ready(env, mock_target) {
            self.error = Some(format!("{e:#}"));
            self.proc = None;
            return None;
        }
        Some((l.port, l.proc.pid()))
    }
}

pub(super) fn start(env: &Env, redis_url: &str, redis_pid: u32) -> Result<Stack> {
    step("starting the mock providers (20 ms latency; streaming: 64 chunks 10 ms apart)");
    let mock = stack::mock(&env.bin, &env.work, "mock", 20, &["--output-tokens", "120"])?;
    let stream_mock = stack::mock(
        &env.bin,
        &env.work,
        "stream-mock",
        20,
        &[
            "--output-tokens",
            "64",
            "--chunks",
            "64",
            "--chunk-delay-ms",
            "10",
        ],
    )?;
    let body = env.work.join("chat.json");
    std::fs::write(&body, chat_body(false))?;
    let stream_body = env.work.join("chat-stream.json");
    std::fs::write(&stream_body, chat_body(true))?;
    let (on, admin_on) = enforcer(
        env,
        redis_url,
        &mock,
        &stream_mock,
        true,
        LEASE_POOL,
        "enforcer-budgets",
    )?;
    let reserving = enforcer(
        env,
        redis_url,
        &mock,
        &stream_mock,
        true,
        0,
        "enforcer-budgets-reserving",
    )?;
    let (off, admin_off) = enforcer(
        env,
        redis_url,
        &mock,
        &stream_mock,
        false,
        0,
        "enforcer-no-budgets",
    )?;
    let passthrough = passthrough(env, &mock, &stream_mock)?;
    Ok(Stack {
        redis_pid,
        admin: (admin_on, admin_off),
        mock,
        stream_mock,
        enforcer: on,
        enforcer_nb: off,
        enforcer_rs: reserving,
        passthrough,
        body,
        stream_body,
    })
}

/// A realistic chat-completions request: a system prompt, a short conversation, max_tokens. The
/// last message differs on every request (the load generator numbers it, see `loadgen::target::SEQ`),
/// as in real traffic, so the enforcer's token-count cache hits only the repeated turns.
pub(super) fn chat_body(stream: bool) -> String {
    let system =
        "You are a support assistant for an online store. Answer in at most three sentences, \
                  cite the order number when the customer gives one, and never promise refunds. "
            .repeat(3);
    let user = format!(
        "Ticket {{{{seq}}}}. {}",
        "My order 48213 arrived with a cracked screen protector and the charger is missing. \
             Can you tell me what the return process is and how long a replacement takes? "
            .repeat(4)
    );
    let mut v = json!({
        "model": "gpt-4o-mini",
        "messages": [
            { "role": "system", "content": system },
            { "role": "user", "content": "Hi, I need help with an order." },
            { "role": "assistant", "content": "Of course. What is the order number and what went wrong?" },
            { "role": "user", "content": user },
        ],
        "max_tokens": 200,
        "temperature": 0.2,
    });
    if stream {
        v["stream"] = json!(true);
    }
    v.to_string()
}

/// The bench enforcers' admin token (`admin_token_env`).
const ADMIN_TOKEN: &str = "bench-admin-token";

/// The sum (seconds) and count of the enforcer's `llmwarden_overhead_seconds` (its time before
/// forwarding), read from its admin endpoint on `port`; `None` when it cannot be read.
fn before_forwarding(port: u16) -> Option<(f64, f64)> {
    let text = stack::metrics_text(port, Some(ADMIN_TOKEN))?;
    let value = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse::<f64>().ok())
    };
    Some((
        value("llmwarden_overhead_seconds_sum")?,
        value("llmwarden_overhead_seconds_count")?,
    ))
}

/// The bench's lease pool (`lease_pool`) for the enforcers that use one: the setting
/// docs/enforcer.md recommends where latency matters.
pub(super) const LEASE_POOL: usize = 16;

/// An enforcer named `name` (its config and log file names) on the two mocks, with the budgets
/// key and tenant or the key and tenant without budgets, and `lease_pool` spare holds per tenant
/// (0: none): its process and port, and its admin port.
pub(super) fn enforcer(
    env: &Env,
    redis_url: &str,
    mock: &Mock,
    stream_mock: &Mock,
    budgets: bool,
    lease_pool: usize,
    name: &str,
) -> Result<((Proc, u16), u16)> {
    let (listen, admin) = (stack::free_port()?, stack::free_port()?);
    let (key, tenant) = if budgets {
        (KEY_BUDGETS, "bench-on")
    } else {
        (KEY_NO_BUDGETS, "bench-off")
    };
    let hash = stack::hash_key(&env.bin, key)?;
    let mut cfg = format!(
        r#"# Written by `cargo xtask bench`.
listen = "127.0.0.1:{listen}"
admin_listen = "127.0.0.1:{admin}"
admin_token_env = "WARDEN_ADMIN_TOKEN"
redis_url = "{redis_url}"
lease_pool = {lease_pool}

[providers.openai]
kind = "openai"
base_url = "http://{mock}/v1"
api_key_env = "BENCH_PROVIDER_KEY"

[providers.openai-stream]
kind = "openai"
base_url = "http://{stream}/v1"
api_key_env = "BENCH_PROVIDER_KEY"

# Unused by the bench's loads; `cargo xtask pgo` trains the Anthropic and Gemini paths on them.
[providers.anthropic]
base_url = "http://{mock}"
api_key_env = "BENCH_PROVIDER_KEY"

[providers.gemini]
base_url = "http://{mock}"
api_key_env = "BENCH_PROVIDER_KEY"

[[keys]]
sha256 = "{hash}"
tenant = "{tenant}"
allowed_tenants = ["{tenant}"]
"#,
        mock = mock.addr,
        stream = stream_mock.addr,
    );
    if budgets {
        // Large enough never to deny during the bench: the cost of checking is what is measured.
        cfg.push_str(&format!(
            "\n[[budgets]]\ntenant = \"{tenant}\"\nperiod = \"month\"\nlimit_usd = 1000000.0\n\n\
             [[budgets]]\ntenant = \"{tenant}\"\nperiod = \"day\"\nlimit_usd = 100000.0\n"
        ));
    }
    let path = env.work.join(format!("{name}.toml"));
    std::fs::write(&path, cfg)?;
    let log = std::fs::File::create(env.work.join(format!("{name}.log")))?;
    let mut p = Proc::spawn(
        name,
        Command::new(env.bin.join("enforcer"))
            .arg("--config")
            .arg(&path)
            .env("WARDEN_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("BENCH_PROVIDER_KEY", MOCK_KEY)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log),
    )?;
    stack::wait_port(listen, name, Duration::from_secs(20))
        .with_context(|| format!("see {}", env.work.join(format!("{name}.log")).display()))?;
    p.ensure_running()?;
    Ok(((p, listen), admin))
}

/// The pass-through proxy on the same two mocks, over plain HTTP as the enforcers reach them.
fn passthrough(env: &Env, mock: &Mock, stream_mock: &Mock) -> Result<(Proc, u16)> {
    let mut p = Proc::spawn(
        "passthrough",
        Command::new(env.bin.join("passthrough"))
            .args(["--route", &format!("openai=http://{}/v1", mock.addr)])
            .args([
                "--route",
                &format!("openai-stream=http://{}/v1", stream_mock.addr),
            ])
            .args(["--route", &format!("anthropic=http://{}", mock.addr)])
            .args(["--route", &format!("gemini=http://{}", mock.addr)])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit()),
    )?;
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(p.stdout().context("passthrough stdout")?),
        &mut line,
    )?;
    let v: Value = serde_json::from_str(line.trim())
        .with_context(|| format!("passthrough printed {line:?}"))?;
    let port = v["addr"]
        .as_str()
        .and_then(|a| a.rsplit_once(':')?.1.parse::<u16>().ok())
        .with_context(|| format!("passthrough printed no addr: {line}"))?;
    p.ensure_running()?;
    Ok((p, port))
}

/// The scenarios: one sequential keep-alive client (what a single caller waits for each call),
/// open loop at 500 and 2000 req/s, closed loop at 16 and 64.
const LOADS: [Load; 5] = [
    Load::Concurrency(1),
    Load::Rate(500),
    Load::Rate(2000),
    Load::Concurrency(16),
    Load::Concurrency(64),
];

fn matrix(env: &Env, stack: &Stack, lite: &mut Lite) -> Result<Value> {
    let tps = stack::ticks_per_s();
    // One unrecorded second per variant first: connection pools, budget caches and the allocator
    // warm up before the first measured run, which would otherwise carry the cold start alone.
    for v in [
        Variant::Direct,
        Variant::Passthrough,
        Variant::Budgets,
        Variant::Reserving,
        Variant::NoBudgets,
    ] {
        let w = Duration::from_secs(1);
        loadgen::http(
            env,
            &stack.target(v, false, None),
            Load::Concurrency(16),
            Duration::ZERO,
            w,
        )
        .with_context(|| format!("warming up {}", v.name()))?;
    }
    let mut scenarios = Vec::new();
    for load in LOADS {
        // Direct stays first: the ratios are against runs[0].
        let mut variants = vec![
            Variant::Direct,
            Variant::Passthrough,
            Variant::Budgets,
            Variant::Reserving,
            Variant::NoBudgets,
        ];
        // LiteLLM runs the closed-loop scenarios only: open loop at 2000 req/s just queues it into
        // timeouts.
        let (mut lite_port, mut lite_pid) = (None, None);
        // --quick keeps the minute: LiteLLM at concurrency 16 only (the published peer comparison).
        let lite_here =
            matches!(load, Load::Concurrency(c) if c > 1 && (!env.plan.quick || c == 16));
        if lite_here
            && let Some((port, pid)) =
                lite.ready(env, &stack.target(Variant::LiteLlm, false, lite.port()))
        {
            variants.push(Variant::LiteLlm);
            (lite_port, lite_pid) = (Some(port), Some(pid));
        }
        let mut runs: Vec<Vec<Value>> = vec![Vec::new(); variants.len()];
        for rep in 0..env.plan.repeats {
            // Rotate the order each repeat so no variant always runs first (warmest / coldest).
            for k in 0..variants.len() {
                let i = (k + rep) % variants.len();
                let v = variants[i];
                let pid = if v == Variant::LiteLlm {
                    lite_pid
                } else {
                    stack.pid(v)
                };
                let before = pid.map(tree_ticks);
                let mock_before = stack::cpu_ticks(stack.mock_pid(false));
                let redis_before = stack::cpu_ticks(stack.redis_pid);
                let admin = stack.admin_port(v);
                let fwd_before = admin.and_then(before_forwarding);
                // LiteLLM's latency is hundreds of ms under load: a 1 s window would hold too few
                // completions, so it gets at least 3 s (same concurrency, same request).
                let (warmup, window) = if v == Variant::LiteLlm {
                    (
                        env.plan.warmup.max(Duration::from_secs(1)),
                        env.plan.duration.max(Duration::from_secs(3)),
                    )
                } else {
                    (env.plan.warmup, env.plan.duration)
                };
                let mut r = loadgen::http(
                    env,
                    &stack.target(v, false, lite_port),
                    load,
                    warmup,
                    window,
                )
                .with_context(|| format!("{} {}", load.label(), v.name()))?;
                if let (Some(p), Some(b)) = (pid, before) {
                    let used = tree_ticks(p).saturating_sub(b) as f64 / tps * 1000.0;
                    let total = r["sent_total"].as_f64().unwrap_or(0.0).max(1.0);
                    r["cpu_ms_per_1000"] = json!(used / total * 1000.0);
                    r["rss_kib"] = json!(tree_rss(p));
                }
                // The mock's own CPU per call: what serving the call costs at the far end, the
                // same for every variant (it answers each call once).
                if let (Some(b), Some(a)) = (mock_before, stack::cpu_ticks(stack.mock_pid(false))) {
                    let used = a.saturating_sub(b) as f64 / tps * 1000.0;
                    let total = r["sent_total"].as_f64().unwrap_or(0.0).max(1.0);
                    r["mock_cpu_ms_per_1000"] = json!(used / total * 1000.0);
                }
                // Redis's CPU per call: the reserve and settle scripts of an enforcer's calls (the
                // other variants do not use it), what a fleet's shared Redis pays for each call.
                if matches!(
                    v,
                    Variant::Budgets | Variant::Reserving | Variant::NoBudgets
                ) && let (Some(b), Some(a)) = (redis_before, stack::cpu_ticks(stack.redis_pid))
                {
                    let used = a.saturating_sub(b) as f64 / tps * 1000.0;
                    let total = r["sent_total"].as_f64().unwrap_or(0.0).max(1.0);
                    r["redis_cpu_ms_per_1000"] = json!(used / total * 1000.0);
                }
                // The enforcer's own time before forwarding (auth, parse, reserve), from its
                // metrics: at c64 nearly all of it is the reserve queueing behind Redis's scripts.
                if let (Some((s0, n0)), Some((s1, n1))) =
                    (fwd_before, admin.and_then(before_forwarding))
                    && n1 > n0
                {
                    r["before_forwarding_us"] = json!((s1 - s0) / (n1 - n0) * 1e6);
                }
                eprintln!(
                    "    {:<8} {:<20} rep {rep}: p50 {:>6} µs  p99 {:>6} µs  {:>7.0} req/s  errors {}",
                    load.label(),
                    v.name(),
                    r["latency_us"]["p50"],
                    r["latency_us"]["p99"],
                    r["achieved_rps"].as_f64().unwrap_or(0.0),
                    r["errors"]
                );
                runs[i].push(r);
                if let (Variant::LiteLlm, Some(p)) = (v, pid) {
                    // Requests the client gave up on may still be running in LiteLLM: let it drain
                    // so it does not steal the CPU of the next variant.
                    wait_idle(p, tps);
                }
            }
        }
        scenarios.push(scenario(load, &variants, &runs));
    }
    // Then one more one-client run of each proxy with its syscalls traced: how long each holds a
    // call on its path (reported, not a target; a missing `perf` is said, not fatal).
    let on_path = super::onpath::run(env, stack).unwrap_or_else(|e| {
        eprintln!("\x1b[1;31mtime on the path NOT recorded: {e:#}\x1b[0m");
        json!({ "error": format!("{e:#}") })
    });
    Ok(json!({ "scenarios": scenarios, "on_path": on_path }))
}

fn scenario(load: Load, variants: &[Variant], runs: &[Vec<Value>]) -> Value {
    let mut vs = serde_json::Map::new();
    for (v, rs) in variants.iter().zip(runs) {
        vs.insert(v.name().into(), report::aggregate_http(rs));
    }
    let mut ratios = serde_json::Map::new();
    for (v, rs) in variants.iter().zip(runs).skip(1) {
        ratios.insert(v.name().into(), report::ratios(&runs[0], rs));
    }
    // The enforcer's CPU per call against the floor, repeat by repeat.
    let mut floor = serde_json::Map::new();
    if let Some(pt) = variants.iter().position(|v| *v == Variant::Passthrough) {
        for (v, rs) in variants.iter().zip(runs) {
            if matches!(
                v,
                Variant::Budgets | Variant::Reserving | Variant::NoBudgets
            ) {
                floor.insert(v.name().into(), report::cpu_ratios(&runs[pt], rs));
            }
        }
    }
    let (kind, value) = match load {
        Load::Rate(r) => ("rate", r),
        Load::Concurrency(c) => ("concurrency", c),
    };
    json!({
        "load": load.label(), kind: value, "variants": vs, "vs_direct": ratios,
        "vs_passthrough": floor,
    })
}

/// Waits (at most 15 s) until `pid` uses less than 10% of a CPU.
fn wait_idle(pid: u32, ticks_per_s: f64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let mut last = tree_ticks(pid);
    while std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        let now = tree_ticks(pid);
        if (now.saturating_sub(last) as f64) < 0.05 * ticks_per_s {
            return;
        }
        last = now;
    }
}

/// CPU ticks of a process and its descendants (LiteLLM may fork workers).
pub fn tree_ticks(pid: u32) -> u64 {
    tree(pid).into_iter().filter_map(stack::cpu_ticks).sum()
}

fn tree_rss(pid: u32) -> u64 {
    tree(pid).into_iter().filter_map(stack::rss_kib).sum()
}

fn tree(root: u32) -> Vec<u32> {
    let mut all = vec![root];
    let parents: Vec<(u32, u32)> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|p| Some((p, ppid(p)?)))
        .collect();
    let mut i = 0;
    while i < all.len() {
        let cur = all[i];
        all.extend(parents.iter().filter(|(_, pp)| *pp == cur).map(|(p, _)| *p));
        i += 1;
    }
    all
}

fn ppid(pid: u32) -> Option<u32> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    s[s.rfind(')')? + 2..]
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}
