//! The llmwarden core that the observer and the enforcer share, so both price every LLM call
//! identically and write one Redis ledger.
//!
//! Everything except [`store`] is pure: bytes in, values out, no I/O and no clock.

pub mod billing;
pub mod durable;
pub mod error;
pub(crate) mod json;
pub mod money;
pub mod names;
pub mod price;
pub mod provider;
pub mod request;
pub mod spool;
pub mod sse;
pub mod store;
pub mod usage;

pub use error::Error;
pub use money::Nanos;
pub use price::{Cost, LoadReport, ModelPrice, PriceTable, TierPrice};
pub use provider::{Api, Endpoint, ProviderDetector, ProviderKind, classify};
pub use request::{RequestInfo, parse_request};
pub use sse::{SseEvent, SseEventRef, SseParser};
pub use store::{
    Budget, Cap, CapScope, Denial, Ledger, LedgerConfig, Period, RecordOutcome, Reservation,
    ReserveOutcome, ReserveRequest, SettleOutcome, Settlement, Source, TenantSpend, TokenCounts,
    UsageRecord, resolve_caps,
};
pub use usage::{
    ResponseMeta, StreamMeter, Usage, estimate_tokens_from_text, load_tokenizers, parse_response,
};
