//! Scalars read the way the engines read them. vLLM, SGLang and
//! TensorRT-LLM validate requests with pydantic in its default lax mode, so
//! `"stream": "true"` or `"max_tokens": 2.0` work against an engine
//! directly; the gateway must not refuse what the engine would take. The
//! rules are pydantic 2's (checked against 2.14): anything else is still an
//! error, which the engine would give too.

use std::fmt;

use serde::de::{self, Deserializer, Unexpected, Visitor};
use serde::Deserialize;

/// `#[serde(default, deserialize_with = "lax::flag")]` for a bool that may
/// be absent or null (pydantic's `Optional[bool] = False`).
pub fn flag<'de, D: Deserializer<'de>>(deserializer: D) -> Result<bool, D::Error> {
    Option::<LaxBool>::deserialize(deserializer).map(|flag| flag.is_some_and(|flag| flag.0))
}

/// `#[serde(default, deserialize_with = "lax::count")]` for a count that
/// may be absent or null (`Optional[int] = None`).
pub fn count<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<u32>, D::Error> {
    Option::<LaxU32>::deserialize(deserializer).map(|count| count.map(|count| count.0))
}

/// A bool: `true`/`false`, 0 or 1 (also as 0.0 or 1.0), or one of
/// pydantic's words in any case (`"true"`, `"yes"`, `"on"`, `"1"`, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct LaxBool(bool);

/// A count: an integer, a float without a fraction (`2.0`), or a string
/// of one (`"2"`, `" 2 "`, `"+2"`, `"1_000"`, `"2.0"`; not `"1e3"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct LaxU32(u32);

impl<'de> Deserialize<'de> for LaxBool {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(BoolVisitor).map(LaxBool)
    }
}

impl<'de> Deserialize<'de> for LaxU32 {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(U32Visitor).map(LaxU32)
    }
}

struct BoolVisitor;

impl Visitor<'_> for BoolVisitor {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a boolean")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<bool, E> {
        Ok(v)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<bool, E> {
        match v {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(E::invalid_value(Unexpected::Unsigned(v), &self)),
        }
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<bool, E> {
        u64::try_from(v)
            .map_err(|_| E::invalid_value(Unexpected::Signed(v), &self))
            .and_then(|v| self.visit_u64(v))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<bool, E> {
        if v == 0.0 {
            Ok(false)
        } else if v == 1.0 {
            Ok(true)
        } else {
            Err(E::invalid_value(Unexpected::Float(v), &self))
        }
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<bool, E> {
        const TRUE: [&str; 6] = ["1", "on", "t", "true", "y", "yes"];
        const FALSE: [&str; 6] = ["0", "off", "f", "false", "n", "no"];
        let is = |words: &[&str]| words.iter().any(|w| w.eq_ignore_ascii_case(v));
        if is(&TRUE) {
            Ok(true)
        } else if is(&FALSE) {
            Ok(false)
        } else {
            Err(E::invalid_value(Unexpected::Str(v), &self))
        }
    }
}

struct U32Visitor;

impl Visitor<'_> for U32Visitor {
    type Value = u32;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an integer from 0 to 4294967295")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<u32, E> {
        Ok(u32::from(v))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<u32, E> {
        u32::try_from(v).map_err(|_| E::invalid_value(Unexpected::Unsigned(v), &self))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<u32, E> {
        u32::try_from(v).map_err(|_| E::invalid_value(Unexpected::Signed(v), &self))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<u32, E> {
        // Exact in f64 over all of u32's range.
        if v.fract() == 0.0 && (0.0..=f64::from(u32::MAX)).contains(&v) {
            Ok(v as u32)
        } else {
            Err(E::invalid_value(Unexpected::Float(v), &self))
        }
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<u32, E> {
        parse_integer(v).ok_or_else(|| E::invalid_value(Unexpected::Str(v), &self))
    }
}

/// Python's `int()` of a string (surrounding whitespace, one sign, single
/// underscores between digits) after pydantic drops a `.0…` tail.
fn parse_integer(text: &str) -> Option<u32> {
    let text = text.trim();
    let text = match text.split_once('.') {
        Some((whole, zeros)) if !zeros.is_empty() && zeros.bytes().all(|b| b == b'0') => whole,
        Some(_) => return None,
        None => text,
    };
    let (negative, digits) = match text.as_bytes().first()? {
        b'+' => (false, &text[1..]),
        b'-' => (true, &text[1..]),
        _ => (false, text),
    };
    let well_formed = !digits.is_empty()
        && digits.split('_').all(|group| !group.is_empty())
        && digits.bytes().all(|b| b.is_ascii_digit() || b == b'_');
    if !well_formed {
        return None;
    }
    let value: u64 = digits
        .bytes()
        .filter(u8::is_ascii_digit)
        .try_fold(0u64, |acc, b| {
            acc.checked_mul(10)?.checked_add(u64::from(b - b'0'))
        })?;
    match (negative, value) {
        (_, 0) => Some(0),
        (true, _) => None,
        (false, value) => u32::try_from(value).ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct Fields {
        #[serde(default, deserialize_with = "flag")]
        stream: bool,
        #[serde(default, deserialize_with = "count")]
        max_tokens: Option<u32>,
    }

    fn fields(json: &str) -> Option<Fields> {
        serde_json::from_str(json).ok()
    }

    fn bool_of(json: &str) -> Option<bool> {
        fields(&format!(r#"{{"stream":{json}}}"#)).map(|f| f.stream)
    }

    fn u32_of(json: &str) -> Option<u32> {
        fields(&format!(r#"{{"max_tokens":{json}}}"#))?.max_tokens
    }

    #[test]
    fn absent_and_null_are_the_defaults() {
        for json in ["{}", r#"{"stream":null,"max_tokens":null}"#] {
            let f = fields(json).unwrap();
            assert_eq!((f.stream, f.max_tokens), (false, None), "{json}");
        }
    }

    /// Each input and what pydantic 2.14 made of it for `bool` and
    /// `Optional[int]` fields (`None`: a validation error).
    #[test]
    fn values_are_read_as_pydantic_reads_them() {
        for (json, expected) in [
            ("true", Some(true)),
            ("false", Some(false)),
            ("1", Some(true)),
            ("0", Some(false)),
            ("2", None),
            ("-1", None),
            ("1.0", Some(true)),
            ("0.0", Some(false)),
            ("0.5", None),
            (r#""true""#, Some(true)),
            (r#""TRUE""#, Some(true)),
            (r#""yes""#, Some(true)),
            (r#""on""#, Some(true)),
            (r#""t""#, Some(true)),
            (r#""off""#, Some(false)),
            (r#""N""#, Some(false)),
            (r#"" true""#, None),
            (r#""""#, None),
            ("[true]", None),
        ] {
            assert_eq!(bool_of(json), expected, "bool {json}");
        }
        for (json, expected) in [
            ("2", Some(2)),
            ("2.0", Some(2)),
            ("2.5", None),
            ("1e3", Some(1_000)),
            (r#""2""#, Some(2)),
            (r#"" 2 ""#, Some(2)),
            (r#""2.0""#, Some(2)),
            (r#""2.""#, None),
            (r#""2.000""#, Some(2)),
            (r#""0002""#, Some(2)),
            (r#""+2""#, Some(2)),
            (r#""-0""#, Some(0)),
            (r#""1_000""#, Some(1_000)),
            (r#""1__0""#, None),
            (r#""_1""#, None),
            (r#""1e3""#, None),
            (r#""0x10""#, None),
            (r#""2.5""#, None),
            (r#""""#, None),
            (r#""+""#, None),
            ("true", Some(1)),
            // Valid for pydantic, too large for any engine's context.
            ("4294967296", None),
            (r#""99999999999999999999999""#, None),
            ("-2", None),
            ("[2]", None),
        ] {
            assert_eq!(u32_of(json), expected, "int {json}");
        }
    }
}
