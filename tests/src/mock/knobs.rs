//! Per-call behaviour: [`super::MockConfig`] defaults overridden by `x-mock-*` request headers.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use http::HeaderMap;

use super::MockConfig;

/// Usage the mock reports, in the ledger's meaning; `None` fields are derived from the request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UsageSpec {
    /// Plain input tokens (excluding cache reads and writes).
    pub input: Option<u64>,
    /// Cache-read input tokens.
    pub cached: u64,
    /// Anthropic 5-minute cache writes.
    pub cache_write_5m: u64,
    /// Anthropic 1-hour cache writes.
    pub cache_write_1h: u64,
    /// All output tokens, reasoning included.
    pub output: Option<u64>,
    /// Reasoning / thinking tokens (a part of `output`).
    pub reasoning: u64,
}

impl UsageSpec {
    /// A fixed usage with every field given.
    #[must_use]
    pub fn fixed(input: u64, cached: u64, output: u64) -> UsageSpec {
        UsageSpec {
            input: Some(input),
            cached,
            output: Some(output),
            ..UsageSpec::default()
        }
    }

    /// Parses `input=100,cached=20,output=30,...` (the `x-mock-usage` syntax) over the defaults.
    ///
    /// # Errors
    /// A field that is unknown or not a token count.
    pub fn parse(spec: &str) -> Result<UsageSpec, String> {
        UsageSpec::default().overlay(spec)
    }

    /// Applies `input=100,cached=20,...` on top of `self`.
    fn overlay(mut self, spec: &str) -> Result<UsageSpec, String> {
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| format!("x-mock-usage: `{part}` is not key=value"))?;
            let n: u64 = v
                .trim()
                .parse()
                .map_err(|_| format!("x-mock-usage: `{v}` is not a token count"))?;
            match k.trim() {
                "input" => self.input = Some(n),
                "cached" | "cache_read" => self.cached = n,
                "cache_write_5m" | "cache_write" => self.cache_write_5m = n,
                "cache_write_1h" => self.cache_write_1h = n,
                "output" => self.output = Some(n),
                "reasoning" => self.reasoning = n,
                other => return Err(format!("x-mock-usage: unknown field `{other}`")),
            }
        }
        Ok(self)
    }
}

/// Something that goes wrong on purpose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Answer with this HTTP status and the provider's error body (no usage billed).
    Status(u16),
    /// Close the TCP connection with a reset after this many body frames (None: half of them).
    ResetMidStream(Option<usize>),
    /// Stop sending after this many body frames without closing.
    Stall(Option<usize>),
    /// Wait this long before the response head.
    SlowFirstByte(Duration),
    /// A body (or one stream event) that is not valid JSON.
    InvalidJson,
    /// End the body cleanly in the middle of a frame (an SSE event cut in half) after this many frames.
    TruncatedSse(Option<usize>),
    /// Answer normally but without the usage record (the call is still billed).
    NoUsage,
}

impl FromStr for Fault {
    type Err = String;

    fn from_str(s: &str) -> Result<Fault, String> {
        let s = s.trim();
        let (name, arg) = s
            .split_once('=')
            .map_or((s, None), |(n, a)| (n.trim(), Some(a.trim())));
        let count = |a: Option<&str>| -> Result<Option<usize>, String> {
            a.map(|a| {
                a.parse()
                    .map_err(|_| format!("x-mock-fault: `{a}` is not a frame count"))
            })
            .transpose()
        };
        match name {
            "status" => {
                let a = arg.ok_or("x-mock-fault: status needs a code (status=500)")?;
                let code: u16 = a
                    .parse()
                    .map_err(|_| format!("x-mock-fault: `{a}` is not a status code"))?;
                if !(400..=599).contains(&code) {
                    return Err(format!(
                        "x-mock-fault: status {code} is not an error status"
                    ));
                }
                Ok(Fault::Status(code))
            }
            "reset-mid-stream" | "reset" => Ok(Fault::ResetMidStream(count(arg)?)),
            "stall" => Ok(Fault::Stall(count(arg)?)),
            "truncated-sse" | "truncated" => Ok(Fault::TruncatedSse(count(arg)?)),
            "invalid-json" => Ok(Fault::InvalidJson),
            "no-usage" => Ok(Fault::NoUsage),
            "slow-first-byte" => {
                let a = arg.ok_or(
                    "x-mock-fault: slow-first-byte needs milliseconds (slow-first-byte=2000)",
                )?;
                let ms: u64 = a
                    .parse()
                    .map_err(|_| format!("x-mock-fault: `{a}` is not milliseconds"))?;
                Ok(Fault::SlowFirstByte(Duration::from_millis(ms)))
            }
            other => Err(format!(
                "x-mock-fault: unknown fault `{other}` (status=N, reset-mid-stream[=K], stall[=K], \
                 truncated-sse[=K], slow-first-byte=MS, invalid-json, no-usage)"
            )),
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let k = |k: &Option<usize>| k.map(|k| format!("={k}")).unwrap_or_default();
        match self {
            Fault::Status(c) => write!(f, "status={c}"),
            Fault::ResetMidStream(n) => write!(f, "reset-mid-stream{}", k(n)),
            Fault::Stall(n) => write!(f, "stall{}", k(n)),
            Fault::SlowFirstByte(d) => write!(f, "slow-first-byte={}", d.as_millis()),
            Fault::InvalidJson => f.write_str("invalid-json"),
            Fault::TruncatedSse(n) => write!(f, "truncated-sse{}", k(n)),
            Fault::NoUsage => f.write_str("no-usage"),
        }
    }
}

/// The behaviour resolved for one call.
#[derive(Debug, Clone)]
pub struct Knobs {
    /// Usage to report (None fields derived from the request).
    pub usage: UsageSpec,
    /// Stream content chunks.
    pub chunks: Option<usize>,
    /// Delay between stream frames.
    pub chunk_delay: Duration,
    /// Delay before the response head.
    pub latency: Duration,
    /// Pause before the end of the body (`x-mock-end-delay-ms`).
    pub end_delay: Duration,
    /// Gzip if the client accepts it.
    pub gzip: bool,
    /// Chunked non-stream bodies.
    pub chunked: bool,
    /// The fault to inject, if any.
    pub fault: Option<Fault>,
}

impl Knobs {
    /// The config's defaults with this request's `x-mock-*` headers applied.
    ///
    /// # Errors
    /// A malformed header, with a message naming it (the mock answers 400 with it).
    pub fn resolve(config: &MockConfig, headers: &HeaderMap) -> Result<Knobs, String> {
        let mut k = Knobs {
            usage: config.usage,
            chunks: config.chunks,
            chunk_delay: config.chunk_delay,
            latency: config.latency,
            end_delay: config.end_delay,
            gzip: config.gzip,
            chunked: config.chunked,
            fault: config.fault,
        };
        for (name, value) in headers {
            let name = name.as_str();
            if !name.starts_with("x-mock-") {
                continue;
            }
            let v = value
                .to_str()
                .map_err(|_| format!("{name}: not ASCII"))?
                .trim();
            let ms = || {
                v.parse::<u64>()
                    .map(Duration::from_millis)
                    .map_err(|_| format!("{name}: `{v}` is not ms"))
            };
            match name {
                "x-mock-usage" => k.usage = k.usage.overlay(v)?,
                "x-mock-chunks" => {
                    let n: usize = v
                        .parse()
                        .map_err(|_| format!("{name}: `{v}` is not a count"))?;
                    k.chunks = Some(n.max(1));
                }
                "x-mock-chunk-delay-ms" => k.chunk_delay = ms()?,
                "x-mock-latency-ms" => k.latency = ms()?,
                "x-mock-end-delay-ms" => k.end_delay = ms()?,
                "x-mock-gzip" => k.gzip = flag(name, v)?,
                "x-mock-chunked" => k.chunked = flag(name, v)?,
                "x-mock-fault" => {
                    k.fault = if v.is_empty() || v == "none" {
                        None
                    } else {
                        Some(v.parse()?)
                    }
                }
                _ => {}
            }
        }
        Ok(k)
    }
}

fn flag(name: &str, v: &str) -> Result<bool, String> {
    match v {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(format!("{name}: `{v}` is not 1 or 0")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_override_config() {
        let mut h = HeaderMap::new();
        h.insert(
            "x-mock-usage",
            "input=100, cached=20,output=30,reasoning=5,cache_write_1h=7"
                .parse()
                .unwrap(),
        );
        h.insert("x-mock-fault", "reset-mid-stream=3".parse().unwrap());
        h.insert("x-mock-chunks", "64".parse().unwrap());
        let k = Knobs::resolve(&MockConfig::default(), &h).unwrap();
        assert_eq!(
            k.usage,
            UsageSpec {
                input: Some(100),
                cached: 20,
                cache_write_5m: 0,
                cache_write_1h: 7,
                output: Some(30),
                reasoning: 5
            }
        );
        assert_eq!(k.fault, Some(Fault::ResetMidStream(Some(3))));
        assert_eq!(k.chunks, Some(64));
    }

    #[test]
    fn faults_round_trip() {
        for s in [
            "status=429",
            "reset-mid-stream",
            "stall=2",
            "slow-first-byte=150",
            "invalid-json",
            "truncated-sse=4",
        ] {
            assert_eq!(s.parse::<Fault>().unwrap().to_string(), s);
        }
        assert!("status=200".parse::<Fault>().is_err());
        assert!("explode".parse::<Fault>().is_err());
    }
}
