//! Prices: the project's own per-model price table (`ledger/prices.json`), an optional LiteLLM
//! override layer, model-name normalisation, and exact per-call cost.
//!
//! Every price is an exact [`AttoUsd`] amount per token. A call's cost is the sum of each token
//! class times its price, computed in `i128` and rounded up to [`Nanos`] once
//! ([`AttoUsd::ceil_nanos`]). A model the table does not know is [`Cost::Unpriced`], never $0.
//! The format, arithmetic and rules are documented in `docs/pricing.md`.

mod litellm;
mod normalise;
mod table;
#[cfg(test)]
mod tests;

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use crate::Error;
use crate::money::{AttoUsd, Nanos};
use crate::usage::Usage;

/// The prompt size above which Anthropic and Gemini long-context prices apply.
pub const LONG_CONTEXT_200K: u64 = 200_000;

/// The price of one model: exact atto-USD per token for every billed token class.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelPrice {
    /// Plain (uncached) input tokens.
    pub input: AttoUsd,
    /// Output tokens, reasoning included.
    pub output: AttoUsd,
    /// Cached input read back (OpenAI cached tokens, Anthropic cache reads, Gemini cached content).
    pub cache_read: AttoUsd,
    /// Anthropic 5-minute cache writes (the input price where the provider has no write price).
    pub cache_write_5m: AttoUsd,
    /// Anthropic 1-hour cache writes (the 5-minute write price where none is given).
    pub cache_write_1h: AttoUsd,
    /// Reasoning output, when priced apart from other output (LiteLLM
    /// `output_cost_per_reasoning_token`); `None` bills reasoning at [`ModelPrice::output`].
    pub reasoning: Option<AttoUsd>,
    /// The long-context tier. It is named for the usual 200k threshold; the tier's
    /// [`TierPrice::above_tokens`] holds the real one (272k for the GPT-5.4 generation).
    pub above_200k: Option<TierPrice>,
    /// The model's output limit, when known.
    pub max_output_tokens: Option<u64>,
    /// The model's context (input) limit, when known.
    pub max_input_tokens: Option<u64>,
    /// Who sells the model ("openai", "anthropic", "gemini", "deepseek", ...), when known.
    pub provider: Option<String>,
}

/// Long-context prices: they apply to the **whole call** when its prompt is larger than
/// `above_tokens`, as Anthropic, Gemini and OpenAI bill them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TierPrice {
    /// The tier applies when `Usage::prompt_tokens()` is strictly greater than this.
    pub above_tokens: u64,
    /// Plain input tokens.
    pub input: AttoUsd,
    /// Output tokens.
    pub output: AttoUsd,
    /// Cache reads.
    pub cache_read: AttoUsd,
    /// 5-minute cache writes.
    pub cache_write_5m: AttoUsd,
    /// 1-hour cache writes.
    pub cache_write_1h: AttoUsd,
}

/// The per-token rates that apply to one call (base or long-context tier).
#[derive(Debug, Clone, Copy)]
struct Rates {
    input: AttoUsd,
    output: AttoUsd,
    cache_read: AttoUsd,
    cache_write_5m: AttoUsd,
    cache_write_1h: AttoUsd,
    /// Reasoning price when it differs from output (base tier only).
    reasoning: Option<AttoUsd>,
}

impl ModelPrice {
    /// The rates for a call whose prompt has `prompt_tokens` tokens.
    fn rates(&self, prompt_tokens: u64) -> Rates {
        match self.above_200k {
            Some(t) if prompt_tokens > t.above_tokens => Rates {
                input: t.input,
                output: t.output,
                cache_read: t.cache_read,
                cache_write_5m: t.cache_write_5m,
                cache_write_1h: t.cache_write_1h,
                reasoning: None,
            },
            _ => Rates {
                input: self.input,
                output: self.output,
                cache_read: self.cache_read,
                cache_write_5m: self.cache_write_5m,
                cache_write_1h: self.cache_write_1h,
                reasoning: self.reasoning,
            },
        }
    }

    /// The exact cost of a call before rounding.
    #[must_use]
    pub fn cost_atto(&self, usage: &Usage) -> AttoUsd {
        let r = self.rates(usage.prompt_tokens());
        let (plain_out, reasoning_out, reasoning_rate) = match r.reasoning {
            Some(rate) => {
                let reasoning = usage.reasoning_tokens.min(usage.output_tokens);
                (usage.output_tokens - reasoning, reasoning, rate)
            }
            None => (usage.output_tokens, 0, r.output),
        };
        r.input
            .times(usage.input_tokens)
            .plus(r.cache_read.times(usage.cache_read_tokens))
            .plus(r.cache_write_5m.times(usage.cache_write_5m_tokens))
            .plus(r.cache_write_1h.times(usage.cache_write_1h_tokens))
            .plus(r.output.times(plain_out))
            .plus(reasoning_rate.times(reasoning_out))
    }

    /// The cost of a call in nano-USD, rounded up once.
    #[must_use]
    pub fn cost(&self, usage: &Usage) -> Nanos {
        Nanos(self.cost_atto(usage).ceil_nanos())
    }

    /// The worst case of a call before it runs, for reservations: every input token at the
    /// input price (the long-context price when `input_tokens` is above the tier threshold) and
    /// `max_output_tokens` at the dearest output price.
    #[must_use]
    pub fn max_cost(&self, input_tokens: u64, max_output_tokens: u64) -> Nanos {
        self.max_cost_writing(input_tokens, max_output_tokens, false)
    }

    /// [`ModelPrice::max_cost`] for a request that may write the prompt cache (Anthropic
    /// `cache_control`): every input token at the dearest of the input and cache-write prices,
    /// since a 1-hour write bills up to 2× the input price.
    #[must_use]
    pub fn max_cost_writing(
        &self,
        input_tokens: u64,
        max_output_tokens: u64,
        cache_writes: bool,
    ) -> Nanos {
        let r = self.rates(input_tokens);
        let out_rate = r.reasoning.map_or(r.output, |p| p.max(r.output));
        let in_rate = if cache_writes {
            r.input.max(r.cache_write_5m).max(r.cache_write_1h)
        } else {
            r.input
        };
        Nanos(
            in_rate
                .times(input_tokens)
                .plus(out_rate.times(max_output_tokens))
                .ceil_nanos(),
        )
    }
}

/// The result of pricing a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cost {
    /// The model is known; `model` is its canonical id in the table.
    Priced {
        /// Canonical model id the price came from.
        model: String,
        /// The cost, rounded up to nano-USD once.
        nanos: Nanos,
    },
    /// The model is not in the table: the cost is unknown, which is not the same as free.
    Unpriced {
        /// The model name as the caller gave it.
        model: String,
    },
}

impl Cost {
    /// The amount when priced; `None` for an unknown model (never a silent $0).
    #[must_use]
    pub fn nanos(&self) -> Option<Nanos> {
        match self {
            Cost::Priced { nanos, .. } => Some(*nanos),
            Cost::Unpriced { .. } => None,
        }
    }

    /// The canonical id when priced, else the name as given.
    #[must_use]
    pub fn model(&self) -> &str {
        match self {
            Cost::Priced { model, .. } | Cost::Unpriced { model } => model,
        }
    }

    /// Whether the model was found.
    #[must_use]
    pub fn is_priced(&self) -> bool {
        matches!(self, Cost::Priced { .. })
    }
}

/// What loading a LiteLLM price file did: how many models it priced, how many entries it left
/// aside because their mode is not metered (images, audio, ...), and the entries it rejected.
#[derive(Debug, Default)]
pub struct LoadReport {
    /// Entries that now price a model.
    pub loaded: usize,
    /// Entries skipped because their `mode` is not chat, completion, responses or embedding.
    pub skipped: usize,
    /// One [`Error::PriceFile`] per rejected entry, naming the model and the field.
    pub rejected: Vec<Error>,
}

/// One model in the table: its canonical id and price.
#[derive(Debug, Clone)]
struct Entry {
    id: String,
    price: ModelPrice,
}

#[derive(Debug, Clone, Default)]
struct Inner {
    /// Lower-case names (canonical ids and, for LiteLLM entries, their full keys) to prices.
    models: HashMap<String, Entry>,
    /// Lower-case aliases (Azure deployment names) to model names.
    aliases: HashMap<String, String>,
}

/// Model prices keyed by normalised model id. Cloning is cheap (the data sits behind an `Arc`);
/// [`PriceTable::lookup`] allocates nothing unless the name has upper-case letters.
#[derive(Debug, Clone, Default)]
pub struct PriceTable {
    inner: Arc<Inner>,
}

static BUILTIN: OnceLock<PriceTable> = OnceLock::new();

impl PriceTable {
    /// The project's own table, `ledger/prices.json`, parsed once per process.
    ///
    /// # Panics
    /// Never in a released build: the built-in table is checked by a unit test.
    #[must_use]
    pub fn builtin() -> PriceTable {
        BUILTIN
            .get_or_init(|| {
                PriceTable::from_table_json(
                    include_str!("../prices.json"),
                    "ledger/prices.json (built in)",
                )
                .expect("the built-in price table parses (unit test `builtin_table_parses`)")
            })
            .clone()
    }

    /// A table with no models: every call is unpriced until a file is loaded.
    #[must_use]
    pub fn empty() -> PriceTable {
        PriceTable::default()
    }

    /// Parses a table in the project's own format (see `docs/pricing.md`).
    ///
    /// # Errors
    /// [`Error::PriceFile`] naming `origin`, the model and the field.
    pub fn from_table_json(text: &str, origin: &str) -> Result<PriceTable, Error> {
        let mut inner = Inner::default();
        for (id, price) in table::parse(text, origin)? {
            inner.models.insert(id.clone(), Entry { id, price });
        }
        Ok(PriceTable {
            inner: Arc::new(inner),
        })
    }

    /// Loads a LiteLLM `model_prices_and_context_window.json` as an override layer and logs
    /// rejected entries as warnings. Returns how many models it priced.
    ///
    /// # Errors
    /// [`Error::PriceFile`] when the file cannot be read or is not a JSON object; the table is
    /// then unchanged. Individual bad entries do not fail the load (see
    /// [`PriceTable::load_litellm_report`]).
    pub fn load_litellm_file(&mut self, path: &Path) -> Result<usize, Error> {
        let report = self.load_litellm_report(path)?;
        for e in &report.rejected {
            tracing::warn!(error = %e, "skipped a LiteLLM price entry");
        }
        Ok(report.loaded)
    }

    /// Like [`PriceTable::load_litellm_file`], returning the full [`LoadReport`] instead of
    /// logging.
    ///
    /// # Errors
    /// [`Error::PriceFile`] when the file cannot be read or is not a JSON object.
    pub fn load_litellm_report(&mut self, path: &Path) -> Result<LoadReport, Error> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| Error::PriceFile {
            path: origin.clone(),
            detail: format!("cannot read it: {e}; check the `prices.litellm_file` path"),
        })?;
        self.load_litellm_str(&text, &origin)
    }

    /// Loads LiteLLM-format JSON text; `origin` names it in errors.
    ///
    /// # Errors
    /// [`Error::PriceFile`] when the text is not a JSON object of models.
    pub fn load_litellm_str(&mut self, text: &str, origin: &str) -> Result<LoadReport, Error> {
        let parsed = litellm::parse(text, origin)?;
        let inner = Arc::make_mut(&mut self.inner);
        for (key, entry) in parsed.entries {
            inner.models.insert(key, entry);
        }
        Ok(parsed.report)
    }

    /// Maps a deployment name (Azure OpenAI) or any other alias to a model name; the alias wins
    /// over a model of the same name, and the target is normalised at lookup time.
    pub fn with_alias(&mut self, alias: &str, model: &str) {
        let inner = Arc::make_mut(&mut self.inner);
        inner.aliases.insert(
            alias.trim().to_ascii_lowercase(),
            model.trim().to_ascii_lowercase(),
        );
    }

    /// Finds a model's canonical id and price: alias, then exact name, then the normalisation
    /// steps of `docs/pricing.md` (provider prefixes, `models/`, Bedrock ids, `@version`,
    /// `-latest`, dated snapshots). Never matches across families.
    #[must_use]
    pub fn lookup(&self, model: &str) -> Option<(&str, &ModelPrice)> {
        let name = lower(model.trim());
        let name: &str = &name;
        let name = self.inner.aliases.get(name).map_or(name, String::as_str);
        normalise::resolve(name, |n| self.inner.models.get(n)).map(|e| (e.id.as_str(), &e.price))
    }

    /// The cost of a call with this usage.
    #[must_use]
    pub fn cost(&self, model: &str, usage: &Usage) -> Cost {
        match self.lookup(model) {
            Some((id, price)) => Cost::Priced {
                model: id.to_owned(),
                nanos: price.cost(usage),
            },
            None => Cost::Unpriced {
                model: model.to_owned(),
            },
        }
    }

    /// The worst-case cost of a call, for reservations (see [`ModelPrice::max_cost`]).
    #[must_use]
    pub fn max_cost(&self, model: &str, input_tokens: u64, max_output_tokens: u64) -> Cost {
        match self.lookup(model) {
            Some((id, price)) => Cost::Priced {
                model: id.to_owned(),
                nanos: price.max_cost(input_tokens, max_output_tokens),
            },
            None => Cost::Unpriced {
                model: model.to_owned(),
            },
        }
    }

    /// How many names the table prices (canonical ids plus full LiteLLM keys).
    #[must_use]
    pub fn len(&self) -> usize {
        self.inner.models.len()
    }

    /// Whether the table prices nothing.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.inner.models.is_empty()
    }
}

/// Lower-cases ASCII, borrowing when the name already is (the common case).
fn lower(s: &str) -> Cow<'_, str> {
    if s.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(s.to_ascii_lowercase())
    } else {
        Cow::Borrowed(s)
    }
}

/// Optional per-token prices as read from a file, before the documented defaults are applied.
#[derive(Debug, Default, Clone, Copy)]
struct PriceParts {
    input: AttoUsd,
    output: AttoUsd,
    cache_read: Option<AttoUsd>,
    cache_write_5m: Option<AttoUsd>,
    cache_write_1h: Option<AttoUsd>,
}

/// A long-context tier as read from a file; missing fields are scaled from the base prices.
#[derive(Debug, Default, Clone, Copy)]
struct TierParts {
    above_tokens: u64,
    input: Option<AttoUsd>,
    output: Option<AttoUsd>,
    cache_read: Option<AttoUsd>,
    cache_write_5m: Option<AttoUsd>,
    cache_write_1h: Option<AttoUsd>,
}

impl PriceParts {
    /// Applies the defaults: cache reads and 5-minute writes cost the input price when the file
    /// has none; 1-hour writes cost the 5-minute write price.
    fn base(self) -> (AttoUsd, AttoUsd, AttoUsd, AttoUsd, AttoUsd) {
        let cache_write_5m = self.cache_write_5m.unwrap_or(self.input);
        (
            self.input,
            self.output,
            self.cache_read.unwrap_or(self.input),
            cache_write_5m,
            self.cache_write_1h.unwrap_or(cache_write_5m),
        )
    }

    /// Resolves a tier: a missing field is the base price of that class scaled by the tier's
    /// input multiplier (tier input / base input), rounded up; a missing tier input is the base
    /// input.
    fn tier(self, t: TierParts) -> TierPrice {
        let (input, output, cache_read, cw5, cw1h) = self.base();
        let tier_input = t.input.unwrap_or(input);
        let scale = |base: AttoUsd| -> AttoUsd {
            if input.0 <= 0 {
                return base.max(tier_input);
            }
            let n = base.0.saturating_mul(tier_input.0);
            AttoUsd(n / input.0 + i128::from(n % input.0 != 0))
        };
        TierPrice {
            above_tokens: t.above_tokens,
            input: tier_input,
            output: t.output.unwrap_or_else(|| scale(output)),
            cache_read: t.cache_read.unwrap_or_else(|| scale(cache_read)),
            cache_write_5m: t.cache_write_5m.unwrap_or_else(|| scale(cw5)),
            cache_write_1h: t.cache_write_1h.unwrap_or_else(|| scale(cw1h)),
        }
    }

    fn into_price(
        self,
        reasoning: Option<AttoUsd>,
        tier: Option<TierParts>,
        max_input_tokens: Option<u64>,
        max_output_tokens: Option<u64>,
        provider: Option<String>,
    ) -> ModelPrice {
        let (input, output, cache_read, cache_write_5m, cache_write_1h) = self.base();
        ModelPrice {
            input,
            output,
            cache_read,
            cache_write_5m,
            cache_write_1h,
            reasoning: reasoning.filter(|r| *r != output),
            above_200k: tier.map(|t| self.tier(t)),
            max_output_tokens,
            max_input_tokens,
            provider,
        }
    }
}
