//! The audit trail's write side: the arguments every money-moving script takes to append one
//! record per call to the tenant's stream of the day (`llmw:{T}:audit:<day>`, lua/common.lua
//! `audit_add`). The record schema is a stable interface, documented in docs/audit.md.

use chrono::{DateTime, Utc};

use redis::ToRedisArgs;

use super::scripts::{Args, ScriptCall};
use super::{
    CallMeta, LedgerConfig, Period, ReserveRequest, Settlement, UnmeteredConn, UsageRecord, ms,
};

/// Schema version of the records (field `v`).
pub const AUDIT_VERSION: &str = "1";

/// Appends the trailing arguments every script reads from the end of ARGV: the alert budgets
/// (`caps`, 4 values each, see alerts.rs), their count, the alert thresholds ("50,80,100", ''
/// when off), then the audit day id ('' when the audit is off), the audit stream's absolute expiry
/// (unix s) and its MAXLEN (0 = none).
pub(crate) fn tail(inv: &mut ScriptCall, cfg: &LedgerConfig, now: DateTime<Utc>, caps: &[String]) {
    for c in caps {
        inv.arg(c);
    }
    inv.arg(caps.len() / 4)
        .arg_fmt(Thresholds(&cfg.alert_thresholds_pct));
    if cfg.audit {
        let (exp, max) = audit_expiry(cfg, now);
        inv.arg_fmt(Period::Day.id_of(now)).arg(exp).arg(max);
    } else {
        inv.arg("").arg(0).arg(0);
    }
}

/// The same tail for a script that writes no audit record and checks no alert: the spare holds
/// of a lease pool (lease.rs) are no call's, and a call's own settle records what it spent.
pub(crate) fn tail_off(inv: &mut ScriptCall) {
    inv.arg(0).arg("").arg("").arg(0).arg(0);
}

/// The alert thresholds as the scripts read them: positive ones, ascending, each once, joined by
/// commas ("50,80,100"; "" when none). Written straight into the call's buffer.
struct Thresholds<'a>(&'a [u32]);

impl std::fmt::Display for Thresholds<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The next larger threshold each time: sorted and without repeats, no allocation (the
        // list is a handful of numbers).
        let mut last = 0;
        while let Some(p) = self.0.iter().copied().filter(|&p| p > last).min() {
            if last > 0 {
                f.write_str(",")?;
            }
            write!(f, "{p}")?;
            last = p;
        }
        Ok(())
    }
}

/// The audit stream's absolute expiry (unix s: the end of `now`'s day plus the retention) and
/// its MAXLEN (0 = none).
fn audit_expiry(cfg: &LedgerConfig, now: DateTime<Utc>) -> (i64, u64) {
    let retention = chrono::Duration::from_std(cfg.audit_retention)
        .unwrap_or_else(|_| chrono::Duration::days(90));
    (
        (Period::Day.reset_at(now) + retention).timestamp(),
        cfg.audit_max_per_day,
    )
}

/// Text stored in a record: control characters dropped, at most 128 bytes (on a char boundary).
/// Borrowed when `s` is already that (the usual case: service and host names).
fn clean(s: &str) -> std::borrow::Cow<'_, str> {
    if s.len() <= 128 && !s.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len().min(128));
    for c in s.chars().filter(|c| !c.is_control()) {
        if out.len() + c.len_utf8() > 128 {
            break;
        }
        out.push(c);
    }
    std::borrow::Cow::Owned(out)
}

/// A record's field, value list written at the end of a script's arguments; [`Fields::finish`]
/// puts the count the scripts read first before it.
struct Fields<'a> {
    out: &'a mut Args,
    /// Where the list starts in `out`.
    at: usize,
}

impl<'a> Fields<'a> {
    /// A list without the version and kind (a denial's, completed by the scripts).
    fn start(out: &'a mut Args) -> Fields<'a> {
        let at = out.len();
        Fields { out, at }
    }

    fn new(out: &'a mut Args, kind: &str) -> Fields<'a> {
        let mut f = Fields::start(out);
        f.put("v", AUDIT_VERSION);
        f.put("kind", kind);
        f
    }

    /// A field and its value (integers in decimal).
    fn put(&mut self, k: &str, v: impl ToRedisArgs) {
        self.out.push(k).push(v);
    }

    /// A field only when it has a value (an absent field reads as empty: fewer bytes per record).
    fn opt(&mut self, k: &str, v: Option<&str>) {
        if let Some(v) = v.map(clean).filter(|v| !v.is_empty()) {
            self.put(k, v);
        }
    }

    fn meta(&mut self, m: &CallMeta) {
        self.opt("api", m.api.as_deref());
        if let Some(l) = m.latency_ms {
            self.put("latency_ms", l);
        }
        if let Some(s) = &m.service {
            self.put("service", clean(s));
        }
        if let Some(p) = m.pid {
            self.put("pid", p);
        }
        if let Some(c) = &m.comm {
            self.put("comm", clean(c));
        }
    }

    /// Puts the value count before the fields.
    fn finish(self) {
        self.out.insert_count(self.at);
    }
}

/// Appends the record of a settle (count first): the script adds `reversed_nusd` when it
/// replaces an abandoned hold's estimate.
pub(crate) fn settle_fields(s: &Settlement, out: &mut Args) {
    let m = &s.meta;
    let mut f = Fields::new(out, "settle");
    f.put("path", m.path.as_deref().map_or("enforcer".into(), clean));
    f.put("request_id", &s.request_id);
    f.put("tenant", &s.tenant);
    f.opt("feature", s.feature.as_deref());
    f.opt("session", s.session.as_deref());
    f.opt("provider", m.provider.as_deref());
    f.opt("model", s.model.as_deref());
    usage(&mut f, s.cost.0, s.tokens, s.estimated, false);
    f.put(
        "outcome",
        m.outcome.as_deref().map_or_else(
            || {
                if s.estimated {
                    "cut".into()
                } else {
                    "ok".into()
                }
            },
            clean,
        ),
    );
    f.put("started_ms", ms(s.started_at));
    f.meta(m);
    f.finish();
}

/// Appends the record of an observer record (count first).
pub(crate) fn record_fields(r: &UsageRecord, out: &mut Args) {
    let m = &r.meta;
    let mut f = Fields::new(out, "record");
    f.put("path", m.path.as_deref().map_or("observer".into(), clean));
    f.put("request_id", &r.event_id);
    f.put("tenant", &r.tenant);
    f.opt("feature", r.feature.as_deref());
    f.opt("session", r.session.as_deref());
    f.opt("provider", Some(&r.provider));
    f.opt("model", r.model.as_deref());
    usage(&mut f, r.cost.0, r.tokens, r.estimated, r.bypass);
    f.put("outcome", m.outcome.as_deref().map_or("ok".into(), clean));
    f.put("started_ms", ms(r.at));
    f.meta(m);
    f.finish();
}

/// Appends the record of an unmetered connection (count first): a provider connection that
/// carried no call the observer could decode. It adds nothing to spend (`cost_nusd` 0); its
/// bytes are a rough size of what nobody could price.
pub(crate) fn unmetered_fields(c: &UnmeteredConn, out: &mut Args) {
    let mut f = Fields::new(out, "unmetered");
    f.put("path", "unmetered");
    f.put("request_id", &c.conn_id);
    f.put("tenant", &c.tenant);
    f.put("service", clean(&c.service));
    f.put("pid", c.pid);
    f.put("comm", clean(&c.comm));
    f.put("provider", &c.provider);
    f.put("host", clean(&c.host));
    f.put("bytes_out", c.bytes_out);
    f.put("bytes_in", c.bytes_in);
    f.put("cost_nusd", "0");
    f.put("bypass", "1");
    f.put("outcome", "unmetered");
    f.put("latency_ms", c.duration_ms);
    f.put("started_ms", ms(c.started_at));
    f.finish();
}

/// Appends what a denial's record takes from the caller (count first): the path and the
/// provider. The scripts add the rest from the reserve's own arguments (lua/common.lua
/// `deny_context`: request id, tenant, feature, session, model, reserved amount, start) and, when
/// a cap or a rate limit refuses, the kind, outcome, cost, scope, limit, spent and held. A
/// reserve that is admitted, the common case, so sends 5 values it does not use instead of
/// about 20.
pub(crate) fn deny_fields(r: &ReserveRequest, out: &mut Args) {
    let mut f = Fields::start(out);
    f.put("path", "enforcer");
    f.opt("provider", Some(&r.provider));
    f.finish();
}

fn usage(f: &mut Fields, cost: i64, t: super::TokenCounts, estimated: bool, bypass: bool) {
    f.put("input_tokens", t.input);
    f.put("output_tokens", t.output);
    // Cache tokens and flags only when set (absent reads as 0).
    if t.cache_read > 0 {
        f.put("cache_read_tokens", t.cache_read);
    }
    if t.cache_write > 0 {
        f.put("cache_write_tokens", t.cache_write);
    }
    f.put("cost_nusd", cost);
    if estimated {
        f.put("estimated", "1");
    }
    if bypass {
        f.put("bypass", "1");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_cuts_and_strips() {
        assert_eq!(clean("a\nb\u{7}c"), "abc");
        assert!(matches!(
            clean("svc-a"),
            std::borrow::Cow::Borrowed("svc-a")
        ));
        let exact = "x".repeat(128);
        assert_eq!(clean(&exact), exact.as_str());
        assert_eq!(clean(&"x".repeat(129)).len(), 128);
        let long = "é".repeat(100);
        let c = clean(&long);
        assert!(c.len() <= 128 && c.len().is_multiple_of(2), "{}", c.len());
    }

    #[test]
    fn thresholds_are_positive_sorted_and_unique() {
        let t = |v: &[u32]| Thresholds(v).to_string();
        assert_eq!(t(&[100, 50, 0, 80, 50]), "50,80,100");
        assert_eq!(t(&[]), "");
        assert_eq!(t(&[0]), "");
        assert_eq!(t(&[7]), "7");
    }

    #[test]
    fn tail_is_empty_when_off() {
        let now = DateTime::parse_from_rfc3339("2026-11-27T10:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let caps: Vec<String> = ["t", "d", "", "1000"].map(String::from).to_vec();
        let packed = |cfg: &LedgerConfig| {
            let mut call = ScriptCall::new(&super::super::scripts::RECLAIM);
            tail(&mut call, cfg, now, &caps);
            call.command().get_packed_command()
        };
        let want = |day: &str, exp: i64| {
            redis::cmd("EVALSHA")
                .arg(super::super::scripts::RECLAIM.get_hash())
                .arg(0)
                .arg(&caps)
                .arg(1)
                .arg("50,80,100")
                .arg(day)
                .arg(exp)
                .arg(0)
                .get_packed_command()
        };
        let off = LedgerConfig {
            audit: false,
            ..LedgerConfig::default()
        };
        assert_eq!(packed(&off), want("", 0));
        // 2026-11-28T00:00Z + 90 days.
        assert_eq!(
            packed(&LedgerConfig::default()),
            want("2026-11-27", 1_795_824_000 + 90 * 86_400)
        );
    }
}
