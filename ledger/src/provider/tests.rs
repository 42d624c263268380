use super::*;

fn detect(host: &str, method: &str, path: &str) -> Option<Endpoint> {
    ProviderDetector::new().detect(host, method, path)
}

fn ep(kind: ProviderKind, api: Api, provider: &str) -> Endpoint {
    Endpoint::new(kind, api, provider)
}

#[test]
fn openai_paths() {
    use Api::*;
    for (path, api) in [
        ("/v1/chat/completions", ChatCompletions),
        ("/v1/completions", Completions),
        ("/v1/responses", Responses),
        ("/v1/embeddings", Embeddings),
        ("/v1/chat/completions?foo=bar", ChatCompletions),
    ] {
        assert_eq!(
            detect("api.openai.com", "POST", path),
            Some(ep(ProviderKind::OpenAi, api, "openai")),
            "{path}"
        );
    }
    assert_eq!(
        detect("api.openai.com", "GET", "/v1/chat/completions"),
        None
    );
    assert_eq!(
        detect("api.openai.com", "GET", "/v1/responses/resp_1"),
        None
    );
    assert_eq!(
        detect("api.openai.com", "POST", "/v1/responses/resp_1/cancel"),
        None
    );
    assert_eq!(detect("api.openai.com", "POST", "/v1/files"), None);
    assert_eq!(detect("api.openai.com", "POST", "/chat/completions"), None);
    assert_eq!(
        detect("api.openai.com", "POST", "/v1/foo/chat/completions"),
        None
    );
}

#[test]
fn host_matching_is_case_insensitive_ignores_default_port_and_trailing_dot() {
    let want = Some(ep(ProviderKind::OpenAi, Api::ChatCompletions, "openai"));
    for host in [
        "API.OpenAI.com",
        "api.openai.com:443",
        "api.openai.com.",
        "api.openai.com.:443",
        " api.openai.com ",
    ] {
        assert_eq!(detect(host, "post", "/v1/chat/completions"), want, "{host}");
    }
    assert_eq!(
        detect("api.openai.com:8443", "POST", "/v1/chat/completions"),
        None
    );
    assert_eq!(
        detect("evil-api.openai.com", "POST", "/v1/chat/completions"),
        None
    );
    assert_eq!(detect("example.com", "POST", "/v1/chat/completions"), None);
}

#[test]
fn anthropic_paths() {
    assert_eq!(
        detect("api.anthropic.com", "POST", "/v1/messages"),
        Some(ep(
            ProviderKind::Anthropic,
            Api::AnthropicMessages,
            "anthropic"
        ))
    );
    let count =
        detect("api.anthropic.com", "POST", "/v1/messages/count_tokens").expect("count_tokens");
    assert_eq!(count.api, Api::AnthropicCountTokens);
    assert!(count.api.is_free());
    assert_eq!(
        detect("api.anthropic.com", "POST", "/v1/messages/batches"),
        None
    );
    assert_eq!(detect("api.anthropic.com", "POST", "/v1/complete"), None);
}

#[test]
fn gemini_paths() {
    let e = detect(
        "generativelanguage.googleapis.com",
        "POST",
        "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse&key=x",
    )
    .expect("stream");
    assert_eq!(e.kind, ProviderKind::Gemini);
    assert_eq!(e.api, Api::GeminiStreamGenerateContent);
    assert_eq!(e.provider, "gemini");
    assert_eq!(e.model_in_path.as_deref(), Some("gemini-2.5-flash"));
    assert!(e.stream_in_path);
    assert!(e.sse_in_query);

    let e = detect(
        "generativelanguage.googleapis.com",
        "POST",
        "/v1/models/gemini-2.5-pro:generateContent",
    )
    .expect("gen");
    assert_eq!(e.api, Api::GeminiGenerateContent);
    assert!(!e.stream_in_path && !e.sse_in_query);

    let e = detect(
        "generativelanguage.googleapis.com",
        "POST",
        "/v1beta/models/gemini-2.5-flash:countTokens",
    )
    .expect("count");
    assert!(e.api.is_free());

    let e = detect(
        "generativelanguage.googleapis.com",
        "POST",
        "/v1beta/openai/chat/completions",
    )
    .expect("openai layer");
    assert_eq!(
        (e.kind, e.api, e.provider.as_str()),
        (
            ProviderKind::OpenAiCompatible,
            Api::ChatCompletions,
            "gemini"
        )
    );

    assert_eq!(
        detect(
            "generativelanguage.googleapis.com",
            "POST",
            "/v1beta/models/gemini-2.5-flash:embedContent"
        ),
        None
    );
    assert_eq!(
        detect(
            "generativelanguage.googleapis.com",
            "POST",
            "/v2/models/gemini-2.5-flash:generateContent"
        ),
        None
    );
    assert_eq!(
        detect(
            "generativelanguage.googleapis.com",
            "POST",
            "/v1beta/models/:generateContent"
        ),
        None
    );
    assert_eq!(
        detect(
            "generativelanguage.googleapis.com",
            "GET",
            "/v1beta/models/gemini-2.5-flash"
        ),
        None
    );
}

#[test]
fn vertex_paths() {
    let e = detect(
        "us-central1-aiplatform.googleapis.com",
        "POST",
        "/v1/projects/my-proj/locations/us-central1/publishers/google/models/gemini-2.5-pro:generateContent",
    )
    .expect("vertex gemini");
    assert_eq!(
        (e.kind, e.api, e.provider.as_str()),
        (
            ProviderKind::Gemini,
            Api::GeminiGenerateContent,
            "vertex-ai"
        )
    );
    assert_eq!(e.model_in_path.as_deref(), Some("gemini-2.5-pro"));

    let e = detect(
        "aiplatform.googleapis.com",
        "POST",
        "/v1/projects/p/locations/global/publishers/google/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
    )
    .expect("global");
    assert!(e.stream_in_path && e.sse_in_query);

    let e = detect(
        "europe-west1-aiplatform.googleapis.com",
        "POST",
        "/v1/projects/p/locations/europe-west1/publishers/anthropic/models/claude-sonnet-4-5%4020250929:streamRawPredict",
    )
    .expect("vertex anthropic");
    assert_eq!(
        (e.kind, e.api),
        (ProviderKind::Anthropic, Api::AnthropicMessages)
    );
    assert_eq!(
        e.model_in_path.as_deref(),
        Some("claude-sonnet-4-5@20250929")
    );
    assert!(e.stream_in_path);

    let e = detect(
        "us-east5-aiplatform.googleapis.com",
        "POST",
        "/v1/projects/p/locations/us-east5/publishers/anthropic/models/count-tokens:rawPredict",
    )
    .expect("vertex count tokens");
    assert_eq!(e.api, Api::AnthropicCountTokens);

    let e = detect(
        "us-central1-aiplatform.googleapis.com",
        "POST",
        "/v1beta1/projects/p/locations/us-central1/endpoints/openapi/chat/completions",
    )
    .expect("vertex openai layer");
    assert_eq!(
        (e.kind, e.api),
        (ProviderKind::OpenAiCompatible, Api::ChatCompletions)
    );

    assert_eq!(
        detect(
            "us-central1-aiplatform.googleapis.com",
            "POST",
            "/v1/projects/p/locations/l/publishers/meta/models/llama:rawPredict"
        ),
        None
    );
    assert_eq!(
        detect(
            "-aiplatform.googleapis.com",
            "POST",
            "/v1/projects/p/locations/l/publishers/google/models/m:generateContent"
        ),
        None
    );
}

#[test]
fn azure_paths() {
    let e = detect(
        "myres.openai.azure.com",
        "POST",
        "/openai/deployments/prod-gpt4o/chat/completions?api-version=2024-10-21",
    )
    .expect("azure");
    assert_eq!(
        (e.kind, e.api, e.provider.as_str()),
        (
            ProviderKind::AzureOpenAi,
            Api::ChatCompletions,
            "azure-openai"
        )
    );
    assert_eq!(e.model_in_path.as_deref(), Some("prod-gpt4o"));
    for (path, api) in [
        (
            "/openai/deployments/emb/embeddings?api-version=2024-10-21",
            Api::Embeddings,
        ),
        (
            "/openai/deployments/inst/completions?api-version=2024-10-21",
            Api::Completions,
        ),
        ("/openai/v1/chat/completions", Api::ChatCompletions),
        ("/openai/v1/responses", Api::Responses),
        (
            "/openai/responses?api-version=2025-04-01-preview",
            Api::Responses,
        ),
    ] {
        assert_eq!(
            detect("MyRes.OpenAI.Azure.com", "POST", path).map(|e| e.api),
            Some(api),
            "{path}"
        );
    }
    assert_eq!(
        detect(
            "myres.cognitiveservices.azure.com",
            "POST",
            "/openai/v1/embeddings"
        )
        .map(|e| e.api),
        Some(Api::Embeddings)
    );
    assert_eq!(
        detect(
            "myres.openai.azure.com",
            "POST",
            "/openai/deployments//chat/completions"
        ),
        None
    );
    assert_eq!(
        detect(
            "myres.openai.azure.com",
            "POST",
            "/openai/deployments/x/images/generations"
        ),
        None
    );
    assert_eq!(
        detect("openai.azure.com", "POST", "/openai/v1/chat/completions"),
        None
    );
}

#[test]
fn openai_compatible_public_hosts() {
    for (host, path, name, api) in [
        (
            "api.mistral.ai",
            "/v1/chat/completions",
            "mistral",
            Api::ChatCompletions,
        ),
        (
            "api.mistral.ai",
            "/v1/fim/completions",
            "mistral",
            Api::Completions,
        ),
        (
            "api.mistral.ai",
            "/v1/embeddings",
            "mistral",
            Api::Embeddings,
        ),
        (
            "api.groq.com",
            "/openai/v1/chat/completions",
            "groq",
            Api::ChatCompletions,
        ),
        (
            "api.groq.com",
            "/openai/v1/responses",
            "groq",
            Api::Responses,
        ),
        (
            "api.deepseek.com",
            "/chat/completions",
            "deepseek",
            Api::ChatCompletions,
        ),
        (
            "api.deepseek.com",
            "/v1/chat/completions",
            "deepseek",
            Api::ChatCompletions,
        ),
        (
            "api.deepseek.com",
            "/beta/completions",
            "deepseek",
            Api::Completions,
        ),
        (
            "api.together.xyz",
            "/v1/chat/completions",
            "together",
            Api::ChatCompletions,
        ),
        (
            "api.fireworks.ai",
            "/inference/v1/chat/completions",
            "fireworks",
            Api::ChatCompletions,
        ),
        (
            "openrouter.ai",
            "/api/v1/chat/completions",
            "openrouter",
            Api::ChatCompletions,
        ),
        (
            "api.x.ai",
            "/v1/chat/completions",
            "xai",
            Api::ChatCompletions,
        ),
    ] {
        assert_eq!(
            detect(host, "POST", path),
            Some(ep(ProviderKind::OpenAiCompatible, api, name)),
            "{host}{path}"
        );
    }
    assert_eq!(detect("api.groq.com", "POST", "/v1/chat/completions"), None);
    assert_eq!(
        detect("openrouter.ai", "POST", "/v1/chat/completions"),
        None
    );
}

#[test]
fn configured_hosts() {
    let d = ProviderDetector::new()
        .with_host("10.0.0.5:8000", ProviderKind::OpenAiCompatible, "vllm")
        .with_host("*.llm.internal", ProviderKind::Anthropic, "gateway")
        .with_host(
            "API.OPENAI.COM:443",
            ProviderKind::OpenAiCompatible,
            "openai-override",
        );
    assert_eq!(
        d.detect("10.0.0.5:8000", "POST", "/v1/chat/completions"),
        Some(ep(
            ProviderKind::OpenAiCompatible,
            Api::ChatCompletions,
            "vllm"
        ))
    );
    assert_eq!(
        d.detect("10.0.0.5:8000", "POST", "/v1/completions")
            .map(|e| e.api),
        Some(Api::Completions)
    );
    assert_eq!(
        d.detect("10.0.0.5:8001", "POST", "/v1/chat/completions"),
        None
    );
    assert_eq!(d.detect("10.0.0.5:8000", "POST", "/metrics"), None);
    assert_eq!(
        d.detect("eu.llm.internal", "POST", "/anthropic/v1/messages")
            .map(|e| e.provider),
        Some("gateway".to_owned())
    );
    assert_eq!(
        d.detect("api.openai.com", "POST", "/v1/chat/completions")
            .map(|e| e.provider),
        Some("openai-override".to_owned())
    );
    assert_eq!(d.detect("[::1]:8000", "POST", "/v1/chat/completions"), None);
    let d = d.with_host("[::1]:8000", ProviderKind::OpenAiCompatible, "local");
    assert_eq!(
        d.detect("[::1]:8000", "POST", "/v1/chat/completions")
            .map(|e| e.provider),
        Some("local".to_owned())
    );
}

#[test]
fn classify_matches_suffixes_after_any_base_url() {
    for path in [
        "/chat/completions",
        "/v1/chat/completions",
        "/openai/v1/chat/completions?x=1",
        "/chat/completions/",
    ] {
        assert_eq!(
            classify(ProviderKind::OpenAi, "openai", "POST", path),
            Some(ep(ProviderKind::OpenAi, Api::ChatCompletions, "openai")),
            "{path}"
        );
    }
    assert_eq!(
        classify(ProviderKind::OpenAi, "openai", "GET", "/chat/completions"),
        None
    );
    assert_eq!(
        classify(ProviderKind::OpenAi, "openai", "POST", "/models"),
        None
    );
    assert_eq!(
        classify(ProviderKind::OpenAi, "openai", "POST", "/responses").map(|e| e.api),
        Some(Api::Responses)
    );
    assert_eq!(
        classify(ProviderKind::OpenAi, "openai", "POST", "/v1/embeddings").map(|e| e.api),
        Some(Api::Embeddings)
    );

    let e = classify(
        ProviderKind::AzureOpenAi,
        "azure",
        "POST",
        "/openai/deployments/gpt-4o-prod/chat/completions?api-version=2024-10-21",
    )
    .expect("azure");
    assert_eq!(e.model_in_path.as_deref(), Some("gpt-4o-prod"));
    let e = classify(
        ProviderKind::AzureOpenAi,
        "azure",
        "POST",
        "/deployments/gpt-4o-prod/chat/completions",
    )
    .expect("azure rel");
    assert_eq!(e.model_in_path.as_deref(), Some("gpt-4o-prod"));

    for path in ["/messages", "/v1/messages"] {
        assert_eq!(
            classify(ProviderKind::Anthropic, "anthropic", "POST", path).map(|e| e.api),
            Some(Api::AnthropicMessages)
        );
    }
    assert_eq!(
        classify(
            ProviderKind::Anthropic,
            "anthropic",
            "POST",
            "/v1/messages/count_tokens"
        )
        .map(|e| e.api),
        Some(Api::AnthropicCountTokens)
    );
    assert_eq!(
        classify(
            ProviderKind::Anthropic,
            "anthropic",
            "POST",
            "/v1/chat/completions"
        ),
        None
    );

    let e = classify(
        ProviderKind::Gemini,
        "gemini",
        "POST",
        "/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
    )
    .expect("gemini");
    assert_eq!(e.api, Api::GeminiStreamGenerateContent);
    assert!(e.sse_in_query && e.stream_in_path);
    let e = classify(
        ProviderKind::Gemini,
        "gemini",
        "POST",
        "/gemini-2.5-flash:generateContent",
    )
    .expect("gemini bare");
    assert_eq!(e.model_in_path.as_deref(), Some("gemini-2.5-flash"));
    let e = classify(
        ProviderKind::Gemini,
        "vertex",
        "POST",
        "/publishers/anthropic/models/claude-opus-4-1@20250805:rawPredict",
    )
    .expect("vertex anthropic via gemini kind");
    assert_eq!(
        (e.kind, e.api),
        (ProviderKind::Anthropic, Api::AnthropicMessages)
    );
    assert_eq!(
        classify(
            ProviderKind::Gemini,
            "gemini",
            "POST",
            "/models/x:embedContent"
        ),
        None
    );
    assert_eq!(
        classify(ProviderKind::OpenAi, "openai", "POST", "/v1/foo:bar"),
        None
    );
}

#[test]
fn kind_names_round_trip() {
    for kind in [
        ProviderKind::OpenAi,
        ProviderKind::Anthropic,
        ProviderKind::Gemini,
        ProviderKind::AzureOpenAi,
        ProviderKind::OpenAiCompatible,
    ] {
        assert_eq!(kind.to_string().parse::<ProviderKind>(), Ok(kind));
        let json = serde_json::to_string(&kind).expect("serialize");
        assert_eq!(json, format!("\"{kind}\""));
    }
    let err = "openia".parse::<ProviderKind>().expect_err("typo");
    assert!(err.to_string().contains("openai-compatible"));
}

#[test]
fn normalize_host_cases() {
    assert_eq!(normalize_host("Example.COM.:443"), "example.com");
    assert_eq!(normalize_host("example.com:80"), "example.com");
    assert_eq!(normalize_host("10.0.0.5:8000"), "10.0.0.5:8000");
    assert_eq!(normalize_host("[::1]:443"), "[::1]");
    assert_eq!(normalize_host("[::1]:8000"), "[::1]:8000");
}

#[test]
fn percent_decoding() {
    assert_eq!(path::percent_decode("a%40b"), "a@b");
    assert_eq!(path::percent_decode("a%4"), "a%4");
    assert_eq!(path::percent_decode("a%+1"), "a%+1");
}

#[test]
fn provider_hosts_are_known_whatever_the_path() {
    let d = ProviderDetector::new()
        .with_host("10.0.0.5:8000", ProviderKind::OpenAiCompatible, "vllm")
        .with_host("*.llm.internal", ProviderKind::OpenAi, "gateway");
    for host in [
        "api.openai.com",
        "API.OpenAI.com:443",
        "api.anthropic.com.",
        "generativelanguage.googleapis.com",
        "us-central1-aiplatform.googleapis.com",
        "myres.openai.azure.com",
        "api.groq.com",
        "openrouter.ai",
        "10.0.0.5:8000",
        "a.llm.internal",
    ] {
        assert!(d.is_provider_host(host), "{host}");
    }
    for host in [
        "",
        "example.com",
        "10.0.0.5",
        "10.0.0.5:8001",
        "api.openai.com:8443",
        "llm.internal.example.com",
        "-aiplatform.googleapis.com",
        ".openai.azure.com",
    ] {
        assert!(!d.is_provider_host(host), "{host}");
    }
}

#[test]
fn server_names_name_their_provider() {
    let d = ProviderDetector::new()
        .with_host("10.0.0.5:8000", ProviderKind::OpenAiCompatible, "vllm")
        .with_host("llm.test:8443", ProviderKind::OpenAi, "gateway")
        .with_host("*.llm.internal", ProviderKind::OpenAiCompatible, "internal");
    for (name, want) in [
        ("api.openai.com", Some("openai")),
        ("API.Anthropic.com.", Some("anthropic")),
        ("my-res.openai.azure.com", Some("azure-openai")),
        ("llm.test", Some("gateway")),
        ("a.llm.internal", Some("internal")),
        ("10.0.0.5", Some("vllm")),
        ("example.com", None),
        ("", None),
        ("api.openai.com:443", Some("openai")),
        ("api.openai.com:8443", None),
    ] {
        assert_eq!(d.provider_of_server_name(name), want, "{name}");
    }
}
