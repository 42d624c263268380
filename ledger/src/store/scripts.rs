//! The Lua scripts, loaded once per Redis (EVALSHA, with `redis::Script` falling back to SCRIPT LOAD
//! on NOSCRIPT), and the parsing of their replies.

use std::sync::LazyLock;

use redis::Script;

use crate::Error;

macro_rules! script {
    ($file:literal) => {
        LazyLock::new(|| {
            Script::new(concat!(
                include_str!("lua/common.lua"),
                include_str!(concat!("lua/", $file))
            ))
        })
    };
    (batch $file:literal) => {
        LazyLock::new(|| {
            Script::new(concat!(
                include_str!("lua/common.lua"),
                include_str!("lua/batch.lua"),
                include_str!(concat!("lua/", $file))
            ))
        })
    };
}

/// Checks every cap and holds the amount (lua/reserve.lua).
pub(crate) static RESERVE: LazyLock<Script> = script!("reserve.lua");
/// Replaces a hold with the actual cost, once per request id (lua/settle.lua).
pub(crate) static SETTLE: LazyLock<Script> = script!("settle.lua");
/// Several reserves of one tenant in one call, in order (lua/reserve_batch.lua).
pub(crate) static RESERVE_BATCH: LazyLock<Script> = script!(batch "reserve_batch.lua");
/// Several settles of one tenant in one call, in order (lua/settle_batch.lua).
pub(crate) static SETTLE_BATCH: LazyLock<Script> = script!(batch "settle_batch.lua");
/// Drops a hold without spend, or reverses its abandoned estimate (lua/release.lua).
pub(crate) static RELEASE: LazyLock<Script> = script!("release.lua");
/// Commits observer spend, once per event id (lua/record.lua).
pub(crate) static RECORD: LazyLock<Script> = script!("record.lua");
/// Commits expired holds as estimates (lua/reclaim.lua).
pub(crate) static RECLAIM: LazyLock<Script> = script!("reclaim.lua");
/// Commits one hold at its reserved amount as an estimate (lua/abandon.lua).
pub(crate) static ABANDON: LazyLock<Script> = script!("abandon.lua");

/// A script reply: a status word and its string fields.
pub(crate) struct Reply {
    pub(crate) script: &'static str,
    pub(crate) fields: Vec<String>,
}

impl Reply {
    pub(crate) fn new(script: &'static str, fields: Vec<String>) -> Reply {
        Reply { script, fields }
    }

    /// The status word ("ALLOW", "DENY", ...).
    pub(crate) fn status(&self) -> &str {
        self.fields.first().map_or("", String::as_str)
    }

    /// Field `i` (0 = status).
    pub(crate) fn str(&self, i: usize) -> Result<&str, Error> {
        self.fields
            .get(i)
            .map(String::as_str)
            .ok_or_else(|| self.unexpected())
    }

    /// Field `i` as an integer.
    pub(crate) fn int(&self, i: usize) -> Result<i64, Error> {
        self.str(i)?.parse().map_err(|_| self.unexpected())
    }

    /// The error for a reply this version does not understand (a schema mismatch).
    pub(crate) fn unexpected(&self) -> Error {
        Error::ScriptReply {
            script: self.script,
            detail: format!("{:?}", self.fields),
        }
    }
}
