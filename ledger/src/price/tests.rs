//! Prices checked against costs computed by hand, to the nano-USD.
//!
//! Arithmetic reminder: $P per million tokens is P * 1e-6 USD = P * 1000 nano-USD per token, so
//! `tokens` cost `tokens * P * 1000` nano-USD (exact before the single round-up).

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::*;

fn usage(input: u64, cache_read: u64, w5: u64, w1h: u64, output: u64) -> Usage {
    Usage {
        input_tokens: input,
        cache_read_tokens: cache_read,
        cache_write_5m_tokens: w5,
        cache_write_1h_tokens: w1h,
        output_tokens: output,
        ..Usage::default()
    }
}

fn priced(t: &PriceTable, model: &str, u: &Usage) -> (String, i64) {
    match t.cost(model, u) {
        Cost::Priced { model, nanos } => (model, nanos.0),
        Cost::Unpriced { model } => panic!("{model} must be priced by the built-in table"),
    }
}

/// Per-million USD string -> atto per token, for readable assertions.
fn pm(s: &str) -> AttoUsd {
    table::per_million(s).unwrap_or_else(|e| panic!("{s}: {e}"))
}

// === the built-in table ===

#[test]
fn builtin_table_parses() {
    let t = PriceTable::builtin();
    assert!(t.len() > 100, "only {} models", t.len());
}

#[test]
fn builtin_covers_the_current_families() {
    let t = PriceTable::builtin();
    for id in [
        "gpt-5",
        "gpt-5-mini",
        "gpt-5-nano",
        "gpt-5.1",
        "gpt-5.2",
        "gpt-5.4",
        "gpt-5.5",
        "gpt-4.1",
        "gpt-4.1-mini",
        "gpt-4.1-nano",
        "gpt-4o",
        "gpt-4o-mini",
        "o1",
        "o3",
        "o3-mini",
        "o4-mini",
        "o3-pro",
        "text-embedding-3-small",
        "text-embedding-3-large",
        "claude-opus-4-5",
        "claude-opus-4-1",
        "claude-sonnet-4-5",
        "claude-sonnet-4",
        "claude-haiku-4-5",
        "claude-3-7-sonnet",
        "claude-3-haiku",
        "claude-3-opus",
        "gemini-2.0-flash",
        "gemini-2.5-flash",
        "gemini-2.5-flash-lite",
        "gemini-2.5-pro",
        "gemini-3-pro-preview",
        "gemini-3.1-pro-preview",
        "gemini-3-flash",
        "deepseek-chat",
        "deepseek-reasoner",
        "grok-4.3",
    ] {
        let (canonical, _) = t
            .lookup(id)
            .unwrap_or_else(|| panic!("{id} missing from ledger/prices.json"));
        assert_eq!(canonical, id);
    }
}

#[test]
fn builtin_prices_are_the_published_figures() {
    let t = PriceTable::builtin();
    let (_, p) = t.lookup("claude-sonnet-4-5").unwrap();
    assert_eq!(p.input, AttoUsd(3_000_000_000_000)); // $3.00/M = 3e-6 USD = 3e12 atto per token
    assert_eq!(p.output, pm("15"));
    assert_eq!(p.cache_read, pm("0.30"));
    assert_eq!(p.cache_write_5m, pm("3.75"));
    assert_eq!(p.cache_write_1h, pm("6.00"));
    let tier = p.above_200k.expect("sonnet 4.5 has a long-context tier");
    assert_eq!(
        (tier.above_tokens, tier.input, tier.output),
        (200_000, pm("6"), pm("22.50"))
    );
    assert_eq!(
        (tier.cache_read, tier.cache_write_5m, tier.cache_write_1h),
        (pm("0.60"), pm("7.50"), pm("12"))
    );
    assert_eq!(p.max_output_tokens, Some(64_000));
    assert_eq!(p.provider.as_deref(), Some("anthropic"));

    // Sonnet 4 has no 1h long-context figure in LiteLLM's file: it is scaled like input (x2) -> $12.
    let (_, p) = t.lookup("claude-sonnet-4").unwrap();
    assert_eq!(p.above_200k.unwrap().cache_write_1h, pm("12"));

    // Gemini has no cache-write price: writes cost the input price, in each tier.
    let (_, p) = t.lookup("gemini-2.5-pro").unwrap();
    assert_eq!((p.cache_write_5m, p.cache_write_1h), (p.input, p.input));
    let tier = p.above_200k.unwrap();
    assert_eq!(
        (tier.input, tier.output, tier.cache_read),
        (pm("2.50"), pm("15"), pm("0.25"))
    );
    assert_eq!(tier.cache_write_5m, tier.input);

    // No cached-input price: cache reads cost the input price.
    let (_, p) = t.lookup("o3-pro").unwrap();
    assert_eq!(p.cache_read, p.input);

    // GPT-5.4's long-context tier starts above 272k.
    let (_, p) = t.lookup("gpt-5.4").unwrap();
    assert_eq!(p.above_200k.unwrap().above_tokens, 272_000);

    // Reviewed corrections to LiteLLM's file (docs/pricing.md): 1h writes are 2x input.
    assert_eq!(
        t.lookup("claude-3-haiku").unwrap().1.cache_write_1h,
        pm("0.50")
    );
    assert_eq!(
        t.lookup("claude-3-opus").unwrap().1.cache_write_1h,
        pm("30")
    );
}

#[test]
fn per_million_conversion_is_exact() {
    assert_eq!(pm("3.00"), AttoUsd(3_000_000_000_000));
    assert_eq!(pm("0.075"), AttoUsd(75_000_000_000));
    assert_eq!(pm("0.003625"), AttoUsd(3_625_000_000));
    assert_eq!(
        pm("0.000000000001"),
        AttoUsd(1),
        "12 decimals per million is 1 atto per token"
    );
    assert!(
        table::per_million("0.0000000000001").is_err(),
        "below 1 atto per token is refused, not rounded"
    );
    assert!(table::per_million("-1").is_err());
}

#[test]
fn table_format_errors_name_the_model_and_field() {
    let bad = r#"{"format":"llmwarden-prices/1","unit":"USD per 1M tokens","models":{
        "m-1":{"provider":"x","input":"1.5x","output":"2"}}}"#;
    let e = PriceTable::from_table_json(bad, "t.json")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("t.json") && e.contains("m-1") && e.contains("input"),
        "{e}"
    );
    let typo = r#"{"format":"llmwarden-prices/1","unit":"USD per 1M tokens","models":{
        "m-1":{"provider":"x","input":"1","output":"2","cache_reed":"1"}}}"#;
    assert!(
        PriceTable::from_table_json(typo, "t.json").is_err(),
        "unknown fields are refused"
    );
    let unit = r#"{"format":"llmwarden-prices/1","unit":"USD per token","models":{}}"#;
    assert!(PriceTable::from_table_json(unit, "t.json").is_err());
}

// === fixture costs, by hand ===

#[test]
fn openai_chat_fixture_cost() {
    // gpt-4o-mini-2024-07-18: prompt_tokens 1117 of which 1024 cached; 46 completion tokens.
    //   plain input  93 x $0.15/M  =  93 * 0.15  / 1000 =  0.013950 USD/1000 -> 13_950 nano
    //   cached     1024 x $0.075/M = 1024 * 0.075 / 1000 ->                    76_800 nano
    //   output       46 x $0.60/M  =  46 * 0.60  / 1000 ->                     27_600 nano
    //   total                                                                 118_350 nano ($0.00011835)
    let t = PriceTable::builtin();
    let u = usage(93, 1024, 0, 0, 46);
    assert_eq!(
        priced(&t, "gpt-4o-mini-2024-07-18", &u),
        ("gpt-4o-mini".to_owned(), 118_350)
    );
}

#[test]
fn anthropic_fixture_cost() {
    // claude-sonnet-4-5-20250929: input 12, cache read 4096, cache write 5m 2048, output 6.
    //   input        12 x $3.00/M ->    36_000 nano
    //   cache read 4096 x $0.30/M -> 1_228_800 nano
    //   write 5m   2048 x $3.75/M -> 7_680_000 nano
    //   output        6 x $15/M   ->    90_000 nano
    //   total                        9_034_800 nano (prompt 6156 tokens: base tier)
    let t = PriceTable::builtin();
    let u = usage(12, 4096, 2048, 0, 6);
    assert_eq!(
        priced(&t, "claude-sonnet-4-5-20250929", &u),
        ("claude-sonnet-4-5".to_owned(), 9_034_800)
    );
}

#[test]
fn gemini_fixture_cost() {
    // gemini-2.5-flash: prompt 8; output = 12 candidates + 50 thoughts = 62.
    //   input   8 x $0.30/M ->   2_400 nano
    //   output 62 x $2.50/M -> 155_000 nano
    //   total                  157_400 nano
    let t = PriceTable::builtin();
    let mut u = usage(8, 0, 0, 0, 62);
    u.reasoning_tokens = 50;
    assert_eq!(
        priced(&t, "models/gemini-2.5-flash", &u),
        ("gemini-2.5-flash".to_owned(), 157_400)
    );
}

#[test]
fn openai_responses_o4_mini_cost() {
    // o4-mini-2025-04-16: input 36, output 1035 (896 of them reasoning, billed as output).
    //   input    36 x $1.10/M ->    39_600 nano
    //   output 1035 x $4.40/M -> 4_554_000 nano
    //   total                    4_593_600 nano
    let t = PriceTable::builtin();
    let mut u = usage(36, 0, 0, 0, 1035);
    u.reasoning_tokens = 896;
    assert_eq!(
        priced(&t, "o4-mini-2025-04-16", &u),
        ("o4-mini".to_owned(), 4_593_600)
    );
}

#[test]
fn one_hour_cache_write_cost() {
    // claude-opus-4-5: input 10, write 5m 1000, write 1h 10_000, output 500.
    //   input       10 x $5.00/M  ->      50_000 nano
    //   write 5m  1000 x $6.25/M  ->   6_250_000 nano
    //   write 1h 10000 x $10.00/M -> 100_000_000 nano
    //   output     500 x $25/M    ->  12_500_000 nano
    //   total                        118_800_000 nano
    let t = PriceTable::builtin();
    assert_eq!(
        priced(
            &t,
            "claude-opus-4-5-20251101",
            &usage(10, 0, 1000, 10_000, 500)
        )
        .1,
        118_800_000
    );
}

#[test]
fn long_context_tier_applies_to_the_whole_call() {
    let t = PriceTable::builtin();
    // claude-sonnet-4-5, prompt = 150_000 + 60_000 + 1_000 = 211_000 > 200_000: every class at the tier.
    //   input   150_000 x $6.00/M  -> 900_000_000 nano
    //   read     60_000 x $0.60/M  ->  36_000_000 nano
    //   write 1h  1_000 x $12.00/M ->  12_000_000 nano
    //   output    2_000 x $22.50/M ->  45_000_000 nano
    //   total                         993_000_000 nano
    assert_eq!(
        priced(
            &t,
            "claude-sonnet-4-5",
            &usage(150_000, 60_000, 0, 1_000, 2_000)
        )
        .1,
        993_000_000
    );
    // Exactly 200_000 prompt tokens stays in the base tier:
    //   input 139_000 x $3 = 417_000_000; read 60_000 x $0.30 = 18_000_000; 1h 1_000 x $6 = 6_000_000;
    //   output 2_000 x $15 = 30_000_000; total 471_000_000.
    assert_eq!(
        priced(
            &t,
            "claude-sonnet-4-5",
            &usage(139_000, 60_000, 0, 1_000, 2_000)
        )
        .1,
        471_000_000
    );
    // gemini-2.5-pro: 250_000 x $2.50 = 625_000_000; 1_000 x $15 = 15_000_000 -> 640_000_000.
    assert_eq!(
        priced(&t, "gemini-2.5-pro", &usage(250_000, 0, 0, 0, 1_000)).1,
        640_000_000
    );
    // gpt-5.4: the tier starts above 272k. 272_000 x $2.50 = 680_000_000; 272_001 x $5.00 = 1_360_005_000.
    assert_eq!(
        priced(&t, "gpt-5.4", &usage(272_000, 0, 0, 0, 0)).1,
        680_000_000
    );
    assert_eq!(
        priced(&t, "gpt-5.4", &usage(272_001, 0, 0, 0, 0)).1,
        1_360_005_000
    );
}

#[test]
fn rounds_up_once_per_call() {
    let t = PriceTable::builtin();
    // deepseek-v4-pro cache reads are $0.003625/M = 3.625 nano per token: 1 token -> 4 nano;
    // 8 tokens = 29 nano exactly.
    assert_eq!(priced(&t, "deepseek-v4-pro", &usage(0, 1, 0, 0, 0)).1, 4);
    assert_eq!(priced(&t, "deepseek-v4-pro", &usage(0, 8, 0, 0, 0)).1, 29);
    // gemini-2.0-flash-lite: 1 input (75) + 1 cached (18.75) + 1 output (300) = 393.75 -> 394.
    assert_eq!(
        priced(&t, "gemini-2.0-flash-lite", &usage(1, 1, 0, 0, 1)).1,
        394
    );
    assert_eq!(
        priced(&t, "gpt-5-nano", &Usage::default()).1,
        0,
        "no tokens, no cost"
    );
    // Once per call, not per class: 0.4 nano input + 0.4 nano output = 0.8 -> 1 (per class: 2).
    let json = r#"{"format":"llmwarden-prices/1","unit":"USD per 1M tokens","models":{
        "tiny":{"provider":"x","input":"0.0004","output":"0.0004"}}}"#;
    let tiny = PriceTable::from_table_json(json, "t.json").unwrap();
    assert_eq!(priced(&tiny, "tiny", &usage(1, 0, 0, 0, 1)).1, 1);
    assert_eq!(
        priced(&tiny, "tiny", &usage(5, 0, 0, 0, 0)).1,
        2,
        "2.0 nano exactly stays 2"
    );
    assert_eq!(
        priced(&tiny, "tiny", &usage(6, 0, 0, 0, 0)).1,
        3,
        "2.4 nano rounds up to 3"
    );
}

#[test]
fn max_cost_is_the_worst_case() {
    let t = PriceTable::builtin();
    // gpt-4o-mini: 1_000 x $0.15 = 150_000; 500 x $0.60 = 300_000 -> 450_000.
    assert_eq!(
        t.max_cost("gpt-4o-mini", 1_000, 500).nanos(),
        Some(Nanos(450_000))
    );
    // claude-sonnet-4-5 above 200k: 250_000 x $6 = 1_500_000_000; 1_000 x $22.50 = 22_500_000.
    assert_eq!(
        t.max_cost("claude-sonnet-4-5", 250_000, 1_000).nanos(),
        Some(Nanos(1_522_500_000))
    );
    assert_eq!(
        t.max_cost("no-such-model", 1, 1),
        Cost::Unpriced {
            model: "no-such-model".to_owned()
        }
    );
}

#[test]
fn separately_priced_reasoning() {
    let json = r#"{"format":"llmwarden-prices/1","unit":"USD per 1M tokens","models":{
        "r-1":{"provider":"x","input":"1","output":"2","reasoning":"3"}}}"#;
    let t = PriceTable::from_table_json(json, "t.json").unwrap();
    let mut u = usage(0, 0, 0, 0, 1_000);
    u.reasoning_tokens = 400;
    // 600 x $2 = 1_200_000; 400 x $3 = 1_200_000 -> 2_400_000.
    assert_eq!(priced(&t, "r-1", &u).1, 2_400_000);
    // Worst case bills all output at the dearer rate: 1_000 x $3 = 3_000_000.
    assert_eq!(t.max_cost("r-1", 0, 1_000).nanos(), Some(Nanos(3_000_000)));
}

// === unknown models and normalisation ===

#[test]
fn unknown_model_is_unpriced_never_free() {
    let t = PriceTable::builtin();
    let c = t.cost("llama-3-70b-local", &usage(10, 0, 0, 0, 10));
    assert_eq!(
        c,
        Cost::Unpriced {
            model: "llama-3-70b-local".to_owned()
        }
    );
    assert_eq!(c.nanos(), None);
    assert!(!c.is_priced());
    assert!(
        PriceTable::empty()
            .cost("gpt-4o", &usage(1, 0, 0, 0, 1))
            .nanos()
            .is_none()
    );
}

#[test]
fn normalisation() {
    let t = PriceTable::builtin();
    let id = |m: &str| t.lookup(m).map(|(id, _)| id.to_owned());
    let cases = [
        ("claude-sonnet-4-5-20250929", Some("claude-sonnet-4-5")),
        ("gpt-4o-mini-2024-07-18", Some("gpt-4o-mini")),
        ("gpt-4.1-2025-04-14", Some("gpt-4.1")),
        ("gpt-5-mini-2025-08-07", Some("gpt-5-mini")),
        ("o1-2024-12-17", Some("o1")),
        ("models/gemini-2.5-flash", Some("gemini-2.5-flash")),
        (
            "publishers/google/models/gemini-2.5-pro",
            Some("gemini-2.5-pro"),
        ),
        ("anthropic/claude-opus-4-5", Some("claude-opus-4-5")),
        ("gemini/gemini-2.5-flash", Some("gemini-2.5-flash")),
        ("azure/gpt-4o", Some("gpt-4o")),
        ("GPT-4o", Some("gpt-4o")),
        ("  gpt-4o  ", Some("gpt-4o")),
        ("claude-3-7-sonnet-latest", Some("claude-3-7-sonnet")),
        ("claude-3-haiku-20240307", Some("claude-3-haiku")),
        ("claude-sonnet-4-5-20250929-v1:0", Some("claude-sonnet-4-5")),
        (
            "us.anthropic.claude-sonnet-4-5-20250929-v1:0",
            Some("claude-sonnet-4-5"),
        ),
        ("claude-opus-4-1@20250805", Some("claude-opus-4-1")),
        // Exact match beats normalisation: this snapshot has its own (higher) price.
        ("gpt-4o-2024-05-13", Some("gpt-4o-2024-05-13")),
        // Never across families.
        ("gpt-4o-mini", Some("gpt-4o-mini")),
        ("gpt-4o-mini-tts", None),
        ("gpt-4o-mini-transcribe-2025-03-20", None),
        ("gpt-4o-foo", None),
        ("gpt-5-turbo", None),
        ("claude-sonnet", None),
        ("ft:gpt-4o-mini-2024-07-18:acme::abc123", None),
        ("", None),
    ];
    for (name, want) in cases {
        assert_eq!(id(name).as_deref(), want, "lookup({name:?})");
    }
    let (_, snapshot) = t.lookup("gpt-4o-2024-05-13").unwrap();
    assert_eq!(snapshot.input, pm("5.00"));
}

#[test]
fn azure_deployment_alias() {
    let mut t = PriceTable::builtin();
    t.with_alias("Prod-Chat", "gpt-4o-mini-2024-07-18");
    assert_eq!(t.lookup("prod-chat").map(|(id, _)| id), Some("gpt-4o-mini"));
    assert_eq!(t.lookup("PROD-CHAT").map(|(id, _)| id), Some("gpt-4o-mini"));
    // An alias to an unknown model stays unpriced rather than guessing.
    t.with_alias("mystery", "my-finetune");
    assert!(t.lookup("mystery").is_none());
    // The alias lives in the clone only.
    assert!(PriceTable::builtin().lookup("prod-chat").is_none());
}

// === LiteLLM files ===

/// The project's own LiteLLM-format fixture: every shape the reader handles (per-token prices,
/// cache read / 5 m / 1 h writes, 200k and 272k long-context tiers, `litellm_provider`, a
/// provider-prefixed key, skipped non-token modes, LiteLLM's `sample_spec` and comment entries,
/// unknown fields).
const LITELLM_FIXTURE: &str = include_str!("../../tests/fixtures/litellm-prices.json");

fn load_fixture(t: &mut PriceTable) -> LoadReport {
    t.load_litellm_str(LITELLM_FIXTURE, "ledger/tests/fixtures/litellm-prices.json")
        .unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn loads_the_litellm_fixture() {
    let mut t = PriceTable::builtin();
    let report = load_fixture(&mut t);
    // 12 token-metered entries (chat, responses, embedding, completion); image generation,
    // transcription and speech are skipped.
    assert_eq!((report.loaded, report.skipped), (12, 3), "{report:?}");
    assert!(report.rejected.is_empty(), "{:?}", report.rejected);

    // The fixture's figures, exact from the JSON text.
    let (id, p) = t.lookup("claude-sonnet-4-5-20250929").unwrap();
    assert_eq!(
        id, "claude-sonnet-4-5-20250929",
        "the file's own dated entry is exact"
    );
    assert_eq!(
        (p.input, p.cache_write_1h),
        (AttoUsd(3_000_000_000_000), AttoUsd(6_000_000_000_000))
    );
    let tier = p.above_200k.unwrap();
    assert_eq!((tier.input, tier.cache_write_1h), (pm("6"), pm("12")));
    let (_, p) = t.lookup("gpt-5.6-terra").unwrap();
    assert_eq!(p.cache_write_5m, AttoUsd(3_125_000_000_000), "3.125e-06");
    assert_eq!(p.above_200k.unwrap().above_tokens, 272_000);
    assert_eq!(p.provider.as_deref(), Some("openai"));
    // A model only the file knows is now priced, under its provider-prefixed key too.
    assert!(PriceTable::builtin().lookup("claude-sonnet-5").is_none());
    assert_eq!(
        t.lookup("claude-sonnet-5")
            .map(|(_, p)| (p.input, p.cache_write_1h)),
        Some((pm("2"), pm("4")))
    );
    assert!(t.lookup("anthropic/claude-sonnet-5").is_some());
    // Modes that are not token-metered stay unpriced.
    assert!(t.lookup("gpt-image-1").is_none() && t.lookup("whisper-1").is_none());

    // The fixture costs are the same under the file as under the built-in table.
    let cases = [
        ("gpt-4o-mini-2024-07-18", usage(93, 1024, 0, 0, 46), 118_350),
        (
            "claude-sonnet-4-5-20250929",
            usage(12, 4096, 2048, 0, 6),
            9_034_800,
        ),
        ("gemini-2.5-flash", usage(8, 0, 0, 0, 62), 157_400),
        ("o4-mini-2025-04-16", usage(36, 0, 0, 0, 1035), 4_593_600),
    ];
    for (model, u, want) in cases {
        assert_eq!(
            t.cost(model, &u).nanos(),
            Some(Nanos(want)),
            "{model} under the LiteLLM fixture"
        );
        assert_eq!(
            PriceTable::builtin().cost(model, &u).nanos(),
            Some(Nanos(want)),
            "{model} under the built-in table"
        );
    }
}

/// Every built-in price equals the fixture's figure for the same id: the two are written from
/// the same public price lists, so a difference is a typo in one of them.
#[test]
fn builtin_agrees_with_the_litellm_fixture() {
    let builtin = PriceTable::builtin();
    let mut file = PriceTable::empty();
    load_fixture(&mut file);
    let names: BTreeMap<String, serde_json::Value> =
        serde_json::from_str(LITELLM_FIXTURE).expect("the fixture is JSON");
    let mut compared = Vec::new();
    for name in names.keys() {
        let (Some((_, f)), Some((id, b))) = (file.lookup(name), builtin.lookup(name)) else {
            continue;
        };
        compared.push(id);
        assert_eq!((b.input, b.output), (f.input, f.output), "{name}");
        assert_eq!(
            b.above_200k
                .map(|t| (t.above_tokens, t.input, t.output, t.cache_read)),
            f.above_200k
                .map(|t| (t.above_tokens, t.input, t.output, t.cache_read)),
            "{name} tier"
        );
        assert_eq!(b.cache_read, f.cache_read, "{name} cache read");
        assert_eq!(
            (b.cache_write_5m, b.cache_write_1h),
            (f.cache_write_5m, f.cache_write_1h),
            "{name} writes"
        );
        assert_eq!(
            b.max_output_tokens, f.max_output_tokens,
            "{name} max output"
        );
    }
    assert_eq!(
        compared.len(),
        11,
        "every priced fixture model but claude-sonnet-5 is built in: {compared:?}"
    );
}

fn temp_file(name: &str, text: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let path = std::env::temp_dir().join(format!(
        "llmwarden-{name}-{}-{nanos}.json",
        std::process::id()
    ));
    std::fs::write(&path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    path
}

#[test]
fn litellm_override_layer() {
    let text = r#"{
        "sample_spec": {"input_cost_per_token": 0.0, "mode": "one of: chat, embedding, ..."},
        "gpt-4o-mini": {"input_cost_per_token": 1e-06, "output_cost_per_token": 2e-06, "mode": "chat",
                        "litellm_provider": "openai", "max_output_tokens": 16384},
        "anthropic/claude-new-9": {"input_cost_per_token": "4e-06", "output_cost_per_token": 2e-05,
                        "cache_creation_input_token_cost": 5e-06, "litellm_provider": "anthropic"},
        "azure/eu/claude-new-9": {"input_cost_per_token": 9e-06, "output_cost_per_token": 9e-05},
        "exact-1": {"input_cost_per_token": 3.0000000000000001e-06, "output_cost_per_token": 0},
        "bad-price": {"input_cost_per_token": "abc", "output_cost_per_token": 1e-06, "mode": "chat"},
        "negative": {"input_cost_per_token": -1e-06, "output_cost_per_token": 1e-06},
        "no-input": {"output_cost_per_token": 1e-06},
        "bad-max": {"input_cost_per_token": 1e-06, "output_cost_per_token": 1e-06, "max_output_tokens": "lots"},
        "dall-e-9": {"input_cost_per_token": 1e-06, "mode": "image_generation"},
        "not-an-object": 5
    }"#;
    let path = temp_file("override", text);
    let mut t = PriceTable::builtin();
    let before = t.clone();
    let report = t.load_litellm_report(&path);
    let _ = std::fs::remove_file(&path);
    let report = report.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((report.loaded, report.skipped), (4, 1), "{report:?}");
    let errors: Vec<String> = report.rejected.iter().map(ToString::to_string).collect();
    assert_eq!(errors.len(), 5, "{errors:?}");
    for (model, field) in [
        ("bad-price", "input_cost_per_token"),
        ("negative", "input_cost_per_token"),
        ("no-input", "input_cost_per_token"),
        ("bad-max", "max_output_tokens"),
        ("not-an-object", "not a JSON object"),
    ] {
        assert!(
            errors
                .iter()
                .any(|e| e.contains(model) && e.contains(field)),
            "no error for {model}/{field}: {errors:?}"
        );
    }

    // The file replaces the built-in gpt-4o-mini, and snapshots normalise onto the new price.
    let (_, p) = t.lookup("gpt-4o-mini-2024-07-18").unwrap();
    assert_eq!(
        (p.input, p.cache_read),
        (pm("1"), pm("1")),
        "no cache price in the file: reads cost input"
    );
    assert_eq!(
        before.lookup("gpt-4o-mini").unwrap().1.input,
        pm("0.15"),
        "clones are independent"
    );
    // A prefixed key is found by its full name and by its canonical id; the less specific key
    // ("anthropic/") wins the canonical slot over "azure/eu/".
    assert_eq!(
        t.lookup("claude-new-9").map(|(id, p)| (id, p.input)),
        Some(("claude-new-9", pm("4")))
    );
    assert_eq!(
        t.lookup("azure/eu/claude-new-9")
            .map(|(id, p)| (id, p.input)),
        Some(("claude-new-9", pm("9")))
    );
    let (_, p) = t.lookup("claude-new-9").unwrap();
    assert_eq!(
        (p.cache_write_5m, p.cache_write_1h),
        (pm("5"), pm("5")),
        "1h writes default to the 5m price"
    );
    // Numbers are read from their text: an f64 would lose the trailing 1e-22 (rounded up to 1 atto).
    assert_eq!(
        t.lookup("exact-1").unwrap().1.input,
        AttoUsd(3_000_000_000_001)
    );
    assert!(t.lookup("dall-e-9").is_none() && t.lookup("bad-price").is_none());
    assert!(
        t.lookup("claude-sonnet-4-5").is_some(),
        "built-ins the file does not mention stay"
    );
}

#[test]
fn litellm_unreadable_or_invalid_file_is_an_error_and_changes_nothing() {
    let mut t = PriceTable::builtin();
    let n = t.len();
    let missing = std::env::temp_dir().join("llmwarden-no-such-price-file.json");
    let e = t.load_litellm_file(&missing).unwrap_err().to_string();
    assert!(
        e.contains("llmwarden-no-such-price-file.json") && e.contains("cannot read"),
        "{e}"
    );
    for bad in ["{not json", "[1, 2]", "\"text\""] {
        let e = t.load_litellm_str(bad, "bad.json").unwrap_err();
        assert!(matches!(e, Error::PriceFile { .. }), "{e}");
    }
    assert_eq!(t.len(), n);
    let path = temp_file(
        "count",
        r#"{"m-a": {"input_cost_per_token": 1e-06, "output_cost_per_token": 1e-06}}"#,
    );
    let loaded = t.load_litellm_file(&path);
    let _ = std::fs::remove_file(&path);
    assert_eq!(loaded.unwrap_or_else(|e| panic!("{e}")), 1);
}
