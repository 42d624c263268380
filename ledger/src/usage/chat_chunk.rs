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

use serde::de::{
    self, Deserialize, DeserializeSeed as _, Deserializer, IgnoredAny, MapAccess, SeqAccess,
    Visitor,
};

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
/// `data` is an SSE event's text, already checked to be UTF-8 by the event parser: serde's
/// string reader does not check each member name and string a second time (that check was a
/// fifth of the meter's time per event).
///
/// # Errors
/// When `data` is not JSON (the same errors as a whole parse).
pub(super) fn parse(data: &str) -> Result<Option<Chunk<'_>>, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_str(data);
    let mut top = Top::default();
    Fill(&mut top).deserialize(&mut de)?;
    de.end()?;
    Ok(top.0)
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

/// A value read leniently, in place: each JSON type it does not take leaves it at `Default`
/// (and is still checked for syntax), as `Value::as_str` and friends give `None` on a whole tree.
/// Filled where it lives (a member of its parent, the last element of its array) rather than
/// built and moved up through serde's return values: a choice with its delta is a few hundred
/// bytes, and those copies were a seventh of the meter's time per event.
trait Lean<'de>: Default {
    fn fill_str(&mut self, _text: Cow<'de, str>) {}

    fn fill_map<A: MapAccess<'de>>(&mut self, mut map: A) -> Result<(), A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(())
    }

    fn fill_seq<A: SeqAccess<'de>>(&mut self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(())
    }
}

/// Reads any JSON value into the `T` it points to, which must be at `Default`.
struct Fill<'t, T>(&'t mut T);

impl<'de, T: Lean<'de>> de::DeserializeSeed<'de> for Fill<'_, T> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de, T: Lean<'de>> Visitor<'de> for Fill<'_, T> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<(), E> {
        self.0.fill_str(Cow::Borrowed(v));
        Ok(())
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        self.0.fill_str(Cow::Owned(v.to_owned()));
        Ok(())
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<(), E> {
        self.0.fill_str(Cow::Owned(v));
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<(), A::Error> {
        self.0.fill_map(map)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<(), A::Error> {
        self.0.fill_seq(seq)
    }
}

/// Reads any JSON value into a new `T` (the small ones: a content part, a tool call).
struct L<T>(T);

impl<'de, T: Lean<'de>> Deserialize<'de> for L<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut t = T::default();
        Fill(&mut t).deserialize(d)?;
        Ok(L(t))
    }
}

/// The next member's value into `slot`, which it replaces (the last of repeated names wins).
fn next<'de, T: Lean<'de>, A: MapAccess<'de>>(map: &mut A, slot: &mut T) -> Result<(), A::Error> {
    *slot = T::default();
    map.next_value_seed(Fill(slot))
}

/// Skips the next member's value.
fn skip<'de, A: MapAccess<'de>>(map: &mut A) -> Result<(), A::Error> {
    map.next_value::<IgnoredAny>().map(drop)
}

/// The top level: a chunk when it is an object.
#[derive(Default)]
struct Top<'a>(Option<Chunk<'a>>);

impl<'de> Lean<'de> for Top<'de> {
    fn fill_map<A: MapAccess<'de>>(&mut self, mut map: A) -> Result<(), A::Error> {
        let c = self.0.insert(Chunk::default());
        while let Some(Key(k)) = map.next_key::<Key<'de>>()? {
            match k.as_ref() {
                "model" => next(&mut map, &mut c.model)?,
                "usage" => c.usage = Some(map.next_value::<Json<'de>>()?),
                "x_groq" => c.x_groq = Some(map.next_value::<Json<'de>>()?),
                "choices" => next(&mut map, &mut c.choices)?,
                _ => skip(&mut map)?,
            }
        }
        Ok(())
    }
}

/// A string, else `None`.
#[derive(Default)]
struct Text<'a>(Option<Cow<'a, str>>);

impl<'de> Lean<'de> for Text<'de> {
    fn fill_str(&mut self, text: Cow<'de, str>) {
        self.0 = Some(text);
    }
}

/// `choices`: an array, else `None`.
#[derive(Default)]
struct Choices<'a>(Option<Vec<Choice<'a>>>);

impl<'de> Lean<'de> for Choices<'de> {
    fn fill_seq<A: SeqAccess<'de>>(&mut self, mut seq: A) -> Result<(), A::Error> {
        let choices = self.0.insert(Vec::new());
        loop {
            // Each element is read into a default choice already in place; none left pops it.
            choices.push(Choice::default());
            let Some(slot) = choices.last_mut() else {
                break;
            };
            if seq.next_element_seed(Fill(slot))?.is_none() {
                choices.pop();
                break;
            }
        }
        Ok(())
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
    fn fill_map<A: MapAccess<'de>>(&mut self, mut map: A) -> Result<(), A::Error> {
        while let Some(Key(k)) = map.next_key::<Key<'de>>()? {
            match k.as_ref() {
                "text" => next(&mut map, &mut self.text)?,
                "delta" => map.next_value_seed(Fill(self.delta.insert(Delta::default())))?,
                _ => skip(&mut map)?,
            }
        }
        Ok(())
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
    fn fill_map<A: MapAccess<'de>>(&mut self, mut map: A) -> Result<(), A::Error> {
        while let Some(Key(k)) = map.next_key::<Key<'de>>()? {
            match k.as_ref() {
                "content" => next(&mut map, &mut self.content)?,
                "reasoning_content" => next(&mut map, &mut self.reasoning_content)?,
                "reasoning" => next(&mut map, &mut self.reasoning)?,
                "refusal" => next(&mut map, &mut self.refusal)?,
                "tool_calls" => next(&mut map, &mut self.tool_calls)?,
                "function_call" => {
                    map.next_value_seed(Fill(self.function_call.insert(Function::default())))?;
                }
                _ => skip(&mut map)?,
            }
        }
        Ok(())
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
    fn fill_str(&mut self, text: Cow<'de, str>) {
        *self = Texts::One(text);
    }

    fn fill_seq<A: SeqAccess<'de>>(&mut self, mut seq: A) -> Result<(), A::Error> {
        let mut parts = Vec::new();
        while let Some(L(part)) = seq.next_element::<L<Part<'de>>>()? {
            parts.extend(part.0.0);
        }
        *self = Texts::Parts(parts);
        Ok(())
    }
}

/// A content part: its `text` string.
#[derive(Default)]
struct Part<'a>(Text<'a>);

impl<'de> Lean<'de> for Part<'de> {
    fn fill_map<A: MapAccess<'de>>(&mut self, mut map: A) -> Result<(), A::Error> {
        while let Some(Key(k)) = map.next_key::<Key<'de>>()? {
            match k.as_ref() {
                "text" => next(&mut map, &mut self.0)?,
                _ => skip(&mut map)?,
            }
        }
        Ok(())
    }
}

/// `tool_calls`: the `function` of each call that has one.
#[derive(Default)]
struct Calls<'a>(Vec<Function<'a>>);

impl<'de> Lean<'de> for Calls<'de> {
    fn fill_seq<A: SeqAccess<'de>>(&mut self, mut seq: A) -> Result<(), A::Error> {
        while let Some(L(call)) = seq.next_element::<L<Call<'de>>>()? {
            self.0.extend(call.0);
        }
        Ok(())
    }
}

/// One tool call: its `function`, present as any value.
#[derive(Default)]
struct Call<'a>(Option<Function<'a>>);

impl<'de> Lean<'de> for Call<'de> {
    fn fill_map<A: MapAccess<'de>>(&mut self, mut map: A) -> Result<(), A::Error> {
        while let Some(Key(k)) = map.next_key::<Key<'de>>()? {
            match k.as_ref() {
                "function" => {
                    map.next_value_seed(Fill(self.0.insert(Function::default())))?;
                }
                _ => skip(&mut map)?,
            }
        }
        Ok(())
    }
}

/// A function call's `name` and `arguments` strings.
#[derive(Default)]
struct Function<'a> {
    name: Text<'a>,
    arguments: Text<'a>,
}

impl<'de> Lean<'de> for Function<'de> {
    fn fill_map<A: MapAccess<'de>>(&mut self, mut map: A) -> Result<(), A::Error> {
        while let Some(Key(k)) = map.next_key::<Key<'de>>()? {
            match k.as_ref() {
                "name" => next(&mut map, &mut self.name)?,
                "arguments" => next(&mut map, &mut self.arguments)?,
                _ => skip(&mut map)?,
            }
        }
        Ok(())
    }
}
