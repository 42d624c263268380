//! The ledger's error type. Each variant names the problem and, where there is one, the fix.

/// Everything that can go wrong in the ledger crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A money amount could not be parsed or is out of range.
    #[error("invalid amount: {0}")]
    InvalidAmount(String),

    /// A request or response body is not the JSON the API documents.
    #[error("invalid {what} JSON: {source}")]
    Json {
        /// What was being parsed ("OpenAI chat completion response", ...).
        what: &'static str,
        /// The parser's error.
        #[source]
        source: serde_json::Error,
    },

    /// A body parsed as JSON but lacks or mistypes a field the API requires.
    #[error("invalid {what}: {detail}")]
    Shape {
        /// What was being parsed.
        what: &'static str,
        /// Which field is wrong and how.
        detail: String,
    },

    /// A price file could not be read or parsed.
    #[error("price file {path}: {detail}")]
    PriceFile {
        /// The file.
        path: String,
        /// What is wrong, naming the model and field where possible.
        detail: String,
    },

    /// Redis failed or is unreachable.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),

    /// A Redis script returned something the ledger does not understand (schema mismatch).
    #[error("redis script {script} returned an unexpected reply: {detail}")]
    ScriptReply {
        /// The script name.
        script: &'static str,
        /// What was unexpected.
        detail: String,
    },

    /// A value given to the ledger is not allowed (empty tenant, a key containing a brace, ...).
    #[error("invalid {what}: {detail}")]
    Invalid {
        /// The argument.
        what: &'static str,
        /// Why.
        detail: String,
    },

    /// The local spool (usage waiting for Redis) could not be read or written.
    #[error("spool {path}: {detail}")]
    Spool {
        /// The spool directory or file.
        path: String,
        /// What failed, with the fix where there is one.
        detail: String,
    },

    /// The local spool reached its byte bound; the record was refused (and counted), not dropped.
    #[error(
        "spool {dir} is full ({used} of {limit} bytes); usage cannot be saved until Redis is reachable \
         and the spool replays, or raise spool max_bytes"
    )]
    SpoolFull {
        /// The spool directory.
        dir: String,
        /// Bytes in use.
        used: u64,
        /// The configured bound.
        limit: u64,
    },
}

impl Error {
    /// A Redis operation that got no reply within `after`, as a transient Redis I/O error (so
    /// callers see one "Redis unavailable" kind whoever timed it out).
    #[must_use]
    pub fn timed_out(op: &'static str, after: std::time::Duration) -> Error {
        Error::Redis(redis::RedisError::from(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("ledger {op} got no reply from Redis within {after:?}"),
        )))
    }

    /// Whether the same call may succeed later because Redis could not be reached or did not
    /// answer in time (refused, reset, timed out, a cluster without a quorum, a server still
    /// loading) — as opposed to a logic, schema or input error. The enforcer's
    /// `on_redis_unavailable` policy applies to these; both binaries spool a usage write Redis
    /// did not take unless the input itself is invalid ([`Error::is_invalid_input`]).
    #[must_use]
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Redis(r) => {
                r.is_io_error()
                    || r.is_timeout()
                    || r.is_connection_dropped()
                    || r.is_connection_refusal()
                    || matches!(
                        r.kind(),
                        redis::ErrorKind::Server(
                            redis::ServerErrorKind::BusyLoading
                                | redis::ServerErrorKind::TryAgain
                                | redis::ServerErrorKind::ClusterDown
                                | redis::ServerErrorKind::MasterDown
                        )
                    )
            }
            _ => false,
        }
    }

    /// Whether the value given was refused as invalid (a bad name, an absurd amount): retrying
    /// cannot help, and the write is refused rather than spooled.
    #[must_use]
    pub fn is_invalid_input(&self) -> bool {
        matches!(self, Error::Invalid { .. } | Error::InvalidAmount(_))
    }
}
