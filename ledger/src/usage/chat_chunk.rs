//! A chat/completions stream chunk read only as far as metering needs: the model, the usage
//! members, and the texts of each choice, borrowed from the event's data wherever they have no
//! escapes. The sparse parse it replaces built every choice into a `serde_json::Value` tree
//! (a map, its key strings and the text per choice, every event): most of the stream meter's
//! time per event.
//!
//! It reads what [`super::openai::on_chat_chunk`] reads from a whole tree, with the same rules:
//! a member of the wrong type counts as absent, and the last of repeated names wins. A test
//! meters generated streams both ways and compares (`tests/sparse.rs`).

use std::borrow::Cow;
use std::marker::PhantomData;

use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::sparse::Key;
use super::stream::StreamState;
use crate::json::Json;

/// The members of a chat chunk that metering reads.
#[derive(Default)]
pub(super) struct Chunk<'a> {
    model: Text<'a>,
    usage: Option<Json<'a>>,
    x_groq: Option<Json<'a>>,
    choices: Choices<'a>,
}

/// `data` as a chat chunk: `Ok(None)` when it is JSON but not an object.
///
/// # Errors
/// When `data` is not JSON (the same errors as a whole parse).
pub(super) fn parse(data: &[u8]) -> Result<Option<Chunk<'_>>, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_slice(data);
    let chunk = (&mut de).deserialize_any(LeanVisitor::<Top<'_>>(PhantomData))?;
    de.end()?;
    Ok(chunk.0)
}

/// Applies a chunk as [`super::openai::on_chat_chunk`] applies its whole tree.
pub(super) fn apply(state: &mut StreamState, chunk: &Chunk<'_>) {
    if let Some(model) = &chunk.model.0 {
        state.set_model(model);
    }
    match super::openai::chat_usage_in(chunk.usage.as_ref(), chunk.x_groq.as_ref()) {
        Ok(Some(usage)) => state.set_record(usage, true),
        Ok(None) => {}
        Err(_) => state.errors += 1,
    }
    let Some(choices) = &chunk.choices.0 else {
        return;
    };
    for choice in choices {
        if let Some(text) = &choice.text.0 {
            state.push_text(text);
        }
        let Some(delta) = &choice.delta else {
            continue;
        };
        for texts in [
            &delta.content,
            &delta.reasoning_content,
            &delta.reasoning,
            &delta.refusal,
        ] {
            match texts {
                Texts::Absent => {}
                Texts::One(text) => state.push_text(text),
                Texts::Parts(parts) => parts.iter().for_each(|t| state.push_text(t)),
            }
        }
        for function in delta.tool_calls.0.iter().chain(&delta.function_call) {
            for text in [&function.name, &function.arguments] {
                if let Some(text) = &text.0 {
                    state.push_text(text);
                }
            }
        }
    }
}

/// A value read leniently: each JSON type it does not take reads as `Default` (and is still
/// checked for syntax), as `Value::as_str` and friends give `None` on a whole tree.
trait Lean<'de>: Default {
    fn from_str(_text: Cow<'de, str>) -> Self {
        Self::default()
    }

    fn from_map<A: MapAccess<'de>>(mut map: A) -> Result<Self, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Self::default())
    }

    fn from_seq<A: SeqAccess<'de>>(mut seq: A) -> Result<Self, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Self::default())
    }
}

/// Deserializes any JSON value into `T` through [`Lean`].
struct L<T>(T);

impl<'de, T: Lean<'de>> Deserialize<'de> for L<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(LeanVisitor(PhantomData)).map(L)
    }
}

struct LeanVisitor<T>(PhantomData<T>);

impl<'de, T: Lean<'de>> Visitor<'de> for LeanVisitor<T> {
    type Value = T;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<T, E> {
        Ok(T::default())
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<T, E> {
        Ok(T::default())
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<T, E> {
        Ok(T::default())
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<T, E> {
        Ok(T::default())
    }
    fn visit_unit<E: de::Error>(self) -> Result<T, E> {
        Ok(T::default())
    }
    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<T, E> {
        Ok(T::from_str(Cow::Borrowed(v)))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        Ok(T::from_str(Cow::Owned(v.to_owned())))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<T, E> {
        Ok(T::from_str(Cow::Owned(v)))
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
        T::from_map(map)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<T, A::Error> {
        T::from_seq(seq)
    }
}

/// The next member's value as a `T`.
fn next<'de, T: Lean<'de>, A: MapAccess<'de>>(map: &mut A) -> Result<T, A::Error> {
    Ok(map.next_value::<L<T>>()?.0)
}

/// Skips the next member's value.
fn skip<'de, A: MapAccess<'de>>(map: &mut A) -> Result<(), A::Error> {
    map.next_value::<IgnoredAny>().map(drop)
}

/// The top level: a chunk when it is an object.
#[derive(Default)]
struct Top<'a>(Option<Chunk<'a>>);

impl<'de> Lean<'de> for Top<'de> {
    fn from_map<A: MapAccess<'de>>(mut map: A) -> Result<Self, A::Error> {
        let mut c = Chunk::default();
        while let Some(Key(k)) = map.next_key::<Key<'de>>()? {
            match k.as_ref() {
                "model" => c.model = next(&mut map)?,
                "usage" => c.usage = Some(map.next_value::<Json<'de>>()?),
                "x_groq" => c.x_groq = Some(map.next_value::<Json<'de>>()?),
                "choices" => c.choices = next(&mut map)?,
                _ => skip(&mut map)?,
            }
        }
        Ok(Top(Some(c)))
    }
}

/// A string, else `None`.
#[derive(Default)]
struct Text<'a>(Option<Cow<'a, str>>);

impl<'de> Lean<'de> for Text<'de> {
    fn from_str(text: Cow<'de, str>) -> Self {
        Text(Some(text))
    }
}

/// `choices`: an array, else `None`.
#[derive(Default)]
struct Choices<'a>(Option<Vec<Choice<'a>>>);

impl<'de> Lean<'de> for Choices<'de> {
    fn from_seq<A: SeqAccess<'de>>(mut seq: A) -> Result<Self, A::Error> {
        let mut choices = Vec::new();
        while let Some(L(choice)) = seq.next_element::<L<Choice<'de>>>()? {
            choices.push(choice);
        }
        Ok(Choices(Some(choices)))
    }
}

/// One choice: its `text` (legacy completions) and its `delta`; anything but an object has
/// neither.
#[derive(Default)]
struct Choice<'a> {
    text: Text<'a>,
    /// Present as any value (a `delta` that is no object has no texts).
    delta: Option<Delta<'a>>,
}

impl<'de> Lean<'de> for Choice<'de> {
    fn from_map<A: MapAccess<'de>>(mut map: A) -> Result<Self, A::Error> {
        let mut c = Choice::default();
        while let Some(Key(k)) = map.next_key::<Key<'de>>()? {
            match k.as_ref() {
                "text" => c.text = next(&mut map)?,
                "delta" => c.delta = Some(next(&mut map)?),
                _ => skip(&mut map)?,
            }
        }
        Ok(c)
    }
}

/// The texts of a choice's delta.
#[derive(Default)]
struct Delta<'a> {
    content: Texts<'a>,
    reasoning_content: Texts<'a>,
    reasoning: Texts<'a>,
    refusal: Texts<'a>,
    tool_calls: Calls<'a>,
    /// Present as any value (one that is no object has no texts).
    function_call: Option<Function<'a>>,
}

impl<'de> Lean<'de> for Delta<'de> {
    fn from_map<A: MapAccess<'de>>(mut map: A) -> Result<Self, A::Error> {
        let mut d = Delta::default();
        while let Some(Key(k)) = map.next_key::<Key<'de>>()? {
            match k.as_ref() {
                "content" => d.content = next(&mut map)?,
                "reasoning_content" => d.reasoning_content = next(&mut map)?,
                "reasoning" => d.reasoning = next(&mut map)?,
                "refusal" => d.refusal = next(&mut map)?,
                "tool_calls" => d.tool_calls = next(&mut map)?,
                "function_call" => d.function_call = Some(next(&mut map)?),
                _ => skip(&mut map)?,
            }
        }
        Ok(d)
    }
}

/// A content member: a string, or (some compatible servers) an array of parts whose `text`
/// strings count.
#[derive(Default)]
enum Texts<'a> {
    #[default]
    Absent,
    One(Cow<'a, str>),
    Parts(Vec<Cow<'a, str>>),
}

impl<'de> Lean<'de> for Texts<'de> {
    fn from_str(text: Cow<'de, str>) -> Self {
        Texts::One(text)
    }

    fn from_seq<A: SeqAccess<'de>>(mut seq: A) -> Result<Self, A::Error> {
        let mut parts = Vec::new();
        while let Some(L(part)) = seq.next_element::<L<Part<'de>>>()? {
            parts.extend(part.0.0);
        }
        Ok(Texts::Parts(parts))
    }
}

/// A content part: its `text` string.
#[derive(Default)]
struct Part<'a>(Text<'a>);

impl<'de> Lean<'de> for Part<'de> {
    fn from_map<A: MapAccess<'de>>(mut map: A) -> Result<Self, A::Error> {
        let mut text = Text::default();
        while let Some(Key(k)) = map.next_key::<Key<'de>>()? {
            match k.as_ref() {
                "text" => text = next(&mut map)?,
                _ => skip(&mut map)?,
            }
        }
        Ok(Part(text))
    }
}

/// `tool_calls`: the `function` of each call that has one.
#[derive(Default)]
struct Calls<'a>(Vec<Function<'a>>);

impl<'de> Lean<'de> for Calls<'de> {
    fn from_seq<A: SeqAccess<'de>>(mut seq: A) -> Result<Self, A::Error> {
        let mut functions = Vec::new();
        while let Some(L(call)) = seq.next_element::<L<Call<'de>>>()? {
            functions.extend(call.0);
        }
        Ok(Calls(functions))
    }
}

/// One tool call: its `function`, present as any value.
#[derive(Default)]
struct Call<'a>(Option<Function<'a>>);

impl<'de> Lean<'de> for Call<'de> {
    fn from_map<A: MapAccess<'de>>(mut map: A) -> Result<Self, A::Error> {
        let mut function = None;
        while let Some(Key(k)) = map.next_key::<Key<'de>>()? {
            match k.as_ref() {
                "function" => function = Some(next(&mut map)?),
                _ => skip(&mut map)?,
            }
        }
        Ok(Call(function))
    }
}

/// A function call's `name` and `arguments` strings.
#[derive(Default)]
struct Function<'a> {
    name: Text<'a>,
    arguments: Text<'a>,
}

impl<'de> Lean<'de> for Function<'de> {
    fn from_map<A: MapAccess<'de>>(mut map: A) -> Result<Self, A::Error> {
        let mut f = Function::default();
        while let Some(Key(k)) = map.next_key::<Key<'de>>()? {
            match k.as_ref() {
                "name" => f.name = next(&mut map)?,
                "arguments" => f.arguments = next(&mut map)?,
                _ => skip(&mut map)?,
            }
        }
        Ok(f)
    }
}
