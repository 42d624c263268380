//! Budget alerts exactly once (issue 17 item 3), against a real webhook receiver on loopback:
//! two enforcers and the observer path push one tenant across 50, 80 and 100 % of its month
//! budget and the receiver gets exactly one signed delivery per threshold (and one Slack-style
//! message); a receiver that fails three times and then answers gets the alert once.

mod enforcer_common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::Utc;
use enforcer_common::{KEY_OPS, Opts, Stack, UPSTREAM_KEY, http};
use hmac::{Hmac, Mac};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use ledger::Nanos;
use ledger::store::{
    Budget, CallMeta, Ledger, LedgerConfig, Period, TokenCounts, UsageRecord, alerts_key,
};
use serde_json::{Value, json};
use sha2::Sha256;

/// One request the receiver saw.
#[derive(Debug, Clone)]
struct Hit {
    path: String,
    status: u16,
    idempotency_key: String,
    timestamp: String,
    signature: String,
    raw: Vec<u8>,
    body: Value,
}

/// A webhook receiver on 127.0.0.1 that answers 500 to its first `fail_first` requests.
struct Receiver {
    addr: SocketAddr,
    hits: Arc<Mutex<Vec<Hit>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Receiver {
    async fn start(fail_first: usize) -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind receiver");
        let addr = listener.local_addr().expect("addr");
        let hits = Arc::new(Mutex::new(Vec::new()));
        let fails = Arc::new(AtomicUsize::new(fail_first));
        let h = Arc::clone(&hits);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (h, fails) = (Arc::clone(&h), Arc::clone(&fails));
                tokio::spawn(async move {
                    let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let (h, fails) = (Arc::clone(&h), Arc::clone(&fails));
                        async move {
                            let header = |n: &str| {
                                req.headers()
                                    .get(n)
                                    .and_then(|v| v.to_str().ok())
                                    .unwrap_or("")
                                    .to_owned()
                            };
                            let (path, key, ts, sig) = (
                                req.uri().path().to_owned(),
                                header("idempotency-key"),
                                header("x-llmwarden-timestamp"),
                                header("x-llmwarden-signature"),
                            );
                            let raw = req
                                .into_body()
                                .collect()
                                .await
                                .map(|b| b.to_bytes().to_vec())
                                .unwrap_or_default();
                            let body: Value = serde_json::from_slice(&raw).unwrap_or(Value::Null);
                            let fail = fails
                                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                                    n.checked_sub(1)
                                })
                                .is_ok();
                            let status = if fail { 500 } else { 200 };
                            h.lock().expect("hits").push(Hit {
                                path,
                                status,
                                idempotency_key: key,
                                timestamp: ts,
                                signature: sig,
                                raw,
                                body,
                            });
                            hyper::Response::builder()
                                .status(status)
                                .body(Full::new(Bytes::from_static(b"ok")))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Receiver { addr, hits, task }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn hits(&self) -> Vec<Hit> {
        self.hits.lock().expect("hits").clone()
    }

    /// Waits until `n` successful deliveries arrived on `path`, then `settle` more for strays.
    async fn wait_ok(&self, path: &str, n: usize, settle: Duration) -> Vec<Hit> {
        let ok = || {
            self.hits()
                .into_iter()
                .filter(|h| h.path == path && h.status == 200)
                .collect::<Vec<_>>()
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while ok().len() < n {
            assert!(
                Instant::now() < deadline,
                "{} of {n} deliveries on {path} after 20 s: {:#?}",
                ok().len(),
                self.hits()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(settle).await;
        ok()
    }
}

fn alerts_toml(receiver: &Receiver, extra_sink: &str, backoff_ms: u64) -> String {
    // The signing key must come from the environment; TEST_MOCK_KEY is one the harness sets for
    // every enforcer it starts.
    format!(
        r#"
[alerts]
poll_ms = 100
lease_ms = 1500

[[alerts.sinks]]
name = "ops"
kind = "webhook"
url = "{}"
secret_env = "TEST_MOCK_KEY"
backoff_ms = {backoff_ms}
{extra_sink}
"#,
        receiver.url("/hook")
    )
}

fn verify_signature(h: &Hit) {
    let sig = h
        .signature
        .strip_prefix("sha256=")
        .expect("sha256= signature");
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(UPSTREAM_KEY.as_bytes()).expect("key");
    mac.update(h.timestamp.as_bytes());
    mac.update(b".");
    mac.update(&h.raw);
    mac.verify_slice(&hex::decode(sig).expect("hex"))
        .expect("the webhook's HMAC-SHA256 signature verifies");
}

fn observed(tenant: &str, id: &str, cost: i64) -> UsageRecord {
    UsageRecord {
        tenant: tenant.into(),
        event_id: id.into(),
        feature: None,
        session: None,
        provider: "openai".into(),
        model: Some("gpt-4o-mini".into()),
        cost: Nanos(cost),
        tokens: TokenCounts::default(),
        bypass: true,
        estimated: false,
        at: Utc::now(),
        meta: CallMeta::default(),
    }
}

async fn chat(url: &str, tenant: &str) -> u16 {
    http()
        .post(url)
        .bearer_auth(KEY_OPS)
        .header("x-tenant-id", tenant)
        .json(&json!({"model": "gpt-4o-mini", "max_tokens": 50,
            "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .expect("call")
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_enforcers_and_the_observer_deliver_each_threshold_exactly_once() {
    const TENANT: &str = "alerted";
    let receiver = Receiver::start(0).await;
    let slack = format!(
        "[[alerts.sinks]]\nname = \"chat\"\nkind = \"slack\"\nurl = \"{}\"\n",
        receiver.url("/slack")
    );
    let stack = Stack::start(Opts {
        extra_toml: alerts_toml(&receiver, &slack, 100),
        ..Opts::default()
    })
    .await;
    let (_b, port_b, _) = stack.start_replica("enforcer-b");
    let urls = [
        format!("{}/chat/completions", stack.base("openai")),
        format!("http://127.0.0.1:{port_b}/proxy/openai/chat/completions"),
    ];
    // One call to learn what a call costs, then a month budget of 20 such calls.
    assert_eq!(chat(&urls[0], TENANT).await, 200);
    let one = stack.settled(TENANT, 1).await.spend;
    assert!(one.0 > 0);
    let limit = Nanos(one.0 * 20);
    stack
        .ledger
        .set_budget(&Budget {
            tenant: TENANT.into(),
            feature: None,
            period: Period::Month,
            limit,
        })
        .await
        .expect("set budget");
    tokio::time::sleep(Duration::from_millis(1500)).await; // every instance reloads budgets
    // Both enforcers, 4 callers at a time, until the budget refuses (bounded).
    let mut tasks = Vec::new();
    for i in 0..4 {
        let url = urls[i % 2].clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..15 {
                if chat(&url, TENANT).await == 402 {
                    break;
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("join");
    }
    // The observer path takes it past 100 % (bypass spend is counted after the fact).
    stack
        .ledger
        .record(&observed(TENANT, "bypass-1", limit.0))
        .await
        .expect("record");
    let spend = stack.spend(TENANT).await.spend;
    assert!(spend >= limit, "{spend} < {limit}");

    let hooks = receiver.wait_ok("/hook", 3, Duration::from_secs(2)).await;
    let thresholds: BTreeSet<u64> = hooks
        .iter()
        .map(|h| h.body["threshold_pct"].as_u64().expect("threshold"))
        .collect();
    assert_eq!(
        (hooks.len(), thresholds),
        (3, BTreeSet::from([50, 80, 100])),
        "exactly one delivery per threshold: {hooks:#?}"
    );
    let ids: BTreeSet<&str> = hooks.iter().map(|h| h.idempotency_key.as_str()).collect();
    assert_eq!(ids.len(), 3);
    for h in &hooks {
        verify_signature(h);
        assert_eq!(h.body["tenant"], TENANT);
        assert_eq!(h.body["period"], "month");
        assert_eq!(h.body["limit_nusd"].as_i64(), Some(limit.0));
        assert_eq!(h.body["id"].as_str(), Some(h.idempotency_key.as_str()));
    }
    let slack = receiver.wait_ok("/slack", 3, Duration::ZERO).await;
    assert_eq!(slack.len(), 3, "{slack:#?}");
    assert!(slack.iter().all(|h| {
        h.body["text"]
            .as_str()
            .is_some_and(|t| t.contains("tenant alerted reached"))
    }));
    // Nothing failed, and the tenant's alert stream holds exactly the three alerts.
    assert!(receiver.hits().iter().all(|h| h.status == 200));
    let client = redis::Client::open(stack.redis.url()).expect("client");
    let mut c = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let n: usize = redis::cmd("XLEN")
        .arg(alerts_key(TENANT))
        .query_async(&mut c)
        .await
        .expect("XLEN");
    assert_eq!(n, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_fails_three_times_gets_the_alert_once() {
    const TENANT: &str = "flaky";
    let receiver = Receiver::start(3).await;
    let stack = Stack::start(Opts {
        extra_toml: alerts_toml(&receiver, "", 50),
        ..Opts::default()
    })
    .await;
    let limit = Nanos(1_000_000);
    stack
        .ledger
        .set_budget(&Budget {
            tenant: TENANT.into(),
            feature: None,
            period: Period::Day,
            limit,
        })
        .await
        .expect("set budget");
    // An observer-side ledger with one threshold: a single alert.
    let observer = Ledger::connect_with(
        &stack.redis.url(),
        LedgerConfig {
            alert_thresholds_pct: vec![100],
            ..LedgerConfig::default()
        },
    )
    .await
    .expect("connect");
    observer
        .record(&observed(TENANT, "flaky-1", limit.0 + 1))
        .await
        .expect("record");
    let ok = receiver.wait_ok("/hook", 1, Duration::from_secs(1)).await;
    assert_eq!(ok.len(), 1, "{:#?}", receiver.hits());
    let all = receiver.hits();
    assert_eq!(all.len(), 4, "3 failures, then 1 delivery: {all:#?}");
    let keys: BTreeSet<&str> = all.iter().map(|h| h.idempotency_key.as_str()).collect();
    assert_eq!(
        keys.len(),
        1,
        "every attempt carries the same idempotency key"
    );
    let id = ok[0].idempotency_key.clone();
    assert_eq!(
        id,
        format!("{TENANT}||day|{}|100", Period::Day.id(Utc::now()))
    );
    let status = stack.ledger.alert_deliveries(&id).await.expect("status");
    let got: BTreeMap<_, _> = status
        .iter()
        .map(|(k, d)| (k.as_str(), (d.state.as_str(), d.attempts)))
        .collect();
    assert_eq!(got, BTreeMap::from([("ops", ("delivered", 4))]));
    let m = stack.metrics().await;
    assert!(
        m.contains("llmwarden_alert_delivery_failures_total 3")
            && m.contains("llmwarden_alerts_delivered_total 1"),
        "{}",
        m.lines()
            .filter(|l| l.contains("alert"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_bypass_events_are_delivered_once_each() {
    let receiver = Receiver::start(0).await;
    let stack = Stack::start(Opts {
        extra_toml: alerts_toml(&receiver, "", 50),
        ..Opts::default()
    })
    .await;
    for service in ["billing", "search"] {
        stack
            .ledger
            .bypass_event(&ledger::store::BypassEvent {
                service: service.into(),
                provider: "openai".into(),
                tenant: "ops".into(),
                model: "gpt-4o-mini".into(),
                pid: 42,
                comm: "python3".into(),
                at: Utc::now(),
            })
            .await
            .expect("bypass event");
    }
    let hooks = receiver.wait_ok("/hook", 2, Duration::from_secs(1)).await;
    assert_eq!(hooks.len(), 2, "{hooks:#?}");
    let services: BTreeSet<&str> = hooks
        .iter()
        .map(|h| h.body["service"].as_str().expect("service"))
        .collect();
    assert_eq!(services, BTreeSet::from(["billing", "search"]));
    for h in &hooks {
        verify_signature(h);
        assert_eq!(h.body["kind"], "first_bypass");
        assert!(h.idempotency_key.starts_with("bypass|"));
        assert_eq!(h.body["provider"], "openai");
    }
}

/// A model the price table does not know, served by two enforcers six times: one `price_gap`
/// alert (the ledger dedupes per provider, model and day across processes). An unmetered
/// connection the observer announced: one `first_unmetered` alert with its host and bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn price_gaps_and_unmetered_connections_are_delivered_once_each() {
    let receiver = Receiver::start(0).await;
    let stack = Stack::start(Opts {
        top_toml: "unknown_model = \"allow\"".into(),
        extra_toml: alerts_toml(&receiver, "", 50),
        ..Opts::default()
    })
    .await;
    let (_b, port_b, _) = stack.start_replica("enforcer-b");
    let urls = [
        format!("{}/chat/completions", stack.base("openai")),
        format!("http://127.0.0.1:{port_b}/proxy/openai/chat/completions"),
    ];
    for i in 0..6 {
        let status = http()
            .post(&urls[i % 2])
            .bearer_auth(KEY_OPS)
            .header("x-tenant-id", "gaps")
            .json(&json!({"model": "acme-internal-1", "max_tokens": 20,
                "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .expect("call")
            .status();
        assert_eq!(status.as_u16(), 200, "call {i}");
    }
    stack
        .ledger
        .unmetered_event(&ledger::store::UnmeteredConn {
            tenant: "gaps".into(),
            service: "agent".into(),
            host: "api.anthropic.com".into(),
            provider: "anthropic".into(),
            conn_id: "c1".into(),
            pid: 4242,
            comm: "agent".into(),
            bytes_out: 1200,
            bytes_in: 9000,
            started_at: Utc::now(),
            duration_ms: 800,
            joined: false,
        })
        .await
        .expect("unmetered event");
    let hooks = receiver.wait_ok("/hook", 2, Duration::from_secs(2)).await;
    assert_eq!(hooks.len(), 2, "{hooks:#?}");
    let by_kind: BTreeMap<&str, &Hit> = hooks
        .iter()
        .map(|h| (h.body["kind"].as_str().expect("kind"), h))
        .collect();
    let gap = by_kind.get("price_gap").expect("a price_gap alert");
    verify_signature(gap);
    assert_eq!(
        (
            &gap.body["provider"],
            &gap.body["model"],
            &gap.body["path"],
            &gap.body["tenant"]
        ),
        (
            &json!("openai"),
            &json!("acme-internal-1"),
            &json!("enforcer"),
            &json!("gaps")
        )
    );
    assert!(gap.idempotency_key.starts_with("ops|"));
    let un = by_kind
        .get("first_unmetered")
        .expect("a first_unmetered alert");
    verify_signature(un);
    assert_eq!(
        (
            &un.body["host"],
            &un.body["bytes_out"],
            &un.body["bytes_in"],
            &un.body["service"]
        ),
        (
            &json!("api.anthropic.com"),
            &json!(1200),
            &json!(9000),
            &json!("agent")
        )
    );
}

/// Redis pauses and the enforcer (on_redis_unavailable = "allow") spools its settlements: when
/// the spool reaches spool_filling_pct of spool_max_bytes, the instance alerts its sinks itself,
/// while Redis is still down (the dispatcher cannot: its lease is in Redis), once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filling_spool_is_alerted_while_redis_is_down() {
    let receiver = Receiver::start(0).await;
    let top = "timeouts.redis_ms = 300\non_redis_unavailable = \"allow\"\nredis_unavailable_cap_usd = 1.0\nspool_max_bytes = 65536\n";
    let stack = Stack::start(Opts {
        top_toml: top.into(),
        extra_toml: alerts_toml(&receiver, "", 50)
            .replace("[alerts]\n", "[alerts]\nspool_filling_pct = 2\n"),
        ..Opts::default()
    })
    .await;
    stack.redis.pause();
    let url = format!("{}/chat/completions", stack.base("openai"));
    // 2 % of 64 KiB is 1311 bytes: a few spooled settlements (bounded).
    let mut calls = 0;
    while receiver.hits().is_empty() && calls < 30 {
        assert_eq!(chat(&url, "outage").await, 200, "call {calls}");
        calls += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let hooks = receiver.wait_ok("/hook", 1, Duration::from_secs(2)).await;
    stack.redis.resume();
    assert_eq!(hooks.len(), 1, "{hooks:#?}");
    let h = &hooks[0];
    verify_signature(h);
    assert_eq!(h.body["kind"], "spool_filling");
    assert_eq!(h.body["spool_max_bytes"], 65536);
    assert_eq!(h.body["threshold_pct"], 2);
    let bytes = h.body["spool_bytes"].as_u64().expect("spool_bytes");
    assert!((1311..65536).contains(&bytes), "{}", h.body);
    assert!(h.idempotency_key.starts_with("spool|"));
}
