//! Request and response bodies of the prefill/decode handshakes
//! (docs/sim-engine.md#disaggregated-prefill-all-three-handshakes). Request bodies are rewritten as raw JSON: each top-level field is
//! matched by its parsed (unescaped) key and copied byte for byte unless an
//! edit names it, so a rewrite costs one pass and at most one output the size
//! of the body, whatever the body's shape. The fields that steer a handshake
//! are the router's alone (`router_core::request::HANDSHAKE_FIELDS`): a
//! client that sends them has them removed first, or a request could make a
//! decode engine pull KV from any host it names.

use std::borrow::Cow;
use std::fmt;

use router_core::request::{is_json_object, HANDSHAKE_FIELDS};
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;
use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum BodyError {
    #[error("body is not a JSON object")]
    NotAnObject,
    #[error("prefill response is not JSON")]
    Response,
    #[error("prefill response carries no usable {0}")]
    MissingParams(&'static str),
}

/// What a rewrite does to one top-level field.
#[derive(Debug, Clone, Copy)]
enum Edit<'a> {
    /// Dropped wherever it appears.
    Remove,
    /// Set to this JSON value, replacing the client's.
    Set(&'a str),
    /// Set to this JSON value only if the client sent the field.
    Replace(&'a str),
}

/// The body with `edits` applied: every occurrence of an edited key is
/// dropped, `Set` and present `Replace` values are written once at the
/// first occurrence (or at the end), every other field is copied verbatim.
fn rewrite(raw: &[u8], edits: &[(&str, Edit<'_>)]) -> Result<Vec<u8>, BodyError> {
    let mut de = serde_json::Deserializer::from_slice(raw);
    let mut out = Vec::with_capacity(raw.len() + 256);
    out.push(b'{');
    let mut writer = Rewriter {
        out,
        edits,
        written: vec![false; edits.len()],
    };
    de.deserialize_map(&mut writer)
        .and_then(|()| de.end())
        .map_err(|_| BodyError::NotAnObject)?;
    let Rewriter {
        mut out, written, ..
    } = writer;
    for ((key, edit), done) in edits.iter().zip(written) {
        if let (Edit::Set(value), false) = (edit, done) {
            write_field(&mut out, key, value);
        }
    }
    out.push(b'}');
    Ok(out)
}

struct Rewriter<'e, 'a> {
    out: Vec<u8>,
    edits: &'e [(&'e str, Edit<'a>)],
    written: Vec<bool>,
}

/// Appends `"key":value` to an object opened in `out`.
fn write_field(out: &mut Vec<u8>, key: &str, value: &str) {
    if out.len() > 1 {
        out.push(b',');
    }
    // Writing a str into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, key);
    out.push(b':');
    out.extend_from_slice(value.as_bytes());
}

impl<'de> Visitor<'de> for &mut Rewriter<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(Key(key)) = map.next_key()? {
            let value: &RawValue = map.next_value()?;
            match self.edits.iter().position(|(name, _)| *name == key) {
                None => write_field(&mut self.out, &key, value.get()),
                Some(at) => {
                    let value = match self.edits[at].1 {
                        Edit::Remove => None,
                        Edit::Set(new) | Edit::Replace(new) => Some(new),
                    };
                    if let (Some(new), false) = (value, self.written[at]) {
                        write_field(&mut self.out, &key, new);
                        self.written[at] = true;
                    }
                }
            }
        }
        Ok(())
    }
}

/// An object key, unescaped; borrowed from the body when it has no escapes.
struct Key<'de>(Cow<'de, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object key")
            }

            fn visit_borrowed_str<E: de::Error>(self, key: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(key)))
            }

            fn visit_str<E: de::Error>(self, key: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(key.to_owned())))
            }
        }
        deserializer.deserialize_str(KeyVisitor)
    }
}

/// The body without the handshake fields a client put in it.
pub fn strip_router_fields(raw: &[u8]) -> Result<Vec<u8>, BodyError> {
    let edits = HANDSHAKE_FIELDS.map(|field| (field, Edit::Remove));
    rewrite(raw, &edits)
}

/// A leg that computes the prompt and returns after one token.
const PREFILL_ONLY: [(&str, Edit<'static>); 5] = [
    ("stream", Edit::Set("false")),
    ("max_tokens", Edit::Set("1")),
    ("max_completion_tokens", Edit::Replace("1")),
    ("stream_options", Edit::Remove),
    ("min_tokens", Edit::Remove),
];

/// The `kv_transfer_params` that ask a vLLM prefill engine to keep the KV
/// for a remote decode.
const VLLM_REMOTE_DECODE: &str = r#"{"do_remote_decode":true,"do_remote_prefill":false,"remote_engine_id":null,"remote_block_ids":null,"remote_host":null,"remote_port":null}"#;

/// vLLM (NIXL connector): the prefill leg asks for remote decode.
pub fn vllm_prefill(body: &[u8]) -> Result<Vec<u8>, BodyError> {
    let mut edits = PREFILL_ONLY.to_vec();
    edits.push(("kv_transfer_params", Edit::Set(VLLM_REMOTE_DECODE)));
    rewrite(body, &edits)
}

/// A prefill leg's answer, read into `T`; it must be a JSON object.
fn read_answer<'a, T: Deserialize<'a>>(response: &'a [u8]) -> Result<T, BodyError> {
    if !is_json_object(response) {
        return Err(BodyError::Response);
    }
    serde_json::from_slice(response).map_err(|_| BodyError::Response)
}

/// The `kv_transfer_params` a vLLM prefill response hands to the decode leg,
/// passed on as opaque JSON.
pub fn vllm_transfer_params(response: &[u8]) -> Result<Value, BodyError> {
    /// Only the handshake is read: the rest of the answer (a client may
    /// have asked for `prompt_logprobs` of a long prompt: megabytes) is
    /// skipped without building anything.
    #[derive(Deserialize)]
    struct Answer<'a> {
        #[serde(borrow)]
        kv_transfer_params: Option<&'a RawValue>,
    }
    let answer = read_answer::<Answer<'_>>(response)?;
    let params = answer
        .kv_transfer_params
        .and_then(|raw| serde_json::from_str::<Value>(raw.get()).ok());
    match params {
        Some(Value::Object(fields)) if !fields.is_empty() => Ok(Value::Object(fields)),
        _ => Err(BodyError::MissingParams("kv_transfer_params")),
    }
}

/// vLLM: the decode leg is the original request plus the prefill's params.
pub fn vllm_decode(body: &[u8], params: &Value) -> Result<Vec<u8>, BodyError> {
    let params = params.to_string();
    rewrite(body, &[("kv_transfer_params", Edit::Set(&params))])
}

/// SGLang: both legs carry the same rendezvous with the prefill engine,
/// and, when it runs several data-parallel ranks, the rank prefilling: the
/// decode engine otherwise looks for the KV on rank `room % ranks`, and a
/// prefill rank chosen by the router would fail the room (SGLang 0.5.19+).
pub fn sglang(
    body: &[u8],
    host: &str,
    port: u16,
    room: u64,
    prefill_rank: Option<u32>,
) -> Result<Vec<u8>, BodyError> {
    let host = Value::from(host).to_string();
    let (port, room) = (port.to_string(), room.to_string());
    let rank = prefill_rank.map(|rank| rank.to_string());
    rewrite(
        body,
        &[
            ("bootstrap_host", Edit::Set(&host)),
            ("bootstrap_port", Edit::Set(&port)),
            ("bootstrap_room", Edit::Set(&room)),
            (
                "disagg_prefill_dp_rank",
                rank.as_deref().map_or(Edit::Remove, Edit::Set),
            ),
        ],
    )
}

/// TensorRT-LLM: the context leg (it produces the first token itself).
pub fn trtllm_context(body: &[u8]) -> Result<Vec<u8>, BodyError> {
    rewrite(
        body,
        &[
            ("stream", Edit::Set("false")),
            ("stream_options", Edit::Remove),
            (
                "disaggregated_params",
                Edit::Set(r#"{"request_type":"context_only"}"#),
            ),
        ],
    )
}

/// What the TensorRT-LLM context leg decided.
#[derive(Debug, Clone, PartialEq)]
pub enum ContextOutcome {
    /// The context leg already finished the request: its response is final.
    Finished,
    /// Generation goes on with these `disaggregated_params`.
    Generate(Value),
}

pub fn trtllm_context_outcome(response: &[u8]) -> Result<ContextOutcome, BodyError> {
    /// Only what the handshake needs; the rest of the answer is skipped
    /// without building anything (see `vllm_transfer_params`).
    #[derive(Deserialize)]
    struct Answer<'a> {
        #[serde(borrow, default)]
        choices: Vec<Choice<'a>>,
    }
    #[derive(Deserialize)]
    struct Choice<'a> {
        #[serde(borrow, default)]
        finish_reason: Option<Cow<'a, str>>,
        #[serde(borrow, default)]
        disaggregated_params: Option<&'a RawValue>,
    }
    let answer = read_answer::<Answer<'_>>(response)?;
    let choice = answer
        .choices
        .into_iter()
        .next()
        .ok_or(BodyError::MissingParams("choices"))?;
    let unfinished = matches!(
        choice.finish_reason.as_deref(),
        Some("length" | "not_finished")
    );
    if !unfinished {
        return Ok(ContextOutcome::Finished);
    }
    let params = choice
        .disaggregated_params
        .and_then(|raw| serde_json::from_str::<Value>(raw.get()).ok());
    match params {
        Some(Value::Object(mut params)) => {
            params.insert("request_type".into(), "generation_only".into());
            Ok(ContextOutcome::Generate(Value::Object(params)))
        }
        _ => Err(BodyError::MissingParams("disaggregated_params")),
    }
}

/// TensorRT-LLM: the generation leg is the original plus the context's params.
pub fn trtllm_generation(body: &[u8], params: &Value) -> Result<Vec<u8>, BodyError> {
    let params = params.to_string();
    rewrite(body, &[("disaggregated_params", Edit::Set(&params))])
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn object(raw: &[u8]) -> Value {
        serde_json::from_slice(raw).unwrap()
    }

    #[test]
    fn router_fields_are_removed_by_their_parsed_key() {
        let raw = json!({"model": "m", "prompt": "p", "kv_transfer_params": {"remote_host": "evil"},
            "bootstrap_host": "evil", "bootstrap_port": 1, "bootstrap_room": 2,
            "disaggregated_params": {"request_type": "generation_only"}});
        let stripped = strip_router_fields(raw.to_string().as_bytes()).unwrap();
        assert_eq!(object(&stripped), json!({"model": "m", "prompt": "p"}));
        // Escapes name the same key to every JSON parser an engine uses.
        let escaped = br#"{"model":"m","kv_transfer_param\u0073":{"do_remote_prefill":true},
            "bootstrap\u005fhost":"10.0.0.1","\u0064isaggregated_params":{},"prompt":"bootstrap_"}"#;
        let stripped = strip_router_fields(escaped).unwrap();
        assert_eq!(
            object(&stripped),
            json!({"model": "m", "prompt": "bootstrap_"})
        );
        // Every other field is copied verbatim, escapes and number forms included.
        let verbatim = br#"{"a\u0062":"x\n","n":1.50e3,"o":{"k":[1, 2]}}"#;
        assert_eq!(
            strip_router_fields(verbatim).unwrap(),
            br#"{"ab":"x\n","n":1.50e3,"o":{"k":[1, 2]}}"#.to_vec()
        );
        assert_eq!(strip_router_fields(b"{}").unwrap(), b"{}".to_vec());
        assert_eq!(strip_router_fields(b"[1]"), Err(BodyError::NotAnObject));
        assert_eq!(strip_router_fields(b"{} x"), Err(BodyError::NotAnObject));
    }

    proptest::proptest! {
        /// Whatever the escaping and order of keys, stripping leaves no
        /// handshake field and every other field as it was.
        #[test]
        fn stripping_removes_every_spelling_and_keeps_the_rest(
            escapes in proptest::collection::vec(proptest::bool::ANY, 24),
            fields in proptest::collection::vec((0usize..7, 0u32..1000), 0..8),
        ) {
            use router_core::request::{parse_request, Endpoint};
            let names = ["model", "prompt", "kv_transfer_params", "bootstrap_host",
                "bootstrap_room", "disaggregated_params", "other"];
            let spell = |name: &str| -> String {
                name.chars().zip(escapes.iter().cycle()).map(|(c, &escape)| {
                    if escape { format!("\\u{:04x}", c as u32) } else { c.to_string() }
                }).collect()
            };
            let mut body = String::from(r#"{"model":"m","prompt":"p""#);
            for (name, value) in &fields {
                if *name < 2 {
                    continue;
                }
                body.push_str(&format!(r#","{}":{value}"#, spell(names[*name])));
            }
            body.push('}');
            let stripped = strip_router_fields(body.as_bytes()).unwrap();
            let request = parse_request(Endpoint::Completions, &stripped, 1 << 20);
            // Duplicate keys are refused by the parser before any stripping.
            if let Ok(request) = request {
                proptest::prop_assert!(!request.has_handshake_fields);
            }
            let value: Value = serde_json::from_slice(&stripped).unwrap();
            let object = value.as_object().unwrap();
            for field in HANDSHAKE_FIELDS {
                proptest::prop_assert!(!object.contains_key(field));
            }
            proptest::prop_assert_eq!(&object["model"], "m");
            let others = fields.iter().filter(|(name, _)| *name == 6).count();
            proptest::prop_assert_eq!(object.contains_key("other"), others > 0);
        }
    }

    #[test]
    fn vllm_legs() {
        let original = json!({"model": "m", "messages": [], "stream": true,
            "stream_options": {"include_usage": true}, "max_tokens": 50,
            "max_completion_tokens": 50, "min_tokens": 5})
        .to_string();
        let prefill = object(&vllm_prefill(original.as_bytes()).unwrap());
        assert_eq!(prefill["stream"], false);
        assert_eq!(prefill["max_tokens"], 1);
        assert_eq!(prefill["max_completion_tokens"], 1);
        assert!(prefill.get("stream_options").is_none() && prefill.get("min_tokens").is_none());
        assert_eq!(prefill["kv_transfer_params"]["do_remote_decode"], true);
        let without = object(&vllm_prefill(br#"{"model":"m","prompt":"p"}"#).unwrap());
        assert!(without.get("max_completion_tokens").is_none());
        assert_eq!(without["max_tokens"], 1);

        let params = json!({"do_remote_prefill": true, "remote_block_ids": [1, 2],
            "remote_engine_id": "e", "remote_request_id": "r", "remote_host": "127.0.0.1",
            "remote_port": 5600, "tp_size": 1});
        let response = json!({"choices": [], "kv_transfer_params": params}).to_string();
        assert_eq!(
            vllm_transfer_params(response.as_bytes()),
            Ok(params.clone())
        );
        assert!(vllm_transfer_params(br#"{"choices":[]}"#).is_err());
        assert!(vllm_transfer_params(br#"{"kv_transfer_params":{}}"#).is_err());
        assert!(vllm_transfer_params(b"<html>").is_err());
        assert!(vllm_transfer_params(br#"{"kv_transfer_params":null}"#).is_err());
        assert!(vllm_transfer_params(br#"[{"do_remote_prefill":true}]"#).is_err());
        // The rest of the answer, however large, is skipped.
        let logprobs: Vec<Value> = (0..2_000)
            .map(|t| json!({ t.to_string(): {"logprob": -1.5, "rank": 1, "decoded_token": "é"} }))
            .collect();
        let long = json!({"choices": [{"text": "x", "prompt_logprobs": logprobs}],
            "kv_transfer_params": params, "usage": {"prompt_tokens": 2_000}})
        .to_string();
        assert_eq!(vllm_transfer_params(long.as_bytes()), Ok(params.clone()));
        let decode = object(&vllm_decode(original.as_bytes(), &params).unwrap());
        assert_eq!(decode["stream"], true);
        assert_eq!(decode["kv_transfer_params"], params);
    }

    #[test]
    fn sglang_rendezvous() {
        let leg = sglang(
            br#"{"model":"m","prompt":"p","bootstrap_room":1}"#,
            "10.0.0.5",
            8998,
            42,
            None,
        );
        assert_eq!(
            object(&leg.unwrap()),
            json!({"model": "m", "prompt": "p", "bootstrap_host": "10.0.0.5",
                "bootstrap_port": 8998, "bootstrap_room": 42})
        );
        let ranked = sglang(
            br#"{"model":"m","prompt":"p"}"#,
            "10.0.0.5",
            8998,
            42,
            Some(3),
        );
        assert_eq!(object(&ranked.unwrap())["disagg_prefill_dp_rank"], 3);
    }

    #[test]
    fn trtllm_legs() {
        let original =
            json!({"model": "m", "prompt": "p", "max_tokens": 20, "stream": true}).to_string();
        let context = object(&trtllm_context(original.as_bytes()).unwrap());
        assert_eq!(
            context["disaggregated_params"]["request_type"],
            "context_only"
        );
        assert_eq!(context["stream"], false);
        assert_eq!(context["max_tokens"], 20);

        let unfinished = json!({"choices": [{"finish_reason": "length", "text": "a",
            "disaggregated_params": {"request_type": "context_only", "first_gen_tokens": [7],
                "ctx_request_id": 3, "opaque_state": "abc"}}]});
        let ContextOutcome::Generate(params) =
            trtllm_context_outcome(unfinished.to_string().as_bytes()).unwrap()
        else {
            panic!("expected a generation leg");
        };
        assert_eq!(params["request_type"], "generation_only");
        assert_eq!(params["first_gen_tokens"], json!([7]));
        let generation = object(&trtllm_generation(original.as_bytes(), &params).unwrap());
        assert_eq!(generation["disaggregated_params"]["ctx_request_id"], 3);

        let finished = json!({"choices": [{"finish_reason": "stop", "text": "done"}]});
        assert_eq!(
            trtllm_context_outcome(finished.to_string().as_bytes()),
            Ok(ContextOutcome::Finished)
        );
        let broken = json!({"choices": [{"finish_reason": "length"}]});
        assert!(trtllm_context_outcome(broken.to_string().as_bytes()).is_err());
        assert!(trtllm_context_outcome(b"{}").is_err());
    }
}
