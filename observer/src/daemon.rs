//! The observer's event loop: discover → attach → drain the ring buffers → reassemble → meter →
//! sink. One task owns the eBPF maps and the connection table; the sink runs beside it so Redis
//! latency never stalls the ring buffer.

use std::collections::{BTreeMap, HashMap};
use std::str::FromStr as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use aya::maps::{MapData, RingBuf};
use ledger::price::PriceTable;
use ledger::provider::{ProviderDetector, ProviderKind};
use observer_common::{
    HEADER_SIZE, KIND_CLOSE, KIND_DATA, PROC_EXEC, PROC_EXIT, ProcEvent, STAT_DROPPED_BYTES,
    STAT_PROC_DROPS, STAT_RINGBUF_DROPS, STAT_SKIPPED_BYTES, STAT_TRUNCATED_BYTES, SslEventHeader,
};
use prometheus_client::registry::Registry;
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;

use crate::attribution::{ProcessInfo, Rules};
use crate::bpf::{KernelSettings, Probes};
use crate::config::Config;
use crate::connections::Connections;
use crate::discovery;
use crate::exchange::{ObservedCall, Outcome};
use crate::metrics::Metrics;
use crate::sink::{CallRecord, Sink};

/// Daemon (ledger) or `observer sniff` (stdout, no Redis).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Record into Redis.
    Record,
    /// Print JSON lines.
    Sniff,
}

/// Delays after an exec at which the new process is scanned (libssl is mapped by ld.so or a
/// later dlopen, not at exec time).
const EXEC_SCANS_MS: [u64; 5] = [0, 25, 150, 600, 2500];

struct Loop {
    probes: Probes,
    conns: Connections,
    detector: ProviderDetector,
    rules: Rules,
    metrics: Arc<Metrics>,
    procs: HashMap<u32, ProcessInfo>,
    dying: Vec<(Instant, u32)>,
    scans: BTreeMap<Instant, Vec<u32>>,
    boot_id: String,
    tx: mpsc::Sender<CallRecord>,
    prices: Arc<PriceTable>,
    outcomes: Vec<Outcome>,
}

/// Runs until SIGINT/SIGTERM.
pub async fn run(cfg: Config, mode: Mode) -> Result<()> {
    let metrics = Arc::new(Metrics::default());
    let mut registry = Registry::default();
    metrics.register(&mut registry);
    if mode == Mode::Record && !cfg.metrics_listen.is_empty() {
        let addr = cfg.metrics_listen.parse().context("metrics_listen")?;
        let registry = Arc::new(registry);
        tokio::spawn(async move {
            if let Err(e) = crate::metrics::serve(addr, registry).await {
                tracing::error!(error = %e, "metrics server stopped");
            }
        });
    }
    let mut prices = PriceTable::builtin();
    if let Some(path) = &cfg.prices_file {
        prices
            .load_litellm_file(path)
            .with_context(|| format!("prices_file: {}", path.display()))?;
    }
    let mut detector = ProviderDetector::new();
    for p in &cfg.providers {
        let kind = ProviderKind::from_str(&p.kind)
            .map_err(|_| anyhow::anyhow!("providers.kind {:?}", p.kind))?;
        detector = detector.with_host(&p.host, kind, p.name.as_deref().unwrap_or(kind.as_str()));
    }
    let mut sink = match mode {
        Mode::Record => Sink::ledger(
            &cfg.redis_url,
            Duration::from_secs(cfg.bypass_event_window_secs),
        )
        .await
        .with_context(|| format!("connecting to redis_url {}", cfg.redis_url))?,
        Mode::Sniff => Sink::Stdout,
    };
    let (tx, mut rx) = mpsc::channel::<CallRecord>(4096);
    let sink_metrics = metrics.clone();
    let sink_task = tokio::spawn(async move {
        while let Some(rec) = rx.recv().await {
            sink.write(&rec, &sink_metrics).await;
        }
    });

    let mut probes = Probes::load(KernelSettings {
        ring_buffer_bytes: cfg.ring_buffer_bytes,
        per_call_limit: cfg.per_call_bytes,
        wakeup_threshold: cfg.ring_buffer_bytes / 4,
    })?;
    let readable = tokio::io::Interest::READABLE;
    // SAFETY: each AsyncFd owns its RingBuf, which owns the map fd: the fd stays open for exactly
    // as long as it is registered.
    let mut events = unsafe { AsyncFd::register_with_interest(probes.take_events()?, readable)? };
    // SAFETY: as above.
    let mut proc_events =
        unsafe { AsyncFd::register_with_interest(probes.take_proc_events()?, readable)? };
    let mut lp = Loop {
        probes,
        conns: Connections::new(
            cfg.max_connections,
            cfg.max_buffered_bytes,
            Duration::from_secs(cfg.idle_timeout_secs),
        ),
        detector,
        rules: Rules::new(&cfg.attribution, &cfg.exclude)?,
        metrics: metrics.clone(),
        procs: HashMap::new(),
        dying: Vec::new(),
        scans: BTreeMap::new(),
        boot_id: std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .unwrap_or_default()
            .trim()
            .to_owned(),
        tx,
        prices: Arc::new(prices),
        outcomes: Vec::new(),
    };
    discovery::attach_system_libs(&mut lp.probes);
    lp.scan_all();
    tracing::info!(files = lp.probes.attached_files(), "observer ready");
    if mode == Mode::Sniff {
        eprintln!(
            "observer sniff: watching OpenSSL calls; one JSON line per LLM call (Ctrl-C to stop)"
        );
    }

    let mut poll = tokio::time::interval(Duration::from_millis(cfg.poll_interval_ms));
    let mut rescan = tokio::time::interval(Duration::from_secs(cfg.rescan_interval_secs.max(1)));
    let mut housekeeping = tokio::time::interval(Duration::from_secs(1));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            _ = poll.tick() => {
                lp.drain(events.get_mut());
                lp.run_scans();
            }
            guard = events.readable_mut() => {
                let mut guard = guard?;
                lp.drain(guard.get_inner_mut());
                guard.clear_ready();
            }
            guard = proc_events.readable_mut() => {
                let mut guard = guard?;
                lp.drain_procs(guard.get_inner_mut());
                guard.clear_ready();
            }
            _ = rescan.tick() => lp.scan_all(),
            _ = housekeeping.tick() => lp.housekeeping(),
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
        }
    }
    lp.drain(events.get_mut());
    drop(lp);
    let _ = tokio::time::timeout(Duration::from_secs(5), sink_task).await;
    Ok(())
}

impl Loop {
    fn drain(&mut self, ring: &mut RingBuf<MapData>) {
        let now = Instant::now();
        while let Some(item) = ring.next() {
            if item.len() < HEADER_SIZE {
                continue;
            }
            // SAFETY: the kernel wrote a SslEventHeader at the start of every record; read_unaligned
            // copies it out without alignment assumptions.
            let h: SslEventHeader = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
            let data_len = (h.data_len as usize).min(item.len() - HEADER_SIZE);
            let data = &item[HEADER_SIZE..HEADER_SIZE + data_len];
            self.metrics.events.inc();
            self.metrics.bytes.inc_by(data_len as u64);
            let mut outcomes = std::mem::take(&mut self.outcomes);
            match h.kind {
                KIND_DATA => {
                    // Read /proc while the process surely exists: by the time the response ends a
                    // short-lived client may be gone.
                    if !self.procs.contains_key(&h.pid) {
                        self.process(h.pid);
                    }
                    let evicted = self
                        .conns
                        .data(&h, data, &self.detector, now, &mut outcomes);
                    self.metrics.evictions.inc_by(evicted as u64);
                }
                KIND_CLOSE => self
                    .conns
                    .close(h.pid, h.ssl, &self.detector, &mut outcomes),
                _ => {}
            }
            drop(item);
            for o in outcomes.drain(..) {
                self.outcome(&h, o);
            }
            self.outcomes = outcomes;
        }
        self.metrics
            .connections
            .set(i64::try_from(self.conns.len()).unwrap_or(i64::MAX));
    }

    fn outcome(&mut self, h: &SslEventHeader, o: Outcome) {
        match o {
            Outcome::Call(call) => self.call(h, &call),
            Outcome::NotLlm => {
                self.conns.ignore(h.pid, h.ssl);
                self.metrics.connections_ignored.inc();
                if let Err(e) = self.probes.skip_connection(h.pid, h.ssl) {
                    tracing::debug!(error = %e, "cannot mark connection in the kernel filter");
                }
            }
            Outcome::Http2 => {
                self.conns.ignore(h.pid, h.ssl);
                self.metrics.http2_connections.inc();
                let _ = self.probes.skip_connection(h.pid, h.ssl);
            }
            Outcome::ParseError(reason) => self.metrics.parse_error(reason),
        }
    }

    fn call(&mut self, h: &SslEventHeader, call: &ObservedCall) {
        let proc = self.process(h.pid);
        let who = self.rules.attribute(
            &proc,
            call.tenant_header.as_deref(),
            call.feature_header.as_deref(),
        );
        let event_id = format!("obs:{}:{}:{:x}:{}", self.boot_id, h.pid, h.ssl, h.ts_ns);
        let rec = CallRecord::new(call, event_id, &proc, who, &self.prices);
        if self.tx.try_send(rec).is_err() {
            self.metrics.ledger_errors.inc();
            tracing::error!("sink queue full: call dropped");
        }
    }

    fn process(&mut self, pid: u32) -> ProcessInfo {
        if let Some(p) = self.procs.get(&pid) {
            return p.clone();
        }
        let p = ProcessInfo::read(std::path::Path::new("/proc"), pid).unwrap_or(ProcessInfo {
            pid,
            ..ProcessInfo::default()
        });
        self.procs.insert(pid, p.clone());
        p
    }

    fn drain_procs(&mut self, ring: &mut RingBuf<MapData>) {
        let now = Instant::now();
        while let Some(item) = ring.next() {
            if item.len() < std::mem::size_of::<ProcEvent>() {
                continue;
            }
            // SAFETY: the kernel writes whole ProcEvent records.
            let ev: ProcEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
            match ev.kind {
                PROC_EXEC => {
                    // The new image's comm/exe/cgroup: cache now, a short-lived process may be gone
                    // before its calls are parsed.
                    self.procs.remove(&ev.pid);
                    let info = self.process(ev.pid);
                    if self.rules.excluded(&info) {
                        let _ = self.probes.skip_pid(ev.pid, true);
                    }
                    for ms in EXEC_SCANS_MS {
                        self.scans
                            .entry(now + Duration::from_millis(ms))
                            .or_default()
                            .push(ev.pid);
                    }
                }
                PROC_EXIT => self.dying.push((now + Duration::from_secs(5), ev.pid)),
                _ => {}
            }
        }
        self.run_scans();
    }

    fn run_scans(&mut self) {
        let now = Instant::now();
        let later = self.scans.split_off(&(now + Duration::from_nanos(1)));
        let due = std::mem::replace(&mut self.scans, later);
        for pid in due.into_values().flatten() {
            discovery::attach_process(&mut self.probes, pid);
        }
    }

    fn scan_all(&mut self) {
        for pid in discovery::all_pids() {
            discovery::attach_process(&mut self.probes, pid);
            if !self.rules_empty() {
                let info = self.process(pid);
                if self.rules.excluded(&info) {
                    let _ = self.probes.skip_pid(pid, true);
                }
            }
        }
        self.metrics
            .attached_files
            .set(i64::try_from(self.probes.attached_files()).unwrap_or(0));
    }

    fn rules_empty(&self) -> bool {
        !self.rules.has_excludes()
    }

    fn housekeeping(&mut self) {
        let now = Instant::now();
        let (idle, mem) = self.conns.sweep(now);
        self.metrics.evictions.inc_by((idle + mem) as u64);
        let (gone, keep): (Vec<_>, Vec<_>) = self.dying.drain(..).partition(|(t, _)| *t <= now);
        self.dying = keep;
        for (_, pid) in gone {
            self.procs.remove(&pid);
            self.conns.remove_pid(pid);
            let _ = self.probes.skip_pid(pid, false);
        }
        if let Ok(stats) = self.probes.stats() {
            let m = &self.metrics;
            m.kernel_drops.set(stats[STAT_RINGBUF_DROPS as usize]);
            m.kernel_dropped_bytes
                .set(stats[STAT_DROPPED_BYTES as usize]);
            m.truncated_bytes.set(stats[STAT_TRUNCATED_BYTES as usize]);
            m.skipped_bytes.set(stats[STAT_SKIPPED_BYTES as usize]);
            m.proc_event_drops.set(stats[STAT_PROC_DROPS as usize]);
        }
        self.metrics
            .connections
            .set(i64::try_from(self.conns.len()).unwrap_or(i64::MAX));
    }
}
