//! The processes a bench run starts (redis-server, mock providers, enforcers, LiteLLM, the observer),
//! each behind a guard that kills it, all on loopback; plus per-process CPU and memory readings.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// Kills its process (and waits for it) on drop.
pub struct Proc {
    child: Child,
    name: String,
}

impl Proc {
    /// Spawns `cmd` under `name`.
    pub fn spawn(name: &str, cmd: &mut Command) -> Result<Proc> {
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        Ok(Proc {
            child,
            name: name.to_owned(),
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails when the process already exited (it should be serving).
    pub fn ensure_running(&mut self) -> Result<()> {
        if let Some(st) = self.child.try_wait()? {
            bail!("{} exited early with {st}", self.name);
        }
        Ok(())
    }

    /// Sends SIGTERM and waits up to `within` for a clean exit (status 0).
    pub fn terminate(&mut self, within: Duration) -> Result<()> {
        if self.child.try_wait()?.is_none() {
            crate::command::run(
                Command::new("kill").args(["-TERM", &self.child.id().to_string()]),
            )?;
        }
        let deadline = Instant::now() + within;
        loop {
            if let Some(st) = self.child.try_wait()? {
                if !st.success() {
                    bail!("{} exited with {st} after SIGTERM", self.name);
                }
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{} did not exit within {within:?} of SIGTERM", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Takes its stdout (when spawned with `Stdio::piped()`).
    pub fn stdout(&mut self) -> Option<std::process::ChildStdout> {
        self.child.stdout.take()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free loopback port (bound then released).
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Waits until something accepts TCP connections on 127.0.0.1:`port`.
pub fn wait_port(port: u16, what: &str, within: Duration) -> Result<()> {
    let deadline = Instant::now() + within;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("{what} did not listen on 127.0.0.1:{port} within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// `$CARGO_TARGET_DIR` or `target/`.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| crate::command::root().join("target"), PathBuf::from)
}

/// Where the release binaries are: `$CARGO_TARGET_DIR/release` or `target/release`.
pub fn release_dir() -> PathBuf {
    target_dir().join("release")
}

/// A redis-server without persistence on a free loopback port.
pub fn redis(work: &Path) -> Result<(Proc, u16)> {
    let port = free_port()?;
    let p = Proc::spawn(
        "redis-server",
        Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(work)
            .stdout(Stdio::null()),
    )?;
    wait_port(port, "redis-server", Duration::from_secs(10))?;
    Ok((p, port))
}

/// A running mock provider.
pub struct Mock {
    /// Its process, killed when the mock is dropped.
    pub _proc: Proc,
    /// `127.0.0.1:PORT` (plain HTTP and TLS on the same port).
    pub addr: String,
    /// The CA certificate its TLS side uses (when started with TLS).
    pub ca: PathBuf,
}

/// The provider key every mock requires (not a secret: exists only in the bench).
pub const MOCK_KEY: &str = "sk-bench-provider";

/// Starts `mock-provider` with TLS (the observer needs it; plain HTTP works on the same port).
pub fn mock(bin: &Path, work: &Path, name: &str, latency_ms: u64, extra: &[&str]) -> Result<Mock> {
    let ca = work.join(format!("{name}-ca.pem"));
    let mut proc = Proc::spawn(
        name,
        Command::new(bin.join("mock-provider"))
            .args([
                "--listen",
                "127.0.0.1:0",
                "--tls",
                "--print-addr",
                "--key",
                MOCK_KEY,
            ])
            .args(["--latency-ms", &latency_ms.to_string()])
            .args(extra)
            .arg("--ca-out")
            .arg(&ca)
            .stdout(Stdio::piped())
            .stderr(Stdio::null()),
    )?;
    let mut line = String::new();
    BufReader::new(proc.stdout().context("mock stdout")?).read_line(&mut line)?;
    let v: Value =
        serde_json::from_str(line.trim()).with_context(|| format!("{name} printed {line:?}"))?;
    let addr = v["addr"]
        .as_str()
        .with_context(|| format!("{name} printed no addr: {line}"))?
        .to_owned();
    Ok(Mock {
        _proc: proc,
        addr,
        ca,
    })
}

/// Runs `enforcer hash-key` on `key`.
pub fn hash_key(bin: &Path, key: &str) -> Result<String> {
    let mut c = Command::new(bin.join("enforcer"))
        .arg("hash-key")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("running enforcer hash-key")?;
    c.stdin.take().context("stdin")?.write_all(key.as_bytes())?;
    let out = c.wait_with_output()?;
    let h = String::from_utf8(out.stdout)?.trim().to_owned();
    if h.len() != 64 {
        bail!("enforcer hash-key printed {h:?}");
    }
    Ok(h)
}

/// The Prometheus text of `http://127.0.0.1:{port}/metrics` (curl, 5 s at most), sent with
/// `bearer` when the endpoint wants a token; `None` when it cannot be read.
pub fn metrics_text(port: u16, bearer: Option<&str>) -> Option<String> {
    let mut c = Command::new("curl");
    c.args(["-s", "--fail", "--max-time", "5"]);
    if let Some(token) = bearer {
        c.arg("-H").arg(format!("Authorization: Bearer {token}"));
    }
    c.arg(format!("http://127.0.0.1:{port}/metrics"));
    crate::command::output(&mut c)
}

/// CPU time (user + system) a process used so far, in clock ticks (`/proc/PID/stat`).
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command (which may contain spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the command.
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// Voluntary context switches of the threads a process has now (`/proc/PID/task/*/status`):
/// each is a sleep that ended in a wake-up. A thread that ends while it is read is left out, as
/// are the switches of threads that ended before.
pub fn voluntary_switches(pid: u32) -> Option<u64> {
    let switches = |t: std::fs::DirEntry| {
        std::fs::read_to_string(t.path().join("status"))
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))?
            .trim()
            .parse::<u64>()
            .ok()
    };
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    Some(tasks.filter_map(Result::ok).filter_map(switches).sum())
}

/// A process's CPU time and wake-ups while nothing is sent to it for `secs` (after 2 s of quiet,
/// so the last calls' work and the allocator's purge are over). Wake-ups are those of the threads
/// alive at both readings ([`voluntary_switches`]). `who` names it in errors and the progress line.
pub fn at_rest(pid: u32, secs: u64, who: &str) -> Result<Value> {
    std::thread::sleep(Duration::from_secs(2));
    let read = || Some((cpu_ticks(pid)?, voluntary_switches(pid)?, Instant::now()));
    let (c0, w0, t0) = read().with_context(|| format!("reading the {who}'s /proc"))?;
    std::thread::sleep(Duration::from_secs(secs));
    let (c1, w1, t1) = read().with_context(|| format!("reading the {who}'s /proc"))?;
    let s = (t1 - t0).as_secs_f64();
    let cpu_ms = c1.saturating_sub(c0) as f64 * 1000.0 / ticks_per_s();
    let wakeups = w1.saturating_sub(w0) as f64;
    eprintln!(
        "    {who} idle for {s:.0} s: {:.1} wake-ups/s, {:.1} ms CPU per minute",
        wakeups / s,
        cpu_ms * 60.0 / s
    );
    Ok(serde_json::json!({
        "seconds": s,
        "wakeups_per_s": wakeups / s,
        "cpu_ms_per_min": cpu_ms * 60.0 / s,
    }))
}

/// Clock ticks per second (`getconf CLK_TCK`, almost always 100).
pub fn ticks_per_s() -> f64 {
    crate::command::output(Command::new("getconf").arg("CLK_TCK"))
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// Resident memory in KiB (`VmRSS` of `/proc/PID/status`).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// A numeric field of `/proc/PID/status` (`VmHWM:`, `RssAnon:` in KiB, `Threads:`).
pub fn status_field(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(field))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_cpu_and_rss() {
        let me = std::process::id();
        assert!(cpu_ticks(me).is_some());
        assert!(rss_kib(me).is_some_and(|k| k > 0));
        assert!(status_field(me, "Threads:").is_some_and(|n| n >= 1));
        assert!(status_field(me, "RssAnon:").is_some());
        std::thread::sleep(std::time::Duration::from_millis(1));
        assert!(voluntary_switches(me).is_some_and(|n| n >= 1));
    }
}
