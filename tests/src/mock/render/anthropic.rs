//! Anthropic Messages: `input_tokens` excludes cache reads and writes; writes split 5m / 1h.

use super::{Ctx, Rendered, SSE, Tokens, sse_frame, words};

fn stop_reason(ctx: &Ctx<'_>) -> &'static str {
    if ctx.hit_max {
        "max_tokens"
    } else {
        "end_turn"
    }
}

fn usage(t: &Tokens, output: u64) -> String {
    format!(
        "{{\"input_tokens\":{i},\"cache_creation_input_tokens\":{w},\"cache_read_input_tokens\":{c},\
         \"cache_creation\":{{\"ephemeral_5m_input_tokens\":{w5},\"ephemeral_1h_input_tokens\":{w1}}},\
         \"output_tokens\":{output},\"service_tier\":\"standard\"}}",
        i = t.input,
        w = t.write_5m + t.write_1h,
        c = t.cached,
        w5 = t.write_5m,
        w1 = t.write_1h,
    )
}

fn message_object(
    t: &Tokens,
    ctx: &Ctx<'_>,
    content: &str,
    stop: Option<&str>,
    output: u64,
) -> String {
    let stop = stop.map_or_else(|| "null".to_owned(), |s| format!("\"{s}\""));
    format!(
        "{{\"id\":\"msg_mock{id:012x}\",\"type\":\"message\",\"role\":\"assistant\",\"model\":{model},\
         \"content\":[{content}],\"stop_reason\":{stop},\"stop_sequence\":null,\"usage\":{usage}}}",
        id = ctx.call_id,
        model = ctx.model_json,
        usage = usage(t, output),
    )
}

pub(super) fn message(t: &Tokens, ctx: &Ctx<'_>) -> String {
    let content = format!(
        "{{\"type\":\"text\",\"text\":\"{}\"}}",
        words::text(t.text())
    );
    message_object(t, ctx, &content, Some(stop_reason(ctx)), t.output)
}

pub(super) fn message_stream(t: &Tokens, ctx: &Ctx<'_>, pieces: &[String]) -> Rendered {
    let mut frames = Vec::with_capacity(pieces.len() + 6);
    let start = message_object(t, ctx, "", None, t.output.min(1));
    frames.push(sse_frame(
        Some("message_start"),
        &format!("{{\"type\":\"message_start\",\"message\":{start}}}"),
    ));
    frames.push(sse_frame(
        Some("content_block_start"),
        "{\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}",
    ));
    frames.push(sse_frame(Some("ping"), "{\"type\": \"ping\"}"));
    for (i, p) in pieces.iter().enumerate() {
        let sep = if i == 0 { "" } else { " " };
        frames.push(sse_frame(
            Some("content_block_delta"),
            &format!(
                "{{\"type\":\"content_block_delta\",\"index\":0,\"delta\":{{\"type\":\"text_delta\",\"text\":\"{sep}{p}\"}}}}"
            ),
        ));
    }
    frames.push(sse_frame(
        Some("content_block_stop"),
        "{\"type\":\"content_block_stop\",\"index\":0}",
    ));
    let trailer_from = frames.len();
    frames.push(sse_frame(
        Some("message_delta"),
        &format!(
            "{{\"type\":\"message_delta\",\"delta\":{{\"stop_reason\":\"{}\",\"stop_sequence\":null}},\
             \"usage\":{{\"output_tokens\":{}}}}}",
            stop_reason(ctx),
            t.output
        ),
    ));
    let usage_frame = Some(frames.len() - 1);
    frames.push(sse_frame(
        Some("message_stop"),
        "{\"type\":\"message_stop\"}",
    ));
    Rendered {
        frames,
        content_type: SSE,
        usage_frame,
        trailer_from,
    }
}
