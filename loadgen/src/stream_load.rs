//! Streaming load: many concurrent SSE streams, timing the first event (time to first token) and
//! the gap between consecutive events as the client receives them.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use serde::{Deserialize, Serialize};

use crate::latency::{Latencies, Summary};
use crate::target::{HttpClient, Target, error_label};

/// One streaming run: `streams` concurrent streams, repeated `rounds` times.
#[derive(Debug, Clone)]
pub struct StreamRun {
    /// The streaming request (its body asks for `"stream": true`).
    pub target: Target,
    /// Concurrent streams per round.
    pub streams: usize,
    /// Rounds; the first one warms connections and is not recorded when there are more.
    pub rounds: usize,
    /// Stream starts are spread evenly over this window (a thundering herd is not what apps do).
    pub ramp: Duration,
    /// A stream taking longer counts as a `timeout` error.
    pub timeout: Duration,
}

/// What a streaming run measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StreamReport {
    /// Streams recorded.
    pub streams: u64,
    /// Streams that ended cleanly.
    pub ok: u64,
    /// Failures by label.
    pub errors: BTreeMap<String, u64>,
    /// SSE events per successful stream, mean.
    pub events_per_stream: f64,
    /// From sending the request to the first SSE event.
    pub ttft_us: Summary,
    /// Between consecutive SSE events of one stream.
    pub gap_us: Summary,
}

#[derive(Default)]
struct Tally {
    ttft: Latencies,
    gaps: Latencies,
    streams: u64,
    ok: u64,
    events: u64,
    errors: BTreeMap<String, u64>,
}

/// Runs the streams on the current runtime.
pub async fn run(client: &HttpClient, run: &StreamRun) -> StreamReport {
    let tally = Arc::new(Mutex::new(Tally::default()));
    for round in 0..run.rounds.max(1) {
        let record = run.rounds <= 1 || round > 0;
        let mut tasks = Vec::with_capacity(run.streams);
        let step = run.ramp / u32::try_from(run.streams.max(1)).unwrap_or(u32::MAX);
        let t0 = Instant::now();
        for i in 0..run.streams {
            let (client, target, tally, timeout) = (
                client.clone(),
                run.target.clone(),
                Arc::clone(&tally),
                run.timeout,
            );
            let start_at = t0 + step * u32::try_from(i).unwrap_or(u32::MAX);
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep_until(start_at.into()).await;
                let res = tokio::time::timeout(timeout, one_stream(&client, &target))
                    .await
                    .unwrap_or_else(|_| Err("timeout".to_owned()));
                if record {
                    let mut t = tally.lock().expect("tally lock");
                    t.streams += 1;
                    match res {
                        Ok(s) => {
                            t.ok += 1;
                            t.events += s.events;
                            t.ttft.merge(&s.ttft);
                            t.gaps.merge(&s.gaps);
                        }
                        Err(e) => *t.errors.entry(e).or_default() += 1,
                    }
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
    }
    let t = tally.lock().expect("tally lock");
    StreamReport {
        streams: t.streams,
        ok: t.ok,
        errors: t.errors.clone(),
        events_per_stream: if t.ok == 0 {
            0.0
        } else {
            t.events as f64 / t.ok as f64
        },
        ttft_us: t.ttft.summary(),
        gap_us: t.gaps.summary(),
    }
}

struct OneStream {
    ttft: Latencies,
    gaps: Latencies,
    events: u64,
}

async fn one_stream(client: &HttpClient, target: &Target) -> Result<OneStream, String> {
    let sent = Instant::now();
    let resp = client
        .request(target.request())
        .await
        .map_err(|e| error_label(&e))?;
    if !resp.status().is_success() {
        return Err(format!("status_{}", resp.status().as_u16()));
    }
    let mut body = resp.into_body();
    let mut framer = EventFramer::default();
    let mut out = OneStream {
        ttft: Latencies::new(),
        gaps: Latencies::new(),
        events: 0,
    };
    let mut last: Option<Instant> = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|_| "body".to_owned())?;
        let Some(data) = frame.data_ref() else {
            continue;
        };
        let now = Instant::now();
        for _ in 0..framer.feed(data) {
            match last {
                None => out.ttft.record(now - sent),
                Some(prev) => out.gaps.record(now - prev),
            }
            last = Some(now);
            out.events += 1;
        }
    }
    if out.events == 0 {
        return Err("no_events".to_owned());
    }
    Ok(out)
}

/// Counts complete SSE events (blank-line terminated, LF or CRLF) in a byte stream split anywhere.
#[derive(Debug, Default)]
pub struct EventFramer {
    /// Bytes since the last line break, ignoring `\r` (0 means the last line was empty).
    line_len: usize,
    /// Whether the current event has any content line yet.
    in_event: bool,
}

impl EventFramer {
    /// Feeds bytes; returns how many events they completed.
    pub fn feed(&mut self, data: &[u8]) -> usize {
        let mut n = 0;
        for &b in data {
            match b {
                b'\n' => {
                    if self.line_len == 0 {
                        if self.in_event {
                            n += 1;
                            self.in_event = false;
                        }
                    } else {
                        self.in_event = true;
                    }
                    self.line_len = 0;
                }
                b'\r' => {}
                _ => self.line_len += 1,
            }
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::EventFramer;

    #[test]
    fn counts_events_split_anywhere() {
        let text =
            b"data: {\"a\":1}\n\ndata: x\r\n\r\n: comment\n\nevent: e\ndata: y\n\ndata: [DONE]\n\n";
        let mut whole = EventFramer::default();
        assert_eq!(whole.feed(text), 5);
        for cut in 0..text.len() {
            let mut f = EventFramer::default();
            assert_eq!(
                f.feed(&text[..cut]) + f.feed(&text[cut..]),
                5,
                "cut at {cut}"
            );
        }
    }
}
