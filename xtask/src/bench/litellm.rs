//! LiteLLM's proxy as the peer: installed into a venv the bench makes (bench/work/litellm-venv) and
//! configured with one model pointing at the same mock provider.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::Env;
use super::loadgen::{self, Load, Target};
use super::stack::{self, MOCK_KEY, Mock, Proc};
use crate::command::{self, root, step};

/// LiteLLM's master key in the bench (not a secret).
pub const MASTER_KEY: &str = "sk-litellm-bench";

/// A LiteLLM proxy process (its start-up takes tens of seconds: call [`LiteLlm::wait_ready`] late).
pub struct LiteLlm {
    /// Its process.
    pub proc: Proc,
    /// Its port on 127.0.0.1.
    pub port: u16,
    log: std::path::PathBuf,
    ready: bool,
}

/// Installs LiteLLM when missing, then spawns its proxy against `mock` without waiting for it.
pub fn spawn(env: &Env, mock: &Mock) -> Result<LiteLlm> {
    let venv = root().join("bench/work/litellm-venv");
    let bin = venv.join("bin/litellm");
    if !bin.exists() {
        step(&format!(
            "installing LiteLLM's proxy into {} (one time)",
            venv.display()
        ));
        command::run(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
        command::run(Command::new(venv.join("bin/pip")).args([
            "install",
            "--quiet",
            "litellm[proxy]",
        ]))
        .context("pip install \"litellm[proxy]\"")?;
    }
    let version = version().unwrap_or_default();
    let port = stack::free_port()?;
    let cfg = env.work.join("litellm.yaml");
    std::fs::write(
        &cfg,
        format!(
            "# Written by `cargo xtask bench`.\nmodel_list:\n  - model_name: gpt-4o-mini\n    litellm_params:\n      \
             model: openai/gpt-4o-mini\n      api_base: http://{}/v1\n      api_key: {MOCK_KEY}\n\
             general_settings:\n  master_key: {MASTER_KEY}\nlitellm_settings:\n  telemetry: false\n  \
             turn_off_message_logging: true\n",
            mock.addr
        ),
    )?;
    step(&format!(
        "starting LiteLLM {version} proxy on 127.0.0.1:{port} (1 worker, no database)"
    ));
    let log = std::fs::File::create(env.work.join("litellm.log"))?;
    let proc = Proc::spawn(
        "litellm",
        Command::new(&bin)
            .arg("--config")
            .arg(&cfg)
            .args([
                "--host",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--num_workers",
                "1",
            ])
            .env("LITELLM_LOG", "ERROR")
            .env("LITELLM_TELEMETRY", "False")
            .env("NO_DOCS", "True")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log),
    )?;
    let log = env.work.join("litellm.log");
    Ok(LiteLlm {
        proc,
        port,
        log,
        ready: false,
    })
}

/// The installed LiteLLM version.
pub fn version() -> Option<String> {
    let py = root().join("bench/work/litellm-venv/bin/python");
    command::output(Command::new(py).args([
        "-c",
        "import importlib.metadata as m; print(m.version('litellm'))",
    ]))
    .map(|s| s.trim().to_owned())
}

impl LiteLlm {
    /// Waits until the proxy answers its liveliness probe (bounded), failing if it died.
    /// Then warms it up with `target` (its first calls initialise clients lazily).
    pub fn wait_ready(&mut self, env: &Env, target: &Target) -> Result<()> {
        if self.ready {
            return Ok(());
        }
        let deadline = Instant::now() + Duration::from_secs(240);
        let url = format!("http://127.0.0.1:{}/health/liveliness", self.port);
        while !command::succeeds(Command::new("curl").args(["-sf", "--max-time", "2", &url])) {
            self.proc
                .ensure_running()
                .with_context(|| format!("see {}", self.log.display()))?;
            if Instant::now() > deadline {
                bail!(
                    "LiteLLM did not answer {url} within 240 s; see {}",
                    self.log.display()
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        step("warming LiteLLM up (concurrency 16 for 5 s, not recorded)");
        let w = loadgen::http(
            env,
            target,
            Load::Concurrency(16),
            Duration::ZERO,
            Duration::from_secs(5),
        )?;
        if w["ok"].as_u64().unwrap_or(0) == 0 {
            bail!(
                "LiteLLM answered no chat completion during warm-up: {}; see {}",
                w["errors"],
                self.log.display()
            );
        }
        self.ready = true;
        Ok(())
    }
}
