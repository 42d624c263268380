//! The `spool_filling` alert. A spool fills because Redis does not answer, and the alert
//! dispatcher, its lease and its delivery status all live in Redis; so this alert goes from the
//! instance whose spool fills straight to the sinks. Each instance has its own spool, so each
//! sends its own alert: once per crossing of `[alerts] spool_filling_pct` of `spool_max_bytes`,
//! re-armed when the spool drains below half of that (docs/audit.md).

use std::sync::Arc;
use std::time::Duration;

use ledger::spool::Spool;
use ledger::store::Alert;

use crate::alerting::{HttpsClient, Sink, post};

/// How often the spool's size is looked at.
const EVERY: Duration = Duration::from_millis(500);

/// Crossing detection over successive spool sizes.
#[derive(Debug)]
pub(crate) struct Crossing {
    threshold: u64,
    rearm: u64,
    armed: bool,
}

impl Crossing {
    /// Fires at `pct` percent of `max`, re-arms below half of that.
    pub(crate) fn new(max: u64, pct: u32) -> Crossing {
        let threshold = max / 100 * u64::from(pct) + max % 100 * u64::from(pct) / 100;
        Crossing {
            threshold: threshold.max(1),
            rearm: threshold / 2,
            armed: true,
        }
    }

    /// Whether `used` bytes is a new crossing (true once until re-armed).
    pub(crate) fn observe(&mut self, used: u64) -> bool {
        if self.armed && used >= self.threshold {
            self.armed = false;
            return true;
        }
        if !self.armed && used < self.rearm {
            self.armed = true;
        }
        false
    }
}

/// Watches `spool` for the life of the process and sends `spool_filling` to every sink.
pub(crate) fn spawn(
    spool: Spool,
    instance: String,
    pct: u32,
    sinks: Arc<Vec<Sink>>,
    client: HttpsClient,
) {
    let max = spool.max_bytes();
    let mut crossing = Crossing::new(max, pct);
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(EVERY).await;
            let used = spool.stats().bytes;
            if !crossing.observe(used) {
                continue;
            }
            let now = chrono::Utc::now();
            let alert = Alert {
                id: format!("spool|{instance}|{}", now.timestamp_millis()),
                kind: "spool_filling".into(),
                instance: instance.clone(),
                spool_bytes: used,
                spool_max_bytes: max,
                threshold_pct: pct,
                at: now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                ..Alert::default()
            };
            tracing::warn!(
                spool_bytes = used,
                spool_max_bytes = max,
                threshold_pct = pct,
                "the spool is filling (Redis does not answer): alerting the sinks directly"
            );
            for sink in sinks.iter() {
                tokio::spawn(deliver(client.clone(), sink.clone(), alert.clone()));
            }
        }
    });
}

/// Sends `alert` to one sink with the sink's retries and backoff (no status is kept: Redis is
/// what is down).
async fn deliver(client: HttpsClient, sink: Sink, alert: Alert) {
    let mut backoff = Duration::from_millis(sink.cfg.backoff_ms);
    for attempt in 1..=sink.cfg.max_attempts {
        match post(&client, &sink, &alert).await {
            Ok(()) => {
                tracing::info!(alert = %alert.id, sink = %sink.cfg.name, attempts = attempt, "alert delivered");
                return;
            }
            Err(e) => {
                tracing::warn!(alert = %alert.id, sink = %sink.cfg.name, attempt, error = %e, "alert delivery failed");
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(60));
    }
}

#[cfg(test)]
mod tests {
    use super::Crossing;

    #[test]
    fn fires_once_per_crossing_and_rearms_below_half() {
        let mut c = Crossing::new(1000, 80);
        let seen: Vec<bool> = [0, 500, 799, 800, 950, 1000, 500, 401, 399, 700, 820, 900]
            .into_iter()
            .map(|u| c.observe(u))
            .collect();
        assert_eq!(
            seen,
            [
                false, false, false, true, false, false, false, false, false, false, true, false
            ]
        );
        // Large bounds do not overflow.
        let mut big = Crossing::new(u64::MAX, 80);
        assert!(!big.observe(u64::MAX / 2));
        assert!(big.observe(u64::MAX));
    }
}
