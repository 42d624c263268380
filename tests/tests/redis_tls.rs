//! Redis over TLS with an ACL user, as deploy/kubernetes runs it: a real redis-server with a
//! `--tls-port` and the `default` user switched off; the ledger and the enforcer binary connect
//! with `rediss://`, the password from the environment and the CA from a file.

mod enforcer_common;

use enforcer_common::{ADMIN_TOKEN, KEY_ACME, Opts, Stack, http};
use ledger::Nanos;
use ledger::store::{Ledger, LedgerConfig, Period};
use llmwarden_tests::redis::{RedisServer, TLS_PASSWORD};
use serde_json::json;

fn creds(server: &RedisServer, password: Option<&str>, ca: bool) -> LedgerConfig {
    LedgerConfig {
        password: password.map(str::to_owned),
        tls_ca_pem: ca.then(|| std::fs::read(server.ca_path()).expect("read CA")),
        ..LedgerConfig::default()
    }
}

/// Why connecting, or the first read, fails (a connection is not authenticated until a command
/// needs it when no password is given).
async fn connect_err(url: &str, cfg: LedgerConfig) -> String {
    let ledger = match Ledger::connect_with(url, cfg).await {
        Ok(l) => l,
        Err(e) => return e.to_string(),
    };
    match ledger
        .tenant_spend("acme", Period::Month, chrono::Utc::now())
        .await
    {
        Ok(s) => panic!("reading over {url} should have failed: {s:?}"),
        Err(e) => e.to_string(),
    }
}

/// The right user, password and CA work; every missing piece is refused with Redis's or TLS's
/// own reason, and a plain connection to the TLS port never gets a reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ledger_needs_tls_the_acl_user_and_its_password() {
    let server = RedisServer::start_tls();
    let url = server.tls_url();
    let ledger = Ledger::connect_with(&url, creds(&server, Some(TLS_PASSWORD), true))
        .await
        .expect("rediss:// with the ACL user, its password and the CA");
    let spend = ledger
        .tenant_spend("acme", Period::Month, chrono::Utc::now())
        .await
        .expect("a read over TLS");
    assert_eq!(spend.spend, Nanos::ZERO);

    let no_password = connect_err(&url, creds(&server, None, true)).await;
    assert!(
        no_password.contains("WRONGPASS") || no_password.contains("NOAUTH"),
        "{no_password}"
    );
    let wrong = connect_err(&url, creds(&server, Some("not-the-password"), true)).await;
    assert!(
        wrong.contains("WRONGPASS") || wrong.contains("AuthenticationFailed"),
        "{wrong}"
    );
    // The system's trust store does not know the test CA.
    let untrusted = connect_err(&url, creds(&server, Some(TLS_PASSWORD), false)).await;
    assert!(
        untrusted.to_lowercase().contains("certificate"),
        "{untrusted}"
    );
    // The plain port is still open but its default user is off.
    let plain = connect_err(&server.url(), creds(&server, None, false)).await;
    assert!(
        plain.contains("NOAUTH") || plain.contains("WRONGPASS") || plain.contains("disabled"),
        "{plain}"
    );
}

/// The enforcer binary reserves and settles over `rediss://`, reading the password from the
/// variable `redis_password_env` names and the CA from `redis_ca_file`; its budgets hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_enforcer_enforces_budgets_over_tls_redis() {
    let stack = Stack::start(Opts {
        redis_tls: true,
        ..Opts::default()
    })
    .await;
    let r = http()
        .put(format!("{}/budgets", stack.admin()))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"tenant": "acme", "period": "month", "limit_usd": 0.001}))
        .send()
        .await
        .expect("PUT /budgets");
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
    let chat = json!({
        "model": "gpt-4o-mini",
        "max_tokens": 100,
        "messages": [{"role": "user", "content": "hello over TLS redis"}],
    });
    let url = format!("{}/chat/completions", stack.base("openai"));
    let r = http()
        .post(&url)
        .bearer_auth(KEY_ACME)
        .json(&chat)
        .send()
        .await
        .expect("POST through the enforcer");
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
    let s = stack.settled("acme", 1).await;
    assert!(
        s.spend > Nanos::ZERO,
        "the call was settled in Redis: {s:?}"
    );

    // A reservation over what is left is refused: the budget is read over TLS too.
    let big = json!({
        "model": "gpt-4o",
        "max_tokens": 100_000,
        "messages": [{"role": "user", "content": "spend it all"}],
    });
    let r = http()
        .post(&url)
        .bearer_auth(KEY_ACME)
        .json(&big)
        .send()
        .await
        .expect("POST through the enforcer");
    assert_eq!(r.status(), 402, "{}", r.text().await.unwrap_or_default());
    let log = stack.log();
    assert!(
        !log.contains(TLS_PASSWORD),
        "the Redis password is in the log"
    );
}
