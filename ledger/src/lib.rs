//! The llmwarden core that the observer and the enforcer share, so both price every LLM call
//! identically and write one Redis ledger.
//!
//! Everything except [`store`] is pure: bytes in, values out, no I/O and no clock.

pub mod error;
pub mod money;
pub mod price;
pub mod provider;
pub mod request;
pub mod sse;
pub mod store;
pub mod usage;

pub use error::Error;
pub use money::Nanos;
pub use price::{Cost, LoadReport, ModelPrice, PriceTable, TierPrice};
// Re-exports of the remaining main types are added as their modules land:
// provider::{Api, Endpoint, ProviderDetector, ProviderKind},
// request::RequestInfo, usage::{ResponseMeta, StreamMeter, Usage}.
