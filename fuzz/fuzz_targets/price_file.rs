//! Price files on arbitrary text: LiteLLM JSON (alone and over the built-in table), the project's
//! own table format, and single decimal prices. Loading must never panic, and every model it
//! prices must cost a non-negative amount that the reservation (`max_cost`) covers.
//!
//! Input: a mode byte (0: LiteLLM over an empty table, 1: LiteLLM over the built-in table,
//! 2: the project's table format, 3: one decimal price), then the text.
#![no_main]

use ledger::money::AttoUsd;
use ledger::usage::Usage;
use ledger::{PriceTable, price::ModelPrice};
use libfuzzer_sys::fuzz_target;

/// Token counts to price every loaded model at: small, around the long-context tiers, and huge.
const TOKENS: [(u64, u64); 5] = [
    (0, 0),
    (1_000, 500),
    (200_001, 4_096),
    (272_001, 1),
    (u64::MAX, u64::MAX),
];

fn check(model: &str, price: &ModelPrice) {
    for (input, output) in TOKENS {
        let reserved = price.max_cost(input, output);
        for reasoning in [0, output / 2, output] {
            let usage = Usage {
                input_tokens: input,
                output_tokens: output,
                reasoning_tokens: reasoning,
                ..Usage::default()
            };
            let cost = price.cost(&usage);
            assert!(cost.0 >= 0, "{model}: negative cost {cost:?} for {usage:?}");
            assert!(
                reserved >= cost,
                "{model}: reserved {reserved:?} < cost {cost:?} for {usage:?}"
            );
        }
    }
}

fn check_table(table: &PriceTable, names: impl Iterator<Item = String>) {
    for name in names.take(8) {
        if let Some((id, price)) = table.lookup(&name) {
            check(id, price);
        }
    }
}

/// Top-level keys of a JSON object (`models` keys for the table format).
fn keys(text: &str, under: Option<&str>) -> Vec<String> {
    let Ok(serde_json::Value::Object(mut top)) = serde_json::from_str(text) else {
        return Vec::new();
    };
    if let Some(k) = under {
        match top.remove(k) {
            Some(serde_json::Value::Object(inner)) => top = inner,
            _ => return Vec::new(),
        }
    }
    top.keys().cloned().collect()
}

fuzz_target!(|input: &[u8]| {
    let Some((&mode, rest)) = input.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    match mode % 4 {
        0 | 1 => {
            let mut table = if mode % 4 == 0 {
                PriceTable::empty()
            } else {
                PriceTable::builtin()
            };
            if table.load_litellm_str(text, "fuzz").is_ok() {
                check_table(&table, keys(text, None).into_iter());
            }
        }
        2 => {
            if let Ok(table) = PriceTable::from_table_json(text, "fuzz") {
                check_table(&table, keys(text, Some("models")).into_iter());
            }
        }
        _ => {
            if let Ok(p) = AttoUsd::from_decimal_str(text) {
                assert!(p.0 >= 0, "{text:?} parsed to a negative price {p:?}");
            }
        }
    }
});
