use ledger::Nanos;

use super::*;

const KEY: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

fn minimal() -> String {
    format!("[[keys]]\nsha256 = \"{KEY}\"\ntenant = \"acme\"\n")
}

#[test]
fn defaults_and_builtins() {
    let c = Config::parse(&minimal()).unwrap();
    assert_eq!(c.listen, "127.0.0.1:8080");
    assert_eq!(c.unknown_model, UnknownModel::Deny);
    assert_eq!(c.on_redis_unavailable, OnRedisUnavailable::Deny);
    let p = c.resolved_providers().unwrap();
    assert_eq!(p["openai"].base_url, "https://api.openai.com/v1");
    assert_eq!(p["anthropic"].kind, ProviderKind::Anthropic);
    assert_eq!(
        p["gemini"].base_url,
        "https://generativelanguage.googleapis.com"
    );
}

#[test]
fn full_file() {
    let text = format!(
        r#"
listen = "127.0.0.1:9000"
admin_listen = "off"
unknown_model = "allow"
on_redis_unavailable = "allow"
unseen_context_tokens = 50000
[timeouts]
connect_ms = 100
[session]
limit_usd = 1.5
max_requests_per_minute = 60
max_identical_requests = 3
[providers.openai]
base_url = "http://127.0.0.1:1/v1/"
api_key_env = "X"
[providers.groq]
kind = "openai-compatible"
base_url = "https://api.groq.com/openai/v1"
api_key_env = "GROQ"
[[budgets]]
tenant = "*"
period = "month"
limit_usd = 0.1
{}"#,
        minimal()
    );
    let c = Config::parse(&text).unwrap();
    assert!(c.admin_addr().is_none());
    assert_eq!(c.timeouts.connect_ms, 100);
    assert_eq!(c.timeouts.idle_ms, Timeouts::default().idle_ms);
    assert_eq!(c.session_cap(), Some(Nanos(1_500_000_000)));
    let p = c.resolved_providers().unwrap();
    assert_eq!(p["openai"].base_url, "http://127.0.0.1:1/v1");
    assert_eq!(p["groq"].kind, ProviderKind::OpenAiCompatible);
    assert_eq!(c.ledger_budgets().unwrap()[0].limit, Nanos(100_000_000));
    let eff = c.effective_toml();
    assert!(
        eff.contains("api_key_env = \"GROQ\"") && !eff.contains(KEY),
        "{eff}"
    );
}

#[test]
fn errors_name_the_key() {
    let e = Config::parse(&format!("lisen = \"x\"\n{}", minimal())).unwrap_err();
    assert!(e.reason.contains("lisen"), "{e}");
    let e = Config::parse(&format!(
        "[providers.groq]\nbase_url = \"http://x\"\napi_key_env = \"G\"\n{}",
        minimal()
    ))
    .unwrap_err();
    assert_eq!(e.key, "providers.groq.kind");
    let e = Config::parse("[[keys]]\nsha256 = \"abc\"\ntenant = \"a\"\n").unwrap_err();
    assert_eq!(e.key, "keys[0].sha256");
    let e = Config::parse(&format!("listen = \"nope\"\n{}", minimal())).unwrap_err();
    assert_eq!(e.key, "listen");
    let e = Config::parse(&format!("[timeouts]\nidle_ms = 0\n{}", minimal())).unwrap_err();
    assert_eq!(e.key, "timeouts.idle_ms");
    let e = Config::parse(&format!(
        "[[budgets]]\ntenant = \"a\"\nperiod = \"year\"\nlimit_usd = 1\n{}",
        minimal()
    ))
    .unwrap_err();
    assert!(
        e.reason.contains("year") || e.reason.contains("variant"),
        "{e}"
    );
    // The removed output clamp is refused with the fix, not silently ignored.
    let e = Config::parse(&format!("max_output_tokens_cap = 4096\n{}", minimal())).unwrap_err();
    assert_eq!(e.key, "max_output_tokens_cap");
    assert!(e.reason.contains("output_token_limits"), "{e}");
    let e = Config::parse(&format!("settle_window_ms = 1001\n{}", minimal())).unwrap_err();
    assert_eq!(e.key, "settle_window_ms");
    let c = Config::parse(&format!("settle_window_ms = 0\n{}", minimal())).expect("0 is valid");
    let l = c
        .ledger_config(std::time::Duration::from_secs(1))
        .expect("ledger config");
    assert_eq!(l.settle_window, std::time::Duration::ZERO);
    let c = Config::parse(&minimal()).expect("default");
    let l = c
        .ledger_config(std::time::Duration::from_secs(1))
        .expect("ledger config");
    assert_eq!(l.settle_window, std::time::Duration::from_millis(2));
    // Unset, a lease pool picks the longer window; set, the value wins either way.
    let c = Config::parse(&format!("lease_pool = 16\n{}", minimal())).expect("pool");
    assert_eq!(c.settle_window(), std::time::Duration::from_millis(100));
    // The wait counts against the settle's Redis timeout: the default keeps to a quarter of it,
    // and a window as long as the timeout is refused by name.
    let c = Config::parse(&format!(
        "lease_pool = 16\n[timeouts]\nredis_ms = 200\n{}",
        minimal()
    ))
    .expect("pool and a short Redis timeout");
    assert_eq!(c.settle_window(), std::time::Duration::from_millis(50));
    let e = Config::parse(&format!(
        "settle_window_ms = 500\n[timeouts]\nredis_ms = 500\n{}",
        minimal()
    ))
    .unwrap_err();
    assert_eq!(e.key, "settle_window_ms");
    assert!(e.reason.contains("timeouts.redis_ms (500)"), "{e}");
    let c = Config::parse(&format!(
        "lease_pool = 16\nsettle_window_ms = 2\n{}",
        minimal()
    ))
    .expect("pool and window");
    assert_eq!(c.settle_window(), std::time::Duration::from_millis(2));
}

#[test]
fn lease_pool_settings_are_bounded_by_name() {
    let c = Config::parse(&minimal()).expect("default");
    assert_eq!(
        (c.lease_pool, c.lease_idle_secs, c.lease_max_usd),
        (0, 10, 1.0),
        "off by default"
    );
    let c = Config::parse(&format!(
        "lease_pool = 64
{}",
        minimal()
    ))
    .expect("64 is valid");
    assert_eq!(c.lease_pool, 64);
    for (line, key) in [
        ("lease_pool = 65", "lease_pool"),
        ("lease_idle_secs = 0", "lease_idle_secs"),
        ("lease_idle_secs = 3601", "lease_idle_secs"),
        ("lease_max_usd = 0.0", "lease_max_usd"),
        ("lease_max_usd = -1.0", "lease_max_usd"),
        ("lease_max_usd = 70000.01", "lease_max_usd"),
    ] {
        let e = Config::parse(&format!("{line}\n{}", minimal())).unwrap_err();
        assert_eq!(e.key, key, "{line}: {e}");
    }
}

#[test]
fn inflight_budget_must_hold_the_largest_request() {
    let c = Config::parse(&minimal()).unwrap();
    assert_eq!(c.max_inflight_body_bytes, 96 << 20);
    let ok = format!(
        "max_request_body_bytes = 1048576\nmax_inflight_body_bytes = 3145728\n{}",
        minimal()
    );
    assert!(Config::parse(&ok).is_ok());
    let small = format!("max_inflight_body_bytes = 33554432\n{}", minimal());
    let e = Config::parse(&small).unwrap_err().to_string();
    assert!(
        e.contains("max_inflight_body_bytes") && e.contains("max_request_body_bytes"),
        "{e}"
    );
}

#[test]
fn failover_routes_are_checked() {
    let with = |t: &str| Config::parse(&format!("{t}\n{}", minimal()));
    let c = with(
        "[providers.openai]\nweight = 3\nfailover = [\"openai-eu\"]\n\
         [providers.openai-eu]\nkind = \"openai\"\nbase_url = \"https://eu.example\"\napi_key_env = \"E\"\n",
    )
    .unwrap();
    let p = c.resolved_providers().unwrap();
    assert_eq!(
        (p["openai"].weight, p["openai"].failover.clone()),
        (3, vec!["openai-eu".to_owned()])
    );
    for (toml, key) in [
        (
            "[providers.openai]\nfailover = [\"nope\"]\n",
            "providers.openai.failover[0]",
        ),
        (
            "[providers.openai]\nfailover = [\"openai\"]\n",
            "providers.openai.failover[0]",
        ),
        (
            "[providers.openai]\nfailover = [\"anthropic\"]\n",
            "providers.openai.failover[0]",
        ),
        (
            "[providers.openai]\nweight = 1001\n",
            "providers.openai.weight",
        ),
        // An azure-openai failover of an OpenAI route needs deployments and an api-version.
        (
            "[providers.openai]\nfailover = [\"az\"]\n[providers.az]\nkind = \"azure-openai\"\nbase_url = \"https://az.example\"\napi_key_env = \"A\"\n",
            "providers.openai.failover[0]",
        ),
        (
            "[providers.openai]\ndeployments = { \"gpt-4o\" = \"d\" }\n",
            "providers.openai.deployments",
        ),
        (
            "[providers.az]\nkind = \"azure-openai\"\nbase_url = \"https://az.example\"\napi_key_env = \"A\"\ndeployments = { \"gpt-4o\" = \"a/b\" }\n",
            "providers.az.deployments",
        ),
    ] {
        let e = with(toml)
            .and_then(|c| c.resolved_providers().map(|_| c))
            .unwrap_err();
        assert_eq!(e.key, key, "{toml}");
    }
}

#[test]
fn an_azure_deployment_route_can_back_up_an_openai_route() {
    let c = Config::parse(&format!(
        "[providers.openai]\nfailover = [\"az\"]\n[providers.az]\nkind = \"azure-openai\"\n\
         base_url = \"https://az.example\"\napi_key_env = \"A\"\napi_version = \"2024-10-21\"\n\
         deployments = {{ \"gpt-4o-mini\" = \"mini-eu\" }}\n{}",
        minimal()
    ))
    .unwrap();
    let p = c.resolved_providers().unwrap();
    assert_eq!(p["az"].deployments["gpt-4o-mini"], "mini-eu");
    assert_eq!(p["az"].api_version.as_deref(), Some("2024-10-21"));
}

#[test]
fn downgrades_are_checked() {
    let with = |t: &str| Config::parse(&format!("{t}\n{}", minimal()));
    with("[[downgrades]]\nfrom = \"gpt-4o\"\nto = [\"gpt-4o-mini\"]\n").unwrap();
    with("[[downgrades]]\nfrom = \"gpt-4o\"\nto = [\"gpt-4o-mini\"]\nroute = \"gemini\"\n")
        .unwrap();
    for (toml, key) in [
        (
            "[[downgrades]]\nfrom = \"gpt-4o\"\nto = []\n",
            "downgrades[0].to",
        ),
        (
            "[[downgrades]]\nfrom = \"[x\"\nto = [\"m\"]\n",
            "downgrades[0].from",
        ),
        (
            "[[downgrades]]\ntenant = \"a|b\"\nfrom = \"m\"\nto = [\"n\"]\n",
            "downgrades[0].tenant",
        ),
        (
            "[[downgrades]]\nfrom = \"m\"\nto = [\"n\"]\nroute = \"nowhere\"\n",
            "downgrades[0].route",
        ),
    ] {
        assert_eq!(with(toml).unwrap_err().key, key, "{toml}");
    }
}
