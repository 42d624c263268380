//! A response body parsed only as far as usage extraction reads it. Building a whole answer into
//! a `serde_json::Value` allocates every string and array of it (the answer's text, an embeddings
//! answer's vectors: over 20 MiB of tree for 7 MiB of JSON) when the parsers of every API but
//! Gemini's read three top-level members. Here every other member is checked for syntax by
//! serde's `IgnoredAny` and dropped as it is read.

use std::borrow::Cow;
use std::marker::PhantomData;

use serde::Deserialize;
use serde_json::Value;

use crate::json::{Json, Object};

/// `body` as JSON where, if it is an object, only the members named in `keys` are built (the
/// last of repeated names wins, as in a [`Value`]); every other member is checked for syntax
/// but not built. Anything but an object comes back as [`Value::Null`], so callers still tell
/// "not an object" apart.
pub(crate) fn object(body: &[u8], keys: &[&str]) -> Result<Value, serde_json::Error> {
    Ok(match members::<Value>(body, keys)? {
        Some(kept) => Value::Object(kept.into_iter().map(|(k, v)| (k.into_owned(), v)).collect()),
        None => Value::Null,
    })
}

/// [`object`] as a [`Json`] tree, its texts borrowed from `body`.
pub(crate) fn object_json<'a>(
    body: &'a [u8],
    keys: &[&str],
) -> Result<Json<'a>, serde_json::Error> {
    Ok(match members::<Json<'a>>(body, keys)? {
        Some(kept) => Json::Object(Object::from_members(kept)),
        None => Json::Null,
    })
}

/// Members of an object in the order read, repeated names included.
type Members<'de, T> = Vec<(Cow<'de, str>, T)>;

/// The members of `body` named in `keys`; `None` when `body` is JSON but not an object.
fn members<'de, T: Deserialize<'de>>(
    body: &'de [u8],
    keys: &[&str],
) -> Result<Option<Members<'de, T>>, serde_json::Error> {
    use serde::Deserializer as _;
    let mut de = serde_json::Deserializer::from_slice(body);
    let kept = (&mut de).deserialize_any(SparseVisitor(keys, PhantomData))?;
    de.end()?;
    Ok(kept)
}

/// An object member's name, borrowed from the input unless it has escapes.
pub(crate) struct Key<'de>(pub(crate) std::borrow::Cow<'de, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a member name")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(std::borrow::Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(std::borrow::Cow::Owned(v.to_owned())))
            }
        }
        d.deserialize_str(V)
    }
}

/// Deserializes the members named in its keys (see [`members`]).
struct SparseVisitor<'k, T>(&'k [&'k str], PhantomData<T>);

impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for SparseVisitor<'_, T> {
    type Value = Option<Members<'de, T>>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut kept = Vec::new();
        while let Some(Key(k)) = map.next_key::<Key<'de>>()? {
            if self.0.contains(&k.as_ref()) {
                let v: T = map.next_value()?;
                kept.push((k, v));
            } else {
                map.next_value::<serde::de::IgnoredAny>()?;
            }
        }
        Ok(Some(kept))
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
        Ok(None)
    }

    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
}
