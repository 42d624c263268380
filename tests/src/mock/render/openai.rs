//! OpenAI: chat completions, legacy completions, responses, embeddings.

use std::fmt::Write as _;

use base64::Engine as _;
use bytes::Bytes;

use super::{Ctx, Rendered, Request, SSE, Tokens, sse_frame, words};

/// `prompt_tokens` counts cached reads (and, having no cache-write price, any writes).
fn prompt_tokens(t: &Tokens) -> u64 {
    t.input + t.cached + t.write_5m + t.write_1h
}

fn chat_usage(t: &Tokens) -> String {
    let p = prompt_tokens(t);
    format!(
        "{{\"prompt_tokens\":{p},\"completion_tokens\":{o},\"total_tokens\":{tot},\
         \"prompt_tokens_details\":{{\"cached_tokens\":{c},\"audio_tokens\":0}},\
         \"completion_tokens_details\":{{\"reasoning_tokens\":{r},\"audio_tokens\":0,\
         \"accepted_prediction_tokens\":0,\"rejected_prediction_tokens\":0}}}}",
        o = t.output,
        tot = p + t.output,
        c = t.cached,
        r = t.reasoning,
    )
}

fn finish(ctx: &Ctx<'_>) -> &'static str {
    if ctx.hit_max { "length" } else { "stop" }
}

pub(super) fn chat(t: &Tokens, ctx: &Ctx<'_>) -> String {
    format!(
        "{{\"id\":\"chatcmpl-mock{id:012x}\",\"object\":\"chat.completion\",\"created\":{created},\"model\":{model},\
         \"choices\":[{{\"index\":0,\"message\":{{\"role\":\"assistant\",\"content\":\"{text}\",\"refusal\":null,\
         \"annotations\":[]}},\"logprobs\":null,\"finish_reason\":\"{fin}\"}}],\"usage\":{usage},\
         \"service_tier\":\"default\",\"system_fingerprint\":\"fp_mock\"}}",
        id = ctx.call_id,
        created = ctx.created,
        model = ctx.model_json,
        text = words::text(t.text()),
        fin = finish(ctx),
        usage = chat_usage(t),
    )
}

pub(super) fn chat_stream(
    t: &Tokens,
    ctx: &Ctx<'_>,
    pieces: &[String],
    include_usage: bool,
) -> Rendered {
    let head = format!(
        "{{\"id\":\"chatcmpl-mock{:012x}\",\"object\":\"chat.completion.chunk\",\"created\":{},\"model\":{},\
         \"service_tier\":\"default\",\"system_fingerprint\":\"fp_mock\",\"choices\":[",
        ctx.call_id, ctx.created, ctx.model_json
    );
    let tail = if include_usage {
        "],\"usage\":null}"
    } else {
        "]}"
    };
    let chunk = |choice: &str| sse_frame(None, &format!("{head}{choice}{tail}"));
    let mut frames = Vec::with_capacity(pieces.len() + 5);
    frames.push(chunk(
        "{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\",\"refusal\":null},\"logprobs\":null,\"finish_reason\":null}",
    ));
    for (i, p) in pieces.iter().enumerate() {
        let sep = if i == 0 { "" } else { " " };
        frames.push(chunk(&format!(
            "{{\"index\":0,\"delta\":{{\"content\":\"{sep}{p}\"}},\"logprobs\":null,\"finish_reason\":null}}"
        )));
    }
    frames.push(chunk(&format!(
        "{{\"index\":0,\"delta\":{{}},\"logprobs\":null,\"finish_reason\":\"{}\"}}",
        finish(ctx)
    )));
    let trailer_from = frames.len();
    let usage_frame = include_usage.then(|| {
        frames.push(sse_frame(
            None,
            &format!("{head}],\"usage\":{}}}", chat_usage(t)),
        ));
        frames.len() - 1
    });
    frames.push(Bytes::from_static(b"data: [DONE]\n\n"));
    Rendered {
        frames,
        content_type: SSE,
        usage_frame,
        trailer_from,
    }
}

pub(super) fn completion(t: &Tokens, ctx: &Ctx<'_>) -> String {
    format!(
        "{{\"id\":\"cmpl-mock{id:012x}\",\"object\":\"text_completion\",\"created\":{created},\"model\":{model},\
         \"choices\":[{{\"text\":\"{text}\",\"index\":0,\"logprobs\":null,\"finish_reason\":\"{fin}\"}}],\
         \"usage\":{usage},\"system_fingerprint\":\"fp_mock\"}}",
        id = ctx.call_id,
        created = ctx.created,
        model = ctx.model_json,
        text = words::text(t.text()),
        fin = finish(ctx),
        usage = chat_usage(t),
    )
}

pub(super) fn completion_stream(
    t: &Tokens,
    ctx: &Ctx<'_>,
    pieces: &[String],
    include_usage: bool,
) -> Rendered {
    let head = format!(
        "{{\"id\":\"cmpl-mock{:012x}\",\"object\":\"text_completion\",\"created\":{},\"model\":{},\
         \"system_fingerprint\":\"fp_mock\",\"choices\":[",
        ctx.call_id, ctx.created, ctx.model_json
    );
    let tail = if include_usage {
        "],\"usage\":null}"
    } else {
        "]}"
    };
    let mut frames = Vec::with_capacity(pieces.len() + 3);
    for (i, p) in pieces.iter().enumerate() {
        let sep = if i == 0 { "" } else { " " };
        frames.push(sse_frame(
            None,
            &format!("{head}{{\"text\":\"{sep}{p}\",\"index\":0,\"logprobs\":null,\"finish_reason\":null}}{tail}"),
        ));
    }
    frames.push(sse_frame(
        None,
        &format!(
            "{head}{{\"text\":\"\",\"index\":0,\"logprobs\":null,\"finish_reason\":\"{}\"}}{tail}",
            finish(ctx)
        ),
    ));
    let trailer_from = frames.len();
    let usage_frame = include_usage.then(|| {
        frames.push(sse_frame(
            None,
            &format!("{head}],\"usage\":{}}}", chat_usage(t)),
        ));
        frames.len() - 1
    });
    frames.push(Bytes::from_static(b"data: [DONE]\n\n"));
    Rendered {
        frames,
        content_type: SSE,
        usage_frame,
        trailer_from,
    }
}

fn responses_usage(t: &Tokens) -> String {
    let p = prompt_tokens(t);
    format!(
        "{{\"input_tokens\":{p},\"input_tokens_details\":{{\"cached_tokens\":{c}}},\"output_tokens\":{o},\
         \"output_tokens_details\":{{\"reasoning_tokens\":{r}}},\"total_tokens\":{tot}}}",
        c = t.cached,
        o = t.output,
        r = t.reasoning,
        tot = p + t.output
    )
}

fn message_item(ctx: &Ctx<'_>, status: &str, text: Option<&str>) -> String {
    let content = text.map_or_else(String::new, |text| {
        format!(
            "{{\"type\":\"output_text\",\"text\":\"{text}\",\"annotations\":[],\"logprobs\":[]}}"
        )
    });
    format!(
        "{{\"type\":\"message\",\"id\":\"msg_mock{:012x}\",\"status\":\"{status}\",\"role\":\"assistant\",\
         \"content\":[{content}]}}",
        ctx.call_id
    )
}

/// The Response object; `output` and `usage` are JSON.
fn response_object(ctx: &Ctx<'_>, status: &str, output: &str, usage: &str) -> String {
    let incomplete = if ctx.hit_max && status == "incomplete" {
        "{\"reason\":\"max_output_tokens\"}"
    } else {
        "null"
    };
    format!(
        "{{\"id\":\"resp_mock{id:012x}\",\"object\":\"response\",\"created_at\":{created},\"status\":\"{status}\",\
         \"background\":false,\"error\":null,\"incomplete_details\":{incomplete},\"instructions\":null,\
         \"max_output_tokens\":null,\"model\":{model},\"output\":[{output}],\"parallel_tool_calls\":true,\
         \"previous_response_id\":null,\"reasoning\":{{\"effort\":null,\"summary\":null}},\"service_tier\":\"default\",\
         \"store\":true,\"temperature\":1.0,\"text\":{{\"format\":{{\"type\":\"text\"}}}},\"tool_choice\":\"auto\",\
         \"tools\":[],\"top_p\":1.0,\"truncation\":\"disabled\",\"usage\":{usage},\"user\":null,\"metadata\":{{}}}}",
        id = ctx.call_id,
        created = ctx.created,
        model = ctx.model_json,
    )
}

fn response_output(t: &Tokens, ctx: &Ctx<'_>, text: &str) -> String {
    let mut out = String::new();
    if t.reasoning > 0 {
        let _ = write!(
            out,
            "{{\"type\":\"reasoning\",\"id\":\"rs_mock{:012x}\",\"summary\":[]}},",
            ctx.call_id
        );
    }
    out.push_str(&message_item(ctx, "completed", Some(text)));
    out
}

pub(super) fn response(t: &Tokens, ctx: &Ctx<'_>) -> String {
    let text = words::text(t.text());
    response_object(
        ctx,
        "completed",
        &response_output(t, ctx, &text),
        &responses_usage(t),
    )
}

pub(super) fn response_stream(t: &Tokens, ctx: &Ctx<'_>, pieces: &[String]) -> Rendered {
    let mut frames = Vec::with_capacity(pieces.len() + 9);
    let mut seq = 0u64;
    let mut ev = |frames: &mut Vec<Bytes>, ty: &str, rest: &str| {
        frames.push(sse_frame(
            Some(ty),
            &format!("{{\"type\":\"{ty}\",\"sequence_number\":{seq},{rest}}}"),
        ));
        seq += 1;
    };
    let item_id = format!("msg_mock{:012x}", ctx.call_id);
    let pending = response_object(ctx, "in_progress", "", "null");
    ev(
        &mut frames,
        "response.created",
        &format!("\"response\":{pending}"),
    );
    ev(
        &mut frames,
        "response.in_progress",
        &format!("\"response\":{pending}"),
    );
    let out_index = u8::from(t.reasoning > 0);
    ev(
        &mut frames,
        "response.output_item.added",
        &format!(
            "\"output_index\":{out_index},\"item\":{}",
            message_item(ctx, "in_progress", None)
        ),
    );
    let loc = format!("\"item_id\":\"{item_id}\",\"output_index\":{out_index},\"content_index\":0");
    ev(
        &mut frames,
        "response.content_part.added",
        &format!(
            "{loc},\"part\":{{\"type\":\"output_text\",\"text\":\"\",\"annotations\":[],\"logprobs\":[]}}"
        ),
    );
    for (i, p) in pieces.iter().enumerate() {
        let sep = if i == 0 { "" } else { " " };
        ev(
            &mut frames,
            "response.output_text.delta",
            &format!("{loc},\"delta\":\"{sep}{p}\",\"logprobs\":[]"),
        );
    }
    let text = pieces.join(" ");
    ev(
        &mut frames,
        "response.output_text.done",
        &format!("{loc},\"text\":\"{text}\",\"logprobs\":[]"),
    );
    ev(
        &mut frames,
        "response.content_part.done",
        &format!(
            "{loc},\"part\":{{\"type\":\"output_text\",\"text\":\"{text}\",\"annotations\":[],\"logprobs\":[]}}"
        ),
    );
    ev(
        &mut frames,
        "response.output_item.done",
        &format!(
            "\"output_index\":{out_index},\"item\":{}",
            message_item(ctx, "completed", Some(&text))
        ),
    );
    let done = response_object(
        ctx,
        "completed",
        &response_output(t, ctx, &text),
        &responses_usage(t),
    );
    ev(
        &mut frames,
        "response.completed",
        &format!("\"response\":{done}"),
    );
    let usage_frame = Some(frames.len() - 1);
    Rendered {
        trailer_from: frames.len(),
        frames,
        content_type: SSE,
        usage_frame,
    }
}

pub(super) fn embeddings(t: &Tokens, ctx: &Ctx<'_>, req: &Request) -> String {
    let dims = req.dims.unwrap_or(ctx.embedding_dims).clamp(1, 4096);
    let mut data = String::with_capacity(req.embed_inputs * (dims * 12 + 64));
    for i in 0..req.embed_inputs {
        let v = (0..dims).map(|j| {
            let x = u16::try_from((i * 31 + j * 17) % 200).unwrap_or(0);
            f32::from(x) / 200.0 - 0.5
        });
        if i > 0 {
            data.push(',');
        }
        let _ = write!(
            data,
            "{{\"object\":\"embedding\",\"index\":{i},\"embedding\":"
        );
        if req.base64 {
            let bytes: Vec<u8> = v.flat_map(f32::to_le_bytes).collect();
            let _ = write!(
                data,
                "\"{}\"",
                base64::engine::general_purpose::STANDARD.encode(bytes)
            );
        } else {
            data.push('[');
            for (j, x) in v.enumerate() {
                if j > 0 {
                    data.push(',');
                }
                let _ = write!(data, "{x}");
            }
            data.push(']');
        }
        data.push('}');
    }
    let p = prompt_tokens(t);
    format!(
        "{{\"object\":\"list\",\"data\":[{data}],\"model\":{},\"usage\":{{\"prompt_tokens\":{p},\"total_tokens\":{p}}}}}",
        ctx.model_json
    )
}
