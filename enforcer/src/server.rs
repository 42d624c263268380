//! Listeners: the proxy (HTTP/1.1 and h2c through hyper-util's auto builder, optionally TLS with
//! ALPN h2/http1.1) and the admin API, with graceful shutdown on SIGTERM / Ctrl-C so streams in
//! flight finish and settle.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use crate::error::StartError;
use crate::{App, admin, proxy};

fn tls_acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, StartError> {
    let bad = |key: &'static str, detail: String| StartError::ListenerTls { key, detail };
    let at = |p: &Path, e: &dyn std::fmt::Display| format!("{}: {e}", p.display());
    let certs = rustls_pemfile::certs(
        &mut std::fs::read(cert)
            .map_err(|e| bad("tls_cert_file", at(cert, &e)))?
            .as_slice(),
    )
    .collect::<Result<Vec<_>, _>>()
    .map_err(|e| bad("tls_cert_file", at(cert, &e)))?;
    let pk = rustls_pemfile::private_key(
        &mut std::fs::read(key)
            .map_err(|e| bad("tls_key_file", at(key, &e)))?
            .as_slice(),
    )
    .map_err(|e| bad("tls_key_file", at(key, &e)))?
    .ok_or_else(|| {
        bad(
            "tls_key_file",
            format!("{}: no private key in the file", key.display()),
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad("tls_cert_file", e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, pk)
        .map_err(|e| {
            bad(
                "tls_cert_file",
                format!("certificate and key do not match: {e}"),
            )
        })?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(cfg)))
}

/// Seeds budgets, starts the refresher and both listeners, and runs until SIGTERM or Ctrl-C.
///
/// # Errors
/// [`StartError`] when a listener cannot be bound or the TLS files are bad.
pub async fn run(app: App) -> Result<(), StartError> {
    let app = Arc::new(app);
    if let Err(e) = app.budgets.cache.seed(&app.cfg).await {
        tracing::warn!(error = %e, "could not seed budgets from the config (Redis down?); the cached list fills once it answers");
    }
    let _ = app.budgets.cache.refresh().await;
    app.budgets.cache.spawn_refresher(Duration::from_secs(1));
    let tls = match (&app.cfg.tls_cert_file, &app.cfg.tls_key_file) {
        (Some(c), Some(k)) => Some(tls_acceptor(c, k)?),
        _ => None,
    };
    let (listener, admin) = bind(&app).await?;
    tracing::info!(listen = %app.cfg.listen, admin = app.cfg.admin_addr().unwrap_or("off"), tls = tls.is_some(), "enforcer listening");
    let graceful = GracefulShutdown::new();
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            r = listener.accept() => {
                let Ok((stream, _)) = r else { continue };
                serve_proxy(&app, stream, tls.as_ref(), &graceful);
            }
            r = async { match &admin { Some(l) => l.accept().await, None => std::future::pending().await } } => {
                let Ok((stream, _)) = r else { continue };
                serve_admin(&app, stream, &graceful);
            }
        }
    }
    drop(listener);
    drain(&app, graceful).await;
    Ok(())
}

/// The proxy listener and, unless it is off, the admin listener.
async fn bind(app: &App) -> Result<(TcpListener, Option<TcpListener>), StartError> {
    let listener = TcpListener::bind(&app.cfg.listen)
        .await
        .map_err(|source| StartError::Bind {
            key: "listen",
            addr: app.cfg.listen.clone(),
            source,
        })?;
    let admin = match app.cfg.admin_addr() {
        Some(a) => Some(
            TcpListener::bind(a)
                .await
                .map_err(|source| StartError::Bind {
                    key: "admin_listen",
                    addr: a.to_owned(),
                    source,
                })?,
        ),
        None => None,
    };
    Ok((listener, admin))
}

/// Serves one proxy connection (HTTP/1.1 or h2c, or TLS with ALPN) in its own task.
fn serve_proxy(
    app: &Arc<App>,
    stream: TcpStream,
    tls: Option<&TlsAcceptor>,
    graceful: &GracefulShutdown,
) {
    let _ = stream.set_nodelay(true);
    let client_wait = Duration::from_millis(app.cfg.timeouts.client_ms);
    let app = app.clone();
    let svc = service_fn(move |req| {
        let app = app.clone();
        async move { Ok::<_, std::convert::Infallible>(proxy::handle(app, req).await) }
    });
    let mut builder = Builder::new(TokioExecutor::new());
    // Slow clients: a request head must arrive within timeouts.client_ms.
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(client_wait);
    match tls {
        None => {
            let conn = builder
                .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                .into_owned();
            let conn = graceful.watch(conn);
            tokio::spawn(async move {
                let _ = conn.await;
            });
        }
        Some(acc) => {
            let acc = acc.clone();
            let watcher = graceful.watcher();
            tokio::spawn(async move {
                let Ok(Ok(s)) =
                    tokio::time::timeout(Duration::from_secs(10), acc.accept(stream)).await
                else {
                    return;
                };
                let conn = builder
                    .serve_connection_with_upgrades(TokioIo::new(s), svc)
                    .into_owned();
                let _ = watcher.watch(conn).await;
            });
        }
    }
}

/// Serves one admin connection in its own task.
fn serve_admin(app: &Arc<App>, stream: TcpStream, graceful: &GracefulShutdown) {
    let app = app.clone();
    let svc = service_fn(move |req| {
        let app = app.clone();
        async move { Ok::<_, std::convert::Infallible>(admin::handle(app, req).await) }
    });
    let conn = Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(stream), svc)
        .into_owned();
    let conn = graceful.watch(conn);
    tokio::spawn(async move {
        let _ = conn.await;
    });
}

/// Lets calls in flight finish (30 s at most), then waits for their settles (10 s at most: each
/// ends within the ledger's operation timeout, then spools).
async fn drain(app: &App, graceful: GracefulShutdown) {
    tracing::info!("shutting down: waiting up to 30 s for calls in flight");
    if tokio::time::timeout(Duration::from_secs(30), graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("calls still in flight after 30 s; their holds expire by reserve_ttl_secs");
    }
    app.settles.close();
    if tokio::time::timeout(Duration::from_secs(10), app.settles.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            pending = app.settles.len(),
            "settles still running after 10 s; their holds expire by reserve_ttl_secs"
        );
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { () = ctrl_c => {}, () = term => {} }
}
