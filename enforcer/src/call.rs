//! One call's context as it moves through the request path's phases, and its log line: every
//! call, whatever ends it (refused, passed through, settled, released), writes exactly one
//! [`CallLog`] with the same fields, from the phase that ends it.

use std::time::Instant;

use chrono::{DateTime, Utc};
use ledger::Nanos;
use ledger::provider::ProviderKind;
use ledger::usage::Usage;

use crate::usd_string;

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
    /// A new call with a fresh time-ordered id.
    #[must_use]
    pub fn new() -> Call {
        Call {
            request_id: uuid::Uuid::now_v7().to_string(),
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

    /// Writes the line.
    pub fn write(&self) {
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
            latency_ms = u64::try_from(c.start.elapsed().as_millis()).unwrap_or(u64::MAX),
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
