//! The ledger's group commit against real redis-servers: reserves and settles of one tenant that
//! went to Redis together in one script call leave exactly the keys, fields and values the
//! single-item scripts leave when the same calls run one by one (checked by dumping every key of
//! two servers), and a frozen Redis fails every waiter of a batch within the timeout.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::future::join_all;
use ledger::Nanos;
use ledger::store::{
    Cap, CapScope, Ledger, LedgerConfig, Period, ReserveOutcome, ReserveRequest, SettleOutcome,
    Settlement, TokenCounts, UsageRecord,
};
use llmwarden_tests::redis::RedisServer;
use redis::AsyncCommands;

const HOUR: Duration = Duration::from_secs(3600);

/// A batched ledger on `a` and an unbatched one (one script per call) on `b`.
async fn pair(a: &RedisServer, b: &RedisServer) -> (Ledger, Ledger) {
    let batched = Ledger::connect(&a.url()).await.expect("connect a");
    let single = Ledger::connect_with(
        &b.url(),
        LedgerConfig {
            group_commit: false,
            ..LedgerConfig::default()
        },
    )
    .await
    .expect("connect b");
    (batched, single)
}

fn cap(scope: CapScope, period: Period, limit: i64) -> Cap {
    Cap {
        scope,
        period,
        limit: Nanos(limit),
    }
}

fn req(id: &str, amount: i64, at: DateTime<Utc>, caps: Vec<Cap>) -> ReserveRequest {
    ReserveRequest {
        tenant: "acme".into(),
        feature: None,
        session: None,
        request_id: id.into(),
        provider: "openai".into(),
        model: Some("gpt-4o-mini".into()),
        amount: Nanos(amount),
        ttl: HOUR,
        caps,
        at,
        rates: Vec::new(),
        tokens: 0,
    }
}

fn settlement(r: &ReserveRequest, cost: i64, n: u64) -> Settlement {
    Settlement {
        meta: Default::default(),
        tenant: r.tenant.clone(),
        request_id: r.request_id.clone(),
        feature: r.feature.clone(),
        session: r.session.clone(),
        model: r.model.clone(),
        cost: Nanos(cost),
        tokens: TokenCounts {
            input: 100 + n,
            output: 20 + 2 * n,
            cache_read: n % 3,
            cache_write: n % 2,
        },
        estimated: n % 4 == 1,
        started_at: r.at,
    }
}

/// Every key of the server: its type and content, and its TTL in seconds (-1: none).
async fn dump(server: &RedisServer) -> BTreeMap<String, (String, i64)> {
    let client = redis::Client::open(server.url()).expect("client");
    let mut c = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let keys: Vec<String> = c.keys("*").await.expect("KEYS");
    let mut out = BTreeMap::new();
    for k in keys {
        let kind: String = redis::cmd("TYPE")
            .arg(&k)
            .query_async(&mut c)
            .await
            .expect("TYPE");
        let content = match kind.as_str() {
            "hash" => {
                let h: BTreeMap<String, String> = c.hgetall(&k).await.expect("HGETALL");
                format!("{h:?}")
            }
            "string" => {
                let v: String = c.get(&k).await.expect("GET");
                format!("{v:?}")
            }
            "zset" => {
                let z: Vec<(String, f64)> = c.zrange_withscores(&k, 0, -1).await.expect("ZRANGE");
                format!("{z:?}")
            }
            "set" => {
                let mut s: Vec<String> = c.smembers(&k).await.expect("SMEMBERS");
                s.sort();
                format!("{s:?}")
            }
            "stream" => {
                // The audit records without their ids (the commit times differ), as a multiset
                // (concurrent callers reach Redis in different orders).
                let r: redis::streams::StreamRangeReply = c.xrange_all(&k).await.expect("XRANGE");
                let mut entries: Vec<BTreeMap<String, String>> = r
                    .ids
                    .into_iter()
                    .map(|e| {
                        e.map
                            .into_iter()
                            .map(|(f, v)| (f, redis::from_redis_value(v).expect("text")))
                            .collect()
                    })
                    .collect();
                entries.sort();
                format!("{entries:?}")
            }
            other => panic!("unexpected type {other} of {k}"),
        };
        let ttl: i64 = c.ttl(&k).await.expect("TTL");
        out.insert(k, (format!("{kind} {content}"), ttl));
    }
    out
}

/// Same keys, same contents, and TTLs within a few seconds (the two runs are a moment apart).
fn assert_same(a: &BTreeMap<String, (String, i64)>, b: &BTreeMap<String, (String, i64)>) {
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "the batched (left) and the one-by-one (right) run wrote different keys"
    );
    for (k, (content, ttl)) in a {
        let (want, want_ttl) = &b[k];
        assert_eq!(
            content, want,
            "key {k} differs between the batched (left) and the one-by-one (right) run"
        );
        assert!(
            (ttl - want_ttl).abs() <= 5 && (*ttl < 0) == (*want_ttl < 0),
            "key {k}: TTL {ttl} s batched, {want_ttl} s one by one"
        );
    }
}

async fn reserve_all(l: &Ledger, rs: &[ReserveRequest]) -> Vec<String> {
    join_all(rs.iter().map(|r| l.reserve(r)))
        .await
        .into_iter()
        .map(|o| format!("{o:?}"))
        .collect()
}

async fn reserve_each(l: &Ledger, rs: &[ReserveRequest]) -> Vec<String> {
    let mut out = Vec::new();
    for r in rs {
        out.push(format!("{:?}", l.reserve(r).await));
    }
    out
}

async fn settle_all(l: &Ledger, ss: &[Settlement]) -> Vec<String> {
    join_all(ss.iter().map(|s| l.settle(s)))
        .await
        .into_iter()
        .map(|o| format!("{o:?}"))
        .collect()
}

async fn settle_each(l: &Ledger, ss: &[Settlement]) -> Vec<String> {
    let mut out = Vec::new();
    for s in ss {
        out.push(format!("{:?}", l.settle(s).await));
    }
    out
}

/// Prior state both servers get one call at a time: committed observer spend and a live hold.
async fn prior(l: &Ledger, at: DateTime<Utc>) {
    let rec = UsageRecord {
        meta: Default::default(),
        tenant: "acme".into(),
        event_id: "ev1".into(),
        feature: Some("bot".into()),
        session: Some("s1".into()),
        provider: "anthropic".into(),
        model: Some("claude-sonnet-4-5".into()),
        cost: Nanos(100),
        tokens: TokenCounts::default(),
        bypass: true,
        estimated: false,
        at,
    };
    l.record(&rec).await.expect("record");
    let mut r = req("prior", 150, at, vec![]);
    r.feature = Some("bot".into());
    assert!(matches!(
        l.reserve(&r).await.expect("reserve"),
        ReserveOutcome::Allowed(_)
    ));
}

/// One batch of reserves, in a known order (a current-thread runtime polls `join_all`'s futures in
/// order, so they queue in order): denials, a duplicate id, an already settled id, every cap kind.
/// Replies and every key equal those of the same reserves run one by one with the single script.
#[tokio::test]
async fn a_batch_of_reserves_equals_the_same_reserves_one_by_one() {
    let (sa, sb) = (RedisServer::start(), RedisServer::start());
    let (a, b) = pair(&sa, &sb).await;
    let at = Utc::now();
    for l in [&a, &b] {
        prior(l, at).await;
        let used = req("used", 1, at, vec![]);
        l.reserve(&used).await.expect("reserve used");
        l.settle(&settlement(&used, 1, 0))
            .await
            .expect("settle used");
    }
    let tenant_day = cap(CapScope::Tenant, Period::Day, 1_000);
    let feature_month = cap(CapScope::Feature("bot".into()), Period::Month, 700);
    let session = cap(CapScope::Session("s1".into()), Period::Month, 500);
    // The first item finds the tenant's lane idle and goes alone, sent by its caller; the others
    // queue behind it and go as one batch.
    let mut rs = vec![req("lead", 0, at, vec![])];
    for (i, amount) in [120, 300, 90, 400, 0, 250, 60, 1, 700, 30]
        .into_iter()
        .enumerate()
    {
        let mut caps = vec![tenant_day.clone()];
        let mut r = req(&format!("r{i}"), amount, at, Vec::new());
        if i % 2 == 0 {
            r.feature = Some("bot".into());
            caps.push(feature_month.clone());
        }
        if i % 3 == 0 {
            r.session = Some("s1".into());
            caps.push(session.clone());
        }
        r.caps = caps;
        r.model = (i % 4 != 3).then(|| format!("m{}", i % 3));
        rs.push(r);
    }
    rs.push(rs[1].clone()); // the same id twice in one batch: one hold
    rs.push(req("used", 5, at, vec![tenant_day.clone()])); // already settled
    let mut no_caps = req("free", 1_000_000, at, vec![]);
    no_caps.session = Some("s2".into());
    rs.push(no_caps);

    let before = a.batch_stats().reserve;
    let got = reserve_all(&a, &rs).await;
    let want = reserve_each(&b, &rs).await;
    let after = a.batch_stats().reserve;
    assert_eq!(
        (
            after.batches - before.batches,
            after.items - before.items,
            after.largest
        ),
        (2, rs.len() as u64, rs.len() as u64 - 1),
        "the first reserve alone, all others in one batch"
    );
    assert_eq!(got, want);
    assert!(
        got.iter().filter(|o| o.contains("Denied")).count() >= 2,
        "the scenario must deny some items: {got:#?}"
    );
    assert!(got[rs.len() - 3].contains("existing: true"), "{got:#?}");
    assert!(got[rs.len() - 2].contains("already settled"), "{got:#?}");
    assert_same(&dump(&sa).await, &dump(&sb).await);
}

/// A Redis that lost its scripts (restarted without persistence, `SCRIPT FLUSH`, a new replica)
/// answers EVALSHA with NOSCRIPT: the single and the batch scripts are loaded again and run, and
/// the calls bill exactly what they bill on a Redis that kept them.
#[tokio::test]
async fn scripts_flushed_from_redis_are_loaded_again() {
    let (sa, sb) = (RedisServer::start(), RedisServer::start());
    let (a, b) = pair(&sa, &sb).await;
    let at = Utc::now();
    for l in [&a, &b] {
        prior(l, at).await;
    }
    for s in [&sa, &sb] {
        let mut c = redis::Client::open(s.url())
            .expect("client")
            .get_multiplexed_async_connection()
            .await
            .expect("connect");
        let _: () = redis::cmd("SCRIPT")
            .arg("FLUSH")
            .query_async(&mut c)
            .await
            .expect("SCRIPT FLUSH");
    }
    let tenant_day = cap(CapScope::Tenant, Period::Day, 10_000);
    let rs: Vec<ReserveRequest> = (0..6)
        .map(|i| req(&format!("f{i}"), 100 + i, at, vec![tenant_day.clone()]))
        .collect();
    let got = reserve_all(&a, &rs).await;
    assert_eq!(got, reserve_each(&b, &rs).await);
    assert!(got.iter().all(|o| o.contains("Allowed")), "{got:#?}");
    let ss: Vec<Settlement> = rs
        .iter()
        .zip(0u64..)
        .map(|(r, n)| settlement(r, 90 + n as i64, n))
        .collect();
    let got = settle_all(&a, &ss).await;
    assert_eq!(got, settle_each(&b, &ss).await);
    assert!(got.iter().all(|o| o.starts_with("Ok(")), "{got:#?}");
    assert_same(&dump(&sa).await, &dump(&sb).await);
}

/// Denied items inside a batch hold nothing: the items after them see only what was admitted.
#[tokio::test]
async fn a_denied_item_does_not_change_later_items_of_its_batch() {
    let (sa, sb) = (RedisServer::start(), RedisServer::start());
    let (a, b) = pair(&sa, &sb).await;
    let at = Utc::now();
    let caps = vec![cap(CapScope::Tenant, Period::Month, 100)];
    for l in [&a, &b] {
        // Warms the connection and the script cache.
        l.reserve(&req("warm", 0, at, caps.clone()))
            .await
            .expect("warm");
    }
    // The first (0) goes alone, sent by its caller; the five after it go as one batch.
    let rs: Vec<_> = [0, 60, 50, 40, 1, 0]
        .into_iter()
        .enumerate()
        .map(|(i, amount)| req(&format!("d{i}"), amount, at, caps.clone()))
        .collect();
    let got = reserve_all(&a, &rs).await;
    assert_eq!(got, reserve_each(&b, &rs).await);
    let verdicts: Vec<bool> = got.iter().map(|o| o.contains("Allowed")).collect();
    assert_eq!(verdicts, [true, true, false, true, false, true], "{got:#?}");
    assert!(
        got[4].contains("held: Nanos(100)"),
        "the 1 is denied against 60 + 40 held: {}",
        got[4]
    );
    assert_eq!(a.batch_stats().reserve.largest, 5);
    let s = a
        .tenant_spend("acme", Period::Month, Utc::now())
        .await
        .expect("spend");
    assert_eq!(s.held, Nanos(100));
    assert_same(&dump(&sa).await, &dump(&sb).await);
}

/// One batch of settles: live holds, a request id twice (counted once), a settle without a hold
/// (spool replay), a settle whose hold expired and was committed as an estimate (replaced inside
/// the batch), zero cost, sessions, features, models. Replies and every key equal the one-by-one run.
#[tokio::test]
async fn a_batch_of_settles_equals_the_same_settles_one_by_one() {
    let (sa, sb) = (RedisServer::start(), RedisServer::start());
    let (a, b) = pair(&sa, &sb).await;
    let at = Utc::now();
    let mut rs = Vec::new();
    for i in 0..12u64 {
        let mut r = req(&format!("s{i}"), 1_000 + 10 * i as i64, at, vec![]);
        r.feature = (i % 2 == 0).then(|| format!("f{}", i % 3));
        r.session = (i % 3 == 0).then(|| "sess".to_owned());
        r.model = (i % 5 != 4).then(|| format!("m{}", i % 2));
        if i == 7 {
            r.ttl = Duration::from_millis(100);
        }
        rs.push(r);
    }
    for l in [&a, &b] {
        prior(l, at).await;
        for r in &rs {
            l.reserve(r).await.expect("reserve");
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await; // s7's hold expires
    let mut ss: Vec<Settlement> = rs
        .iter()
        .enumerate()
        .map(|(i, r)| settlement(r, 500 + 7 * i as i64, i as u64))
        .collect();
    ss[3].cost = Nanos(0);
    ss.push(ss[2].clone()); // duplicate inside the batch
    let mut dup = ss[5].clone();
    dup.cost = Nanos(9_999);
    ss.push(dup); // same id, other cost: still a duplicate
    ss.push(settlement(&req("replayed", 0, at, vec![]), 777, 5)); // no hold at all
    // The first settle finds the tenant's lane idle and goes alone, sent by its caller; the
    // others queue behind it and go as one batch.
    ss.insert(0, settlement(&req("lead", 0, at, vec![]), 0, 0));
    let before = a.batch_stats().settle;
    let got = settle_all(&a, &ss).await;
    let want = settle_each(&b, &ss).await;
    let after = a.batch_stats().settle;
    assert_eq!(
        (
            after.batches - before.batches,
            after.items - before.items,
            after.largest
        ),
        (2, ss.len() as u64, ss.len() as u64 - 1),
        "the first settle alone, all others in one batch"
    );
    assert_eq!(got, want);
    assert!(got[8].contains("ReplacedEstimate"), "{}", got[8]);
    assert_eq!(
        got.iter().filter(|o| o.contains("AlreadySettled")).count(),
        2
    );
    assert_same(&dump(&sa).await, &dump(&sb).await);
    let s = a
        .tenant_spend("acme", Period::Month, Utc::now())
        .await
        .expect("spend");
    assert_eq!(s.held, Nanos(150), "only the prior hold is left");
}

/// Many tasks on a multi-threaded runtime, one tenant: the reserves really went through multi-item
/// batches, admit exactly floor(cap / amount), and leave the same period hashes as one-by-one
/// reserves.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_reserves_batch_and_admit_exactly_what_fits() {
    let (sa, sb) = (RedisServer::start(), RedisServer::start());
    let (a, b) = pair(&sa, &sb).await;
    let at = Utc::now();
    let amount = 7_000_000;
    let caps = vec![
        cap(CapScope::Tenant, Period::Month, amount * 50 + 3_000_000),
        cap(CapScope::Feature("bot".into()), Period::Day, i64::MAX / 4),
    ];
    let rs: Vec<_> = (0..300)
        .map(|i| {
            let mut r = req(&format!("c{i}"), amount, at, caps.clone());
            r.feature = Some("bot".into());
            r
        })
        .collect();
    let mut tasks = Vec::new();
    for r in rs.clone() {
        let a = a.clone();
        tasks.push(tokio::spawn(async move { a.reserve(&r).await }));
    }
    let mut admitted = 0;
    for t in tasks {
        if matches!(
            t.await.expect("join").expect("reserve"),
            ReserveOutcome::Allowed(_)
        ) {
            admitted += 1;
        }
    }
    let stats = a.batch_stats().reserve;
    assert_eq!(admitted, 50);
    assert!(stats.largest > 1, "no multi-item batch happened: {stats:?}");
    assert_eq!(stats.items, 300);
    let one_by_one = reserve_each(&b, &rs).await;
    assert_eq!(
        one_by_one.iter().filter(|o| o.contains("Allowed")).count(),
        50
    );
    let (da, db) = (dump(&sa).await, dump(&sb).await);
    for period in Period::ALL {
        let letter = if period == Period::Day { "d" } else { "m" };
        let key = format!("llmw:{{acme}}:spend:{letter}:{}", period.id(at));
        let (got, want) = (&da[&key].0, &db[&key].0);
        assert_eq!(got, want, "{key}");
    }
}

/// Concurrent settles of one tenant (many tasks, multi-item batches) leave exactly the fields the
/// same settles leave one by one: every key of both servers compared.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_settles_equal_the_same_settles_one_by_one() {
    let (sa, sb) = (RedisServer::start(), RedisServer::start());
    let (a, b) = pair(&sa, &sb).await;
    let at = Utc::now();
    let rs: Vec<_> = (0..400u64)
        .map(|i| {
            let mut r = req(&format!("p{i}"), 5_000, at, vec![]);
            r.feature = (i % 3 != 0).then(|| format!("f{}", i % 4));
            r.session = (i % 5 == 0).then(|| format!("sess{}", i % 2));
            r.model = (i % 7 != 0).then(|| format!("model-{}", i % 3));
            r
        })
        .collect();
    for l in [&a, &b] {
        for r in &rs {
            l.reserve(r).await.expect("reserve");
        }
    }
    let ss: Vec<_> = rs
        .iter()
        .enumerate()
        .map(|(i, r)| settlement(r, 1_000 + i as i64 * 13, i as u64))
        .collect();
    let before = a.batch_stats().settle;
    let mut tasks = Vec::new();
    for chunk in ss.chunks(4) {
        let (a, chunk) = (a.clone(), chunk.to_vec());
        tasks.push(tokio::spawn(async move {
            for s in &chunk {
                assert!(matches!(
                    a.settle(s).await.expect("settle"),
                    SettleOutcome::Settled { released: Some(_) }
                ));
            }
        }));
    }
    for t in tasks {
        t.await.expect("join");
    }
    let after = a.batch_stats().settle;
    assert!(after.largest > 1, "no multi-item batch happened: {after:?}");
    assert_eq!(after.items - before.items, 400);
    for s in &ss {
        assert!(matches!(
            b.settle(s).await.expect("settle"),
            SettleOutcome::Settled { released: Some(_) }
        ));
    }
    assert_same(&dump(&sa).await, &dump(&sb).await);
}

/// Amounts too large to sum exactly in Lua doubles (but within the ledger's per-call limit) take
/// the single script and stay exact.
#[tokio::test]
async fn huge_amounts_stay_exact() {
    let server = RedisServer::start();
    let l = Ledger::connect(&server.url()).await.expect("connect");
    let at = Utc::now();
    let big = (1i64 << 55) + 1;
    assert!(big + 2 < ledger::store::MAX_CALL_COST.0 && big + 2 > 1 << 53);
    let r = req(
        "big",
        big,
        at,
        vec![cap(CapScope::Tenant, Period::Month, i64::MAX / 2)],
    );
    assert!(matches!(
        l.reserve(&r).await.expect("reserve"),
        ReserveOutcome::Allowed(_)
    ));
    let mut s = settlement(&r, big + 2, 0);
    s.estimated = false;
    l.settle(&s).await.expect("settle");
    let small = req("small", 3, at, vec![]);
    l.reserve(&small).await.expect("reserve");
    l.settle(&settlement(&small, 3, 0)).await.expect("settle");
    let spend = l
        .tenant_spend("acme", Period::Month, Utc::now())
        .await
        .expect("spend");
    assert_eq!((spend.spend, spend.held), (Nanos(big + 5), Nanos(0)));
    let stats = l.batch_stats();
    assert_eq!(
        (stats.reserve.items, stats.settle.items),
        (1, 1),
        "only the small call is batched"
    );
}

/// Callers that give up (their task is aborted) do not break the batch for the others, and the
/// tenant's queue keeps working afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aborted_callers_do_not_break_a_batch() {
    let server = RedisServer::start();
    let l = Ledger::connect(&server.url()).await.expect("connect");
    let at = Utc::now();
    let mut tasks = Vec::new();
    for i in 0..128 {
        let l = l.clone();
        let r = req(&format!("x{i}"), 1, at, vec![]);
        tasks.push(tokio::spawn(async move { l.reserve(&r).await }));
    }
    for t in tasks.iter().step_by(2) {
        t.abort();
    }
    let mut ok = 0;
    for (i, t) in tasks.into_iter().enumerate() {
        match t.await {
            Ok(res) => {
                res.unwrap_or_else(|e| panic!("reserve x{i}: {e}"));
                ok += 1;
            }
            Err(e) => assert!(e.is_cancelled() && i % 2 == 0, "x{i}: {e}"),
        }
    }
    assert!(ok >= 64, "{ok}");
    let held = l
        .tenant_spend("acme", Period::Month, Utc::now())
        .await
        .expect("spend")
        .held;
    assert!(held.0 >= 64 && held.0 <= 128, "{held}");
    let r = req("after", 1, at, vec![]);
    assert!(matches!(
        tokio::time::timeout(Duration::from_secs(2), l.reserve(&r))
            .await
            .expect("the queue must not be stuck")
            .expect("reserve"),
        ReserveOutcome::Allowed(_)
    ));
}

/// Redis frozen (SIGSTOP) under a steady reserve + settle load, with batches in flight and items
/// queued behind them: every call returns an "unavailable" error within the operation timeout
/// (plus scheduling slack), none hangs, and the ledger works again once Redis resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_paused_redis_fails_every_waiter_within_the_timeout() {
    let server = RedisServer::start();
    let timeout = Duration::from_millis(800);
    let cfg = LedgerConfig {
        response_timeout: Duration::from_millis(200),
        connection_timeout: Duration::from_millis(200),
        operation_timeout: timeout,
        ..LedgerConfig::default()
    };
    let l = Ledger::connect_with(&server.url(), cfg)
        .await
        .expect("connect");
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for t in 0..64 {
        let (l, stop) = (l.clone(), Arc::clone(&stop));
        tasks.push(tokio::spawn(async move {
            let (mut slowest, mut errors, mut n) = (Duration::ZERO, 0, 0);
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let r = req(&format!("{t}-{n}"), 10, Utc::now(), vec![]);
                let t0 = Instant::now();
                let res = l.reserve(&r).await;
                slowest = slowest.max(t0.elapsed());
                let res = match res {
                    Ok(_) => {
                        let t0 = Instant::now();
                        let res = l.settle(&settlement(&r, 5, 0)).await.map(|_| ());
                        slowest = slowest.max(t0.elapsed());
                        res
                    }
                    Err(e) => Err(e),
                };
                if let Err(e) = res {
                    assert!(e.is_transient(), "{e}");
                    errors += 1;
                }
            }
            (slowest, errors)
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(l.batch_stats().settle.batches > 0, "load is running");
    server.pause();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    server.resume();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let mut errors = 0;
    for t in tasks {
        let (slowest, e) = tokio::time::timeout(Duration::from_secs(5), t)
            .await
            .expect("a task hung")
            .expect("join");
        assert!(
            slowest < timeout + Duration::from_millis(500),
            "a reserve or settle took {slowest:?} (timeout {timeout:?})"
        );
        errors += e;
    }
    assert!(errors >= 64, "every task saw the outage: {errors} errors");
    let r = req("after", 1, Utc::now(), vec![]);
    let mut ok = false;
    for _ in 0..30 {
        if l.reserve(&r).await.is_ok() {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok, "the ledger must work again after Redis resumes");
}

/// Connections the server has accepted since it started.
async fn accepted(c: &mut redis::aio::MultiplexedConnection) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("stats")
        .query_async(c)
        .await
        .expect("INFO");
    info.lines()
        .find_map(|l| l.strip_prefix("total_connections_received:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("total_connections_received")
}

/// The calls of one pinned thread: reserve then settle each, one by one, on a current-thread
/// runtime of its own that is gone when this returns. (The ledger's other commands, such as the
/// once-per-tenant active mark, use the shared connection, whose task runs on the caller's
/// runtime: that runtime keeps running meanwhile.)
async fn on_pinned_thread(l: &Ledger, index: usize, calls: Vec<ReserveRequest>) -> Vec<String> {
    let l = l.clone();
    let t = std::thread::spawn(move || {
        ledger::store::pin_thread_connection(index);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let mut out = reserve_each(&l, &calls).await;
            let ss: Vec<_> = calls
                .iter()
                .zip(0..)
                .map(|(r, n)| settlement(r, 7 + n as i64, n))
                .collect();
            out.extend(settle_each(&l, &ss).await);
            out
        })
    });
    tokio::task::spawn_blocking(move || t.join().expect("pinned thread"))
        .await
        .expect("join")
}

/// A thread-per-core server pins each runtime thread to a connection of its own
/// (`thread_connections`): two threads, one after the other, each on its own runtime, commit
/// exactly what the same calls commit over one shared connection, and each opened its own
/// connection (a thread sent to the shared one, or to the first thread's, whose I/O task died
/// with that thread's runtime, would show fewer connections or fail).
#[tokio::test]
async fn pinned_threads_on_their_own_connections_commit_what_one_connection_does() {
    let (sa, sb) = (RedisServer::start(), RedisServer::start());
    let client = redis::Client::open(sa.url()).expect("client");
    let mut c = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let before = accepted(&mut c).await;
    let threaded = Ledger::connect_with(
        &sa.url(),
        LedgerConfig {
            thread_connections: 2,
            ..LedgerConfig::default()
        },
    )
    .await
    .expect("connect a");
    let shared = Ledger::connect(&sb.url()).await.expect("connect b");
    let at = Utc::now();
    let tenant_day = cap(CapScope::Tenant, Period::Day, 10_000);
    let calls = |from: usize| -> Vec<ReserveRequest> {
        (from..from + 10)
            .map(|i| {
                req(
                    &format!("t{i}"),
                    50 + i as i64,
                    at,
                    vec![tenant_day.clone()],
                )
            })
            .collect()
    };
    let mut got = on_pinned_thread(&threaded, 0, calls(0)).await;
    got.extend(on_pinned_thread(&threaded, 1, calls(10)).await);
    let mut want = Vec::new();
    for from in [0, 10] {
        let cs = calls(from);
        want.extend(reserve_each(&shared, &cs).await);
        let ss: Vec<_> = cs
            .iter()
            .zip(0..)
            .map(|(r, n)| settlement(r, 7 + n as i64, n))
            .collect();
        want.extend(settle_each(&shared, &ss).await);
    }
    assert_eq!(got, want, "replies differ");
    assert!(
        got.iter().all(|r| r.starts_with("Ok(")),
        "every call answered: {got:?}"
    );
    // The shared connection and one per pinned thread, each opened by its thread.
    let opened = accepted(&mut c).await - before;
    assert_eq!(opened, 3, "connections opened by the threaded ledger");
    assert_same(&dump(&sa).await, &dump(&sb).await);
}

/// Two servers: a ledger with `cfg` on the first, and one without group commit (each call its own
/// script, one by one) on the second, whose keys the first's must equal.
async fn windowed_and_one_by_one(cfg: LedgerConfig) -> (RedisServer, RedisServer, Ledger, Ledger) {
    let (sa, sb) = (RedisServer::start(), RedisServer::start());
    let a = Ledger::connect_with(&sa.url(), cfg)
        .await
        .expect("connect a");
    let b = Ledger::connect_with(
        &sb.url(),
        LedgerConfig {
            group_commit: false,
            ..LedgerConfig::default()
        },
    )
    .await
    .expect("connect b");
    (sa, sb, a, b)
}

/// Reserves `rs` on both ledgers after their prior state, and returns each call's settlement
/// (costing `cost` nano-USD plus its index).
async fn reserve_on_both(
    ledgers: [&Ledger; 2],
    rs: &[ReserveRequest],
    at: DateTime<Utc>,
    cost: i64,
) -> Vec<Settlement> {
    for l in ledgers {
        prior(l, at).await;
        for r in rs {
            l.reserve(r).await.expect("reserve");
        }
    }
    rs.iter()
        .zip(0..)
        .map(|(r, i)| settlement(r, cost + i, i as u64))
        .collect()
}

/// Settles `s` on its own task; the reply as text, and when it came since `start`.
fn spawn_settle(
    l: &Ledger,
    s: &Settlement,
    start: Instant,
) -> tokio::task::JoinHandle<(String, Duration)> {
    let (l, s) = (l.clone(), s.clone());
    tokio::spawn(async move {
        let out = l.settle(&s).await;
        (format!("{out:?}"), start.elapsed())
    })
}

/// The replies of `tasks` ([`spawn_settle`]), each of which must have come no sooner than `min`
/// (`what` says why not).
async fn replies_no_sooner(
    tasks: Vec<tokio::task::JoinHandle<(String, Duration)>>,
    min: Duration,
    what: &str,
) -> Vec<String> {
    let mut got = Vec::new();
    for t in tasks {
        let (out, took) = t.await.expect("join");
        assert!(took >= min, "a settle was answered after {took:?}, {what}");
        got.push(out);
    }
    got
}

/// With a settle window, the first settle of an idle tenant waits it out and the settles arriving
/// meanwhile (one every few milliseconds, none of them concurrent with another's script) leave
/// with it in one script, which leaves what one-by-one settles leave; the next settle after the
/// lane went idle opens a new window. Without the window each would go alone (five scripts).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settles_within_the_window_share_one_script() {
    let window = Duration::from_millis(300);
    let (sa, sb, a, b) = windowed_and_one_by_one(LedgerConfig {
        settle_window: window,
        ..LedgerConfig::default()
    })
    .await;
    let at = Utc::now();
    let rs: Vec<_> = (0..6u64)
        .map(|i| {
            let mut r = req(&format!("w{i}"), 2_000 + i as i64, at, vec![]);
            r.feature = (i % 2 == 0).then(|| "bot".to_owned());
            r
        })
        .collect();
    let ss = reserve_on_both([&a, &b], &rs, at, 900).await;
    let before = a.batch_stats().settle;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for s in &ss[..5] {
        tasks.push(spawn_settle(&a, s, start));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut got = replies_no_sooner(tasks, window, "before the window closed").await;
    let mid = a.batch_stats().settle;
    assert_eq!(
        (mid.batches - before.batches, mid.items - before.items),
        (1, 5),
        "five settles arriving within the window go as one script"
    );
    // The lane is idle again: the next settle opens a new window, alone.
    got.push(settle_all(&a, &ss[5..]).await.remove(0));
    let after = a.batch_stats().settle;
    assert_eq!(
        (after.batches - mid.batches, after.items - mid.items),
        (1, 1)
    );
    let want = settle_each(&b, &ss).await;
    assert_eq!(got, want);
    assert_same(&dump(&sa).await, &dump(&sb).await);
}

/// With a settle window a lane sends at most one batch per window: settles that arrive while a
/// batch is in flight wait until a window has passed since it left, and then leave together,
/// instead of going in a batch of their own each round trip (docs/benchmarks.md, "Redis opened at
/// start, and settle batches paced by the window"). Redis is paused while the first batch is in flight so the others
/// certainly arrive meanwhile. They leave what one-by-one settles leave.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settles_arriving_while_a_batch_is_in_flight_wait_for_the_next_window() {
    let window = Duration::from_millis(300);
    let (sa, sb, a, b) = windowed_and_one_by_one(LedgerConfig {
        settle_window: window,
        // Redis is paused for a quarter of a second: a slow machine must not time the batch out.
        response_timeout: Duration::from_secs(5),
        operation_timeout: Duration::from_secs(5),
        ..LedgerConfig::default()
    })
    .await;
    let at = Utc::now();
    let rs: Vec<_> = (0..6u64)
        .map(|i| req(&format!("p{i}"), 4_000 + i as i64, at, vec![]))
        .collect();
    let ss = reserve_on_both([&a, &b], &rs, at, 1_500).await;
    let before = a.batch_stats().settle;
    let start = Instant::now();
    // The first settle opens the window; Redis stops before the window ends, so its batch (sent
    // when the window ends) stays in flight while the next five arrive.
    let first = spawn_settle(&a, &ss[0], start);
    tokio::time::sleep(window - Duration::from_millis(100)).await;
    sa.pause();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut rest = Vec::new();
    for s in &ss[1..] {
        rest.push(spawn_settle(&a, s, start));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mid = a.batch_stats().settle;
    sa.resume();
    assert_eq!(
        (mid.batches - before.batches, mid.items - before.items),
        (1, 1),
        "a second batch left while the first was in flight"
    );
    let mut got = vec![first.await.expect("join").0];
    got.extend(
        replies_no_sooner(
            rest,
            2 * window,
            "before a window had passed since the first batch left",
        )
        .await,
    );
    let after = a.batch_stats().settle;
    assert_eq!(
        (after.batches - before.batches, after.items - before.items),
        (2, 6),
        "the five that waited leave as one batch"
    );
    let want = settle_each(&b, &ss).await;
    assert_eq!(got, want);
    assert!(got.iter().all(|r| r.starts_with("Ok(")), "{got:?}");
    assert_same(&dump(&sa).await, &dump(&sb).await);
}

/// A reserve does not end an open settle window, even on the settle worker's own pinned thread:
/// settles sent with it would run before it in Redis and delay its call (docs/benchmarks.md,
/// "Settles no longer ride with reserves"). The settle waits its whole window and then commits
/// what one-by-one calls without group commit commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reserve_does_not_end_the_settle_window() {
    const WINDOW: Duration = Duration::from_millis(1500);
    let (sa, sb, a, b) = windowed_and_one_by_one(LedgerConfig {
        settle_window: WINDOW,
        thread_connections: 1,
        ..LedgerConfig::default()
    })
    .await;
    let at = Utc::now();
    let rs: Vec<_> = (0..3)
        .map(|i| req(&format!("f{i}"), 3_000 + i, at, vec![]))
        .collect();
    let ss: Vec<_> = rs
        .iter()
        .zip(0..)
        .map(|(r, n)| settlement(r, 1_100 + n as i64, n))
        .collect();
    prior(&a, at).await;
    prior(&b, at).await;
    // In Redis the third reserve runs before the settle: replayed in that order, listed in the
    // order the test collects them (two reserves, the settle, the third reserve).
    let mut want = reserve_each(&b, &rs).await;
    let third = want.pop().expect("three reserves");
    want.extend(settle_each(&b, &ss[..1]).await);
    want.push(third);

    let (l, rs2, ss2) = (a.clone(), rs.clone(), ss.clone());
    let t = std::thread::spawn(move || {
        ledger::store::pin_thread_connection(0);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let mut out = reserve_each(&l, &rs2[..2]).await;
            let settle = {
                let (l, s) = (l.clone(), ss2[0].clone());
                tokio::spawn(async move { format!("{:?}", l.settle(&s).await) })
            };
            let opened = std::time::Instant::now();
            tokio::time::sleep(Duration::from_millis(200)).await;
            assert!(!settle.is_finished(), "the settle waits in its window");
            let reserved = reserve_each(&l, &rs2[2..]).await;
            assert!(
                !settle.is_finished() && opened.elapsed() < WINDOW,
                "the reserve went alone: the settle still waits"
            );
            let settled = tokio::time::timeout(Duration::from_secs(5), settle)
                .await
                .expect("the settle went at the window's end")
                .expect("join");
            assert!(
                opened.elapsed() >= WINDOW,
                "the settle was answered before its window ended"
            );
            out.push(settled);
            out.extend(reserved);
            out
        })
    });
    let got = tokio::task::spawn_blocking(move || t.join().expect("pinned thread"))
        .await
        .expect("join");
    assert_eq!(got, want, "replies differ");
    assert!(
        got.iter().all(|r| r.starts_with("Ok(")),
        "every call answered: {got:?}"
    );
    assert_same(&dump(&sa).await, &dump(&sb).await);
}
