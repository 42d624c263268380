//! Ledger throughput: many concurrent tasks doing reserve then settle through `ledger::store`, the
//! same two atomic scripts the enforcer runs for every call.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use chrono::Utc;
use ledger::Nanos;
use ledger::store::{
    Cap, CapScope, Ledger, Period, ReserveOutcome, ReserveRequest, Settlement, TokenCounts,
};
use serde::{Deserialize, Serialize};

use crate::latency::{Latencies, Summary};

/// One ledger run.
#[derive(Debug, Clone)]
pub struct LedgerRun {
    /// `redis://127.0.0.1:PORT`.
    pub redis_url: String,
    /// Concurrent tasks (sharing one multiplexed connection, as in the enforcer).
    pub tasks: usize,
    /// Tenants the tasks spread over (each tenant is one hash slot and one set of keys).
    pub tenants: usize,
    /// Measured time.
    pub duration: Duration,
    /// Unrecorded time first.
    pub warmup: Duration,
}

/// What a ledger run measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LedgerReport {
    /// Reserve + settle pairs completed in the measured window.
    pub pairs: u64,
    /// Pairs per second.
    pub pairs_per_s: f64,
    /// Ledger operations (reserve or settle) per second: twice the pairs.
    pub ops_per_s: f64,
    /// Failures by label.
    pub errors: BTreeMap<String, u64>,
    /// Latency of one reserve + settle pair.
    pub pair_latency_us: Summary,
}

/// Runs the tasks against a fresh tenant namespace; errors only when Redis cannot be reached.
pub async fn run(run: &LedgerRun) -> Result<LedgerReport> {
    let ledger = Ledger::connect(&run.redis_url)
        .await
        .with_context(|| format!("connecting to {}", run.redis_url))?;
    let ns = uuid::Uuid::new_v4().simple().to_string();
    let start = Instant::now();
    let (from, end) = (start + run.warmup, start + run.warmup + run.duration);
    let tally = Arc::new(Mutex::new((
        0u64,
        Latencies::new(),
        BTreeMap::<String, u64>::new(),
    )));
    let mut tasks = Vec::new();
    for i in 0..run.tasks.max(1) {
        let (ledger, tally) = (ledger.clone(), Arc::clone(&tally));
        let tenant = format!("bench-{}-{}", &ns[..8], i % run.tenants.max(1));
        tasks.push(tokio::spawn(async move {
            let (mut pairs, mut lat, mut errors) =
                (0u64, Latencies::new(), BTreeMap::<String, u64>::new());
            let mut n = 0u64;
            loop {
                let t0 = Instant::now();
                if t0 >= end {
                    break;
                }
                n += 1;
                let res = pair(&ledger, &tenant, &format!("{i}-{n}")).await;
                let t1 = Instant::now();
                if t0 >= from && t1 <= end {
                    match res {
                        Ok(()) => {
                            pairs += 1;
                            lat.record(t1 - t0);
                        }
                        Err(e) => *errors.entry(e).or_default() += 1,
                    }
                }
            }
            let mut t = tally.lock().expect("tally lock");
            t.0 += pairs;
            t.1.merge(&lat);
            for (k, v) in errors {
                *t.2.entry(k).or_default() += v;
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let t = tally.lock().expect("tally lock");
    let secs = run.duration.as_secs_f64();
    Ok(LedgerReport {
        pairs: t.0,
        pairs_per_s: t.0 as f64 / secs,
        ops_per_s: 2.0 * t.0 as f64 / secs,
        errors: t.2.clone(),
        pair_latency_us: t.1.summary(),
    })
}

async fn pair(ledger: &Ledger, tenant: &str, id: &str) -> Result<(), String> {
    let at = Utc::now();
    let req = ReserveRequest {
        tenant: tenant.to_owned(),
        feature: Some("bench".to_owned()),
        session: None,
        request_id: id.to_owned(),
        provider: "openai".to_owned(),
        model: Some("gpt-4o-mini".to_owned()),
        amount: Nanos(50_000),
        ttl: Duration::from_secs(300),
        caps: vec![
            Cap {
                scope: CapScope::Tenant,
                period: Period::Month,
                limit: Nanos(i64::MAX / 4),
            },
            Cap {
                scope: CapScope::Feature("bench".to_owned()),
                period: Period::Day,
                limit: Nanos(i64::MAX / 4),
            },
        ],
        at,
        rates: Vec::new(),
        tokens: 0,
    };
    match ledger
        .reserve(&req)
        .await
        .map_err(|e| format!("reserve: {e}"))?
    {
        ReserveOutcome::Allowed(_) => {}
        ReserveOutcome::Denied(_) | ReserveOutcome::RateLimited(_) => {
            return Err("denied".to_owned());
        }
    }
    let s = Settlement {
        meta: Default::default(),
        tenant: tenant.to_owned(),
        request_id: id.to_owned(),
        feature: Some("bench".to_owned()),
        session: None,
        model: Some("gpt-4o-mini".to_owned()),
        cost: Nanos(12_345),
        tokens: TokenCounts {
            input: 120,
            output: 16,
            cache_read: 0,
            cache_write: 0,
        },
        estimated: false,
        started_at: at,
    };
    ledger
        .settle(&s)
        .await
        .map_err(|e| format!("settle: {e}"))?;
    Ok(())
}
