//! One call's context as it moves through the request path's phases, and its log line: every
//! call, whatever ends it (refused, passed through, settled, released), writes exactly one
//! [`CallLog`] with the same fields, from the phase that ends it.

use std::time::Instant;

use chrono::{DateTime, Utc};
use ledger::Nanos;
use ledger::provider::ProviderKind;
use ledger::usage::Usage;

use crate::{Usd, usd_string};

/// What is known of a call so far: filled in by the phases, read by the error response, the
/// metrics and the log line.
#[derive(Debug, Clone)]
pub struct Call {
    /// The enforcer's id of the call (also its reservation id).
    pub request_id: String,
    /// The provider's API family (for error shapes).
    pub kind: ProviderKind,
    /// The provider's configured name ("unknown" before routing).
    pub provider: String,
    /// The tenant billed ("" before authentication).
    pub tenant: String,
    /// X-Feature-Name.
    pub feature: Option<String>,
    /// X-Session-ID.
    pub session: Option<String>,
    /// The API ("chat.completions", ...), once classified.
    pub api: &'static str,
    /// The model the request names ("" until parsed).
    pub model: String,
    /// The provider route that answered, and how many attempts that took, when it is not the
    /// call's own route on the first try (weights and failover; "" otherwise).
    pub upstream: String,
    /// Upstream attempts made (0 before forwarding).
    pub attempts: u32,
    /// The model the request named when a budget-aware downgrade replaced it (`model` is then
    /// the one that ran).
    pub routed_from: Option<String>,
    /// When the call arrived (wall clock: picks the ledger's day and month).
    pub started_at: DateTime<Utc>,
    /// When the call arrived (monotonic: latency).
    pub start: Instant,
}

impl Call {
    /// Moves the call out for the phase that ends it, leaving what the response's headers still
    /// read (id, and the models of a downgrade): one `String` copied instead of the whole call.
    #[must_use]
    pub fn hand_off(&mut self) -> Call {
        let kept = Call {
            request_id: self.request_id.clone(),
            kind: self.kind,
            provider: String::new(),
            tenant: String::new(),
            feature: None,
            session: None,
            api: self.api,
            // Only a downgraded call's response names its models.
            model: if self.routed_from.is_some() {
                self.model.clone()
            } else {
                String::new()
            },
            upstream: String::new(),
            attempts: self.attempts,
            routed_from: self.routed_from.clone(),
            started_at: self.started_at,
            start: self.start,
        };
        std::mem::replace(self, kept)
    }

    /// A new call with a fresh time-ordered id.
    #[must_use]
    pub fn new() -> Call {
        Call {
            request_id: new_id(),
            kind: ProviderKind::OpenAi,
            provider: "unknown".into(),
            tenant: String::new(),
            feature: None,
            session: None,
            api: "",
            model: String::new(),
            upstream: String::new(),
            attempts: 0,
            routed_from: None,
            started_at: Utc::now(),
            start: Instant::now(),
        }
    }
}

/// A new time-ordered id (UUID v7, hyphenated, lower case): a call's, or a spare hold's.
/// Written without `fmt`: one is made for every call, on its path.
#[must_use]
pub fn new_id() -> String {
    let mut buf = uuid::Uuid::encode_buffer();
    uuid::Uuid::now_v7()
        .hyphenated()
        .encode_lower(&mut buf)
        .to_owned()
}

impl Default for Call {
    fn default() -> Self {
        Call::new()
    }
}

/// How a call ended, for its log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Metered and settled (real or estimated cost committed).
    Settled,
    /// Admitted, then released without spend (nothing was billed).
    Released,
    /// Refused before forwarding (budget, auth, bad request, ...).
    Denied,
    /// Failed: an upstream or internal error.
    Error,
    /// Forwarded unmetered (reads, free endpoints).
    Passthrough,
    /// The client went away before the call was forwarded: nothing held, nothing sent.
    Abandoned,
}

impl Decision {
    /// The `decision` field.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Decision::Settled => "settled",
            Decision::Released => "released",
            Decision::Denied => "denied",
            Decision::Error => "error",
            Decision::Passthrough => "passthrough",
            Decision::Abandoned => "abandoned",
        }
    }
}

/// The one log line of a call (target `llmwarden::request`). Metadata only: never keys, prompts
/// or completions.
#[derive(Debug)]
pub struct CallLog<'a> {
    /// The call.
    pub call: &'a Call,
    /// How it ended.
    pub decision: Decision,
    /// Why (an error code, "complete", "client disconnected", ...).
    pub outcome: &'a str,
    /// The HTTP status the client got (0 when the stream broke after the head).
    pub status: u16,
    /// The model billed (the request's when nothing was billed).
    pub model: Option<&'a str>,
    /// The usage billed.
    pub usage: Usage,
    /// The cost committed.
    pub cost: Nanos,
    /// The worst case that was held.
    pub reserved: Nanos,
    /// The error message shown to the client, if any.
    pub message: Option<String>,
}

impl<'a> CallLog<'a> {
    /// A line for `call` ending with `decision` / `outcome`, nothing billed.
    #[must_use]
    pub fn new(call: &'a Call, decision: Decision, outcome: &'a str, status: u16) -> CallLog<'a> {
        CallLog {
            call,
            decision,
            outcome,
            status,
            model: None,
            usage: Usage::default(),
            cost: Nanos::ZERO,
            reserved: Nanos::ZERO,
            message: None,
        }
    }

    /// Writes the line: straight to the log writer in the JSON format (the same line tracing's
    /// JSON formatter writes, without its per-field dispatch), through tracing otherwise.
    pub fn write(&self) {
        if !tracing::enabled!(target: "llmwarden::request", tracing::Level::INFO) {
            return;
        }
        if !crate::logs::write_line(|b| self.json_line(b)) {
            self.trace();
        }
    }

    /// The line as tracing's JSON formatter (`flatten_event`, no spans) writes it: timestamp,
    /// level, the fields in [`CallLog::trace`]'s order, target. Written without `fmt`: every
    /// call writes one, and the formatting machinery and its `String`s were most of its cost.
    pub fn json_line(&self, b: &mut Vec<u8>) {
        let c = self.call;
        let key = |b: &mut Vec<u8>, k: &str| {
            b.extend_from_slice(b",\"");
            b.extend_from_slice(k.as_bytes());
            b.extend_from_slice(b"\":");
        };
        let s = |b: &mut Vec<u8>, k: &str, v: &str| {
            key(b, k);
            let _ = serde_json::to_writer(&mut *b, v);
        };
        let n = |b: &mut Vec<u8>, k: &str, v: u64| {
            key(b, k);
            b.extend_from_slice(itoa::Buffer::new().format(v).as_bytes());
        };
        let usd = |b: &mut Vec<u8>, k: &str, v: Nanos| {
            key(b, k);
            b.push(b'"');
            b.extend_from_slice(Usd::new(v).as_str().as_bytes());
            b.push(b'"');
        };
        b.extend_from_slice(b"{\"timestamp\":\"");
        push_timestamp(b, Utc::now());
        b.extend_from_slice(b"\",\"level\":\"INFO\"");
        s(b, "request_id", &c.request_id);
        s(b, "tenant", &c.tenant);
        s(b, "feature", c.feature.as_deref().unwrap_or(""));
        s(b, "session", c.session.as_deref().unwrap_or(""));
        s(b, "provider", &c.provider);
        s(b, "upstream", &c.upstream);
        n(b, "attempts", u64::from(c.attempts));
        s(b, "routed_from", c.routed_from.as_deref().unwrap_or(""));
        s(b, "api", c.api);
        s(b, "model", self.model.unwrap_or(&c.model));
        n(b, "input_tokens", self.usage.prompt_tokens());
        n(b, "output_tokens", self.usage.output_tokens);
        key(b, "estimated");
        b.extend_from_slice(if self.usage.estimated {
            b"true"
        } else {
            b"false"
        });
        usd(b, "cost_usd", self.cost);
        usd(b, "reserved_usd", self.reserved);
        n(b, "latency_ms", self.latency_ms());
        s(b, "decision", self.decision.as_str());
        s(b, "outcome", self.outcome);
        n(b, "status", u64::from(self.status));
        s(b, "message", self.message.as_deref().unwrap_or(""));
        b.extend_from_slice(b",\"target\":\"llmwarden::request\"}");
    }

    fn latency_ms(&self) -> u64 {
        u64::try_from(self.call.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// The line through tracing (the text format, or before the log writer is set up).
    pub fn trace(&self) {
        let c = self.call;
        tracing::info!(
            target: "llmwarden::request",
            request_id = %c.request_id,
            tenant = %c.tenant,
            feature = c.feature.as_deref().unwrap_or(""),
            session = c.session.as_deref().unwrap_or(""),
            provider = %c.provider,
            upstream = %c.upstream,
            attempts = c.attempts,
            routed_from = c.routed_from.as_deref().unwrap_or(""),
            api = c.api,
            model = self.model.unwrap_or(&c.model),
            input_tokens = self.usage.prompt_tokens(),
            output_tokens = self.usage.output_tokens,
            estimated = self.usage.estimated,
            cost_usd = %usd_string(self.cost),
            reserved_usd = %usd_string(self.reserved),
            latency_ms = self.latency_ms(),
            decision = self.decision.as_str(),
            outcome = self.outcome,
            status = self.status,
            message = self.message.as_deref().unwrap_or(""),
        );
    }
}

/// A call until a terminal phase owns it: if the request future is dropped before that (the
/// client went away during admission), the call still writes its one log line.
#[derive(Debug)]
pub struct Admitting {
    /// The call.
    pub call: Call,
    /// A terminal phase (refusal, passthrough, the settler) has taken over the log line.
    pub handed_off: bool,
}

impl Admitting {
    /// A new call.
    #[must_use]
    pub fn new() -> Admitting {
        Admitting {
            call: Call::new(),
            handed_off: false,
        }
    }
}

impl Default for Admitting {
    fn default() -> Self {
        Admitting::new()
    }
}

impl Drop for Admitting {
    fn drop(&mut self) {
        if !self.handed_off {
            CallLog::new(
                &self.call,
                Decision::Abandoned,
                "client gone before forwarding",
                499,
            )
            .write();
        }
    }
}

/// `at` as `to_rfc3339_opts(SecondsFormat::Micros, true)` writes it
/// ("2026-12-06T06:37:00.123456Z"), without its `String`; chrono writes what this does not
/// cover (a leap second, a year outside 0–9999).
fn push_timestamp(b: &mut Vec<u8>, at: DateTime<Utc>) {
    use chrono::{Datelike as _, Timelike as _};
    let year = u32::try_from(at.year()).ok().filter(|y| *y <= 9999);
    let (Some(year), nanos @ 0..=999_999_999) = (year, at.nanosecond()) else {
        b.extend_from_slice(
            at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
                .as_bytes(),
        );
        return;
    };
    let mut t = *b"0000-00-00T00:00:00.000000Z";
    let mut put = |end: usize, mut v: u32| {
        let mut i = end;
        while v > 0 {
            i -= 1;
            // A digit: `v % 10` is below 10.
            t[i] = b'0' + u8::try_from(v % 10).unwrap_or(0);
            v /= 10;
        }
    };
    put(4, year);
    put(7, at.month());
    put(10, at.day());
    put(13, at.hour());
    put(16, at.minute());
    put(19, at.second());
    put(26, nanos / 1_000);
    b.extend_from_slice(&t);
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("buf").extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_new_id_is_a_hyphenated_lower_case_uuid_v7_in_time_order() {
        let (a, b) = (new_id(), new_id());
        for id in [&a, &b] {
            let u = uuid::Uuid::parse_str(id).expect("a UUID");
            assert_eq!(u.get_version_num(), 7, "{id}");
            assert_eq!(&u.to_string(), id, "the formatting `to_string` gives");
        }
        assert!(a < b, "{a} then {b}");
    }

    /// The line without its timestamp's value, and that value.
    fn split_timestamp(line: &str) -> (String, String) {
        let key = "\"timestamp\":\"";
        let at = line.find(key).expect("timestamp") + key.len();
        let end = at + line[at..].find('"').expect("end");
        (
            format!("{}{}", &line[..at], &line[end..]),
            line[at..end].to_owned(),
        )
    }

    /// The line written directly is byte for byte the one tracing's JSON formatter writes (as
    /// main.rs sets it up), timestamps aside, with values that need escaping.
    #[test]
    fn the_direct_line_is_the_json_formatters_line() {
        let mut call = Call::new();
        call.tenant = "acme \"quoted\" \\ back".into();
        call.feature = Some("bot\nline".into());
        call.provider = "openai".into();
        call.upstream = "openai-eu".into();
        call.attempts = 2;
        call.routed_from = Some("gpt-4o".into());
        call.api = "chat.completions";
        call.model = "gpt-4o-mini".into();
        let mut log = CallLog::new(&call, Decision::Settled, "complete", 200);
        log.model = Some("modèle \u{1}");
        log.usage = Usage {
            input_tokens: 300,
            cache_read_tokens: 8,
            output_tokens: 120,
            estimated: true,
            ..Usage::default()
        };
        log.cost = Nanos(118_200);
        log.reserved = Nanos(-5);
        log.message = Some("tab\there \u{2028} done".into());

        let buf = Buf::default();
        let out = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || out.clone())
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .finish();
        tracing::subscriber::with_default(subscriber, || log.trace());
        let traced = String::from_utf8(buf.0.lock().expect("buf").clone()).expect("utf8");

        let mut direct = Vec::new();
        log.json_line(&mut direct);
        let direct = String::from_utf8(direct).expect("utf8");

        let (t, t_ts) = split_timestamp(traced.trim_end());
        let (d, d_ts) = split_timestamp(&direct);
        assert_eq!(d, t);
        assert_eq!(d_ts.len(), t_ts.len(), "{d_ts} vs {t_ts}");
        assert!(d_ts.ends_with('Z') && d_ts.as_bytes()[10] == b'T', "{d_ts}");
        let v: serde_json::Value = serde_json::from_str(&direct).expect("json");
        assert_eq!(v["tenant"], "acme \"quoted\" \\ back");
        assert_eq!(v["input_tokens"], 308);
    }

    /// The timestamp written without chrono's `String` is chrono's, to the byte.
    #[test]
    fn the_timestamp_is_chronos_rfc3339_in_micros() {
        use chrono::TimeZone as _;
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut at = vec![
            Utc.timestamp_opt(0, 0).single().expect("epoch"),
            Utc.timestamp_opt(1_798_761_599, 999_999_999)
                .single()
                .expect("end of 2026"),
            Utc.timestamp_opt(253_402_300_799, 999_000)
                .single()
                .expect("end of 9999"),
            Utc.timestamp_opt(253_402_300_800, 0)
                .single()
                .expect("year 10000"),
            Utc.timestamp_opt(-62_135_596_800, 0)
                .single()
                .expect("year 1"),
            Utc.timestamp_opt(-62_135_596_801, 0)
                .single()
                .expect("year 0"),
            Utc.timestamp_opt(-62_167_219_201, 0)
                .single()
                .expect("year -1"),
            Utc.timestamp_opt(1_483_228_799, 1_500_000_000)
                .single()
                .expect("a leap second"),
            Utc::now(),
        ];
        for _ in 0..10_000 {
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            let secs = i64::try_from(seed >> 31).expect("fits") % 4_102_444_800;
            let nanos = u32::try_from(seed & 0x3fff_ffff).expect("fits") % 1_000_000_000;
            at.push(Utc.timestamp_opt(secs, nanos).single().expect("valid"));
        }
        for t in at {
            let mut b = Vec::new();
            push_timestamp(&mut b, t);
            assert_eq!(
                String::from_utf8(b).expect("utf8"),
                t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
            );
        }
    }
}
