//! Shared harness of the enforcer integration tests: a real redis-server, the mock provider over
//! real TLS (OpenAI) and plain HTTP (Anthropic, Gemini), and the `enforcer` binary between them,
//! its log captured to a file so tests can scan it for leaked keys and prompts.

#![allow(
    dead_code,
    reason = "each test binary uses a different part of the harness"
)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ledger::Nanos;
use ledger::store::{Ledger, Period, TenantSpend};
use llmwarden_tests::mock::{MockConfig, MockProvider};
use llmwarden_tests::process::{ChildGuard, free_port, workspace_bin};
use llmwarden_tests::redis::RedisServer;

/// The key apps present (tenant acme, may also bill beta).
pub const KEY_ACME: &str = "sk-warden-acme-4f9c2e7d";
/// A second key (tenant ops, may bill any tenant, new ones included: `mint_tenants = true`).
pub const KEY_OPS: &str = "sk-warden-ops-91b3aa01";
/// A key with `allowed_tenants = ["*"]` that may not mint tenants (bills only provisioned ones).
pub const KEY_WILD: &str = "sk-warden-wild-0c2d9e44";
/// A key of tenant acme bound to the features support-bot (default) and triage.
pub const KEY_BOUND: &str = "sk-warden-bound-7a61f3b2";
/// The real upstream key the enforcer holds and the mock requires.
pub const UPSTREAM_KEY: &str = "sk-real-upstream-77e1c0";
/// Admin bearer token.
pub const ADMIN_TOKEN: &str = "admin-token-5d1e";

/// Runs `enforcer hash-key` on `key`.
pub fn hash_key(key: &str) -> String {
    use std::io::Write as _;
    let mut child = Command::new(workspace_bin("enforcer"))
        .arg("hash-key")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn enforcer hash-key");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(key.as_bytes())
        .expect("write key");
    let out = child.wait_with_output().expect("hash-key output");
    assert!(out.status.success(), "enforcer hash-key failed: {out:?}");
    String::from_utf8(out.stdout)
        .expect("utf8")
        .trim()
        .to_owned()
}

/// Extra knobs for a stack (`top_toml` must use dotted keys, e.g. `timeouts.idle_ms = 500`).
#[derive(Debug, Clone, Default)]
pub struct Opts {
    /// Top-level TOML keys put before any table (unknown_model, timeouts via dotted keys, ...).
    pub top_toml: String,
    /// TOML appended to the generated config (budgets, session, ...). `@MOCK_HTTPS@`,
    /// `@MOCK_HTTP@` and `@MOCK_CA@` are replaced with the stack's mock URLs and CA file.
    pub extra_toml: String,
    /// Mock config changes.
    pub mock_output_tokens: Option<u64>,
    /// Mock stream chunk delay.
    pub mock_chunk_delay: Option<Duration>,
    /// The mock offers `h2` in ALPN (its TLS port; the enforcer's `openai` route uses it).
    pub mock_h2: bool,
    /// RLIMIT_NOFILE for the enforcer process (file descriptor exhaustion tests).
    pub nofile: Option<u64>,
    /// Redis over TLS only, with an ACL user whose password the enforcer reads from the
    /// environment (`RedisServer::start_tls`); the stack's own ledger connects the same way.
    pub redis_tls: bool,
}

/// A running redis + mock + enforcer.
pub struct Stack {
    /// The enforcer process (killed on drop).
    pub enforcer: ChildGuard,
    /// The mock provider.
    pub mock: MockProvider,
    /// Redis.
    pub redis: RedisServer,
    /// Proxy port.
    pub port: u16,
    /// Admin port.
    pub admin_port: u16,
    /// Scratch dir (config, log).
    pub dir: tempfile::TempDir,
    /// The ledger, for checks.
    pub ledger: Ledger,
}

impl Stack {
    /// Starts everything and waits until the enforcer listens.
    pub async fn start(opts: Opts) -> Stack {
        let redis = if opts.redis_tls {
            RedisServer::start_tls()
        } else {
            RedisServer::start()
        };
        let (redis_url, redis_creds) = if opts.redis_tls {
            (
                redis.tls_url(),
                format!(
                    "redis_password_env = \"TEST_REDIS_PASSWORD\"\n    redis_ca_file = \"{}\"",
                    redis.ca_path().display()
                ),
            )
        } else {
            (redis.url(), String::new())
        };
        let mut mc = MockConfig {
            require_key: Some(UPSTREAM_KEY.to_owned()),
            ..MockConfig::default()
        };
        if let Some(n) = opts.mock_output_tokens {
            mc.output_tokens = n;
        }
        mc.h2 = opts.mock_h2;
        if let Some(d) = opts.mock_chunk_delay {
            mc.chunk_delay = d;
        }
        let mock = MockProvider::start(mc).await;
        let dir = tempfile::tempdir().expect("tempdir");
        // A port picked by free_port() can be taken by a concurrent test before the enforcer binds
        // it; start again with fresh ports when that is why it exited.
        let mut attempt = 0;
        let (enforcer, port, admin_port) = loop {
            attempt += 1;
            let port = free_port();
            let admin_port = free_port();
            let cfg = format!(
                r#"
    {top}
    listen = "127.0.0.1:{port}"
    admin_listen = "127.0.0.1:{admin_port}"
    admin_token_env = "TEST_WARDEN_ADMIN_TOKEN"
    redis_url = "{redis}"
    {redis_creds}
    {spool}

    [providers.openai]
    base_url = "{https}/v1"
    api_key_env = "TEST_MOCK_KEY"
    ca_file = "{ca}"

    [providers.anthropic]
    base_url = "{http}"
    api_key_env = "TEST_MOCK_KEY"

    [providers.gemini]
    base_url = "{http}"
    api_key_env = "TEST_MOCK_KEY"

    [[keys]]
    sha256 = "{h_acme}"
    tenant = "acme"
    allowed_tenants = ["beta"]

    [[keys]]
    sha256 = "{h_ops}"
    tenant = "ops"
    allowed_tenants = ["*"]
    mint_tenants = true

    [[keys]]
    sha256 = "{h_wild}"
    tenant = "wild"
    allowed_tenants = ["*"]

    [[keys]]
    sha256 = "{h_bound}"
    tenant = "acme"
    features = ["support-bot", "triage"]
    {extra}
    "#,
                redis = redis_url,
                // Keep the spool in the test's temp dir unless the test chose one.
                spool = if opts.top_toml.contains("spool_dir") {
                    String::new()
                } else {
                    format!("spool_dir = \"{}\"", dir.path().join("spool").display())
                },
                https = mock.https_url(),
                http = mock.http_url(),
                ca = mock.ca_pem_path().display(),
                h_acme = hash_key(KEY_ACME),
                h_ops = hash_key(KEY_OPS),
                h_wild = hash_key(KEY_WILD),
                h_bound = hash_key(KEY_BOUND),
                extra = opts
                    .extra_toml
                    .replace("@MOCK_HTTPS@", &mock.https_url())
                    .replace("@MOCK_HTTP@", &mock.http_url())
                    .replace("@MOCK_CA@", &mock.ca_pem_path().display().to_string()),
                top = opts.top_toml,
            );
            let cfg_path = dir.path().join("enforcer.toml");
            std::fs::write(&cfg_path, cfg).expect("write config");
            let log = std::fs::File::create(dir.path().join("enforcer.log")).expect("log file");
            let mut cmd = Command::new(workspace_bin("enforcer"));
            cmd.arg("--config")
                .arg(&cfg_path)
                .env("TEST_MOCK_KEY", UPSTREAM_KEY)
                .env("TEST_WARDEN_ADMIN_TOKEN", ADMIN_TOKEN)
                .env("TEST_REDIS_PASSWORD", llmwarden_tests::redis::TLS_PASSWORD)
                .env(
                    "ENFORCER_LOG",
                    "debug,hyper=info,h2=info,rustls=info,redis=info",
                )
                .stdout(Stdio::null())
                .stderr(log);
            if let Some(n) = opts.nofile {
                limit_open_files(&mut cmd, n);
            }
            let mut enforcer = ChildGuard::spawn("enforcer", &mut cmd);
            let log =
                || std::fs::read_to_string(dir.path().join("enforcer.log")).unwrap_or_default();
            let deadline = Instant::now() + Duration::from_secs(15);
            let listening = |p: u16| std::net::TcpStream::connect(("127.0.0.1", p)).is_ok();
            while !(listening(port) && listening(admin_port)) && enforcer.is_running() {
                assert!(
                    Instant::now() < deadline,
                    "the enforcer does not listen on {port} and {admin_port} after 15 s:\n{}",
                    log()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            if enforcer.is_running() {
                break (enforcer, port, admin_port);
            }
            let out = log();
            assert!(
                attempt < 3 && out.contains("in use"),
                "the enforcer exited at start:\n{out}"
            );
        };
        let ledger = if opts.redis_tls {
            let lcfg = ledger::store::LedgerConfig {
                password: Some(llmwarden_tests::redis::TLS_PASSWORD.to_owned()),
                tls_ca_pem: Some(std::fs::read(redis.ca_path()).expect("read redis CA")),
                ..ledger::store::LedgerConfig::default()
            };
            Ledger::connect_with(&redis_url, lcfg).await
        } else {
            Ledger::connect(&redis.url()).await
        }
        .expect("connect ledger");
        Stack {
            enforcer,
            mock,
            redis,
            port,
            admin_port,
            dir,
            ledger,
        }
    }

    /// `http://127.0.0.1:PORT/proxy/{provider}`.
    pub fn base(&self, provider: &str) -> String {
        format!("http://127.0.0.1:{}/proxy/{provider}", self.port)
    }

    /// The admin listener's `/metrics` text.
    #[allow(dead_code)] // Not every test binary that includes this module reads metrics.
    pub async fn metrics(&self) -> String {
        http()
            .get(format!("{}/metrics", self.admin()))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("metrics text")
    }

    /// `http://127.0.0.1:ADMIN`.
    pub fn admin(&self) -> String {
        format!("http://127.0.0.1:{}", self.admin_port)
    }

    /// Path of the config file.
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("enforcer.toml")
    }

    /// The enforcer's log so far. It writes info lines in batches every 50 ms (warnings at once;
    /// `enforcer/src/logs.rs`), so this waits for the batch in flight first.
    pub fn log(&self) -> String {
        std::thread::sleep(Duration::from_millis(120));
        std::fs::read_to_string(self.dir.path().join("enforcer.log")).expect("read enforcer log")
    }

    /// A second enforcer on the same config, Redis and mock (its own ports, instance id and
    /// spool): a replica. Returns it with its proxy and admin ports once both listen.
    pub fn start_replica(&self, name: &str) -> (ChildGuard, u16, u16) {
        let (port, admin_port) = (free_port(), free_port());
        let cfg = std::fs::read_to_string(self.config_path())
            .expect("config")
            .replace(
                &format!("listen = \"127.0.0.1:{}\"", self.port),
                &format!("listen = \"127.0.0.1:{port}\""),
            )
            .replace(
                &format!("admin_listen = \"127.0.0.1:{}\"", self.admin_port),
                &format!("admin_listen = \"127.0.0.1:{admin_port}\""),
            )
            .replace(
                "spool_dir = \"",
                &format!("instance_id = \"{name}\"\nspool_dir = \""),
            )
            .replace("/spool\"", &format!("/spool-{name}\""));
        let cfg_path = self.dir.path().join(format!("{name}.toml"));
        std::fs::write(&cfg_path, cfg).expect("write replica config");
        let log = std::fs::File::create(self.dir.path().join(format!("{name}.log"))).expect("log");
        let mut cmd = Command::new(workspace_bin("enforcer"));
        cmd.arg("--config")
            .arg(&cfg_path)
            .env("TEST_MOCK_KEY", UPSTREAM_KEY)
            .env("TEST_WARDEN_ADMIN_TOKEN", ADMIN_TOKEN)
            .env(
                "ENFORCER_LOG",
                "debug,hyper=info,h2=info,rustls=info,redis=info",
            )
            .stdout(Stdio::null())
            .stderr(log);
        let child = ChildGuard::spawn("enforcer replica", &mut cmd);
        for p in [port, admin_port] {
            llmwarden_tests::process::wait_for_port(
                std::net::SocketAddr::from(([127, 0, 0, 1], p)),
                Duration::from_secs(15),
            );
        }
        (child, port, admin_port)
    }

    /// The tenant's month figures.
    pub async fn spend(&self, tenant: &str) -> TenantSpend {
        self.ledger
            .tenant_spend(tenant, Period::Month, chrono::Utc::now())
            .await
            .expect("tenant_spend")
    }

    /// Waits until nothing is held for `tenant` and `requests` calls are committed; returns the figures.
    pub async fn settled(&self, tenant: &str, requests: u64) -> TenantSpend {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let s = self.spend(tenant).await;
            if s.held == Nanos::ZERO && s.requests >= requests {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "tenant {tenant} did not settle: {s:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Starts `cmd` with at most `n` open file descriptors.
fn limit_open_files(cmd: &mut Command, n: u64) {
    use std::os::unix::process::CommandExt;
    let limit = libc::rlimit {
        rlim_cur: n,
        rlim_max: n,
    };
    // SAFETY: setrlimit is async-signal-safe and touches only the child between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raw const limit) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
}

/// A reqwest client that never retries and speaks plain HTTP to the enforcer.
pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("reqwest client")
}

/// The enforcer binary, for CLI tests.
pub fn enforcer_bin() -> PathBuf {
    workspace_bin("enforcer")
}

/// Asserts `haystack` does not contain `needle`, naming what leaked.
pub fn assert_absent(haystack: &str, needle: &str, what: &str, where_: &Path) {
    assert!(
        !haystack.contains(needle),
        "{what} ({needle:?}) leaked into {}",
        where_.display()
    );
}

/// Nano-USD as the enforcer's header format ("0.000034500").
pub fn usd(n: Nanos) -> String {
    format!("{}.{:09}", n.0 / 1_000_000_000, n.0 % 1_000_000_000)
}
