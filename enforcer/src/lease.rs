//! The lease pool (`lease_pool`, off by default): spare holds of a tenant reserved ahead, so a call
//! whose worst case fits one is forwarded without a Redis round trip before it.
//!
//! Per tenant, and per feature of a tenant that a feature budget caps, the pool keeps up to
//! `lease_pool` spare holds ([`ledger::store::Lease`]), all
//! reserved in one script call by a background refill when half are gone. A refill aims at twice
//! the calls that came in since the one before, counted over a second at least (2 at least), so
//! a tenant that calls now and then gets a small pool and a busy one the whole `lease_pool`. A
//! call takes one when:
//! - it has no session cap and no rate limit (those need the call's own reserve, which checks
//!   them). A call with a feature cap draws from its feature's pool, whose spare holds were
//!   checked against that feature's caps and count in its `held`; any other call from its
//!   tenant's;
//! - its worst case is at most the spare hold's amount, and at most `lease_max_usd`;
//! - the spare hold belongs to the call's UTC day (its caps were checked against that day and its
//!   month) and has at least `reserve_ttl_secs` left, as a call's own hold would;
//! - the tenant's caps are the ones the spare hold was checked against (a budget edit empties the
//!   pool, and the next refill checks the new caps).
//!
//! The call then adopts the spare hold's id as its request id and holds its amount: it is
//! settled, released or spooled under that id exactly as under its own reservation. Any other call
//! reserves as before. The amount a refill reserves is the next power of two (in nano-USD) of the
//! largest worst case the tenant's calls asked for since the last refill, so one spare hold fits
//! most calls of a model and one large call does not inflate every later pool.
//!
//! A spare hold nobody takes within `lease_idle_secs` is released, and so is the whole pool at a
//! graceful shutdown. After a crash the spare holds are committed at their amount as estimated
//! spend (at the restart's recovery, or when they expire): an over-charge of at most one pool per
//! tenant, never an under-charge. Near a limit the ledger refuses a refill (it keeps a pool's
//! worth of room, `ledger::store::lease_room`), and the tenant's calls reserve one by one.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use ledger::Nanos;
use ledger::store::{Cap, CapScope, Lease, LeaseRequest, Ledger, ReserveRequest, lease_room};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

/// How long a refused or failed refill waits before the tenant's pool asks again.
const RETRY: Duration = Duration::from_secs(1);

/// The pool's counters (`llmwarden_lease_*`, docs/enforcer.md).
#[derive(Debug, Clone, Default)]
pub struct LeaseCounters {
    /// Calls that took a spare hold.
    pub taken: Counter<u64, AtomicU64>,
    /// Spare holds reserved.
    pub reserved: Counter<u64, AtomicU64>,
    /// Spare holds released unused.
    pub released: Counter<u64, AtomicU64>,
    /// Refills refused (a cap without a pool's room) or failed (Redis).
    pub refused: Counter<u64, AtomicU64>,
    /// Spare holds waiting in the pools for a call.
    pub spare: Gauge<i64, AtomicI64>,
    /// What those spare holds hold (nano-USD): what a crash of this process now would charge as
    /// estimates at most.
    pub spare_nanousd: Gauge<i64, AtomicI64>,
}

impl LeaseCounters {
    /// Spare holds entered (`sign` 1) or left (-1) the pools.
    fn pooled<'a>(&self, leases: impl IntoIterator<Item = &'a Lease>, sign: i64) {
        for l in leases {
            self.spare.inc_by(sign);
            self.spare_nanousd.inc_by(sign.saturating_mul(l.amount.0));
        }
    }
}

/// Settings, from the config.
#[derive(Debug, Clone)]
pub struct LeaseSettings {
    /// Spare holds per tenant (0: off).
    pub size: usize,
    /// The largest spare hold.
    pub max_amount: Nanos,
    /// A call's hold lifetime (`reserve_ttl_secs`): a spare hold must have this much left.
    pub call_ttl: Duration,
    /// How long a spare hold may wait for a call.
    pub idle: Duration,
}

/// A refill [`LeasePool::take`] decided on, built into a [`LeaseRequest`] by the refill task.
struct Refill {
    tenant: String,
    feature: Option<String>,
    amount: Nanos,
    count: usize,
    caps: Vec<Cap>,
}

/// One tenant's spare holds.
struct Pool {
    /// The largest worst case asked for since the last refill started: the next refill's spare
    /// holds are its [`LeasePool::amount_for`], so one large call does not inflate every later pool.
    peak: Nanos,
    /// Calls that asked since the last refill started.
    demand: usize,
    /// When the last refill started; for a new pool, a second before it was made, so its first
    /// refill aims at twice its first call, not at a whole pool.
    since: Instant,
    /// How many spare holds the last refill aimed at ([`aim`]): twice the calls that came in
    /// since the one before, over a second at least (at least 2, at most `lease_pool`), so a
    /// tenant with a call now and then gets a small pool, and few spare holds are given back
    /// unused.
    want: usize,
    /// The caps the spare holds were checked against.
    caps: Vec<Cap>,
    free: VecDeque<Lease>,
    refilling: bool,
    retry_at: Option<Instant>,
    last_use: Instant,
}

/// Every tenant's spare holds in this process.
pub struct LeasePool {
    ledger: Ledger,
    settings: LeaseSettings,
    counters: LeaseCounters,
    /// By pool: the tenant's name, or `tenant|feature` for a feature's (no tenant name holds a `|`).
    tenants: parking_lot::Mutex<HashMap<String, Pool>>,
    closed: std::sync::atomic::AtomicBool,
    /// Refills and releases under way: a graceful shutdown waits for them.
    tasks: tokio_util::task::TaskTracker,
}

impl std::fmt::Debug for LeasePool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeasePool")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl LeasePool {
    /// A pool over `ledger`; with `settings.size` 0 it never holds anything.
    #[must_use]
    pub fn new(ledger: Ledger, settings: LeaseSettings, counters: LeaseCounters) -> Arc<LeasePool> {
        Arc::new(LeasePool {
            ledger,
            settings,
            counters,
            tenants: parking_lot::Mutex::default(),
            closed: std::sync::atomic::AtomicBool::new(false),
            tasks: tokio_util::task::TaskTracker::new(),
        })
    }

    /// Whether the pool is on.
    #[must_use]
    pub fn enabled(&self) -> bool {
        self.settings.size > 0
    }

    /// A spare hold for the call `rr` describes, if one fits (see the module docs); starts a
    /// refill when the tenant's pool is half empty. Never waits.
    pub fn take(self: &Arc<Self>, rr: &ReserveRequest) -> Option<Lease> {
        if !self.eligible(rr) {
            return None;
        }
        let now = Instant::now();
        let feature = pool_feature(rr);
        let key = match feature {
            None => std::borrow::Cow::Borrowed(rr.tenant.as_str()),
            Some(f) => std::borrow::Cow::Owned(format!("{}|{f}", rr.tenant)),
        };
        let mut stale = Vec::new();
        let (got, refill) = {
            let mut tenants = self.tenants.lock();
            let pool = match tenants.get_mut(key.as_ref()) {
                Some(p) => p,
                None => tenants
                    .entry(key.clone().into_owned())
                    .or_insert_with(|| Pool {
                        peak: Nanos::ZERO,
                        demand: 0,
                        since: now.checked_sub(Duration::from_secs(1)).unwrap_or(now),
                        want: 2,
                        caps: rr.caps.clone(),
                        free: VecDeque::new(),
                        refilling: false,
                        retry_at: None,
                        last_use: now,
                    }),
            };
            pool.last_use = now;
            if pool.caps != rr.caps {
                // A budget changed: the spare holds were checked against the old caps.
                stale.extend(pool.free.drain(..));
                pool.caps.clone_from(&rr.caps);
                pool.retry_at = None;
            }
            pool.peak = pool.peak.max(rr.amount);
            pool.demand += 1;
            let mut got = None;
            let mut i = 0;
            while i < pool.free.len() {
                let l = &pool.free[i];
                if !self.usable(l, rr.at) {
                    stale.extend(pool.free.remove(i));
                } else if l.amount >= rr.amount {
                    got = pool.free.remove(i);
                    break;
                } else {
                    i += 1;
                }
            }
            let mut refill = None;
            if !pool.refilling
                && pool.free.len() <= pool.want / 2
                && pool.retry_at.is_none_or(|t| now >= t)
            {
                // The new aim can be below what is left when calls slowed down: then nothing
                // is asked, and the calls since keep counting.
                let want = aim(
                    pool.demand,
                    now.duration_since(pool.since),
                    self.settings.size,
                );
                let count = want.saturating_sub(pool.free.len());
                pool.want = want;
                if count > 0 {
                    refill = Some((self.amount_for(pool.peak), count, pool.caps.clone()));
                    pool.refilling = true;
                    pool.demand = 0;
                    pool.since = now;
                    pool.peak = Nanos::ZERO;
                }
            }
            (got, refill)
        };
        if let Some((amount, count, caps)) = refill {
            let order = Refill {
                tenant: rr.tenant.clone(),
                feature: feature.map(str::to_owned),
                amount,
                count,
                caps,
            };
            self.tasks
                .spawn(Arc::clone(self).refill(key.into_owned(), order));
        }
        self.counters.pooled(stale.iter().chain(&got), -1);
        if !stale.is_empty() {
            self.tasks
                .spawn(Arc::clone(self).release(rr.tenant.clone(), stale));
        }
        if got.is_some() {
            self.counters.taken.inc();
        }
        got
    }

    /// Whether a call may take a spare hold at all: no session cap and no rate limit (those need
    /// the call's own reserve), a worst case within the largest spare hold.
    fn eligible(&self, rr: &ReserveRequest) -> bool {
        self.enabled()
            && !self.closed()
            && rr.rates.is_empty()
            && rr.amount > Nanos::ZERO
            && rr.amount <= self.settings.max_amount
            && rr
                .caps
                .iter()
                .all(|c| !matches!(c.scope, CapScope::Session(_)))
    }

    /// The ledger's request for `order`: its spare holds (new ids), checked against its caps
    /// (the pool's) with a pool's worth of room.
    fn lease_request(&self, order: Refill) -> LeaseRequest {
        LeaseRequest {
            tenant: order.tenant,
            feature: order.feature,
            amount: order.amount,
            ids: (0..order.count).map(|_| crate::call::new_id()).collect(),
            ttl: self.settings.call_ttl + self.settings.idle,
            room: lease_room(self.settings.size, order.amount),
            caps: order.caps,
            at: Utc::now(),
        }
    }

    /// The spare hold amount for a worst case: the next power of two, within `lease_max_usd`.
    fn amount_for(&self, worst: Nanos) -> Nanos {
        let up = u64::try_from(worst.0)
            .ok()
            .and_then(u64::checked_next_power_of_two)
            .and_then(|v| i64::try_from(v).ok())
            .unwrap_or(i64::MAX);
        Nanos(up.min(self.settings.max_amount.0))
    }

    /// A spare hold a call at `at` may take: of the call's UTC day, with a call's lifetime left.
    fn usable(&self, l: &Lease, at: DateTime<Utc>) -> bool {
        let left = l.expires_at.signed_duration_since(at).to_std();
        at < l.day_end && left.is_ok_and(|d| d >= self.settings.call_ttl)
    }

    /// Reserves the spare holds `order` asks for and adds those granted to the pool `key`.
    ///
    /// It first yields: the call whose take started it has its request still to send, and a
    /// task spawned on a proxy thread would otherwise run (build its ids and script, write to
    /// Redis) before that call's connection task wrote the request upstream.
    async fn refill(self: Arc<Self>, key: String, order: Refill) {
        tokio::task::yield_now().await;
        let req = self.lease_request(order);
        let (tenant, count) = (req.tenant.clone(), req.ids.len());
        let res = self.ledger.lease(&req).await;
        if let Ok(granted) = &res {
            tracing::debug!(tenant = %tenant, feature = req.feature.as_deref().unwrap_or(""), amount = %req.amount, asked = count, granted = granted.len(), "lease pool refill");
        }
        let mut back = Vec::new();
        {
            let mut tenants = self.tenants.lock();
            let pool = tenants.get_mut(&key);
            match (&res, pool) {
                (Ok(granted), Some(pool)) if !self.closed() && pool.caps == req.caps => {
                    pool.refilling = false;
                    self.counters.reserved.inc_by(granted.len() as u64);
                    if granted.len() < count {
                        self.counters.refused.inc();
                        pool.retry_at = Some(Instant::now() + RETRY);
                    }
                    pool.free.extend(granted.iter().cloned());
                    self.counters.pooled(granted, 1);
                }
                (Ok(granted), pool) => {
                    // Closed, swept, or the budgets changed meanwhile: give them back.
                    if let Some(p) = pool {
                        p.refilling = false;
                    }
                    self.counters.reserved.inc_by(granted.len() as u64);
                    back.extend(granted.iter().cloned());
                }
                (Err(e), pool) => {
                    if let Some(p) = pool {
                        p.refilling = false;
                        p.retry_at = Some(Instant::now() + RETRY);
                    }
                    self.counters.refused.inc();
                    tracing::warn!(tenant = %tenant, error = %e, "lease pool refill failed; calls reserve one by one");
                }
            }
        }
        if let Err(e) = &res
            && e.is_transient()
        {
            // Redis may have created some before the error: release every id once it answers.
            self.release_ids(tenant, req.ids).await;
            return;
        }
        if !back.is_empty() {
            self.release(tenant, back).await;
        }
    }

    fn closed(&self) -> bool {
        self.closed.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Releases spare holds nobody took (after a yield, as [`LeasePool::refill`] does).
    async fn release(self: Arc<Self>, tenant: String, leases: Vec<Lease>) {
        tokio::task::yield_now().await;
        self.release_ids(tenant, leases.into_iter().map(|l| l.id).collect())
            .await;
    }

    /// Releases spare holds by id, retrying a few times while Redis does not answer (an id that
    /// no longer exists is fine). One that stays unreleased is committed at its amount when it
    /// expires, as after a crash.
    async fn release_ids(&self, tenant: String, ids: Vec<String>) {
        for id in ids {
            for wait in [0u64, 1, 5, 30] {
                tokio::time::sleep(Duration::from_secs(wait)).await;
                match self.ledger.release_lease(&tenant, &id).await {
                    Ok(Some(_)) => {
                        self.counters.released.inc();
                        break;
                    }
                    Ok(None) => break,
                    Err(e) if e.is_transient() => {}
                    Err(e) => {
                        tracing::error!(tenant = %tenant, error = %e, "spare hold release refused");
                        break;
                    }
                }
            }
        }
    }

    /// Releases the spare holds no call can take any more (too old, or of a past day) and forgets
    /// the tenants idle for `lease_idle_secs`. Runs every second while the enforcer serves.
    pub fn spawn_sweeper(self: &Arc<Self>) {
        if !self.enabled() {
            return;
        }
        let pool = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = ledger::store::poll_ticks(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let Some(pool) = pool.upgrade() else { return };
                if pool.closed() {
                    return;
                }
                for (tenant, stale) in pool.sweep(Utc::now(), Instant::now()) {
                    pool.tasks.spawn(Arc::clone(&pool).release(tenant, stale));
                }
            }
        });
    }

    /// What [`LeasePool::spawn_sweeper`] releases at `at`, by tenant.
    fn sweep(&self, at: DateTime<Utc>, now: Instant) -> Vec<(String, Vec<Lease>)> {
        let mut out = Vec::new();
        let mut tenants = self.tenants.lock();
        tenants.retain(|key, pool| {
            let idle = now.duration_since(pool.last_use) >= self.settings.idle;
            let stale: Vec<Lease> = if idle {
                pool.free.drain(..).collect()
            } else {
                let mut stale = Vec::new();
                pool.free.retain(|l| {
                    let keep = self.usable(l, at);
                    if !keep {
                        stale.push(l.clone());
                    }
                    keep
                });
                stale
            };
            if !stale.is_empty() {
                self.counters.pooled(&stale, -1);
                out.push((tenant_of(key).to_owned(), stale));
            }
            !idle || pool.refilling
        });
        out
    }

    /// Stops handing out and refilling, releases every spare hold, and waits for the refills and
    /// releases under way (graceful shutdown; a refill that lands meanwhile gives its spare holds
    /// back). The caller bounds the wait: a spare hold left behind is charged when it expires.
    pub async fn close(self: &Arc<Self>) {
        self.closed
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let all: Vec<(String, Vec<Lease>)> = self
            .tenants
            .lock()
            .iter_mut()
            .map(|(k, p)| (tenant_of(k).to_owned(), p.free.drain(..).collect()))
            .collect();
        for (tenant, leases) in all {
            self.counters.pooled(&leases, -1);
            if !leases.is_empty() {
                self.tasks.spawn(Arc::clone(self).release(tenant, leases));
            }
        }
        self.tasks.close();
        self.tasks.wait().await;
    }

    /// Spare holds waiting in the pool, over every tenant.
    #[must_use]
    pub fn free(&self) -> usize {
        self.tenants.lock().values().map(|p| p.free.len()).sum()
    }
}

/// The feature whose pool a call draws from: its own when one of its caps is its feature's,
/// none (the tenant's pool) otherwise.
fn pool_feature(rr: &ReserveRequest) -> Option<&str> {
    rr.caps.iter().find_map(|c| match &c.scope {
        CapScope::Feature(f) => Some(f.as_str()),
        _ => None,
    })
}

/// What a refill aims at after `demand` calls in `elapsed` since the last one: twice the calls,
/// counted over a second when the last refill was sooner (at 45 calls a second one after another,
/// each call would otherwise start a refill of one or two), at least 2, at most `size`.
fn aim(demand: usize, elapsed: Duration, size: usize) -> usize {
    const HORIZON: Duration = Duration::from_secs(1);
    let per_horizon = if elapsed >= HORIZON {
        demand
    } else {
        let ms = u64::try_from(elapsed.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let scaled = (demand as u64).saturating_mul(1_000) / ms;
        usize::try_from(scaled).unwrap_or(usize::MAX)
    };
    per_horizon.saturating_mul(2).max(2).min(size)
}

/// The tenant of a pool key (`tenant` or `tenant|feature`).
fn tenant_of(key: &str) -> &str {
    key.split_once('|').map_or(key, |(t, _)| t)
}

#[cfg(test)]
mod tests {
    //! What a call may take, without Redis: pools are seeded by hand and marked as refilling, so
    //! nothing is sent (tests/tests/enforcer_leases.rs runs the pool against a real one).

    use super::*;
    use ledger::store::Period;

    const TTL: Duration = Duration::from_secs(900);

    async fn pool(size: usize) -> Arc<LeasePool> {
        // Nothing listens on port 1: the ledger connects lazily and is never asked here.
        let ledger = Ledger::connect_lazy(
            "redis://127.0.0.1:1",
            ledger::store::LedgerConfig::default(),
        )
        .await
        .expect("lazy ledger");
        LeasePool::new(
            ledger,
            LeaseSettings {
                size,
                max_amount: Nanos(1_000_000_000),
                call_ttl: TTL,
                idle: Duration::from_secs(10),
            },
            LeaseCounters::default(),
        )
    }

    fn caps() -> Vec<Cap> {
        vec![Cap {
            scope: CapScope::Tenant,
            period: Period::Month,
            limit: Nanos(1_000_000_000_000),
        }]
    }

    fn call(amount: i64, at: DateTime<Utc>) -> ReserveRequest {
        ReserveRequest {
            tenant: "acme".into(),
            feature: Some("bot".into()),
            session: None,
            request_id: "r".into(),
            provider: "openai".into(),
            model: Some("gpt-4o-mini".into()),
            amount: Nanos(amount),
            ttl: TTL,
            caps: caps(),
            at,
            rates: Vec::new(),
            tokens: 0,
        }
    }

    fn spare(id: &str, amount: i64, at: DateTime<Utc>, left: Duration) -> Lease {
        Lease {
            id: id.into(),
            amount: Nanos(amount),
            expires_at: at + chrono::Duration::from_std(left).expect("duration"),
            day_end: Period::Day.reset_at(at),
        }
    }

    /// Seeds the tenant's pool with `free`, as if a refill were under way (so none starts).
    fn seed(p: &LeasePool, free: Vec<Lease>) {
        seed_pool(p, "acme", caps(), free);
    }

    /// Seeds the pool `key` (checked against `caps`) with `free`, a refill under way.
    fn seed_pool(p: &LeasePool, key: &str, caps: Vec<Cap>, free: Vec<Lease>) {
        p.tenants.lock().insert(
            key.into(),
            Pool {
                peak: Nanos::ZERO,
                demand: 0,
                since: Instant::now()
                    .checked_sub(Duration::from_secs(60))
                    .unwrap_or_else(Instant::now),
                want: 16,
                caps,
                free: free.into(),
                refilling: true,
                retry_at: None,
                last_use: Instant::now(),
            },
        );
    }

    fn ids(p: &LeasePool) -> Vec<String> {
        p.tenants.lock()["acme"]
            .free
            .iter()
            .map(|l| l.id.clone())
            .collect()
    }

    #[tokio::test]
    async fn a_call_takes_only_a_spare_hold_that_covers_it_today_for_a_whole_call() {
        let p = pool(16).await;
        let now = Utc::now();
        let yesterday = now - chrono::Duration::days(1);
        seed(
            &p,
            vec![
                // Checked against yesterday's day cap: never today's.
                spare(
                    "old-day",
                    4_096,
                    yesterday,
                    TTL + Duration::from_secs(86_400 * 2),
                ),
                // Less than a call's lifetime left: the call could outlive it.
                spare("short", 4_096, now, TTL - Duration::from_secs(1)),
                // Too small for the call.
                spare("small", 1_024, now, TTL + Duration::from_secs(5)),
                spare("fits", 4_096, now, TTL + Duration::from_secs(5)),
                spare("next", 4_096, now, TTL + Duration::from_secs(5)),
            ],
        );
        let got = p.take(&call(3_000, now)).expect("a spare hold");
        assert_eq!((got.id.as_str(), got.amount), ("fits", Nanos(4_096)));
        // The unusable ones left the pool (to be released); the small one waits for a small call.
        assert_eq!(ids(&p), vec!["small", "next"]);
        let got = p.take(&call(1_000, now)).expect("a small call");
        assert_eq!(got.id, "small");
        assert_eq!(p.counters.taken.get(), 2);
    }

    #[tokio::test]
    async fn calls_with_their_own_limits_never_take_a_spare_hold() {
        let p = pool(16).await;
        let now = Utc::now();
        seed(
            &p,
            vec![spare("s", 1 << 20, now, TTL + Duration::from_secs(5))],
        );
        let mut session = call(100, now);
        session.session = Some("s1".into());
        session.caps.push(Cap {
            scope: CapScope::Session("s1".into()),
            period: Period::Day,
            limit: Nanos(1 << 30),
        });
        let mut rated = call(100, now);
        rated.rates.push(ledger::store::RateLimit {
            scope: "tenant".into(),
            rpm: 10,
            tpm: 0,
        });
        let big = call(1_000_000_001, now);
        for (what, r) in [
            ("session cap", session),
            ("rate limit", rated),
            ("above lease_max_usd", big),
        ] {
            assert!(p.take(&r).is_none(), "{what}");
        }
        assert_eq!(ids(&p), vec!["s"]);
        // Off: nothing at all.
        let off = pool(0).await;
        assert!(off.take(&call(100, now)).is_none());
        assert!(off.tenants.lock().is_empty());
    }

    #[tokio::test]
    async fn a_call_with_a_feature_cap_draws_from_its_features_pool() {
        let p = pool(16).await;
        let now = Utc::now();
        let mut bot_caps = caps();
        bot_caps.push(Cap {
            scope: CapScope::Feature("bot".into()),
            period: Period::Day,
            limit: Nanos(1 << 30),
        });
        let fresh = TTL + Duration::from_secs(5);
        seed(&p, vec![spare("tenant", 4_096, now, fresh)]);
        seed_pool(
            &p,
            "acme|bot",
            bot_caps.clone(),
            vec![spare("bot", 4_096, now, fresh)],
        );
        // Capped by feature bot: only the spare hold checked against (and held for) bot's cap.
        let mut capped = call(100, now);
        capped.caps = bot_caps;
        assert_eq!(p.take(&capped).expect("bot's spare hold").id, "bot");
        assert!(p.take(&capped).is_none(), "never the tenant's");
        // Feature bot without a cap of its own (`call` names it): the tenant's pool.
        assert_eq!(p.take(&call(100, now)).expect("the tenant's").id, "tenant");
        // The sweeper gives a feature's spare holds back under its tenant.
        seed_pool(
            &p,
            "acme|bot",
            Vec::new(),
            vec![spare("left", 4_096, now, fresh)],
        );
        let out = p.sweep(now, Instant::now() + Duration::from_secs(11));
        assert_eq!(out.len(), 1);
        assert_eq!(
            (out[0].0.as_str(), out[0].1[0].id.as_str()),
            ("acme", "left")
        );
    }

    #[tokio::test]
    async fn a_budget_edit_empties_the_pool() {
        let p = pool(16).await;
        let now = Utc::now();
        seed(
            &p,
            vec![spare("s", 4_096, now, TTL + Duration::from_secs(5))],
        );
        let mut r = call(100, now);
        r.caps[0].limit = Nanos(5_000);
        assert!(p.take(&r).is_none(), "checked against the old limit");
        assert!(ids(&p).is_empty());
    }

    #[tokio::test]
    async fn a_refill_aims_at_twice_the_recent_calls_within_the_pool() {
        let p = pool(16).await;
        let now = Utc::now();
        seed(&p, Vec::new());
        {
            let mut t = p.tenants.lock();
            let pool = t.get_mut("acme").expect("pool");
            pool.want = 2;
        }
        // Three calls while a refill is under way, the largest 5,000.
        for a in [1_000, 5_000, 3_000] {
            assert!(p.take(&call(a, now)).is_none());
        }
        {
            let mut t = p.tenants.lock();
            let pool = t.get_mut("acme").expect("pool");
            assert_eq!((pool.demand, pool.peak), (3, Nanos(5_000)));
            pool.refilling = false;
            pool.retry_at = Some(Instant::now() + Duration::from_secs(60));
        }
        // The refill that starts now asks for 2 × 4 calls, of the next power of two of 5,000.
        let t = p.tenants.lock();
        let pool = &t["acme"];
        assert_eq!(p.amount_for(pool.peak), Nanos(8_192));
        drop(t);
        assert_eq!(p.amount_for(Nanos(2_000_000_000)), Nanos(1_000_000_000));
        p.tenants.lock().get_mut("acme").expect("pool").retry_at = None;
        assert!(p.take(&call(10, now)).is_none());
        let t = p.tenants.lock();
        let pool = &t["acme"];
        assert!(pool.refilling, "a refill started");
        assert_eq!((pool.want, pool.demand, pool.peak), (8, 0, Nanos::ZERO));
    }

    #[test]
    fn a_pool_refilled_often_aims_at_a_seconds_calls() {
        let ms = Duration::from_millis;
        // One sequential client at ~45 calls a second: the whole pool, not one or two per call.
        assert_eq!(aim(1, ms(22), 16), 16);
        assert_eq!(aim(1, Duration::ZERO, 16), 16);
        assert_eq!(aim(3, ms(500), 16), 12);
        // A second or more since the last refill: twice the calls since, as before.
        assert_eq!(aim(4, Duration::from_secs(10), 16), 8);
        assert_eq!(aim(1, Duration::from_secs(10), 16), 2);
        assert_eq!(aim(0, Duration::from_secs(1), 16), 2);
        // Never above the pool's size.
        assert_eq!(aim(5, Duration::from_secs(1), 1), 1);
    }

    #[tokio::test]
    async fn a_new_tenants_first_refill_is_small() {
        let p = pool(16).await;
        // Its refill fails (nothing listens on the ledger's port); what it aimed at is the point.
        assert!(p.take(&call(1_000, Utc::now())).is_none());
        let t = p.tenants.lock();
        let pool = &t["acme"];
        assert!(pool.refilling);
        assert_eq!(pool.want, 2, "one call: twice that, not the whole pool");
    }

    #[tokio::test]
    async fn a_refill_never_asks_for_less_than_nothing() {
        let p = pool(16).await;
        let now = Utc::now();
        // Eight spare holds left of a pool that aimed at 16, and calls have slowed to one: the
        // new aim (2) is below what is left, so nothing is asked and no refill starts.
        seed(
            &p,
            (0..8)
                .map(|i| spare(&format!("s{i}"), 4_096, now, TTL + Duration::from_secs(5)))
                .collect(),
        );
        {
            let mut t = p.tenants.lock();
            let pool = t.get_mut("acme").expect("pool");
            pool.refilling = false;
        }
        let got = p.take(&call(1_000, now)).expect("a spare hold");
        assert_eq!(got.id, "s0");
        let t = p.tenants.lock();
        let pool = &t["acme"];
        assert!(!pool.refilling, "no refill for a pool above its aim");
        assert_eq!((pool.want, pool.free.len(), pool.demand), (2, 7, 1));
    }

    #[tokio::test]
    async fn the_sweeper_gives_back_what_no_call_can_take() {
        let p = pool(16).await;
        let now = Utc::now();
        seed(
            &p,
            vec![
                spare("stale", 4_096, now, TTL - Duration::from_secs(1)),
                spare("fresh", 4_096, now, TTL + Duration::from_secs(5)),
            ],
        );
        let out = p.sweep(now, Instant::now());
        assert_eq!(out.len(), 1);
        assert_eq!(
            out[0].1.iter().map(|l| l.id.as_str()).collect::<Vec<_>>(),
            ["stale"]
        );
        assert_eq!(ids(&p), vec!["fresh"]);
        // Idle for lease_idle_secs: everything goes, and the tenant is forgotten once no refill
        // is under way.
        let later = Instant::now() + Duration::from_secs(11);
        let out = p.sweep(now, later);
        assert_eq!(out[0].1.len(), 1);
        assert!(
            p.tenants.lock().contains_key("acme"),
            "a refill is still under way"
        );
        p.tenants.lock().get_mut("acme").expect("pool").refilling = false;
        let _ = p.sweep(now, later);
        assert!(p.tenants.lock().is_empty());
    }
}
