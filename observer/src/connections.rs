//! The table of TLS connections keyed by (pid, SSL*): turns kernel chunk events into ordered
//! bytes plus gaps for each connection's [`Exchange`], with idle and memory bounds.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use ledger::provider::ProviderDetector;
use observer_common::{DIR_WRITE, SslEventHeader};

use crate::exchange::{Exchange, Outcome};
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
}

/// All tracked connections.
#[derive(Debug)]
pub struct Connections {
    conns: HashMap<(u32, u64), Conn>,
    max_connections: usize,
    max_bytes: usize,
    idle: Duration,
}

impl Connections {
    /// An empty table with its bounds.
    pub fn new(max_connections: usize, max_bytes: usize, idle: Duration) -> Connections {
        Connections {
            conns: HashMap::new(),
            max_connections,
            max_bytes,
            idle,
        }
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
            evicted += self.evict_oldest(1);
        }
        let conn = self.conns.entry(key).or_insert_with(|| Conn {
            exchange: Some(Exchange::new()),
            req: Cursor::default(),
            resp: Cursor::default(),
            last_seen: now,
        });
        conn.last_seen = now;
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

    /// The SSL object was freed.
    pub fn close(&mut self, pid: u32, ssl: u64, det: &ProviderDetector, out: &mut Vec<Outcome>) {
        if let Some(mut c) = self.conns.remove(&(pid, ssl))
            && let Some(ex) = c.exchange.as_mut()
        {
            ex.close(det, out);
        }
    }

    /// A process exited: drop all its connections.
    pub fn remove_pid(&mut self, pid: u32) {
        self.conns.retain(|(p, _), _| *p != pid);
    }

    /// Applies the idle timeout and the memory bounds; returns (idle, memory) evictions.
    pub fn sweep(&mut self, now: Instant) -> (usize, usize) {
        let before = self.conns.len();
        let idle = self.idle;
        self.conns
            .retain(|_, c| now.duration_since(c.last_seen) < idle);
        let idle_evicted = before - self.conns.len();
        let mut mem_evicted = 0;
        let mut total: usize = self.buffered();
        while total > self.max_bytes && !self.conns.is_empty() {
            mem_evicted += self.evict_oldest(1);
            total = self.buffered();
        }
        (idle_evicted, mem_evicted)
    }

    /// Bytes buffered over all connections.
    pub fn buffered(&self) -> usize {
        self.conns
            .values()
            .filter_map(|c| c.exchange.as_ref())
            .map(Exchange::buffered)
            .sum()
    }

    fn evict_oldest(&mut self, n: usize) -> usize {
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
            self.conns.remove(&key);
            evicted += 1;
        }
        evicted
    }
}
