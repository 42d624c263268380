//! The input-token estimate of a request body, which budgets reserve on, so it errs high.
//!
//! OpenAI models: the model's BPE (o200k_base or cl100k_base) over the text, plus OpenAI's
//! documented chat overhead (3 tokens per message, 1 per `name`, 3 to prime the reply). Other
//! models: one token per 3 UTF-8 bytes plus 4 tokens per message. Non-text parts (images, audio,
//! files) count [`MEDIA_TOKENS`] each. Tool definitions count as their JSON text, which is longer
//! than the providers' internal rendering; Anthropic adds [`ANTHROPIC_TOOL_PROMPT_TOKENS`] when
//! tools are present.

use crate::json::{Json, NULL};
use crate::usage::tokens::{self, Bpe, TokenCache};

/// Tokens counted for each image, audio clip or file part. Images cost at most about 1,600 tokens
/// on Claude (1.15 megapixels) and less on GPT-4o (≤ 1,105 at high detail) and Gemini (258 per
/// 768px tile). Long PDFs and audio can exceed it; settlement with the real usage corrects that.
pub const MEDIA_TOKENS: u64 = 1_600;

/// Anthropic's hidden tool-use system prompt (about 350 tokens for current models; rounded up).
pub const ANTHROPIC_TOOL_PROMPT_TOKENS: u64 = 500;

/// Per-message overhead of the OpenAI chat format.
const OPENAI_PER_MESSAGE: u64 = 3;
/// Reply priming of the OpenAI chat format (`<|start|>assistant<|message|>`).
const OPENAI_REPLY_PRIMING: u64 = 3;
/// Per-message overhead assumed for other providers' chat templates.
const OTHER_PER_MESSAGE: u64 = 4;

/// Accumulates the estimate while a request body is walked.
pub(super) struct Estimator<'a> {
    bpe: Option<&'static Bpe>,
    /// Counts of texts seen before, and the scope they are kept under.
    cache: Option<(&'a TokenCache, &'a str)>,
    exact_tokenizer: bool,
    tokens: u64,
    text_bytes: u64,
    approximate: bool,
}

impl<'a> Estimator<'a> {
    /// `bpe` with `exact_tokenizer` when the model's own encoding is known; texts are looked up
    /// in `cache` under its scope first.
    pub(super) fn new(
        bpe: Option<&'static Bpe>,
        exact_tokenizer: bool,
        cache: Option<(&'a TokenCache, &'a str)>,
    ) -> Self {
        Self {
            bpe,
            cache,
            exact_tokenizer: exact_tokenizer && bpe.is_some(),
            tokens: 0,
            text_bytes: 0,
            approximate: false,
        }
    }

    /// The estimate and whether it is exact (own tokenizer, no media, no tools).
    pub(super) fn finish(self) -> (u64, bool) {
        let total = self
            .tokens
            .saturating_add(tokens::heuristic_tokens(self.text_bytes));
        (total, self.exact_tokenizer && !self.approximate)
    }

    pub(super) fn text(&mut self, text: &str) {
        match self.bpe {
            Some(bpe) => {
                let n = match self.cache {
                    Some((cache, scope)) => cache.count(bpe, scope, text),
                    None => tokens::count_bpe(bpe, text),
                };
                self.tokens = self.tokens.saturating_add(n);
            }
            None => self.text_bytes += text.len() as u64,
        }
    }

    /// Text whose rendering by the provider is unknown (tool schemas, unknown parts).
    pub(super) fn json(&mut self, value: &Json<'_>) {
        self.approximate = true;
        match value {
            Json::String(s) => self.text(s),
            Json::Null => {}
            other => self.text(&other.to_string()),
        }
    }

    /// Already tokenised input (embeddings/completions token arrays): exact by definition.
    pub(super) fn token_ids(&mut self, n: usize) {
        self.tokens = self.tokens.saturating_add(n as u64);
    }

    pub(super) fn media(&mut self) {
        self.approximate = true;
        self.tokens = self.tokens.saturating_add(MEDIA_TOKENS);
    }

    pub(super) fn fixed(&mut self, n: u64) {
        self.tokens = self.tokens.saturating_add(n);
    }

    pub(super) fn message(&mut self) {
        let n = if self.bpe.is_some() {
            OPENAI_PER_MESSAGE
        } else {
            OTHER_PER_MESSAGE
        };
        self.fixed(n);
    }

    pub(super) fn reply_priming(&mut self) {
        let n = if self.bpe.is_some() {
            OPENAI_REPLY_PRIMING
        } else {
            OTHER_PER_MESSAGE
        };
        self.fixed(n);
    }

    /// Prompt input that is a string, an array of strings, an array of token ids or an array of
    /// token-id arrays (OpenAI completions and embeddings `prompt` / `input`).
    pub(super) fn prompt_input(&mut self, value: &Json<'_>) {
        match value {
            Json::String(s) => self.text(s),
            Json::Array(items) if items.iter().all(Json::is_number) => self.token_ids(items.len()),
            Json::Array(items) => {
                for item in items {
                    match item {
                        Json::String(s) => self.text(s),
                        Json::Array(ids) => self.token_ids(ids.len()),
                        other => self.json(other),
                    }
                }
            }
            Json::Null => {}
            other => self.json(other),
        }
    }

    /// Message content in any provider's shape: a string, or an array of typed parts.
    pub(super) fn content(&mut self, value: &Json<'_>) {
        match value {
            Json::String(s) => self.text(s),
            Json::Array(parts) => {
                for part in parts {
                    self.part(part);
                }
            }
            Json::Null => {}
            other => self.json(other),
        }
    }

    fn part(&mut self, part: &Json<'_>) {
        let Json::Object(obj) = part else {
            self.content(part);
            return;
        };
        let kind = obj.get("type").and_then(Json::as_str).unwrap_or("");
        match kind {
            "text" | "input_text" | "output_text" => self.content(obj.get("text").unwrap_or(NULL)),
            "image_url" | "input_image" | "image" | "input_audio" | "audio" | "file"
            | "input_file" => self.media(),
            "document" => match obj.get("source") {
                Some(src) if src.get("type").and_then(Json::as_str) == Some("text") => {
                    self.content(src.get("data").unwrap_or(NULL));
                }
                Some(src) if src.get("type").and_then(Json::as_str) == Some("content") => {
                    self.content(src.get("content").unwrap_or(NULL));
                }
                _ => self.media(),
            },
            "tool_use" | "server_tool_use" => {
                self.text(obj.get("name").and_then(Json::as_str).unwrap_or(""));
                self.json(obj.get("input").unwrap_or(NULL));
            }
            "tool_result" | "web_search_tool_result" => {
                self.content(obj.get("content").unwrap_or(NULL))
            }
            "thinking" => self.content(obj.get("thinking").unwrap_or(NULL)),
            "refusal" => self.content(obj.get("refusal").unwrap_or(NULL)),
            _ => self.json(part),
        }
    }

    /// A Gemini `parts` array.
    pub(super) fn gemini_parts(&mut self, parts: &Json<'_>) {
        let Some(parts) = parts.as_array() else {
            self.json(parts);
            return;
        };
        for part in parts {
            if let Some(text) = part.get("text").and_then(Json::as_str) {
                self.text(text);
            } else if ["inlineData", "inline_data", "fileData", "file_data"]
                .iter()
                .any(|k| part.get(k).is_some())
            {
                self.media();
            } else {
                self.json(part);
            }
        }
    }
}
