//! The table of TLS connections keyed by (pid, SSL*): turns kernel chunk events into ordered
//! bytes plus gaps for each connection's [`Exchange`], with idle and memory bounds.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use ledger::provider::ProviderDetector;
use observer_common::{DIR_WRITE, SslEventHeader};

use crate::exchange::{End, Exchange, Outcome};
use crate::http1::Side;

/// Where a side is within the current SSL call's chunks.
#[derive(Debug, Default, Clone, Copy)]
struct Cursor {
    open: bool,
    next_offset: u32,
    captured_end: u32,
    truncated: u32,
}

#[derive(Debug)]
struct Conn {
    exchange: Option<Exchange>,
    req: Cursor,
    resp: Cursor,
    last_seen: Instant,
    /// Kernel timestamp of the connection's last event: what ends later is stamped after it.
    last_ts: u64,
}

/// What a connection produced when it ended outside a data event (closed, its process exited,
/// idle, evicted): the daemon records it under this connection's identity.
#[derive(Debug)]
pub struct Finished {
    /// Process.
    pub pid: u32,
    /// SSL object.
    pub ssl: u64,
    /// The connection's end: the close event's timestamp, else one past its last event's.
    pub ts_ns: u64,
    /// The outcome's place among those the end produced (event ids are built from both).
    pub seq: usize,
    /// What the connection's end produced.
    pub outcome: Outcome,
}

/// All tracked connections.
#[derive(Debug)]
pub struct Connections {
    conns: HashMap<(u32, u64), Conn>,
    max_connections: usize,
    max_bytes: usize,
    idle: Duration,
    finished: Vec<Finished>,
    scratch: Vec<Outcome>,
}

impl Connections {
    /// An empty table with its bounds.
    pub fn new(max_connections: usize, max_bytes: usize, idle: Duration) -> Connections {
        Connections {
            conns: HashMap::new(),
            max_connections,
            max_bytes,
            idle,
            finished: Vec::new(),
            scratch: Vec::new(),
        }
    }

    /// Outcomes of connections that ended since the last call (see [`Finished`]).
    pub fn take_finished(&mut self) -> Vec<Finished> {
        std::mem::take(&mut self.finished)
    }

    /// Ends a connection's exchange (`end` says how) and queues what it produced.
    fn end(
        &mut self,
        key: (u32, u64),
        mut conn: Conn,
        end: End,
        ts_ns: u64,
        det: &ProviderDetector,
    ) {
        let Some(ex) = conn.exchange.as_mut() else {
            return;
        };
        let mut out = std::mem::take(&mut self.scratch);
        ex.finish(end, det, &mut out);
        for (seq, outcome) in out.drain(..).enumerate() {
            self.finished.push(Finished {
                pid: key.0,
                ssl: key.1,
                ts_ns,
                seq,
                outcome,
            });
        }
        self.scratch = out;
    }

    /// Connections tracked.
    pub fn len(&self) -> usize {
        self.conns.len()
    }

    /// Handles one data event; outcomes are appended to `out`. Returns evictions made room for it.
    pub fn data(
        &mut self,
        h: &SslEventHeader,
        data: &[u8],
        det: &ProviderDetector,
        now: Instant,
        out: &mut Vec<Outcome>,
    ) -> usize {
        let key = (h.pid, h.ssl);
        let mut evicted = 0;
        if !self.conns.contains_key(&key) && self.conns.len() >= self.max_connections {
            evicted += self.evict_oldest(1, det);
        }
        let conn = self.conns.entry(key).or_insert_with(|| Conn {
            exchange: Some(Exchange::new()),
            req: Cursor::default(),
            resp: Cursor::default(),
            last_seen: now,
            last_ts: h.ts_ns,
        });
        conn.last_seen = now;
        conn.last_ts = conn.last_ts.max(h.ts_ns);
        let Some(ex) = conn.exchange.as_mut() else {
            return evicted;
        }; // ignored connection
        let (side, cursor) = if h.direction == DIR_WRITE {
            (Side::Request, &mut conn.req)
        } else {
            (Side::Response, &mut conn.resp)
        };
        if h.offset == 0 {
            if cursor.open {
                // The tail of the previous call never arrived (dropped in the kernel).
                let lost = u64::from(cursor.captured_end.saturating_sub(cursor.next_offset))
                    + u64::from(cursor.truncated);
                ex.gap(side, lost, det, out);
            }
            *cursor = Cursor {
                open: true,
                next_offset: 0,
                captured_end: h.total_len.saturating_sub(h.truncated),
                truncated: h.truncated,
            };
        } else if !cursor.open || h.offset != cursor.next_offset {
            let lost = if cursor.open {
                h.offset.saturating_sub(cursor.next_offset)
            } else {
                h.offset
            };
            ex.gap(side, u64::from(lost), det, out);
            cursor.open = true;
            cursor.captured_end = h.total_len.saturating_sub(h.truncated);
            cursor.truncated = h.truncated;
        }
        ex.feed(side, data, h.offset == 0, det, out);
        cursor.next_offset = h.offset + h.data_len;
        if cursor.next_offset >= cursor.captured_end {
            cursor.open = false;
            if cursor.truncated > 0 {
                ex.gap(side, u64::from(cursor.truncated), det, out);
            }
        }
        evicted
    }

    /// Stops tracking a connection's content (not LLM, or HTTP/2) while remembering it exists.
    pub fn ignore(&mut self, pid: u32, ssl: u64) {
        if let Some(c) = self.conns.get_mut(&(pid, ssl)) {
            c.exchange = None;
        }
    }

    /// The SSL object was freed (the close event's timestamp `ts_ns`): its exchange ends here.
    pub fn close(&mut self, pid: u32, ssl: u64, ts_ns: u64, det: &ProviderDetector) {
        if let Some(c) = self.conns.remove(&(pid, ssl)) {
            self.end((pid, ssl), c, End::ConnectionClosed, ts_ns, det);
        }
    }

    /// A process exited: its connections end.
    pub fn remove_pid(&mut self, pid: u32, det: &ProviderDetector) {
        let keys: Vec<_> = self
            .conns
            .keys()
            .filter(|(p, _)| *p == pid)
            .copied()
            .collect();
        for key in keys {
            if let Some(c) = self.conns.remove(&key) {
                let ts = c.last_ts.saturating_add(1);
                self.end(key, c, End::ProcessExit, ts, det);
            }
        }
    }

    /// Applies the idle timeout and the memory bounds; returns (idle, memory) evictions.
    pub fn sweep(&mut self, now: Instant, det: &ProviderDetector) -> (usize, usize) {
        let idle = self.idle;
        let stale: Vec<_> = self
            .conns
            .iter()
            .filter(|(_, c)| now.duration_since(c.last_seen) >= idle)
            .map(|(k, _)| *k)
            .collect();
        for key in &stale {
            if let Some(c) = self.conns.remove(key) {
                let ts = c.last_ts.saturating_add(1);
                self.end(*key, c, End::IdleTimeout, ts, det);
            }
        }
        let mut mem_evicted = 0;
        let mut total: usize = self.buffered();
        while total > self.max_bytes && !self.conns.is_empty() {
            mem_evicted += self.evict_oldest(1, det);
            total = self.buffered();
        }
        (stale.len(), mem_evicted)
    }

    /// Bytes buffered over all connections.
    pub fn buffered(&self) -> usize {
        self.conns
            .values()
            .filter_map(|c| c.exchange.as_ref())
            .map(Exchange::buffered)
            .sum()
    }

    fn evict_oldest(&mut self, n: usize, det: &ProviderDetector) -> usize {
        let mut evicted = 0;
        for _ in 0..n {
            let Some(key) = self
                .conns
                .iter()
                .min_by_key(|(_, c)| c.last_seen)
                .map(|(k, _)| *k)
            else {
                break;
            };
            if let Some(c) = self.conns.remove(&key) {
                let ts = c.last_ts.saturating_add(1);
                self.end(key, c, End::Evicted, ts, det);
            }
            evicted += 1;
        }
        evicted
    }
}

#[cfg(test)]
mod tests {
    use observer_common::{DIR_READ, KIND_DATA};

    use super::*;

    const HOST: &str = "127.0.0.1:8443";
    const BODY: &str = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#;
    const RESP_JSON: &str = r#"{"id":"c","object":"chat.completion","model":"gpt-4o-mini","choices":[],"usage":{"prompt_tokens":11,"completion_tokens":7,"total_tokens":18}}"#;

    fn det() -> ProviderDetector {
        ProviderDetector::new().with_host(HOST, "openai".parse().expect("kind"), "mock")
    }

    fn request() -> Vec<u8> {
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{BODY}",
            BODY.len()
        )
        .into_bytes()
    }

    fn response() -> Vec<u8> {
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{RESP_JSON}",
            RESP_JSON.len()
        )
        .into_bytes()
    }

    /// One SSL call's bytes as the kernel reports them (one event, nothing truncated).
    fn call(
        conns: &mut Connections,
        dir: u8,
        data: &[u8],
        det: &ProviderDetector,
        out: &mut Vec<Outcome>,
    ) {
        let h = SslEventHeader {
            ts_ns: 1,
            ssl: 0xabc,
            pid: 42,
            tid: 42,
            kind: KIND_DATA,
            direction: dir,
            total_len: u32::try_from(data.len()).expect("len"),
            data_len: u32::try_from(data.len()).expect("len"),
            ..SslEventHeader::default()
        };
        conns.data(&h, data, det, Instant::now(), out);
    }

    fn calls(out: &[Outcome]) -> usize {
        out.iter().filter(|o| matches!(o, Outcome::Call(_))).count()
    }

    fn table() -> Connections {
        Connections::new(16, 1 << 20, Duration::from_secs(60))
    }

    /// A client that was mid keep-alive session when the observer attached: the first bytes seen
    /// are the tail of a response body. The reassembler resynchronises on the next request that
    /// starts an SSL call and meters every later call; nothing is marked not-LLM.
    #[test]
    fn joins_mid_response_and_resyncs_at_the_next_request() {
        let d = det();
        let mut conns = table();
        let mut out = Vec::new();
        let resp = response();
        call(&mut conns, DIR_READ, &resp[resp.len() - 20..], &d, &mut out);
        for _ in 0..3 {
            call(&mut conns, DIR_WRITE, &request(), &d, &mut out);
            call(&mut conns, DIR_READ, &resp, &d, &mut out);
        }
        assert_eq!(calls(&out), 3, "{out:?}");
        assert!(!out.iter().any(|o| matches!(o, Outcome::NotLlm)), "{out:?}");
        assert!(
            out.iter().all(|o| matches!(
                o,
                Outcome::Call(_) | Outcome::ParseError("joined mid-connection")
            )),
            "{out:?}"
        );
        let Some(Outcome::Call(c)) = out.last() else {
            panic!("{out:?}")
        };
        let u = c.usage.expect("usage");
        assert_eq!((u.input_tokens, u.output_tokens), (11, 7));
    }

    /// The first bytes seen are a request body whose head was written before the probes were
    /// attached: that call is lost (its response pairs with nothing) but the next ones are metered.
    #[test]
    fn joins_mid_request_body_and_resyncs() {
        let d = det();
        let mut conns = table();
        let mut out = Vec::new();
        call(&mut conns, DIR_WRITE, BODY.as_bytes(), &d, &mut out);
        call(&mut conns, DIR_READ, &response(), &d, &mut out);
        assert_eq!(calls(&out), 0, "{out:?}");
        for _ in 0..2 {
            call(&mut conns, DIR_WRITE, &request(), &d, &mut out);
            call(&mut conns, DIR_READ, &response(), &d, &mut out);
        }
        assert_eq!(calls(&out), 2, "{out:?}");
        assert!(!out.iter().any(|o| matches!(o, Outcome::NotLlm)), "{out:?}");
    }

    /// A call whose first chunk was dropped in the kernel (first event at offset > 0) is a gap:
    /// the connection resynchronises and the following calls are metered.
    #[test]
    fn first_event_mid_call_is_a_gap_then_resync() {
        let d = det();
        let mut conns = table();
        let mut out = Vec::new();
        let req = request();
        let h = SslEventHeader {
            ssl: 0xabc,
            pid: 42,
            kind: KIND_DATA,
            direction: DIR_WRITE,
            total_len: u32::try_from(req.len()).expect("len"),
            offset: 10,
            data_len: u32::try_from(req.len() - 10).expect("len"),
            ..SslEventHeader::default()
        };
        conns.data(&h, &req[10..], &d, Instant::now(), &mut out);
        call(&mut conns, DIR_READ, &response(), &d, &mut out);
        call(&mut conns, DIR_WRITE, &req, &d, &mut out);
        call(&mut conns, DIR_READ, &response(), &d, &mut out);
        assert_eq!(calls(&out), 1, "{out:?}");
    }
}
