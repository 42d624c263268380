//! The admin API's runtime keys: `POST /keys` (create; the secret is in the reply, once),
//! `GET /keys`, `GET /keys/{id}`, `DELETE /keys/{id}` (revoke), `POST /keys/{id}/rotate`
//! (`{"grace_secs": N}`: the old secret keeps working for N seconds, default 3600). The records
//! live in Redis (the ledger's `llmw:apikeys`); this replica reloads at once, the others within
//! `runtime_keys_refresh_ms`.

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use ledger::store::{ApiKey, NewApiKey};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::admin::{err, json_resp};
use crate::{App, ProxyBody};

/// The default grace of a rotation: the old secret keeps working this long.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(3600);

/// A key as the admin API and CLI show it: never a secret, and of its hash a prefix only.
#[must_use]
pub fn key_json(k: &ApiKey) -> Value {
    let now = chrono::Utc::now();
    json!({
        "id": k.id,
        "status": k.status(now),
        "sha256_prefix": &k.sha256[..k.sha256.len().min(12)],
        "tenant": k.tenant,
        "allowed_tenants": k.allowed_tenants,
        "features": k.features,
        "allowed_models": k.allowed_models,
        "allowed_providers": k.allowed_providers,
        "rpm": k.rpm,
        "tpm": k.tpm,
        "metadata": k.metadata,
        "created_at": k.created_at,
        "expires_at": k.expires_at,
        "revoked_at": k.revoked_at,
        "previous_valid_until": k.previous.as_ref().map(|p| p.valid_until),
    })
}

/// What the enforcer checks beyond the ledger's rules: each model glob compiles.
///
/// # Errors
/// A message naming the bad glob.
pub fn check_globs(k: &NewApiKey) -> Result<(), String> {
    for m in &k.allowed_models {
        globset::Glob::new(m).map_err(|e| format!("allowed_models: {m:?} is not a glob: {e}"))?;
    }
    Ok(())
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RotateIn {
    #[serde(default)]
    grace_secs: Option<u64>,
}

async fn body(req: Request<Incoming>) -> Result<Bytes, Response<ProxyBody>> {
    Limited::new(req.into_body(), 64 << 10)
        .collect()
        .await
        .map(http_body_util::Collected::to_bytes)
        .map_err(|e| err(StatusCode::BAD_REQUEST, format!("cannot read body: {e}")))
}

fn ledger_err(e: &ledger::Error) -> Response<ProxyBody> {
    let st = if e.is_transient() {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::BAD_REQUEST
    };
    err(st, e)
}

/// Reloads this replica's cache so the change works here at once.
async fn reload(app: &App) {
    if let Some(rk) = &app.runtime_keys
        && let Err(e) = rk.refresh(true).await
    {
        tracing::warn!(error = %e, "runtime keys changed but could not be reloaded here yet");
    }
}

/// Serves `/keys` and `/keys/...` (the admin token was checked).
pub async fn handle(app: &App, req: Request<Incoming>, path: &str) -> Response<ProxyBody> {
    if app.runtime_keys.is_none() {
        return err(
            StatusCode::NOT_FOUND,
            "runtime keys are off (runtime_keys = false in the config)",
        );
    }
    let rest = path.strip_prefix("/keys").unwrap_or_default();
    let method = req.method().clone();
    let now = chrono::Utc::now();
    match (method, rest) {
        (Method::GET, "" | "/") => match app.ledger.api_keys().await {
            Ok(s) => json_resp(
                StatusCode::OK,
                &json!({"keys": s.keys.iter().map(key_json).collect::<Vec<_>>(),
                        "broken": s.broken.iter().map(|(f, why)| json!({"id": f, "problem": why})).collect::<Vec<_>>()}),
            ),
            Err(e) => ledger_err(&e),
        },
        (Method::POST, "" | "/") => {
            let b = match body(req).await {
                Ok(b) => b,
                Err(r) => return r,
            };
            let spec: NewApiKey = match serde_json::from_slice(&b) {
                Ok(s) => s,
                Err(e) => return err(StatusCode::BAD_REQUEST, format!("key: {e}")),
            };
            if let Err(e) = check_globs(&spec) {
                return err(StatusCode::BAD_REQUEST, e);
            }
            match app.ledger.create_api_key(spec, now).await {
                Ok((k, secret)) => {
                    reload(app).await;
                    tracing::info!(id = %k.id, tenant = %k.tenant, "runtime key created");
                    json_resp(
                        StatusCode::CREATED,
                        &json!({"key": key_json(&k), "secret": secret,
                                "note": "the secret is shown once; only its sha256 is stored"}),
                    )
                }
                Err(e) => ledger_err(&e),
            }
        }
        (m, id) => one_key(app, req, m, id.trim_start_matches('/'), now).await,
    }
}

async fn one_key(
    app: &App,
    req: Request<Incoming>,
    method: Method,
    tail: &str,
    now: chrono::DateTime<chrono::Utc>,
) -> Response<ProxyBody> {
    let (id, action) = tail.split_once('/').unwrap_or((tail, ""));
    let missing = || err(StatusCode::NOT_FOUND, format!("no key {id}"));
    match (method, action) {
        (Method::GET, "") => match app.ledger.api_key(id).await {
            Ok(Some(k)) => json_resp(StatusCode::OK, &key_json(&k)),
            Ok(None) => missing(),
            Err(e) => ledger_err(&e),
        },
        (Method::DELETE, "") => match app.ledger.revoke_api_key(id, now).await {
            Ok(Some(k)) => {
                reload(app).await;
                tracing::info!(id = %k.id, "runtime key revoked");
                json_resp(StatusCode::OK, &json!({"revoked": key_json(&k)}))
            }
            Ok(None) => missing(),
            Err(e) => ledger_err(&e),
        },
        (Method::POST, "rotate") => {
            let b = match body(req).await {
                Ok(b) => b,
                Err(r) => return r,
            };
            let r: RotateIn = if b.trim_ascii().is_empty() {
                RotateIn::default()
            } else {
                match serde_json::from_slice(&b) {
                    Ok(r) => r,
                    Err(e) => return err(StatusCode::BAD_REQUEST, format!("rotate: {e}")),
                }
            };
            let grace = r.grace_secs.map_or(DEFAULT_GRACE, Duration::from_secs);
            match app.ledger.rotate_api_key(id, grace, now).await {
                Ok(Some((k, secret))) => {
                    reload(app).await;
                    tracing::info!(id = %k.id, grace_secs = grace.as_secs(), "runtime key rotated");
                    json_resp(
                        StatusCode::OK,
                        &json!({"key": key_json(&k), "secret": secret,
                                "note": "the secret is shown once; the old one works until previous_valid_until"}),
                    )
                }
                Ok(None) => missing(),
                Err(e) => ledger_err(&e),
            }
        }
        _ => err(
            StatusCode::NOT_FOUND,
            "keys routes: GET/POST /keys, GET/DELETE /keys/{id}, POST /keys/{id}/rotate",
        ),
    }
}

/// `enforcer keys ...`: the same operations from a shell, straight on Redis (running enforcers
/// pick the change up within `runtime_keys_refresh_ms`).
#[derive(Debug, clap::Subcommand)]
pub enum KeysCmd {
    /// Make a key; prints its record and its secret (shown once) as JSON.
    Create {
        /// The tenant billed when a call names none.
        #[arg(long)]
        tenant: String,
        /// Another tenant it may name in X-Tenant-ID (`*`: any); repeat for several.
        #[arg(long = "allowed-tenant")]
        allowed_tenants: Vec<String>,
        /// A feature it may bill (the first is the default); repeat for several.
        #[arg(long = "feature")]
        features: Vec<String>,
        /// A model glob it may call (`gpt-4o*`); repeat for several. None: any.
        #[arg(long = "model")]
        models: Vec<String>,
        /// A provider route it may use; repeat for several. None: any.
        #[arg(long = "provider")]
        providers: Vec<String>,
        /// A label, `name=value`; repeat for several.
        #[arg(long = "meta")]
        metadata: Vec<String>,
        /// Requests per minute through it, per tenant (0: none).
        #[arg(long, default_value_t = 0)]
        rpm: u64,
        /// Tokens per minute through it, per tenant (0: none).
        #[arg(long, default_value_t = 0)]
        tpm: u64,
        /// It stops working after this many seconds.
        #[arg(long)]
        expires_in_secs: Option<u64>,
    },
    /// Every key (one line each, or `--json`).
    List {
        /// One JSON object instead of lines.
        #[arg(long)]
        json: bool,
    },
    /// One key as JSON.
    Get {
        /// Its id (`k_...`).
        id: String,
    },
    /// Revoke a key (kept for audit; refused by every enforcer within the refresh interval).
    Revoke {
        /// Its id.
        id: String,
    },
    /// Give a key a new secret (printed once); the old one works for the grace period.
    Rotate {
        /// Its id.
        id: String,
        /// Seconds the old secret keeps working.
        #[arg(long, default_value_t = DEFAULT_GRACE.as_secs())]
        grace_secs: u64,
    },
}

/// Runs one `enforcer keys` command against `ledger`, printing to stdout.
///
/// # Errors
/// A bad argument, an unknown key, or Redis unavailable.
pub async fn run_cli(ledger: &ledger::store::Ledger, cmd: KeysCmd) -> anyhow::Result<()> {
    let now = chrono::Utc::now();
    let missing = |id: &str| anyhow::anyhow!("no key {id}");
    match cmd {
        KeysCmd::Create {
            tenant,
            allowed_tenants,
            features,
            models,
            providers,
            metadata,
            rpm,
            tpm,
            expires_in_secs,
        } => {
            let mut meta = std::collections::BTreeMap::new();
            for m in metadata {
                let (k, v) = m
                    .split_once('=')
                    .ok_or_else(|| anyhow::anyhow!("--meta {m:?}: write name=value"))?;
                meta.insert(k.to_owned(), v.to_owned());
            }
            let expires_at = match expires_in_secs {
                Some(s) => Some(
                    now + chrono::Duration::from_std(Duration::from_secs(s))
                        .map_err(|e| anyhow::anyhow!("--expires-in-secs: {e}"))?,
                ),
                None => None,
            };
            let spec = NewApiKey {
                tenant,
                allowed_tenants,
                features,
                allowed_models: models,
                allowed_providers: providers,
                rpm,
                tpm,
                metadata: meta,
                expires_at,
            };
            check_globs(&spec).map_err(anyhow::Error::msg)?;
            let (k, secret) = ledger.create_api_key(spec, now).await?;
            println!("{}", json!({"key": key_json(&k), "secret": secret}));
        }
        KeysCmd::List { json } => {
            let s = ledger.api_keys().await?;
            if json {
                println!(
                    "{}",
                    json!({"keys": s.keys.iter().map(key_json).collect::<Vec<_>>()})
                );
            } else {
                for k in &s.keys {
                    println!(
                        "{}  {:<8} tenant={} models={} expires={}",
                        k.id,
                        format!("{:?}", k.status(now)).to_lowercase(),
                        k.tenant,
                        if k.allowed_models.is_empty() {
                            "*".to_owned()
                        } else {
                            k.allowed_models.join(",")
                        },
                        k.expires_at.map_or("never".to_owned(), |t| t.to_rfc3339())
                    );
                }
            }
            for (field, why) in &s.broken {
                eprintln!("broken record {field}: {why}");
            }
        }
        KeysCmd::Get { id } => {
            let k = ledger.api_key(&id).await?.ok_or_else(|| missing(&id))?;
            println!("{}", key_json(&k));
        }
        KeysCmd::Revoke { id } => {
            let k = ledger
                .revoke_api_key(&id, now)
                .await?
                .ok_or_else(|| missing(&id))?;
            println!("{}", json!({"revoked": key_json(&k)}));
        }
        KeysCmd::Rotate { id, grace_secs } => {
            let (k, secret) = ledger
                .rotate_api_key(&id, Duration::from_secs(grace_secs), now)
                .await?
                .ok_or_else(|| missing(&id))?;
            println!("{}", json!({"key": key_json(&k), "secret": secret}));
        }
    }
    Ok(())
}
