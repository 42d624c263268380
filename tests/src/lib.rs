//! Harness for llmwarden's integration tests: every process a test starts is real and sits behind a
//! `Drop` guard that kills it.

pub mod golang;
pub mod mock;
pub mod observer;
pub mod process;
pub mod python;
pub mod redis;
