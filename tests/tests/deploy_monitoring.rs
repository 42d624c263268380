//! deploy/prometheus and deploy/grafana are checked against the real thing:
//! - `promtool check rules` and `promtool test rules` (unit tests that feed series and state which
//!   alerts fire) pass on the rules file;
//! - every metric the rules and the dashboard query is one the binaries export: an enforcer and an
//!   observer run, serve an allowed call, a denied call and a bypass call, and their `/metrics` are
//!   scraped. A labelled family that has no sample yet (prometheus-client writes a family only
//!   once it has one: failovers, spool, alert deliveries, unmetered connections) must then be a
//!   documented metric of that binary (docs/enforcer.md, docs/observer.md) — a documentation test
//!   per binary keeps those tables equal to what the binaries register.
//!
//! Needs root (the observer loads eBPF programs) and promtool (`cargo xtask setup` installs it).
//! Fails, never skips, without either.

mod enforcer_common;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use enforcer_common::{KEY_ACME, Opts, Stack, UPSTREAM_KEY, http};
use llmwarden_tests::observer::{Observer, require_root};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn promtool(args: &[&str]) {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(repo().join("deploy/prometheus"))
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run promtool ({e}): `cargo xtask setup` installs it as /usr/local/bin/promtool")
        });
    assert!(
        out.status.success(),
        "promtool {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn promtool_checks_and_unit_tests_the_rules() {
    promtool(&["check", "rules", "llmwarden-rules.yml"]);
    promtool(&["test", "rules", "llmwarden-rules.test.yml"]);
}

/// The `llmwarden_*` metric names a text queries (histograms by their family name).
fn queried(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let b = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("llmwarden_") {
        let start = i + at;
        let mut end = start;
        while end < b.len() && (b[end].is_ascii_alphanumeric() || b[end] == b'_') {
            end += 1;
        }
        let name = &text[start..end];
        let family = name
            .strip_suffix("_bucket")
            .or_else(|| name.strip_suffix("_sum"))
            .or_else(|| name.strip_suffix("_count"))
            .unwrap_or(name);
        out.insert(family.to_owned());
        i = end;
    }
    out
}

/// The sample names in a Prometheus text exposition (histograms by their family name).
fn exported(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(|n| {
            n.strip_suffix("_bucket")
                .or_else(|| n.strip_suffix("_sum"))
                .or_else(|| n.strip_suffix("_count"))
                .unwrap_or(n)
                .to_owned()
        })
        .collect()
}

/// Whether `doc` documents metric `name` (a table row names it in backticks, possibly with its
/// labels: `name{a,b}`).
fn documented(doc: &str, name: &str) -> bool {
    doc.contains(&format!("`{name}`")) || doc.contains(&format!("`{name}{{"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_and_rules_query_only_metrics_the_binaries_export() {
    require_root();
    let stack = Stack::start(Opts {
        extra_toml: "[[budgets]]\ntenant = \"acme\"\nfeature = \"capped\"\nperiod = \"day\"\nlimit_usd = 0.000001\n".into(),
        ..Opts::default()
    })
    .await;
    let host = stack.mock.addr().to_string();
    let obs = Observer::start(&stack.redis.url(), &[(&host, "openai")], "", false);
    let body =
        r#"{"model":"gpt-4o-mini","max_tokens":20,"messages":[{"role":"user","content":"hi"}]}"#;
    let client = http();
    for (feature, want) in [("free", 200), ("capped", 402)] {
        let r = client
            .post(format!("{}/chat/completions", stack.base("openai")))
            .bearer_auth(KEY_ACME)
            .header("x-feature-name", feature)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("enforcer call");
        assert_eq!(r.status().as_u16(), want, "feature {feature}");
    }
    let out = Command::new("curl")
        .args(["-sS", "--http1.1", "--fail", "-o", "/dev/null", "--cacert"])
        .arg(stack.mock.ca_pem_path())
        .args([
            "-H",
            "content-type: application/json",
            "-H",
            "x-tenant-id: t-direct",
        ])
        .args(["-H", &format!("authorization: Bearer {UPSTREAM_KEY}")])
        .args(["-d", body])
        .arg(format!("{}/v1/chat/completions", stack.mock.https_url()))
        .output()
        .expect("curl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    // The call, and the connection's end (its verdict is written when curl's socket closes).
    while (obs.metric("llmwarden_observer_calls_total") == 0
        || obs.metric("llmwarden_observer_provider_connections_total") == 0)
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let live: BTreeSet<String> = exported(&stack.metrics().await)
        .union(&exported(&obs.metrics()))
        .cloned()
        .collect();
    let root = repo();
    let read =
        |p: &str| std::fs::read_to_string(root.join(p)).unwrap_or_else(|e| panic!("read {p}: {e}"));
    let dashboard = read("deploy/grafana/llmwarden-dashboard.json");
    let json: serde_json::Value = serde_json::from_str(&dashboard).expect("dashboard is JSON");
    let panels = json["panels"].as_array().expect("panels");
    let mut exprs = String::new();
    for p in panels.iter().filter(|p| p["type"] != "row") {
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel {} has no query", p["title"]);
        for t in targets {
            exprs.push_str(t["expr"].as_str().expect("expr"));
            exprs.push('\n');
        }
    }
    let rules = read("deploy/prometheus/llmwarden-rules.yml");
    let docs = [read("docs/enforcer.md"), read("docs/observer.md")];
    let mut by_doc = Vec::new();
    for (what, text) in [("dashboard", &exprs), ("rules", &rules)] {
        let names = queried(text);
        assert!(names.len() > 8, "{what}: {names:?}");
        for n in &names {
            if live.contains(n) {
                continue;
            }
            assert!(
                docs.iter().any(|d| documented(d, n)),
                "{what} queries {n}, which neither binary exports nor documents.\nlive: {live:?}"
            );
            by_doc.push(format!("{what}: {n}"));
        }
    }
    // The figures the dashboard is for are live, not only documented.
    for n in [
        "llmwarden_requests_total",
        "llmwarden_denials_total",
        "llmwarden_cost_nanousd_total",
        "llmwarden_overhead_seconds",
        "llmwarden_observer_calls_total",
        "llmwarden_observer_cost_nanousd_total",
        "llmwarden_observer_provider_connections_total",
        "llmwarden_observer_kernel_drops",
    ] {
        assert!(
            live.contains(n),
            "{n} is not exported after the calls: {live:?}"
        );
    }
    eprintln!("checked against the docs only (no sample yet): {by_doc:?}");
}

#[test]
fn name_extraction() {
    assert_eq!(
        queried(
            "histogram_quantile(0.99, sum by (le) (rate(llmwarden_overhead_seconds_bucket[5m]))) / llmwarden_x_total"
        ),
        ["llmwarden_overhead_seconds", "llmwarden_x_total"]
            .into_iter()
            .map(String::from)
            .collect()
    );
    assert_eq!(
        exported(
            "# HELP a\nllmwarden_a_total{x=\"1\"} 3\nllmwarden_h_bucket{le=\"1\"} 1\nllmwarden_g 2\n"
        ),
        ["llmwarden_a_total", "llmwarden_h", "llmwarden_g"]
            .into_iter()
            .map(String::from)
            .collect()
    );
}
