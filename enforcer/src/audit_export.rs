//! Audit export (docs/audit.md): `enforcer audit --since --until [--tenant] [--path] --format
//! jsonl|csv` streams the records of a time range in time order to stdout with bounded memory
//! (the ledger's reader holds at most a few thousand records at once), and `GET /audit` on the
//! admin API pages through the same records with a cursor.

use std::io::Write;

use chrono::{DateTime, NaiveDate, Utc};
use http::StatusCode;
use ledger::Ledger;
use ledger::store::{AUDIT_COLUMNS, AuditCursor, AuditQuery};
use serde_json::json;

/// Records per `GET /audit` page by default, and at most.
pub const PAGE_DEFAULT: usize = 1000;
/// The largest `limit` a page may ask for.
pub const PAGE_MAX: usize = 10_000;

/// Output format of the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// One JSON object per line.
    Jsonl,
    /// RFC 4180 CSV with a header row of [`AUDIT_COLUMNS`].
    Csv,
}

/// A time bound: RFC 3339 (`2026-12-04T10:00:00Z`), a UTC day (`2026-12-04`, its midnight) or
/// unix milliseconds.
///
/// # Errors
/// A message naming the accepted forms.
pub fn parse_time(s: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    if let Ok(d) = NaiveDate::parse_from_str(s, "%Y-%m-%d")
        && let Some(t) = d.and_hms_opt(0, 0, 0)
    {
        return Ok(t.and_utc());
    }
    if let Ok(ms) = s.parse::<i64>()
        && let Some(t) = DateTime::from_timestamp_millis(ms)
    {
        return Ok(t);
    }
    Err(format!(
        "{s:?} is not a time: give RFC 3339 (2026-12-04T10:00:00Z), a UTC day (2026-12-04) or unix ms"
    ))
}

/// Checks `path` (`enforcer`, `observer`, `unmetered`).
///
/// # Errors
/// A message naming the accepted values.
pub fn check_path(p: &str) -> Result<(), String> {
    match p {
        "enforcer" | "observer" | "unmetered" => Ok(()),
        _ => Err(format!("path {p:?}: give enforcer, observer or unmetered")),
    }
}

/// One CSV field, quoted when it holds a comma, a quote or a line break (RFC 4180). Twelve lines
/// instead of a dependency: the values are plain text without binary data.
fn csv_field(out: &mut String, v: &str) {
    if v.contains([',', '"', '\n', '\r']) {
        out.push('"');
        out.push_str(&v.replace('"', "\"\""));
        out.push('"');
    } else {
        out.push_str(v);
    }
}

fn csv_line(values: impl IntoIterator<Item = impl AsRef<str>>) -> String {
    let mut line = String::new();
    for (i, v) in values.into_iter().enumerate() {
        if i > 0 {
            line.push(',');
        }
        csv_field(&mut line, v.as_ref());
    }
    line.push_str("\r\n");
    line
}

/// Why an export stopped.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// Reading the records (Redis, or a bad query).
    #[error("reading the audit trail: {0}")]
    Ledger(#[from] ledger::Error),
    /// Writing the output.
    #[error("writing the export: {0}")]
    Io(#[from] std::io::Error),
    /// Encoding a record.
    #[error("encoding a record: {0}")]
    Json(#[from] serde_json::Error),
}

/// Writes every record of `q` to `out` in time order; returns how many.
///
/// # Errors
/// Redis or write failures.
pub async fn export(
    ledger: &Ledger,
    q: AuditQuery,
    format: Format,
    out: &mut impl Write,
) -> Result<u64, ExportError> {
    let mut reader = ledger.audit_reader(q)?;
    if format == Format::Csv {
        out.write_all(csv_line(AUDIT_COLUMNS).as_bytes())?;
    }
    let mut n = 0u64;
    while let Some(rec) = reader.next().await? {
        match format {
            Format::Jsonl => {
                serde_json::to_writer(&mut *out, &rec)?;
                out.write_all(b"\n")?;
            }
            Format::Csv => out.write_all(csv_line(rec.csv_row()).as_bytes())?,
        }
        n += 1;
    }
    out.flush()?;
    Ok(n)
}

/// A query string's value of `name`, percent-decoded (`+` is a space).
fn param(q: Option<&str>, name: &str) -> Option<String> {
    let raw = q?
        .split('&')
        .find_map(|kv| kv.strip_prefix(name).and_then(|r| r.strip_prefix('=')))?;
    let b = raw.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                if i + 2 >= b.len() {
                    return None;
                }
                match u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).ok()?, 16) {
                    Ok(v) => out.push(v),
                    Err(_) => return None,
                }
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok().filter(|v| !v.is_empty())
}

/// `GET /audit?since=&until=[&tenant=][&path=][&cursor=][&limit=]`: one page of records and the
/// cursor of the next (`null` at the end). Returns the status and the JSON body.
pub async fn page(ledger: &Ledger, q: Option<&str>) -> (StatusCode, serde_json::Value) {
    let bad = |m: String| {
        (
            StatusCode::BAD_REQUEST,
            json!({"error": {"message": m, "code": 400}}),
        )
    };
    let time = |name: &str| -> Result<DateTime<Utc>, String> {
        let v = param(q, name).ok_or_else(|| format!("{name} is required"))?;
        parse_time(&v).map_err(|e| format!("{name}: {e}"))
    };
    let (since, until) = match (time("since"), time("until")) {
        (Ok(s), Ok(u)) => (s, u),
        (Err(e), _) | (_, Err(e)) => return bad(e),
    };
    let path = param(q, "path");
    if let Some(p) = &path
        && let Err(e) = check_path(p)
    {
        return bad(e);
    }
    let limit = match param(q, "limit").map(|l| l.parse::<usize>()) {
        None => PAGE_DEFAULT,
        Some(Ok(l)) if (1..=PAGE_MAX).contains(&l) => l,
        Some(_) => return bad(format!("limit: give 1..={PAGE_MAX}")),
    };
    let cursor = match param(q, "cursor").map(|c| AuditCursor::parse(&c)) {
        None => None,
        Some(Ok(c)) => Some(c),
        Some(Err(e)) => return bad(e.to_string()),
    };
    let query = AuditQuery {
        since,
        until,
        tenant: param(q, "tenant"),
        path,
    };
    match ledger.audit_page(query, cursor, limit).await {
        Ok((records, next)) => (
            StatusCode::OK,
            json!({
                "records": records,
                "next_cursor": next.map(|c| c.to_string()),
            }),
        ),
        Err(ledger::Error::Invalid { what, detail }) => bad(format!("{what}: {detail}")),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"error": {"message": e.to_string(), "code": 503}}),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times() {
        let t = parse_time("2026-12-04T10:00:00Z").unwrap();
        assert_eq!(t.timestamp(), 1_796_378_400);
        assert_eq!(parse_time("2026-12-04").unwrap().timestamp(), 1_796_342_400);
        assert_eq!(parse_time("1796378400000").unwrap(), t);
        assert!(parse_time("yesterday").is_err());
    }

    #[test]
    fn params_are_decoded() {
        let q = Some("since=2026-12-04T10%3A00%3A00Z&tenant=acme&x=");
        assert_eq!(param(q, "since").as_deref(), Some("2026-12-04T10:00:00Z"));
        assert_eq!(param(q, "tenant").as_deref(), Some("acme"));
        assert_eq!(param(q, "x"), None);
        assert_eq!(param(Some("a=%2"), "a"), None);
    }

    #[test]
    fn csv_quotes_what_needs_it() {
        assert_eq!(
            csv_line(["a", "b,c", "d\"e", ""]),
            "a,\"b,c\",\"d\"\"e\",\r\n"
        );
    }
}
