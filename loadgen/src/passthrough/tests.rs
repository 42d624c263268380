//! The pass-through against a hyper upstream on loopback: a request arrives with its method, path,
//! query, headers and body; an SSE response comes back byte for byte and event by event.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::{Mutex, mpsc, oneshot};

use super::{Passthrough, bind, serve};

type UpBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

const EVENTS: [&str; 3] = [
    "data: {\"choices\":[{\"delta\":{\"content\":\"Hel\"}}]}\n\n",
    ": keep-alive comment\r\n\r\n",
    "data: [DONE]\n\n",
];

/// The upstream: `/v1/echo` answers with what it received; `/v1/sse` sends the first two events,
/// then the last only once `release` fires (so the client must have seen the first ones early).
async fn upstream(release: Arc<Mutex<Option<oneshot::Receiver<()>>>>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            let release = release.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let release = release.clone();
                    async move { Ok::<_, Infallible>(handle(req, release).await) }
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

async fn handle(
    req: Request<Incoming>,
    release: Arc<Mutex<Option<oneshot::Receiver<()>>>>,
) -> Response<UpBody> {
    let (parts, body) = req.into_parts();
    let body = body.collect().await.expect("request body").to_bytes();
    match parts.uri.path() {
        "/v1/echo" => {
            let seen = serde_json::json!({
                "method": parts.method.as_str(),
                "uri": parts.uri.to_string(),
                "auth": parts.headers.get("authorization").and_then(|v| v.to_str().ok()),
                "connection": parts.headers.get("connection").and_then(|v| v.to_str().ok()),
                "body": String::from_utf8_lossy(&body),
            });
            Response::new(Full::new(Bytes::from(seen.to_string())).boxed())
        }
        "/v1/sse" => {
            let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(4);
            let gate = release.lock().await.take();
            tokio::spawn(async move {
                for ev in &EVENTS[..2] {
                    let _ = tx
                        .send(Ok(Frame::data(Bytes::from_static(ev.as_bytes()))))
                        .await;
                }
                if let Some(g) = gate {
                    let _ = g.await;
                }
                let _ = tx
                    .send(Ok(Frame::data(Bytes::from_static(EVENTS[2].as_bytes()))))
                    .await;
            });
            let mut r = Response::new(BodyExt::boxed(StreamBody::new(
                tokio_stream::wrappers::ReceiverStream::new(rx),
            )));
            r.headers_mut().insert(
                "content-type",
                http::HeaderValue::from_static("text/event-stream"),
            );
            r
        }
        _ => {
            let mut r = Response::new(Full::new(Bytes::from_static(b"nope")).boxed());
            *r.status_mut() = StatusCode::NOT_FOUND;
            r
        }
    }
}

async fn passthrough(up: SocketAddr) -> SocketAddr {
    let p = Passthrough::new(&[format!("mock=http://{up}/v1")], None).expect("routes");
    let l = bind("127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(serve(l, Arc::new(p)));
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_a_request_and_streams_sse_unchanged() {
    let (release_tx, release_rx) = oneshot::channel();
    let up = upstream(Arc::new(Mutex::new(Some(release_rx)))).await;
    let proxy = passthrough(up).await;
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();

    // A POST: method, path after the route name, query, headers and body reach the upstream;
    // hop-by-hop headers do not.
    let req = Request::post(format!("http://{proxy}/mock/echo?x=1"))
        .header("authorization", "Bearer sk-test")
        .header("connection", "keep-alive")
        .body(Full::new(Bytes::from_static(b"{\"model\":\"m\"}")))
        .expect("request");
    let r = client.request(req).await.expect("echo through the proxy");
    assert_eq!(r.status(), StatusCode::OK);
    let seen: serde_json::Value =
        serde_json::from_slice(&r.into_body().collect().await.expect("body").to_bytes())
            .expect("json");
    assert_eq!(seen["method"], "POST");
    assert_eq!(seen["uri"], "/v1/echo?x=1");
    assert_eq!(seen["auth"], "Bearer sk-test");
    assert_eq!(seen["connection"], serde_json::Value::Null);
    assert_eq!(seen["body"], "{\"model\":\"m\"}");

    // SSE: the first events arrive while the upstream still holds the last one back, and the
    // whole body is the upstream's, byte for byte.
    let req = Request::post(format!("http://{proxy}/mock/sse"))
        .body(Full::new(Bytes::from_static(b"{\"stream\":true}")))
        .expect("request");
    let r = client.request(req).await.expect("sse through the proxy");
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let mut body = r.into_body();
    let mut got = Vec::new();
    let first_two = EVENTS[0].len() + EVENTS[1].len();
    while got.len() < first_two {
        let f = tokio::time::timeout(Duration::from_secs(5), body.frame())
            .await
            .expect("the first events arrive before the upstream finishes")
            .expect("a frame")
            .expect("no error");
        if let Ok(d) = f.into_data() {
            got.extend_from_slice(&d);
        }
    }
    release_tx.send(()).expect("upstream waiting");
    got.extend_from_slice(&body.collect().await.expect("rest").to_bytes());
    assert_eq!(String::from_utf8(got).expect("utf-8"), EVENTS.concat());

    // An unknown route is the proxy's own 404.
    let req = Request::get(format!("http://{proxy}/other/x"))
        .body(Full::new(Bytes::new()))
        .expect("request");
    let r = client.request(req).await.expect("404");
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn refuses_bad_routes_and_non_loopback_listens() {
    assert!(Passthrough::new(&[], None).is_err());
    assert!(Passthrough::new(&["mock".into()], None).is_err());
    assert!(Passthrough::new(&["mock=ftp://x/v1".into()], None).is_err());
    assert!(bind("0.0.0.0:0".parse().expect("addr")).await.is_err());
}
