//! The load generator against a tiny hyper server on loopback: a fixed-latency JSON endpoint and an
//! SSE endpoint with a known number of events.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio_stream::wrappers::ReceiverStream;

use crate::hold::{self, HoldRun, Protocol};
use crate::http_load::{self, HttpRun, Mode};
use crate::stream_load::{self, StreamRun};
use crate::target::{self, Target};

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

async fn handle(req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_owned();
    let _ = req.into_body().collect().await;
    Ok(match path.as_str() {
        "/slow" => {
            tokio::time::sleep(Duration::from_millis(5)).await;
            Response::new(Full::new(Bytes::from_static(b"{\"ok\":true}")).boxed())
        }
        "/hold" => {
            tokio::time::sleep(Duration::from_millis(400)).await;
            Response::new(Full::new(Bytes::from_static(b"{\"ok\":true}")).boxed())
        }
        "/sse" => {
            let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(8);
            tokio::spawn(async move {
                for i in 0..10 {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    let ev = format!("data: {{\"i\":{i}}}\n\n");
                    if tx.send(Ok(Frame::data(Bytes::from(ev)))).await.is_err() {
                        return;
                    }
                }
            });
            Response::new(BodyExt::boxed(StreamBody::new(ReceiverStream::new(rx))))
        }
        _ => {
            let mut r = Response::new(Full::new(Bytes::from_static(b"nope")).boxed());
            *r.status_mut() = http::StatusCode::NOT_FOUND;
            r
        }
    })
}

async fn server() -> SocketAddr {
    counting_server().await.0
}

/// The server and the number of connections it accepted.
async fn counting_server() -> (SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let addr = l.local_addr().expect("addr");
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&accepted);
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), service_fn(handle))
                    .await;
            });
        }
    });
    (addr, accepted)
}

fn target(addr: SocketAddr, path: &str, body: &'static [u8]) -> Target {
    Target::new(
        &format!("http://{addr}{path}"),
        &["x-test: 1".to_owned()],
        Bytes::from_static(body),
    )
    .expect("target")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_loop_keeps_its_rate_and_measures_the_server_latency() {
    let addr = server().await;
    let run = HttpRun {
        target: target(addr, "/slow", b"{}"),
        mode: Mode::Rate(400.0),
        duration: Duration::from_millis(1000),
        warmup: Duration::from_millis(200),
        max_in_flight: 256,
        timeout: Duration::from_secs(5),
    };
    let r = http_load::run(&target::client(), &run).await;
    assert!(r.errors.is_empty(), "{r:?}");
    assert!(
        (390..=410).contains(&r.sent),
        "sent {} in 1 s at 400/s: {r:?}",
        r.sent
    );
    assert!(
        r.latency_us.p50 >= 5_000 && r.latency_us.p50 < 50_000,
        "{r:?}"
    );
    assert!((r.achieved_rps - 400.0).abs() < 20.0, "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_loop_throughput_is_bounded_by_concurrency_over_latency() {
    let addr = server().await;
    let run = HttpRun {
        target: target(addr, "/slow", b""),
        mode: Mode::Concurrency(4),
        duration: Duration::from_millis(1000),
        warmup: Duration::from_millis(100),
        max_in_flight: 4,
        timeout: Duration::from_secs(5),
    };
    let r = http_load::run(&target::client(), &run).await;
    assert!(r.errors.is_empty(), "{r:?}");
    // 4 workers / 5 ms = 800/s at most.
    assert!(r.achieved_rps > 300.0 && r.achieved_rps <= 800.0, "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_counted_by_status() {
    let addr = server().await;
    let run = HttpRun {
        target: target(addr, "/missing", b""),
        mode: Mode::Concurrency(2),
        duration: Duration::from_millis(200),
        warmup: Duration::ZERO,
        max_in_flight: 2,
        timeout: Duration::from_secs(5),
    };
    let r = http_load::run(&target::client(), &run).await;
    assert_eq!(r.ok, 0);
    assert!(
        r.errors.get("status_404").copied().unwrap_or(0) > 0,
        "{r:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_report_first_event_and_gaps() {
    let addr = server().await;
    let run = StreamRun {
        target: target(addr, "/sse", b"{\"stream\":true}"),
        streams: 20,
        rounds: 2,
        ramp: Duration::from_millis(20),
        timeout: Duration::from_secs(5),
    };
    let r = stream_load::run(&target::client(), &run).await;
    assert_eq!((r.streams, r.ok), (20, 20), "{r:?}");
    assert!((r.events_per_stream - 10.0).abs() < f64::EPSILON, "{r:?}");
    assert!(r.ttft_us.p50 >= 2_000, "{r:?}");
    // Events are 2 ms apart at the source. Under CPU contention some arrive together, so no single
    // gap is certain; but no stream's last event can arrive before the source sent it, so the
    // mean first-event time plus nine mean gaps covers the 18 ms of spacing.
    assert!(r.ttft_us.mean + 9 * r.gap_us.mean >= 18_000, "{r:?}");
    assert_eq!(r.gap_us.count, 20 * 9);
}

#[tokio::test]
async fn a_seq_placeholder_numbers_each_body() {
    let t = target(
        "127.0.0.1:9".parse().expect("addr"),
        "/",
        br#"{"content":"order {{seq}} please"}"#,
    );
    let mut bodies = Vec::new();
    for _ in 0..3 {
        let b = t.request().into_body().collect().await.expect("full body");
        bodies.push(String::from_utf8(b.to_bytes().to_vec()).expect("utf-8"));
    }
    assert_eq!(
        bodies,
        [0, 1, 2].map(|n| format!(r#"{{"content":"order {n:010} please"}}"#))
    );
    // A clone (every worker holds one) continues the same sequence.
    let b = t
        .clone()
        .request()
        .into_body()
        .collect()
        .await
        .expect("full body");
    assert!(
        String::from_utf8(b.to_bytes().to_vec())
            .expect("utf-8")
            .contains("0000000003")
    );
    let plain = target("127.0.0.1:9".parse().expect("addr"), "/", b"{}");
    let b = plain
        .request()
        .into_body()
        .collect()
        .await
        .expect("full body");
    assert_eq!(b.to_bytes(), Bytes::from_static(b"{}"));
}

fn hold_run(addr: SocketAddr, path: &str, protocol: Protocol) -> HoldRun {
    HoldRun {
        target: target(addr, path, b"{}"),
        connections: 40,
        protocol,
        open_concurrency: 8,
        timeout: Duration::from_secs(5),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_distinct_and_each_made_one_call() {
    for protocol in [Protocol::Http1, Protocol::H2c] {
        let (addr, accepted) = counting_server().await;
        let (held, r) = hold::idle(&hold_run(addr, "/slow", protocol)).await;
        assert_eq!(
            (r.phase.as_str(), r.connections, r.ok),
            ("idle", 40, 40),
            "{protocol:?} {r:?}"
        );
        assert!(r.errors.is_empty(), "{r:?}");
        assert_eq!(r.latency_us.count, 40, "{r:?}");
        // One TCP connection each, all still open: a second call on each reuses it.
        assert_eq!(accepted.load(Ordering::SeqCst), 40, "{protocol:?}");
        let mut held = held;
        let t = target(addr, "/slow", b"{}");
        for c in &mut held.conns {
            assert_eq!(c.call(&t, Duration::from_secs(5)).await, Ok(200));
        }
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            40,
            "{protocol:?}: a connection was reopened"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_in_flight_are_pending_at_settle_and_answered_after() {
    let (addr, accepted) = counting_server().await;
    let mut at_settle = None;
    let t0 = std::time::Instant::now();
    let done = hold::in_flight(
        &hold_run(addr, "/hold", Protocol::Http1),
        Duration::from_millis(150),
        |r| at_settle = Some(r.clone()),
    )
    .await;
    let s = at_settle.expect("the in_flight report");
    // The server answers after 400 ms: 150 ms after sending, every call is still in flight.
    assert_eq!(
        (s.phase.as_str(), s.connections, s.pending, s.ok),
        ("in_flight", 40, 40, 0),
        "{s:?}"
    );
    assert_eq!((done.phase.as_str(), done.ok), ("done", 40), "{done:?}");
    assert!(done.errors.is_empty(), "{done:?}");
    assert!(done.latency_us.min >= 400_000, "{done:?}");
    // All at once, not one after another (40 × 400 ms).
    assert!(t0.elapsed() < Duration::from_secs(4), "{:?}", t0.elapsed());
    assert_eq!(accepted.load(Ordering::SeqCst), 40);
}

#[tokio::test]
async fn a_refused_connection_is_counted() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    drop(l);
    let (held, r) = hold::idle(&hold_run(addr, "/slow", Protocol::Http1)).await;
    assert!(held.conns.is_empty());
    assert_eq!((r.connections, r.ok), (0, 0));
    assert_eq!(r.errors.get("connect"), Some(&40), "{r:?}");
}
