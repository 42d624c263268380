//! Billing policy both paths share: which model a call is billed as, what a model the price table
//! does not know costs (a configured default, never $0), the worst case a call may cost before it
//! runs, and the record the ledger stores. The enforcer's settle and the observer's record call
//! the same [`Pricing::bill`], so the same usage of the same model costs the same nano-USD on both.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::money::AttoUsd;
use crate::price::{Cost, PriceTable};
use crate::store::TokenCounts;
use crate::usage::Usage;
use crate::{Error, Nanos};

/// Whether a call to a model the price table does not know is admitted (enforcer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnknownModel {
    /// Refuse the call (400) naming `prices_file` as the fix. The safe default.
    #[default]
    Deny,
    /// Admit it, priced at `[unknown_model_price]` (never $0).
    Allow,
}

/// The price of models the table does not know, in USD per million tokens. Both paths bill an
/// unknown model at it, so a price gap shows up as spend (flagged estimated), never as $0.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DefaultPrice {
    /// Input USD per million tokens.
    pub input_usd_per_mtok: f64,
    /// Output USD per million tokens.
    pub output_usd_per_mtok: f64,
    /// Output tokens reserved for an unknown model when the request gives no limit.
    pub max_output_tokens: u64,
}

impl Default for DefaultPrice {
    fn default() -> Self {
        // Priced like a frontier model so an unknown model is never cheap by accident.
        DefaultPrice {
            input_usd_per_mtok: 15.0,
            output_usd_per_mtok: 75.0,
            max_output_tokens: 32_768,
        }
    }
}

/// The pricing half of a binary's config (the enforcer's and the observer's files carry the same
/// keys at top level).
#[derive(Debug, Clone, PartialEq)]
pub struct PricingConfig {
    /// A LiteLLM price file loaded over the built-in table.
    pub prices_file: Option<PathBuf>,
    /// Admission of unknown models (the enforcer; the observer bills what it sees).
    pub unknown_model: UnknownModel,
    /// The price of unknown models.
    pub unknown_model_price: DefaultPrice,
    /// Names (Azure deployment names, internal aliases) mapped to the model they price as.
    pub model_aliases: BTreeMap<String, String>,
    /// Output tokens reserved per choice when a request names no limit, by model; a model not
    /// listed reserves its own maximum from the price table (the true upper bound). A figure
    /// below the model's maximum can under-reserve: a settle above its reservation is counted.
    pub output_token_limits: BTreeMap<String, u64>,
    /// Input tokens reserved for a request that refers to context the proxy cannot see
    /// (`previous_response_id`, `conversation`, `cachedContent`, uploaded files); `None`: the
    /// model's context window from the price table (the true upper bound).
    pub unseen_context_tokens: Option<u64>,
}

impl Default for PricingConfig {
    fn default() -> Self {
        PricingConfig {
            prices_file: None,
            unknown_model: UnknownModel::Deny,
            unknown_model_price: DefaultPrice::default(),
            model_aliases: BTreeMap::new(),
            output_token_limits: BTreeMap::new(),
            unseen_context_tokens: None,
        }
    }
}

/// What a request says about its worst case, as the request parser read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CallShape {
    /// The input-token estimate (margin included).
    pub input_tokens: u64,
    /// The output limit the request declares, all choices together; `None` when it names none.
    pub declared_output: Option<u64>,
    /// Choices the provider generates (`n`, `best_of`, `candidateCount`), at least 1.
    pub choices: u64,
    /// The request refers to context the proxy cannot see (a stored response, a cache, a file).
    pub unseen_context: bool,
    /// The request may write the prompt cache (Anthropic `cache_control`).
    pub cache_writes: bool,
}

/// The worst case of a call: what the reservation holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorstCase {
    /// Input tokens assumed.
    pub input_tokens: u64,
    /// Output tokens assumed (all choices).
    pub output_tokens: u64,
    /// The amount to reserve.
    pub amount: Nanos,
}

/// A model the price table does not know, refused under [`UnknownModel::Deny`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("model {model:?} has no price")]
pub struct Unpriced {
    /// The model as the request named it.
    pub model: String,
}

/// What one call is billed: the model priced, the usage committed and its cost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bill {
    /// The table's canonical id when priced, else the name as the call gave it.
    pub model: String,
    /// The usage committed (an estimate when the provider sent none).
    pub usage: Usage,
    /// The cost, rounded up once to nano-USD.
    pub cost: Nanos,
    /// False when the model had no price and the default price applied.
    pub priced: bool,
}

impl Bill {
    /// Whether the cost is an estimate: no provider usage record, or no price for the model.
    #[must_use]
    pub fn estimated(&self) -> bool {
        self.usage.estimated || !self.priced
    }

    /// The token counts the ledger stores.
    #[must_use]
    pub fn tokens(&self) -> TokenCounts {
        TokenCounts::from(&self.usage)
    }
}

/// The price table plus the policy around it.
#[derive(Debug, Clone)]
pub struct Pricing {
    table: PriceTable,
    unknown: UnknownModel,
    default_in: AttoUsd,
    default_out: AttoUsd,
    default_max_output: u64,
    output_limits: BTreeMap<String, u64>,
    unseen_context: Option<u64>,
}

/// Context assumed for a model the price table does not size, when a request refers to context
/// the proxy cannot see.
const UNSIZED_CONTEXT_TOKENS: u64 = 128_000;

/// USD per million tokens → atto-USD per token, through the number's decimal text (exact).
fn per_token(what: &'static str, usd_per_mtok: f64) -> Result<AttoUsd, Error> {
    if !(usd_per_mtok.is_finite() && usd_per_mtok > 0.0) {
        return Err(Error::Invalid {
            what,
            detail: format!(
                "{usd_per_mtok} is not a positive USD figure (unknown models are never free)"
            ),
        });
    }
    AttoUsd::from_decimal_str(&format!("{usd_per_mtok}e-6")).map_err(|e| Error::Invalid {
        what,
        detail: e.to_string(),
    })
}

impl Pricing {
    /// The built-in table, the config's price file and aliases over it, and the policy.
    ///
    /// # Errors
    /// [`Error::PriceFile`] when the file cannot be loaded; [`Error::Invalid`] for a default
    /// price that is not a positive figure.
    pub fn load(cfg: &PricingConfig) -> Result<Pricing, Error> {
        let mut table = PriceTable::builtin();
        if let Some(p) = &cfg.prices_file {
            table.load_litellm_file(p)?;
        }
        Pricing::new(table, cfg)
    }

    /// The policy of `cfg` around a given table (its `prices_file` is not read).
    ///
    /// # Errors
    /// [`Error::Invalid`] for a default price that is not a positive figure.
    pub fn new(mut table: PriceTable, cfg: &PricingConfig) -> Result<Pricing, Error> {
        for (alias, model) in &cfg.model_aliases {
            table.with_alias(alias, model);
        }
        let d = &cfg.unknown_model_price;
        Ok(Pricing {
            table,
            unknown: cfg.unknown_model,
            default_in: per_token(
                "unknown_model_price.input_usd_per_mtok",
                d.input_usd_per_mtok,
            )?,
            default_out: per_token(
                "unknown_model_price.output_usd_per_mtok",
                d.output_usd_per_mtok,
            )?,
            default_max_output: d.max_output_tokens,
            output_limits: cfg
                .output_token_limits
                .iter()
                .map(|(m, n)| (m.trim().to_ascii_lowercase(), *n))
                .collect(),
            unseen_context: cfg.unseen_context_tokens,
        })
    }

    /// The price table.
    #[must_use]
    pub fn table(&self) -> &PriceTable {
        &self.table
    }

    /// Whether the table prices `model`.
    #[must_use]
    pub fn knows(&self, model: &str) -> bool {
        self.table.lookup(model).is_some()
    }

    /// Output tokens to reserve per choice when a request names no limit: the configured
    /// `output_token_limits` entry (by the name or its canonical id), else the model's own
    /// maximum from the table, else (unknown models, tables without a figure) the default
    /// price's `max_output_tokens`.
    #[must_use]
    pub fn default_output_limit(&self, model: &str) -> u64 {
        let lookup = self.table.lookup(model);
        let configured = self
            .output_limits
            .get(&model.trim().to_ascii_lowercase())
            .or_else(|| lookup.and_then(|(id, _)| self.output_limits.get(id)));
        if let Some(n) = configured {
            return *n;
        }
        lookup
            .and_then(|(_, p)| p.max_output_tokens)
            .unwrap_or(self.default_max_output)
    }

    /// Input tokens to assume for a request that refers to context the proxy cannot see: the
    /// configured figure, else the model's context window, else the default output limit's
    /// order of magnitude (128k) for a model the table does not size.
    #[must_use]
    pub fn unseen_context_tokens(&self, model: &str) -> u64 {
        self.unseen_context.unwrap_or_else(|| {
            self.table
                .lookup(model)
                .and_then(|(_, p)| p.max_input_tokens)
                .unwrap_or(UNSIZED_CONTEXT_TOKENS)
        })
    }

    /// The worst case of a call: its input (at least the model's context when it refers to
    /// context the proxy cannot see; at the dearest input or cache-write price when it may write
    /// the cache) and its output (the declared limit, else the default limit times the
    /// choices), priced at the dearest output price.
    ///
    /// # Errors
    /// [`Unpriced`] when the model has no price and unknown models are denied.
    pub fn worst_case(&self, model: &str, shape: &CallShape) -> Result<WorstCase, Unpriced> {
        let input_tokens = if shape.unseen_context {
            shape.input_tokens.max(self.unseen_context_tokens(model))
        } else {
            shape.input_tokens
        };
        let output_tokens = shape.declared_output.unwrap_or_else(|| {
            self.default_output_limit(model)
                .saturating_mul(shape.choices.max(1))
        });
        let amount = match self.table.lookup(model) {
            Some((_, p)) => p.max_cost_writing(input_tokens, output_tokens, shape.cache_writes),
            None if self.unknown == UnknownModel::Allow => {
                self.at_default(input_tokens, output_tokens)
            }
            None => {
                return Err(Unpriced {
                    model: model.to_owned(),
                });
            }
        };
        Ok(WorstCase {
            input_tokens,
            output_tokens,
            amount,
        })
    }

    fn at_default(&self, input: u64, output: u64) -> Nanos {
        Nanos(
            self.default_in
                .times(input)
                .plus(self.default_out.times(output))
                .ceil_nanos(),
        )
    }

    /// Bills a finished call. The model is the response's when the table knows it, else the
    /// request's (the response of an OpenAI-compatible host may name a model the table lacks);
    /// an unknown model is billed at the default price. Without a usage record the call is billed
    /// from an estimate (flagged) with at least `input_estimate` input tokens.
    #[must_use]
    pub fn bill(
        &self,
        requested: Option<&str>,
        responded: Option<&str>,
        usage: Option<Usage>,
        input_estimate: u64,
    ) -> Bill {
        let mut usage = usage.unwrap_or(Usage {
            estimated: true,
            ..Usage::default()
        });
        if usage.estimated {
            usage.input_tokens = usage.input_tokens.max(input_estimate);
        }
        let name = match (responded, requested) {
            (Some(r), _) if self.knows(r) => r,
            (_, Some(q)) => q,
            (Some(r), None) => r,
            (None, None) => "unknown",
        };
        match self.table.cost(name, &usage) {
            Cost::Priced { model, nanos } => Bill {
                model,
                usage,
                cost: nanos,
                priced: true,
            },
            Cost::Unpriced { model } => Bill {
                cost: Nanos(
                    self.default_in
                        .times(usage.prompt_tokens())
                        .plus(self.default_out.times(usage.output_tokens))
                        .ceil_nanos(),
                ),
                model,
                usage,
                priced: false,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(input: u64, output: u64) -> Usage {
        Usage {
            input_tokens: input,
            output_tokens: output,
            ..Usage::default()
        }
    }

    #[test]
    fn unknown_models_follow_the_policy_and_are_never_free() {
        let deny = Pricing::load(&PricingConfig::default()).unwrap();
        assert_eq!(
            deny.worst_case("no-such-model", &shape(10, Some(10))),
            Err(Unpriced {
                model: "no-such-model".into()
            })
        );
        let allow = Pricing::load(&PricingConfig {
            unknown_model: UnknownModel::Allow,
            ..PricingConfig::default()
        })
        .unwrap();
        // 1000 x $15/M + 100 x $75/M = $0.0225.
        assert_eq!(
            allow
                .worst_case("no-such-model", &shape(1000, Some(100)))
                .map(|w| w.amount),
            Ok(Nanos(22_500_000))
        );
        // Billing does not depend on the admission policy: both bill the default price.
        for p in [&deny, &allow] {
            let b = p.bill(Some("no-such-model"), None, Some(usage(1000, 100)), 0);
            assert_eq!(b.cost, Nanos(22_500_000));
            assert!(!b.priced && b.estimated());
            assert_eq!(b.model, "no-such-model");
        }
        assert_eq!(allow.default_output_limit("no-such-model"), 32_768);
        assert_eq!(allow.default_output_limit("gpt-4o-mini"), 16_384);
    }

    fn shape(input: u64, declared: Option<u64>) -> CallShape {
        CallShape {
            input_tokens: input,
            declared_output: declared,
            choices: 1,
            ..CallShape::default()
        }
    }

    /// The reservation is a true upper bound of what the provider can bill.
    #[test]
    fn the_worst_case_covers_what_the_provider_can_bill() {
        let p = Pricing::load(&PricingConfig::default()).unwrap();
        // No output limit: the model's own maximum, not a 32k clamp (claude-sonnet-4-5: 64k).
        let w = p
            .worst_case("claude-sonnet-4-5", &shape(100, None))
            .unwrap();
        assert_eq!(w.output_tokens, 64_000);
        // n = 3 choices without a limit: three times the per-choice maximum.
        let w3 = p
            .worst_case(
                "gpt-4o-mini",
                &CallShape {
                    choices: 3,
                    ..shape(100, None)
                },
            )
            .unwrap();
        assert_eq!(w3.output_tokens, 3 * 16_384);
        // A declared limit already counts every choice.
        let wd = p
            .worst_case(
                "gpt-4o-mini",
                &CallShape {
                    choices: 3,
                    ..shape(100, Some(300))
                },
            )
            .unwrap();
        assert_eq!(wd.output_tokens, 300);
        // Context the proxy cannot see: the model's whole context window (gpt-4o-mini: 128k).
        let wu = p
            .worst_case(
                "gpt-4o-mini",
                &CallShape {
                    unseen_context: true,
                    ..shape(100, Some(10))
                },
            )
            .unwrap();
        assert_eq!(wu.input_tokens, 128_000);
        // Cache writes: a 1h write bills 2x input, so input is reserved at the write price.
        let plain = p
            .worst_case("claude-sonnet-4-5", &shape(1_000_000, Some(0)))
            .unwrap();
        let writing = p
            .worst_case(
                "claude-sonnet-4-5",
                &CallShape {
                    cache_writes: true,
                    ..shape(1_000_000, Some(0))
                },
            )
            .unwrap();
        assert_eq!(writing.amount.0, 2 * plain.amount.0);
        // A configured per-model limit and context size win.
        let mut cfg = PricingConfig::default();
        cfg.output_token_limits.insert("gpt-4o-mini".into(), 1000);
        cfg.unseen_context_tokens = Some(5000);
        let p = Pricing::load(&cfg).unwrap();
        assert_eq!(p.default_output_limit("gpt-4o-mini-2024-07-18"), 1000);
        assert_eq!(p.unseen_context_tokens("gpt-4o-mini"), 5000);
    }

    #[test]
    fn the_billed_model_is_the_responses_when_priced() {
        let p = Pricing::load(&PricingConfig::default()).unwrap();
        // A snapshot name in the response is billed under its canonical id.
        let b = p.bill(
            Some("gpt-4o-mini"),
            Some("gpt-4o-mini-2024-07-18"),
            Some(usage(1_000_000, 0)),
            0,
        );
        assert_eq!(
            (b.model.as_str(), b.cost),
            ("gpt-4o-mini", Nanos(150_000_000))
        );
        // A response model the table lacks: the request's model prices the call.
        let b = p.bill(
            Some("gpt-4o"),
            Some("my-host-model"),
            Some(usage(1_000_000, 0)),
            0,
        );
        assert_eq!((b.model.as_str(), b.cost), ("gpt-4o", Nanos(2_500_000_000)));
        assert!(!b.estimated());
        // No usage record: an estimate with at least the request's input estimate.
        let b = p.bill(Some("gpt-4o"), None, None, 2000);
        assert_eq!((b.usage.input_tokens, b.cost), (2000, Nanos(5_000_000)));
        assert!(b.estimated());
        assert_eq!(b.tokens().input, 2000);
    }

    #[test]
    fn aliases_and_bad_defaults() {
        let mut cfg = PricingConfig::default();
        cfg.model_aliases
            .insert("Prod-Chat".into(), "gpt-4o-mini-2024-07-18".into());
        let p = Pricing::load(&cfg).unwrap();
        let b = p.bill(Some("prod-chat"), None, Some(usage(1_000_000, 0)), 0);
        assert_eq!(
            (b.model.as_str(), b.cost),
            ("gpt-4o-mini", Nanos(150_000_000))
        );
        cfg.unknown_model_price.output_usd_per_mtok = 0.0;
        let e = Pricing::load(&cfg).unwrap_err().to_string();
        assert!(e.contains("unknown_model_price.output_usd_per_mtok"), "{e}");
    }
}
