//! Listeners: the proxy (HTTP/1.1 and h2c through hyper-util's auto builder, optionally TLS with
//! ALPN h2/http1.1) and the admin API, with graceful shutdown on SIGTERM / Ctrl-C so streams in
//! flight finish and settle. Connection limits, accept back-off and idle closing: [`conn`].

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::App;
use crate::error::StartError;

mod conn;
mod threads;

use conn::{Connections, Kind};
use threads::ProxyThreads;

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
    app.budgets.leases.spawn_sweeper();
    if let Some(rk) = &app.runtime_keys {
        if let Err(e) = rk.refresh(true).await {
            tracing::warn!(error = %e, "could not load runtime keys (Redis down?); they work once it answers");
        }
        rk.spawn_refresher(Duration::from_millis(app.cfg.runtime_keys_refresh_ms));
    }
    if let Err(e) = app.rules.refresh(true).await {
        tracing::warn!(error = %e, "could not load the stored routing rules (Redis down?); the file's apply until it answers");
    }
    app.rules.spawn_refresher(Duration::from_secs(1));
    crate::alerting::spawn(
        app.ledger.clone(),
        app.instance.clone(),
        &app.cfg.alerts,
        &app.metrics,
        app.durable.spool(),
    )?;
    let tls = match (&app.cfg.tls_cert_file, &app.cfg.tls_key_file) {
        (Some(c), Some(k)) => Some(tls_acceptor(c, k)?),
        _ => None,
    };
    let threads = Arc::new(
        ProxyThreads::start(app.cfg.proxy_threads()).map_err(|source| StartError::Bind {
            key: "proxy_threads",
            addr: app.cfg.listen.clone(),
            source,
        })?,
    );
    warm_up(&app, &threads).await;
    let (listener, admin) = bind(&app).await?;
    tracing::info!(listen = %app.cfg.listen, admin = app.cfg.admin_addr().unwrap_or("off"), tls = tls.is_some(), max_connections = app.cfg.max_connections, "enforcer listening");
    let conns = Connections::default();
    let mut loops = vec![tokio::spawn(conn::accept_loop(
        app.clone(),
        listener,
        Kind::Proxy,
        app.cfg.max_connections,
        tls,
        conns.clone(),
        Some(threads.clone()),
    ))];
    if let Some(admin) = admin {
        loops.push(tokio::spawn(conn::accept_loop(
            app.clone(),
            admin,
            Kind::Admin,
            conn::ADMIN_MAX_CONNECTIONS,
            None,
            conns.clone(),
            None,
        )));
    }
    shutdown_signal().await;
    drain(&app, &conns, loops).await;
    threads.stop().await;
    Ok(())
}

/// Opens each proxy thread's Redis connection and loads the scripts a call runs, on that thread,
/// before the listener opens: otherwise the first call each thread carries pays the connect and
/// a NOSCRIPT round trip, and the calls arriving meanwhile on that thread wait for the same
/// connection (docs/enforcer.md, "Runtime threads").
/// Redis being down only delays the start by its timeouts and is logged; the connections then
/// open on first use.
async fn warm_up(app: &Arc<App>, threads: &ProxyThreads) {
    let t = std::time::Instant::now();
    let tasks: Vec<_> = threads
        .handles()
        .map(|h| {
            let app = app.clone();
            h.spawn(async move { app.ledger.warm_up().await })
        })
        .collect();
    let n = tasks.len();
    let mut failed = None;
    for task in tasks {
        match task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failed = Some(e.to_string()),
            Err(e) => failed = Some(e.to_string()),
        }
    }
    match failed {
        None => tracing::info!(
            ms = t.elapsed().as_millis(),
            threads = n,
            "Redis connections open and call scripts loaded"
        ),
        Some(error) => tracing::warn!(
            %error,
            "could not open the proxy threads' Redis connections (Redis down?); the first calls open them"
        ),
    }
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

/// Stops accepting, lets calls in flight finish (30 s at most), then waits for their settles
/// (10 s at most: each ends within the ledger's operation timeout, then spools), then releases
/// the lease pool's spare holds (10 s at most).
async fn drain(app: &App, conns: &Connections, loops: Vec<tokio::task::JoinHandle<()>>) {
    tracing::info!("shutting down: waiting up to 30 s for calls in flight");
    if !conns.drain(Duration::from_secs(30)).await {
        tracing::warn!("calls still in flight after 30 s; their holds expire by reserve_ttl_secs");
    }
    for l in loops {
        let _ = l.await;
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
    if app.budgets.leases.enabled()
        && tokio::time::timeout(Duration::from_secs(10), app.budgets.leases.close())
            .await
            .is_err()
    {
        tracing::warn!(
            left = app.budgets.leases.free(),
            "spare holds not all released after 10 s; each left is charged at its amount when it expires"
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
