//! The enforcer's subcommands: hash-key, check-config and report (--json shape, observer-only
//! tenants included, a report-only config without keys); start-up refusals; and the process
//! settings docs/enforcer.md gives (huge pages off with `MIMALLOC_ALLOW_THP=0`); the tokenizers built
//! before the listener opens.

mod enforcer_common;

use std::process::Command;
use std::time::Duration;

use enforcer_common::{enforcer_bin, hash_key};
use ledger::Nanos;
use ledger::store::{Ledger, ReserveOutcome, ReserveRequest, Settlement, TokenCounts, UsageRecord};
use llmwarden_tests::redis::RedisServer;
use serde_json::Value;

#[test]
fn hash_key_prints_lowercase_sha256() {
    assert_eq!(
        hash_key("abc"),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
    // A trailing newline from `echo` is not part of the key.
    assert_eq!(hash_key("abc\n"), hash_key("abc"));
}

fn config(dir: &std::path::Path, body: &str) -> std::path::PathBuf {
    let p = dir.join("enforcer.toml");
    std::fs::write(&p, body).expect("write config");
    p
}

#[test]
fn check_config_validates_and_prints_the_effective_config() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = format!(
        "admin_listen = \"off\"\n[providers.groq]\nkind = \"openai-compatible\"\nbase_url = \"https://api.groq.com/openai/v1\"\napi_key_env = \"GROQ_KEY\"\n[[keys]]\nsha256 = \"{}\"\ntenant = \"acme\"\n",
        hash_key("sk-secret-key")
    );
    let out = Command::new(enforcer_bin())
        .arg("check-config")
        .arg("--config")
        .arg(config(dir.path(), &good))
        .output()
        .expect("run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for want in [
        "[providers.openai]",
        "https://api.openai.com/v1",
        "api_key_env = \"GROQ_KEY\"",
        "unknown_model = \"deny\"",
        "[timeouts]",
    ] {
        assert!(
            stdout.contains(want),
            "effective config lacks {want}:\n{stdout}"
        );
    }
    assert!(
        !stdout.contains(&hash_key("sk-secret-key")),
        "full key hash printed:\n{stdout}"
    );

    let bad = "[providers.groq]\nbase_url = \"https://x\"\napi_key_env = \"G\"\n[[keys]]\nsha256 = \"00\"\ntenant = \"a\"\n";
    let out = Command::new(enforcer_bin())
        .arg("check-config")
        .arg("--config")
        .arg(config(dir.path(), bad))
        .output()
        .expect("run");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("providers.groq.kind"),
        "error does not name the key: {stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_json_lists_every_active_tenant() {
    let redis = RedisServer::start();
    let ledger = Ledger::connect(&redis.url()).await.expect("ledger");
    let now = chrono::Utc::now();
    let rr = ReserveRequest {
        tenant: "acme".into(),
        feature: Some("support-bot".into()),
        session: None,
        request_id: "r1".into(),
        provider: "openai".into(),
        model: Some("gpt-4o-mini".into()),
        amount: Nanos(5_000),
        ttl: Duration::from_secs(60),
        caps: vec![],
        at: now,
        rates: Vec::new(),
        tokens: 0,
    };
    assert!(matches!(
        ledger.reserve(&rr).await.expect("reserve"),
        ReserveOutcome::Allowed(_)
    ));
    let s = Settlement {
        meta: Default::default(),
        tenant: "acme".into(),
        request_id: "r1".into(),
        feature: Some("support-bot".into()),
        session: None,
        model: Some("gpt-4o-mini".into()),
        cost: Nanos(1_234),
        tokens: TokenCounts {
            input: 10,
            output: 5,
            ..TokenCounts::default()
        },
        estimated: false,
        started_at: now,
    };
    ledger.settle(&s).await.expect("settle");
    let rec = UsageRecord {
        meta: Default::default(),
        tenant: "shadow".into(),
        event_id: "e1".into(),
        feature: None,
        session: None,
        provider: "openai".into(),
        model: Some("gpt-4o-mini".into()),
        cost: Nanos(777),
        tokens: TokenCounts {
            input: 3,
            output: 2,
            ..TokenCounts::default()
        },
        bypass: true,
        estimated: false,
        at: now,
    };
    ledger.record(&rec).await.expect("record");
    ledger
        .set_budget(&ledger::store::Budget {
            tenant: "acme".into(),
            feature: None,
            period: ledger::store::Period::Month,
            limit: Nanos(10_000),
        })
        .await
        .expect("budget");

    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = format!(
        "admin_listen = \"off\"\nredis_url = \"{}\"\n[[keys]]\nsha256 = \"{}\"\ntenant = \"acme\"\n",
        redis.url(),
        hash_key("k")
    );
    let path = config(dir.path(), &cfg);
    let out = Command::new(enforcer_bin())
        .args(["report", "--json", "--config"])
        .arg(&path)
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(v["period"], now.format("%Y-%m").to_string());
    let tenants = v["tenants"].as_array().expect("tenants");
    let acme = tenants
        .iter()
        .find(|t| t["tenant"] == "acme")
        .unwrap_or_else(|| panic!("no acme in {v}"));
    assert_eq!(acme["spend_nusd"], 1_234);
    assert_eq!(acme["held_nusd"], 0);
    assert_eq!(acme["requests"], 1);
    assert_eq!(acme["input_tokens"], 10);
    assert_eq!(acme["output_tokens"], 5);
    assert_eq!(acme["by_source"]["enforcer"], 1_234);
    assert_eq!(acme["by_source"]["observer"], 0);
    assert_eq!(acme["by_feature"]["support-bot"], 1_234);
    assert_eq!(acme["limits"][0]["limit_nusd"], 10_000);
    let shadow = tenants
        .iter()
        .find(|t| t["tenant"] == "shadow")
        .unwrap_or_else(|| panic!("observer-only tenant missing: {v}"));
    assert_eq!(shadow["bypass_spend_nusd"], 777);
    assert_eq!(shadow["by_source"]["observer"], 777);

    let out = Command::new(enforcer_bin())
        .args(["report", "--tenant", "acme", "--config"])
        .arg(&path)
        .output()
        .expect("run");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("acme") && text.contains("0.000001234"),
        "{text}"
    );

    // An ops user's report-only config: just the ledger, no [[keys]], providers or listeners.
    let path = config(dir.path(), &format!("redis_url = \"{}\"\n", redis.url()));
    let out = Command::new(enforcer_bin())
        .args(["report", "--json", "--config"])
        .arg(&path)
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "a report-only config was refused: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert!(
        v["tenants"]
            .as_array()
            .is_some_and(|t| t.iter().any(|t| t["tenant"] == "acme")),
        "{v}"
    );
    // Serving with the same file works with runtime keys (made with `enforcer keys create`);
    // with runtime keys off it needs [[keys]], and says so.
    let out = Command::new(enforcer_bin())
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = config(
        dir.path(),
        &format!("redis_url = \"{}\"\nruntime_keys = false\n", redis.url()),
    );
    let out = Command::new(enforcer_bin())
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("[[keys]]"),
        "{stderr}"
    );
    // What the report does need is still checked, naming the key.
    let path = config(dir.path(), "redis_url = \"http://nope\"\n");
    let out = Command::new(enforcer_bin())
        .args(["report", "--config"])
        .arg(&path)
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("redis_url"),
        "{stderr}"
    );
}

/// A provider key no HTTP header can carry stops the start with an error that names the
/// variable and never shows the value (it used to be dropped from every call instead, so each
/// call reached the provider without a key).
#[test]
fn serve_refuses_a_provider_key_a_header_cannot_carry() {
    let dir = tempfile::tempdir().expect("tempdir");
    let body = format!(
        "listen = \"127.0.0.1:0\"\nadmin_listen = \"off\"\nredis_url = \"redis://127.0.0.1:1\"\n[providers.groq]\nkind = \"openai-compatible\"\nbase_url = \"https://api.groq.com/openai/v1\"\napi_key_env = \"GROQ_KEY\"\n[[keys]]\nsha256 = \"{}\"\ntenant = \"acme\"\n",
        hash_key("sk-proxy")
    );
    let mut child = Command::new(enforcer_bin())
        .arg("--config")
        .arg(config(dir.path(), &body))
        .env("GROQ_KEY", "sk-secret\u{1}value")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run");
    // A start that goes through would serve until killed.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("the enforcer started with a key no header can carry");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(!status.success());
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut stderr)
        .expect("read stderr");
    assert!(
        stderr.contains("providers.groq.api_key_env") && stderr.contains("GROQ_KEY"),
        "error does not name the variable: {stderr}"
    );
    assert!(!stderr.contains("sk-secret"), "key printed: {stderr}");
}

/// The log the enforcer writes until it says it is listening (then it is stopped).
fn log_until_listening(dir: &std::path::Path, kind: &str) -> String {
    let body = format!(
        "listen = \"127.0.0.1:0\"\nadmin_listen = \"off\"\nredis_url = \"redis://127.0.0.1:1\"\n[providers.p]\nkind = \"{kind}\"\nbase_url = \"https://llm.invalid/v1\"\napi_key_env = \"P_KEY\"\n[[keys]]\nsha256 = \"{}\"\ntenant = \"acme\"\n",
        hash_key("sk-proxy")
    );
    let log = dir.join(format!("{kind}.log"));
    let mut child = Command::new(enforcer_bin())
        .arg("--config")
        .arg(config(dir, &body))
        .env("P_KEY", "sk-upstream")
        // The built-in openai route is available only with its key.
        .env_remove("OPENAI_API_KEY")
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("run");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let text = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("enforcer listening") {
            break text;
        }
        if std::time::Instant::now() > deadline || child.try_wait().expect("wait").is_some() {
            let _ = child.kill();
            panic!("the enforcer did not start listening: {text}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = child.kill();
    let _ = child.wait();
    text
}

/// With an available provider that can carry OpenAI models, both BPE tokenizers are built before
/// the listener opens (the first call that needed one used to build it, stalling every call on its
/// thread for tens of milliseconds); with only Anthropic or Gemini, neither is built.
#[test]
fn serve_builds_the_tokenizers_before_it_listens_when_a_provider_needs_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    for kind in ["openai", "azure-openai", "openai-compatible"] {
        let log = log_until_listening(dir.path(), kind);
        let built = log
            .find("tokenizers loaded")
            .unwrap_or_else(|| panic!("{kind}: {log}"));
        assert!(
            built < log.find("enforcer listening").expect("listening"),
            "{kind}: {log}"
        );
    }
    for kind in ["anthropic", "gemini"] {
        let log = log_until_listening(dir.path(), kind);
        assert!(!log.contains("tokenizers loaded"), "{kind}: {log}");
    }
}

/// `THP_enabled` of process `pid` (`/proc/PID/status`).
fn thp_enabled(pid: u32) -> Option<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("THP_enabled:"))
        .map(|v| v.trim().to_owned())
}

/// `MIMALLOC_ALLOW_THP=0`, the memory-first setting docs/enforcer.md gives, turns transparent huge
/// pages off for the `enforcer` process; without it the process keeps what it inherited.
#[test]
fn mimalloc_allow_thp_0_turns_huge_pages_off_for_the_enforcer() {
    let run = |allow: Option<&str>| {
        let mut c = Command::new(enforcer_bin());
        // hash-key waits for its key on stdin: the process stays up to be looked at.
        c.arg("hash-key")
            .env_remove("MIMALLOC_ALLOW_THP")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null());
        if let Some(v) = allow {
            c.env("MIMALLOC_ALLOW_THP", v);
        }
        c.spawn().expect("run enforcer hash-key")
    };
    let mut off = run(Some("0"));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut seen = thp_enabled(off.id());
    while seen.as_deref() != Some("0") && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
        seen = thp_enabled(off.id());
    }
    let _ = off.kill();
    let _ = off.wait();
    assert_eq!(seen.as_deref(), Some("0"), "huge pages stayed on");

    // Not set: the process keeps this test's own setting.
    let ours = thp_enabled(std::process::id());
    let mut kept = run(None);
    std::thread::sleep(Duration::from_millis(300));
    let theirs = thp_enabled(kept.id());
    let _ = kept.kill();
    let _ = kept.wait();
    assert!(ours.is_some());
    assert_eq!(
        theirs, ours,
        "huge pages changed without MIMALLOC_ALLOW_THP"
    );
}
