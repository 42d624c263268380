//! Loads the embedded eBPF object, attaches the OpenSSL uprobes to each distinct file once, and
//! gives the rest of the daemon typed access to the maps (stats, filters, ring buffers).

use std::collections::HashMap as StdHashMap;
use std::path::Path;

use anyhow::{Context as _, Result, anyhow};
use aya::maps::{Array, HashMap, MapData, PerCpuArray, RingBuf};
use aya::programs::uprobe::{UProbeAttachLocation, UProbeLinkId};
use aya::programs::{TracePoint, UProbe};
use aya::{Ebpf, EbpfLoader};
use observer_common::{
    ConnKey, FLAG_CGROUP_ALLOWLIST, FLAG_PID_ALLOWLIST, ObserverConfig, READER_ASLEEP, STAT_COUNT,
};

use crate::config::AllowLists;
use crate::elf::SslSymbols;

mod egress;
mod go;
mod rcu;
mod reaper;
mod scoped;

pub use egress::EgressMaps;
pub use go::{GoOutcome, read_copy};
pub use rcu::ExpeditedRcu;
pub use scoped::{Scope, Sites};

/// The eBPF object built by build.rs (aya-build) from observer-ebpf.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/observer"));

/// Identity of a file on the host: attach once per (device, inode), whatever path reaches it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FileId {
    /// `st_dev`.
    pub dev: u64,
    /// `st_ino`.
    pub ino: u64,
}

/// What attaching to a file achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachOutcome {
    /// Probes are now attached (count of probes).
    Attached(usize),
    /// The file does not export `SSL_write`; remembered so it is never tried again.
    NotSsl,
    /// Already handled earlier.
    Known,
}

/// Kernel-side settings written into the `CONFIG` map.
#[derive(Debug, Clone, Copy)]
pub struct KernelSettings {
    /// Ring buffer size in bytes (power of two, multiple of the page size).
    pub ring_buffer_bytes: u32,
    /// Most plaintext bytes copied per SSL call.
    pub per_call_limit: u32,
    /// Wake the reader only when this many bytes are waiting.
    pub wakeup_threshold: u32,
    /// Attach the open tracepoints that report TLS libraries as they are opened.
    pub open_events: bool,
    /// Attach the egress accounting tracepoint (connections to provider addresses).
    pub egress: bool,
    /// With `egress`: attach the first-send programs that read each provider connection's TLS
    /// server name (`egress_server_names`).
    pub server_names: bool,
}

/// The programs, owned by the discovery thread: attaching never runs on the reader's thread.
pub struct Probes {
    ebpf: Ebpf,
    files: StdHashMap<FileId, AttachOutcome>,
    skip_pids: HashMap<MapData, u32, u8>,
    /// Whether the open tracepoints report TLS libraries as they are opened.
    open_events: bool,
    /// Distinct Go binaries by outcome.
    go: std::collections::BTreeMap<GoOutcome, u64>,
    /// Per-process probes (`attach = "on-connect"`) and the probe sites of the files they use.
    scoped: scoped::Scoped,
    /// Expedite RCU grace periods while attaching (`expedite_rcu`; see `bpf/rcu.rs`).
    expedite_rcu: bool,
}

/// The maps the ring-buffer reader uses, taken out of the [`Ebpf`] object so the reader never
/// shares anything with the discovery thread.
pub struct ReaderMaps {
    /// TLS plaintext events.
    pub events: RingBuf<MapData>,
    /// Process exec/exit events.
    pub proc_events: RingBuf<MapData>,
    /// Counters and the connection filter.
    pub kernel: KernelMaps,
    /// Egress accounting (connections to providers), when the kernel supports it.
    pub egress: Option<EgressMaps>,
}

/// The reader's small maps: kernel counters and the per-connection filter.
pub struct KernelMaps {
    skip_conns: HashMap<MapData, ConnKey, u8>,
    stats: PerCpuArray<MapData, u64>,
    /// The reader's sleep flag (`READER`, one entry), read by every program that writes an event.
    reader: Array<MapData, u32>,
}

impl KernelMaps {
    /// Kernel counters (`STAT_*` indices) summed over CPUs.
    pub fn stats(&self) -> Result<[u64; STAT_COUNT as usize]> {
        let mut out = [0u64; STAT_COUNT as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            let values = self.stats.get(&u32::try_from(i)?, 0)?;
            *slot = values.iter().sum();
        }
        Ok(out)
    }

    /// Tells the programs whether the reader sleeps ([`READER_ASLEEP`]): while it does, every
    /// event they write wakes it. After setting the flag the caller must look at the rings once
    /// more (the programs' side of that handshake is `wake_if_asleep` in the eBPF crate), so
    /// this ends with a full fence: the flag is visible before the caller's next read of a ring.
    pub fn set_reader_asleep(&mut self, asleep: bool) -> Result<()> {
        let v = if asleep { READER_ASLEEP } else { 0 };
        self.reader
            .set(0, v, 0)
            .context("writing the reader's sleep flag")?;
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    /// Stops copying plaintext for a connection that is not LLM traffic.
    pub fn skip_connection(&mut self, pid: u32, ssl: u64) -> Result<()> {
        self.skip_conns.insert(ConnKey { ssl, pid, pad: 0 }, 1, 0)?;
        Ok(())
    }
}

impl Probes {
    /// Loads and verifies every program, writes the config and allow-lists, attaches the sched
    /// tracepoints, and splits off the maps the reader needs.
    pub fn load(settings: KernelSettings, allow: &AllowLists) -> Result<(Probes, ReaderMaps)> {
        bump_memlock_rlimit();
        raise_nofile_rlimit();
        ensure_tracefs();
        let mut ebpf = EbpfLoader::new()
            .map_max_entries("EVENTS", settings.ring_buffer_bytes)
            .load(OBJECT)
            .context("loading the eBPF object (needs root / CAP_SYS_ADMIN, a kernel with BTF)")?;
        let mut flags = 0;
        if let Some(pids) = &allow.pids {
            flags |= FLAG_PID_ALLOWLIST;
            let mut map: HashMap<_, u32, u8> =
                HashMap::try_from(ebpf.map_mut("ALLOW_PIDS").context("map ALLOW_PIDS")?)?;
            for pid in pids {
                map.insert(pid, 1, 0).context("writing ALLOW_PIDS")?;
            }
        }
        if let Some(cgroups) = &allow.cgroups {
            flags |= FLAG_CGROUP_ALLOWLIST;
            let mut map: HashMap<_, u64, u8> =
                HashMap::try_from(ebpf.map_mut("ALLOW_CGROUPS").context("map ALLOW_CGROUPS")?)?;
            for id in cgroups {
                map.insert(id, 1, 0).context("writing ALLOW_CGROUPS")?;
            }
        }
        let mut cfg: Array<_, ObserverConfig> =
            Array::try_from(ebpf.map_mut("CONFIG").context("map CONFIG")?)?;
        let value = ObserverConfig {
            per_call_limit: settings.per_call_limit,
            wakeup_threshold: settings.wakeup_threshold,
            flags,
            pad: 0,
        };
        cfg.set(0, value, 0).context("writing CONFIG")?;
        for name in [
            "ssl_write",
            "ssl_write_ex",
            "ssl_write_ex5",
            "ssl_read",
            "ssl_read_ex",
            "ssl_read_ex5",
            "ssl_free",
            "ssl_ctrl",
            "ssl_write_ret",
            "ssl_read_ret",
        ] {
            let prog: &mut UProbe = ebpf
                .program_mut(name)
                .with_context(|| format!("program {name}"))?
                .try_into()?;
            prog.load()
                .with_context(|| format!("verifier rejected {name}"))?;
        }
        // Absent from objects built for other architectures than amd64.
        for name in go::GO_PROGRAMS {
            if let Some(prog) = ebpf.program_mut(name) {
                let prog: &mut UProbe = prog.try_into()?;
                prog.load()
                    .with_context(|| format!("verifier rejected {name}"))?;
            }
        }
        for name in ["sched_process_exec", "sched_process_exit"] {
            let prog: &mut TracePoint = ebpf
                .program_mut(name)
                .with_context(|| format!("program {name}"))?
                .try_into()?;
            prog.load()
                .with_context(|| format!("verifier rejected {name}"))?;
            prog.attach("sched", name)
                .with_context(|| format!("attaching tracepoint sched/{name}"))?;
        }
        match rename_format_matches() {
            Ok(()) => {
                let rename: &mut TracePoint = ebpf
                    .program_mut("task_rename")
                    .context("program task_rename")?
                    .try_into()?;
                rename.load().context("verifier rejected task_rename")?;
                rename
                    .attach("task", "task_rename")
                    .context("attaching tracepoint task/task_rename")?;
            }
            Err(why) => tracing::warn!(
                %why,
                "task/task_rename not attached: a process renamed after exec is matched by \
                 its name when first seen"
            ),
        }
        let open_events = match open_formats_match() {
            Ok(()) if !settings.open_events => false,
            Ok(()) => {
                attach_open_tracepoints(&mut ebpf)?;
                true
            }
            Err(why) => {
                tracing::warn!(
                    %why,
                    "open tracepoints not attached: a TLS library loaded after exec is found by \
                     the timed rescans only"
                );
                false
            }
        };
        let egress = if settings.egress {
            egress::load(&mut ebpf, settings.server_names)
        } else {
            None
        };
        let mut take = |name: &str| {
            ebpf.take_map(name)
                .with_context(|| format!("map {name} already taken"))
        };
        let maps = ReaderMaps {
            events: RingBuf::try_from(take("EVENTS")?)?,
            proc_events: RingBuf::try_from(take("PROC_EVENTS")?)?,
            kernel: KernelMaps {
                skip_conns: HashMap::try_from(take("SKIP_CONNS")?)?,
                stats: PerCpuArray::try_from(take("STATS")?)?,
                reader: Array::try_from(take("READER")?)?,
            },
            egress,
        };
        let skip_pids = HashMap::try_from(take("SKIP_PIDS")?)?;
        Ok((
            Probes {
                ebpf,
                files: StdHashMap::new(),
                skip_pids,
                open_events,
                go: std::collections::BTreeMap::new(),
                scoped: scoped::Scoped::default(),
                expedite_rcu: false,
            },
            maps,
        ))
    }

    /// Expedite RCU grace periods while probes are attached (`expedite_rcu`).
    pub fn set_expedite_rcu(&mut self, on: bool) {
        self.expedite_rcu = on;
    }

    /// `rcu_expedited` on until the guard drops, if `expedite_rcu` is set: held around a batch
    /// of attaches so the knob is written once for all of them.
    pub fn expedited(&self) -> Option<ExpeditedRcu> {
        self.expedite_rcu.then(ExpeditedRcu::begin)
    }

    /// Whether the kernel reports TLS libraries as they are opened (else only timed scans find
    /// libraries loaded after exec).
    pub fn open_events(&self) -> bool {
        self.open_events
    }

    /// Whether this file was already handled for `scope`: attached for it, or known to be no
    /// TLS library at all.
    pub fn knows(&self, id: FileId, scope: Scope) -> bool {
        match scope {
            Scope::All => self.files.contains_key(&id),
            Scope::Process(pid) => {
                matches!(self.files.get(&id), Some(AttachOutcome::NotSsl))
                    || self.scoped.has_file(pid, id)
            }
        }
    }

    /// Attaches all probes to `path` (a path that reaches file `id`, e.g. through /proc/PID/root)
    /// at the offsets resolved once for the file, firing in `scope`: no per-probe symbol lookup.
    pub fn attach_file(
        &mut self,
        id: FileId,
        path: &Path,
        symbols: &SslSymbols,
        scope: Scope,
    ) -> Result<AttachOutcome> {
        if self.knows(id, scope) {
            return Ok(AttachOutcome::Known);
        }
        let _rcu = self.expedited();
        let mut links = Vec::new();
        // (program, file offset) pairs placed by `elf::sites`, `SSL_write`'s first: it decides
        // whether the file can be probed at all.
        for (i, &(prog, offset)) in symbols.probes.iter().enumerate() {
            let program: &mut UProbe = self
                .ebpf
                .program_mut(prog)
                .ok_or_else(|| anyhow!("program {prog} missing"))?
                .try_into()?;
            match program.attach(
                UProbeAttachLocation::AbsoluteOffset(offset),
                path,
                scope.uprobe(),
            ) {
                Ok(link) => links.push((prog, link)),
                Err(e) if i == 0 => {
                    // Remember the failure too so a broken file is not retried every scan (a
                    // process-scoped failure may be the process's: only that attempt fails).
                    if scope == Scope::All {
                        self.files.insert(id, AttachOutcome::NotSsl);
                    }
                    return Err(e).with_context(|| {
                        format!("attaching {prog} at {offset:#x} in {}", path.display())
                    });
                }
                Err(e) => {
                    // Keep what attached: one missing probe must not blind the others.
                    tracing::warn!(prog, offset, path = %path.display(), error = %e, "probe not attached");
                }
            }
        }
        let attached = links.len();
        self.keep_links(id, scope, links);
        Ok(AttachOutcome::Attached(attached))
    }

    /// Records what attaching file `id` in `scope` made: a process's links are kept to be
    /// detached when it execs or exits; host-wide ones live as long as the programs.
    fn keep_links(&mut self, id: FileId, scope: Scope, links: Vec<(&'static str, UProbeLinkId)>) {
        match scope {
            Scope::All => {
                self.files.insert(id, AttachOutcome::Attached(links.len()));
            }
            Scope::Process(pid) => self.scoped.keep(pid, id, links),
        }
    }

    /// Records a file found not to be OpenSSL, so it is never checked again.
    pub fn remember_not_ssl(&mut self, id: FileId) {
        self.files.insert(id, AttachOutcome::NotSsl);
    }

    /// Number of distinct files with probes attached.
    pub fn attached_files(&self) -> usize {
        self.files
            .values()
            .filter(|o| matches!(o, AttachOutcome::Attached(_)))
            .count()
    }

    /// Excludes (or re-includes) a whole process.
    pub fn skip_pid(&mut self, pid: u32, skip: bool) -> Result<()> {
        if skip {
            self.skip_pids.insert(pid, 1, 0)?;
        } else {
            let _ = self.skip_pids.remove(&pid);
        }
        Ok(())
    }
}

/// Older kernels charge BPF maps to RLIMIT_MEMLOCK; raise it so loading never fails on that.
fn bump_memlock_rlimit() {
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit with a valid struct; failure is harmless on memcg-accounting kernels.
    let _ = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) };
}

/// Each probe is two descriptors (its perf event and its BPF link), and with
/// `attach = "on-connect"` every connected process has its own: the soft descriptor limit is
/// raised to the hard one.
fn raise_nofile_rlimit() {
    let mut rlim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid struct; failure keeps the current limit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut rlim) == 0 && rlim.rlim_cur < rlim.rlim_max
        {
            rlim.rlim_cur = rlim.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &raw const rlim);
        }
    }
}

/// Tracepoints are attached through tracefs; minimal hosts (and some CI machines) do not mount it.
fn ensure_tracefs() {
    let tracing = Path::new("/sys/kernel/tracing");
    if tracing.join("events").exists() || Path::new("/sys/kernel/debug/tracing/events").exists() {
        return;
    }
    let fstype = c"tracefs";
    let target = c"/sys/kernel/tracing";
    // SAFETY: mount(2) with NUL-terminated strings and no data; failure is reported by the attach.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), "cannot mount tracefs at /sys/kernel/tracing");
    }
}

/// Whether tracepoint `category/name` of the running kernel declares every `(field, offset)` the
/// eBPF program reads (`field` as tracefs prints it, e.g. `pid_t pid`).
fn format_has(category: &str, name: &str, fields: &[(&str, usize)]) -> Result<()> {
    let format = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
        .iter()
        .find_map(|root| {
            std::fs::read_to_string(format!("{root}/events/{category}/{name}/format")).ok()
        })
        .with_context(|| format!("no {category}/{name} format in tracefs"))?;
    for (decl, offset) in fields {
        let found = format.lines().any(|l| {
            let l = l.trim();
            l.starts_with(&format!("field:{decl};")) && l.contains(&format!("offset:{offset};"))
        });
        if !found {
            anyhow::bail!("{category}/{name}: field `{decl}` is not at offset {offset}");
        }
    }
    Ok(())
}

/// Whether this kernel's `task/task_rename` has the field offsets the eBPF program reads.
fn rename_format_matches() -> Result<()> {
    format_has(
        "task",
        "task_rename",
        &[("pid_t pid", 8), ("char newcomm[16]", 28)],
    )
}

/// The open syscall tracepoints, the program attached to each, and the field it reads.
const OPEN_TRACEPOINTS: &[(&str, &str, &str, usize)] = &[
    (
        "sys_enter_open",
        "tls_open_enter",
        "const char * filename",
        16,
    ),
    (
        "sys_enter_openat",
        "tls_openat_enter",
        "const char * filename",
        24,
    ),
    (
        "sys_enter_openat2",
        "tls_openat_enter",
        "const char * filename",
        24,
    ),
];

/// Whether every open tracepoint has the offsets the eBPF programs read.
fn open_formats_match() -> Result<()> {
    for (name, _, field, offset) in OPEN_TRACEPOINTS {
        format_has("syscalls", name, &[(field, *offset)])?;
    }
    Ok(())
}

/// Loads the open programs and attaches each to its tracepoints (one program serves several).
fn attach_open_tracepoints(ebpf: &mut Ebpf) -> Result<()> {
    for prog in ["tls_open_enter", "tls_openat_enter"] {
        let p: &mut TracePoint = ebpf
            .program_mut(prog)
            .with_context(|| format!("program {prog}"))?
            .try_into()?;
        p.load()
            .with_context(|| format!("verifier rejected {prog}"))?;
    }
    for (name, prog, _, _) in OPEN_TRACEPOINTS {
        let p: &mut TracePoint = ebpf
            .program_mut(prog)
            .with_context(|| format!("program {prog}"))?
            .try_into()?;
        p.attach("syscalls", name)
            .with_context(|| format!("attaching tracepoint syscalls/{name}"))?;
    }
    Ok(())
}
