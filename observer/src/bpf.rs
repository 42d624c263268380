//! Loads the embedded eBPF object, attaches the OpenSSL uprobes to each distinct file once, and
//! gives the rest of the daemon typed access to the maps (stats, filters, ring buffers).

use std::collections::HashMap as StdHashMap;
use std::path::Path;

use anyhow::{Context as _, Result, anyhow};
use aya::maps::{Array, HashMap, MapData, PerCpuArray, RingBuf};
use aya::programs::uprobe::{UProbeError, UProbeScope};
use aya::programs::{ProgramError, TracePoint, UProbe};
use aya::{Ebpf, EbpfLoader};
use observer_common::{ConnKey, ObserverConfig, STAT_COUNT};

/// The eBPF object built by build.rs (aya-build) from observer-ebpf.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/observer"));

/// (program, symbol) pairs attached to every OpenSSL file. The first decides whether the file is
/// an OpenSSL at all (a missing `SSL_write` means "not SSL": nothing else is tried).
const PROBES: &[(&str, &str)] = &[
    ("ssl_write", "SSL_write"),
    ("ssl_write_ret", "SSL_write"),
    ("ssl_write_ex", "SSL_write_ex"),
    ("ssl_write_ret", "SSL_write_ex"),
    ("ssl_read", "SSL_read"),
    ("ssl_read_ret", "SSL_read"),
    ("ssl_read_ex", "SSL_read_ex"),
    ("ssl_read_ret", "SSL_read_ex"),
    ("ssl_free", "SSL_free"),
];

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
}

/// The loaded programs and maps.
pub struct Probes {
    ebpf: Ebpf,
    files: StdHashMap<FileId, AttachOutcome>,
}

impl Probes {
    /// Loads and verifies every program, writes the config and attaches the sched tracepoints.
    pub fn load(settings: KernelSettings) -> Result<Probes> {
        bump_memlock_rlimit();
        ensure_tracefs();
        let mut ebpf = EbpfLoader::new()
            .map_max_entries("EVENTS", settings.ring_buffer_bytes)
            .load(OBJECT)
            .context("loading the eBPF object (needs root / CAP_SYS_ADMIN, a kernel with BTF)")?;
        let mut cfg: Array<_, ObserverConfig> =
            Array::try_from(ebpf.map_mut("CONFIG").context("map CONFIG")?)?;
        let value = ObserverConfig {
            per_call_limit: settings.per_call_limit,
            wakeup_threshold: settings.wakeup_threshold,
            flags: 0,
            pad: 0,
        };
        cfg.set(0, value, 0).context("writing CONFIG")?;
        for name in [
            "ssl_write",
            "ssl_write_ex",
            "ssl_read",
            "ssl_read_ex",
            "ssl_free",
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
        Ok(Probes {
            ebpf,
            files: StdHashMap::new(),
        })
    }

    /// Takes the TLS plaintext ring buffer (call once).
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>> {
        let map = self
            .ebpf
            .take_map("EVENTS")
            .context("map EVENTS already taken")?;
        Ok(RingBuf::try_from(map)?)
    }

    /// Takes the process event ring buffer (call once).
    pub fn take_proc_events(&mut self) -> Result<RingBuf<MapData>> {
        let map = self
            .ebpf
            .take_map("PROC_EVENTS")
            .context("map PROC_EVENTS already taken")?;
        Ok(RingBuf::try_from(map)?)
    }

    /// Whether this file was already handled.
    pub fn knows(&self, id: FileId) -> bool {
        self.files.contains_key(&id)
    }

    /// Attaches all probes to `path` (a path that reaches file `id`, e.g. through /proc/PID/root).
    pub fn attach_file(&mut self, id: FileId, path: &Path) -> Result<AttachOutcome> {
        if self.files.contains_key(&id) {
            return Ok(AttachOutcome::Known);
        }
        let mut attached = 0;
        for (i, (prog, symbol)) in PROBES.iter().enumerate() {
            let program: &mut UProbe = self
                .ebpf
                .program_mut(prog)
                .ok_or_else(|| anyhow!("program {prog} missing"))?
                .try_into()?;
            match program.attach(*symbol, path, UProbeScope::AllProcesses) {
                Ok(_) => attached += 1,
                Err(ProgramError::UProbeError(UProbeError::SymbolError { .. })) if i == 0 => {
                    self.files.insert(id, AttachOutcome::NotSsl);
                    return Ok(AttachOutcome::NotSsl);
                }
                Err(ProgramError::UProbeError(UProbeError::SymbolError { .. })) => {}
                Err(e) if i == 0 => {
                    // Remember the failure too so a broken file is not retried every scan.
                    self.files.insert(id, AttachOutcome::NotSsl);
                    return Err(e).with_context(|| {
                        format!("attaching {prog} to {symbol} in {}", path.display())
                    });
                }
                Err(e) => {
                    // Keep what attached: one missing probe must not blind the others.
                    tracing::warn!(prog, symbol, path = %path.display(), error = %e, "probe not attached");
                }
            }
        }
        self.files.insert(id, AttachOutcome::Attached(attached));
        Ok(AttachOutcome::Attached(attached))
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

    /// Kernel counters (`STAT_*` indices) summed over CPUs.
    pub fn stats(&self) -> Result<[u64; STAT_COUNT as usize]> {
        let map: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.ebpf.map("STATS").context("map STATS")?)?;
        let mut out = [0u64; STAT_COUNT as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            let values = map.get(&u32::try_from(i)?, 0)?;
            *slot = values.iter().sum();
        }
        Ok(out)
    }

    /// Stops copying plaintext for a connection that is not LLM traffic.
    pub fn skip_connection(&mut self, pid: u32, ssl: u64) -> Result<()> {
        let mut map: HashMap<_, ConnKey, u8> =
            HashMap::try_from(self.ebpf.map_mut("SKIP_CONNS").context("map SKIP_CONNS")?)?;
        map.insert(ConnKey { ssl, pid, pad: 0 }, 1, 0)?;
        Ok(())
    }

    /// Excludes (or re-includes) a whole process.
    pub fn skip_pid(&mut self, pid: u32, skip: bool) -> Result<()> {
        let mut map: HashMap<_, u32, u8> =
            HashMap::try_from(self.ebpf.map_mut("SKIP_PIDS").context("map SKIP_PIDS")?)?;
        if skip {
            map.insert(pid, 1, 0)?;
        } else {
            let _ = map.remove(&pid);
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

/// Tracepoints are attached through tracefs; minimal hosts (and this CI VM) do not mount it.
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
