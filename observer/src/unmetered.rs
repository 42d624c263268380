//! Where unmetered provider connections go (see `egress.rs`): the ledger's per-tenant counters
//! (`Ledger::record_unmetered`) and, once per (service, host) per `bypass_event_window_secs`, the
//! bypass event stream with `kind = unmetered`; or one JSON line each in `observer sniff`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ledger::store::{Ledger, UnmeteredConn};
use tokio::sync::mpsc;

use crate::egress::{EgressMetrics, UnmeteredRecord};

/// Tries per record before it is counted lost (Redis answers within its operation timeout).
const TRIES: u32 = 3;

fn conn(r: &UnmeteredRecord) -> UnmeteredConn {
    UnmeteredConn {
        tenant: r.tenant.clone(),
        service: r.service.clone(),
        host: r.host.clone(),
        provider: r.provider.clone(),
        conn_id: r.conn_id.clone(),
        pid: r.pid,
        comm: r.comm.clone(),
        bytes_out: r.bytes_out,
        bytes_in: r.bytes_in,
        started_at: r.started_at,
        duration_ms: r.duration_ms,
        joined: r.joined,
    }
}

/// Writes records until the channel closes. `ledger` is `None` in `observer sniff`.
pub async fn run(
    mut rx: mpsc::Receiver<UnmeteredRecord>,
    ledger: Option<Ledger>,
    window: Duration,
    metrics: Arc<EgressMetrics>,
) {
    let mut last_event: HashMap<(String, String), Instant> = HashMap::new();
    while let Some(rec) = rx.recv().await {
        let Some(ledger) = &ledger else {
            if let Ok(line) = serde_json::to_string(&rec) {
                println!("{line}");
            }
            continue;
        };
        let c = conn(&rec);
        let mut booked = false;
        for attempt in 1..=TRIES {
            match ledger.record_unmetered(&c).await {
                Ok(_) => {
                    booked = true;
                    break;
                }
                Err(e) if e.is_transient() && attempt < TRIES => {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => {
                    tracing::error!(error = %e, tenant = %c.tenant, service = %c.service,
                        "unmetered connection not recorded");
                    break;
                }
            }
        }
        if !booked {
            metrics.ledger_errors.inc();
            continue;
        }
        let key = (c.service.clone(), c.host.clone());
        if last_event.get(&key).is_some_and(|t| t.elapsed() < window) {
            continue;
        }
        // Once per (service, host) and window, like the metered bypass events.
        tracing::warn!(service = %c.service, tenant = %c.tenant, host = %c.host,
            pid = c.pid, comm = %c.comm, bytes_out = c.bytes_out, bytes_in = c.bytes_in,
            joined = c.joined,
            "unmetered: a connection to an LLM provider carried no call the observer could decode (bypass)");
        match ledger.unmetered_event(&c).await {
            Ok(_) => {
                last_event.insert(key, Instant::now());
            }
            Err(e) => {
                metrics.ledger_errors.inc();
                tracing::error!(error = %e, "unmetered bypass event XADD failed; retried with the pair's next connection");
            }
        }
    }
}
