//! Errors of the proxy path. Each knows its origin (downstream client, upstream provider, or our
//! own ledger/Redis), because the status, the metric and the budget outcome differ, and renders
//! itself in the error shape of the provider the client's SDK expects.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};
use ledger::provider::ProviderKind;
use ledger::store::Denial;
use serde_json::json;

use crate::ProxyBody;

/// Why the enforcer could not start; each names the key, variable or file to fix.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The config is invalid.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// A variable the config names is unset or empty.
    #[error("{key}: environment variable {var} is not set{hint}")]
    MissingEnv {
        /// The config key naming the variable.
        key: String,
        /// The variable.
        var: String,
        /// What else can be done.
        hint: &'static str,
    },
    /// A variable the config names holds a value that cannot be used.
    #[error("{key}: environment variable {var} {why}")]
    InvalidEnv {
        /// The config key naming the variable.
        key: String,
        /// The variable.
        var: String,
        /// What is wrong with its value (never the value: it may be a secret).
        why: &'static str,
    },
    /// Building the OpenAI tokenizers failed (a broken binary: their data is compiled in).
    #[error("tokenizers: {0}")]
    Tokenizers(String),
    /// The price table could not be built.
    #[error("prices: {0}")]
    Pricing(#[source] ledger::Error),
    /// A provider's CA file is unusable, or the TLS client could not be built.
    #[error("{key}: {detail}")]
    UpstreamTls {
        /// The config key.
        key: String,
        /// What is wrong.
        detail: String,
        /// The cause.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    /// The Redis URL is unusable.
    #[error("redis_url: {0}")]
    Redis(#[source] ledger::Error),
    /// The spool directory cannot be used.
    #[error("spool_dir: {0}")]
    Spool(#[source] ledger::Error),
    /// A budget of the file could not be written to Redis.
    #[error("seeding budget {budget}: {source}")]
    SeedBudget {
        /// tenant/feature/period.
        budget: String,
        /// Why.
        #[source]
        source: ledger::Error,
    },
    /// A listener could not be bound.
    #[error("{key} {addr}: {source}")]
    Bind {
        /// `listen` or `admin_listen`.
        key: &'static str,
        /// The address.
        addr: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The proxy listener's certificate or key is unusable.
    #[error("{key}: {detail}")]
    ListenerTls {
        /// `tls_cert_file` or `tls_key_file`.
        key: &'static str,
        /// What is wrong.
        detail: String,
    },
}

/// Where an error comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The client sent something we refuse.
    Downstream,
    /// The provider failed or timed out.
    Upstream,
    /// The enforcer itself (Redis, a bug).
    Internal,
}

/// Everything that ends a proxied call with an enforcer-made response.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The path is not /proxy/{provider}/...
    #[error("no route for {path}; send calls to /proxy/{{provider}}/{{api path}}")]
    NoRoute {
        /// The request path.
        path: String,
    },
    /// `{provider}` is not configured.
    #[error("unknown provider {name:?}; configure it under [providers.{name}]")]
    UnknownProvider {
        /// The name in the path.
        name: String,
    },
    /// No key anywhere an SDK puts one.
    #[error("missing API key: send your llmwarden proxy key as the SDK's api_key")]
    MissingKey,
    /// The key matches no configured hash.
    #[error("invalid API key: it matches no [[keys]] entry of the enforcer")]
    BadKey,
    /// X-Tenant-ID names a tenant the key may not bill.
    #[error("this key may not bill tenant {tenant}; add it to the key's allowed_tenants")]
    TenantForbidden {
        /// The requested tenant.
        tenant: String,
    },
    /// A read of a stored object another tenant (or no one through the enforcer) created.
    #[error(
        "object {id} was not created by tenant {tenant} through llmwarden; only its creator may read it"
    )]
    ObjectForbidden {
        /// The object id.
        id: String,
        /// The caller's tenant.
        tenant: String,
    },
    /// An unmetered read the key may not make (it would use the shared provider key).
    #[error(
        "{method} {path} is not open through llmwarden (it could read other tenants' data); add it to the key's open_paths"
    )]
    EndpointForbidden {
        /// Method.
        method: String,
        /// Path after the provider.
        path: String,
    },
    /// X-Feature-Name names a feature the key is not bound to.
    #[error("this key may not bill feature {feature}; add it to the key's features")]
    FeatureForbidden {
        /// The requested feature.
        feature: String,
    },
    /// The request names a model outside the key's `allowed_models`.
    #[error("this key may not call model {model}; it is outside the key's allowed_models")]
    ModelForbidden {
        /// The requested model.
        model: String,
    },
    /// The route's provider is outside the key's `allowed_providers`.
    #[error("this key may not use provider {provider}; it is outside the key's allowed_providers")]
    ProviderForbidden {
        /// The provider route.
        provider: String,
    },
    /// A request or token rate limit of the key, tenant or tenant+model is used up.
    #[error("{0}")]
    RateLimited(Box<ledger::store::RateDenial>),
    /// A wildcard key named a tenant that has no budget of its own.
    #[error(
        "tenant {tenant} has no budget of its own; a key with allowed_tenants = [\"*\"] bills only \
         provisioned tenants (give the tenant a budget with PUT /budgets, or set mint_tenants = true on the key)"
    )]
    TenantNotProvisioned {
        /// The requested tenant.
        tenant: String,
    },
    /// An attribution header is malformed.
    #[error("invalid {header} header: {reason}")]
    BadAttribution {
        /// Header name.
        header: &'static str,
        /// What is allowed.
        reason: &'static str,
    },
    /// The request body exceeds max_request_body_bytes.
    #[error("request body larger than {limit} bytes (max_request_body_bytes)")]
    BodyTooLarge {
        /// The limit.
        limit: usize,
    },
    /// The bodies held by calls in flight already fill max_inflight_body_bytes.
    #[error(
        "the enforcer is already holding its limit of {limit} bytes of request and response \
         bodies in flight (max_inflight_body_bytes); the call was not sent. Retry shortly, or \
         raise max_inflight_body_bytes if the host has the memory"
    )]
    Overloaded {
        /// The limit.
        limit: usize,
    },
    /// The body could not be read from the client.
    #[error("could not read the request body: {0}")]
    BodyRead(String),
    /// The body is not a request the API accepts.
    #[error("invalid request body: {0}")]
    BadBody(String),
    /// The endpoint cannot be metered and unmetered_endpoints = "deny".
    #[error(
        "{method} {path} is not an API llmwarden can meter; set unmetered_endpoints = \"allow\" to forward it unmetered"
    )]
    Unmetered {
        /// Method.
        method: String,
        /// Path after the provider.
        path: String,
    },
    /// A request parameter would hide the call's usage from the enforcer.
    #[error("{param} is not allowed through llmwarden: {why}")]
    UsageSuppressed {
        /// The parameter.
        param: &'static str,
        /// Why, and what to do instead.
        why: &'static str,
    },
    /// The model is missing from the price table and unknown_model = "deny".
    #[error(
        "model {model:?} has no price; add it to the prices_file (LiteLLM format) or set unknown_model = \"allow\""
    )]
    UnknownModel {
        /// The model.
        model: String,
    },
    /// A budget cap would be exceeded.
    #[error("{0}")]
    Budget(Box<Denial>),
    /// Loop protection tripped.
    #[error("loop_detected: {0}")]
    LoopDetected(String),
    /// The upstream could not be reached.
    #[error("upstream {provider} unreachable: {detail}")]
    UpstreamConnect {
        /// Provider.
        provider: String,
        /// Cause.
        detail: String,
    },
    /// The upstream did not answer in time.
    #[error("upstream {provider} sent no response within {ms} ms (timeouts.first_byte_ms)")]
    UpstreamTimeout {
        /// Provider.
        provider: String,
        /// Limit.
        ms: u64,
    },
    /// The upstream's non-stream body failed or was too large.
    #[error("upstream {provider} response failed: {source}")]
    UpstreamBody {
        /// Provider.
        provider: String,
        /// Cause.
        #[source]
        source: crate::meter::BodyError,
    },
    /// Redis did not answer (and on_redis_unavailable = "deny"), or failed in a way that is not
    /// an outage (a script or schema error).
    #[error("budget ledger unavailable ({0}); the call was not sent. Retry shortly")]
    LedgerUnavailable(#[source] ledger::Error),
    /// A stored budget is malformed: every call is refused until it is fixed (fail closed).
    #[error(
        "the stored budgets are invalid ({0}); calls are refused until it is fixed: run `enforcer check-budgets`"
    )]
    BudgetsInvalid(#[source] std::sync::Arc<ledger::Error>),
    /// Redis did not answer and this instance's allowance for calls without a ledger is used up.
    #[error(
        "budget ledger unavailable ({0}) and this instance's allowance for calls without a ledger \
         (redis_unavailable_cap_usd) is used up; the call was not sent. Retry shortly"
    )]
    EmergencyAllowanceUsed(#[source] ledger::Error),
    /// The real provider key is missing from the environment.
    #[error("the enforcer has no upstream key for {provider}: environment variable {env} is empty")]
    NoUpstreamKey {
        /// Provider.
        provider: String,
        /// Env var.
        env: String,
    },
}

impl ProxyError {
    /// Where the error comes from.
    #[must_use]
    pub fn origin(&self) -> Origin {
        match self {
            Self::UpstreamConnect { .. }
            | Self::UpstreamTimeout { .. }
            | Self::UpstreamBody { .. } => Origin::Upstream,
            Self::LedgerUnavailable(_)
            | Self::EmergencyAllowanceUsed(_)
            | Self::BudgetsInvalid(_)
            | Self::Overloaded { .. }
            | Self::NoUpstreamKey { .. } => Origin::Internal,
            _ => Origin::Downstream,
        }
    }

    /// HTTP status: 402 for budgets (SDKs do not retry it), 429 for loops and rate limits.
    #[must_use]
    pub fn status(&self) -> StatusCode {
        match self {
            Self::NoRoute { .. } | Self::UnknownProvider { .. } | Self::Unmetered { .. } => {
                StatusCode::NOT_FOUND
            }
            Self::MissingKey | Self::BadKey => StatusCode::UNAUTHORIZED,
            Self::TenantForbidden { .. }
            | Self::ObjectForbidden { .. }
            | Self::EndpointForbidden { .. }
            | Self::FeatureForbidden { .. }
            | Self::ModelForbidden { .. }
            | Self::ProviderForbidden { .. }
            | Self::TenantNotProvisioned { .. } => StatusCode::FORBIDDEN,
            Self::BadAttribution { .. }
            | Self::BodyRead(_)
            | Self::BadBody(_)
            | Self::UsageSuppressed { .. }
            | Self::UnknownModel { .. } => StatusCode::BAD_REQUEST,
            Self::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Budget(_) => StatusCode::PAYMENT_REQUIRED,
            Self::LoopDetected(_) | Self::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::UpstreamConnect { .. } | Self::UpstreamBody { .. } => StatusCode::BAD_GATEWAY,
            Self::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            Self::LedgerUnavailable(_)
            | Self::EmergencyAllowanceUsed(_)
            | Self::BudgetsInvalid(_)
            | Self::Overloaded { .. }
            | Self::NoUpstreamKey { .. } => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// Machine-readable code (`error.code`), also the metric's `reason` label.
    #[must_use]
    pub fn code(&self) -> &'static str {
        match self {
            Self::NoRoute { .. } => "no_route",
            Self::UnknownProvider { .. } => "unknown_provider",
            Self::MissingKey => "missing_api_key",
            Self::BadKey => "invalid_api_key",
            Self::TenantForbidden { .. } => "tenant_forbidden",
            Self::FeatureForbidden { .. } => "feature_forbidden",
            Self::ModelForbidden { .. } => "model_forbidden",
            Self::ProviderForbidden { .. } => "provider_forbidden",
            Self::ObjectForbidden { .. } => "object_forbidden",
            Self::EndpointForbidden { .. } => "endpoint_forbidden",
            Self::TenantNotProvisioned { .. } => "tenant_not_provisioned",
            Self::BadAttribution { .. } => "invalid_attribution",
            Self::BodyTooLarge { .. } => "request_too_large",
            Self::BodyRead(_) => "body_read_failed",
            Self::Overloaded { .. } => "inflight_bytes_exceeded",
            Self::BadBody(_) => "invalid_request",
            Self::Unmetered { .. } => "unmetered_endpoint",
            Self::UsageSuppressed { .. } => "usage_suppressed",
            Self::UnknownModel { .. } => "unknown_model",
            Self::Budget(_) => "budget_exceeded",
            Self::LoopDetected(_) => "loop_detected",
            Self::RateLimited(_) => "rate_limited",
            Self::UpstreamConnect { .. } => "upstream_unreachable",
            Self::UpstreamTimeout { .. } => "upstream_timeout",
            Self::UpstreamBody { .. } => "upstream_failed",
            Self::LedgerUnavailable(_) | Self::EmergencyAllowanceUsed(_) => "ledger_unavailable",
            Self::BudgetsInvalid(_) => "budgets_invalid",
            Self::NoUpstreamKey { .. } => "upstream_key_missing",
        }
    }

    /// Anthropic's `error.type` for this status.
    fn anthropic_type(&self) -> &'static str {
        match self.status().as_u16() {
            400 => "invalid_request_error",
            401 => "authentication_error",
            402 => "budget_exceeded",
            403 => "permission_error",
            404 => "not_found_error",
            413 => "request_too_large",
            429 => "rate_limit_error",
            503 => "overloaded_error",
            _ => "api_error",
        }
    }

    /// Gemini's `error.status` for this status.
    fn google_status(&self) -> &'static str {
        match self.status().as_u16() {
            400 | 413 => "INVALID_ARGUMENT",
            401 => "UNAUTHENTICATED",
            402 | 429 => "RESOURCE_EXHAUSTED",
            403 => "PERMISSION_DENIED",
            404 => "NOT_FOUND",
            503 => "UNAVAILABLE",
            504 => "DEADLINE_EXCEEDED",
            _ => "INTERNAL",
        }
    }

    /// The error body in `kind`'s shape.
    #[must_use]
    pub fn body(&self, kind: ProviderKind) -> serde_json::Value {
        let message = self.to_string();
        let code = self.code();
        match kind {
            ProviderKind::Anthropic => {
                json!({"type": "error", "error": {"type": self.anthropic_type(), "code": code, "message": message}})
            }
            ProviderKind::Gemini => json!({"error": {
                "code": self.status().as_u16(), "message": message, "status": self.google_status(),
                "details": [{"reason": code}]
            }}),
            _ => {
                let ty = match self.origin() {
                    _ if matches!(self, Self::Budget(_) | Self::LoopDetected(_)) => code,
                    _ if matches!(self, Self::RateLimited(_)) => "rate_limit_error",
                    Origin::Downstream if self.status() == StatusCode::UNAUTHORIZED => {
                        "authentication_error"
                    }
                    Origin::Downstream => "invalid_request_error",
                    Origin::Upstream => "upstream_error",
                    Origin::Internal => "server_error",
                };
                json!({"error": {"message": message, "type": ty, "param": null, "code": code}})
            }
        }
    }

    /// The full response, with budget headers on denials and `x-warden-request-id`.
    #[must_use]
    pub fn into_response(self, kind: ProviderKind, request_id: &str) -> Response<ProxyBody> {
        let body = Bytes::from(self.body(kind).to_string());
        let mut resp = Response::new(crate::full_body(body));
        *resp.status_mut() = self.status();
        let h = resp.headers_mut();
        h.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Ok(v) = HeaderValue::from_str(request_id) {
            h.insert(crate::REQUEST_ID_HEADER, v);
        }
        if let Self::RateLimited(d) = &self {
            h.insert(
                http::header::RETRY_AFTER,
                HeaderValue::from(d.retry_after_secs),
            );
        }
        if let Self::Budget(d) = &self {
            let usd = |n: ledger::Nanos| HeaderValue::from_str(crate::Usd::new(n).as_str()).ok();
            if let Some(v) = usd(d.limit) {
                h.insert("x-warden-budget-limit", v);
            }
            if let Some(v) = usd(d.remaining()) {
                h.insert("x-warden-budget-remaining", v);
            }
            let reset = d.reset_at.map_or_else(
                || "never".to_owned(),
                |r| r.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            );
            if let Ok(v) = HeaderValue::from_str(&reset) {
                h.insert("x-warden-budget-reset", v);
            }
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_follow_the_provider() {
        let e = ProxyError::BadKey;
        assert_eq!(e.status(), 401);
        let b = e.body(ProviderKind::OpenAi);
        assert_eq!(b["error"]["code"], "invalid_api_key");
        assert_eq!(b["error"]["type"], "authentication_error");
        let b = e.body(ProviderKind::Anthropic);
        assert_eq!(b["type"], "error");
        assert_eq!(b["error"]["type"], "authentication_error");
        let b = e.body(ProviderKind::Gemini);
        assert_eq!(b["error"]["status"], "UNAUTHENTICATED");
        assert_eq!(ProxyError::LoopDetected("x".into()).status(), 429);
        assert_eq!(
            ProxyError::UpstreamTimeout {
                provider: "p".into(),
                ms: 1
            }
            .origin(),
            Origin::Upstream
        );
    }
}
