//! The Redis ledger: atomic budgets shared by every enforcer instance and the observer.
//!
//! Every key of tenant `T` starts with `llmw:{T}:`, one Redis Cluster hash tag per tenant, so each
//! Lua script touches a single slot. The key layout and the scripts are a stable interface,
//! documented in docs/redis-schema.md. Money is integer nano-USD, changed only with HINCRBY.

mod alerts;
mod apikeys;
mod audit;
mod audit_read;
mod batch;
mod budget;
mod budget_cache;
mod conn;
mod keys;
mod lease;
mod ops_events;
mod period;
mod poll;
mod rate;
mod recovery;
mod reserve;
mod rules;
mod scripts;
mod settle;
mod signals;
mod spend;
mod types;
mod unmetered;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, TimeZone, Utc};
use redis::AsyncCommands;

pub use alerts::{
    ALERT_CURSOR_KEY, ALERT_LEASE_KEY, Alert, BYPASS_CURSOR, Delivery, alerts_key, delivery_key,
};
pub use apikeys::{
    API_KEYS_KEY, ApiKey, ApiKeySnapshot, KeyStatus, NewApiKey, PreviousSecret, SECRET_PREFIX,
    secret_hash,
};
pub use audit::AUDIT_VERSION;
pub use audit_read::{AUDIT_COLUMNS, AuditCursor, AuditQuery, AuditReader, AuditRecord};
pub use batch::{BatchStats, OpBatches};
pub use budget::{BudgetProblem, resolve_caps};
pub use budget_cache::BudgetCache;
pub use conn::{LedgerConfig, pin_thread_connection};
pub use keys::{BUDGETS_KEY, BYPASS_EVENTS, MAX_NAME_LEN, OPS_EVENTS, RULES_KEY, validate_name};
pub use lease::{Lease, LeaseRequest, lease_room};
pub use ops_events::{OPS_CURSOR, OPS_EVENTS_KEPT, PriceGap};
pub use period::{DAY_RETENTION, MONTH_RETENTION, Period};
pub use poll::poll_ticks;
pub use rules::{RULE_SETS, StoredRules};
pub use signals::{BYPASS_EVENTS_KEPT, BypassEvent, LoopCounts};
pub use types::{
    Budget, BySource, CallMeta, Cap, CapScope, Denial, Hold, RateDenial, RateLimit, RecordOutcome,
    Reservation, ReserveOutcome, ReserveRequest, SessionSpend, SettleOutcome, Settlement, Source,
    TenantSpend, TokenCounts, UsageRecord,
};
pub use unmetered::{
    UnmeteredConn, UnmeteredEntry, UnmeteredOutcome, UnmeteredSummary, unmetered_key,
};

use batch::Batcher;
use conn::{Conn, timeout_error};
use keys::{validate_opt, validate_tenant};
use scripts::Reply;
use scripts::ScriptCall;

use crate::{Error, Nanos};

/// A handle on the ledger; cheap to clone, safe to share between tasks.
#[derive(Clone)]
pub struct Ledger {
    conn: Conn,
    cfg: Arc<LedgerConfig>,
    /// `llmw:tenants:<id>` entries this process has already written, so the extra SADD happens once
    /// per tenant and period per process.
    active_marked: Arc<Mutex<HashSet<String>>>,
    /// Tenant → the last UTC day (days since 1970) whose day and month sets it is known to be
    /// in: the check every reserve and settle makes before [`Ledger::active_marked`]'s.
    active_days: Arc<Mutex<std::collections::HashMap<String, i64>>>,
    /// This process's instance id, stored in every hold it creates (crash recovery finds its holds).
    instance: Option<Arc<str>>,
    /// The per-tenant group commit of reserves and settles (batch.rs).
    batch: Arc<Batcher>,
    /// The process's one copy of the budget list: the enforcer's caps and the scripts' alert
    /// thresholds (budget_cache.rs).
    budget_cache: Arc<budget_cache::Shared>,
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.conn {
            Conn::Single(_) => "single",
            Conn::Cluster(_) => "cluster",
        };
        f.debug_struct("Ledger")
            .field("conn", &kind)
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

fn ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

fn from_ms(v: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(v).single().unwrap_or_default()
}

fn duration_ms(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

impl Ledger {
    /// Connects with the default [`LedgerConfig`]: `redis://host:port[/db]` for one node,
    /// `redis+cluster://h1:p1,h2:p2` (or several comma-separated URLs) for a cluster.
    ///
    /// # Errors
    /// [`Error::Redis`] when the URL is invalid or Redis is unreachable within the timeouts.
    pub async fn connect(url: &str) -> Result<Ledger, Error> {
        Ledger::connect_with(url, LedgerConfig::default()).await
    }

    /// Connects with an explicit configuration and checks the connection.
    ///
    /// # Errors
    /// [`Error::Redis`] when the URL is invalid or Redis is unreachable within the timeouts.
    pub async fn connect_with(url: &str, cfg: LedgerConfig) -> Result<Ledger, Error> {
        let conn = Conn::open(url, &cfg, false).await?;
        let locals = Conn::open_thread_locals(url, &cfg).await?;
        Ok(Ledger::from_conn(conn, locals, cfg))
    }

    /// Like [`Ledger::connect_with`] but a single-node connection is opened on first use, so a
    /// process can start while Redis is down (cluster URLs still connect now).
    ///
    /// # Errors
    /// [`Error::Redis`] when the URL is invalid (or a cluster is unreachable).
    pub async fn connect_lazy(url: &str, cfg: LedgerConfig) -> Result<Ledger, Error> {
        let conn = Conn::open(url, &cfg, true).await?;
        let locals = Conn::open_thread_locals(url, &cfg).await?;
        Ok(Ledger::from_conn(conn, locals, cfg))
    }

    fn from_conn(conn: Conn, locals: Vec<Conn>, cfg: LedgerConfig) -> Ledger {
        let cfg = Arc::new(cfg);
        Ledger {
            batch: Arc::new(Batcher::new(conn.clone(), locals, Arc::clone(&cfg))),
            conn,
            cfg,
            active_marked: Arc::default(),
            active_days: Arc::default(),
            instance: None,
            budget_cache: Arc::default(),
        }
    }

    /// Tags every hold this handle creates with `instance` (the enforcer's instance id), so a
    /// restarted instance can find and resolve the holds its previous run left
    /// ([`Ledger::instance_holds`], [`Ledger::settle_abandoned`]).
    #[must_use]
    pub fn with_instance(mut self, instance: &str) -> Ledger {
        self.instance = Some(Arc::from(instance));
        self
    }

    /// The instance id given to [`Ledger::with_instance`].
    #[must_use]
    pub fn instance(&self) -> Option<&str> {
        self.instance.as_deref()
    }

    /// The configuration in use.
    #[must_use]
    pub fn config(&self) -> &LedgerConfig {
        &self.cfg
    }

    /// How many reserves and settles went to Redis in how many batched script calls (shared by
    /// every clone of this handle): the group commit at work.
    #[must_use]
    pub fn batch_stats(&self) -> BatchStats {
        self.batch.stats()
    }

    /// Runs `f` under the operation timeout.
    async fn timed<T>(
        &self,
        op: &'static str,
        f: impl Future<Output = Result<T, Error>>,
    ) -> Result<T, Error> {
        tokio::time::timeout(self.cfg.operation_timeout, f)
            .await
            .map_err(|_| timeout_error(op, self.cfg.operation_timeout))?
    }

    /// Checks that Redis answers.
    ///
    /// # Errors
    /// [`Error::Redis`] when it does not, within the timeouts.
    pub async fn ping(&self) -> Result<(), Error> {
        let mut c = self.conn.clone();
        self.timed("ping", async move {
            let _: String = redis::cmd("PING").query_async(&mut c).await?;
            Ok(())
        })
        .await
    }

    /// Opens the calling thread's connection (see [`pin_thread_connection`]; the shared one on a
    /// thread without its own) and loads the scripts a proxied call runs, so the first calls after
    /// a start pay neither the connect nor a NOSCRIPT round trip and a second load. Call it on each
    /// thread that carries calls, before they arrive. A failure costs nothing but the warm-up:
    /// connections open and scripts load on first use as before.
    ///
    /// # Errors
    /// [`Error::Redis`] when Redis does not answer within the timeouts.
    pub async fn warm_up(&self) -> Result<(), Error> {
        let mut c = self.batch.thread_conn();
        self.timed("warm-up", async move {
            for s in scripts::CALL_PATH {
                s.load_async(&mut c).await?;
            }
            Ok(())
        })
        .await
    }

    /// Whether this process already wrote the once-per-process `marker`.
    fn marked(&self, marker: &str) -> bool {
        self.active_marked
            .lock()
            .map(|s| s.contains(marker))
            .unwrap_or(false)
    }

    /// Remembers a once-per-process marker as written.
    fn mark(&self, marker: String) {
        if let Ok(mut s) = self.active_marked.lock() {
            if s.len() > 100_000 {
                s.clear();
            }
            s.insert(marker);
        }
    }

    /// Adds the tenant to `llmw:tenants:<day>` and `llmw:tenants:<month>` (their own slots, so not
    /// inside the scripts). Done before the script, so a crash in between leaves at worst a tenant
    /// listed with zero figures, never an active tenant unlisted.
    async fn mark_active(&self, tenant: &str, at: DateTime<Utc>) -> Result<(), Error> {
        // The UTC day picks both periods' sets: a tenant whose day was marked needs no key
        // built (four times per call otherwise, each formatting two keys).
        let day = at.timestamp().div_euclid(86_400);
        if self
            .active_days
            .lock()
            .is_ok_and(|m| m.get(tenant) == Some(&day))
        {
            return Ok(());
        }
        for period in Period::ALL {
            let key = keys::tenants(period, at);
            let marker = format!("{key}\n{tenant}");
            if self.marked(&marker) {
                continue;
            }
            let mut c = self.conn.clone();
            let _: () = redis::pipe()
                .sadd(&key, tenant)
                .ignore()
                .expire_at(&key, period.expire_at(at).timestamp())
                .ignore()
                .query_async(&mut c)
                .await?;
            self.mark(marker);
        }
        if let Ok(mut m) = self.active_days.lock() {
            if m.len() > 100_000 {
                m.clear();
            }
            m.insert(tenant.to_owned(), day);
        }
        Ok(())
    }

    /// Lists the tenant in `llmw:tenants:<day>` of the day its audit records go to (`now`), so an
    /// export finds every tenant-day stream from those sets; a no-op (cached) when the call's own
    /// period already marked it.
    async fn mark_audit_day(&self, tenant: &str, now: DateTime<Utc>) -> Result<(), Error> {
        if self.cfg.audit {
            self.mark_active(tenant, now).await?;
        }
        Ok(())
    }

    /// Drops a reservation without spend (the call failed before anything was billed). Releasing
    /// a hold that no longer exists is not an error.
    ///
    /// # Errors
    /// [`Error::Invalid`] for bad names; [`Error::Redis`] when Redis is unavailable.
    pub async fn release(&self, tenant: &str, reservation_id: &str) -> Result<(), Error> {
        self.release_hold(tenant, reservation_id).await.map(|_| ())
    }

    /// [`Ledger::release`], returning the amount that was held (`None` when the hold was already
    /// gone). When the hold had been abandoned and committed as an estimate (it expired, or its
    /// restarted owner gave it up), the release reverses that estimate once: nothing was billed.
    ///
    /// # Errors
    /// As [`Ledger::release`].
    pub async fn release_hold(
        &self,
        tenant: &str,
        reservation_id: &str,
    ) -> Result<Option<Nanos>, Error> {
        self.release_audited(tenant, reservation_id, true).await
    }

    /// lua/release.lua on one hold; `audited`: whether it writes its `release` record (a lease
    /// pool's spare hold given back unused is no call's, lease.rs).
    pub(crate) async fn release_audited(
        &self,
        tenant: &str,
        reservation_id: &str,
        audited: bool,
    ) -> Result<Option<Nanos>, Error> {
        let reply = self
            .hold_script(
                &scripts::RELEASE,
                "release",
                tenant,
                reservation_id,
                audited,
            )
            .await?;
        match reply.status() {
            "RELEASED" | "UNESTIMATED" => Ok(Some(Nanos(reply.int(1)?))),
            "UNKNOWN" => Ok(None),
            _ => Err(reply.unexpected()),
        }
    }

    /// Runs one of the scripts that end a single hold (release, abandon) with their shared keys
    /// and arguments; `audited`: whether it writes its audit record (a lease pool's spare hold
    /// released unused is no call's, lease.rs).
    pub(crate) async fn hold_script(
        &self,
        script: &'static redis::Script,
        name: &'static str,
        tenant: &str,
        reservation_id: &str,
        audited: bool,
    ) -> Result<Reply, Error> {
        validate_tenant(tenant)?;
        validate_name("reservation id", reservation_id)?;
        let mut inv = ScriptCall::new(script);
        inv.key(keys::holds(tenant))
            .key(keys::hold(tenant, reservation_id))
            .key(keys::done(tenant, reservation_id))
            .arg(keys::prefix(tenant))
            .arg(ms(Utc::now()))
            .arg(self.cfg.reclaim_batch)
            .arg(reservation_id);
        let now = Utc::now();
        if audited {
            let caps = self.alert_caps(tenant, None).await;
            audit::tail(&mut inv, &self.cfg, now, &caps);
        } else {
            audit::tail_off(&mut inv);
        }
        self.timed(name, async {
            self.mark_audit_day(tenant, now).await?;
            let mut c = self.conn.clone();
            let fields: Vec<String> = inv.invoke_async(&mut c).await?;
            Ok(Reply::new(name, fields))
        })
        .await
    }

    /// Commits spend the observer saw (no reservation). Idempotent per event id (within
    /// [`LedgerConfig::idempotency_ttl`]). Counts against the same tenant budgets as enforcer spend.
    ///
    /// # Errors
    /// [`Error::Invalid`] for bad names, a negative cost, or a cost or token count above
    /// [`MAX_CALL_COST`] / [`MAX_CALL_TOKENS`]; [`Error::Redis`] when Redis is unavailable.
    pub async fn record(&self, r: &UsageRecord) -> Result<RecordOutcome, Error> {
        validate_tenant(&r.tenant)?;
        validate_name("event_id", &r.event_id)?;
        validate_opt("feature", r.feature.as_deref())?;
        validate_opt("session", r.session.as_deref())?;
        validate_opt("model", r.model.as_deref())?;
        check_usage(r.cost, &r.tokens)?;
        let at = r.at;
        let mut inv = ScriptCall::new(&scripts::RECORD);
        inv.key(keys::holds(&r.tenant))
            .key(keys::event(&r.tenant, &r.event_id))
            .arg(keys::prefix(&r.tenant))
            .arg(ms(Utc::now()))
            .arg(self.cfg.reclaim_batch)
            .arg(duration_ms(self.cfg.idempotency_ttl));
        period_args(&mut inv, at, &self.cfg);
        usage_args(
            &mut inv,
            r.cost,
            r.tokens,
            r.model.as_deref(),
            r.feature.as_deref(),
            r.session.as_deref(),
        );
        inv.arg(if r.bypass { "1" } else { "0" })
            .arg(if r.estimated { "1" } else { "0" });
        audit::record_fields(r, inv.args_mut());
        let now = Utc::now();
        let caps = self.alert_caps(&r.tenant, r.feature.as_deref()).await;
        audit::tail(&mut inv, &self.cfg, now, &caps);
        let reply = self
            .timed("record", async {
                self.mark_active(&r.tenant, at).await?;
                self.mark_audit_day(&r.tenant, now).await?;
                let mut c = self.conn.clone();
                let fields: Vec<String> = inv.invoke_async(&mut c).await?;
                Ok(Reply::new("record", fields))
            })
            .await?;
        match reply.status() {
            "RECORDED" => Ok(RecordOutcome::Recorded),
            "DUPLICATE" => Ok(RecordOutcome::Duplicate),
            _ => Err(reply.unexpected()),
        }
    }

    /// Reclaims up to [`LedgerConfig::reclaim_batch`] expired holds of `tenant` now (every script
    /// does this too; a periodic sweep over [`Ledger::active_tenants`] keeps idle tenants exact).
    /// Each is committed at its reserved amount as estimated spend, once per request id: its owner
    /// never settled or released it, so the call may have been billed.
    ///
    /// # Errors
    /// [`Error::Invalid`] for a bad tenant; [`Error::Redis`] when Redis is unavailable.
    pub async fn reclaim_expired(&self, tenant: &str) -> Result<u64, Error> {
        validate_tenant(tenant)?;
        let mut inv = ScriptCall::new(&scripts::RECLAIM);
        let now = Utc::now();
        inv.key(keys::holds(tenant))
            .arg(keys::prefix(tenant))
            .arg(ms(now))
            .arg(self.cfg.reclaim_batch);
        let caps = self.alert_caps(tenant, None).await;
        audit::tail(&mut inv, &self.cfg, now, &caps);
        self.timed("reclaim", async {
            self.mark_audit_day(tenant, now).await?;
            let mut c = self.conn.clone();
            let n: u64 = inv.invoke_async(&mut c).await?;
            Ok(n)
        })
        .await
    }

    /// The tenant's figures for the period containing `now`, after reclaiming its expired holds
    /// (so `held` counts only calls really in flight).
    ///
    /// # Errors
    /// [`Error::Invalid`] for a bad tenant; [`Error::Redis`] when Redis is unavailable.
    pub async fn tenant_spend(
        &self,
        tenant: &str,
        period: Period,
        now: DateTime<Utc>,
    ) -> Result<TenantSpend, Error> {
        self.reclaim_expired(tenant).await?;
        let key = keys::spend(tenant, period, now);
        let h: HashMap<String, String> = self
            .timed("tenant_spend", async {
                let mut c = self.conn.clone();
                Ok(c.hgetall(&key).await?)
            })
            .await?;
        Ok(spend::from_hash(tenant, &period.id(now), &h))
    }

    /// A session's cumulative figures (zero when the session is unknown or expired).
    ///
    /// # Errors
    /// [`Error::Invalid`] for bad names; [`Error::Redis`] when Redis is unavailable.
    pub async fn session_spend(&self, tenant: &str, session: &str) -> Result<SessionSpend, Error> {
        validate_tenant(tenant)?;
        crate::names::check(crate::names::NameKind::Session, session)?;
        let key = keys::session(tenant, session);
        let h: HashMap<String, i64> = self
            .timed("session_spend", async {
                let mut c = self.conn.clone();
                Ok(c.hgetall(&key).await?)
            })
            .await?;
        let get = |f: &str| h.get(f).copied().unwrap_or(0);
        Ok(SessionSpend {
            spend: Nanos(get("spend")),
            held: Nanos(get("held").max(0)),
            requests: u64::try_from(get("requests").max(0)).unwrap_or(0),
        })
    }

    /// Tenants with any activity (reserve, settle or record) in the period containing `now`,
    /// sorted; includes tenants only the observer has seen.
    ///
    /// # Errors
    /// [`Error::Redis`] when Redis is unavailable.
    pub async fn active_tenants(
        &self,
        period: Period,
        now: DateTime<Utc>,
    ) -> Result<Vec<String>, Error> {
        let key = keys::tenants(period, now);
        let mut v: Vec<String> = self
            .timed("active_tenants", async {
                let mut c = self.conn.clone();
                Ok(c.smembers(&key).await?)
            })
            .await?;
        v.sort();
        Ok(v)
    }
}

/// The largest cost one call may commit: 2^56 nano-USD (about $72M), so a period's spend counter
/// is at least 127 such calls from 64-bit overflow.
pub const MAX_CALL_COST: Nanos = Nanos(1 << 56);
/// The largest token count of one kind one call may commit: 2^40 (about 10^12; real calls stay
/// below 10^7).
pub const MAX_CALL_TOKENS: u64 = 1 << 40;

/// A call's cost and tokens, checked before any script runs. The scripts add them to period
/// counters with HINCRBY, which fails on 64-bit overflow, and a script that fails after its first
/// write leaves that write in place; these bounds keep every counter many calls away from
/// overflow (127 at the largest cost, millions at the largest token count), so nonsense usage (a
/// corrupt or forged usage record) is refused whole, with an error naming the field, instead of
/// being half-committed.
fn check_usage(cost: Nanos, tokens: &TokenCounts) -> Result<(), Error> {
    if cost.0 < 0 {
        return Err(Error::Invalid {
            what: "cost",
            detail: format!("{cost} is negative"),
        });
    }
    if cost > MAX_CALL_COST {
        return Err(Error::Invalid {
            what: "cost",
            detail: format!("{cost} exceeds the per-call limit of {MAX_CALL_COST}"),
        });
    }
    for (what, n) in [
        ("input_tokens", tokens.input),
        ("output_tokens", tokens.output),
        ("cache_read_tokens", tokens.cache_read),
        ("cache_write_tokens", tokens.cache_write),
    ] {
        if n > MAX_CALL_TOKENS {
            return Err(Error::Invalid {
                what,
                detail: format!("{n} exceeds the per-call limit of {MAX_CALL_TOKENS}"),
            });
        }
    }
    Ok(())
}

/// Day id, month id, their expire-at (unix s), session ttl (s): the `commit_all` layout in common.lua.
fn period_args(inv: &mut ScriptCall, at: DateTime<Utc>, cfg: &LedgerConfig) {
    inv.arg(Period::Day.id(at))
        .arg(Period::Month.id(at))
        .arg(Period::Day.expire_at(at).timestamp())
        .arg(Period::Month.expire_at(at).timestamp())
        .arg(cfg.session_ttl.as_secs().max(1));
}

/// cost, input, output, cache_read, cache_write, model, feature, session: the `read_usage` layout
/// in common.lua (bypass and estimated follow, added by the caller).
fn usage_args(
    inv: &mut ScriptCall,
    cost: Nanos,
    t: TokenCounts,
    model: Option<&str>,
    feature: Option<&str>,
    session: Option<&str>,
) {
    inv.arg(cost.0)
        .arg(t.input)
        .arg(t.output)
        .arg(t.cache_read)
        .arg(t.cache_write)
        .arg(model.unwrap_or(""))
        .arg(feature.unwrap_or(""))
        .arg(session.unwrap_or(""));
}
