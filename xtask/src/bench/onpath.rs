//! Where one sequential client's added latency goes (issue 20): how long each proxy holds a call
//! on its path.
//!
//! A proxy adds to a call the time it holds the request (from its last read of the request to its
//! write of it upstream) and the response (from its read of the answer to its write back), plus
//! what every extra hop costs whichever proxy it is (two more loopback sends, two more wake-ups).
//! One more one-client run of the pass-through and of the enforcer (budgets on) goes under
//! `perf record` of three syscall tracepoints of that process alone: `recvfrom` entry (its fd)
//! and exit (its size), and `writev` entry (its fd). On each thread, a read that returned data on
//! one fd followed by a `writev` to another fd is one hold; the holds fall in two pairs of fds,
//! client to upstream and upstream to client, told apart by what came before them: a response
//! hold starts about the provider's latency after the previous hold ended, a request hold a few
//! hundred µs after. Tracepoints cost a few µs per syscall, so these runs' latencies are not the
//! section's figures; the holds are read the same way for both proxies.

use std::collections::HashMap;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use super::Env;
use super::loadgen::{self, Load};
use super::overhead::{Stack, Variant};
use super::perf::Perf;

/// The proxies whose holds are read, in this order.
const VARIANTS: [Variant; 2] = [Variant::Passthrough, Variant::Budgets];

/// One more one-client run of each proxy with its syscalls recorded; its holds per direction.
pub fn run(env: &Env, stack: &Stack) -> Result<Value> {
    super::perf::check("recording a proxy's syscalls (`perf record -e syscalls:...`)")?;
    let mut out = serde_json::Map::new();
    for v in VARIANTS {
        let pid = stack
            .pid(v)
            .with_context(|| format!("{} has no process", v.name()))?;
        let file = env.work.join(format!("onpath-{}.data", v.name()));
        let mut rec = Perf::start(
            Command::new("perf")
                .args([
                    "record",
                    "-e",
                    "syscalls:sys_enter_recvfrom,syscalls:sys_exit_recvfrom,syscalls:sys_enter_writev",
                    "-p",
                    &pid.to_string(),
                    "-o",
                ])
                .arg(&file),
        )?;
        let r = loadgen::http(
            env,
            &stack.target(v, false, None),
            Load::Concurrency(1),
            env.plan.warmup,
            env.plan.duration,
        )
        .with_context(|| format!("c1 {} (recorded)", v.name()));
        rec.stop_recording("perf record")?;
        let r = r?;
        let text = Command::new("perf")
            .args(["script", "-F", "tid,time,event,trace", "-i"])
            .arg(&file)
            .stderr(Stdio::null())
            .output()
            .context("running perf script")?;
        let _ = std::fs::remove_file(&file);
        if !text.status.success() {
            bail!("perf script exited {}", text.status);
        }
        let holds = Holds::of(&parse(&String::from_utf8_lossy(&text.stdout)))
            .with_context(|| format!("the holds of {}", v.name()))?;
        let row = json!({
            "p50_us": r["latency_us"]["p50"],
            "request": quantiles(&holds.request),
            "response": quantiles(&holds.response),
        });
        eprintln!(
            "    on path  {:<20} c1 under perf record: p50 {} µs; held p50 µs: request {}  response {}",
            v.name(),
            row["p50_us"],
            row["request"]["p50_us"],
            row["response"]["p50_us"],
        );
        out.insert(v.name().into(), row);
    }
    Ok(Value::Object(out))
}

/// One traced syscall of one thread.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Sys {
    /// `recvfrom` entered on an fd.
    RecvEnter { fd: i64 },
    /// `recvfrom` returned (bytes, or a negative error).
    RecvExit { ret: i64 },
    /// `writev` entered on an fd.
    Writev { fd: i64 },
}

/// `perf script -F tid,time,event,trace` lines: `TID SECONDS: syscalls:NAME: FIELDS`.
fn parse(text: &str) -> Vec<(u32, f64, Sys)> {
    let mut out = Vec::new();
    for line in text.lines() {
        let mut it = line.split_whitespace();
        let (Some(tid), Some(time), Some(event)) = (it.next(), it.next(), it.next()) else {
            continue;
        };
        let (Ok(tid), Ok(time)) = (tid.parse(), time.trim_end_matches(':').parse()) else {
            continue;
        };
        let rest: Vec<&str> = it.collect();
        let hex =
            |s: &str| i64::from_str_radix(s.trim_end_matches(',').trim_start_matches("0x"), 16);
        let fd = || {
            rest.windows(2)
                .find(|w| w[0] == "fd:")
                .and_then(|w| hex(w[1]).ok())
        };
        let sys = match event.trim_end_matches(':') {
            "syscalls:sys_enter_recvfrom" => fd().map(|fd| Sys::RecvEnter { fd }),
            // The return is printed as hex, `0xfffffffffffffff5` for -EAGAIN.
            "syscalls:sys_exit_recvfrom" => rest
                .first()
                .and_then(|s| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok())
                .map(|r| Sys::RecvExit {
                    ret: r.cast_signed(),
                }),
            "syscalls:sys_enter_writev" => fd().map(|fd| Sys::Writev { fd }),
            _ => None,
        };
        if let Some(s) = sys {
            out.push((tid, time, s));
        }
    }
    out
}

/// The holds of one run, µs, by direction.
#[derive(Debug, Default, PartialEq)]
struct Holds {
    request: Vec<f64>,
    response: Vec<f64>,
}

impl Holds {
    /// Pairs each thread's last data read with its next write to another fd, then names the two
    /// most frequent (read fd, write fd) pairs: the one whose holds start longer after the
    /// previous hold (of any thread) is the response direction.
    fn of(events: &[(u32, f64, Sys)]) -> Result<Holds> {
        #[derive(Default)]
        struct Thread {
            fd: Option<i64>,
            read: Option<(f64, i64)>,
        }
        let mut threads: HashMap<u32, Thread> = HashMap::new();
        // (read fd, write fd) -> (hold µs, µs since the previous hold ended). One client makes
        // one call at a time, so the previous hold is the process's, whichever thread held it.
        let mut pairs: HashMap<(i64, i64), Vec<(f64, f64)>> = HashMap::new();
        let mut last_end: Option<f64> = None;
        for &(tid, t, sys) in events {
            let th = threads.entry(tid).or_default();
            match sys {
                Sys::RecvEnter { fd } => th.fd = Some(fd),
                Sys::RecvExit { ret } if ret > 0 => {
                    if let Some(fd) = th.fd {
                        th.read = Some((t, fd));
                    }
                }
                Sys::RecvExit { .. } => {}
                Sys::Writev { fd } => {
                    if let Some((t0, from)) = th.read.take()
                        && from != fd
                    {
                        let before = last_end.map_or(f64::NAN, |e| (t0 - e) * 1e6);
                        pairs
                            .entry((from, fd))
                            .or_default()
                            .push(((t - t0) * 1e6, before));
                        last_end = Some(t);
                    }
                }
            }
        }
        let mut ranked: Vec<_> = pairs.iter().collect();
        ranked.sort_by_key(|(_, v)| std::cmp::Reverse(v.len()));
        let [a, b] = [ranked.first(), ranked.get(1)];
        let (Some(a), Some(b)) = (a, b) else {
            bail!("fewer than two directions of holds were recorded");
        };
        if (a.0.0, a.0.1) != (b.0.1, b.0.0) {
            bail!(
                "the two most frequent holds are not one connection pair's two directions: fds {}→{} and {}→{}",
                a.0.0,
                a.0.1,
                b.0.0,
                b.0.1
            );
        }
        let gap = |v: &Vec<(f64, f64)>| {
            let mut g: Vec<f64> = v.iter().map(|x| x.1).filter(|x| x.is_finite()).collect();
            g.sort_by(f64::total_cmp);
            g.get(g.len() / 2).copied().unwrap_or(0.0)
        };
        let (req, resp) = if gap(a.1) > gap(b.1) { (b, a) } else { (a, b) };
        Ok(Holds {
            request: req.1.iter().map(|x| x.0).collect(),
            response: resp.1.iter().map(|x| x.0).collect(),
        })
    }
}

/// p50 / p90 / p99 of `v` (µs, rounded) and how many.
fn quantiles(v: &[f64]) -> Value {
    let mut d = v.to_vec();
    d.sort_by(f64::total_cmp);
    let q = |p: f64| super::sched::quantile(&d, p).map(f64::round);
    json!({ "holds": d.len(), "p50_us": q(0.50), "p90_us": q(0.90), "p99_us": q(0.99) })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two calls of one client on thread 7 (client fd 0x17, upstream fd 0x18, 20 ms provider),
    /// with a Redis reply (fd 0x13) and an EAGAIN read between them, as perf script prints them.
    const SCRIPT: &str = "\
    7 100.000000: syscalls:sys_enter_recvfrom: fd: 0x00000017, ubuf: 0x1, size: 0x00002000, flags: 0x00000000, addr: 0x00000000, addr_len: 0x00000000
    7 100.000010:  syscalls:sys_exit_recvfrom: 0x640
    7 100.000100:   syscalls:sys_enter_writev: fd: 0x00000018, vec: 0x1, vlen: 0x00000002
    7 100.000200: syscalls:sys_enter_recvfrom: fd: 0x00000013, ubuf: 0x1, size: 0x00002000, flags: 0x00000000, addr: 0x00000000, addr_len: 0x00000000
    7 100.000210:  syscalls:sys_exit_recvfrom: 0x5
    7 100.020100: syscalls:sys_enter_recvfrom: fd: 0x00000018, ubuf: 0x1, size: 0x00002000, flags: 0x00000000, addr: 0x00000000, addr_len: 0x00000000
    7 100.020110:  syscalls:sys_exit_recvfrom: 0x32e
    7 100.020190:   syscalls:sys_enter_writev: fd: 0x00000017, vec: 0x1, vlen: 0x00000002
    7 100.020300: syscalls:sys_enter_recvfrom: fd: 0x00000017, ubuf: 0x1, size: 0x00002000, flags: 0x00000000, addr: 0x00000000, addr_len: 0x00000000
    7 100.020305:  syscalls:sys_exit_recvfrom: 0xfffffffffffffff5
    7 100.020500: syscalls:sys_enter_recvfrom: fd: 0x00000017, ubuf: 0x1, size: 0x00002000, flags: 0x00000000, addr: 0x00000000, addr_len: 0x00000000
    7 100.020510:  syscalls:sys_exit_recvfrom: 0x640
    7 100.020600:   syscalls:sys_enter_writev: fd: 0x00000018, vec: 0x1, vlen: 0x00000002
    7 100.040600: syscalls:sys_enter_recvfrom: fd: 0x00000018, ubuf: 0x1, size: 0x00002000, flags: 0x00000000, addr: 0x00000000, addr_len: 0x00000000
    7 100.040610:  syscalls:sys_exit_recvfrom: 0x32e
    7 100.040680:   syscalls:sys_enter_writev: fd: 0x00000017, vec: 0x1, vlen: 0x00000002
";

    #[test]
    fn holds_are_paired_by_thread_and_fd_and_named_by_what_came_before() {
        let events = parse(SCRIPT);
        assert_eq!(events.len(), 16);
        assert_eq!(events[4], (7, 100.000210, Sys::RecvExit { ret: 5 }));
        assert_eq!(events[9], (7, 100.020305, Sys::RecvExit { ret: -11 }));
        let h = Holds::of(&events).expect("two directions");
        let round = |v: &[f64]| v.iter().map(|x| x.round()).collect::<Vec<_>>();
        // The Redis reply (fd 0x13) is followed by no write, the EAGAIN read is no data.
        assert_eq!(round(&h.request), vec![90.0, 90.0]);
        assert_eq!(round(&h.response), vec![80.0, 70.0]);
        let q = quantiles(&h.response);
        assert_eq!(
            (q["holds"].as_u64(), q["p50_us"].as_f64()),
            (Some(2), Some(80.0))
        );
    }

    #[test]
    fn one_direction_alone_is_an_error() {
        let one: String = SCRIPT.lines().take(3).map(|l| format!("{l}\n")).collect();
        let e = Holds::of(&parse(&one)).expect_err("one direction");
        assert!(e.to_string().contains("fewer than two"), "{e}");
    }
}
