//! Observer cost and capture: curl (OpenSSL) over one HTTPS keep-alive connection to local TLS mocks,
//! with the observer attached and not; non-LLM traffic (a host that is no provider: the in-kernel
//! filter should make it nearly free) and LLM traffic (captured, priced and recorded in Redis).
//! Capture is checked against Redis (the tenant's day hash `requests` field) at 500 calls/s and
//! unthrottled, with the kernel drop counter from the observer's /metrics, over HTTP/1.1 and
//! HTTP/2 (curl `--http2`: one connection, one stream after another), with the observer's CPU
//! per captured call for each.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use super::Env;
use super::overhead::tree_ticks;
use super::stack::{self, MOCK_KEY, Mock, Proc};
use crate::command::{self, step};

/// The tenant the observer's attribution rule gives curl's calls.
const TENANT: &str = "bench-observer";

pub fn run(env: &Env, redis_url: &str) -> Result<Value> {
    if !command::is_root() {
        let msg = "NOT ROOT: the observer needs root (CAP_SYS_ADMIN for uprobes); observer benchmarks SKIPPED";
        eprintln!("\x1b[1;31m{msg}\x1b[0m");
        return Ok(json!({ "observer": { "skipped": msg } }));
    }
    let bin = env.bin.join("observer");
    if !bin.exists() {
        bail!(
            "{} is missing (the observer's release build failed or was skipped)",
            bin.display()
        );
    }
    let n = env.plan.observer_requests;
    let llm = stack::mock(
        &env.bin,
        &env.work,
        "obs-llm-mock",
        0,
        &["--output-tokens", "16", "--h2"],
    )?;
    let plain = stack::mock(&env.bin, &env.work, "obs-plain-mock", 0, &[])?;
    let body = env.work.join("obs-chat.json");
    std::fs::write(
        &body,
        r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hi."}],"max_tokens":16}"#,
    )?;
    // Non-LLM runs are short (a 2-byte answer at zero latency) and this machine drifts by more
    // than the effect, so attached runs alternate with unattached ones: unattached, attached,
    // unattached, attached, ... with the observer started and stopped in between; each attached
    // run is compared with the unattached runs on either side of it.
    let n_plain = n * PLAIN_SCALE;
    let curl_plain = || curl(&plain, "/healthz", None, n_plain, None, false);
    let curl_llm = |count: u64, rate: Option<u32>| {
        curl(
            &llm,
            "/v1/chat/completions",
            Some(&body),
            count,
            rate,
            false,
        )
    };
    let curl_h2 = |count: u64, rate: Option<u32>| {
        curl(&llm, "/v1/chat/completions", Some(&body), count, rate, true)
    };
    let port = redis_url.rsplit(':').next().unwrap_or("6379").to_owned();
    let tps = stack::ticks_per_s();
    step("observer: building the Go test client (tests/go/llmclient)");
    let go = build_go_client(&env.work)?;
    let go_llm = |count: u64, h2: bool| go_calls(&go, &llm, count, h2);
    let go_plain = |h2: bool| go_calls(&go, &plain, n_plain, h2);

    step("observer: unattached baseline");
    let mut unattached = vec![curl_plain()?];
    let mut go_unattached = vec![[go_plain(false)?, go_plain(true)?]];
    let mut go_attached = Vec::new();
    let mut go_ratios: Vec<[f64; 2]> = Vec::new();
    let mut open_unattached = vec![open_close_ns(&env.work)?];
    let mut open_attached = Vec::new();
    let a_llm = curl_llm(n, None)?;
    let a_h2 = curl_h2(n, None)?;
    let mut attached = Vec::new();
    let mut cycle_ratios = Vec::new();
    let mut cycle_added_us = Vec::new();
    let mut plain_cpu = Vec::new();
    let mut llm_part = None;
    let mut h2_part = None;
    let mut go_caps = Vec::new();
    let mut lazy_attached = Vec::new();
    let mut lazy_ratios: Vec<f64> = Vec::new();
    let mut at_rest = Value::Null;
    for cycle in 0..PLAIN_CYCLES {
        step(&format!(
            "observer: attach cycle {} of {PLAIN_CYCLES} (eBPF uprobes on OpenSSL)",
            cycle + 1
        ));
        let (mut obs, metrics) = start_observer(env, &bin, redis_url, &llm, cycle, "")?;
        if cycle == 0 {
            // Reported apart: a failure here leaves the row unmeasured, not the section.
            at_rest = stack::at_rest(obs.pid(), if env.plan.quick { 10 } else { 20 }, "observer")
                .unwrap_or_else(|e| json!({ "error": format!("{e:#}") }));
        }
        let cpu_per_1000 = |before: u64, count: u64| {
            (tree_ticks(obs.pid()) - before) as f64 / tps * 1000.0 / count.max(1) as f64 * 1000.0
        };
        let c0 = tree_ticks(obs.pid());
        let b = curl_plain()?;
        plain_cpu.push(cpu_per_1000(c0, n_plain));
        attached.push(b);
        open_attached.push(open_close_ns(&env.work)?);
        go_attached.push([go_plain(false)?, go_plain(true)?]);
        if cycle == 0 {
            let c1 = tree_ticks(obs.pid());
            let (b_llm, cap_max) = captured(
                &port,
                metrics,
                || curl_llm(n, None),
                n,
                "unthrottled, 1 client",
            )?;
            let llm_cpu = cpu_per_1000(c1, n);
            // curl's --rate sleeps in whole milliseconds: asking 500/s yields ~370/s, 750/s
            // yields ~700/s. The target needs at least 500 calls/s, so ask 750/s and report
            // what was achieved.
            let (_, cap500) = captured(
                &port,
                metrics,
                || curl_llm(n, Some(750)),
                n,
                "≥ 500/s (curl --rate 750/s)",
            )?;
            // Where drops begin: several unthrottled clients at once.
            let (_, cap_par) = captured(
                &port,
                metrics,
                || parallel(&llm, &body, n, 4),
                4 * n,
                "unthrottled, 4 clients",
            )?;
            let c2 = tree_ticks(obs.pid());
            let (b_h2, cap_h2_max) = captured(
                &port,
                metrics,
                || curl_h2(n, None),
                n,
                "HTTP/2, unthrottled, 1 client",
            )?;
            let h2_cpu = cpu_per_1000(c2, n);
            let (_, cap_h2_500) = captured(
                &port,
                metrics,
                || curl_h2(n, Some(750)),
                n,
                "HTTP/2, ≥ 500/s (curl --rate 750/s)",
            )?;
            // Go (crypto/tls probes): 16 goroutines, HTTP/1.1 (GODEBUG=http2client=0) and
            // HTTP/2 over one connection each.
            let (_, cap_go_h1) = captured(
                &port,
                metrics,
                || go_llm(n, false),
                n,
                "Go net/http HTTP/1.1, 16 goroutines",
            )?;
            let (_, cap_go_h2) = captured(
                &port,
                metrics,
                || go_llm(n, true),
                n,
                "Go net/http HTTP/2, 16 goroutines",
            )?;
            go_caps = vec![cap_go_h1, cap_go_h2];
            llm_part = Some((b_llm, llm_cpu, cap500, cap_max, cap_par));
            h2_part = Some((b_h2, h2_cpu, cap_h2_500, cap_h2_max));
        }
        obs.ensure_running()?;
        drop(obs);
        let u = curl_plain()?;
        open_unattached.push(open_close_ns(&env.work)?);
        let go_u = [go_plain(false)?, go_plain(true)?];
        let (go_b, go_prev) = (
            go_attached[go_attached.len() - 1],
            go_unattached[go_unattached.len() - 1],
        );
        go_ratios.push([0, 1].map(|i| go_b[i] / f64::midpoint(go_prev[i], go_u[i]).max(1e-9)));
        go_unattached.push(go_u);
        let base = f64::midpoint(unattached[unattached.len() - 1], u);
        cycle_ratios.push(b / base.max(1e-9));
        cycle_added_us.push(1e6 / b.max(1e-9) - 1e6 / base.max(1e-9));
        eprintln!(
            "    observer non-LLM cycle {}: unattached {:.0} / attached {b:.0} / unattached {u:.0} req/s → {:.3}×",
            cycle + 1,
            unattached[unattached.len() - 1],
            cycle_ratios[cycle_ratios.len() - 1]
        );
        unattached.push(u);
        // attach = "on-connect": curl never connects to a provider, so it gets no probe and the
        // kernel no breakpoint in it; compared with the unattached runs on either side.
        step(&format!(
            "observer: on-connect cycle {} of {PLAIN_CYCLES} (probes only in processes that reach a provider)",
            cycle + 1
        ));
        let (mut lazy_obs, _) = start_observer(
            env,
            &bin,
            redis_url,
            &llm,
            cycle + PLAIN_CYCLES,
            "attach = \"on-connect\"\n",
        )?;
        let lazy = curl_plain()?;
        lazy_attached.push(lazy);
        lazy_obs.ensure_running()?;
        drop(lazy_obs);
        let u2 = curl_plain()?;
        let lazy_base = f64::midpoint(u, u2);
        lazy_ratios.push(lazy / lazy_base.max(1e-9));
        eprintln!(
            "    observer non-LLM on-connect cycle {}: unattached {u:.0} / on-connect {lazy:.0} / unattached {u2:.0} req/s → {:.3}×",
            cycle + 1,
            lazy_ratios[lazy_ratios.len() - 1]
        );
        unattached.push(u2);
    }
    let c_llm = curl_llm(n, None)?;
    let c_h2 = curl_h2(n, None)?;
    let (
        Some((b_llm, llm_cpu, cap500, cap_max, cap_par)),
        Some((b_h2, h2_cpu, cap_h2_500, cap_h2_max)),
    ) = (llm_part, h2_part)
    else {
        bail!("no attach cycle ran");
    };
    let capture: Vec<Value> = [
        cap500.clone(),
        cap_max,
        cap_par,
        cap_h2_500.clone(),
        cap_h2_max,
    ]
    .into_iter()
    .chain(go_caps)
    .collect();
    let llm_base = f64::midpoint(a_llm, c_llm);
    let h2_base = f64::midpoint(a_h2, c_h2);
    Ok(json!({ "observer": {
        "requests": n,
        "non_llm": {
            "requests": n_plain,
            "cycles": PLAIN_CYCLES,
            "unattached_rps": median(&unattached), "unattached_runs": unattached,
            "attached_rps": median(&attached), "attached_runs": attached,
            "cycle_ratios": cycle_ratios,
            "ratio": { "median": median(&cycle_ratios),
                       "min": cycle_ratios.iter().copied().fold(f64::INFINITY, f64::min),
                       "max": cycle_ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max) },
            "added_us_per_request": median(&cycle_added_us),
            "observer_cpu_ms_per_1000": median(&plain_cpu),
        },
        "non_llm_on_connect": {
            "requests": n_plain,
            "attached_rps": median(&lazy_attached), "attached_runs": lazy_attached,
            "unattached_rps": median(&unattached),
            "cycle_ratios": lazy_ratios,
            "ratio": { "median": median(&lazy_ratios),
                       "min": lazy_ratios.iter().copied().fold(f64::INFINITY, f64::min),
                       "max": lazy_ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max) },
        },
        "llm": {
            "unattached_rps": llm_base, "unattached_runs": [a_llm, c_llm],
            "attached_rps": b_llm, "ratio": { "median": b_llm / llm_base.max(1e-9) },
            "observer_cpu_ms_per_1000": llm_cpu,
            "added_us_per_request": 1e6 / b_llm.max(1e-9) - 1e6 / llm_base.max(1e-9),
        },
        "llm_h2": {
            "unattached_rps": h2_base, "unattached_runs": [a_h2, c_h2],
            "attached_rps": b_h2, "ratio": { "median": b_h2 / h2_base.max(1e-9) },
            "observer_cpu_ms_per_1000": h2_cpu,
            "added_us_per_request": 1e6 / b_h2.max(1e-9) - 1e6 / h2_base.max(1e-9),
        },
        "open_syscall": {
            "unattached_ns": median(&open_unattached), "unattached_runs": open_unattached,
            "attached_ns": median(&open_attached), "attached_runs": open_attached,
            "added_ns": median(&open_attached) - median(&open_unattached),
        },
        "go_non_llm": {
            "requests": n_plain,
            "http1": { "ratio": { "median": median(&go_ratios.iter().map(|r| r[0]).collect::<Vec<_>>()) },
                       "unattached_rps": median(&go_unattached.iter().map(|r| r[0]).collect::<Vec<_>>()),
                       "attached_rps": median(&go_attached.iter().map(|r| r[0]).collect::<Vec<_>>()) },
            "http2": { "ratio": { "median": median(&go_ratios.iter().map(|r| r[1]).collect::<Vec<_>>()) },
                       "unattached_rps": median(&go_unattached.iter().map(|r| r[1]).collect::<Vec<_>>()),
                       "attached_rps": median(&go_attached.iter().map(|r| r[1]).collect::<Vec<_>>()) },
        },
        "at_rest": at_rest,
        "capture_500": cap500,
        "capture_h2_500": cap_h2_500,
        "capture": capture,
    }}))
}

/// Starts the observer with a fresh metrics port and waits until it has attached; returns it and
/// its metrics port.
fn start_observer(
    env: &Env,
    bin: &std::path::Path,
    redis_url: &str,
    llm: &Mock,
    cycle: usize,
    extra: &str,
) -> Result<(Proc, u16)> {
    let metrics = stack::free_port()?;
    let cfg = env.work.join(format!("observer-{cycle}.toml"));
    std::fs::write(
        &cfg,
        format!(
            "# Written by `cargo xtask bench`.\nredis_url = \"{redis_url}\"\nmetrics_listen = \"127.0.0.1:{metrics}\"\n{extra}\n\
             [[providers]]\nhost = \"{}\"\nkind = \"openai\"\n\n[[attribution]]\ncomm = \"curl\"\ntenant = \"{TENANT}\"\nservice = \"curl-bench\"\n\n\
             [[attribution]]\ncomm = \"llmclient\"\ntenant = \"{TENANT}\"\nservice = \"go-bench\"\n",
            llm.addr
        ),
    )?;
    let log_path = env.work.join(format!("observer-{cycle}.log"));
    let log = std::fs::File::create(&log_path)?;
    let mut obs = Proc::spawn(
        "observer",
        Command::new(bin)
            .arg("--config")
            .arg(&cfg)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log),
    )?;
    stack::wait_port(metrics, "observer /metrics", Duration::from_secs(60))
        .with_context(|| format!("see {}", log_path.display()))?;
    // Attaching happens at start-up; give discovery a moment and check it is still alive.
    std::thread::sleep(Duration::from_secs(2));
    obs.ensure_running()?;
    Ok((obs, metrics))
}

/// Builds the observer tests' Go client (standard library only, no network) into `work`.
fn build_go_client(work: &std::path::Path) -> Result<std::path::PathBuf> {
    let out = work.join("llmclient");
    let status = Command::new("go")
        .args(["build", "-o"])
        .arg(&out)
        .arg(".")
        .current_dir(command::root().join("tests/go/llmclient"))
        .env("GOCACHE", work.join("go-cache"))
        .env("GOPATH", work.join("gopath"))
        .env("GOFLAGS", "")
        .env("GOPROXY", "off")
        .env("GOTOOLCHAIN", "local")
        .env("CGO_ENABLED", "0")
        .status()
        .context("running `go build` (golang-go; `cargo xtask setup` installs it)")?;
    if !status.success() {
        bail!("go build of tests/go/llmclient failed ({status})");
    }
    Ok(out)
}

/// The Go client: `count` chat completions to `mock`, 16 goroutines on one connection, HTTP/2
/// or HTTP/1.1 (`GODEBUG=http2client=0`); returns calls per second. Bounded: killed after 120 s.
fn go_calls(bin: &std::path::Path, mock: &Mock, count: u64, h2: bool) -> Result<f64> {
    let mut c = Command::new(bin);
    c.args([
        "-url",
        &format!("https://{}/v1/chat/completions", mock.addr),
    ])
    .args(["-tenant", TENANT, "-key", MOCK_KEY, "-concurrency", "16"])
    .args(["-n", &count.to_string()])
    .env("SSL_CERT_FILE", &mock.ca)
    .env("GODEBUG", if h2 { "" } else { "http2client=0" })
    .stdout(Stdio::null())
    .stderr(Stdio::inherit());
    let t = Instant::now();
    let mut child = c.spawn().context("starting the Go client")?;
    wait_bounded(&mut child, Duration::from_secs(120))?;
    Ok(count as f64 / t.elapsed().as_secs_f64())
}

/// `open` + `close` of a file in the work directory, best of 5 runs of [`OPEN_LOOPS`]: what the
/// observer's open tracepoints (they read every opened path) add to every `open` on the host.
fn open_close_ns(work: &std::path::Path) -> Result<f64> {
    let path = work.join("obs-open-probe.txt");
    std::fs::write(&path, b"x")?;
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let t = std::time::Instant::now();
        for _ in 0..OPEN_LOOPS {
            drop(std::fs::File::open(&path)?);
        }
        best = best.min(t.elapsed().as_nanos() as f64 / OPEN_LOOPS as f64);
    }
    Ok(best)
}

/// Opens per [`open_close_ns`] run.
const OPEN_LOOPS: u32 = 50_000;

/// Non-LLM runs send this many times the LLM run's request count.
const PLAIN_SCALE: u64 = 4;
/// Attach / detach cycles of the non-LLM comparison.
const PLAIN_CYCLES: usize = 3;

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => f64::midpoint(v[n / 2 - 1], v[n / 2]),
    }
}

/// Runs `f` (which sends `sent` LLM calls) and reports how many the ledger recorded and the drops.
fn captured(
    redis_port: &str,
    metrics: u16,
    f: impl FnOnce() -> Result<f64>,
    sent: u64,
    offered: &str,
) -> Result<(f64, Value)> {
    let (r0, d0) = (recorded(redis_port), kernel_drops(metrics));
    let rps = f()?;
    // Records land asynchronously: wait until the count stops moving (bounded).
    let deadline = Instant::now() + Duration::from_secs(10);
    let (mut last, mut still) = (recorded(redis_port), 0);
    while last.saturating_sub(r0) < sent && still < 3 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(400));
        let now = recorded(redis_port);
        still = if now == last { still + 1 } else { 0 };
        last = now;
    }
    let got = last.saturating_sub(r0);
    let drops = kernel_drops(metrics).zip(d0).map(|(a, b)| a - b);
    eprintln!(
        "    observer capture {offered}: sent {sent}, recorded {got}, kernel drops {drops:?}, {rps:.0} calls/s"
    );
    Ok((
        rps,
        json!({
            "offered": offered, "sent": sent, "captured": got, "captured_fraction": got as f64 / sent.max(1) as f64,
            "kernel_drops": drops, "achieved_rps": rps,
        }),
    ))
}

/// The tenant's `requests` today in Redis.
fn recorded(redis_port: &str) -> u64 {
    let day = command::output(Command::new("date").args(["-u", "+%F"])).unwrap_or_default();
    let key = format!("llmw:{{{TENANT}}}:spend:d:{}", day.trim());
    command::output(Command::new("redis-cli").args([
        "-h",
        "127.0.0.1",
        "-p",
        redis_port,
        "HGET",
        &key,
        "requests",
    ]))
    .and_then(|s| s.trim().parse().ok())
    .unwrap_or(0)
}

/// The observer's kernel drop counter (events lost because the ring buffer was full), from /metrics.
fn kernel_drops(port: u16) -> Option<f64> {
    let text = stack::metrics_text(port, None)?;
    let mut sum = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let name = line.split(['{', ' ']).next().unwrap_or("");
        // llmwarden_observer_kernel_drops (not ..._kernel_dropped_bytes).
        if name.contains("kernel_drops") && !name.contains("bytes") {
            let v: f64 = line
                .rsplit(' ')
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.0);
            *sum.get_or_insert(0.0) += v;
        }
    }
    sum
}

/// curl over one keep-alive HTTPS connection: `count` requests (URL globbing), optionally `--rate`;
/// returns requests per second. Bounded: killed after 120 s.
fn curl(
    mock: &Mock,
    path: &str,
    body: Option<&std::path::Path>,
    count: u64,
    rate: Option<u32>,
    h2: bool,
) -> Result<f64> {
    let mut c = curl_cmd(mock, path, body, count, rate, h2);
    let t = Instant::now();
    let mut child = c.spawn().context("starting curl")?;
    wait_bounded(&mut child, Duration::from_secs(120))?;
    Ok(count as f64 / t.elapsed().as_secs_f64())
}

fn parallel(mock: &Mock, body: &std::path::Path, count: u64, clients: u64) -> Result<f64> {
    let t = Instant::now();
    let mut kids = Vec::new();
    for _ in 0..clients {
        kids.push(
            curl_cmd(mock, "/v1/chat/completions", Some(body), count, None, false)
                .spawn()
                .context("starting curl")?,
        );
    }
    for k in &mut kids {
        wait_bounded(k, Duration::from_secs(120))?;
    }
    Ok((count * clients) as f64 / t.elapsed().as_secs_f64())
}

fn curl_cmd(
    mock: &Mock,
    path: &str,
    body: Option<&std::path::Path>,
    count: u64,
    rate: Option<u32>,
    h2: bool,
) -> Command {
    let mut c = Command::new("curl");
    c.arg(if h2 { "--http2" } else { "--http1.1" })
        .args(["-sS", "--fail", "--cacert"])
        .arg(&mock.ca);
    c.args(["-H", &format!("authorization: Bearer {MOCK_KEY}")]);
    if let Some(b) = body {
        c.args(["-H", "content-type: application/json", "--data-binary"])
            .arg(format!("@{}", b.display()));
    }
    if let Some(r) = rate {
        c.args(["--rate", &format!("{r}/s")]);
    }
    c.arg(format!("https://{}{path}?i=[1-{count}]", mock.addr));
    c.stdout(Stdio::null()).stderr(Stdio::inherit());
    c
}

fn wait_bounded(child: &mut std::process::Child, limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(st) = child.try_wait()? {
            if !st.success() {
                bail!("curl exited with {st}");
            }
            return Ok(());
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("curl did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
