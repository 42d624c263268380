//! Rate limits: the window counters live in `llmw:{T}:rl:<scope>` (see lua/common.lua, "Rate
//! limits"); they are checked and counted by the reserve scripts with the caps, so a call is
//! admitted or refused as a whole. A call's tokens are counted at their worst case (input
//! estimate + output limit) at reserve; [`Ledger::correct_rate_tokens`] puts the real count in
//! their place once the call is settled.

use std::sync::LazyLock;

use chrono::{DateTime, Utc};
use redis::Script;

use super::Ledger;
use super::keys::{prefix, validate_name, validate_tenant};
use super::scripts::ScriptCall;
use crate::Error;

static CORRECT: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lua/rate_correct.lua")));

impl Ledger {
    /// Changes the tokens a call counted at `at` in the rate windows of `scopes` by `delta`
    /// (real − reserved). A no-op when `delta` is 0, no scope is given, or the call's second has
    /// left the window.
    ///
    /// # Errors
    /// [`Error::Invalid`] for bad names; [`Error::Redis`] when Redis is unavailable.
    pub async fn correct_rate_tokens(
        &self,
        tenant: &str,
        scopes: &[String],
        at: DateTime<Utc>,
        delta: i64,
    ) -> Result<(), Error> {
        if delta == 0 || scopes.is_empty() {
            return Ok(());
        }
        validate_tenant(tenant)?;
        let mut inv = ScriptCall::new(&CORRECT);
        for s in scopes {
            validate_name("rate limit scope", s)?;
            inv.key(format!("{}rl:{s}", prefix(tenant)));
        }
        inv.arg(at.timestamp()).arg(delta);
        self.timed("correct_rate_tokens", async {
            let mut c = self.conn.clone();
            let _: i64 = inv.invoke_async(&mut c).await?;
            Ok(())
        })
        .await
    }
}
