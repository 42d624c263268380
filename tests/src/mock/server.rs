//! Accepting connections (TLS or plain, told apart by the first byte) and answering requests.

use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use super::MockConfig;
use super::billing::{MockLedger, ServedCall};
use super::body::{Cut, MockBody, Pending};
use super::knobs::{Fault, Knobs};
use super::render::{self, Ctx, Family, MockApi, Tokens};
use super::suppress;

/// Largest request body the mock reads.
const MAX_REQUEST: usize = 32 << 20;

/// State shared by every connection of one mock.
pub(super) struct Shared {
    config: MockConfig,
    ledger: MockLedger,
    next_id: AtomicU64,
}

impl Shared {
    pub(super) fn new(config: MockConfig, ledger: MockLedger) -> Shared {
        Shared {
            config,
            ledger,
            next_id: AtomicU64::new(1),
        }
    }
}

/// Accepts until the task is aborted; aborting drops the [`JoinSet`], which ends every connection.
pub(super) async fn accept_loop(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    shared: Arc<Shared>,
) {
    let mut conns = JoinSet::new();
    loop {
        while conns.try_join_next().is_some() {}
        let Ok((tcp, _peer)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        };
        let _ = tcp.set_nodelay(true);
        conns.spawn(serve_conn(tcp, tls.clone(), Arc::clone(&shared)));
    }
}

async fn serve_conn(tcp: TcpStream, tls: Option<TlsAcceptor>, shared: Arc<Shared>) {
    let reset = Arc::new(AtomicBool::new(false));
    let io = ConnIo {
        tcp,
        reset: Arc::clone(&reset),
    };
    let mut first = [0u8; 1];
    let is_tls = matches!(io.tcp.peek(&mut first).await, Ok(1) if first[0] == 0x16);
    let svc = {
        let shared = Arc::clone(&shared);
        service_fn(move |req| handle(Arc::clone(&shared), Arc::clone(&reset), req))
    };
    let builder = auto::Builder::new(TokioExecutor::new());
    match (is_tls, tls) {
        (true, Some(acceptor)) => {
            let delay = shared.config.handshake_delay;
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let Ok(stream) = acceptor.accept(io).await else {
                return;
            };
            // An HTTP/2 connection ended by GOAWAY (e.g. the h2 crate finding a client frame a
            // protocol error) is said: the client then fails calls it did not cause itself.
            if let Err(e) = builder.serve_connection(TokioIo::new(stream), svc).await {
                let detail = format!("{e:?}");
                if detail.contains("GoAway") {
                    eprintln!("mock-provider: h2 connection ended: {detail}");
                }
            }
        }
        _ => {
            let _ = builder.serve_connection(TokioIo::new(io), svc).await;
        }
    }
}

/// The TCP stream, reset (SO_LINGER 0) instead of closed when a fault asked for it.
struct ConnIo {
    tcp: TcpStream,
    reset: Arc<AtomicBool>,
}

impl Drop for ConnIo {
    fn drop(&mut self) {
        if self.reset.load(Ordering::Relaxed) {
            let _ = self.tcp.set_zero_linger();
        }
    }
}

impl AsyncRead for ConnIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for ConnIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

fn respond(status: StatusCode, content_type: &'static str, body: MockBody) -> Response<MockBody> {
    let mut r = Response::new(body);
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn error(family: Family, status: StatusCode, message: &str) -> Response<MockBody> {
    let body = render::error_body(family, status.as_u16(), message);
    respond(status, render::JSON, MockBody::full(body))
}

/// The provider key the request carries, where that provider's SDK puts it.
fn presented_key<'a>(
    family: Family,
    headers: &'a HeaderMap,
    query: Option<&'a str>,
) -> Option<&'a str> {
    let h = |n: &str| headers.get(n).and_then(|v| v.to_str().ok());
    let bearer = || h("authorization").and_then(|v| v.strip_prefix("Bearer "));
    match family {
        Family::OpenAi => bearer().or_else(|| h("api-key")),
        // anthropic-python 2.x sends its api_key as `Authorization: Bearer`; older SDKs and curl use x-api-key.
        Family::Anthropic => h("x-api-key").or_else(bearer),
        Family::Gemini => h("x-goog-api-key")
            .or_else(|| query.and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("key=")))),
    }
}

fn accepts_gzip(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|e| {
            e.split(';')
                .next()
                .is_some_and(|e| e.trim().eq_ignore_ascii_case("gzip"))
        })
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

async fn handle(
    shared: Arc<Shared>,
    reset: Arc<AtomicBool>,
    req: Request<Incoming>,
) -> Result<Response<MockBody>, Infallible> {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path();
    if parts.method == Method::GET && (path == "/healthz" || path == "/") {
        return Ok(respond(
            StatusCode::OK,
            "text/plain",
            MockBody::full("ok\n"),
        ));
    }
    let Some((api, model_in_path)) = MockApi::from_path(path) else {
        let msg = format!("mock provider: no API at {} {path}", parts.method);
        return Ok(error(Family::OpenAi, StatusCode::NOT_FOUND, &msg));
    };
    let family = api.family();
    if parts.method != Method::POST {
        return Ok(error(
            family,
            StatusCode::METHOD_NOT_ALLOWED,
            "mock provider: use POST",
        ));
    }
    let query = parts.uri.query();
    if let Some(key) = &shared.config.require_key
        && presented_key(family, &parts.headers, query) != Some(key.as_str())
    {
        let msg = match family {
            Family::OpenAi => {
                "Incorrect API key provided. You can find your API key at https://platform.openai.com/account/api-keys."
            }
            Family::Anthropic => "invalid x-api-key",
            Family::Gemini => "API key not valid. Please pass a valid API key.",
        };
        return Ok(error(family, StatusCode::UNAUTHORIZED, msg));
    }
    let knobs = match Knobs::resolve(&shared.config, &parts.headers) {
        Ok(k) => k,
        Err(msg) => return Ok(error(family, StatusCode::BAD_REQUEST, &msg)),
    };
    let bytes = match Limited::new(body, MAX_REQUEST).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return Ok(error(
                family,
                StatusCode::BAD_REQUEST,
                &format!("cannot read the request body: {e}"),
            ));
        }
    };
    let request = match render::Request::parse(api, model_in_path, query, &bytes) {
        Ok(r) => r,
        Err(msg) => return Ok(error(family, StatusCode::BAD_REQUEST, &msg)),
    };

    let mut delay = knobs.latency;
    if let Some(Fault::SlowFirstByte(d)) = knobs.fault {
        delay += d;
    }
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }

    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let tokens = Tokens::resolve(&knobs.usage, &request, shared.config.output_tokens);
    let response_model = match &shared.config.model_snapshot {
        Some(suffix) => format!("{}{suffix}", request.model),
        None => request.model.clone(),
    };
    let mut call = ServedCall {
        id,
        api,
        path_and_query: parts
            .uri
            .path_and_query()
            .map(ToString::to_string)
            .unwrap_or_default(),
        model: request.model.clone(),
        response_model: response_model.clone(),
        stream: request.stream,
        status: 200,
        usage: tokens.billed(api),
        usage_reported: false,
        text_tokens: tokens.text(),
        fault: knobs.fault,
        chunks_planned: 0,
        chunks_sent: 0,
        client_disconnected: false,
        headers: parts.headers,
        version: parts.version,
        request_bytes: bytes.len(),
    };
    let call_id = HeaderValue::from(id);

    if let Some(Fault::Status(code)) = knobs.fault {
        let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        call.status = code;
        call.usage = super::Usage::default();
        shared.ledger.push(call);
        let mut r = error(
            family,
            status,
            &format!("mock provider: injected fault status={code}"),
        );
        r.headers_mut().insert("x-mock-call-id", call_id);
        return Ok(r);
    }

    let model_json =
        serde_json::to_string(&response_model).unwrap_or_else(|_| "\"model\"".to_owned());
    let ctx = Ctx {
        call_id: id,
        created: unix_now(),
        model_json: &model_json,
        chunks: knobs.chunks,
        embedding_dims: shared.config.embedding_dims,
        hit_max: request
            .max_tokens
            .is_some_and(|m| tokens.output >= m && tokens.output > 0),
    };
    let mut rendered = render::render(&request, &tokens, &ctx);
    let hidden = if matches!(knobs.fault, Some(Fault::NoUsage)) {
        Some(suppress::Hidden::Fault)
    } else if suppress::gemini_masked(api, query, &call.headers) {
        Some(suppress::Hidden::FieldMask)
    } else if suppress::is_background(api, &bytes) {
        Some(suppress::Hidden::Background)
    } else {
        None
    };
    if let Some(why) = hidden {
        suppress::apply(&mut rendered, request.stream, why);
    }
    let stream = request.stream;
    let mut frames = rendered.frames;
    // Non-stream bodies are split in two so faults can strike mid-body; chunked ones in a few pieces.
    if !stream
        && (knobs.chunked
            || matches!(knobs.fault, Some(f) if !matches!(f, Fault::SlowFirstByte(_))))
    {
        frames = split(&frames[0], if knobs.chunked { 3 } else { 2 });
    }
    let n = frames.len();
    let at = |k: Option<usize>| k.unwrap_or(n / 2).min(n);
    let mut broken_from = None;
    let cut = match knobs.fault {
        Some(Fault::ResetMidStream(k)) => Cut::Reset { at: at(k) },
        Some(Fault::Stall(k)) => Cut::Stall { at: at(k) },
        Some(Fault::TruncatedSse(k)) => {
            let k = at(k).min(n.saturating_sub(1));
            let f = &frames[k];
            let cut_frame = f.slice(..f.len() / 2);
            frames.truncate(k);
            frames.push(cut_frame);
            broken_from = Some(k);
            Cut::None
        }
        Some(Fault::InvalidJson) => {
            let k = if stream { n / 2 } else { 0 };
            frames[k] = corrupt(&frames[k]);
            broken_from = Some(k);
            Cut::None
        }
        _ => Cut::None,
    };
    let usage_frame = if stream {
        rendered.usage_frame
    } else {
        rendered.usage_frame.map(|_| frames.len() - 1)
    };
    let gzip = knobs.gzip && accepts_gzip(&call.headers);
    let body = MockBody::new(
        frames,
        if stream {
            knobs.chunk_delay
        } else {
            Duration::ZERO
        },
        cut,
        gzip,
        !stream && !knobs.chunked,
    )
    .with_trailer_from(rendered.trailer_from)
    .with_end_delay(knobs.end_delay)
    .with_record(
        Pending {
            call,
            ledger: shared.ledger.clone(),
            usage_frame,
            broken_from,
        },
        reset,
    );
    let mut r = respond(StatusCode::OK, rendered.content_type, body);
    let h = r.headers_mut();
    h.insert("x-mock-call-id", call_id);
    if gzip {
        h.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    }
    match family {
        Family::OpenAi => {
            h.insert(
                "x-request-id",
                HeaderValue::from_str(&format!("req_mock{id:012x}")).expect("ascii"),
            );
            h.insert(
                "openai-processing-ms",
                HeaderValue::from(knobs.latency.as_millis().min(u128::from(u64::MAX)) as u64),
            );
        }
        Family::Anthropic => {
            h.insert(
                "request-id",
                HeaderValue::from_str(&format!("req_mock{id:012x}")).expect("ascii"),
            );
        }
        Family::Gemini => {}
    }
    if stream {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    }
    Ok(r)
}

/// `frame` in `parts` pieces of about equal length (split on byte boundaries; bodies are ASCII JSON).
fn split(frame: &Bytes, parts: usize) -> Vec<Bytes> {
    let len = frame.len();
    (0..parts)
        .map(|i| frame.slice(i * len / parts..(i + 1) * len / parts))
        .filter(|b| !b.is_empty())
        .collect()
}

/// The frame with a stray byte after its first `{`, so its JSON no longer parses.
fn corrupt(frame: &Bytes) -> Bytes {
    let mut v = frame.to_vec();
    let i = v.iter().position(|&b| b == b'{').map_or(0, |i| i + 1);
    v.insert(i, b'%');
    Bytes::from(v)
}
