//! Runs the `loadgen` binary (release build) and parses the JSON report it prints.

use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use super::Env;

/// One request target for loadgen: URL, headers, optional body file.
#[derive(Debug, Clone)]
pub struct Target {
    /// `http://127.0.0.1:PORT/...`.
    pub url: String,
    /// `name: value` lines.
    pub headers: Vec<String>,
    /// Body file (POST) or none (GET).
    pub body: Option<std::path::PathBuf>,
    /// Per-request timeout.
    pub timeout: Duration,
}

impl Target {
    fn args(&self, c: &mut Command) {
        c.args(["--url", &self.url]);
        for h in &self.headers {
            c.args(["-H", h]);
        }
        if let Some(b) = &self.body {
            c.arg("--body-file").arg(b);
        }
        c.args(["--timeout-ms", &self.timeout.as_millis().to_string()]);
    }
}

/// Load shape of one HTTP run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Load {
    /// Open loop, requests per second.
    Rate(u32),
    /// Closed loop, workers.
    Concurrency(u32),
}

impl Load {
    /// `rate-500` / `c16`.
    pub fn label(self) -> String {
        match self {
            Load::Rate(r) => format!("rate-{r}"),
            Load::Concurrency(c) => format!("c{c}"),
        }
    }
}

/// Runs a request/response load for `window` (measured) after `warmup`.
pub fn http(
    env: &Env,
    target: &Target,
    load: Load,
    warmup: Duration,
    window: Duration,
) -> Result<Value> {
    let mut c = Command::new(env.bin.join("loadgen"));
    c.arg("http");
    target.args(&mut c);
    match load {
        Load::Rate(r) => c.args(["--rate", &r.to_string()]),
        Load::Concurrency(n) => c.args(["--concurrency", &n.to_string()]),
    };
    c.args(["--duration-ms", &window.as_millis().to_string()]);
    c.args(["--warmup-ms", &warmup.as_millis().to_string()]);
    run(c)
}

/// Runs concurrent SSE streams.
pub fn stream(env: &Env, target: &Target) -> Result<Value> {
    let mut c = Command::new(env.bin.join("loadgen"));
    c.arg("stream");
    target.args(&mut c);
    c.args([
        "--streams",
        &env.plan.streams.to_string(),
        "--rounds",
        &env.plan.stream_rounds.to_string(),
    ]);
    c.args(["--ramp-ms", "250"]);
    run(c)
}

/// Runs reserve + settle pairs against Redis.
pub fn ledger(env: &Env, redis_url: &str, tasks: usize) -> Result<Value> {
    let mut c = Command::new(env.bin.join("loadgen"));
    c.args([
        "ledger",
        "--redis",
        redis_url,
        "--tasks",
        &tasks.to_string(),
    ]);
    c.args(["--duration-ms", &env.plan.duration.as_millis().to_string()]);
    c.args(["--warmup-ms", &env.plan.warmup.as_millis().to_string()]);
    run(c)
}

fn run(mut c: Command) -> Result<Value> {
    let out = c
        .stderr(Stdio::inherit())
        .output()
        .context("running loadgen")?;
    if !out.status.success() {
        bail!("loadgen failed with {}", out.status);
    }
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).with_context(|| format!("loadgen printed {text:?}"))
}
