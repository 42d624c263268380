//! Runs the `loadgen` binary (release build) and parses the JSON report it prints.

use std::io::{BufRead, BufReader, Lines, Write};
use std::process::{Child, ChildStdout, Command, Stdio};
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
    run(stream_command(env, target))
}

/// The same streams as [`stream`], started: the caller gets the process (its pid) and reads the
/// report with [`finish`].
pub fn stream_spawn(env: &Env, target: &Target) -> Result<Child> {
    stream_command(env, target)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting loadgen")
}

/// Waits for a loadgen started with [`stream_spawn`] and parses its report.
pub fn finish(child: Child) -> Result<Value> {
    parse(child.wait_with_output().context("waiting for loadgen")?)
}

fn stream_command(env: &Env, target: &Target) -> Command {
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
    c
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

/// A running `loadgen hold`, whose JSON lines (one per phase) are read as they come; killed on drop.
pub struct Hold {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Hold {
    /// The next phase line (`idle`, `in_flight`, `done`).
    pub fn line(&mut self) -> Result<Value> {
        let line = self
            .lines
            .next()
            .context("loadgen hold ended without its next line")??;
        serde_json::from_str(line.trim()).with_context(|| format!("loadgen hold printed {line:?}"))
    }

    /// Idle connections: closes them (a line on loadgen's stdin) and returns the `done` line.
    pub fn release(mut self) -> Result<Value> {
        if let Some(mut i) = self.child.stdin.take() {
            let _ = i.write_all(b"release\n");
        }
        let done = self.line()?;
        let st = self.child.wait()?;
        if !st.success() {
            bail!("loadgen hold failed with {st}");
        }
        Ok(done)
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How `loadgen hold` holds its connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Held {
    /// Each makes one call (32 at a time), then all sit idle until released (at most 120 s).
    Idle,
    /// All open first, then one call on each at once; the `in_flight` line comes after `settle`.
    InFlight { settle: Duration },
}

/// Starts `loadgen hold` with `connections` connections to `target` (`h2c`: HTTP/2 prior
/// knowledge, else HTTP/1.1).
pub fn hold(env: &Env, target: &Target, connections: u32, h2c: bool, how: Held) -> Result<Hold> {
    let mut c = Command::new(env.bin.join("loadgen"));
    c.arg("hold");
    target.args(&mut c);
    c.args(["--connections", &connections.to_string()]);
    if h2c {
        c.arg("--h2c");
    }
    if let Held::InFlight { settle } = how {
        c.args([
            "--in-flight",
            "--settle-ms",
            &settle.as_millis().to_string(),
        ]);
    }
    let mut child = c
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("running loadgen hold")?;
    let out = child.stdout.take().context("loadgen stdout")?;
    Ok(Hold {
        child,
        lines: BufReader::new(out).lines(),
    })
}

fn run(mut c: Command) -> Result<Value> {
    parse(
        c.stderr(Stdio::inherit())
            .output()
            .context("running loadgen")?,
    )
}

fn parse(out: std::process::Output) -> Result<Value> {
    if !out.status.success() {
        bail!("loadgen failed with {}", out.status);
    }
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).with_context(|| format!("loadgen printed {text:?}"))
}
