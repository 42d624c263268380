//! The one way both binaries write usage: to Redis, else to the local spool, so a Redis outage
//! never loses a settle, a release or an observer record. The outcome says which happened; the
//! caller counts and logs it in its own metrics.

use crate::Error;
use crate::spool::{Spool, SpoolEntry};
use crate::store::{Ledger, RecordOutcome, Settlement, UsageRecord};

/// Where a usage write ended.
#[derive(Debug)]
pub enum Written {
    /// Redis took it.
    Committed,
    /// Redis already held this record's id ([`crate::store::RecordOutcome::Duplicate`]): nothing
    /// changed. Right for a retry; for a fresh record it means two calls were given one id.
    Duplicate,
    /// The entry is in the spool and is replayed when Redis answers.
    Spooled {
        /// Why Redis did not take it; `None` when Redis was not tried (a call admitted without a
        /// reservation while Redis was unreachable).
        cause: Option<Error>,
    },
    /// The entry itself is invalid ([`Error::is_invalid_input`]): neither Redis nor the spool
    /// would ever take it. A bug or absurd input; the caller logs it loudly.
    Refused(Error),
    /// Redis did not take it and neither did the spool (full or failing disk): the usage is lost
    /// unless a hold's estimate covers it. The caller logs it loudly and counts it.
    Lost {
        /// Why Redis did not take it (`None`: not tried).
        cause: Option<Error>,
        /// Why the spool did not.
        spool: Error,
    },
}

impl Written {
    /// Whether the usage is safe (in Redis or in the spool).
    #[must_use]
    pub fn is_kept(&self) -> bool {
        matches!(
            self,
            Written::Committed | Written::Duplicate | Written::Spooled { .. }
        )
    }
}

/// A ledger handle with its spool: the durable writer.
#[derive(Clone, Debug)]
pub struct DurableLedger {
    ledger: Ledger,
    spool: Spool,
}

impl DurableLedger {
    /// Writes through `ledger`, falling back to `spool`.
    #[must_use]
    pub fn new(ledger: Ledger, spool: Spool) -> DurableLedger {
        DurableLedger { ledger, spool }
    }

    /// The ledger.
    #[must_use]
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// The spool.
    #[must_use]
    pub fn spool(&self) -> &Spool {
        &self.spool
    }

    /// Settles a call's real cost ([`Ledger::settle`]), else spools it.
    pub async fn settle_or_spool(&self, s: &Settlement) -> Written {
        match self.ledger.settle(s).await {
            Ok(_) => Written::Committed,
            Err(e) => self.fall_back(e, SpoolEntry::Settle(s.clone())).await,
        }
    }

    /// Releases a hold ([`Ledger::release`]), else spools the release.
    pub async fn release_or_spool(&self, tenant: &str, request_id: &str) -> Written {
        match self.ledger.release(tenant, request_id).await {
            Ok(()) => Written::Committed,
            Err(e) => {
                let entry = SpoolEntry::Release {
                    tenant: tenant.to_owned(),
                    request_id: request_id.to_owned(),
                };
                self.fall_back(e, entry).await
            }
        }
    }

    /// Records spend the observer saw ([`Ledger::record`]), else spools it.
    pub async fn record_or_spool(&self, r: &UsageRecord) -> Written {
        match self.ledger.record(r).await {
            Ok(RecordOutcome::Recorded) => Written::Committed,
            Ok(RecordOutcome::Duplicate) => Written::Duplicate,
            Err(e) => self.fall_back(e, SpoolEntry::Record(r.clone())).await,
        }
    }

    /// Spools a settlement without trying Redis: the call was admitted without a reservation
    /// while Redis was unreachable, so its usage waits for the replay.
    pub async fn spool_settlement(&self, s: &Settlement) -> Written {
        match self.spool.append(&SpoolEntry::Settle(s.clone())).await {
            Ok(()) => Written::Spooled { cause: None },
            Err(e) if e.is_invalid_input() => Written::Refused(e),
            Err(spool) => Written::Lost { cause: None, spool },
        }
    }

    async fn fall_back(&self, cause: Error, entry: SpoolEntry) -> Written {
        if cause.is_invalid_input() {
            return Written::Refused(cause);
        }
        match self.spool.append(&entry).await {
            Ok(()) => Written::Spooled { cause: Some(cause) },
            Err(spool) => Written::Lost {
                cause: Some(cause),
                spool,
            },
        }
    }
}
