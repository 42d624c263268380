//! The audit trail's read side: records of a time range, across tenants, in time order, with
//! bounded memory ([`AuditReader`]), and pages with a resumable cursor ([`Ledger::audit_page`]).
//!
//! Records live in one stream per tenant and UTC day (`llmw:{T}:audit:<day>`); the tenants of a
//! day come from `llmw:tenants:<day>`, which every writer of an audit record fills first. A
//! reader walks the days of the range and, within a day, merges the tenants' streams by
//! (stream id, tenant), reading each stream in chunks.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};

use chrono::{DateTime, Duration, Utc};
use serde::Serialize;

use super::{Ledger, Period, from_ms, keys};
use crate::Error;

/// One audit record, as exported (docs/audit.md lists every field). Amounts are integer nano-USD.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct AuditRecord {
    /// The stream entry id (`<unix ms>-<seq>`): unique within the tenant-day stream.
    pub id: String,
    /// Commit time (the entry id's milliseconds), RFC 3339 UTC.
    pub at: String,
    /// Schema version.
    pub v: String,
    /// `settle`, `record`, `deny`, `release` or `estimate`.
    pub kind: String,
    /// `enforcer`, `observer` or `unmetered`.
    pub path: String,
    /// The enforcer's request id, or the observer's event id.
    pub request_id: String,
    /// The tenant.
    pub tenant: String,
    /// The feature, or empty.
    pub feature: String,
    /// The session, or empty.
    pub session: String,
    /// The observer's service, or empty.
    pub service: String,
    /// The calling process id (observer), or empty.
    pub pid: String,
    /// The calling process's command (observer), or empty.
    pub comm: String,
    /// The enforcer instance that held the call (abandoned holds), or empty.
    pub instance: String,
    /// The provider, or empty.
    pub provider: String,
    /// The API, or empty.
    pub api: String,
    /// The model, or empty.
    pub model: String,
    /// Input tokens at the plain input rate.
    pub input_tokens: u64,
    /// Output tokens, reasoning included.
    pub output_tokens: u64,
    /// Cached input tokens read.
    pub cache_read_tokens: u64,
    /// Cache-write tokens.
    pub cache_write_tokens: u64,
    /// What this record added to spend.
    pub cost_nusd: i64,
    /// An earlier estimate this record took back out of spend (a late settle or release of an
    /// abandoned hold), else 0. Spend = Σ `cost_nusd` − Σ `reversed_nusd`.
    pub reversed_nusd: i64,
    /// The amount held for the call (denials, releases, estimates), else 0.
    pub reserved_nusd: i64,
    /// The cost is an estimate.
    pub estimated: bool,
    /// The call bypassed the enforcer (observer).
    pub bypass: bool,
    /// `ok`, `cut`, `denied`, `released` or `abandoned`.
    pub outcome: String,
    /// A denial's cap: `tenant/day`, `tenant/month`, `feature/day`, `feature/month`, `session`.
    pub scope: String,
    /// A denial's cap limit, else 0.
    pub limit_nusd: i64,
    /// A denial's committed spend under the cap, else 0.
    pub spent_nusd: i64,
    /// A denial's held spend under the cap, else 0.
    pub held_nusd: i64,
    /// The call's duration in ms as its writer measured it, or empty.
    pub latency_ms: String,
    /// When the call started (unix ms), or empty.
    pub started_ms: String,
    /// `unmetered`: the provider host of the connection.
    pub host: String,
    /// `unmetered`: TCP payload bytes sent.
    pub bytes_out: u64,
    /// `unmetered`: TCP payload bytes received.
    pub bytes_in: u64,
}

/// The CSV columns, in order (the [`AuditRecord`] fields).
pub const AUDIT_COLUMNS: [&str; 35] = [
    "id",
    "at",
    "v",
    "kind",
    "path",
    "request_id",
    "tenant",
    "feature",
    "session",
    "service",
    "pid",
    "comm",
    "instance",
    "provider",
    "api",
    "model",
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "cost_nusd",
    "reversed_nusd",
    "reserved_nusd",
    "estimated",
    "bypass",
    "outcome",
    "scope",
    "limit_nusd",
    "spent_nusd",
    "held_nusd",
    "latency_ms",
    "started_ms",
    "host",
    "bytes_out",
    "bytes_in",
];

impl AuditRecord {
    fn from_entry(id: String, fields: HashMap<String, String>) -> AuditRecord {
        let s = |k: &str| fields.get(k).cloned().unwrap_or_default();
        let u = |k: &str| fields.get(k).and_then(|v| v.parse().ok()).unwrap_or(0u64);
        let i = |k: &str| fields.get(k).and_then(|v| v.parse().ok()).unwrap_or(0i64);
        let b = |k: &str| fields.get(k).is_some_and(|v| v == "1");
        let ms: i64 = id
            .split('-')
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        AuditRecord {
            at: from_ms(ms).to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            id,
            v: s("v"),
            kind: s("kind"),
            path: s("path"),
            request_id: s("request_id"),
            tenant: s("tenant"),
            feature: s("feature"),
            session: s("session"),
            service: s("service"),
            pid: s("pid"),
            comm: s("comm"),
            instance: s("instance"),
            provider: s("provider"),
            api: s("api"),
            model: s("model"),
            input_tokens: u("input_tokens"),
            output_tokens: u("output_tokens"),
            cache_read_tokens: u("cache_read_tokens"),
            cache_write_tokens: u("cache_write_tokens"),
            cost_nusd: i("cost_nusd"),
            reversed_nusd: i("reversed_nusd"),
            reserved_nusd: i("reserved_nusd"),
            estimated: b("estimated"),
            bypass: b("bypass"),
            outcome: s("outcome"),
            scope: s("scope"),
            limit_nusd: i("limit_nusd"),
            spent_nusd: i("spent_nusd"),
            held_nusd: i("held_nusd"),
            latency_ms: s("latency_ms"),
            started_ms: s("started_ms"),
            host: s("host"),
            bytes_out: u("bytes_out"),
            bytes_in: u("bytes_in"),
        }
    }

    /// The record's CSV values, in [`AUDIT_COLUMNS`] order.
    #[must_use]
    pub fn csv_row(&self) -> Vec<String> {
        let b = |v: bool| if v { "1" } else { "0" }.to_owned();
        vec![
            self.id.clone(),
            self.at.clone(),
            self.v.clone(),
            self.kind.clone(),
            self.path.clone(),
            self.request_id.clone(),
            self.tenant.clone(),
            self.feature.clone(),
            self.session.clone(),
            self.service.clone(),
            self.pid.clone(),
            self.comm.clone(),
            self.instance.clone(),
            self.provider.clone(),
            self.api.clone(),
            self.model.clone(),
            self.input_tokens.to_string(),
            self.output_tokens.to_string(),
            self.cache_read_tokens.to_string(),
            self.cache_write_tokens.to_string(),
            self.cost_nusd.to_string(),
            self.reversed_nusd.to_string(),
            self.reserved_nusd.to_string(),
            b(self.estimated),
            b(self.bypass),
            self.outcome.clone(),
            self.scope.clone(),
            self.limit_nusd.to_string(),
            self.spent_nusd.to_string(),
            self.held_nusd.to_string(),
            self.latency_ms.clone(),
            self.started_ms.clone(),
            self.host.clone(),
            self.bytes_out.to_string(),
            self.bytes_in.to_string(),
        ]
    }

    /// The stream id as (ms, seq), for ordering.
    fn order(&self) -> (u64, u64) {
        parse_id(&self.id)
    }
}

fn parse_id(id: &str) -> (u64, u64) {
    let mut it = id.splitn(2, '-');
    let ms = it.next().and_then(|v| v.parse().ok()).unwrap_or(0);
    let seq = it.next().and_then(|v| v.parse().ok()).unwrap_or(0);
    (ms, seq)
}

/// Which records to read: `[since, until)` by commit time, optionally one tenant and one path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditQuery {
    /// First commit time included.
    pub since: DateTime<Utc>,
    /// First commit time excluded.
    pub until: DateTime<Utc>,
    /// Only this tenant.
    pub tenant: Option<String>,
    /// Only this path (`enforcer`, `observer`, `unmetered`).
    pub path: Option<String>,
}

/// Where a page ended: the last record's stream id and tenant (`<ms>-<seq>.<tenant>`); the next
/// page starts after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditCursor {
    id: (u64, u64),
    tenant: String,
}

impl AuditCursor {
    /// Parses a cursor given back by [`Ledger::audit_page`].
    ///
    /// # Errors
    /// [`Error::Invalid`] when `s` is not one.
    pub fn parse(s: &str) -> Result<AuditCursor, Error> {
        let bad = || Error::Invalid {
            what: "cursor",
            detail: format!("{s:?} is not a cursor from a previous page"),
        };
        let (id, tenant) = s.split_once('.').ok_or_else(bad)?;
        let (ms, seq) = id.split_once('-').ok_or_else(bad)?;
        keys::validate_tenant(tenant).map_err(|_| bad())?;
        Ok(AuditCursor {
            id: (
                ms.parse().map_err(|_| bad())?,
                seq.parse().map_err(|_| bad())?,
            ),
            tenant: tenant.to_owned(),
        })
    }
}

impl std::fmt::Display for AuditCursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}.{}", self.id.0, self.id.1, self.tenant)
    }
}

/// Entries read per stream per round trip, at most; with many tenants, fewer (the reader holds at
/// most about [`BUFFERED`] records at once).
const CHUNK: usize = 500;
/// Records a reader buffers over all of a day's streams, roughly.
const BUFFERED: usize = 20_000;

/// One tenant-day stream being read.
struct Lane {
    key: String,
    /// The next XRANGE start ("(<id>" exclusive once something was read).
    next: String,
    buf: VecDeque<AuditRecord>,
    done: bool,
}

/// A lane's first record in the merge: its (stream id, tenant) and the lane's index.
type Head = ((u64, u64), String, usize);

/// Reads records in time order (commit time, then tenant), a day at a time, with bounded memory.
pub struct AuditReader {
    ledger: Ledger,
    q: AuditQuery,
    after: Option<AuditCursor>,
    /// The day being read, and the days left.
    day: Option<DateTime<Utc>>,
    lanes: Vec<Lane>,
    heap: BinaryHeap<Reverse<Head>>,
    chunk: usize,
    started: bool,
}

impl AuditReader {
    fn end_id(&self) -> String {
        format!(
            "{}",
            self.q.until.timestamp_millis().saturating_sub(1).max(0)
        )
    }

    /// Opens the next day with streams; false when the range is done.
    async fn open_day(&mut self) -> Result<bool, Error> {
        loop {
            let day = match self.day {
                None if !self.started => {
                    self.started = true;
                    Period::Day.start(self.q.since)
                }
                None => return Ok(false),
                Some(d) => d + Duration::days(1),
            };
            if day >= self.q.until {
                self.day = None;
                return Ok(false);
            }
            self.day = Some(day);
            let id = Period::Day.id(day);
            let mut tenants = match &self.q.tenant {
                Some(t) => vec![t.clone()],
                None => self.ledger.active_tenants(Period::Day, day).await?,
            };
            tenants.sort();
            if tenants.is_empty() {
                continue;
            }
            self.chunk = (BUFFERED / tenants.len()).clamp(16, CHUNK);
            let since = self.q.since.timestamp_millis().max(0);
            self.lanes = tenants
                .iter()
                .map(|t| {
                    let next = match &self.after {
                        // Resume after the cursor: ids equal to its id follow only in the
                        // tenants that sort after its tenant.
                        Some(c) if *t <= c.tenant => format!("({}-{}", c.id.0, c.id.1),
                        Some(c) => format!("{}-{}", c.id.0, c.id.1),
                        None => since.to_string(),
                    };
                    Lane {
                        key: keys::audit(t, &id),
                        next,
                        buf: VecDeque::new(),
                        done: false,
                    }
                })
                .collect();
            self.heap.clear();
            for i in 0..self.lanes.len() {
                self.fill(i).await?;
                self.push(i);
            }
            if !self.heap.is_empty() {
                return Ok(true);
            }
        }
    }

    /// Reads the lane's next chunk when its buffer is empty.
    async fn fill(&mut self, i: usize) -> Result<(), Error> {
        let end = self.end_id();
        let chunk = self.chunk;
        let lane = &mut self.lanes[i];
        if !lane.buf.is_empty() || lane.done {
            return Ok(());
        }
        let mut c = self.ledger.conn.clone();
        let key = lane.key.clone();
        let start = lane.next.clone();
        let entries: Vec<(String, HashMap<String, String>)> = self
            .ledger
            .timed("audit read", async move {
                Ok(super::conn::xrange(&mut c, &key, &start, &end, chunk).await?)
            })
            .await?;
        let lane = &mut self.lanes[i];
        if entries.len() < chunk {
            lane.done = true;
        }
        if let Some((last, _)) = entries.last() {
            lane.next = format!("({last}");
        }
        for (id, map) in entries {
            lane.buf.push_back(AuditRecord::from_entry(id, map));
        }
        Ok(())
    }

    fn push(&mut self, i: usize) {
        if let Some(r) = self.lanes[i].buf.front() {
            self.heap.push(Reverse((r.order(), r.tenant.clone(), i)));
        }
    }

    /// The next record, or `None` when the range is done.
    ///
    /// # Errors
    /// [`Error::Redis`] when Redis is unavailable.
    pub async fn next(&mut self) -> Result<Option<AuditRecord>, Error> {
        loop {
            if self.heap.is_empty() && !self.open_day().await? {
                return Ok(None);
            }
            let Some(Reverse((_, _, i))) = self.heap.pop() else {
                continue;
            };
            let Some(rec) = self.lanes[i].buf.pop_front() else {
                continue;
            };
            self.fill(i).await?;
            self.push(i);
            if let Some(p) = &self.q.path
                && *p != rec.path
            {
                continue;
            }
            return Ok(Some(rec));
        }
    }
}

impl Ledger {
    /// A reader of the records of `q`, in time order (see [`AuditReader`]).
    ///
    /// # Errors
    /// [`Error::Invalid`] for a bad tenant or an empty range.
    pub fn audit_reader(&self, q: AuditQuery) -> Result<AuditReader, Error> {
        self.audit_reader_after(q, None)
    }

    fn audit_reader_after(
        &self,
        q: AuditQuery,
        after: Option<AuditCursor>,
    ) -> Result<AuditReader, Error> {
        if let Some(t) = &q.tenant {
            keys::validate_tenant(t)?;
        }
        if q.until <= q.since {
            return Err(Error::Invalid {
                what: "until",
                detail: "must be after since".into(),
            });
        }
        let mut q = q;
        if let Some(c) = &after {
            // The cursor's day is where reading resumes.
            let at = from_ms(i64::try_from(c.id.0).unwrap_or(i64::MAX));
            if at > q.since {
                q.since = Period::Day.start(at).max(q.since);
            }
        }
        Ok(AuditReader {
            ledger: self.clone(),
            q,
            after,
            day: None,
            lanes: Vec::new(),
            heap: BinaryHeap::new(),
            chunk: CHUNK,
            started: false,
        })
    }

    /// Up to `limit` records of `q` after `cursor` (a previous page's), in time order, and the
    /// cursor of the next page when there may be more.
    ///
    /// # Errors
    /// As [`Ledger::audit_reader`]; [`Error::Redis`] when Redis is unavailable.
    pub async fn audit_page(
        &self,
        q: AuditQuery,
        cursor: Option<AuditCursor>,
        limit: usize,
    ) -> Result<(Vec<AuditRecord>, Option<AuditCursor>), Error> {
        let mut r = self.audit_reader_after(q, cursor)?;
        let mut out = Vec::with_capacity(limit.min(1000));
        while out.len() < limit {
            match r.next().await? {
                Some(rec) => out.push(rec),
                None => return Ok((out, None)),
            }
        }
        let next = out.last().map(|rec| AuditCursor {
            id: rec.order(),
            tenant: rec.tenant.clone(),
        });
        Ok((out, next))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_round_trip() {
        let c = AuditCursor::parse("1764000000000-3.acme").unwrap();
        assert_eq!(c.to_string(), "1764000000000-3.acme");
        assert!(AuditCursor::parse("x.acme").is_err());
        assert!(AuditCursor::parse("1-2.a{b").is_err());
    }

    #[test]
    fn record_from_entry() {
        let mut m = HashMap::new();
        m.insert("cost_nusd".to_owned(), "1500".to_owned());
        m.insert("estimated".to_owned(), "1".to_owned());
        m.insert("tenant".to_owned(), "acme".to_owned());
        let r = AuditRecord::from_entry("1764000000123-0".into(), m);
        assert_eq!(r.cost_nusd, 1500);
        assert!(r.estimated);
        assert_eq!(r.at, "2025-11-24T16:00:00.123Z");
        assert_eq!(r.csv_row().len(), AUDIT_COLUMNS.len());
    }
}
