//! Where the streaming tail goes (issue 20): how long each process of a streaming run waits for a
//! CPU after it is woken.
//!
//! Every SSE event a proxy forwards wakes one of its threads, and on a 2-core machine that also
//! runs the mock and the load generator, that thread is often runnable for a while before it runs.
//! That wait lands on the client's inter-chunk gap, whichever proxy it is, so it is the floor
//! under the streaming latency targets. One more run of each variant (direct, the enforcer, the
//! pass-through) goes under `perf sched record -a`; `perf sched timehist` gives, for every time a
//! thread was switched in, how long it had been runnable ("sch delay": since its wake-up, or since
//! it was preempted). Quantiles are per process (all its threads), in µs. The recording itself
//! costs a little on every context switch, so these runs' latencies are reported beside the waits
//! and are not the section's measured figures.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use super::Env;
use super::loadgen;
use super::overhead::{Stack, Variant};
use super::perf::Perf;

/// One run of each variant under `perf sched record`, in the order the section runs them.
pub fn run(env: &Env, stack: &Stack, variants: &[Variant]) -> Result<Value> {
    super::perf::check("recording scheduler events (`perf sched record -a`)")?;
    let mut out = serde_json::Map::new();
    for &v in variants {
        let file = env.work.join(format!("sched-{}.data", v.name()));
        let mut rec = Record::start(&file)?;
        let lg = loadgen::stream_spawn(env, &stack.target(v, true, None))?;
        let lg_pid = lg.id();
        let r = loadgen::finish(lg).with_context(|| format!("streams {} (recorded)", v.name()));
        rec.stop()?;
        let r = r?;
        let waits = waits(&file)?;
        let _ = std::fs::remove_file(&file);
        let of = |pid: Option<u32>| {
            pid.and_then(|p| waits.get(&p))
                .map_or(Value::Null, Waits::json)
        };
        let row = json!({
            "gap_p99_us": r["gap_us"]["p99"],
            "proxy": of(stack.pid(v)),
            "mock": of(Some(stack.mock_pid(true))),
            "loadgen": of(Some(lg_pid)),
        });
        eprintln!(
            "    streams  {:<20} under perf sched: gap p99 {} µs; waits p99 µs: proxy {}  mock {}  loadgen {}",
            v.name(),
            row["gap_p99_us"],
            row["proxy"]["p99_us"],
            row["mock"]["p99_us"],
            row["loadgen"]["p99_us"],
        );
        out.insert(v.name().into(), row);
    }
    Ok(Value::Object(out))
}

/// A system-wide `perf sched record` until stopped.
struct Record(Perf);

impl Record {
    fn start(file: &Path) -> Result<Record> {
        // The tracepoints are on once perf has opened them on every CPU.
        Ok(Record(Perf::start(
            Command::new("perf")
                .args(["sched", "record", "-a", "-o"])
                .arg(file),
        )?))
    }

    /// Stops the recording and checks that perf wrote its file.
    fn stop(&mut self) -> Result<()> {
        self.0.stop_recording("perf sched record")
    }
}

/// The waits of one process's threads, and how many times they ran.
#[derive(Debug, Default)]
struct Waits {
    /// Runnable-before-running times, µs, one per switch-in.
    delays_us: Vec<f64>,
}

/// The `p` quantile (0–1) of `sorted` (ascending): the value at index ⌊len · p⌋, the last for
/// `p` = 1; `None` when empty.
pub(super) fn quantile(sorted: &[f64], p: f64) -> Option<f64> {
    let i = ((sorted.len() as f64 * p) as usize).min(sorted.len().saturating_sub(1));
    sorted.get(i).copied()
}

impl Waits {
    fn json(&self) -> Value {
        let mut d = self.delays_us.clone();
        d.sort_by(f64::total_cmp);
        let q = |p: f64| quantile(&d, p);
        json!({
            "switch_ins": d.len(),
            "p50_us": q(0.50).map(f64::round),
            "p99_us": q(0.99).map(f64::round),
            "p999_us": q(0.999).map(f64::round),
        })
    }
}

/// Runs `perf sched timehist` on a recording and groups its rows by process.
fn waits(file: &Path) -> Result<HashMap<u32, Waits>> {
    let out = Command::new("perf")
        .args(["sched", "timehist", "-i"])
        .arg(file)
        .stderr(Stdio::null())
        .output()
        .context("running perf sched timehist")?;
    if !out.status.success() {
        bail!(
            "perf sched timehist -i {} exited {}",
            file.display(),
            out.status
        );
    }
    let by_pid = parse_timehist(&String::from_utf8_lossy(&out.stdout));
    if by_pid.is_empty() {
        bail!("perf sched timehist -i {} printed no rows", file.display());
    }
    Ok(by_pid)
}

/// `perf sched timehist` rows: `time [cpu] comm[tid/pid] wait sch_delay run` (milliseconds; a
/// single-threaded process prints `comm[pid]`; a name may hold spaces, so the row is read from its
/// end). Headers, the idle task (pid 0) and anything else are skipped.
fn parse_timehist(text: &str) -> HashMap<u32, Waits> {
    let mut by_pid: HashMap<u32, Waits> = HashMap::new();
    for line in text.lines() {
        let t: Vec<&str> = line.split_whitespace().collect();
        if t.len() < 6 {
            continue;
        }
        let n = t.len();
        let (Ok(_wait), Ok(sch), Ok(_run)) = (
            t[n - 3].parse::<f64>(),
            t[n - 2].parse::<f64>(),
            t[n - 1].parse::<f64>(),
        ) else {
            continue;
        };
        let task = t[n - 4];
        let Some(ids) = task
            .rfind('[')
            .and_then(|i| task[i + 1..].strip_suffix(']'))
        else {
            continue;
        };
        let pid = ids.rsplit('/').next().and_then(|p| p.parse::<u32>().ok());
        match pid {
            // perf prints whole microseconds as milliseconds with three decimals.
            Some(pid) if pid != 0 => by_pid
                .entry(pid)
                .or_default()
                .delays_us
                .push((sch * 1000.0).round()),
            _ => {}
        }
    }
    by_pid
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timehist_rows_are_grouped_by_process_and_read_in_microseconds() {
        let text = "\
           time    cpu  task name                       wait time  sch delay   run time
                        [tid/pid]                          (msec)     (msec)     (msec)
--------------- ------  ------------------------------  ---------  ---------  ---------
   60025.487847 [0000]  enforcer-proxy-[19567/19560]        0.000      0.545      0.395
   60025.487917 [0000]  tokio-rt-worker[19564/19560]        0.000      0.687      0.070
   60025.488615 [0001]  <idle>                              0.645      0.000      0.052
   60104.459005 [0001]  python3[20297]                      7.278      7.074      3.974
   60104.459105 [0001]  Web Content[20300/20299]            0.010      0.002      0.100
   60104.459205 [0001]  swapper[0]                          0.010      0.002      0.100
";
        let m = parse_timehist(text);
        assert_eq!(m.len(), 3, "{m:?}");
        assert_eq!(m[&19560].delays_us, vec![545.0, 687.0]);
        assert_eq!(m[&20297].delays_us, vec![7074.0]);
        assert_eq!(m[&20299].delays_us, vec![2.0]);
        let j = m[&19560].json();
        assert_eq!(j["switch_ins"], 2);
        assert_eq!(j["p50_us"], 687.0);
        assert_eq!(j["p99_us"], 687.0);
    }

    #[test]
    fn quantiles_of_a_spread() {
        let w = Waits {
            delays_us: (1..=1000).rev().map(f64::from).collect(),
        };
        let j = w.json();
        assert_eq!(j["switch_ins"], 1000);
        assert_eq!(j["p50_us"], 501.0);
        assert_eq!(j["p99_us"], 991.0);
        assert_eq!(j["p999_us"], 1000.0);
    }
}
