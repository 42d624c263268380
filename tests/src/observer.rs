//! The observer binary as tests start it: a config with the test's mock providers as extra
//! provider hosts, its stderr and stdout in files, its `/metrics` read with curl. Needs root
//! (eBPF): [`require_root`] fails the test loudly otherwise.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::process::{ChildGuard, free_port, is_root, workspace_bin};

/// Fails the test unless it runs as root: observer tests load eBPF programs.
///
/// # Panics
/// When not root.
pub fn require_root() {
    assert!(
        is_root(),
        "observer tests load eBPF programs and must run as root (CAP_SYS_ADMIN); run `cargo xtask test` as root"
    );
}

/// A running observer; dropping it kills the process.
pub struct Observer {
    _child: ChildGuard,
    stderr: PathBuf,
    metrics_port: u16,
    _dir: tempfile::TempDir,
}

impl Observer {
    /// Starts `observer` (or `observer sniff`) with the mocks as extra providers and waits until
    /// its probes are attached. Without an `[[attribution]]` rule in `extra`, every process is
    /// trusted to name its tenant (`comm = "*"`, `trust_headers = true`).
    pub fn start(
        redis_url: &str,
        providers: &[(&str, &str)],
        extra: &str,
        sniff: bool,
    ) -> Observer {
        let dir = tempfile::tempdir().expect("tempdir");
        let metrics_port = free_port();
        let mut toml = format!(
            "redis_url = \"{redis_url}\"\nmetrics_listen = \"127.0.0.1:{metrics_port}\"\n{extra}\n"
        );
        // The tests' clients name their tenant with X-Tenant-ID; a test that writes its own
        // [[attribution]] rules decides for itself whom the observer trusts.
        if !extra.contains("[[attribution]]") {
            toml.push_str("[[attribution]]\ncomm = \"*\"\ntrust_headers = true\n");
        }
        for (host, kind) in providers {
            toml.push_str(&format!(
                "[[providers]]\nhost = \"{host}\"\nkind = \"{kind}\"\n"
            ));
        }
        let config = dir.path().join("observer.toml");
        std::fs::write(&config, toml).expect("write config");
        let stderr = dir.path().join("stderr.log");
        let stdout = dir.path().join("stdout.log");
        let mut cmd = Command::new(workspace_bin("observer"));
        if sniff {
            cmd.arg("sniff");
        }
        cmd.arg("--config")
            .arg(&config)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1");
        cmd.stdout(std::fs::File::create(&stdout).expect("stdout file"));
        cmd.stderr(std::fs::File::create(&stderr).expect("stderr file"));
        let child = ChildGuard::spawn("observer", &mut cmd);
        let obs = Observer {
            _child: child,
            stderr,
            metrics_port,
            _dir: dir,
        };
        obs.wait_log("observer ready", Duration::from_secs(60));
        obs
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    pub fn stdout(&self) -> String {
        std::fs::read_to_string(self.stderr.with_file_name("stdout.log")).unwrap_or_default()
    }

    pub fn wait_log(&self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.log().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "observer never logged {needle:?}; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn metrics(&self) -> String {
        let out = Command::new("curl")
            .args([
                "-s",
                &format!("http://127.0.0.1:{}/metrics", self.metrics_port),
            ])
            .output()
            .expect("curl metrics");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn metric(&self, name: &str) -> u64 {
        let text = self.metrics();
        text.lines()
            .filter(|l| l.starts_with(name) && !l.starts_with('#'))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .map(|v| v as u64)
            .sum()
    }

    /// Polls `metric` (summed over its labels) until it reaches `at_least`, at most 30 s;
    /// fails naming `what`, with the log and the metrics.
    pub fn wait_metric(&self, metric: &str, at_least: u64, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.metric(metric) < at_least {
            assert!(
                Instant::now() < deadline,
                "{what}: {metric} never reached {at_least}; log:\n{}\nmetrics:\n{}",
                self.log(),
                self.metrics()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// (calls, input tokens, output tokens, nano-USD): what a mock billed, or what a ledger holds.
pub type Billed = (u64, u64, u64, i64);

/// What the mock billed, priced with the builtin price table.
///
/// # Panics
/// When a served model has no price.
pub fn billed(m: &crate::mock::MockProvider) -> Billed {
    billed_calls(&m.ledger().calls())
}

/// What the mock billed for calls that named `tenant` in `X-Tenant-ID`.
///
/// # Panics
/// When a served model has no price.
pub fn billed_tenant(m: &crate::mock::MockProvider, tenant: &str) -> Billed {
    let calls: Vec<_> = m
        .ledger()
        .calls()
        .into_iter()
        .filter(|c| c.header("x-tenant-id") == Some(tenant))
        .collect();
    billed_calls(&calls)
}

/// `calls` priced with the builtin price table.
///
/// # Panics
/// When a served model has no price.
pub fn billed_calls(calls: &[crate::mock::ServedCall]) -> Billed {
    let prices = ledger::price::PriceTable::builtin();
    calls.iter().fold((0, 0, 0, 0), |t, c| {
        (
            t.0 + 1,
            t.1 + c.usage.input_tokens,
            t.2 + c.usage.output_tokens,
            t.3 + prices
                .cost(&c.response_model, &c.usage)
                .nanos()
                .expect("mock model priced")
                .0,
        )
    })
}

/// `tenant`'s figures for this month in the ledger, read once.
///
/// # Panics
/// When Redis cannot be read.
pub fn month_spend(redis_url: &str, tenant: &str) -> ledger::store::TenantSpend {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    let ledger = rt
        .block_on(ledger::store::Ledger::connect(redis_url))
        .expect("ledger connect");
    rt.block_on(ledger.tenant_spend(tenant, ledger::store::Period::Month, chrono::Utc::now()))
        .expect("tenant_spend")
}

/// Waits (at most 15 s) until `tenant`'s month in the ledger shows `want.0` requests, and 300 ms
/// more, then asserts requests, tokens and nano-USD equal `want`, all of it bypass spend seen by the
/// observer.
///
/// # Panics
/// On any difference (with the observer's log), or when `want` has no call.
pub fn assert_ledger(redis_url: &str, tenant: &str, want: Billed, obs: &Observer) {
    assert!(want.0 > 0, "tenant {tenant}: the mock served no call");
    let deadline = Instant::now() + Duration::from_secs(15);
    while month_spend(redis_url, tenant).requests < want.0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    // A moment more: a call recorded twice would show now.
    std::thread::sleep(Duration::from_millis(300));
    let s = month_spend(redis_url, tenant);
    assert_eq!(
        (s.requests, s.input_tokens, s.output_tokens, s.spend.0),
        want,
        "tenant {tenant}: ledger (requests, input, output, nanos) != mock billed; observer log:\n{}\nobserver metrics:\n{}",
        obs.log(),
        obs.metrics()
    );
    assert_eq!(s.bypass_spend.0, want.3, "observer spend is bypass spend");
    assert_eq!(s.by_source.observer.0, want.3, "by_source.observer");
}
