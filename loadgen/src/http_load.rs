//! Request/response load: open-loop at a fixed rate (latency from the scheduled send time, so a slow
//! server cannot hide its queueing: no coordinated omission) or closed-loop at a fixed concurrency.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use crate::latency::{Latencies, Summary};
use crate::target::{HttpClient, Target, send_full};

/// How requests are issued.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Open loop: a request is due every 1/rate seconds whatever the server does.
    Rate(f64),
    /// Closed loop: this many workers, each sending its next request when the last one finished.
    Concurrency(usize),
}

/// One load run.
#[derive(Debug, Clone)]
pub struct HttpRun {
    /// What to send.
    pub target: Target,
    /// How to send it.
    pub mode: Mode,
    /// Measured time (after the warm-up).
    pub duration: Duration,
    /// Time before the measurement starts (connections open, caches warm); not recorded.
    pub warmup: Duration,
    /// Open loop: requests in flight at most; later ones wait for a slot (their wait counts as latency).
    pub max_in_flight: usize,
    /// A request taking longer counts as a `timeout` error.
    pub timeout: Duration,
}

/// What one run measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HttpReport {
    /// How requests were issued.
    pub mode: Mode,
    /// Measured seconds.
    pub duration_s: f64,
    /// Requests sent in the measured window.
    pub sent: u64,
    /// Requests sent in the whole run, warm-up included (for CPU per request).
    pub sent_total: u64,
    /// 2xx responses among them.
    pub ok: u64,
    /// Failures by label (`status_502`, `timeout`, `connect`, ...).
    pub errors: BTreeMap<String, u64>,
    /// Successful responses completed per second of the measured window.
    pub achieved_rps: f64,
    /// Latency of the successful requests (open loop: from the scheduled send time).
    pub latency_us: Summary,
    /// Open loop: how late the pacer issued requests, p99 in µs (scheduler lag of the load generator).
    pub pacer_lag_p99_us: u64,
}

#[derive(Default)]
struct Tally {
    lat: Latencies,
    sent: u64,
    sent_total: u64,
    ok: u64,
    completed_in_window: u64,
    errors: BTreeMap<String, u64>,
}

impl Tally {
    fn add(&mut self, res: &Result<u16, String>, latency: Duration, done_in_window: bool) {
        self.sent += 1;
        match res {
            Ok(s) if (200..300).contains(s) => {
                self.ok += 1;
                self.lat.record(latency);
                if done_in_window {
                    self.completed_in_window += 1;
                }
            }
            Ok(s) => *self.errors.entry(format!("status_{s}")).or_default() += 1,
            Err(e) => *self.errors.entry(e.clone()).or_default() += 1,
        }
    }
}

/// Runs `run` on the current tokio runtime and reports it.
pub async fn run(client: &HttpClient, run: &HttpRun) -> HttpReport {
    let tally = Arc::new(Mutex::new(Tally::default()));
    let start = Instant::now();
    let measure_from = start + run.warmup;
    let end = measure_from + run.duration;
    let mut lag = Latencies::new();
    match run.mode {
        Mode::Rate(rate) => {
            lag = open_loop(client, run, rate, start, measure_from, end, &tally).await;
        }
        Mode::Concurrency(n) => closed_loop(client, run, n, measure_from, end, &tally).await,
    }
    let t = tally.lock().expect("tally lock");
    let secs = run.duration.as_secs_f64();
    let achieved = match run.mode {
        Mode::Rate(_) => t.ok as f64 / secs,
        Mode::Concurrency(_) => t.completed_in_window as f64 / secs,
    };
    HttpReport {
        mode: run.mode,
        duration_s: secs,
        sent: t.sent,
        sent_total: t.sent_total,
        ok: t.ok,
        errors: t.errors.clone(),
        achieved_rps: achieved,
        latency_us: t.lat.summary(),
        pacer_lag_p99_us: lag.summary().p99,
    }
}

async fn open_loop(
    client: &HttpClient,
    run: &HttpRun,
    rate: f64,
    start: Instant,
    measure_from: Instant,
    end: Instant,
    tally: &Arc<Mutex<Tally>>,
) -> Latencies {
    let period = Duration::from_secs_f64(1.0 / rate.max(0.001));
    let slots = Arc::new(Semaphore::new(run.max_in_flight.max(1)));
    let handle = tokio::runtime::Handle::current();
    let (client, target, timeout) = (client.clone(), Arc::new(run.target.clone()), run.timeout);
    let tally2 = Arc::clone(tally);
    // The pacer is an OS thread with a 1 µs timer slack: tokio's timer wheel has 1 ms granularity,
    // which would bunch requests at 2000 req/s and add up to 1 ms of artificial latency.
    let pacer = std::thread::spawn(move || {
        set_timer_slack_ns(1_000);
        let mut lag = Latencies::new();
        let mut tasks = Vec::new();
        for i in 0u32.. {
            let due = start + period * i;
            if due >= end {
                break;
            }
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            lag.record(Instant::now().saturating_duration_since(due));
            let (client, target, slots, tally) = (
                client.clone(),
                Arc::clone(&target),
                Arc::clone(&slots),
                Arc::clone(&tally2),
            );
            // A finished task's memory stays allocated until its handle is dropped, so keeping
            // every handle of a 10-minute soak (300 000 requests) would grow the load generator
            // all along. Finished tasks already added themselves to the tally.
            if i % 1024 == 1023 {
                tasks.retain(|t: &tokio::task::JoinHandle<()>| !t.is_finished());
            }
            tasks.push(handle.spawn(async move {
                let _slot = slots.acquire_owned().await.expect("semaphore open");
                let res = send_full(&client, &target, timeout).await;
                let latency = due.elapsed();
                let mut t = tally.lock().expect("tally lock");
                t.sent_total += 1;
                if due >= measure_from {
                    t.add(&res, latency, true);
                }
            }));
        }
        (lag, tasks)
    });
    let (lag, tasks) = tokio::task::spawn_blocking(move || pacer.join().expect("pacer thread"))
        .await
        .expect("pacer join");
    for t in tasks {
        let _ = t.await;
    }
    lag
}

async fn closed_loop(
    client: &HttpClient,
    run: &HttpRun,
    workers: usize,
    measure_from: Instant,
    end: Instant,
    tally: &Arc<Mutex<Tally>>,
) {
    let mut tasks = Vec::with_capacity(workers);
    for _ in 0..workers {
        let (client, target, tally, timeout) = (
            client.clone(),
            run.target.clone(),
            Arc::clone(tally),
            run.timeout,
        );
        tasks.push(tokio::spawn(async move {
            let mut local = Tally::default();
            loop {
                let t0 = Instant::now();
                if t0 >= end {
                    break;
                }
                let res = send_full(&client, &target, timeout).await;
                let t1 = Instant::now();
                local.sent_total += 1;
                if t0 >= measure_from {
                    local.add(&res, t1 - t0, t1 <= end);
                } else if t1 > measure_from && t1 <= end && matches!(res, Ok(200..300)) {
                    // Sent during warm-up, finished inside the window: counts for throughput only.
                    local.completed_in_window += 1;
                }
            }
            let mut t = tally.lock().expect("tally lock");
            t.lat.merge(&local.lat);
            t.sent += local.sent;
            t.sent_total += local.sent_total;
            t.ok += local.ok;
            t.completed_in_window += local.completed_in_window;
            for (k, v) in local.errors {
                *t.errors.entry(k).or_default() += v;
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

/// Lowers this thread's timer slack so `sleep` wakes within microseconds of its deadline.
fn set_timer_slack_ns(ns: u64) {
    // SAFETY: PR_SET_TIMERSLACK takes a plain integer and only changes this thread's timer slack.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, ns as libc::c_ulong, 0, 0, 0);
    }
}
