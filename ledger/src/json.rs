//! A JSON tree whose strings borrow from the text it was parsed from: the same tree a
//! `serde_json::Value` is (objects sorted by member name, the last of repeated names kept, the
//! same numbers), without a `String` per member name and per text, nor a B-tree node per
//! object. The enforcer parses every request before forwarding it and every response's usage
//! after, and building `Value`s (a four-message chat: ~25 allocations) cost it more than the
//! walks that read them.
//!
//! A test parses generated JSON both ways and compares the trees and their serialisations
//! (`the_tree_is_serde_jsons_value`); the request and usage code only swapped their types.

use std::borrow::Cow;
use std::fmt;

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::ser::{Serialize, SerializeMap, SerializeSeq, Serializer};
use serde_json::Number;

use crate::usage::sparse::Key;

/// A JSON value, its strings borrowed from the text unless they had escapes.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Json<'a> {
    Null,
    Bool(bool),
    Number(Number),
    String(Cow<'a, str>),
    Array(Vec<Json<'a>>),
    Object(Object<'a>),
}

/// A JSON object: its members sorted by name, each name once (the last of repeated names
/// wins), as in a `serde_json::Map`.
#[derive(Debug, Clone, PartialEq, Default)]
pub(crate) struct Object<'a> {
    members: Vec<(Cow<'a, str>, Json<'a>)>,
}

/// `null`, for lookups that default to it.
pub(crate) const NULL: &Json<'static> = &Json::Null;

impl<'a> Object<'a> {
    /// The members as parsed, in any order, repeated names allowed.
    pub(crate) fn from_members(mut members: Vec<(Cow<'a, str>, Json<'a>)>) -> Object<'a> {
        // A stable sort keeps repeated names in their order; of each run the last is kept.
        members.sort_by(|a, b| a.0.cmp(&b.0));
        members.dedup_by(|later, kept| {
            if later.0 == kept.0 {
                std::mem::swap(&mut later.1, &mut kept.1);
                true
            } else {
                false
            }
        });
        Object { members }
    }

    /// The member named `key`.
    pub(crate) fn get(&self, key: &str) -> Option<&Json<'a>> {
        self.members
            .binary_search_by(|(k, _)| k.as_ref().cmp(key))
            .ok()
            .map(|i| &self.members[i].1)
    }

    /// Whether a member is named `key` (whatever its value).
    pub(crate) fn contains_key(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// The values in member-name order.
    pub(crate) fn values(&self) -> impl Iterator<Item = &Json<'a>> {
        self.members.iter().map(|(_, v)| v)
    }

    /// The members in name order.
    #[cfg(test)]
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&str, &Json<'a>)> {
        self.members.iter().map(|(k, v)| (k.as_ref(), v))
    }
}

impl<'a> Json<'a> {
    /// `text` as JSON (the same errors as `serde_json::from_slice`).
    pub(crate) fn parse(text: &'a [u8]) -> Result<Json<'a>, serde_json::Error> {
        serde_json::from_slice(text)
    }

    /// [`Json::parse`] of text already known to be UTF-8 (an SSE event's data): serde's string
    /// reader then skips validating every member name and string again.
    pub(crate) fn parse_str(text: &'a str) -> Result<Json<'a>, serde_json::Error> {
        serde_json::from_str(text)
    }

    /// The member `key` of an object; `None` for anything else.
    pub(crate) fn get(&self, key: &str) -> Option<&Json<'a>> {
        match self {
            Json::Object(o) => o.get(key),
            _ => None,
        }
    }

    pub(crate) fn as_str(&self) -> Option<&str> {
        match self {
            Json::String(s) => Some(s),
            _ => None,
        }
    }

    pub(crate) fn as_array(&self) -> Option<&Vec<Json<'a>>> {
        match self {
            Json::Array(a) => Some(a),
            _ => None,
        }
    }

    pub(crate) fn as_object(&self) -> Option<&Object<'a>> {
        match self {
            Json::Object(o) => Some(o),
            _ => None,
        }
    }

    pub(crate) fn is_null(&self) -> bool {
        matches!(self, Json::Null)
    }

    pub(crate) fn is_number(&self) -> bool {
        matches!(self, Json::Number(_))
    }

    pub(crate) fn is_string(&self) -> bool {
        matches!(self, Json::String(_))
    }

    pub(crate) fn is_object(&self) -> bool {
        matches!(self, Json::Object(_))
    }

    /// What the value is, for error messages (never the value itself: it may hold prompt text).
    pub(crate) fn type_name(&self) -> &'static str {
        match self {
            Json::Null => "null",
            Json::Bool(_) => "a boolean",
            Json::Number(_) => "a number",
            Json::String(_) => "a string",
            Json::Array(_) => "an array",
            Json::Object(_) => "an object",
        }
    }

    /// The value as `serde_json::Value`, for tests that compare the two.
    #[cfg(test)]
    pub(crate) fn to_value(&self) -> serde_json::Value {
        use serde_json::Value;
        match self {
            Json::Null => Value::Null,
            Json::Bool(b) => Value::Bool(*b),
            Json::Number(n) => Value::Number(n.clone()),
            Json::String(s) => Value::String(s.to_string()),
            Json::Array(a) => Value::Array(a.iter().map(Json::to_value).collect()),
            Json::Object(o) => Value::Object(
                o.iter()
                    .map(|(k, v)| (k.to_owned(), v.to_value()))
                    .collect(),
            ),
        }
    }
}

/// Compact JSON, as `serde_json::Value`'s `Display` writes it (members in name order), straight
/// into the formatter (the estimate counts every tool schema's text: no second copy of it).
impl fmt::Display for Json<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        /// serde_json writes whole UTF-8 pieces (it cuts strings only at escapes).
        struct Out<'a, 'b>(&'a mut fmt::Formatter<'b>);
        impl std::io::Write for Out<'_, '_> {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                let text = std::str::from_utf8(buf).map_err(std::io::Error::other)?;
                self.0.write_str(text).map_err(std::io::Error::other)?;
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        serde_json::to_writer(Out(f), self).map_err(|_| fmt::Error)
    }
}

impl Serialize for Json<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Json::Null => s.serialize_unit(),
            Json::Bool(b) => s.serialize_bool(*b),
            Json::Number(n) => n.serialize(s),
            Json::String(t) => s.serialize_str(t),
            Json::Array(items) => {
                let mut seq = s.serialize_seq(Some(items.len()))?;
                for item in items {
                    seq.serialize_element(item)?;
                }
                seq.end()
            }
            Json::Object(o) => {
                let mut map = s.serialize_map(Some(o.members.len()))?;
                for (k, v) in &o.members {
                    map.serialize_entry(k.as_ref(), v)?;
                }
                map.end()
            }
        }
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Json<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(JsonVisitor)
    }
}

/// Builds a [`Json`] as serde_json's own visitor builds a `Value`.
struct JsonVisitor;

impl<'de> Visitor<'de> for JsonVisitor {
    type Value = Json<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any valid JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Json<'de>, E> {
        Ok(Json::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Json<'de>, E> {
        Ok(Json::Number(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Json<'de>, E> {
        Ok(Json::Number(v.into()))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Json<'de>, E> {
        Ok(Number::from_f64(v).map_or(Json::Null, Json::Number))
    }

    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Json<'de>, E> {
        Ok(Json::String(Cow::Borrowed(v)))
    }

    fn visit_str<E>(self, v: &str) -> Result<Json<'de>, E> {
        Ok(Json::String(Cow::Owned(v.to_owned())))
    }

    fn visit_string<E>(self, v: String) -> Result<Json<'de>, E> {
        Ok(Json::String(Cow::Owned(v)))
    }

    fn visit_none<E>(self) -> Result<Json<'de>, E> {
        Ok(Json::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Json<'de>, D::Error> {
        d.deserialize_any(JsonVisitor)
    }

    fn visit_unit<E>(self) -> Result<Json<'de>, E> {
        Ok(Json::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Json<'de>, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<Json<'de>>()? {
            items.push(item);
        }
        Ok(Json::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Json<'de>, A::Error> {
        let mut members = Vec::new();
        while let Some(Key(k)) = map.next_key::<Key<'de>>()? {
            members.push((k, map.next_value::<Json<'de>>()?));
        }
        Ok(Json::Object(Object::from_members(members)))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::Value;

    use super::*;

    /// JSON text with repeated member names, escapes, nesting, every kind of number.
    fn json_text() -> impl Strategy<Value = String> {
        let name = prop_oneof![
            Just("a".to_owned()),
            Just("b".to_owned()),
            Just("type".to_owned()),
            Just("\\u0061".to_owned()),
            "[a-z_\\\\\"é]{0,6}".prop_map(|s| s.replace('\\', "\\\\").replace('"', "\\\"")),
        ];
        let leaf = prop_oneof![
            Just("null".to_owned()),
            Just("true".to_owned()),
            Just("false".to_owned()),
            any::<i64>().prop_map(|n| n.to_string()),
            any::<u64>().prop_map(|n| n.to_string()),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(|f| format!("{f:e}")),
            Just("1.0".to_owned()),
            Just("-0".to_owned()),
            Just("1e400".to_owned()),
            "[ -~é\\n\\t]{0,12}".prop_map(|s| serde_json::to_string(&s).expect("string")),
            Just("\"tab\\there \\ud83d\\ude00\"".to_owned()),
        ];
        leaf.prop_recursive(5, 64, 6, move |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6)
                    .prop_map(|items| format!("[{}]", items.join(", "))),
                prop::collection::vec((name.clone(), inner), 0..6).prop_map(|members| {
                    let m: Vec<String> = members
                        .iter()
                        .map(|(k, v)| format!("\"{k}\": {v}"))
                        .collect();
                    format!("{{{}}}", m.join(","))
                }),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Any JSON text parses to the tree `serde_json::Value` builds, serialises to the same
        /// text, and is refused with the same error when it is not JSON.
        #[test]
        fn the_tree_is_serde_jsons_value(text in json_text(), cut in 0usize..40) {
            let whole = text.as_bytes();
            for t in [whole, &whole[..whole.len().saturating_sub(cut)]] {
                let ours = Json::parse(t);
                let theirs = serde_json::from_slice::<Value>(t);
                let t = String::from_utf8_lossy(t);
                match (ours, theirs) {
                    (Ok(ours), Ok(theirs)) => {
                        prop_assert_eq!(ours.to_value(), theirs.clone(), "{}", t);
                        prop_assert_eq!(ours.to_string(), theirs.to_string());
                    }
                    (Err(a), Err(b)) => prop_assert_eq!(a.to_string(), b.to_string()),
                    (a, b) => prop_assert!(false, "{t}: {a:?} vs {b:?}"),
                }
            }
        }
    }

    #[test]
    fn repeated_names_keep_the_last_and_lookups_find_every_member() {
        let j =
            Json::parse(br#"{"b":1,"a":2,"b":3,"c":{"x":[1,{"y":null}]},"a":4}"#).expect("json");
        let o = j.as_object().expect("object");
        assert_eq!(o.get("a"), Some(&Json::Number(4.into())));
        assert_eq!(o.get("b"), Some(&Json::Number(3.into())));
        assert!(o.contains_key("c") && !o.contains_key("d"));
        assert_eq!(o.values().count(), 3);
        assert_eq!(j.to_string(), r#"{"a":4,"b":3,"c":{"x":[1,{"y":null}]}}"#);
    }

    #[test]
    fn texts_without_escapes_are_borrowed() {
        let body = br#"{"messages":[{"content":"plain"},{"content":"esc\"aped"}]}"#;
        let j = Json::parse(body).expect("json");
        let m = j
            .get("messages")
            .and_then(Json::as_array)
            .expect("messages");
        assert!(matches!(
            m[0].get("content"),
            Some(Json::String(Cow::Borrowed("plain")))
        ));
        assert!(matches!(
            m[1].get("content"),
            Some(Json::String(Cow::Owned(s))) if s == "esc\"aped"
        ));
    }
}
