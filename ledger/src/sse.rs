//! Incremental `text/event-stream` framing as the WHATWG HTML standard (§9.2.6) defines it.
//!
//! The parser is fed arbitrary byte chunks: a chunk may end mid-line, between the CR and LF of a
//! CRLF, or in the middle of a UTF-8 sequence. Lines are decoded only once complete, so the result
//! never depends on where the bytes were split. Memory is bounded: a line longer than
//! [`SseParser::max_line_bytes`] is dropped (and counted), never buffered forever.

/// Longest line (and longest joined `data` of one event) the parser buffers by default: 4 MiB.
pub const DEFAULT_MAX_LINE_BYTES: usize = 4 * 1024 * 1024;

/// One dispatched server-sent event.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SseEvent {
    /// The `event:` field, `None` for the default type ("message").
    pub event: Option<String>,
    /// The `data:` lines joined with `"\n"`.
    pub data: String,
    /// The last event id seen on the stream (`id:` persists across events, as the spec says).
    pub id: Option<String>,
}

/// An event lent by [`SseParser::feed_each`], valid while the callback runs: the parser keeps its
/// buffers for the next event instead of handing them over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SseEventRef<'a> {
    /// The `event:` field, `None` for the default type ("message").
    pub event: Option<&'a str>,
    /// The `data:` lines joined with `"\n"`.
    pub data: &'a str,
    /// The last event id seen on the stream.
    pub id: Option<&'a str>,
}

impl SseEventRef<'_> {
    /// An owned copy.
    #[must_use]
    pub fn to_event(&self) -> SseEvent {
        SseEvent {
            event: self.event.map(str::to_owned),
            data: self.data.to_owned(),
            id: self.id.map(str::to_owned),
        }
    }
}

/// WHATWG event-stream parser: LF / CR / CRLF line ends, comments, multi-line data, split anywhere.
#[derive(Debug, Clone)]
pub struct SseParser {
    /// Bytes of the current, not yet terminated line.
    line: Vec<u8>,
    /// The previous chunk ended with CR, so a leading LF of the next chunk belongs to it.
    after_cr: bool,
    /// The current line grew past the limit: skip bytes until its end.
    discarding: bool,
    /// No line has been completed yet (a leading BOM is stripped from the first line).
    at_start: bool,
    event_type: String,
    data: String,
    has_data: bool,
    /// The current event's data grew past the limit: it is dropped at dispatch.
    data_overflow: bool,
    last_id: Option<String>,
    max_line_bytes: usize,
    dropped: u64,
    invalid_utf8: u64,
}

impl Default for SseParser {
    fn default() -> Self {
        Self::new()
    }
}

impl SseParser {
    /// A parser with the default 4 MiB line limit.
    #[must_use]
    pub fn new() -> Self {
        Self::with_max_line_bytes(DEFAULT_MAX_LINE_BYTES)
    }

    /// A parser that drops lines (and events whose joined data) exceed `max` bytes.
    #[must_use]
    pub fn with_max_line_bytes(max: usize) -> Self {
        Self {
            line: Vec::new(),
            after_cr: false,
            discarding: false,
            at_start: true,
            event_type: String::new(),
            data: String::new(),
            has_data: false,
            data_overflow: false,
            last_id: None,
            max_line_bytes: max.max(1),
            dropped: 0,
            invalid_utf8: 0,
        }
    }

    /// The line limit in bytes.
    #[must_use]
    pub fn max_line_bytes(&self) -> usize {
        self.max_line_bytes
    }

    /// Lines or events dropped because they exceeded the limit.
    #[must_use]
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Lines that were not valid UTF-8 (decoded lossily with U+FFFD).
    #[must_use]
    pub fn invalid_utf8_lines(&self) -> u64 {
        self.invalid_utf8
    }

    /// Feeds a chunk; every event completed by it is appended to `out`.
    pub fn feed(&mut self, chunk: &[u8], out: &mut Vec<SseEvent>) {
        self.feed_each(chunk, |e| out.push(e.to_event()));
    }

    /// Feeds a chunk; every event completed by it is lent to `on_event`, in order, without a
    /// copy of its data.
    pub fn feed_each(&mut self, chunk: &[u8], mut on_event: impl FnMut(SseEventRef<'_>)) {
        let mut rest = chunk;
        // The current event's data while it is one `data` line read whole from `chunk`: lent to
        // `on_event` from there, never copied, unless the chunk ends first (then it is copied
        // into `self.data` below) or a second `data` line joins it.
        let mut lent: Option<&str> = None;
        // An empty chunk must not forget a pending CR.
        if self.after_cr && !rest.is_empty() {
            self.after_cr = false;
            if let Some(stripped) = rest.strip_prefix(b"\n") {
                rest = stripped;
            }
        }
        while !rest.is_empty() {
            match memchr::memchr2(b'\n', b'\r', rest) {
                Some(pos) => {
                    if self.line.is_empty() && !self.discarding {
                        // The whole line is in this chunk: read in place.
                        self.chunk_line(&rest[..pos], &mut lent, &mut on_event);
                    } else {
                        self.push_bytes(&rest[..pos]);
                        self.end_line(&mut lent);
                    }
                    if rest[pos] == b'\r' {
                        match rest.get(pos + 1) {
                            Some(b'\n') => rest = &rest[pos + 2..],
                            Some(_) => rest = &rest[pos + 1..],
                            None => {
                                self.after_cr = true;
                                rest = &[];
                            }
                        }
                    } else {
                        rest = &rest[pos + 1..];
                    }
                }
                None => {
                    self.push_bytes(rest);
                    rest = &[];
                }
            }
        }
        if let Some(data) = lent {
            // The event goes on in the next chunk.
            self.data.push_str(data);
        }
    }

    /// Ends the stream. Per the spec an event not followed by a blank line is discarded, so this
    /// dispatches nothing; it resets the parser for reuse. Use [`SseParser::take_unterminated`]
    /// first to look at what the stream left incomplete.
    pub fn finish(&mut self, out: &mut Vec<SseEvent>) {
        let _ = out;
        self.line.clear();
        self.after_cr = false;
        self.discarding = false;
        self.reset_event();
    }

    /// The event the stream left without its terminating blank line, including a final line that
    /// has no line end, without dispatching it. The spec discards such an event; callers that know
    /// the payload is self-delimiting (complete JSON) may still use it. Clears the pending state.
    pub fn take_unterminated(&mut self) -> Option<SseEvent> {
        if !self.line.is_empty() && !self.discarding {
            let line = std::mem::take(&mut self.line);
            self.process_line(&line, &mut None);
        }
        self.line.clear();
        self.discarding = false;
        let event = self.event_ref(None).map(|e| e.to_event());
        self.reset_event();
        event
    }

    fn push_bytes(&mut self, bytes: &[u8]) {
        if self.discarding || bytes.is_empty() {
            return;
        }
        if self.line.len() + bytes.len() > self.max_line_bytes {
            self.line.clear();
            self.line.shrink_to(64 * 1024);
            self.discarding = true;
            self.dropped += 1;
            return;
        }
        self.line.extend_from_slice(bytes);
    }

    /// Ends the line gathered in `self.line` (begun in an earlier chunk).
    fn end_line(&mut self, lent: &mut Option<&str>) {
        if self.discarding {
            // The oversized line is gone; the event it belonged to is incomplete, drop it too.
            self.discarding = false;
            self.data_overflow = true;
            self.at_start = false;
            return;
        }
        // Never empty: a blank line has no bytes to gather, so it is always found whole in its
        // chunk (`chunk_line`).
        let line = std::mem::take(&mut self.line);
        self.process_line(&line, lent);
        // Reuse the allocation unless it grew large.
        self.line = line;
        self.line.clear();
        if self.line.capacity() > 64 * 1024 {
            self.line.shrink_to(64 * 1024);
        }
    }

    /// A complete line found whole in the chunk being fed. The first `data` line of an event is
    /// lent from the chunk (`lent`) instead of copied; anything else goes the general way.
    fn chunk_line<'c>(
        &mut self,
        raw: &'c [u8],
        lent: &mut Option<&'c str>,
        on_event: &mut impl FnMut(SseEventRef<'_>),
    ) {
        if raw.is_empty() {
            self.dispatch(lent, on_event);
            return;
        }
        if raw.len() > self.max_line_bytes {
            // As if gathered: an oversized line is dropped with its event.
            self.dropped += 1;
            self.data_overflow = true;
            self.at_start = false;
            return;
        }
        if !self.at_start
            && !self.has_data
            && let Some(value) = raw.strip_prefix(b"data:")
            && let Ok(value) = std::str::from_utf8(value)
        {
            // The first line of the event's data, and within the limit (the line is).
            if !self.data_overflow {
                *lent = Some(value.strip_prefix(' ').unwrap_or(value));
                self.has_data = true;
            }
            return;
        }
        self.process_line(raw, lent);
    }

    /// A blank line: the event so far is dispatched (if it has data) and a new one begins.
    fn dispatch(&mut self, lent: &mut Option<&str>, on_event: &mut impl FnMut(SseEventRef<'_>)) {
        self.at_start = false;
        if let Some(event) = self.event_ref(lent.take()) {
            on_event(event);
        }
        self.reset_event();
        // Reuse the data buffer unless it grew large.
        if self.data.capacity() > 64 * 1024 {
            self.data = String::new();
        }
    }

    fn process_line(&mut self, raw: &[u8], lent: &mut Option<&str>) {
        let mut bytes = raw;
        if self.at_start {
            self.at_start = false;
            if let Some(stripped) = bytes.strip_prefix(b"\xEF\xBB\xBF") {
                bytes = stripped;
            }
        }
        let text = match std::str::from_utf8(bytes) {
            Ok(s) => std::borrow::Cow::Borrowed(s),
            Err(_) => {
                self.invalid_utf8 += 1;
                String::from_utf8_lossy(bytes)
            }
        };
        if text.is_empty() || text.starts_with(':') {
            return;
        }
        let (field, value) = match text.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (text.as_ref(), ""),
        };
        match field {
            "data" => {
                // A lent first line joins the buffer before this one.
                if let Some(first) = lent.take() {
                    self.data.push_str(first);
                }
                if self.data_overflow {
                    return;
                }
                if self.data.len() + value.len() + 1 > self.max_line_bytes {
                    self.data_overflow = true;
                    self.data = String::new();
                    self.dropped += 1;
                    return;
                }
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(value);
                self.has_data = true;
            }
            "event" => {
                self.event_type.clear();
                self.event_type.push_str(value);
            }
            "id" if !value.contains('\0') => self.last_id = Some(value.to_owned()),
            // "retry" and unknown fields are ignored, as the spec says.
            _ => {}
        }
    }

    /// The current event, if it has data to dispatch: its data is `lent` when given, else the
    /// buffer.
    fn event_ref<'a>(&'a self, lent: Option<&'a str>) -> Option<SseEventRef<'a>> {
        if !self.has_data || self.data_overflow {
            return None;
        }
        Some(SseEventRef {
            event: (!self.event_type.is_empty()).then_some(self.event_type.as_str()),
            data: lent.unwrap_or(&self.data),
            id: self.last_id.as_deref(),
        })
    }

    fn reset_event(&mut self) {
        self.event_type.clear();
        self.data.clear();
        self.has_data = false;
        self.data_overflow = false;
    }
}

#[cfg(test)]
mod tests;
