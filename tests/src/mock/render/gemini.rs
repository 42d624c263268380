//! Gemini generateContent: `promptTokenCount` includes cached tokens; `thoughtsTokenCount` is billed as
//! output and not part of `candidatesTokenCount`; stream chunks carry cumulative `usageMetadata`.

use std::fmt::Write as _;

use bytes::Bytes;

use super::{Ctx, JSON, Rendered, SSE, Tokens, words};

fn usage_metadata(t: &Tokens, candidates: u64, final_chunk: bool) -> String {
    let prompt = t.input + t.cached + t.write_5m + t.write_1h;
    let mut s = format!("{{\"promptTokenCount\":{prompt}");
    if final_chunk || candidates > 0 {
        let _ = write!(s, ",\"candidatesTokenCount\":{candidates}");
    }
    let _ = write!(
        s,
        ",\"totalTokenCount\":{}",
        prompt + candidates + t.reasoning
    );
    if t.cached > 0 {
        let _ = write!(s, ",\"cachedContentTokenCount\":{}", t.cached);
    }
    if t.reasoning > 0 {
        let _ = write!(s, ",\"thoughtsTokenCount\":{}", t.reasoning);
    }
    let _ = write!(
        s,
        ",\"promptTokensDetails\":[{{\"modality\":\"TEXT\",\"tokenCount\":{prompt}}}]}}"
    );
    s
}

fn chunk(t: &Tokens, ctx: &Ctx<'_>, text: &str, finish: Option<&str>, candidates: u64) -> String {
    let finish = finish
        .map(|f| format!(",\"finishReason\":\"{f}\""))
        .unwrap_or_default();
    format!(
        "{{\"candidates\":[{{\"content\":{{\"parts\":[{{\"text\":\"{text}\"}}],\"role\":\"model\"}}{finish},\"index\":0}}],\
         \"usageMetadata\":{usage},\"modelVersion\":{model},\"responseId\":\"mock{id:012x}\"}}",
        usage = usage_metadata(t, candidates, !finish.is_empty()),
        model = ctx.model_json,
        id = ctx.call_id,
    )
}

fn finish_reason(ctx: &Ctx<'_>) -> &'static str {
    if ctx.hit_max { "MAX_TOKENS" } else { "STOP" }
}

pub(super) fn generate(t: &Tokens, ctx: &Ctx<'_>) -> String {
    chunk(
        t,
        ctx,
        &words::text(t.text()),
        Some(finish_reason(ctx)),
        t.text(),
    )
}

pub(super) fn stream(t: &Tokens, ctx: &Ctx<'_>, pieces: &[String], sse: bool) -> Rendered {
    let mut frames = Vec::with_capacity(pieces.len() + 1);
    let mut so_far = 0u64;
    for (i, p) in pieces.iter().enumerate() {
        so_far += p.split_whitespace().count() as u64;
        let last = i + 1 == pieces.len();
        let text = if i == 0 { p.clone() } else { format!(" {p}") };
        let json = chunk(t, ctx, &text, last.then(|| finish_reason(ctx)), so_far);
        frames.push(if sse {
            // Gemini frames its SSE events with CRLF.
            Bytes::from(format!("data: {json}\r\n\r\n"))
        } else {
            Bytes::from(format!("{}{json}", if i == 0 { "[" } else { ",\r\n" }))
        });
    }
    if !sse {
        frames.push(Bytes::from_static(b"]"));
    }
    let usage_frame = Some(pieces.len() - 1);
    Rendered {
        trailer_from: frames.len(),
        frames,
        content_type: if sse { SSE } else { JSON },
        usage_frame,
    }
}

pub(super) fn count(t: &Tokens) -> String {
    let n = t.input + t.cached;
    format!(
        "{{\"totalTokens\":{n},\"promptTokensDetails\":[{{\"modality\":\"TEXT\",\"tokenCount\":{n}}}]}}"
    )
}
