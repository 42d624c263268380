//! Anthropic Messages: `input_tokens` EXCLUDES cache reads and writes; cache writes are split
//! into 5-minute and 1-hour ephemeral writes when `cache_creation` is present.

use super::stream::StreamState;
use super::{Usage, count};
use crate::json::Json;

/// The usage fields as sent; a stream merges them field by field.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Raw {
    input: Option<u64>,
    cache_read: Option<u64>,
    cache_creation: Option<u64>,
    ephemeral_5m: Option<u64>,
    ephemeral_1h: Option<u64>,
    output: Option<u64>,
}

impl Raw {
    /// Reads a `usage` object; `None` when absent or null.
    pub(super) fn from_usage(usage: Option<&Json<'_>>) -> Result<Option<Self>, String> {
        let u = match usage {
            None | Some(Json::Null) => return Ok(None),
            Some(v @ Json::Object(_)) => v,
            Some(other) => return Err(format!("usage is {}, not an object", other.type_name())),
        };
        let split = u.get("cache_creation").filter(|v| !v.is_null());
        Ok(Some(Self {
            input: count(Some(u), "input_tokens", "usage")?,
            cache_read: count(Some(u), "cache_read_input_tokens", "usage")?,
            cache_creation: count(Some(u), "cache_creation_input_tokens", "usage")?,
            ephemeral_5m: count(split, "ephemeral_5m_input_tokens", "usage.cache_creation")?,
            ephemeral_1h: count(split, "ephemeral_1h_input_tokens", "usage.cache_creation")?,
            output: count(Some(u), "output_tokens", "usage")?,
        }))
    }

    /// Takes every field `later` carries, unless it is a zero replacing a known non-zero value:
    /// `message_delta` repeats (and sometimes zeroes) the input fields of `message_start`, and
    /// its `output_tokens` is cumulative. Values are never added.
    pub(super) fn merge(&mut self, later: &Self) {
        fn take(slot: &mut Option<u64>, new: Option<u64>) {
            if let Some(v) = new
                && (v != 0 || slot.is_none())
            {
                *slot = Some(v);
            }
        }
        take(&mut self.input, later.input);
        take(&mut self.cache_read, later.cache_read);
        take(&mut self.cache_creation, later.cache_creation);
        take(&mut self.ephemeral_5m, later.ephemeral_5m);
        take(&mut self.ephemeral_1h, later.ephemeral_1h);
        take(&mut self.output, later.output);
    }

    /// The normalised usage. The 5m/1h split wins when it accounts for the writes; otherwise
    /// `cache_creation_input_tokens` counts as 5-minute writes (the default TTL).
    pub(super) fn usage(&self) -> Usage {
        let split_5m = self.ephemeral_5m.unwrap_or(0);
        let split_1h = self.ephemeral_1h.unwrap_or(0);
        let total = self.cache_creation.unwrap_or(0);
        let (w5, w1h) = if split_5m + split_1h >= total {
            (split_5m, split_1h)
        } else {
            // The split is missing or short: the unexplained writes are 5-minute writes.
            (total - split_1h, split_1h)
        };
        Usage {
            input_tokens: self.input.unwrap_or(0),
            cache_read_tokens: self.cache_read.unwrap_or(0),
            cache_write_5m_tokens: w5,
            cache_write_1h_tokens: w1h,
            output_tokens: self.output.unwrap_or(0),
            ..Usage::default()
        }
    }
}

/// One Messages stream event. `message_start` opens the record (input and cache counts),
/// `message_delta` completes it with the cumulative `output_tokens`; deltas carry the text.
pub(super) fn on_event(state: &mut StreamState, raw: &mut Raw, value: &Json<'_>) {
    let Some(obj) = value.as_object() else {
        state.errors += 1;
        return;
    };
    let kind = obj.get("type").and_then(Json::as_str).unwrap_or("");
    match kind {
        "message_start" => {
            let Some(message) = obj.get("message") else {
                return;
            };
            if let Some(model) = message.get("model").and_then(Json::as_str) {
                state.set_model(model);
            }
            absorb(state, raw, message.get("usage"), false);
        }
        "message_delta" => absorb(state, raw, obj.get("usage"), true),
        // The last event of a message, or the error that ends the stream early.
        "message_stop" | "error" => state.mark_ended(),
        "content_block_start" => {
            if let Some(text) = obj
                .get("content_block")
                .and_then(|b| b.get("text"))
                .and_then(Json::as_str)
            {
                state.push_text(text);
            }
        }
        "content_block_delta" => {
            let Some(delta) = obj.get("delta") else {
                return;
            };
            for key in ["text", "partial_json", "thinking"] {
                if let Some(text) = delta.get(key).and_then(Json::as_str) {
                    state.push_text(text);
                }
            }
        }
        _ => {}
    }
}

fn absorb(state: &mut StreamState, raw: &mut Raw, usage: Option<&Json<'_>>, last: bool) {
    match Raw::from_usage(usage) {
        Ok(Some(later)) => {
            raw.merge(&later);
            state.set_record(raw.usage(), last);
        }
        Ok(None) => {}
        Err(_) => state.errors += 1,
    }
}
