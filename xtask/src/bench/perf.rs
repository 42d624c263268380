//! A `perf` process the bench runs beside a load (`perf stat` for the allocation count,
//! `perf sched record` for the waits for a CPU): started before the load, stopped with SIGINT as
//! a user's Ctrl-C, killed if dropped running.

use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::command;

/// Why `perf` cannot do `what` here, if it cannot: not root, or not installed.
pub fn check(what: &str) -> Result<()> {
    if !command::is_root() {
        bail!("{what} needs root");
    }
    if !command::succeeds(Command::new("perf").arg("--version")) {
        bail!(
            "`perf` is not installed (Debian package linux-perf; `cargo xtask setup` installs it)"
        );
    }
    Ok(())
}

/// A running `perf` subcommand whose output goes to a file its arguments name.
pub struct Perf {
    child: Child,
}

impl Perf {
    /// Starts `perf` with `args` set on it (`Command::new("perf")` with its arguments) and gives
    /// it 300 ms to attach to what it watches.
    pub fn start(perf: &mut Command) -> Result<Perf> {
        let child = perf
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting perf")?;
        std::thread::sleep(Duration::from_millis(300));
        Ok(Perf { child })
    }

    /// Stops it (SIGINT) and waits for it to write its file.
    pub fn stop(&mut self) -> Result<ExitStatus> {
        command::run(Command::new("kill").args(["-INT", &self.child.id().to_string()]))?;
        Ok(self.child.wait()?)
    }

    /// Stops a recording (`perf record`, `perf sched record`, named `what`) and checks that it
    /// wrote its file: perf writes it on SIGINT and then ends by that signal.
    pub fn stop_recording(&mut self, what: &str) -> Result<()> {
        let st = self.stop()?;
        if !st.success() && st.signal() != Some(2) {
            bail!("{what} exited {st}");
        }
        Ok(())
    }
}

impl Drop for Perf {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
