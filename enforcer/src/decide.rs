//! Phase 2 of a call, **decide**: the session's loop check, the worst case the call may cost
//! (priced by the ledger's billing policy), and the atomic reserve against every cap
//! ([`Budgets::reserve`]), which returns the call's [`Hold`]. A refusal here still costs nothing:
//! the request has not left the enforcer.

use std::time::Duration;

use ledger::Nanos;
use ledger::billing::CallShape;
use ledger::request::RequestInfo;
use ledger::store::ReserveRequest;

use crate::App;
use crate::admit::Admission;
use crate::auth::KeyEntry;
use crate::budget::Hold;
use crate::call::Call;
use crate::config::OnRedisUnavailable;
use crate::error::ProxyError;

/// What the decision admitted.
#[derive(Debug, Clone)]
pub struct Decision {
    /// What the call holds.
    pub hold: Hold,
    /// The input tokens the worst case assumed (margin included): the floor of an estimate.
    pub input_estimate: u64,
    /// The scopes of the token rate limits the call was counted in, and the tokens counted
    /// (corrected to the real count at settle).
    pub token_rates: (Vec<String>, u64),
    /// The spare hold the call took from the lease pool (crate::lease): its id becomes the
    /// call's request id, under which the call is settled or released.
    pub lease: Option<String>,
}

/// Checks the loop guard, prices the worst case and reserves it.
///
/// # Errors
/// [`ProxyError::LoopDetected`], [`ProxyError::UnknownModel`], [`ProxyError::Budget`],
/// [`ProxyError::LedgerUnavailable`].
pub async fn decide(
    app: &App,
    adm: &Admission<'_>,
    info: &RequestInfo,
    call: &Call,
) -> Result<Decision, ProxyError> {
    check_loops(app, adm, call).await?;
    reserve_worst_case(app, &adm.key, info, call).await
}

/// Prices the worst case of `call` (its `model`, the request `info`) and reserves it against
/// every cap: the decision without the loop check (a downgrade reserves again through here,
/// without counting the call twice in its session).
///
/// # Errors
/// [`ProxyError::UnknownModel`], [`ProxyError::Budget`], [`ProxyError::LedgerUnavailable`].
pub async fn reserve_worst_case(
    app: &App,
    key: &KeyEntry,
    info: &RequestInfo,
    call: &Call,
) -> Result<Decision, ProxyError> {
    let (input_estimate, output, amount) = worst_case(app, info, &call.model)?;
    let rates = app
        .rules
        .current()
        .rates
        .limits(key, &call.tenant, &call.model);
    let tokens = input_estimate.saturating_add(output);
    // The id, provider and model only go to Redis: a call on a spare hold never copies them.
    let mut rr = ReserveRequest {
        tenant: call.tenant.clone(),
        feature: call.feature.clone(),
        session: call.session.clone(),
        request_id: String::new(),
        provider: String::new(),
        model: None,
        amount,
        ttl: Duration::from_secs(app.cfg.reserve_ttl_secs),
        caps: app
            .budgets
            .cache
            .caps(
                &call.tenant,
                call.feature.as_deref(),
                call.session.as_deref(),
            )
            .await?,
        at: call.started_at,
        rates,
        tokens,
    };
    let (hold, lease) = match app.budgets.leases.take(&rr) {
        // The call holds its own worst case, as if it had reserved it: a call billed at its
        // reservation (no usage record) pays that, not the larger spare hold around it.
        Some(l) => (Hold::Reserved(rr.amount), Some(l.id)),
        None => {
            rr.request_id.clone_from(&call.request_id);
            rr.provider.clone_from(&call.provider);
            rr.model = Some(call.model.clone());
            (app.budgets.reserve(&rr, &app.metrics).await?, None)
        }
    };
    let scopes = rr
        .rates
        .iter()
        .filter(|r| r.tpm > 0)
        .map(|r| r.scope.clone())
        .collect();
    Ok(Decision {
        hold,
        input_estimate,
        token_rates: (scopes, tokens),
        lease,
    })
}

async fn check_loops(app: &App, adm: &Admission<'_>, call: &Call) -> Result<(), ProxyError> {
    let Some(session) = &call.session else {
        return Ok(());
    };
    match app.loops.check(&call.tenant, session, &adm.body).await {
        Ok(Some(msg)) => Err(ProxyError::LoopDetected(msg)),
        Ok(None) => Ok(()),
        Err(e) if app.cfg.on_redis_unavailable == OnRedisUnavailable::Allow && e.is_transient() => {
            tracing::warn!(error = %e, "loop counters unavailable; admitting");
            Ok(())
        }
        Err(e) => Err(ProxyError::LedgerUnavailable(e)),
    }
}

/// The worst case: the input estimate (plus `input_estimate_margin_pct` unless the tokenizer is
/// exact for the model) and the output, priced by the ledger's policy (which raises the input to
/// the model's context for unseen context, prices cache writes, and multiplies a default output
/// limit by the choices). Returns (input tokens, output tokens, amount).
fn worst_case(app: &App, info: &RequestInfo, model: &str) -> Result<(u64, u64, Nanos), ProxyError> {
    let margin = if info.input_estimate_exact {
        0
    } else {
        app.cfg.input_estimate_margin_pct
    };
    let shape = CallShape {
        input_tokens: info
            .input_tokens_estimate
            .saturating_mul(100 + margin)
            .div_ceil(100),
        declared_output: info.max_output_tokens,
        choices: info.choices,
        unseen_context: info.unseen_context,
        cache_writes: info.cache_writes,
    };
    let w = app
        .pricing
        .worst_case(model, &shape)
        .map_err(|u| ProxyError::UnknownModel { model: u.model })?;
    Ok((shape.input_tokens, w.output_tokens, w.amount))
}
