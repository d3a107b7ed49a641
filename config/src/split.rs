//! One flat JSON/YAML object read as two structs: the fields every program
//! shares and the fields only one program reads. serde's `flatten` would do
//! this but silently disables `deny_unknown_fields`, and a misspelled key
//! must be an error rather than a default.

use std::ops::{Deref, DerefMut};

use serde::de::{self, DeserializeOwned, Deserializer, Visitor};
use serde::ser;
use serde::{Deserialize, Serialize, Serializer};
use serde_json::{Map, Value};

/// `shared` fields plus `local` ones, in one object.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WithLocal<S, L> {
    pub shared: S,
    pub local: L,
}

/// Reading code treats the object as its shared part; `local` is explicit.
impl<S, L> Deref for WithLocal<S, L> {
    type Target = S;

    fn deref(&self) -> &S {
        &self.shared
    }
}

impl<S, L> DerefMut for WithLocal<S, L> {
    fn deref_mut(&mut self) -> &mut S {
        &mut self.shared
    }
}

impl<'de, S: DeserializeOwned, L: DeserializeOwned> Deserialize<'de> for WithLocal<S, L> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let object = Map::<String, Value>::deserialize(deserializer)?;
        let shared_fields = field_names::<S>();
        let local_fields = field_names::<L>();
        let known = |key: &str| shared_fields.contains(&key) || local_fields.contains(&key);
        if let Some(key) = object.keys().find(|key| !known(key)) {
            let expected: Vec<String> = shared_fields
                .iter()
                .chain(local_fields)
                .map(|field| format!("`{field}`"))
                .collect();
            return Err(de::Error::custom(format!(
                "unknown field `{key}`, expected one of {}",
                expected.join(", ")
            )));
        }
        let (shared, local): (Map<_, _>, Map<_, _>) = object
            .into_iter()
            .partition(|(key, _)| shared_fields.contains(&key.as_str()));
        Ok(Self {
            shared: S::deserialize(Value::Object(shared)).map_err(de::Error::custom)?,
            local: L::deserialize(Value::Object(local)).map_err(de::Error::custom)?,
        })
    }
}

impl<S: Serialize, L: Serialize> Serialize for WithLocal<S, L> {
    fn serialize<Z: Serializer>(&self, serializer: Z) -> Result<Z::Ok, Z::Error> {
        let mut merged = into_object::<Z::Error>(&self.shared)?;
        merged.extend(into_object::<Z::Error>(&self.local)?);
        merged.serialize(serializer)
    }
}

fn into_object<E: ser::Error>(value: &impl Serialize) -> Result<Map<String, Value>, E> {
    match serde_json::to_value(value).map_err(E::custom)? {
        Value::Object(map) => Ok(map),
        _ => Err(E::custom("a config section must serialize as an object")),
    }
}

/// The field names a derived `Deserialize` of a struct asks for: recorded
/// from the `deserialize_struct` call, so they can never go out of date.
fn field_names<T: DeserializeOwned>() -> &'static [&'static str] {
    struct Recorder<'a>(&'a mut &'static [&'static str]);

    impl<'de> Deserializer<'de> for Recorder<'_> {
        type Error = de::value::Error;

        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
            Err(de::Error::custom("only structs have field names"))
        }

        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Self::Error> {
            *self.0 = fields;
            Err(de::Error::custom("field names recorded"))
        }

        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
            bytes byte_buf option unit unit_struct newtype_struct seq tuple
            tuple_struct map enum identifier ignored_any
        }
    }

    let mut fields: &'static [&'static str] = &[];
    // The recorder always fails; only the names it saw matter.
    let _ = T::deserialize(Recorder(&mut fields));
    fields
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Shared {
        name: String,
        #[serde(default)]
        size: u32,
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Local {
        #[serde(default)]
        path: Option<String>,
    }

    type Both = WithLocal<Shared, Local>;

    #[test]
    fn splits_one_object_and_refuses_unknown_keys() {
        assert_eq!(field_names::<Shared>(), ["name", "size"]);
        let both: Both = serde_json::from_str(r#"{"name":"m","path":"/p"}"#).unwrap();
        assert_eq!((both.name.as_str(), both.size), ("m", 0));
        assert_eq!(both.local.path.as_deref(), Some("/p"));
        let err = serde_json::from_str::<Both>(r#"{"name":"m","pth":"/p"}"#).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("unknown field `pth`, expected one of `name`, `size`, `path`"),
            "{err}"
        );
        let err = serde_json::from_str::<Both>(r#"{"path":"/p"}"#).unwrap_err();
        assert!(err.to_string().contains("missing field `name`"), "{err}");
    }

    #[test]
    fn serializes_back_to_one_object() {
        let both: Both = serde_json::from_str(r#"{"name":"m","size":2,"path":"/p"}"#).unwrap();
        let json = serde_json::to_value(&both).unwrap();
        assert_eq!(json, serde_json::json!({"name":"m","size":2,"path":"/p"}));
        assert_eq!(serde_json::from_value::<Both>(json).unwrap(), both);
    }
}
