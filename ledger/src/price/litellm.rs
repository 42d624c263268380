//! The LiteLLM price-file reader (`model_prices_and_context_window.json`), an override layer over
//! the built-in table.
//!
//! Numbers are read from their JSON text (`RawValue`), never through `f64`, so "3e-06" is exactly
//! 3_000_000_000_000 atto-USD. One bad entry is rejected with an error naming the model and field;
//! the rest of the file still loads.

use std::collections::BTreeMap;
use std::collections::btree_map::Entry as MapEntry;

use serde_json::value::RawValue;

use super::{Entry, LONG_CONTEXT_200K, LoadReport, ModelPrice, PriceParts, TierParts, normalise};
use crate::Error;
use crate::money::AttoUsd;

/// Modes whose calls are metered in tokens; other modes (images, audio, rerank...) are skipped.
const METERED_MODES: &[&str] = &["chat", "completion", "responses", "embedding"];
/// Long-context tiers LiteLLM spells as a field suffix, with their thresholds.
const TIERS: &[(&str, u64)] = &[
    ("_above_200k_tokens", LONG_CONTEXT_200K),
    ("_above_272k_tokens", 272_000),
];

/// The parsed file: entries to insert (lower-case name -> entry) and the report.
pub(super) struct Parsed {
    pub(super) entries: Vec<(String, Entry)>,
    pub(super) report: LoadReport,
}

/// Parses LiteLLM JSON. Fails only when the text is not a JSON object.
pub(super) fn parse(text: &str, origin: &str) -> Result<Parsed, Error> {
    let top: BTreeMap<String, &RawValue> =
        serde_json::from_str(text).map_err(|e| Error::PriceFile {
            path: origin.to_owned(),
            detail: format!("not a LiteLLM price file (a JSON object of models): {e}"),
        })?;
    let mut report = LoadReport::default();
    // Accepted entries: (full key, canonical id, rank, price).
    let mut accepted: Vec<(String, String, (bool, usize), ModelPrice)> = Vec::new();
    for (key, raw) in top {
        if key == "sample_spec" || key.starts_with('_') {
            continue; // LiteLLM's documentation entry and comments
        }
        match parse_entry(&key, raw) {
            Ok(Some(price)) => {
                let full = key.trim().to_ascii_lowercase();
                let canonical = normalise::canonical_key(&key);
                let rank = (full != canonical, full.matches('/').count());
                accepted.push((full, canonical, rank, price));
            }
            Ok(None) => report.skipped += 1,
            Err(detail) => report.rejected.push(Error::PriceFile {
                path: origin.to_owned(),
                detail,
            }),
        }
    }
    report.loaded = accepted.len();

    // The canonical slot goes to the best-ranked key: a bare key beats "provider/key", which
    // beats "provider/region/key"; ties go to the first key in sorted order.
    let mut best: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, (_, canonical, rank, _)) in accepted.iter().enumerate() {
        match best.entry(canonical.as_str()) {
            MapEntry::Vacant(v) => {
                v.insert(i);
            }
            MapEntry::Occupied(mut o) => {
                if *rank < accepted[*o.get()].2 {
                    o.insert(i);
                }
            }
        }
    }
    let mut entries = Vec::with_capacity(accepted.len() + best.len());
    for (canonical, &i) in &best {
        let (_, id, _, price) = &accepted[i];
        entries.push((
            (*canonical).to_owned(),
            Entry {
                id: id.clone(),
                price: price.clone(),
            },
        ));
    }
    for (full, canonical, _, price) in &accepted {
        if full != canonical {
            entries.push((
                full.clone(),
                Entry {
                    id: canonical.clone(),
                    price: price.clone(),
                },
            ));
        }
    }
    Ok(Parsed { entries, report })
}

/// One entry: `Ok(None)` when its mode is not metered, `Err` naming the model and field.
fn parse_entry(key: &str, raw: &RawValue) -> Result<Option<ModelPrice>, String> {
    let fields: BTreeMap<String, &RawValue> = serde_json::from_str(raw.get())
        .map_err(|_| format!("model {key:?}: entry is not a JSON object"))?;
    let mode = match fields.get("mode") {
        None => "chat".to_owned(),
        Some(v) => serde_json::from_str::<String>(v.get())
            .map_err(|_| format!("model {key:?} field \"mode\": {} is not a string", v.get()))?,
    };
    if !METERED_MODES.contains(&mode.as_str()) {
        return Ok(None);
    }
    let price = |name: &str| -> Result<Option<AttoUsd>, String> {
        fields.get(name).map_or(Ok(None), |v| {
            decimal(v).map_err(|e| format!("model {key:?} field {name:?}: {e}"))
        })
    };
    let count = |name: &str| -> Result<Option<u64>, String> {
        fields.get(name).map_or(Ok(None), |v| {
            tokens(v).map_err(|e| format!("model {key:?} field {name:?}: {e}"))
        })
    };

    let input = price("input_cost_per_token")?.ok_or_else(|| {
        format!(
            "model {key:?} field \"input_cost_per_token\": missing, so the model cannot be priced"
        )
    })?;
    let output = match price("output_cost_per_token")? {
        Some(p) => p,
        None if mode == "embedding" => AttoUsd::ZERO,
        None => {
            return Err(format!(
                "model {key:?} field \"output_cost_per_token\": missing for mode {mode:?}"
            ));
        }
    };
    let parts = PriceParts {
        input,
        output,
        cache_read: price("cache_read_input_token_cost")?,
        cache_write_5m: price("cache_creation_input_token_cost")?,
        cache_write_1h: price("cache_creation_input_token_cost_above_1hr")?,
    };
    let reasoning = price("output_cost_per_reasoning_token")?;
    let mut tier = None;
    for &(suffix, above_tokens) in TIERS {
        let t = TierParts {
            above_tokens,
            input: price(&format!("input_cost_per_token{suffix}"))?,
            output: price(&format!("output_cost_per_token{suffix}"))?,
            cache_read: price(&format!("cache_read_input_token_cost{suffix}"))?,
            cache_write_5m: price(&format!("cache_creation_input_token_cost{suffix}"))?,
            cache_write_1h: price(&format!(
                "cache_creation_input_token_cost_above_1hr{suffix}"
            ))?,
        };
        let present = t.input.is_some()
            || t.output.is_some()
            || t.cache_read.is_some()
            || t.cache_write_5m.is_some();
        if present && tier.is_none() {
            tier = Some(t);
        }
    }
    let provider = match fields.get("litellm_provider") {
        Some(v) => serde_json::from_str::<String>(v.get()).ok(),
        None => None,
    };
    Ok(Some(parts.into_price(
        reasoning,
        tier,
        count("max_input_tokens")?,
        count("max_output_tokens")?,
        provider,
    )))
}

/// A non-negative decimal price from its JSON text: a number ("3e-06") or a numeric string.
/// `null` means absent.
fn decimal(v: &RawValue) -> Result<Option<AttoUsd>, String> {
    let text = v.get().trim();
    if text == "null" {
        return Ok(None);
    }
    let owned;
    let digits = if text.starts_with('"') {
        owned = serde_json::from_str::<String>(text).map_err(|e| e.to_string())?;
        owned.as_str()
    } else {
        text
    };
    AttoUsd::from_decimal_str(digits)
        .map(Some)
        .map_err(|_| format!("{text} is not a non-negative decimal price"))
}

/// A token count: a non-negative JSON integer (`null` means absent).
fn tokens(v: &RawValue) -> Result<Option<u64>, String> {
    let text = v.get().trim();
    if text == "null" {
        return Ok(None);
    }
    text.parse::<u64>()
        .map(Some)
        .map_err(|_| format!("{text} is not a whole token count"))
}
