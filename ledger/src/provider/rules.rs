//! Path rules of the built-in hosts, and Google's `{model}:{method}` path segments.

use super::path::{google_method, openai_api_exact, percent_decode, query_has, split_query};
use super::{Api, Endpoint, HostRule, ProviderKind, classify};

pub(super) fn detect_with_rule(
    rule: HostRule,
    name: &str,
    path_and_query: &str,
) -> Option<Endpoint> {
    let (path, query) = split_query(path_and_query);
    match rule {
        HostRule::Configured(kind) => classify(kind, name, "POST", path_and_query),
        HostRule::OpenAi(prefixes) => prefixes
            .iter()
            .find_map(|prefix| {
                let rest = path.strip_prefix(prefix)?;
                let api = openai_api_exact(rest)?;
                Some(Endpoint::new(ProviderKind::OpenAiCompatible, api, name))
            })
            .map(|mut ep| {
                if name == "openai" {
                    ep.kind = ProviderKind::OpenAi;
                }
                ep
            }),
        HostRule::Anthropic => match path {
            "/v1/messages" => Some(Endpoint::new(
                ProviderKind::Anthropic,
                Api::AnthropicMessages,
                name,
            )),
            "/v1/messages/count_tokens" => Some(Endpoint::new(
                ProviderKind::Anthropic,
                Api::AnthropicCountTokens,
                name,
            )),
            _ => None,
        },
        HostRule::GenerativeLanguage => {
            let (version, rest) = path.strip_prefix('/')?.split_once('/')?;
            if !matches!(version, "v1" | "v1beta" | "v1alpha") {
                return None;
            }
            if let Some(api) = rest.strip_prefix("openai").and_then(openai_api_exact) {
                return Some(Endpoint::new(ProviderKind::OpenAiCompatible, api, name));
            }
            let segments: Vec<&str> = rest.split('/').collect();
            match segments.as_slice() {
                ["models" | "tunedModels", last] => google_endpoint(name, "google", last, query),
                _ => None,
            }
        }
        HostRule::VertexAi => {
            let (version, rest) = path.strip_prefix('/')?.split_once('/')?;
            if !matches!(version, "v1" | "v1beta1") {
                return None;
            }
            let segments: Vec<&str> = rest.split('/').collect();
            match segments.as_slice() {
                [
                    "projects",
                    _,
                    "locations",
                    _,
                    "publishers",
                    publisher,
                    "models",
                    last,
                ] => google_endpoint(name, publisher, last, query),
                [
                    "projects",
                    _,
                    "locations",
                    _,
                    "endpoints",
                    "openapi",
                    tail @ ..,
                ] => {
                    let api = openai_api_exact(&format!("/{}", tail.join("/")))?;
                    Some(Endpoint::new(ProviderKind::OpenAiCompatible, api, name))
                }
                _ => None,
            }
        }
        HostRule::Azure => {
            let rest = path.strip_prefix("/openai")?;
            if let Some(after) = rest.strip_prefix("/deployments/") {
                let (deployment, api_path) = after.split_once('/')?;
                if deployment.is_empty() {
                    return None;
                }
                let api = openai_api_exact(&format!("/{api_path}"))?;
                let mut ep = Endpoint::new(ProviderKind::AzureOpenAi, api, name);
                ep.model_in_path = Some(percent_decode(deployment));
                return Some(ep);
            }
            let api = openai_api_exact(rest.strip_prefix("/v1").unwrap_or(rest))?;
            Some(Endpoint::new(ProviderKind::AzureOpenAi, api, name))
        }
    }
}

/// A Google-style `{model}:{method}` last path segment, for publisher `google` or `anthropic`.
pub(super) fn google_endpoint(
    name: &str,
    publisher: &str,
    last: &str,
    query: &str,
) -> Option<Endpoint> {
    let (model, method) = last.split_once(':')?;
    if model.is_empty() {
        return None;
    }
    let mut ep = match publisher {
        "google" => {
            let api = google_method(method)?;
            let mut ep = Endpoint::new(ProviderKind::Gemini, api, name);
            ep.stream_in_path = api == Api::GeminiStreamGenerateContent;
            ep
        }
        "anthropic" => {
            let (api, stream) = match (model, method) {
                ("count-tokens", "rawPredict") => (Api::AnthropicCountTokens, false),
                (_, "rawPredict") => (Api::AnthropicMessages, false),
                (_, "streamRawPredict") => (Api::AnthropicMessages, true),
                _ => return None,
            };
            let mut ep = Endpoint::new(ProviderKind::Anthropic, api, name);
            ep.stream_in_path = stream;
            if api == Api::AnthropicCountTokens {
                return Some(ep);
            }
            ep
        }
        _ => return None,
    };
    ep.model_in_path = Some(percent_decode(model));
    ep.sse_in_query = query_has(query, "alt", "sse");
    Some(ep)
}
