//! The observer's threads: a **reader** thread that does nothing but drain the ring buffers,
//! reassemble, meter and hand calls to the sink; a **discovery** thread that does all the slow
//! work (ELF reads, uprobe attaches, /proc scans) so the ring buffer is never left undrained while
//! a 100 MB binary is being resolved; and the main tokio runtime for the sink (Redis or stdout),
//! the metrics endpoint and signals.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use aya::maps::{MapData, RingBuf};
use ledger::billing::Pricing;
use ledger::provider::ProviderDetector;
use ledger::store::LedgerConfig;
use observer_common::{
    HEADER_SIZE, KIND_CLOSE, KIND_DATA, KIND_SNI, KIND_WAKE, PROC_EXEC, PROC_EXIT, PROC_RENAME,
    PROC_TLS_OPEN, ProcEvent, STAT_DROPPED_BYTES, STAT_EVENTS, STAT_PROC_DROPS, STAT_RINGBUF_DROPS,
    STAT_SKIPPED_BYTES, STAT_TCP_DROPS, STAT_TRUNCATED_BYTES, SslEventHeader,
};
use prometheus_client::registry::Registry;
use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, watch};

use crate::attribution::{ProcessInfo, Rules};
use crate::bpf::{KernelMaps, KernelSettings, Probes, ReaderMaps};
use crate::config::Config;
use crate::connections::Connections;
use crate::discovery::{AttachMode, Discovery, ProcNote};
use crate::exchange::{ObservedCall, Outcome};
use crate::metrics::Metrics;
use crate::sink::{CallRecord, RecordCaps, Sink};
use crate::stop::StopSignal;

/// Daemon (ledger) or `observer sniff` (stdout, no Redis).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Record into Redis.
    Record,
    /// Print JSON lines.
    Sniff,
}

/// How long an exited process's connections and attribution are kept (its last events may still
/// be in the ring buffer).
const EXIT_GRACE: Duration = Duration::from_secs(5);

struct Loop {
    kernel: KernelMaps,
    conns: Connections,
    detector: ProviderDetector,
    rules: Rules,
    metrics: Arc<Metrics>,
    procs: HashMap<u32, ProcessInfo>,
    /// Names processes gave themselves since exec (`task/task_rename`), by pid.
    renamed: HashMap<u32, String>,
    dying: Vec<(Instant, u32)>,
    boot_id: String,
    tx: mpsc::Sender<CallRecord>,
    notes: std::sync::mpsc::Sender<ProcNote>,
    pricing: Arc<Pricing>,
    caps: RecordCaps,
    outcomes: Vec<Outcome>,
    /// Egress accounting (connections to providers), when the kernel has it.
    egress: Option<crate::egress::Egress>,
    /// What names a decoded call's provider (`provider_identity`), and the server names
    /// connections sent.
    identity: crate::identity::Identity,
    /// Kernel time (ns) just before the egress ring was last drained.
    tcp_drained_ns: u64,
    /// Whether the reader drains on its timer or sleeps until an event wakes it.
    doze: crate::doze::Doze,
}

/// Runs until SIGINT/SIGTERM.
pub async fn run(cfg: Config, mode: Mode) -> Result<()> {
    let telemetry = Telemetry::start(&cfg, mode)?;
    let metering = Metering::from_config(&cfg)?;
    let output = Output::start(&cfg, mode, &telemetry).await?;
    let warm = warm_tokenizers()?;
    let (mut probes, maps) = load_probes(&cfg)?;
    probes.set_expedite_rcu(cfg.expedite_rcu);
    crate::elf::set_emulated_sites(cfg.probe_sites == "emulated");
    let rules = Rules::new(&cfg.attribution, &cfg.exclude)?;
    let (note_tx, note_rx) = std::sync::mpsc::channel::<ProcNote>();
    let (info_tx, info_rx) = mpsc::unbounded_channel::<ProcessInfo>();
    let (stop, stop_rx) = Stop::new(note_tx.clone());

    let boot_id = read_boot_id();
    let mut egress = crate::egress::start(
        maps.egress,
        &cfg,
        &stop.flag,
        output.unmetered,
        telemetry.egress,
        &boot_id,
        (cfg.attach == "on-connect").then(|| note_tx.clone()),
    )?;
    if cfg.provider_identity == "connection" && egress.is_none() {
        tracing::warn!(
            "egress accounting is not running: only the TLS server name a connection sent \
             vouches for its provider, so calls to IP addresses and from Go clients are refused \
             (provider_identity = \"connection\")"
        );
    }
    let egress_first_pass = egress
        .as_mut()
        .and_then(crate::egress::Egress::take_first_pass);
    let wiring = Wiring {
        boot_id,
        tx: output.calls,
        notes: note_tx,
        egress,
    };
    let lp = Loop::new(
        &cfg,
        maps.kernel,
        metering,
        rules.clone(),
        &telemetry.metrics,
        wiring,
    )?;
    // The reader starts first: it drains while the discovery thread attaches.
    let poll = Duration::from_millis(cfg.poll_interval_ms);
    let (reader, reader_ended) =
        spawn_reader(lp, maps.events, maps.proc_events, poll, info_rx, stop_rx)?;
    let discovery = Discovery::new(
        probes,
        rules,
        telemetry.metrics.clone(),
        info_tx,
        Duration::from_secs(cfg.rescan_interval_secs.max(1)),
        if cfg.attach == "on-connect" {
            AttachMode::OnConnect
        } else {
            AttachMode::All
        },
    );
    let (discovery, ready_rx) = spawn_discovery(discovery, note_rx, &stop.flag)?;
    let mut threads = Threads {
        reader,
        reader_ended,
        discovery,
    };
    let files = initial_scan(warm, ready_rx, egress_first_pass).await?;
    tracing::info!(files, "observer ready");
    if mode == Mode::Sniff {
        eprintln!(
            "observer sniff: watching OpenSSL calls; one JSON line per LLM call (Ctrl-C to stop)"
        );
    }

    threads.wait_for_signal().await?;
    threads.stop(&stop, output.task).await
}

// === Start-up steps, in the order `run` takes them ===

/// The metrics the reader, the discovery thread and egress accounting update, registered once.
struct Telemetry {
    metrics: Arc<Metrics>,
    egress: Arc<crate::egress::EgressMetrics>,
}

impl Telemetry {
    /// Registers every metric and, in record mode with `metrics_listen` set, serves them.
    fn start(cfg: &Config, mode: Mode) -> Result<Self> {
        let metrics = Arc::new(Metrics::default());
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        let egress = Arc::new(crate::egress::EgressMetrics::default());
        egress.register(&mut registry);
        if mode == Mode::Record && !cfg.metrics_listen.is_empty() {
            let addr = cfg.metrics_listen.parse().context("metrics_listen")?;
            let registry = Arc::new(registry);
            tokio::spawn(async move {
                if let Err(e) = crate::metrics::serve(addr, registry).await {
                    tracing::error!(error = %e, "metrics server stopped");
                }
            });
        }
        Ok(Self { metrics, egress })
    }
}

/// What turns a decoded exchange into a priced call of a named provider.
struct Metering {
    pricing: Pricing,
    detector: ProviderDetector,
}

impl Metering {
    /// The price table and the provider hosts the config adds to the built-in ones.
    fn from_config(cfg: &Config) -> Result<Self> {
        let pricing = Pricing::load(&cfg.pricing()).context("prices")?;
        Ok(Self {
            pricing,
            detector: cfg.provider_detector()?,
        })
    }
}

/// Where records go: the queues the reader fills and the task that empties the calls' queue.
struct Output {
    /// Metered calls, written by the sink task.
    calls: mpsc::Sender<CallRecord>,
    /// Unmetered provider connections, written by `unmetered::run`.
    unmetered: mpsc::Sender<crate::egress::UnmeteredRecord>,
    /// The sink task: ends once `calls` (and every clone) is dropped and the queue is written.
    task: tokio::task::JoinHandle<()>,
}

impl Output {
    /// Opens the sink (Redis in record mode, stdout in sniff mode) and starts the writers.
    async fn start(cfg: &Config, mode: Mode, telemetry: &Telemetry) -> Result<Self> {
        let mut sink = open_sink(cfg, mode).await?;
        let (unmetered, unmetered_rx) = mpsc::channel(cfg.sink_queue);
        tokio::spawn(crate::unmetered::run(
            unmetered_rx,
            sink.ledger_handle(),
            Duration::from_secs(cfg.bypass_event_window_secs),
            telemetry.egress.clone(),
        ));
        let (calls, mut rx) = mpsc::channel::<CallRecord>(cfg.sink_queue);
        let sink_metrics = telemetry.metrics.clone();
        let task = tokio::spawn(async move {
            while let Some(rec) = rx.recv().await {
                sink.write(&rec, &sink_metrics).await;
            }
        });
        Ok(Self {
            calls,
            unmetered,
            task,
        })
    }
}

async fn open_sink(cfg: &Config, mode: Mode) -> Result<Sink> {
    Ok(match mode {
        Mode::Record => Sink::ledger(
            &cfg.redis_url,
            LedgerConfig::default().with_credentials(
                cfg.redis_password_env.as_deref(),
                cfg.redis_ca_file.as_deref(),
            )?,
            Duration::from_secs(cfg.bypass_event_window_secs),
            crate::sink::spool_config(
                cfg.spool_dir.as_deref(),
                &cfg.metrics_listen,
                cfg.spool_max_bytes,
            ),
        )
        .await
        .context("connecting to redis_url")?,
        Mode::Sniff => Sink::Stdout,
    })
}

/// The tokenizers the request parser uses are built on first use (slow in a debug build):
/// build them now, off the reader, so the first captured call does not stall the ring
/// buffer.
fn warm_tokenizers() -> Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("observer-warmup".into())
        .spawn(ledger::load_tokenizers)
        .context("spawning the warm-up thread")
}

/// Loads the eBPF programs and maps with the config's sizes, filters and optional parts.
fn load_probes(cfg: &Config) -> Result<(Probes, ReaderMaps)> {
    let allow = cfg.allow_lists()?;
    Probes::load(
        KernelSettings {
            ring_buffer_bytes: cfg.ring_buffer_bytes,
            per_call_limit: cfg.per_call_bytes,
            wakeup_threshold: cfg.ring_buffer_bytes / 4,
            open_events: cfg.attach_on_open,
            egress: cfg.egress_accounting,
            server_names: cfg.server_names(),
        },
        &allow,
    )
}

/// This boot's id: with the kernel's timestamps it makes event ids unique across reboots.
fn read_boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .unwrap_or_default()
        .trim()
        .to_owned()
}

/// Tells the reader (async, through `watch`) and the discovery and egress threads (through the
/// signal they sleep on; discovery, which sleeps on its notes, also gets a note) to stop.
struct Stop {
    tx: watch::Sender<bool>,
    flag: Arc<StopSignal>,
    notes: std::sync::mpsc::Sender<ProcNote>,
}

impl Stop {
    fn new(notes: std::sync::mpsc::Sender<ProcNote>) -> (Self, watch::Receiver<bool>) {
        let (tx, rx) = watch::channel(false);
        let flag = Arc::new(StopSignal::default());
        (Self { tx, flag, notes }, rx)
    }

    fn signal(&self) {
        let _ = self.tx.send(true);
        self.flag.stop();
        let _ = self.notes.send(ProcNote::Stop);
    }
}

/// What the reader is connected to, besides its ring buffers.
struct Wiring {
    boot_id: String,
    tx: mpsc::Sender<CallRecord>,
    notes: std::sync::mpsc::Sender<ProcNote>,
    egress: Option<crate::egress::Egress>,
}

/// Starts the reader thread with its own current-thread runtime. The receiver resolves when
/// the thread ends, whether it returned or panicked.
fn spawn_reader(
    lp: Loop,
    events: RingBuf<MapData>,
    proc_events: RingBuf<MapData>,
    poll: Duration,
    infos: mpsc::UnboundedReceiver<ProcessInfo>,
    stop: watch::Receiver<bool>,
) -> Result<(
    std::thread::JoinHandle<Result<()>>,
    tokio::sync::oneshot::Receiver<()>,
)> {
    let (ended_tx, ended_rx) = tokio::sync::oneshot::channel::<()>();
    let handle = std::thread::Builder::new()
        .name("observer-reader".into())
        .spawn(move || -> Result<()> {
            // Dropped as the thread ends, unwinding included: closes `ended_rx`.
            let _ended = ended_tx;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(lp.run(events, proc_events, poll, infos, stop))
        })
        .context("spawning the reader thread")?;
    Ok((handle, ended_rx))
}

/// Starts the discovery thread; the receiver gets the number of files attached by the initial
/// scan.
fn spawn_discovery(
    discovery: Discovery,
    notes: std::sync::mpsc::Receiver<ProcNote>,
    stop: &Arc<StopSignal>,
) -> Result<(
    std::thread::JoinHandle<()>,
    std::sync::mpsc::Receiver<usize>,
)> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<usize>();
    let stop = stop.clone();
    let handle = std::thread::Builder::new()
        .name("observer-discovery".into())
        .spawn(move || discovery.run(&notes, &ready_tx, &stop))
        .context("spawning the discovery thread")?;
    Ok((handle, ready_rx))
}

/// Waits for the tokenizers, egress accounting's first pass (provider addresses resolved and the
/// connections open before the start found) and the discovery thread's initial scan; returns the
/// files attached.
async fn initial_scan(
    warm: std::thread::JoinHandle<()>,
    ready: std::sync::mpsc::Receiver<usize>,
    egress_first_pass: Option<std::sync::mpsc::Receiver<()>>,
) -> Result<usize> {
    tokio::task::spawn_blocking(move || {
        let _ = warm.join();
        if let Some(rx) = egress_first_pass
            && !first_pass_done(&rx, FIRST_PASS_WAIT)
        {
            tracing::warn!(
                waited_secs = FIRST_PASS_WAIT.as_secs(),
                "egress accounting's first pass is not done (provider hosts resolving slowly?); \
                 until it is, calls on connections opened before the start may be refused as \
                 coming from a process with no provider connection"
            );
        }
        ready.recv()
    })
    .await?
    .context("discovery thread ended before the initial scan")
}

/// How long `observer ready` waits for egress accounting's first pass. The resolver looks the
/// provider hosts up one after another, so a DNS server that does not answer costs the C
/// library's timeout for each; the observer then says ready anyway, with a warning.
const FIRST_PASS_WAIT: Duration = Duration::from_secs(10);

/// Whether egress accounting's first pass ended within `limit`. A closed channel counts as ended:
/// the resolver thread is gone (at a stop) and nothing more will come.
fn first_pass_done(rx: &std::sync::mpsc::Receiver<()>, limit: Duration) -> bool {
    !matches!(
        rx.recv_timeout(limit),
        Err(std::sync::mpsc::RecvTimeoutError::Timeout)
    )
}

/// The two threads `run` started and joins at the end.
struct Threads {
    reader: std::thread::JoinHandle<Result<()>>,
    /// Closed when the reader thread ends, by a return or a panic.
    reader_ended: tokio::sync::oneshot::Receiver<()>,
    discovery: std::thread::JoinHandle<()>,
}

impl Threads {
    /// Returns on SIGINT, SIGTERM or when the reader thread ended (an error or a panic).
    async fn wait_for_signal(&mut self) -> Result<()> {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
            _ = &mut self.reader_ended => {}
        }
        Ok(())
    }

    /// Stops and joins both threads, gives the sink up to 5 s to write what is queued, and
    /// returns the reader's result.
    async fn stop(self, stop: &Stop, sink_task: tokio::task::JoinHandle<()>) -> Result<()> {
        stop.signal();
        let Self {
            reader, discovery, ..
        } = self;
        let joined = tokio::task::spawn_blocking(move || {
            let r = reader.join();
            let _ = discovery.join();
            r
        })
        .await?;
        let _ = tokio::time::timeout(Duration::from_secs(5), sink_task).await;
        match joined {
            Ok(result) => result.context("reader thread"),
            Err(_) => anyhow::bail!("reader thread panicked"),
        }
    }
}

/// The rings one timed drain reads: TLS events, process events, provider connections.
type Drains<'a> = (
    &'a mut RingBuf<MapData>,
    &'a mut RingBuf<MapData>,
    Option<&'a mut RingBuf<MapData>>,
);

/// The reader's ring buffers, registered with its runtime.
struct Rings {
    events: AsyncFd<RingBuf<MapData>>,
    proc_events: AsyncFd<RingBuf<MapData>>,
    /// Provider connections (egress accounting), when it runs.
    tcp: Option<AsyncFd<RingBuf<MapData>>>,
}

impl Loop {
    /// The reader's state before its first event.
    fn new(
        cfg: &Config,
        kernel: KernelMaps,
        metering: Metering,
        rules: Rules,
        metrics: &Arc<Metrics>,
        wiring: Wiring,
    ) -> Result<Self> {
        Ok(Loop {
            kernel,
            conns: Connections::new(
                cfg.max_connections,
                cfg.max_buffered_bytes,
                Duration::from_secs(cfg.idle_timeout_secs),
            ),
            detector: metering.detector,
            rules,
            metrics: metrics.clone(),
            procs: HashMap::new(),
            renamed: HashMap::new(),
            dying: Vec::new(),
            boot_id: wiring.boot_id,
            tx: wiring.tx,
            notes: wiring.notes,
            pricing: Arc::new(metering.pricing),
            caps: RecordCaps {
                max_tokens: cfg.max_tokens_per_call,
                max_cost: ledger::Nanos::from_usd_f64(cfg.max_cost_per_call_usd)
                    .context("max_cost_per_call_usd")?,
            },
            outcomes: Vec::new(),
            identity: crate::identity::Identity::new(cfg.provider_identity == "connection"),
            tcp_drained_ns: 0,
            egress: wiring.egress,
            doze: crate::doze::Doze::new(
                Duration::from_millis(cfg.reader_sleep_after_ms),
                Instant::now(),
            ),
        })
    }

    /// The reader: drains on every forced wakeup and every `poll`, and never waits on anything
    /// but its own ring buffers (process notes and the sink queue are non-blocking). After
    /// `reader_sleep_after_ms` without a TLS event it stops the `poll` timer until an event
    /// wakes it (doze.rs).
    async fn run(
        mut self,
        events: RingBuf<MapData>,
        proc_events: RingBuf<MapData>,
        poll: Duration,
        mut infos: mpsc::UnboundedReceiver<ProcessInfo>,
        mut stop: watch::Receiver<bool>,
    ) -> Result<()> {
        let Rings {
            mut events,
            mut proc_events,
            mut tcp,
        } = self.register(events, proc_events)?;
        let mut tick = tokio::time::interval(poll);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut housekeeping = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                // Process events first: a rename committed before a process's TLS call is
                // applied before that call is attributed.
                // Provider connections before TLS data: a call is then never seen before the
                // connection that carried it (`provider_identity = "connection"`).
                _ = tick.tick(), if !self.doze.asleep() => {
                    let mut rings = (events.get_mut(), proc_events.get_mut(), tcp.as_mut().map(AsyncFd::get_mut));
                    let busy = self.drain_all(&mut rings);
                    if self.doze.drained(busy, Instant::now()) {
                        self.try_sleep(&mut rings);
                    }
                }
                // Provider connections wake the reader at once (two events per connection):
                // the connecting process is read while it surely exists.
                guard = async {
                    match tcp.as_mut() {
                        Some(fd) => fd.readable_mut().await,
                        None => std::future::pending().await,
                    }
                } => {
                    let mut guard = guard?;
                    self.egress_tick(Some(guard.get_inner_mut()));
                    guard.clear_ready();
                    // A closed connection's verdict waits on the timer.
                    if self.egress_waits() {
                        self.wake(&mut tick);
                    }
                }
                guard = events.readable_mut() => {
                    let mut guard = guard?;
                    self.wake(&mut tick);
                    self.drain_procs(proc_events.get_mut());
                    self.egress_tick(tcp.as_mut().map(AsyncFd::get_mut));
                    self.drain(guard.get_inner_mut(), tcp.as_mut().map(AsyncFd::get_mut));
                    guard.clear_ready();
                }
                guard = proc_events.readable_mut() => {
                    let mut guard = guard?;
                    self.drain_procs(guard.get_inner_mut());
                    guard.clear_ready();
                }
                Some(mut info) = infos.recv() => {
                    // The discovery thread read /proc earlier: a rename seen since wins.
                    if let Some(name) = self.renamed.get(&info.pid) {
                        info.comm.clone_from(name);
                    }
                    self.procs.insert(info.pid, info);
                }
                _ = housekeeping.tick() => {
                    // Asleep, the rings are still read once a second: an event the sleep flag
                    // did not wake the reader for (egress's rare race, see doze.rs) waits no
                    // longer than that.
                    if self.doze.asleep() {
                        let mut rings = (events.get_mut(), proc_events.get_mut(), tcp.as_mut().map(AsyncFd::get_mut));
                        if self.drain_all(&mut rings) {
                            self.metrics.reader_late_wakes.inc();
                            self.wake(&mut tick);
                        }
                    }
                    self.housekeeping();
                }
                _ = stop.changed() => break,
            }
        }
        self.drain(events.get_mut(), tcp.as_mut().map(AsyncFd::get_mut));
        self.housekeeping();
        self.log_stopped();
        Ok(())
    }

    /// One timed drain of every ring, process events and connections first (see `run`).
    /// Returns whether it found work: a TLS event, or a connection verdict waiting on the timer.
    fn drain_all(&mut self, rings: &mut Drains<'_>) -> bool {
        let (events, procs, tcp) = rings;
        self.drain_procs(procs);
        self.egress_tick(tcp.as_deref_mut());
        let read = self.drain(events, tcp.as_deref_mut());
        read > 0 || self.egress_waits()
    }

    /// Whether egress accounting has a closed connection whose verdict is still to come.
    fn egress_waits(&self) -> bool {
        self.egress
            .as_ref()
            .is_some_and(crate::egress::Egress::verdicts_pending)
    }

    /// The reader has been quiet for `reader_sleep_after_ms`: sets the sleep flag, then looks
    /// at every ring once more (an event committed before the programs saw the flag is found
    /// here, or it is followed by a wake-up event), and sleeps if that found nothing.
    fn try_sleep(&mut self, rings: &mut Drains<'_>) {
        if let Err(e) = self.kernel.set_reader_asleep(true) {
            tracing::warn!(error = %e, "the reader cannot sleep (its flag is not writable): it \
                drains every poll_interval_ms from now on");
            self.doze.never_again();
            return;
        }
        if self.drain_all(rings) {
            self.clear_sleep_flag();
            self.doze.woke(Instant::now());
            return;
        }
        self.doze.slept();
        self.metrics.reader_sleeps.inc();
    }

    /// An event came while the reader slept: clears the flag and restarts the drain timer.
    fn wake(&mut self, tick: &mut tokio::time::Interval) {
        if !self.doze.asleep() {
            return;
        }
        self.clear_sleep_flag();
        self.doze.woke(Instant::now());
        tick.reset();
    }

    /// A flag left set costs wake-ups per event, not events: logged, not fatal.
    fn clear_sleep_flag(&mut self) {
        if let Err(e) = self.kernel.set_reader_asleep(false) {
            tracing::warn!(error = %e, "cannot clear the reader's sleep flag: events wake it one by one");
        }
    }

    /// Registers the ring buffers with the reader's runtime, the egress ring (taken from
    /// `egress`) only when egress accounting runs.
    fn register(
        &mut self,
        events: RingBuf<MapData>,
        proc_events: RingBuf<MapData>,
    ) -> Result<Rings> {
        let readable = tokio::io::Interest::READABLE;
        // SAFETY: each AsyncFd owns its RingBuf, which owns the map fd: the fd stays open for
        // exactly as long as it is registered.
        let events = unsafe { AsyncFd::register_with_interest(events, readable)? };
        // SAFETY: as above.
        let proc_events = unsafe { AsyncFd::register_with_interest(proc_events, readable)? };
        let tcp = self
            .egress
            .as_mut()
            .and_then(crate::egress::Egress::take_ring);
        // SAFETY: as above.
        let tcp = match tcp {
            Some(r) => Some(unsafe { AsyncFd::register_with_interest(r, readable)? }),
            None => None,
        };
        Ok(Rings {
            events,
            proc_events,
            tcp,
        })
    }

    /// The run's totals, from the kernel's counters.
    fn log_stopped(&self) {
        if let Ok(stats) = self.kernel.stats() {
            tracing::info!(
                events = stats[STAT_EVENTS as usize],
                kernel_drops = stats[STAT_RINGBUF_DROPS as usize],
                truncated_bytes = stats[STAT_TRUNCATED_BYTES as usize],
                "observer stopped"
            );
        }
    }

    /// Drains the TLS ring; returns the events read (wake-up events not counted). `tcp` is the
    /// egress ring: an event newer than its last drain drains it again first, so a call is
    /// never judged before the connection that carried it, even when the connection opened
    /// while this loop ran.
    fn drain(
        &mut self,
        ring: &mut RingBuf<MapData>,
        mut tcp: Option<&mut RingBuf<MapData>>,
    ) -> usize {
        let now = Instant::now();
        let mut read = 0;
        while let Some(item) = ring.next() {
            if item.len() < HEADER_SIZE {
                continue;
            }
            // SAFETY: the kernel wrote a SslEventHeader at the start of every record; read_unaligned
            // copies it out without alignment assumptions.
            let h: SslEventHeader = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
            if h.kind == KIND_WAKE {
                continue;
            }
            read += 1;
            if h.ts_ns > self.tcp_drained_ns
                && let Some(t) = tcp.as_deref_mut()
            {
                self.egress_catch_up(t);
            }
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
                KIND_CLOSE => self.conns.close(h.pid, h.ssl, h.ts_ns, &self.detector),
                KIND_SNI => self.identity.server_name(h.pid, h.ssl, data),
                _ => {}
            }
            drop(item);
            // One event can complete several calls (HTTP/2 streams, pipelined responses):
            // each gets its own event id.
            for (seq, o) in outcomes.drain(..).enumerate() {
                self.outcome(&h, o, seq);
            }
            self.outcomes = outcomes;
            self.finished();
            // After the calls the close completed: they are judged by the connection's name.
            if h.kind == KIND_CLOSE {
                self.identity.closed(h.pid, h.ssl);
            }
        }
        self.metrics
            .connections
            .set(i64::try_from(self.conns.len()).unwrap_or(i64::MAX));
        read
    }

    /// Records what connections produced as they ended (closed, exited, idle, evicted).
    fn finished(&mut self) {
        for f in self.conns.take_finished() {
            match f.outcome {
                Outcome::Call(call) => {
                    let id = event_id(&self.boot_id, f.pid, f.ssl, f.ts_ns, 0, f.seq);
                    self.call(f.pid, f.ssl, f.ts_ns, id, &call);
                }
                Outcome::ParseError(reason) => self.metrics.parse_error(reason),
                Outcome::NotLlm | Outcome::Http2 => {}
            }
        }
    }

    fn outcome(&mut self, h: &SslEventHeader, o: Outcome, seq: usize) {
        match o {
            Outcome::Call(call) => {
                let id = event_id(&self.boot_id, h.pid, h.ssl, h.ts_ns, h.offset, seq);
                self.call(h.pid, h.ssl, h.ts_ns, id, &call);
            }
            Outcome::NotLlm => {
                self.conns.ignore(h.pid, h.ssl);
                self.metrics.connections_ignored.inc();
                if let Err(e) = self.kernel.skip_connection(h.pid, h.ssl) {
                    tracing::debug!(error = %e, "cannot mark connection in the kernel filter");
                }
            }
            Outcome::Http2 => {
                self.metrics.http2_connections.inc();
            }
            Outcome::ParseError(reason) => self.metrics.parse_error(reason),
        }
    }

    fn call(&mut self, pid: u32, ssl: u64, ts_ns: u64, event_id: String, call: &ObservedCall) {
        // The name the process has now: a rename after exec (`task/task_rename`) updated it.
        let proc = self.process(pid);
        let who = self.rules.attribute(
            &proc,
            call.tenant_header.as_deref(),
            call.feature_header.as_deref(),
        );
        let rec = CallRecord::new(call, event_id, &proc, who, &self.pricing);
        if self.refused(&rec, pid, ssl, ts_ns, call) {
            return;
        }
        if let Some(e) = self.egress.as_mut() {
            e.note_metered(pid, &call.endpoint.provider, ts_ns);
        }
        self.metrics
            .exchanges
            .get_or_create(&crate::metrics::ExchangeLabels {
                end: call.end.label().to_owned(),
                response: call.response.label().to_owned(),
            })
            .inc();
        if let Some(guessed) = call.midway {
            self.metrics
                .midway_calls
                .get_or_create(&crate::metrics::MidwayLabels {
                    guessed: guessed.to_owned(),
                })
                .inc();
        }
        match self.tx.try_send(rec) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.metrics.sink_queue_drops.inc();
                tracing::error!("output queue full (sink_queue): call dropped");
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.metrics.sink_queue_drops.inc();
            }
        }
    }

    /// Whether a call is refused before the ledger (counted and logged): usage beyond the
    /// caps, or (`provider_identity = "connection"`) nothing of its connection names the
    /// provider (see identity.rs).
    fn refused(
        &self,
        rec: &CallRecord,
        pid: u32,
        ssl: u64,
        ts_ns: u64,
        call: &ObservedCall,
    ) -> bool {
        if let Some(reason) = rec.over_caps(&self.caps) {
            self.metrics
                .records_refused
                .get_or_create(&crate::metrics::ReasonLabels {
                    reason: reason.to_owned(),
                })
                .inc();
            tracing::warn!(reason, provider = %rec.provider, tenant = %rec.tenant,
                service = %rec.service, pid = rec.pid, comm = %rec.comm,
                tokens_in = rec.input_tokens, tokens_out = rec.output_tokens, cost_nusd = rec.cost_nusd,
                "call refused: usage beyond max_tokens_per_call / max_cost_per_call_usd (not booked)");
            return true;
        }
        let provider = &call.endpoint.provider;
        if self.identity.by_connection()
            && !self.identity.named(&self.detector, pid, ssl, provider)
            && self
                .egress
                .as_ref()
                .is_none_or(|e| !e.vouches(pid, provider, ts_ns))
        {
            self.metrics
                .records_refused
                .get_or_create(&crate::metrics::ReasonLabels {
                    reason: "no_provider_connection".to_owned(),
                })
                .inc();
            tracing::warn!(provider = %rec.provider, service = %rec.service, pid = rec.pid,
                comm = %rec.comm, server_name = self.identity.name_of(pid, ssl).unwrap_or(""),
                "call refused: its connection named no host of that provider (TLS server name) \
                and its process has no connection to the provider's addresses \
                (provider_identity = \"connection\"); a Host header alone is only a claim");
            return true;
        }
        false
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

    /// Drains the egress ring and decides connections whose grace has passed (egress.rs).
    fn egress_tick(&mut self, ring: Option<&mut RingBuf<MapData>>) {
        if let Some(ring) = ring {
            self.egress_catch_up(ring);
        }
        if let Some(e) = self.egress.as_mut() {
            e.decide(&self.rules);
        }
    }

    /// Drains the egress ring (connection opens and closes), noting when.
    fn egress_catch_up(&mut self, ring: &mut RingBuf<MapData>) {
        let Some(mut e) = self.egress.take() else {
            return;
        };
        self.tcp_drained_ns = crate::egress::mono_ns();
        e.drain(ring, |pid| self.process(pid));
        self.egress = Some(e);
    }

    /// Process events: forgets a re-exec'd process's old identity and hands the pid to the
    /// discovery thread (which scans and attaches); nothing slow happens here.
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
                    self.procs.remove(&ev.pid);
                    self.renamed.remove(&ev.pid);
                    let _ = self.notes.send(ProcNote::Exec {
                        pid: ev.pid,
                        ts_ns: ev.ts_ns,
                    });
                }
                PROC_EXIT => {
                    self.dying.push((now + EXIT_GRACE, ev.pid));
                    let _ = self.notes.send(ProcNote::Exit(ev.pid));
                }
                PROC_RENAME => {
                    let len = ev
                        .comm
                        .iter()
                        .position(|&b| b == 0)
                        .unwrap_or(ev.comm.len());
                    let name = String::from_utf8_lossy(&ev.comm[..len]).into_owned();
                    // The kernel reports main-thread renames only, so `pid` is a live process:
                    // its entry (if any) takes the name, and discovery's later /proc reads
                    // cannot bring the old one back (forgotten at exec or exit).
                    if let Some(p) = self.procs.get_mut(&ev.pid) {
                        p.comm.clone_from(&name);
                    }
                    self.renamed.insert(ev.pid, name);
                }
                PROC_TLS_OPEN => {
                    let _ = self.notes.send(ProcNote::TlsOpen {
                        pid: ev.pid,
                        name: ev.comm,
                        ts_ns: ev.ts_ns,
                    });
                }
                _ => {}
            }
        }
    }

    fn housekeeping(&mut self) {
        let now = Instant::now();
        let (idle, mem) = self.conns.sweep(now, &self.detector);
        self.metrics.evictions.inc_by((idle + mem) as u64);
        let (gone, keep): (Vec<_>, Vec<_>) = self.dying.drain(..).partition(|(t, _)| *t <= now);
        self.dying = keep;
        for (_, pid) in &gone {
            self.conns.remove_pid(*pid, &self.detector);
        }
        // Recorded while the exited processes' identities are still known.
        self.finished();
        for (_, pid) in gone {
            self.procs.remove(&pid);
            self.renamed.remove(&pid);
            self.identity.forget(pid);
            if let Some(e) = self.egress.as_mut() {
                e.forget(pid);
            }
        }
        if let Ok(stats) = self.kernel.stats() {
            let m = &self.metrics;
            m.kernel_drops.set(stats[STAT_RINGBUF_DROPS as usize]);
            m.kernel_dropped_bytes
                .set(stats[STAT_DROPPED_BYTES as usize]);
            m.truncated_bytes.set(stats[STAT_TRUNCATED_BYTES as usize]);
            m.skipped_bytes.set(stats[STAT_SKIPPED_BYTES as usize]);
            m.proc_event_drops.set(stats[STAT_PROC_DROPS as usize]);
            if let Some(e) = &self.egress {
                e.metrics()
                    .kernel_drops
                    .set(i64::try_from(stats[STAT_TCP_DROPS as usize]).unwrap_or(i64::MAX));
            }
        }
        self.metrics
            .connections
            .set(i64::try_from(self.conns.len()).unwrap_or(i64::MAX));
    }
}

/// The ledger's idempotency key for a call the observer saw: the kernel event that completed it
/// (`pid`, `SSL*`, return timestamp), the chunk of that event (`offset`: one large `SSL_read` is
/// split into 4 KiB ring records sharing one timestamp) and the call's place among those the chunk
/// completed (`seq`: HTTP/2 streams, pipelined responses). Two calls never share one; the same
/// call always gets the same one, so a retried write is booked once.
fn event_id(boot_id: &str, pid: u32, ssl: u64, ts_ns: u64, offset: u32, seq: usize) -> String {
    use std::fmt::Write as _;
    let mut id = format!("obs:{boot_id}:{pid}:{ssl:x}:{ts_ns}");
    if offset > 0 {
        let _ = write!(id, "@{offset}");
    }
    if seq > 0 {
        let _ = write!(id, ":{seq}");
    }
    id
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{event_id, first_pass_done};

    /// The wait for egress accounting's first pass ends when it is done or its resolver is gone,
    /// and gives up after its limit rather than holding `observer ready` back for good.
    #[test]
    fn the_first_pass_wait_is_bounded() {
        let (tx, rx) = std::sync::mpsc::channel();
        tx.send(()).unwrap();
        assert!(first_pass_done(&rx, Duration::from_secs(5)));
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        drop(tx);
        assert!(first_pass_done(&rx, Duration::from_secs(5)));
        let (_tx, rx) = std::sync::mpsc::channel::<()>();
        let t = std::time::Instant::now();
        assert!(!first_pass_done(&rx, Duration::from_millis(50)));
        assert!(t.elapsed() >= Duration::from_millis(50));
    }

    /// Calls completed by different chunks of one `SSL_read` (same pid, SSL*, timestamp), each
    /// the first its chunk completed, are distinct calls. Before the offset was part of the id,
    /// the ledger took the second for a retry of the first and booked one of 50 concurrent
    /// HTTP/2 calls at $0.
    #[test]
    fn chunks_of_one_read_give_distinct_ids() {
        let ids = [
            event_id("b", 7, 0xab, 100, 0, 0),
            event_id("b", 7, 0xab, 100, 0, 1),
            event_id("b", 7, 0xab, 100, 4096, 0),
            event_id("b", 7, 0xab, 100, 4096, 1),
            event_id("b", 7, 0xab, 100, 8192, 0),
            event_id("b", 7, 0xab, 101, 0, 0),
        ];
        let set: std::collections::HashSet<_> = ids.iter().collect();
        assert_eq!(set.len(), ids.len(), "{ids:?}");
        // The id of a call complete in one chunk keeps its earlier form.
        assert_eq!(ids[0], "obs:b:7:ab:100");
        assert_eq!(ids[1], "obs:b:7:ab:100:1");
        assert_eq!(ids[3], "obs:b:7:ab:100@4096:1");
    }
}
