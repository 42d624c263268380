//! The usage-only event filter of OpenAI chat streams: where the enforcer added
//! `stream_options.include_usage` to learn a stream's usage, the extra usage-only event is cut
//! out before the client sees it, leaving every other byte untouched.

use bytes::{Bytes, BytesMut};

use crate::error::ProxyError;

/// Longest event the filter holds back: an event (or a run of bytes without a blank line) longer
/// than this switches the filter off for the rest of the stream, so an upstream cannot make the
/// enforcer buffer without bound. The meter still sees every byte, so usage is still settled; the
/// client then also sees the usage event.
pub const MAX_EVENT_BYTES: usize = 1024 * 1024;

/// Removes usage-only chat-completion chunks (`"choices": []` with a `usage` object) from an SSE
/// stream, working on whole events so every other byte passes unchanged. Events are framed as the
/// WHATWG event-stream format says (lines end with CR, LF or CRLF; a blank line ends an event),
/// and each byte is scanned once however the stream is chunked.
#[derive(Debug, Default)]
pub struct UsageChunkFilter {
    /// The start of the stream's current event, not yet known to be complete.
    pending: BytesMut,
    /// Where the scan for the end of the pending event stands.
    scan: EventScan,
    /// An event outgrew [`MAX_EVENT_BYTES`]: everything passes unchanged from then on.
    passthrough: bool,
}

/// How far the search for the blank line ending the pending event got.
#[derive(Debug, Default, Clone, Copy)]
struct EventScan {
    /// Bytes of the pending event scanned so far.
    pos: usize,
    /// The current line has bytes, so the next line end does not make a blank line.
    in_line: bool,
    /// The last byte scanned was a CR line end, which an LF may still join (CRLF); `Some(true)`
    /// when that CR ended a blank line, so the event ends after it (and after such an LF).
    after_cr: Option<bool>,
}

/// What scanning the pending bytes found.
enum ScanResult {
    /// The pending event ends this many bytes in.
    End(usize),
    /// No event end in the bytes so far.
    NeedMore,
    /// The pending event is longer than [`MAX_EVENT_BYTES`].
    TooLong,
}

impl EventScan {
    /// Continues the scan over `pending` (the same bytes as before, maybe with more appended).
    /// The outcome depends only on the bytes, never on how they were chunked.
    fn advance(&mut self, pending: &[u8]) -> ScanResult {
        while self.pos < pending.len() {
            if self.pos >= MAX_EVENT_BYTES {
                return ScanResult::TooLong;
            }
            let b = pending[self.pos];
            if let Some(blank) = self.after_cr.take() {
                if b == b'\n' {
                    // The LF of a CRLF: the line already ended at the CR.
                    self.pos += 1;
                    if blank {
                        return ScanResult::End(self.pos);
                    }
                    continue;
                }
                if blank {
                    return ScanResult::End(self.pos);
                }
            }
            match b {
                b'\n' if !self.in_line => return ScanResult::End(self.pos + 1),
                b'\n' => self.pos += 1,
                b'\r' => {
                    self.after_cr = Some(!self.in_line);
                    self.pos += 1;
                }
                _ => {
                    // Skip the rest of the line at once, never past the limit.
                    let stop = pending.len().min(MAX_EVENT_BYTES);
                    let line = &pending[self.pos..stop];
                    self.pos += memchr::memchr2(b'\n', b'\r', line).unwrap_or(line.len());
                    self.in_line = true;
                    continue;
                }
            }
            self.in_line = false;
        }
        ScanResult::NeedMore
    }
}

/// Whether one SSE event is a usage-only chat chunk.
fn is_usage_only(event: &[u8]) -> bool {
    let joined: Vec<u8>;
    let data = match single_data_line(event) {
        Some(data) => data,
        None => {
            // Lines end with CR, LF or CRLF; the empty piece a CRLF leaves is not a data line.
            // Several data lines are joined as SSE says.
            if std::str::from_utf8(event).is_err() {
                return false;
            }
            joined = event
                .split(|&b| b == b'\r' || b == b'\n')
                .filter_map(|l| l.strip_prefix(b"data:"))
                .map(|d| d.strip_prefix(b" ").unwrap_or(d))
                .collect::<Vec<_>>()
                .join(&b'\n');
            &joined
        }
    };
    // With include_usage every chunk carries `"usage": null`; only a chunk with an empty
    // `choices` array can be the usage-only one, so the others skip the JSON parse.
    if !has_empty_choices(data) {
        return false;
    }
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) else {
        return false;
    };
    v.get("choices")
        .and_then(serde_json::Value::as_array)
        .is_some_and(Vec::is_empty)
        && v.get("usage").is_some_and(serde_json::Value::is_object)
}

/// The data of an event that is one `data:` line and its line ends (the usual event), read in
/// place; `None` for any other event.
fn single_data_line(event: &[u8]) -> Option<&[u8]> {
    let end = memchr::memchr2(b'\n', b'\r', event).unwrap_or(event.len());
    if !event[end..].iter().all(|&b| b == b'\n' || b == b'\r') {
        return None;
    }
    let data = event[..end].strip_prefix(b"data:")?;
    Some(data.strip_prefix(b" ").unwrap_or(data))
}

/// Whether `event` has a `"choices"` member whose value is an empty array (JSON whitespace
/// allowed around the colon and inside the brackets). A cheap necessary condition for
/// [`is_usage_only`]; the parse that follows decides.
fn has_empty_choices(json: &[u8]) -> bool {
    // Built once: `memmem::find_iter` would build its searcher again for every event.
    static CHOICES: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
        std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"\"choices\""));
    let ws = |b: &u8| matches!(b, b' ' | b'\t' | b'\n' | b'\r');
    let skip_ws = |s: &[u8]| -> usize { s.iter().position(|b| !ws(b)).unwrap_or(s.len()) };
    CHOICES.find_iter(json).any(|i| {
        let mut rest = &json[i + b"\"choices\"".len()..];
        rest = &rest[skip_ws(rest)..];
        let Some(rest) = rest.strip_prefix(b":") else {
            return false;
        };
        let rest = &rest[skip_ws(rest)..];
        let Some(rest) = rest.strip_prefix(b"[") else {
            return false;
        };
        rest[skip_ws(rest)..].starts_with(b"]")
    })
}

impl UsageChunkFilter {
    /// Takes a chunk; returns the bytes of every complete event except usage-only ones.
    ///
    /// A chunk that starts at an event boundary and holds no usage-only event comes back as a
    /// slice of itself (no copy): the usual case, where the upstream writes one event per frame.
    pub fn push(&mut self, chunk: &Bytes) -> Bytes {
        if self.passthrough {
            return chunk.clone();
        }
        if self.pending.is_empty() {
            return self.push_at_boundary(chunk);
        }
        self.pending.extend_from_slice(chunk);
        let mut out = BytesMut::new();
        loop {
            match self.scan.advance(&self.pending) {
                ScanResult::End(end) => {
                    self.scan = EventScan::default();
                    let event = self.pending.split_to(end);
                    if !is_usage_only(&event) {
                        out.extend_from_slice(&event);
                    }
                }
                ScanResult::NeedMore => return out.freeze(),
                ScanResult::TooLong => {
                    self.too_long();
                    out.extend_from_slice(&self.pending.split());
                    self.pending = BytesMut::new();
                    return out.freeze();
                }
            }
        }
    }

    /// [`Self::push`] when no event is pending: events are scanned in `chunk` itself, and only
    /// a cut (or an unterminated tail, which is kept) copies bytes.
    fn push_at_boundary(&mut self, chunk: &Bytes) -> Bytes {
        // The chunk's bytes before `start` are complete events; `cut` holds those kept once an
        // event was cut out.
        let mut start = 0;
        let mut cut: Option<BytesMut> = None;
        loop {
            let rest = &chunk[start..];
            match self.scan.advance(rest) {
                ScanResult::End(len) => {
                    self.scan = EventScan::default();
                    let event = &rest[..len];
                    if is_usage_only(event) {
                        cut.get_or_insert_with(|| BytesMut::from(&chunk[..start]));
                    } else if let Some(kept) = cut.as_mut() {
                        kept.extend_from_slice(event);
                    }
                    start += len;
                }
                ScanResult::NeedMore => {
                    self.pending.extend_from_slice(rest);
                    break;
                }
                ScanResult::TooLong => {
                    self.too_long();
                    if let Some(kept) = cut.as_mut() {
                        kept.extend_from_slice(rest);
                    }
                    start = chunk.len();
                    break;
                }
            }
        }
        match cut {
            Some(kept) => kept.freeze(),
            None => chunk.slice(..start),
        }
    }

    /// An event outgrew [`MAX_EVENT_BYTES`]: the filter passes everything from now on.
    fn too_long(&mut self) {
        tracing::debug!(
            limit = MAX_EVENT_BYTES,
            "SSE event without a blank line past the limit: the rest of the stream passes \
             unfiltered"
        );
        self.passthrough = true;
    }

    /// The unterminated tail at end of stream, unchanged.
    pub fn finish(&mut self) -> Bytes {
        self.scan = EventScan::default();
        let rest = self.pending.split().freeze();
        if is_usage_only(&rest) {
            Bytes::new()
        } else {
            rest
        }
    }
}

/// Adds `stream_options.include_usage = true` to an OpenAI chat request (the enforcer then
/// strips the extra usage event with [`UsageChunkFilter`]).
///
/// A body without a top-level `stream_options` (the usual case: the enforcer injects only where
/// the client did not ask for usage) keeps its bytes: the member is written before the closing
/// brace, with no parse into a tree and no re-serialisation. A body that has one is rewritten
/// whole, keeping that object's other members.
///
/// # Errors
/// [`ProxyError::BadBody`] when the body is not a JSON object.
pub fn inject_include_usage(body: &[u8]) -> Result<Bytes, ProxyError> {
    if !has_stream_options(body)? {
        // A valid object ends with its closing brace, then only whitespace.
        let end = body
            .iter()
            .rposition(|&b| b == b'}')
            .ok_or_else(|| ProxyError::BadBody("the body is not a JSON object".into()))?;
        let empty = body[..end]
            .iter()
            .rev()
            .find(|b| !b.is_ascii_whitespace())
            .is_some_and(|&b| b == b'{');
        let member: &[u8] = br#""stream_options":{"include_usage":true}"#;
        let mut out = Vec::with_capacity(body.len() + member.len() + 1);
        out.extend_from_slice(&body[..end]);
        if !empty {
            out.push(b',');
        }
        out.extend_from_slice(member);
        out.extend_from_slice(&body[end..]);
        return Ok(Bytes::from(out));
    }
    let mut v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| ProxyError::BadBody(e.to_string()))?;
    let obj = v
        .as_object_mut()
        .ok_or_else(|| ProxyError::BadBody("the body is not a JSON object".into()))?;
    let so = obj
        .entry("stream_options")
        .or_insert_with(|| serde_json::json!({}));
    if !so.is_object() {
        *so = serde_json::json!({});
    }
    so["include_usage"] = serde_json::Value::Bool(true);
    Ok(Bytes::from(
        serde_json::to_vec(&v).map_err(|e| ProxyError::BadBody(e.to_string()))?,
    ))
}

/// Whether `body`, a JSON object, has a top-level `stream_options` member. Every other member
/// is checked for syntax and skipped without being built.
///
/// # Errors
/// [`ProxyError::BadBody`] when the body is not JSON or not an object.
fn has_stream_options(body: &[u8]) -> Result<bool, ProxyError> {
    match ledger::request::top_level_members(body, &["stream_options"]) {
        Ok(serde_json::Value::Object(kept)) => Ok(kept.contains_key("stream_options")),
        Ok(_) => Err(ProxyError::BadBody("the body is not a JSON object".into())),
        Err(e) => Err(ProxyError::BadBody(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pushes `chunk` as the meter does: as a frame of its own.
    fn push(f: &mut UsageChunkFilter, chunk: &[u8]) -> Bytes {
        f.push(&Bytes::copy_from_slice(chunk))
    }

    #[test]
    fn cuts_only_the_usage_chunk() {
        let stream = "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n\
                      data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1}}\n\n\
                      data: [DONE]\n\n";
        for split in 1..stream.len() {
            let mut f = UsageChunkFilter::default();
            let mut out = Vec::new();
            out.extend_from_slice(&push(&mut f, &stream.as_bytes()[..split]));
            out.extend_from_slice(&push(&mut f, &stream.as_bytes()[split..]));
            out.extend_from_slice(&f.finish());
            assert_eq!(
                String::from_utf8(out).unwrap(),
                "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\ndata: [DONE]\n\n",
                "split at {split}"
            );
        }
        let mut f = UsageChunkFilter::default();
        let crlf = "data: {\"choices\":[],\"usage\":{}}\r\n\r\ndata: x\r\n\r\n";
        assert_eq!(&push(&mut f, crlf.as_bytes())[..], b"data: x\r\n\r\n");
        // A usage-only chunk over several data lines (joined with LF) is cut too; a content
        // chunk over several lines, and one whose empty choices only appear once joined, pass
        // or are cut by the joined text alike.
        let mut f = UsageChunkFilter::default();
        let multi = "data: {\"choices\":\ndata: [],\"usage\":{}}\n\n\
                     data: {\"choices\":[{\"text\":\"a\"}],\ndata: \"usage\":null}\n\n";
        assert_eq!(
            &push(&mut f, multi.as_bytes())[..],
            b"data: {\"choices\":[{\"text\":\"a\"}],\ndata: \"usage\":null}\n\n"
        );
    }

    /// What the client sees of `stream` pushed in `size`-byte chunks.
    #[test]
    fn empty_choices_precheck() {
        for yes in [
            r#"{"choices":[],"usage":{}}"#,
            r#"{"id":"x","choices" : [ ] ,"usage":{}}"#,
            "{\"choices\":\n[\r\n]}",
            r#"{"a":{"choices":[1]},"choices":[]}"#,
        ] {
            assert!(has_empty_choices(yes.as_bytes()), "{yes}");
        }
        for no in [
            r#"{"choices":[{"delta":{}}],"usage":null}"#,
            r#"{"usage":{}}"#,
            r#"{"choices":null}"#,
            r#"{"x":"\"choices\"","choices":[0]}"#,
        ] {
            assert!(!has_empty_choices(no.as_bytes()), "{no}");
        }
        // Every chunk of an include_usage stream names "usage"; only the last one is cut.
        let mut f = UsageChunkFilter::default();
        let chunk = "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\n";
        assert_eq!(&push(&mut f, chunk.as_bytes())[..], chunk.as_bytes());
        let usage = "data: {\"choices\": [ ],\"usage\":{\"prompt_tokens\":1}}\n\n";
        assert!(push(&mut f, usage.as_bytes()).is_empty());
    }

    #[test]
    fn whole_events_pass_without_a_copy() {
        let mut f = UsageChunkFilter::default();
        let events = Bytes::from_static(
            b"data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\ndata: [DONE]\n\n",
        );
        let out = f.push(&events);
        assert_eq!((out.as_ptr(), out.len()), (events.as_ptr(), events.len()));
        // An unterminated tail is kept back; the events before it still pass in place.
        let two = Bytes::from_static(b"data: a\n\ndata: b");
        let out = f.push(&two);
        assert_eq!(out.as_ptr(), two.as_ptr());
        assert_eq!(&out[..], b"data: a\n\n");
        assert_eq!(&f.finish()[..], b"data: b");
        // A usage-only event between others is cut from a chunk that holds all three.
        let three = Bytes::from_static(
            b"data: a\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":1}}\n\ndata: [DONE]\n\n",
        );
        assert_eq!(&f.push(&three)[..], b"data: a\n\ndata: [DONE]\n\n");
        // Data split over two lines is joined before the check.
        let split = Bytes::from_static(
            b"data: {\"choices\":\ndata: [],\"usage\":{\"prompt_tokens\":1}}\n\ndata: b\n\n",
        );
        assert_eq!(&f.push(&split)[..], b"data: b\n\n");
    }

    fn filtered(stream: &[u8], size: usize) -> Vec<u8> {
        let mut f = UsageChunkFilter::default();
        let mut out = Vec::new();
        for chunk in stream.chunks(size) {
            out.extend_from_slice(&push(&mut f, chunk));
        }
        out.extend_from_slice(&f.finish());
        out
    }

    #[test]
    fn long_line_in_one_byte_chunks_is_scanned_once() {
        // fuzz/regressions/enforcer_usage_filter/quadratic-rescan-128k-in-1-byte-chunks: every
        // push used to rescan all the pending bytes (27 s for 64 KiB); now each byte is scanned
        // once and the scan position is kept between pushes.
        let mut stream = b"data: ".to_vec();
        stream.resize(128 * 1024, b'a');
        let mut f = UsageChunkFilter::default();
        for &b in &stream {
            assert!(push(&mut f, &[b]).is_empty(), "no event is complete yet");
        }
        assert_eq!(f.scan.pos, stream.len(), "the scan kept up with the input");
        assert!(f.scan.in_line);
        assert_eq!(&f.finish()[..], &stream[..]);
        // Ended by a blank line, it passes as soon as the blank line arrives; a usage event
        // after it is still cut.
        let usage = b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1}}\n\n";
        let mut f = UsageChunkFilter::default();
        let mut out = Vec::new();
        for &b in stream.iter().chain(b"\n\n").chain(usage) {
            out.extend_from_slice(&push(&mut f, &[b]));
        }
        assert_eq!(out.len(), stream.len() + 2);
        assert!(f.finish().is_empty());
    }

    #[test]
    fn event_over_the_limit_turns_the_filter_off() {
        let usage = "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1}}\n\n";
        let long = format!("data: \"{}\"\n\n", "a".repeat(MAX_EVENT_BYTES));
        let stream = format!("{usage}{long}{usage}");
        // The first usage event is cut; from the long event on everything passes, the second
        // usage event included (the meter still settles the usage).
        let want = format!("{long}{usage}");
        for size in [1, 1000, stream.len()] {
            let mut f = UsageChunkFilter::default();
            let mut out = Vec::new();
            for chunk in stream.as_bytes().chunks(size) {
                out.extend_from_slice(&push(&mut f, chunk));
                assert!(
                    f.pending.len() <= MAX_EVENT_BYTES + size,
                    "held bytes are bounded"
                );
            }
            assert!(f.passthrough);
            assert!(
                f.pending.is_empty(),
                "nothing is held once the filter is off"
            );
            out.extend_from_slice(&f.finish());
            assert!(out == want.as_bytes(), "chunks of {size}");
        }
        // The limit counts the whole event, its terminator included: a usage event behind a
        // long comment line is cut at exactly the limit, and passes one byte over it.
        let event = |len: usize| format!("{}\n{usage}", ":".repeat(len - usage.len() - 1));
        let stream = format!("{}data: x\n\n", event(MAX_EVENT_BYTES));
        assert_eq!(filtered(stream.as_bytes(), 4096), b"data: x\n\n");
        let stream = format!("{}data: x\n\n", event(MAX_EVENT_BYTES + 1));
        assert!(filtered(stream.as_bytes(), 4096) == stream.as_bytes());
    }

    #[test]
    fn cr_lf_and_crlf_line_ends_frame_events() {
        let usage = "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1}}";
        let split_usage = "data: {\"choices\":[],\rdata: \"usage\":{}}";
        for (stream, want) in [
            // CR only.
            (
                format!("data: a\r\r{usage}\r\rdata: b\r\r"),
                "data: a\r\rdata: b\r\r",
            ),
            // Blank lines made of "\n\r" and "\r\n\r" followed by something other than LF.
            (
                format!("data: a\n\r{usage}\n\rdata: b\n\r"),
                "data: a\n\rdata: b\n\r",
            ),
            (
                format!("data: a\r\n\r{usage}\r\n\rdata: b\r\n\r"),
                "data: a\r\n\rdata: b\r\n\r",
            ),
            // A CR line end joined by an LF: the LF belongs to the cut event.
            (
                format!("data: a\r\r\n{usage}\r\r\ndata: b\n"),
                "data: a\r\r\ndata: b\n",
            ),
            (
                format!("data: a\n\r\n{usage}\n\r\ndata: b\n"),
                "data: a\n\r\ndata: b\n",
            ),
            // Data lines split by a lone CR are joined, as an SSE client joins them.
            (
                format!("data: a\n\n{split_usage}\r\rdata: b\n\n"),
                "data: a\n\ndata: b\n\n",
            ),
            // An unterminated usage event at the end is cut too.
            (format!("data: a\r\r{usage}\r"), "data: a\r\r"),
        ] {
            for split in 0..=stream.len() {
                let mut f = UsageChunkFilter::default();
                let mut out = Vec::new();
                out.extend_from_slice(&push(&mut f, &stream.as_bytes()[..split]));
                out.extend_from_slice(&push(&mut f, &stream.as_bytes()[split..]));
                out.extend_from_slice(&f.finish());
                assert_eq!(
                    String::from_utf8(out).unwrap(),
                    want,
                    "{stream:?} split at {split}"
                );
            }
            assert_eq!(filtered(stream.as_bytes(), 1), want.as_bytes());
        }
    }

    #[test]
    fn injects_include_usage() {
        let b = inject_include_usage(br#"{"model":"m","stream":true,"stream_options":{"x":1}}"#)
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!(v["stream_options"]["x"], 1);
        let b = inject_include_usage(br#"{"model":"m","stream":true}"#).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
        // Present but not an object, or with include_usage false: set to true.
        for body in [
            r#"{"stream":true,"stream_options":null}"#,
            r#"{"stream":true,"stream_options":{"include_usage":false}}"#,
            r#"{"stream":true,"stream\u005foptions":{"include_usage":false}}"#,
        ] {
            let v: serde_json::Value =
                serde_json::from_slice(&inject_include_usage(body.as_bytes()).unwrap()).unwrap();
            assert_eq!(v["stream_options"]["include_usage"], true, "{body}");
        }
    }

    #[test]
    fn injection_keeps_the_client_bytes() {
        for (body, want) in [
            (
                "{\"stream\":true, \"b\":1.50,\"a\":[1, 2]}\n",
                "{\"stream\":true, \"b\":1.50,\"a\":[1, 2],\"stream_options\":{\"include_usage\":true}}\n",
            ),
            ("{ }", "{ \"stream_options\":{\"include_usage\":true}}"),
            (
                "{\"s\":\"}\" }  ",
                "{\"s\":\"}\" ,\"stream_options\":{\"include_usage\":true}}  ",
            ),
            // A brace inside a string value is not the object's end.
            (
                "{\"x\":{\"stream_options\":1}}",
                "{\"x\":{\"stream_options\":1},\"stream_options\":{\"include_usage\":true}}",
            ),
        ] {
            let out = inject_include_usage(body.as_bytes()).unwrap();
            assert_eq!(std::str::from_utf8(&out).unwrap(), want);
            let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
            assert_eq!(v["stream_options"]["include_usage"], true);
        }
        for bad in ["[1]", "\"s\"", "{\"a\":1", "{\"a\":1} x", "", "{\"a\":1}}"] {
            assert!(
                matches!(
                    inject_include_usage(bad.as_bytes()),
                    Err(ProxyError::BadBody(_))
                ),
                "{bad:?}"
            );
        }
    }
}
