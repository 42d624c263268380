//! Splits a streamed JSON array (`[{...}\r\n,{...}]`, Gemini's `streamGenerateContent` without
//! `alt=sse`) into its elements as they complete, tracking bracket depth outside strings.

/// An incremental, string-aware splitter of a top-level JSON array into element byte strings.
#[derive(Debug, Clone)]
pub(super) struct JsonArraySplitter {
    element: Vec<u8>,
    depth: u32,
    in_string: bool,
    escaped: bool,
    opened: bool,
    /// The current element grew past `max`: its bytes are skipped until it closes.
    overflow: bool,
    max: usize,
    dropped: u64,
    stray: u64,
    in_stray: bool,
}

impl JsonArraySplitter {
    /// A splitter that drops elements longer than `max` bytes.
    pub(super) fn new(max: usize) -> Self {
        Self {
            element: Vec::new(),
            depth: 0,
            in_string: false,
            escaped: false,
            opened: false,
            overflow: false,
            max,
            dropped: 0,
            stray: 0,
            in_stray: false,
        }
    }

    /// Elements dropped as oversized plus stray bytes between elements (counted once per run).
    pub(super) fn errors(&self) -> u64 {
        self.dropped + self.stray
    }

    /// Feeds bytes; `emit` gets each complete element.
    pub(super) fn feed(&mut self, chunk: &[u8], mut emit: impl FnMut(&[u8])) {
        for &b in chunk {
            if self.depth == 0 {
                match b {
                    b' ' | b'\t' | b'\r' | b'\n' | b',' => {}
                    b'[' if !self.opened => self.opened = true,
                    b']' => self.opened = false,
                    b'{' | b'[' => {
                        self.depth = 1;
                        self.push(b);
                    }
                    _ => {
                        if !self.in_stray {
                            self.stray += 1;
                        }
                        self.in_stray = true;
                        continue;
                    }
                }
                self.in_stray = false;
                continue;
            }
            self.push(b);
            if self.in_string {
                if self.escaped {
                    self.escaped = false;
                } else if b == b'\\' {
                    self.escaped = true;
                } else if b == b'"' {
                    self.in_string = false;
                }
                continue;
            }
            match b {
                b'"' => self.in_string = true,
                b'{' | b'[' => self.depth += 1,
                b'}' | b']' => {
                    self.depth -= 1;
                    if self.depth == 0 {
                        if self.overflow {
                            self.overflow = false;
                        } else {
                            emit(&self.element);
                        }
                        self.element.clear();
                        if self.element.capacity() > 64 * 1024 {
                            self.element.shrink_to(64 * 1024);
                        }
                    }
                }
                _ => {}
            }
        }
    }

    fn push(&mut self, b: u8) {
        if self.overflow {
            return;
        }
        if self.element.len() >= self.max {
            self.overflow = true;
            self.dropped += 1;
            self.element = Vec::new();
            return;
        }
        self.element.push(b);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(chunks: &[&[u8]], max: usize) -> (Vec<String>, u64) {
        let mut splitter = JsonArraySplitter::new(max);
        let mut out = Vec::new();
        for chunk in chunks {
            splitter.feed(chunk, |e| {
                out.push(String::from_utf8(e.to_vec()).expect("utf8"))
            });
        }
        (out, splitter.errors())
    }

    #[test]
    fn splits_elements_with_strings_containing_brackets() {
        let body = b"[{\"a\":\"}]{[\\\"\"}\r\n,{\"b\":[1,{\"c\":2}]}\r\n]";
        let want = vec![
            r#"{"a":"}]{[\""}"#.to_owned(),
            r#"{"b":[1,{"c":2}]}"#.to_owned(),
        ];
        assert_eq!(split(&[body], 1024), (want.clone(), 0));
        let bytes: Vec<&[u8]> = body.chunks(1).collect();
        assert_eq!(split(&bytes, 1024), (want, 0));
    }

    #[test]
    fn oversized_elements_are_dropped_and_counted() {
        let (out, errors) = split(&[b"[{\"a\":\"0123456789\"},{\"b\":1}]"], 10);
        assert_eq!(out, vec![r#"{"b":1}"#.to_owned()]);
        assert_eq!(errors, 1);
    }

    #[test]
    fn stray_bytes_are_counted() {
        let (out, errors) = split(&[b"[{\"a\":1}, garbage {\"b\":2}]"], 100);
        assert_eq!(out.len(), 2);
        assert_eq!(errors, 1);
    }
}
