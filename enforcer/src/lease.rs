//! The lease pool (`lease_pool`, off by default): spare holds of a tenant reserved ahead, so a call
//! whose worst case fits one is forwarded without a Redis round trip before it.
//!
//! Per tenant the pool keeps up to `lease_pool` spare holds ([`ledger::store::Lease`]), all
//! reserved in one script call by a background refill when half are gone. A call takes one when:
//! - its caps are all the tenant's (a feature or session cap, or a rate limit, needs the call's
//!   own reserve, which checks them);
//! - its worst case is at most the spare hold's amount, and at most `lease_max_usd`;
//! - the spare hold belongs to the call's UTC day (its caps were checked against that day and its
//!   month) and has at least `reserve_ttl_secs` left, as a call's own hold would;
//! - the tenant's caps are the ones the spare hold was checked against (a budget edit empties the
//!   pool, and the next refill checks the new caps).
//!
//! The call then adopts the spare hold's id as its request id and holds its amount: it is
//! settled, released or spooled under that id exactly as under its own reservation. Any other call
//! reserves as before. The amount a refill reserves is the next power of two (in nano-USD) of the
//! largest worst case the tenant's calls asked for, so one spare hold fits most calls of a model.
//!
//! A spare hold nobody takes within `lease_idle_secs` is released, and so is the whole pool at a
//! graceful shutdown. After a crash the spare holds are committed at their amount as estimated
//! spend (at the restart's recovery, or when they expire): an over-charge of at most one pool per
//! tenant, never an under-charge. Near a limit the ledger refuses a refill (it keeps a pool's
//! worth of room, `ledger::store::lease_room`), and the tenant's calls reserve one by one.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use ledger::Nanos;
use ledger::store::{Cap, CapScope, Lease, LeaseRequest, Ledger, ReserveRequest, lease_room};
use prometheus_client::metrics::counter::Counter;

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

/// One tenant's spare holds.
struct Pool {
    /// The amount of the next refill.
    target: Nanos,
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
        let mut stale = Vec::new();
        let (got, refill) = {
            let mut tenants = self.tenants.lock();
            let pool = match tenants.get_mut(&rr.tenant) {
                Some(p) => p,
                None => tenants.entry(rr.tenant.clone()).or_insert_with(|| Pool {
                    target: Nanos::ZERO,
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
            pool.target = pool.target.max(self.amount_for(rr.amount));
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
            let refill = (!pool.refilling
                && pool.free.len() <= self.settings.size / 2
                && pool.retry_at.is_none_or(|t| now >= t))
            .then(|| {
                pool.refilling = true;
                (
                    pool.target,
                    self.settings.size - pool.free.len(),
                    pool.caps.clone(),
                )
            });
            (got, refill)
        };
        if let Some((amount, count, caps)) = refill {
            self.tasks
                .spawn(Arc::clone(self).refill(rr.tenant.clone(), amount, count, caps));
        }
        if !stale.is_empty() {
            self.tasks
                .spawn(Arc::clone(self).release(rr.tenant.clone(), stale));
        }
        if got.is_some() {
            self.counters.taken.inc();
        }
        got
    }

    /// Whether a call may take a spare hold at all: no feature or session cap and no rate limit
    /// (those need the call's own reserve), a worst case within the largest spare hold.
    fn eligible(&self, rr: &ReserveRequest) -> bool {
        self.enabled()
            && !self.closed()
            && rr.rates.is_empty()
            && rr.amount > Nanos::ZERO
            && rr.amount <= self.settings.max_amount
            && rr.caps.iter().all(|c| c.scope == CapScope::Tenant)
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

    /// Reserves `count` spare holds of `amount` for `tenant` and adds those granted to its pool.
    async fn refill(self: Arc<Self>, tenant: String, amount: Nanos, count: usize, caps: Vec<Cap>) {
        let req = LeaseRequest {
            tenant: tenant.clone(),
            amount,
            ids: (0..count)
                .map(|_| uuid::Uuid::now_v7().to_string())
                .collect(),
            ttl: self.settings.call_ttl + self.settings.idle,
            room: lease_room(self.settings.size, amount),
            caps,
            at: Utc::now(),
        };
        let res = self.ledger.lease(&req).await;
        if let Ok(granted) = &res {
            tracing::debug!(tenant = %tenant, amount = %amount, asked = count, granted = granted.len(), "lease pool refill");
        }
        let mut back = Vec::new();
        {
            let mut tenants = self.tenants.lock();
            let pool = tenants.get_mut(&tenant);
            match (&res, pool) {
                (Ok(granted), Some(pool)) if !self.closed() && pool.caps == req.caps => {
                    pool.refilling = false;
                    self.counters.reserved.inc_by(granted.len() as u64);
                    if granted.len() < count {
                        self.counters.refused.inc();
                        pool.retry_at = Some(Instant::now() + RETRY);
                    }
                    pool.free.extend(granted.iter().cloned());
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

    /// Releases spare holds nobody took.
    async fn release(self: Arc<Self>, tenant: String, leases: Vec<Lease>) {
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
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
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
        tenants.retain(|tenant, pool| {
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
                out.push((tenant.clone(), stale));
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
            .map(|(t, p)| (t.clone(), p.free.drain(..).collect()))
            .collect();
        for (tenant, leases) in all {
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
