//! The project's own price-table format (`ledger/prices.json`, documented in `docs/pricing.md`):
//! decimal strings in USD per million tokens, converted exactly to atto-USD per token.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::{LONG_CONTEXT_200K, ModelPrice, PriceParts, TierParts};
use crate::Error;
use crate::money::AttoUsd;

/// The `format` value this parser reads.
pub(super) const FORMAT: &str = "llmwarden-prices/1";
/// The only unit the format knows.
const UNIT: &str = "USD per 1M tokens";
/// Tokens per price unit.
const PER_MILLION: i128 = 1_000_000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TableFile {
    format: String,
    unit: String,
    #[serde(default)]
    #[expect(dead_code, reason = "documentation for readers of the file")]
    as_of: Option<String>,
    #[serde(default)]
    #[expect(dead_code, reason = "documentation for readers of the file")]
    source: Option<String>,
    models: BTreeMap<String, ModelRow>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelRow {
    provider: String,
    input: String,
    output: String,
    cache_read: Option<String>,
    cache_write_5m: Option<String>,
    cache_write_1h: Option<String>,
    reasoning: Option<String>,
    above_200k: Option<TierRow>,
    above_272k: Option<TierRow>,
    max_input_tokens: Option<u64>,
    max_output_tokens: Option<u64>,
    #[serde(default)]
    #[expect(dead_code, reason = "documentation for readers of the file")]
    note: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TierRow {
    input: String,
    output: Option<String>,
    cache_read: Option<String>,
    cache_write_5m: Option<String>,
    cache_write_1h: Option<String>,
}

/// Parses a whole table into (lower-case id, price) pairs.
pub(super) fn parse(text: &str, origin: &str) -> Result<Vec<(String, ModelPrice)>, Error> {
    let err = |detail: String| Error::PriceFile {
        path: origin.to_owned(),
        detail,
    };
    let file: TableFile =
        serde_json::from_str(text).map_err(|e| err(format!("not a valid price table: {e}")))?;
    if file.format != FORMAT {
        return Err(err(format!(
            "format is {:?}, this build reads {FORMAT:?}",
            file.format
        )));
    }
    if file.unit != UNIT {
        return Err(err(format!(
            "unit is {:?}, the only supported unit is {UNIT:?}",
            file.unit
        )));
    }
    let mut out = Vec::with_capacity(file.models.len());
    for (id, row) in file.models {
        if id.trim().is_empty() || id != id.to_ascii_lowercase() {
            return Err(err(format!("model id {id:?} must be non-empty lower case")));
        }
        let price = row.into_price(&id).map_err(err)?;
        out.push((id, price));
    }
    Ok(out)
}

impl ModelRow {
    fn into_price(self, id: &str) -> Result<ModelPrice, String> {
        let field = |name: &str, v: &str| {
            per_million(v).map_err(|e| format!("model {id:?} field {name:?}: {e}"))
        };
        let opt = |name: &str, v: Option<&String>| v.map(|v| field(name, v)).transpose();
        let parts = PriceParts {
            input: field("input", &self.input)?,
            output: field("output", &self.output)?,
            cache_read: opt("cache_read", self.cache_read.as_ref())?,
            cache_write_5m: opt("cache_write_5m", self.cache_write_5m.as_ref())?,
            cache_write_1h: opt("cache_write_1h", self.cache_write_1h.as_ref())?,
        };
        let reasoning = opt("reasoning", self.reasoning.as_ref())?;
        let tier = match (self.above_200k, self.above_272k) {
            (Some(_), Some(_)) => {
                return Err(format!(
                    "model {id:?} has both above_200k and above_272k; keep one"
                ));
            }
            (Some(t), None) => Some(t.parts(id, "above_200k", LONG_CONTEXT_200K)?),
            (None, Some(t)) => Some(t.parts(id, "above_272k", 272_000)?),
            (None, None) => None,
        };
        Ok(parts.into_price(
            reasoning,
            tier,
            self.max_input_tokens,
            self.max_output_tokens,
            Some(self.provider),
        ))
    }
}

impl TierRow {
    fn parts(self, id: &str, tier: &str, above_tokens: u64) -> Result<TierParts, String> {
        let opt = |name: &str, v: Option<&String>| {
            v.map(|v| {
                per_million(v).map_err(|e| format!("model {id:?} field \"{tier}.{name}\": {e}"))
            })
            .transpose()
        };
        Ok(TierParts {
            above_tokens,
            input: opt("input", Some(&self.input))?,
            output: opt("output", self.output.as_ref())?,
            cache_read: opt("cache_read", self.cache_read.as_ref())?,
            cache_write_5m: opt("cache_write_5m", self.cache_write_5m.as_ref())?,
            cache_write_1h: opt("cache_write_1h", self.cache_write_1h.as_ref())?,
        })
    }
}

/// "3.00" USD per million tokens -> 3_000_000_000_000 atto-USD per token, exactly: the USD figure
/// is parsed to atto-USD (exact to 18 decimals) and divided by 10^6, which must leave no remainder
/// (a per-million price with at most 12 decimals).
pub(super) fn per_million(s: &str) -> Result<AttoUsd, String> {
    let atto = AttoUsd::from_decimal_str(s).map_err(|e| e.to_string())?;
    if atto.0 % PER_MILLION != 0 {
        return Err(format!(
            "{s:?} USD per 1M tokens is not a whole number of atto-USD per token"
        ));
    }
    Ok(AttoUsd(atto.0 / PER_MILLION))
}
