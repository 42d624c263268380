//! The benchmark's load generator (`cargo xtask bench` runs its binary, built with `--release`).
//!
//! Every mode prints one JSON object on stdout (`hold`: one line per phase). Every loop is bounded in time; every target is on
//! loopback.

pub mod hold;
pub mod http_load;
pub mod latency;
pub mod ledger_load;
pub mod passthrough;
pub mod stream_load;
pub mod target;

#[cfg(test)]
mod tests;
