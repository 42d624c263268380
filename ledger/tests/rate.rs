//! Rate limits in the reserve scripts (single and group commit) against a real redis-server:
//! request and token windows, the retry-after, and the token correction.

use std::time::Duration;

use chrono::Utc;
use ledger::Nanos;
use ledger::store::{Ledger, LedgerConfig, RateLimit, ReserveOutcome, ReserveRequest};
use llmwarden_tests::redis::RedisServer;

fn req(id: &str, rpm: u64, tpm: u64, tokens: u64) -> ReserveRequest {
    ReserveRequest {
        tenant: "rt".into(),
        feature: None,
        session: None,
        request_id: id.into(),
        provider: "openai".into(),
        model: Some("gpt-4o-mini".into()),
        amount: Nanos(1_000),
        ttl: Duration::from_secs(3600),
        caps: vec![],
        at: Utc::now(),
        rates: vec![RateLimit {
            scope: "tenant".into(),
            rpm,
            tpm,
        }],
        tokens,
    }
}

async fn outcomes(l: &Ledger, reqs: &[ReserveRequest]) -> Vec<String> {
    let mut v = Vec::new();
    for r in reqs {
        v.push(match l.reserve(r).await.expect("reserve") {
            ReserveOutcome::Allowed(_) => "ok".to_owned(),
            ReserveOutcome::RateLimited(d) => {
                assert!(d.retry_after_secs >= 1 && d.retry_after_secs <= 60, "{d}");
                format!("{}{}", if d.tokens { "t" } else { "r" }, d.used)
            }
            ReserveOutcome::Denied(d) => panic!("denied: {d}"),
        });
    }
    v
}

/// A ledger on `server` (one script per call, or group commit) with the tenant's rate window
/// emptied, and the id prefix that keeps its calls apart from the other mode's.
async fn fresh(server: &RedisServer, group_commit: bool) -> (Ledger, &'static str) {
    let cfg = LedgerConfig {
        group_commit,
        ..LedgerConfig::default()
    };
    let l = Ledger::connect_with(&server.url(), cfg)
        .await
        .expect("connect");
    let _ = server.command(&["DEL", "llmw:{rt}:rl:tenant"]);
    (l, if group_commit { "b" } else { "s" })
}

#[tokio::test]
async fn windows_refuse_past_the_limit_in_both_scripts_and_correct_tokens() {
    let server = RedisServer::start();
    for group_commit in [false, true] {
        let (l, tag) = fresh(&server, group_commit).await;
        // Tokens: 1,000 each under 2,500 per minute.
        let t: Vec<_> = (0..3)
            .map(|i| req(&format!("{tag}t{i}"), 0, 2_500, 1_000))
            .collect();
        assert_eq!(
            outcomes(&l, &t).await,
            ["ok", "ok", "t2000"],
            "group commit {group_commit}"
        );
        // The first call used 20 tokens, not 1,000: the third now fits.
        l.correct_rate_tokens("rt", &["tenant".into()], t[0].at, -980)
            .await
            .expect("correct");
        let again = req(&format!("{tag}t3"), 0, 2_500, 1_000);
        assert_eq!(outcomes(&l, &[again]).await, ["ok"]);
        let _ = server.command(&["DEL", "llmw:{rt}:rl:tenant"]);
        // Requests: 3 per minute.
        let r: Vec<_> = (0..4)
            .map(|i| req(&format!("{tag}r{i}"), 3, 0, 10))
            .collect();
        assert_eq!(outcomes(&l, &r).await, ["ok", "ok", "ok", "r3"]);
        // Concurrent: exactly the limit, whatever the batching.
        let _ = server.command(&["DEL", "llmw:{rt}:rl:tenant"]);
        let many: Vec<_> = (0..20)
            .map(|i| req(&format!("{tag}c{i}"), 7, 0, 10))
            .collect();
        let futs = many.iter().map(|r| l.reserve(r));
        let res = futures::future::join_all(futs).await;
        let ok = res
            .iter()
            .filter(|r| matches!(r, Ok(ReserveOutcome::Allowed(_))))
            .count();
        assert_eq!(ok, 7, "group commit {group_commit}");
    }
}

/// Replicas stamp a call with their clock before its script runs, so a call stamped a second
/// earlier can reach Redis after calls stamped later. The window counts those newer seconds too:
/// a late-stamped call is not admitted past the limit.
#[tokio::test]
async fn a_call_stamped_before_the_newest_counted_second_still_sees_it() {
    let server = RedisServer::start();
    for group_commit in [false, true] {
        let (l, tag) = fresh(&server, group_commit).await;
        let now = req(&format!("{tag}n"), 3, 0, 10).at;
        let mut r: Vec<_> = (0..4)
            .map(|i| {
                let mut q = req(&format!("{tag}late{i}"), 3, 0, 10);
                q.at = now;
                q
            })
            .collect();
        r[3].at = now - chrono::Duration::seconds(1);
        assert_eq!(
            outcomes(&l, &r).await,
            ["ok", "ok", "ok", "r3"],
            "group commit {group_commit}"
        );
    }
}
