//! Proxy keys made at runtime, on two enforcer replicas sharing one Redis: a key created on one
//! works on the other within a second, a revoked one is refused everywhere within a second, a
//! rotation keeps the old secret for its grace only, expiry is exact, `allowed_models` and
//! `allowed_providers` are enforced, and no secret reaches Redis, a listing or a log.

mod enforcer_common;

use std::time::{Duration, Instant};

use enforcer_common::{ADMIN_TOKEN, Opts, Stack, assert_absent, enforcer_bin, http};
use serde_json::{Value, json};

const CHAT: &str = "/chat/completions";

fn chat(model: &str) -> Value {
    json!({"model": model, "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]})
}

/// Status and error code of a chat call through `base` (`http://.../proxy/openai`).
async fn call(base: &str, key: &str, model: &str) -> (u16, String) {
    let r = http()
        .post(format!("{base}{CHAT}"))
        .bearer_auth(key)
        .json(&chat(model))
        .send()
        .await
        .expect("POST chat");
    let status = r.status().as_u16();
    let v: Value = r.json().await.unwrap_or(Value::Null);
    (
        status,
        v["error"]["code"].as_str().unwrap_or_default().to_owned(),
    )
}

/// Polls until a call with `key` through `base` gets `want`; returns when the attempt that got
/// it was sent (the first call on a fresh enforcer takes a while itself: tokenizer, upstream TLS).
async fn until_status(base: &str, key: &str, want: u16, within: Duration) -> Duration {
    let t0 = Instant::now();
    loop {
        let sent = t0.elapsed();
        let (st, code) = call(base, key, "gpt-4o-mini").await;
        if st == want {
            return sent;
        }
        assert!(
            sent < within,
            "{base}: still {st} {code} after {within:?}, want {want}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn admin(method: reqwest::Method, url: String, body: Option<Value>) -> (u16, Value) {
    let mut rb = http().request(method, url).bearer_auth(ADMIN_TOKEN);
    if let Some(b) = body {
        rb = rb.json(&b);
    }
    let r = rb.send().await.expect("admin request");
    let st = r.status().as_u16();
    (st, r.json().await.unwrap_or(Value::Null))
}

fn base(port: u16) -> String {
    format!("http://127.0.0.1:{port}/proxy/openai")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_keys_are_live_revoked_rotated_and_expire_on_every_replica() {
    let stack = Stack::start(Opts::default()).await;
    let (_b, b_port, b_admin) = stack.start_replica("replica-b");
    let (a, b) = (stack.base("openai"), base(b_port));
    let b_admin = format!("http://127.0.0.1:{b_admin}");

    // Created on A: works on A at once, on B within a second; bills the key's tenant.
    let (st, created) = admin(
        reqwest::Method::POST,
        format!("{}/keys", stack.admin()),
        Some(
            json!({"tenant": "rk-tenant", "allowed_models": ["gpt-4o-mini*"],
                    "allowed_providers": ["openai"], "metadata": {"owner": "team-x"}}),
        ),
    )
    .await;
    assert_eq!(st, 201, "{created}");
    let secret = created["secret"].as_str().expect("secret").to_owned();
    let id = created["key"]["id"].as_str().expect("id").to_owned();
    assert!(
        secret.starts_with("llmw-") && secret.len() == 69,
        "{secret}"
    );
    let live_b = until_status(&b, &secret, 200, Duration::from_secs(1)).await;
    println!("created on A, live on B after {live_b:?}");
    assert_eq!(call(&a, &secret, "gpt-4o-mini").await.0, 200);
    assert_eq!(stack.settled("rk-tenant", 2).await.requests, 2);

    // What the key may not do, refused before anything is held.
    assert_eq!(
        call(&a, &secret, "gpt-4o").await,
        (403, "model_forbidden".to_owned())
    );
    let r = http()
        .post(format!("{}/v1/messages", stack.base("anthropic")))
        .header("x-api-key", &secret)
        .json(&json!({"model": "claude-haiku-4-5", "max_tokens": 8,
                      "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .expect("anthropic call");
    assert_eq!(r.status().as_u16(), 403);
    assert!(
        r.text()
            .await
            .unwrap_or_default()
            .contains("allowed_providers"),
        "provider refusal names the rule"
    );
    assert_eq!(
        stack.spend("rk-tenant").await.requests,
        2,
        "refusals cost nothing"
    );

    // Listed and read back on B, without the secret; Redis holds only its hash.
    let (st, list) = admin(reqwest::Method::GET, format!("{b_admin}/keys"), None).await;
    assert_eq!(st, 200);
    let listed = list["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .find(|k| k["id"] == id.as_str())
        .expect("the key is listed")
        .clone();
    assert_eq!(listed["status"], "active");
    assert_eq!(listed["metadata"]["owner"], "team-x");
    let stored = stack.redis.command(&["HGET", "llmw:apikeys", &id]);
    assert_absent(&list.to_string(), &secret, "a key secret", stack.dir.path());
    assert_absent(&stored, &secret, "a key secret", stack.dir.path());
    assert!(
        stored.contains(&ledger::store::secret_hash(&secret)),
        "{stored}"
    );

    // Rotated on B with a 2 s grace: the new secret works on A within a second, the old one
    // until the grace ends, then on neither.
    let (st, rotated) = admin(
        reqwest::Method::POST,
        format!("{b_admin}/keys/{id}/rotate"),
        Some(json!({"grace_secs": 2})),
    )
    .await;
    assert_eq!(st, 200, "{rotated}");
    let rotated_at = Instant::now();
    let new_secret = rotated["secret"].as_str().expect("secret").to_owned();
    assert_ne!(new_secret, secret);
    until_status(&a, &new_secret, 200, Duration::from_secs(1)).await;
    assert_eq!(
        call(&a, &secret, "gpt-4o-mini").await.0,
        200,
        "old secret in its grace"
    );
    let left = Duration::from_secs(2).saturating_sub(rotated_at.elapsed());
    tokio::time::sleep(left + Duration::from_millis(100)).await;
    for port in [stack.port, b_port] {
        assert_eq!(
            call(&base(port), &secret, "gpt-4o-mini").await,
            (401, "invalid_api_key".to_owned()),
            "old secret after its grace"
        );
    }

    // Revoked on A: refused on B within a second, kept (revoked) in the listing.
    let (st, _) = admin(
        reqwest::Method::DELETE,
        format!("{}/keys/{id}", stack.admin()),
        None,
    )
    .await;
    assert_eq!(st, 200);
    let refused_b = until_status(&b, &new_secret, 401, Duration::from_secs(1)).await;
    println!("revoked on A, refused on B after {refused_b:?}");
    assert_eq!(call(&a, &new_secret, "gpt-4o-mini").await.0, 401);
    let (_, one) = admin(reqwest::Method::GET, format!("{b_admin}/keys/{id}"), None).await;
    assert_eq!(one["status"], "revoked", "{one}");

    // Expiry is checked at each call, not at reload.
    let expires_at = chrono::Utc::now() + chrono::Duration::milliseconds(1500);
    let (st, short) = admin(
        reqwest::Method::POST,
        format!("{}/keys", stack.admin()),
        Some(json!({"tenant": "rk-tenant", "expires_at": expires_at})),
    )
    .await;
    assert_eq!(st, 201, "{short}");
    let short_secret = short["secret"].as_str().expect("secret").to_owned();
    until_status(&b, &short_secret, 200, Duration::from_secs(1)).await;
    let wait = (expires_at - chrono::Utc::now())
        .to_std()
        .unwrap_or_default();
    tokio::time::sleep(wait + Duration::from_millis(50)).await;
    assert_eq!(call(&a, &short_secret, "gpt-4o-mini").await.0, 401);
    assert_eq!(call(&b, &short_secret, "gpt-4o-mini").await.0, 401);

    // Bad input is refused with a reason, nothing stored.
    for bad in [
        json!({"tenant": "a|b"}),
        json!({"tenant": "t", "allowed_models": ["[bad"]}),
        json!({"tenant": "t", "nope": 1}),
        json!({"tenant": "t", "expires_at": "2001-01-01T00:00:00Z"}),
    ] {
        let (st, v) = admin(
            reqwest::Method::POST,
            format!("{}/keys", stack.admin()),
            Some(bad.clone()),
        )
        .await;
        assert_eq!(st, 400, "{bad} -> {v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
    }
    let (st, _) = admin(
        reqwest::Method::DELETE,
        format!("{}/keys/k_ffffffffffffffff", stack.admin()),
        None,
    )
    .await;
    assert_eq!(st, 404);
    let (st, _) = admin(
        reqwest::Method::DELETE,
        format!("{}/keys/..%2Fx", stack.admin()),
        None,
    )
    .await;
    assert_eq!(st, 400);

    // No secret in either log.
    for log in ["enforcer.log", "replica-b.log"] {
        let text = std::fs::read_to_string(stack.dir.path().join(log)).unwrap_or_default();
        for s in [&secret, &new_secret, &short_secret] {
            assert_absent(&text, s, "a key secret", &stack.dir.path().join(log));
        }
    }
}

/// `enforcer keys create|list|rotate|revoke` work on Redis directly; a running enforcer follows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_cli_creates_lists_rotates_and_revokes() {
    let stack = Stack::start(Opts::default()).await;
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(enforcer_bin())
            .arg("--config")
            .arg(stack.config_path())
            .arg("keys")
            .args(args)
            .output()
            .expect("run enforcer keys");
        assert!(
            out.status.success(),
            "enforcer keys {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf8")
    };
    let created: Value = serde_json::from_str(&cli(&[
        "create",
        "--tenant",
        "cli-tenant",
        "--model",
        "gpt-4o-mini",
        "--meta",
        "ticket=OPS-1",
    ]))
    .expect("create prints JSON");
    let secret = created["secret"].as_str().expect("secret").to_owned();
    let id = created["key"]["id"].as_str().expect("id").to_owned();
    let a = stack.base("openai");
    until_status(&a, &secret, 200, Duration::from_secs(1)).await;
    let list = cli(&["list"]);
    assert!(list.contains(&id) && list.contains("active"), "{list}");
    assert_absent(&list, &secret, "a key secret", &stack.config_path());
    let rotated: Value =
        serde_json::from_str(&cli(&["rotate", &id, "--grace-secs", "0"])).expect("JSON");
    let new_secret = rotated["secret"].as_str().expect("secret").to_owned();
    until_status(&a, &secret, 401, Duration::from_secs(1)).await;
    until_status(&a, &new_secret, 200, Duration::from_secs(1)).await;
    cli(&["revoke", &id]);
    until_status(&a, &new_secret, 401, Duration::from_secs(1)).await;
    let got: Value = serde_json::from_str(&cli(&["get", &id])).expect("JSON");
    assert_eq!(got["status"], "revoked");
    let out = std::process::Command::new(enforcer_bin())
        .arg("--config")
        .arg(stack.config_path())
        .args(["keys", "create", "--tenant", "bad|name"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("tenant"),
        "the error names the field"
    );
    // Polling with a secret that still worked made calls too: each one billed, none held.
    assert!(stack.settled("cli-tenant", 2).await.requests >= 2);
}
