//! Reading a period hash back into [`TenantSpend`].

use std::collections::HashMap;

use super::TenantSpend;
use crate::Nanos;

/// Builds the figures from a period hash's fields (HGETALL). Unknown fields are ignored, so newer
/// writers can add fields without breaking older readers.
#[must_use]
pub fn from_hash(tenant: &str, period_id: &str, h: &HashMap<String, String>) -> TenantSpend {
    let int = |v: &str| v.parse::<i64>().unwrap_or(0);
    let count = |v: &str| u64::try_from(int(v).max(0)).unwrap_or(0);
    let mut t = TenantSpend {
        tenant: tenant.to_owned(),
        period_id: period_id.to_owned(),
        ..TenantSpend::default()
    };
    for (k, v) in h {
        match k.as_str() {
            "spend" => t.spend = Nanos(int(v)),
            "held" => t.held = Nanos(int(v).max(0)),
            "bypass" => t.bypass_spend = Nanos(int(v)),
            "estimated" => t.estimated_spend = Nanos(int(v)),
            "requests" => t.requests = count(v),
            "input_tokens" => t.input_tokens = count(v),
            "output_tokens" => t.output_tokens = count(v),
            "cache_read_tokens" => t.cache_read_tokens = count(v),
            "cache_write_tokens" => t.cache_write_tokens = count(v),
            "src:enforcer" => t.by_source.enforcer = Nanos(int(v)),
            "src:observer" => t.by_source.observer = Nanos(int(v)),
            _ => {
                if let Some(f) = k.strip_prefix("feature:") {
                    if let Some(name) = f.strip_suffix(":spend") {
                        t.by_feature.insert(name.to_owned(), Nanos(int(v)));
                    } else if let Some(name) = f.strip_suffix(":held")
                        && int(v) > 0
                    {
                        t.held_by_feature.insert(name.to_owned(), Nanos(int(v)));
                    }
                } else if let Some(m) = k.strip_prefix("model:") {
                    if let Some(name) = m.strip_suffix(":spend") {
                        t.by_model.insert(name.to_owned(), Nanos(int(v)));
                    } else if let Some(name) = m.strip_suffix(":requests") {
                        t.requests_by_model.insert(name.to_owned(), count(v));
                    }
                }
            }
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fields_including_names_with_colons() {
        let h: HashMap<String, String> = [
            ("spend", "30"),
            ("held", "-1"),
            ("requests", "2"),
            ("src:enforcer", "10"),
            ("src:observer", "20"),
            ("bypass", "20"),
            ("feature:bot:spend", "10"),
            ("feature:bot:held", "0"),
            ("feature:a:b:held", "5"),
            ("model:ft:gpt-4o:org:spend", "30"),
            ("model:ft:gpt-4o:org:requests", "2"),
            ("model:ft:gpt-4o:org:input_tokens", "9"),
            ("future_field", "1"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let t = from_hash("acme", "2026-11", &h);
        assert_eq!(t.spend, Nanos(30));
        assert_eq!(t.held, Nanos(0), "never negative");
        assert_eq!(t.by_source.observer, Nanos(20));
        assert_eq!(t.bypass_spend, Nanos(20));
        assert_eq!(t.by_feature.get("bot"), Some(&Nanos(10)));
        assert!(!t.held_by_feature.contains_key("bot"));
        assert_eq!(t.held_by_feature.get("a:b"), Some(&Nanos(5)));
        assert_eq!(t.by_model.get("ft:gpt-4o:org"), Some(&Nanos(30)));
        assert_eq!(t.requests_by_model.get("ft:gpt-4o:org"), Some(&2));
    }
}
