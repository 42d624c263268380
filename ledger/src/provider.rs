//! Which provider and which API a request goes to, from its host, method and path.
//!
//! [`ProviderDetector::detect`] is for the observer, which sees raw traffic to public hosts:
//! it knows the built-in provider hosts and their exact API paths, plus hosts the user configures.
//! [`classify`] is for the enforcer, which knows the provider kind from its config and sees only
//! the path after the configured base URL. Both return `None` for anything they do not know:
//! an unknown call is never guessed into a priced one.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

mod path;
mod rules;

use path::{openai_api_suffix, percent_decode, split_query};
use rules::{detect_with_rule, google_endpoint};

/// The wire protocol family of a provider, which decides how requests and responses are parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ProviderKind {
    /// OpenAI's own API (api.openai.com).
    #[serde(rename = "openai")]
    OpenAi,
    /// Anthropic's Messages API.
    #[serde(rename = "anthropic")]
    Anthropic,
    /// Google Gemini (Generative Language API and Vertex AI).
    #[serde(rename = "gemini")]
    Gemini,
    /// Azure OpenAI deployments.
    #[serde(rename = "azure-openai")]
    AzureOpenAi,
    /// Any server speaking the OpenAI REST shapes (vLLM, Groq, Mistral, OpenRouter, ...).
    #[serde(rename = "openai-compatible")]
    OpenAiCompatible,
}

impl ProviderKind {
    /// Whether calls through this kind of provider can name OpenAI models, whose prompts the
    /// ledger counts with their BPE tokenizer ([`crate::load_tokenizers`]); Anthropic and
    /// Gemini models are counted by bytes.
    #[must_use]
    pub fn counts_with_bpe(self) -> bool {
        match self {
            Self::OpenAi | Self::AzureOpenAi | Self::OpenAiCompatible => true,
            Self::Anthropic | Self::Gemini => false,
        }
    }

    /// The config/serde spelling: "openai", "anthropic", "gemini", "azure-openai", "openai-compatible".
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::OpenAi => "openai",
            Self::Anthropic => "anthropic",
            Self::Gemini => "gemini",
            Self::AzureOpenAi => "azure-openai",
            Self::OpenAiCompatible => "openai-compatible",
        }
    }

    /// Whether requests and responses use the OpenAI REST shapes.
    #[must_use]
    pub fn is_openai_family(self) -> bool {
        matches!(
            self,
            Self::OpenAi | Self::AzureOpenAi | Self::OpenAiCompatible
        )
    }
}

impl fmt::Display for ProviderKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error of parsing a [`ProviderKind`] from an unknown name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown provider kind {0:?}; use one of openai, anthropic, gemini, azure-openai, openai-compatible"
)]
pub struct UnknownProviderKind(pub String);

impl FromStr for ProviderKind {
    type Err = UnknownProviderKind;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "openai" => Ok(Self::OpenAi),
            "anthropic" => Ok(Self::Anthropic),
            "gemini" => Ok(Self::Gemini),
            "azure-openai" => Ok(Self::AzureOpenAi),
            "openai-compatible" => Ok(Self::OpenAiCompatible),
            other => Err(UnknownProviderKind(other.to_owned())),
        }
    }
}

/// The API a request calls; it decides the request and response shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Api {
    /// OpenAI `POST /chat/completions`.
    ChatCompletions,
    /// OpenAI legacy `POST /completions`.
    Completions,
    /// OpenAI `POST /responses`.
    Responses,
    /// OpenAI `POST /embeddings`.
    Embeddings,
    /// Anthropic `POST /v1/messages`.
    AnthropicMessages,
    /// Anthropic `POST /v1/messages/count_tokens` (free).
    AnthropicCountTokens,
    /// Gemini `:generateContent`.
    GeminiGenerateContent,
    /// Gemini `:streamGenerateContent` (SSE with `alt=sse`, else a streamed JSON array).
    GeminiStreamGenerateContent,
    /// Gemini `:countTokens` (free).
    GeminiCountTokens,
}

impl Api {
    /// Whether the provider charges nothing for this call (token counting).
    #[must_use]
    pub fn is_free(self) -> bool {
        matches!(self, Self::AnthropicCountTokens | Self::GeminiCountTokens)
    }

    /// A stable label for metrics and logs.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ChatCompletions => "chat_completions",
            Self::Completions => "completions",
            Self::Responses => "responses",
            Self::Embeddings => "embeddings",
            Self::AnthropicMessages => "anthropic_messages",
            Self::AnthropicCountTokens => "anthropic_count_tokens",
            Self::GeminiGenerateContent => "gemini_generate_content",
            Self::GeminiStreamGenerateContent => "gemini_stream_generate_content",
            Self::GeminiCountTokens => "gemini_count_tokens",
        }
    }
}

impl fmt::Display for Api {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A recognised LLM API call.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Endpoint {
    /// The wire protocol family; with `api` it decides how bodies are parsed.
    pub kind: ProviderKind,
    /// The API called.
    pub api: Api,
    /// Who serves it: "openai", "anthropic", "gemini", "vertex-ai", "azure-openai", "groq", ...
    /// or the name the user configured.
    pub provider: String,
    /// The model named in the path (Gemini, Vertex AI) or the Azure deployment name.
    pub model_in_path: Option<String>,
    /// The path asks for a stream (Gemini `:streamGenerateContent`, Vertex `:streamRawPredict`).
    pub stream_in_path: bool,
    /// The query has `alt=sse` (Gemini streams SSE instead of a JSON array).
    pub sse_in_query: bool,
}

impl Endpoint {
    fn new(kind: ProviderKind, api: Api, provider: &str) -> Self {
        Self {
            kind,
            api,
            provider: provider.to_owned(),
            model_in_path: None,
            stream_in_path: false,
            sse_in_query: false,
        }
    }
}

/// How a built-in host's paths are recognised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HostRule {
    /// OpenAI REST shapes under one of these exact path prefixes.
    OpenAi(&'static [&'static str]),
    /// Anthropic `/v1/messages`.
    Anthropic,
    /// Generative Language API: `/{v1beta|v1|v1alpha}/models/{m}:{method}` (+ its OpenAI layer).
    GenerativeLanguage,
    /// Vertex AI: `/{v1|v1beta1}/projects/{p}/locations/{l}/publishers/{pub}/models/{m}:{method}`.
    VertexAi,
    /// Azure OpenAI: `/openai/deployments/{dep}/{api}`, `/openai/v1/{api}`, `/openai/{api}`.
    Azure,
    /// A host the user configured: path suffixes per [`classify`].
    Configured(ProviderKind),
}

/// Which suffix of a host name matches (exact host or any subdomain ending).
#[derive(Debug, Clone)]
struct HostEntry {
    /// Lower-case host, with the port unless it is a default one.
    host: String,
    /// `true`: `host` is a suffix such as `-aiplatform.googleapis.com`.
    suffix: bool,
    name: String,
    rule: HostRule,
}

/// Tells provider and API from (host, method, path): built-in public hosts plus configured ones.
#[derive(Debug, Clone)]
pub struct ProviderDetector {
    extra: Vec<HostEntry>,
}

impl Default for ProviderDetector {
    fn default() -> Self {
        Self::new()
    }
}

const OPENAI_COMPATIBLE_HOSTS: &[(&str, &str, &[&str])] = &[
    ("api.mistral.ai", "mistral", &["/v1"]),
    ("api.groq.com", "groq", &["/openai/v1"]),
    ("api.deepseek.com", "deepseek", &["", "/v1", "/beta"]),
    ("api.together.xyz", "together", &["/v1"]),
    ("api.fireworks.ai", "fireworks", &["/inference/v1"]),
    ("openrouter.ai", "openrouter", &["/api/v1"]),
    ("api.x.ai", "xai", &["/v1"]),
];

/// The built-in public provider hosts with exact names, as (host, provider name): what the
/// observer's egress accounting resolves (wildcard hosts such as `*.openai.azure.com` need a
/// `[[providers]]` entry naming the instance).
#[must_use]
pub fn builtin_hosts() -> Vec<(&'static str, &'static str)> {
    let mut v = vec![
        ("api.openai.com", "openai"),
        ("api.anthropic.com", "anthropic"),
        ("generativelanguage.googleapis.com", "gemini"),
        ("aiplatform.googleapis.com", "vertex-ai"),
    ];
    v.extend(OPENAI_COMPATIBLE_HOSTS.iter().map(|(h, n, _)| (*h, *n)));
    v
}

fn builtin(host: &str) -> Option<(&'static str, HostRule)> {
    match host {
        "api.openai.com" => return Some(("openai", HostRule::OpenAi(&["/v1"]))),
        "api.anthropic.com" => return Some(("anthropic", HostRule::Anthropic)),
        "generativelanguage.googleapis.com" => {
            return Some(("gemini", HostRule::GenerativeLanguage));
        }
        "aiplatform.googleapis.com" => return Some(("vertex-ai", HostRule::VertexAi)),
        _ => {}
    }
    if let Some(&(_, name, prefixes)) = OPENAI_COMPATIBLE_HOSTS.iter().find(|(h, ..)| *h == host) {
        return Some((name, HostRule::OpenAi(prefixes)));
    }
    let label_ok = |s: &str| !s.is_empty() && !s.contains(':');
    if host
        .strip_suffix("-aiplatform.googleapis.com")
        .is_some_and(label_ok)
    {
        return Some(("vertex-ai", HostRule::VertexAi));
    }
    if host.strip_suffix(".openai.azure.com").is_some_and(label_ok)
        || host
            .strip_suffix(".cognitiveservices.azure.com")
            .is_some_and(label_ok)
    {
        return Some(("azure-openai", HostRule::Azure));
    }
    None
}

/// Lower-cases a `host[:port]`, drops a trailing dot and the default ports 443 and 80.
#[must_use]
pub fn normalize_host(host_port: &str) -> String {
    let lower = host_port.trim().to_ascii_lowercase();
    let (host, port) = if let Some(rest) = lower.strip_prefix('[') {
        // [v6]:port
        match rest.split_once(']') {
            Some((addr, tail)) => (
                format!("[{addr}]"),
                tail.strip_prefix(':').map(str::to_owned),
            ),
            None => (lower.clone(), None),
        }
    } else {
        match lower.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') && p.bytes().all(|b| b.is_ascii_digit()) => {
                (h.to_owned(), Some(p.to_owned()))
            }
            _ => (lower.clone(), None),
        }
    };
    let host = host.strip_suffix('.').unwrap_or(&host);
    match port.as_deref() {
        None | Some("" | "443" | "80") => host.to_owned(),
        Some(p) => format!("{host}:{p}"),
    }
}

impl ProviderDetector {
    /// A detector that knows only the built-in public provider hosts.
    #[must_use]
    pub fn new() -> Self {
        Self { extra: Vec::new() }
    }

    /// Adds a configured host (e.g. a self-hosted vLLM at "10.0.0.5:8000"); it takes precedence
    /// over the built-ins. A leading `*.` matches any subdomain. Paths are matched by [`classify`].
    #[must_use]
    pub fn with_host(mut self, host_port: &str, kind: ProviderKind, name: &str) -> Self {
        let normalized = normalize_host(host_port);
        let (host, suffix) = match normalized.strip_prefix("*.") {
            Some(rest) => (format!(".{rest}"), true),
            None => (normalized, false),
        };
        self.extra.push(HostEntry {
            host,
            suffix,
            name: name.to_owned(),
            rule: HostRule::Configured(kind),
        });
        self
    }

    /// The endpoint a request calls, or `None` when host or path is not a known metered API.
    #[must_use]
    pub fn detect(&self, host: &str, method: &str, path_and_query: &str) -> Option<Endpoint> {
        if !method.trim().eq_ignore_ascii_case("POST") {
            return None;
        }
        let host = normalize_host(host);
        let configured = self.extra.iter().find(|e| {
            if e.suffix {
                host.ends_with(&e.host)
            } else {
                host == e.host
            }
        });
        let (name, rule) = match configured {
            Some(entry) => (entry.name.as_str(), entry.rule),
            None => builtin(&host)?,
        };
        detect_with_rule(rule, name, path_and_query)
    }

    /// Whether `host` (a Host header or authority, any case, default port optional) is a provider
    /// endpoint at all — a built-in public host or a configured one — whatever path it is called
    /// with. The observer uses it to keep a connection whose first request is e.g. `GET /v1/models`.
    #[must_use]
    pub fn is_provider_host(&self, host: &str) -> bool {
        let host = normalize_host(host);
        if host.is_empty() {
            return false;
        }
        self.extra.iter().any(|e| {
            if e.suffix {
                host.ends_with(&e.host)
            } else {
                host == e.host
            }
        }) || builtin(&host).is_some()
    }
}

impl ProviderDetector {
    /// The provider a TLS server name (SNI, no port) belongs to: a configured host of that
    /// name (whatever its port; `*.` entries match subdomains) or a built-in public host. The
    /// observer names a decoded call's provider by the name its process sent in the handshake,
    /// not by the Host header alone.
    #[must_use]
    pub fn provider_of_server_name(&self, server_name: &str) -> Option<&str> {
        let name = normalize_host(server_name);
        if name.is_empty() || name.contains(':') {
            return None;
        }
        let configured = self.extra.iter().find(|e| {
            let host = e.host.rsplit_once(':').map_or(e.host.as_str(), |(h, _)| h);
            if e.suffix {
                name.ends_with(host)
            } else {
                name == host
            }
        });
        match configured {
            Some(entry) => Some(entry.name.as_str()),
            None => builtin(&name).map(|(n, _)| n),
        }
    }
}

/// Classifies a call for the enforcer, which knows the provider `kind` from its config.
///
/// `path_and_query` is what follows the configured base URL, so with a base URL of
/// `https://api.openai.com/v1` it may be `/chat/completions` or `/v1/chat/completions`: paths are
/// matched on their trailing segments. Only `POST` is metered.
#[must_use]
pub fn classify(
    kind: ProviderKind,
    provider_name: &str,
    method: &str,
    path_and_query: &str,
) -> Option<Endpoint> {
    if !method.trim().eq_ignore_ascii_case("POST") {
        return None;
    }
    let (path, query) = split_query(path_and_query);
    let path = path.trim_end_matches('/');
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    // Google-style `{model}:{method}` paths, whatever the configured kind says (Vertex serves
    // Gemini and Anthropic models under the same base URL).
    if let Some(last) = segments.last().filter(|s| s.contains(':')) {
        let before = segments.len().checked_sub(2).map(|i| segments[i]);
        let publisher = segments
            .iter()
            .position(|s| *s == "publishers")
            .and_then(|i| segments.get(i + 1).copied())
            .unwrap_or("google");
        if matches!(before, Some("models" | "tunedModels" | "endpoints"))
            || kind == ProviderKind::Gemini
        {
            return google_endpoint(provider_name, publisher, last, query);
        }
        return None;
    }
    if kind == ProviderKind::Anthropic
        || (kind == ProviderKind::Gemini && path.ends_with("/messages"))
    {
        return match segments.as_slice() {
            [.., "messages"] => Some(Endpoint::new(
                ProviderKind::Anthropic,
                Api::AnthropicMessages,
                provider_name,
            )),
            [.., "messages", "count_tokens"] => Some(Endpoint::new(
                ProviderKind::Anthropic,
                Api::AnthropicCountTokens,
                provider_name,
            )),
            _ => None,
        };
    }
    let api = openai_api_suffix(&segments)?;
    let kind = if kind == ProviderKind::Gemini {
        ProviderKind::OpenAiCompatible
    } else {
        kind
    };
    let mut ep = Endpoint::new(kind, api, provider_name);
    if let Some(i) = segments.iter().position(|s| *s == "deployments") {
        ep.model_in_path = segments
            .get(i + 1)
            .filter(|d| !d.is_empty())
            .map(|d| percent_decode(d));
    }
    Some(ep)
}

#[cfg(test)]
mod tests;
