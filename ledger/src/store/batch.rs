//! Group commit: concurrent reserves (and settles) of one tenant that queue up while an earlier
//! script of that tenant is in flight go to Redis together, as one call of lua/reserve_batch.lua
//! (lua/settle_batch.lua) that processes them in order and replies once per item.
//!
//! Nothing waits at low load: the first item of an idle tenant is sent at once, as a batch of one
//! (which runs the single-item script: cheaper for Redis than the batch script's set-up), by its
//! caller on its own task; worker tasks start only for items that arrive while the tenant has
//! something in flight. The one exception is opt-in: with [`LedgerConfig::settle_window`], the first
//! settle of an idle tenant starts a worker that waits the window, and the settles arriving
//! meanwhile join its batch (see [`Batcher::drain`]). Nothing ends the wait early: a settle batch
//! sent with a reserve would run before it in Redis and delay the call (docs/benchmarks.md).
//! With a window a tenant's settles also leave at most one batch per window under load.
//! Under load each tenant has at most [`MAX_IN_FLIGHT`] settle batches (one with a window) and
//! [`MAX_RESERVES_IN_FLIGHT`] reserve batches in flight, and the
//! items arriving meanwhile queue and leave together, [`MAX_BATCH`] at most. A Redis script runs
//! ~1 µs per `redis.call`; a batch shares the reads, the counter writes and the reclaim between its
//! items, so the Redis thread does a fraction of the work per reserve or settle.
//!
//! Every waiter gets an answer: its reply, or the batch's error (a clone of the Redis error, or a
//! timeout after [`LedgerConfig::operation_timeout`]). A caller that gives up (its future is
//! dropped, or times out) leaves its item behind; an item whose caller is gone is not sent.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use chrono::{DateTime, Utc};
use redis::RedisError;
use tokio::sync::oneshot;

use super::conn::{Conn, thread_conn, timeout_error};
use super::scripts::{self, Args, ScriptCall};
use super::{LedgerConfig, Period, duration_ms, keys};
use crate::Error;

/// Items per script call at most: bounds a script's run time, and keeps the sums the batch scripts
/// compute in Lua doubles exact (64 items below [`MAX_BATCHED_VALUE`] each stay below 2^52).
pub(crate) const MAX_BATCH: usize = 64;

/// Settle batches of one tenant in flight at once: two keep the pipeline to Redis full (one runs
/// while the next is on the wire). The ledger benchmark measured 1, 2 and 4 within its noise.
/// Settles run after the response, so waiting for a batch costs the caller nothing.
pub(crate) const MAX_IN_FLIGHT: usize = 2;

/// Reserve batches of one tenant in flight at once. A reserve delays its call, and a reserve that
/// queues behind an in-flight batch waits for that batch's round trip, which at moderate load is
/// longer than Redis would take to run it pipelined (quick streaming benches, noisy: added time to
/// first token p99 2.0–2.9 ms with 2, 1.6–2.0 ms with 16 or without group commit). So reserves
/// batch only when this many are already in flight, i.e. when Redis itself is the queue.
pub(crate) const MAX_RESERVES_IN_FLIGHT: usize = 16;

/// An amount or token count at or above this goes through the single-item script, whose
/// arithmetic is all HINCRBY (exact in 64 bits); 2^46 nano-USD is about $70,000.
pub(crate) const MAX_BATCHED_VALUE: i64 = 1 << 46;

/// The two batched operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    /// lua/reserve_batch.lua.
    Reserve,
    /// lua/settle_batch.lua.
    Settle,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Reserve => "reserve",
            Op::Settle => "settle",
        }
    }

    fn index(self) -> usize {
        match self {
            Op::Reserve => 0,
            Op::Settle => 1,
        }
    }
}

/// One reserve or settle, as its part of the batch script's arguments (see [`single`] for the
/// single-item script's).
pub(crate) struct Item {
    /// The caller's "now" (unix ms): the batch reclaims expired holds as of its latest item's.
    pub(crate) now_ms: i64,
    /// The item's ARGV segment; the first is the request id (its hold and done keys follow from it).
    /// Reserve: id, now ms, amount, ttl ms, day, month, day expire-at, month expire-at, feature,
    /// session, model, instance, cap count, caps. Settle: id, day, month, day expire-at,
    /// month expire-at, cost, input, output, cache read, cache write, model, feature, session,
    /// estimated. Both end with the audit record's value count and its field, value pairs.
    pub(crate) args: Args,
    /// The budgets the script checks alert thresholds against (kind, period, feature, limit each).
    /// Shared: every call of a tenant (and feature) gets the same list while the budgets stay.
    pub(crate) alerts: Arc<[String]>,
}

/// The single-item script call (lua/reserve.lua or lua/settle.lua) for `item`: used for a batch of
/// one (cheaper for Redis than the batch script's set-up), and when group commit is off or a value
/// is too large to sum exactly in Lua.
pub(crate) fn single(op: Op, tenant: &str, item: &Item, cfg: &LedgerConfig) -> ScriptCall {
    let a = |i: usize| item.args.get(i);
    let id = item.args.str(0);
    let session_ttl = cfg.session_ttl.as_secs().max(1);
    let done_ttl = duration_ms(cfg.idempotency_ttl);
    let script: &'static redis::Script = match op {
        Op::Reserve => &scripts::RESERVE,
        Op::Settle => &scripts::SETTLE,
    };
    let mut inv = ScriptCall::new(script);
    inv.key_fmt(keys::holds_of(tenant))
        .key_fmt(keys::hold_of(tenant, id))
        .key_fmt(keys::done_of(tenant, id))
        .arg_fmt(keys::prefix_of(tenant))
        .arg(item.now_ms)
        .arg(cfg.reclaim_batch)
        .arg(id);
    match op {
        Op::Reserve => {
            // amount, ttl, day, month, day and month expire-at; then the settings in between.
            for i in 2..8 {
                inv.arg(a(i));
            }
            inv.arg(session_ttl)
                .arg(a(8))
                .arg(a(9))
                .arg(duration_ms(cfg.hold_grace))
                .arg(a(10))
                .arg(done_ttl)
                .arg(a(11));
            for cap in item.args.iter().skip(12) {
                inv.arg(cap);
            }
        }
        Op::Settle => {
            inv.arg(done_ttl);
            for i in 1..5 {
                inv.arg(a(i));
            }
            inv.arg(session_ttl);
            for i in 5..13 {
                inv.arg(a(i));
            }
            inv.arg("0").arg(a(13));
            for v in item.args.iter().skip(14) {
                inv.arg(v);
            }
        }
    }
    super::audit::tail(&mut inv, cfg, Utc::now(), &item.alerts);
    inv
}

/// The batch script call (lua/reserve_batch.lua or lua/settle_batch.lua) for `items`, in order,
/// without the audit and alert tail the caller adds (`audit::tail`, or `audit::tail_off` for
/// spare holds, which no call's record names).
pub(crate) fn batch_call<'a>(
    op: Op,
    tenant: &str,
    items: impl Iterator<Item = &'a Item> + Clone,
    cfg: &LedgerConfig,
) -> ScriptCall {
    let session_ttl = cfg.session_ttl.as_secs().max(1);
    let (script, header): (&redis::Script, &[u64]) = match op {
        Op::Reserve => (
            &scripts::RESERVE_BATCH,
            &[
                session_ttl,
                duration_ms(cfg.hold_grace),
                duration_ms(cfg.idempotency_ttl),
            ],
        ),
        Op::Settle => (
            &scripts::SETTLE_BATCH,
            &[duration_ms(cfg.idempotency_ttl), session_ttl],
        ),
    };
    let mut inv = ScriptCall::new(script);
    inv.key_fmt(keys::holds_of(tenant));
    let mut n = 0usize;
    let mut now = 0;
    for item in items.clone() {
        let id = item.args.str(0);
        inv.key_fmt(keys::hold_of(tenant, id))
            .key_fmt(keys::done_of(tenant, id));
        n += 1;
        now = now.max(item.now_ms);
    }
    inv.arg_fmt(keys::prefix_of(tenant))
        .arg(now)
        .arg(cfg.reclaim_batch);
    for h in header {
        inv.arg(*h);
    }
    inv.arg(n);
    for item in items {
        inv.args(&item.args);
    }
    inv
}

/// How many batches and items went through the group commit, per operation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OpBatches {
    /// Script calls.
    pub batches: u64,
    /// Items in them (reserves or settles).
    pub items: u64,
    /// The largest batch seen.
    pub largest: u64,
}

/// The group commit's counters since the ledger was connected (see [`super::Ledger::batch_stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchStats {
    /// Reserves.
    pub reserve: OpBatches,
    /// Settles.
    pub settle: OpBatches,
}

#[derive(Default)]
struct Counters {
    batches: AtomicU64,
    items: AtomicU64,
    largest: AtomicU64,
}

struct Waiter {
    item: Item,
    tx: oneshot::Sender<Result<Vec<String>, Error>>,
}

/// One tenant's queue for one operation.
#[derive(Default)]
struct Lane {
    queue: VecDeque<Waiter>,
    in_flight: usize,
    /// A worker is waiting out the settle window: arrivals queue for it.
    window_open: bool,
}

/// The per-tenant queues, shared by every clone of a [`super::Ledger`].
pub(crate) struct Batcher {
    conn: Conn,
    /// Per-thread connections (`LedgerConfig::thread_connections`), used by the pinned threads.
    locals: Vec<Conn>,
    cfg: Arc<LedgerConfig>,
    /// Tenant → its reserve and settle lanes; a tenant with nothing queued or in flight is removed.
    lanes: Mutex<HashMap<String, [Lane; 2]>>,
    counters: [Counters; 2],
}

impl Batcher {
    pub(crate) fn new(conn: Conn, locals: Vec<Conn>, cfg: Arc<LedgerConfig>) -> Batcher {
        Batcher {
            conn,
            locals,
            cfg,
            lanes: Mutex::default(),
            counters: Default::default(),
        }
    }

    /// The connection of this thread (its pinned one, else the shared one).
    pub(crate) fn thread_conn(&self) -> Conn {
        thread_conn(&self.conn, &self.locals).clone()
    }

    fn lanes(&self) -> MutexGuard<'_, HashMap<String, [Lane; 2]>> {
        self.lanes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sends `item` with the tenant's next batch and waits for its reply fields. The caller bounds
    /// the wait (dropping this future is fine: the item is then skipped or its reply discarded).
    pub(crate) async fn submit(
        self: &Arc<Self>,
        op: Op,
        tenant: &str,
        item: Item,
    ) -> Result<Vec<String>, Error> {
        let window = self.window(op);
        let limit = match op {
            Op::Reserve => MAX_RESERVES_IN_FLIGHT,
            // With a window one worker paces the lane (see `drain`).
            Op::Settle if !window.is_zero() => 1,
            Op::Settle => MAX_IN_FLIGHT,
        };
        // `Ok`: queued (whether to start a worker, and the answer's receiver); `Err`: the lane was
        // idle and its slot is this caller's, with the item back.
        let queued = {
            let mut lanes = self.lanes();
            let pair = match lanes.get_mut(tenant) {
                Some(l) => l,
                None => lanes.entry(tenant.to_owned()).or_default(),
            };
            let lane = &mut pair[op.index()];
            if lane.in_flight == 0 && lane.queue.is_empty() && window.is_zero() {
                lane.in_flight = 1;
                Err(item)
            } else {
                // While a window is open its worker will take this item too: no other starts.
                let start = !lane.window_open && lane.in_flight < limit;
                if start {
                    lane.in_flight += 1;
                    // The first worker of an idle lane opens the window.
                    if lane.in_flight == 1 && !window.is_zero() {
                        lane.window_open = true;
                    }
                }
                let (tx, rx) = oneshot::channel();
                lane.queue.push_back(Waiter { item, tx });
                Ok((start, rx))
            }
        };
        let (start, rx) = match queued {
            Ok(q) => q,
            Err(item) => {
                // The lane was idle: this caller sends its item itself, as a batch of one, on
                // its own task (a worker task costs two task wake-ups per operation, measured in
                // docs/benchmarks.md). Items arriving meanwhile queue and start workers as before;
                // when this slot is given back, also when this future is dropped half way,
                // `Slot::drop` starts a worker for whatever still waits.
                let _slot = Slot {
                    batcher: Arc::clone(self),
                    op,
                    tenant: tenant.to_owned(),
                    held: true,
                };
                self.count(op, 1);
                return self.run_single(op, tenant, &item).await;
            }
        };
        if start {
            tokio::spawn(Arc::clone(self).drain(op, tenant.to_owned()));
        }
        rx.await.unwrap_or_else(|_| Err(ended_error(op)))
    }

    /// Counters for [`super::Ledger::batch_stats`].
    pub(crate) fn stats(&self) -> BatchStats {
        let get = |op: Op| {
            let c = &self.counters[op.index()];
            OpBatches {
                batches: c.batches.load(Ordering::Relaxed),
                items: c.items.load(Ordering::Relaxed),
                largest: c.largest.load(Ordering::Relaxed),
            }
        };
        BatchStats {
            reserve: get(Op::Reserve),
            settle: get(Op::Settle),
        }
    }

    /// How long the first item of an idle lane waits for company ([`LedgerConfig::settle_window`]
    /// for settles; reserves never wait).
    fn window(&self, op: Op) -> std::time::Duration {
        match op {
            Op::Reserve => std::time::Duration::ZERO,
            Op::Settle => self.cfg.settle_window,
        }
    }

    /// A worker: one of the lane's in-flight slots, sending batches until the queue is empty.
    /// The worker that opened a window first waits it out (unless a whole batch is queued already),
    /// so the items arriving meanwhile leave with the first. With a window the lane has this one
    /// worker, and it sends at most one batch per window: when items are queued after a batch, it
    /// waits until a window has passed since that batch left (unless a whole batch is queued), so
    /// under load the settles of a window leave together instead of in batches of what arrived
    /// during one round trip. Without a window, items arriving while a batch is in flight start a
    /// second worker.
    async fn drain(self: Arc<Self>, op: Op, tenant: String) {
        let mut slot = Slot {
            batcher: Arc::clone(&self),
            op,
            tenant,
            held: true,
        };
        if let Some(window) = self.opened_window(op, &slot.tenant) {
            tokio::time::sleep(window).await;
        }
        loop {
            let batch = self.take(op, &slot.tenant);
            if batch.is_empty() {
                // `take` gave the slot back under the lock.
                slot.held = false;
                return;
            }
            let sent = tokio::time::Instant::now();
            self.run(op, &slot.tenant, batch).await;
            let window = self.window(op);
            if !window.is_zero() && self.waiting(op, &slot.tenant) {
                tokio::time::sleep_until(sent + window).await;
            }
        }
    }

    /// Whether items wait in the lane, fewer than a whole batch: the paced worker waits out its
    /// window for more (none: `take` ends the worker; a whole batch: it leaves at once).
    fn waiting(&self, op: Op, tenant: &str) -> bool {
        let lanes = self.lanes();
        lanes
            .get(tenant)
            .is_some_and(|pair| (1..MAX_BATCH).contains(&pair[op.index()].queue.len()))
    }

    /// The wait of a worker that opened its lane's window (`None`: no window is open, or a whole
    /// batch is already queued).
    fn opened_window(&self, op: Op, tenant: &str) -> Option<std::time::Duration> {
        let lanes = self.lanes();
        let lane = &lanes.get(tenant)?[op.index()];
        (lane.window_open && lane.queue.len() < MAX_BATCH).then(|| self.window(op))
    }

    /// The next batch of the lane (callers that gave up are dropped); when there is none, frees
    /// the worker's slot in the same critical section, so an item queued meanwhile starts a worker.
    fn take(&self, op: Op, tenant: &str) -> Vec<Waiter> {
        let mut lanes = self.lanes();
        let Some(pair) = lanes.get_mut(tenant) else {
            return Vec::new();
        };
        let lane = &mut pair[op.index()];
        lane.window_open = false;
        let mut batch = Vec::new();
        while batch.len() < MAX_BATCH {
            let Some(w) = lane.queue.pop_front() else {
                break;
            };
            if !w.tx.is_closed() {
                batch.push(w);
            }
        }
        if batch.is_empty() {
            lane.in_flight = lane.in_flight.saturating_sub(1);
            if pair.iter().all(|l| l.in_flight == 0 && l.queue.is_empty()) {
                lanes.remove(tenant);
            }
        }
        batch
    }

    /// Frees a slot whose worker ended without emptying the queue (cancelled at runtime shutdown,
    /// or a panic), starting a new worker if items are waiting.
    fn release(self: &Arc<Self>, op: Op, tenant: &str) {
        let restart = {
            let mut lanes = self.lanes();
            let Some(pair) = lanes.get_mut(tenant) else {
                return;
            };
            let lane = &mut pair[op.index()];
            lane.in_flight = lane.in_flight.saturating_sub(1);
            lane.window_open = false;
            let restart = !lane.queue.is_empty() && tokio::runtime::Handle::try_current().is_ok();
            if restart {
                lane.in_flight += 1;
            } else if pair.iter().all(|l| l.in_flight == 0 && l.queue.is_empty()) {
                lanes.remove(tenant);
            }
            restart
        };
        if restart {
            tokio::spawn(Arc::clone(self).drain(op, tenant.to_owned()));
        }
    }

    /// Sends one batch and hands each waiter its reply, or the batch's error.
    async fn run(&self, op: Op, tenant: &str, mut batch: Vec<Waiter>) {
        self.count(op, batch.len());
        let cfg = &self.cfg;
        let mut conn = self.thread_conn();
        if batch.len() == 1
            && let Some(w) = batch.pop()
        {
            let _ = w.tx.send(self.run_single(op, tenant, &w.item).await);
            return;
        }
        let mut inv = batch_call(op, tenant, batch.iter().map(|w| &w.item), cfg);
        super::audit::tail(&mut inv, cfg, Utc::now(), &merged_alerts(&batch));
        let res = tokio::time::timeout(
            cfg.operation_timeout,
            inv.invoke_async::<Vec<Vec<String>>>(&mut conn),
        )
        .await;
        match res {
            Ok(Ok(replies)) if replies.len() == batch.len() => {
                for (w, r) in batch.into_iter().zip(replies) {
                    let _ = w.tx.send(Ok(r));
                }
            }
            Ok(Ok(replies)) => {
                let detail = format!("{} replies for {} items", replies.len(), batch.len());
                fail(batch, || Error::ScriptReply {
                    script: op.name(),
                    detail: detail.clone(),
                });
            }
            Ok(Err(e)) => fail(batch, || Error::Redis(e.clone())),
            Err(_) => fail(batch, || timeout_error(op.name(), cfg.operation_timeout)),
        }
    }

    /// Sends one item with the single-item script and returns its reply fields.
    async fn run_single(&self, op: Op, tenant: &str, item: &Item) -> Result<Vec<String>, Error> {
        let cfg = &self.cfg;
        let mut conn = self.thread_conn();
        let inv = single(op, tenant, item, cfg);
        match tokio::time::timeout(
            cfg.operation_timeout,
            inv.invoke_async::<Vec<String>>(&mut conn),
        )
        .await
        {
            Ok(r) => r.map_err(Error::Redis),
            Err(_) => Err(timeout_error(op.name(), cfg.operation_timeout)),
        }
    }

    fn count(&self, op: Op, n: usize) {
        let c = &self.counters[op.index()];
        let n = u64::try_from(n).unwrap_or(u64::MAX);
        c.batches.fetch_add(1, Ordering::Relaxed);
        c.items.fetch_add(n, Ordering::Relaxed);
        c.largest.fetch_max(n, Ordering::Relaxed);
    }
}

/// The alert arguments of a batch: its items' lists without duplicates (usually one shared list,
/// passed as is).
fn merged_alerts(batch: &[Waiter]) -> std::borrow::Cow<'_, [String]> {
    let Some(first) = batch.first().map(|w| &w.item.alerts) else {
        return std::borrow::Cow::Borrowed(&[]);
    };
    if batch.iter().all(|w| Arc::ptr_eq(&w.item.alerts, first)) {
        return std::borrow::Cow::Borrowed(first);
    }
    let mut alerts: Vec<String> = Vec::new();
    for w in batch {
        for c in w.item.alerts.chunks(4) {
            if !alerts.chunks(4).any(|a| a == c) {
                alerts.extend_from_slice(c);
            }
        }
    }
    std::borrow::Cow::Owned(alerts)
}

/// Gives every waiter of a failed batch its own copy of the error.
fn fail(batch: Vec<Waiter>, err: impl Fn() -> Error) {
    for w in batch {
        let _ = w.tx.send(Err(err()));
    }
}

/// A waiter whose worker ended without answering (the runtime is shutting down): Redis may or may
/// not have run the item, as with a timeout.
fn ended_error(op: Op) -> Error {
    Error::Redis(RedisError::from(std::io::Error::new(
        std::io::ErrorKind::Interrupted,
        format!("ledger {} batch ended without a reply", op.name()),
    )))
}

/// An in-flight slot (a worker's, or a caller's sending its own item); given back on drop unless
/// `take` already did, which starts a worker for items that queued meanwhile.
struct Slot {
    batcher: Arc<Batcher>,
    op: Op,
    tenant: String,
    held: bool,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.held {
            self.batcher.release(self.op, &self.tenant);
        }
    }
}

/// Whether the period hashes of a call at `at` are still kept (their EXPIREAT is comfortably in
/// the future). A batch defers its EXPIREATs to its end, which is only equivalent to the single
/// scripts while an EXPIREAT cannot delete the hash; a call older than that takes the single script.
pub(crate) fn live_period(at: DateTime<Utc>) -> bool {
    // The month hash outlives the day hash (400 vs 40 days after the period), so the day decides.
    Period::Day.expire_at(at) > Utc::now() + chrono::Duration::hours(1)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use llmwarden_tests::redis::RedisServer;

    use super::*;

    fn item(id: &str) -> Item {
        Item {
            now_ms: Utc::now().timestamp_millis(),
            args: {
                let mut a = Args::default();
                a.push(id);
                a
            },
            alerts: Arc::from(Vec::new()),
        }
    }

    fn lane_state(b: &Batcher, tenant: &str, op: Op) -> Option<(usize, usize)> {
        b.lanes()
            .get(tenant)
            .map(|l| (l[op.index()].in_flight, l[op.index()].queue.len()))
    }

    /// A caller that finds its tenant's lane idle sends its own item on its own task, holding
    /// the lane's slot meanwhile; items arriving then queue behind it. When it gives up (its
    /// task is aborted while Redis is frozen) the slot comes back and a worker takes the queue;
    /// once that is done the lane is idle again (removed), so the next caller sends its own item
    /// again. A slot kept would make every later item of the tenant queue, and with both settle
    /// slots kept, wait for ever.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_caller_sending_its_own_item_gives_its_slot_back_when_it_gives_up() {
        let server = RedisServer::start();
        let cfg = Arc::new(LedgerConfig {
            operation_timeout: Duration::from_secs(30),
            ..LedgerConfig::default()
        });
        let conn = Conn::open(&server.url(), &cfg, false)
            .await
            .expect("connect");
        let b = Arc::new(Batcher::new(conn, Vec::new(), cfg));
        // The single-item settle of an id with no hold: commits nothing (its arguments are
        // empty) but answers, whatever the reply; only the lane's bookkeeping is looked at.
        let _ = b.submit(Op::Settle, "acme", item("warm")).await;
        assert_eq!(
            lane_state(&b, "acme", Op::Settle),
            None,
            "idle after a call"
        );

        server.pause();
        let own = {
            let b = Arc::clone(&b);
            tokio::spawn(async move { b.submit(Op::Settle, "acme", item("own")).await })
        };
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(
            lane_state(&b, "acme", Op::Settle),
            Some((1, 0)),
            "the caller holds the slot itself, no worker"
        );
        let queued = {
            let b = Arc::clone(&b);
            tokio::spawn(async move { b.submit(Op::Settle, "acme", item("queued")).await })
        };
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(
            lane_state(&b, "acme", Op::Settle).map(|s| s.0),
            Some(2),
            "the second item started a worker"
        );
        own.abort();
        assert!(own.await.expect_err("aborted").is_cancelled());
        server.resume();
        tokio::time::timeout(Duration::from_secs(5), queued)
            .await
            .expect("the queued item is answered")
            .expect("task")
            .ok();
        // The worker frees its slot after answering.
        for _ in 0..100 {
            if lane_state(&b, "acme", Op::Settle).is_none() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            lane_state(&b, "acme", Op::Settle),
            None,
            "the lane is idle again: no slot kept by the caller that gave up"
        );
    }
}
