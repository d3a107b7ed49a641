//! The closed vocabularies of kvmesh's configuration. Each is spelled the same
//! in JSON, YAML and on the command line (lowercase), and parsed by one
//! `FromStr`, so a name accepted in one place is accepted in all.

use std::fmt;
use std::str::FromStr;

use serde::de::{Deserializer, Error as _};
use serde::{Deserialize, Serialize, Serializer};
use thiserror::Error;

/// A name that is not one of an enum's values.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("unknown variant `{value}`, expected one of {}", expected_list(.expected))]
pub struct UnknownValue {
    pub value: String,
    pub expected: &'static [&'static str],
}

fn expected_list(names: &[&str]) -> String {
    names
        .iter()
        .map(|name| format!("`{name}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Declares a config enum: its lowercase names, `FromStr`/`Display`, serde,
/// and (feature `clap`) `clap::ValueEnum` with each variant's doc as help.
macro_rules! config_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident (default $default:ident) {
            $( $(#[doc = $doc:literal])* $variant:ident = $text:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $( $(#[doc = $doc])* $variant, )+
        }

        impl Default for $name {
            fn default() -> Self {
                $name::$default
            }
        }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];
            pub const NAMES: &'static [&'static str] = &[$($text),+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = UnknownValue;

            fn from_str(text: &str) -> Result<Self, Self::Err> {
                match text {
                    $($text => Ok($name::$variant),)+
                    _ => Err(UnknownValue {
                        value: text.to_owned(),
                        expected: Self::NAMES,
                    }),
                }
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let text = std::borrow::Cow::<str>::deserialize(deserializer)?;
                text.parse()
                    .map_err(|_| D::Error::unknown_variant(&text, Self::NAMES))
            }
        }

        #[cfg(feature = "clap")]
        impl clap::ValueEnum for $name {
            fn value_variants<'a>() -> &'a [Self] {
                Self::ALL
            }

            fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
                let help: &[&str] = match self {
                    $($name::$variant => &[$($doc),*],)+
                };
                let value = clap::builder::PossibleValue::new(self.as_str());
                Some(match help.first() {
                    Some(line) => value.help(line.trim()),
                    None => value,
                })
            }
        }
    };
}

config_enum! {
    /// An inference engine family: what a relay reads events from, and the
    /// prefill/decode handshake a disaggregated model's pools speak.
    pub enum EngineKind (default Vllm) {
        /// vLLM: ZMQ KV events; prefill leg first, its `kv_transfer_params` go into the decode leg.
        Vllm = "vllm",
        /// SGLang: ZMQ KV events; both legs at once, meeting at the prefill engine's bootstrap server.
        Sglang = "sglang",
        /// TensorRT-LLM: polled KV events; context leg first, its `disaggregated_params` go into generation.
        Trtllm = "trtllm",
    }
}

config_enum! {
    /// A worker's part in disaggregated serving.
    pub enum Role (default Both) {
        /// Computes prompts whose KV a decode worker pulls.
        Prefill = "prefill",
        /// Generates from KV a prefill worker computed.
        Decode = "decode",
        /// Serves whole requests.
        Both = "both",
    }
}

config_enum! {
    /// When a model's requests are prefilled on the prefill pool.
    pub enum DisaggregationPolicy (default Never) {
        /// Every request is prefilled by the decode worker it is routed to.
        Never = "never",
        /// Every request is prefilled remotely.
        Always = "always",
        /// Only when the decode worker would compute enough of the prompt itself and a prefill worker has room.
        Auto = "auto",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trips<T>(all: &[T])
    where
        T: Copy + PartialEq + fmt::Debug + fmt::Display + FromStr + Serialize,
        T: for<'de> Deserialize<'de>,
    {
        for &value in all {
            let text = value.to_string();
            assert_eq!(text.parse::<T>().ok(), Some(value));
            let json = serde_json::to_string(&value).unwrap();
            assert_eq!(json, format!("\"{text}\""));
            assert_eq!(serde_json::from_str::<T>(&json).unwrap(), value);
        }
    }

    #[test]
    fn every_value_round_trips_through_serde_and_from_str() {
        round_trips(EngineKind::ALL);
        round_trips(Role::ALL);
        round_trips(DisaggregationPolicy::ALL);
        assert_eq!(EngineKind::NAMES, ["vllm", "sglang", "trtllm"]);
        assert_eq!(Role::NAMES, ["prefill", "decode", "both"]);
        assert_eq!(DisaggregationPolicy::NAMES, ["never", "always", "auto"]);
    }

    #[test]
    fn defaults() {
        assert_eq!(EngineKind::default(), EngineKind::Vllm);
        assert_eq!(Role::default(), Role::Both);
        assert_eq!(DisaggregationPolicy::default(), DisaggregationPolicy::Never);
    }

    #[test]
    fn unknown_names_list_the_known_ones() {
        let err = "Vllm".parse::<EngineKind>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown variant `Vllm`, expected one of `vllm`, `sglang`, `trtllm`"
        );
        let err = serde_json::from_str::<DisaggregationPolicy>("\"sometimes\"").unwrap_err();
        assert!(
            err.to_string().contains("unknown variant `sometimes`"),
            "{err}"
        );
    }
}
