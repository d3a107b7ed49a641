//! Request and response bodies of the prefill/decode handshakes (DESIGN
//! §3.4), as pure JSON rewrites. The fields that steer a handshake are the
//! router's alone: a client that sends them has them removed first, or a
//! request could make a decode engine pull KV from any host it names.

use serde_json::{Map, Value};
use thiserror::Error;

/// Body fields only the router may set.
pub const ROUTER_FIELDS: [&str; 5] = [
    "kv_transfer_params",
    "bootstrap_host",
    "bootstrap_port",
    "bootstrap_room",
    "disaggregated_params",
];

pub type Body = Map<String, Value>;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum BodyError {
    #[error("body is not a JSON object")]
    NotAnObject,
    #[error("prefill response is not JSON")]
    Response,
    #[error("prefill response carries no usable {0}")]
    MissingParams(&'static str),
}

/// Cheap check before parsing: can the body hold a router field at all?
pub fn may_hold_router_fields(raw: &[u8]) -> bool {
    [
        &b"kv_transfer_params"[..],
        b"bootstrap_",
        b"disaggregated_params",
    ]
    .iter()
    .any(|needle| raw.windows(needle.len()).any(|w| w == *needle))
}

pub fn parse(raw: &[u8]) -> Result<Body, BodyError> {
    match serde_json::from_slice(raw) {
        Ok(Value::Object(body)) => Ok(body),
        _ => Err(BodyError::NotAnObject),
    }
}

pub fn encode(body: &Body) -> Vec<u8> {
    // Serializing a map of JSON values cannot fail.
    serde_json::to_vec(body).unwrap_or_default()
}

/// Removes every router field; true if the client had sent any.
pub fn strip_router_fields(body: &mut Body) -> bool {
    let mut removed = false;
    for field in ROUTER_FIELDS {
        removed |= body.remove(field).is_some();
    }
    removed
}

/// A leg that computes the prompt and returns after one token.
fn prefill_only(body: &Body) -> Body {
    let mut leg = body.clone();
    leg.insert("stream".into(), Value::Bool(false));
    leg.insert("max_tokens".into(), 1.into());
    if leg.contains_key("max_completion_tokens") {
        leg.insert("max_completion_tokens".into(), 1.into());
    }
    leg.remove("stream_options");
    leg.remove("min_tokens");
    leg
}

/// vLLM (NIXL connector): the prefill leg asks for remote decode.
pub fn vllm_prefill(body: &Body) -> Body {
    let mut leg = prefill_only(body);
    leg.insert(
        "kv_transfer_params".into(),
        serde_json::json!({
            "do_remote_decode": true,
            "do_remote_prefill": false,
            "remote_engine_id": null,
            "remote_block_ids": null,
            "remote_host": null,
            "remote_port": null,
        }),
    );
    leg
}

/// The `kv_transfer_params` a vLLM prefill response hands to the decode leg,
/// passed on as opaque JSON.
pub fn vllm_transfer_params(response: &[u8]) -> Result<Value, BodyError> {
    let response: Value = serde_json::from_slice(response).map_err(|_| BodyError::Response)?;
    match response.get("kv_transfer_params") {
        Some(params @ Value::Object(fields)) if !fields.is_empty() => Ok(params.clone()),
        _ => Err(BodyError::MissingParams("kv_transfer_params")),
    }
}

/// vLLM: the decode leg is the original request plus the prefill's params.
pub fn vllm_decode(body: &mut Body, params: Value) {
    body.insert("kv_transfer_params".into(), params);
}

/// SGLang: both legs carry the same rendezvous with the prefill engine.
pub fn sglang(body: &mut Body, host: &str, port: u16, room: u64) {
    body.insert("bootstrap_host".into(), host.into());
    body.insert("bootstrap_port".into(), port.into());
    body.insert("bootstrap_room".into(), room.into());
}

/// TensorRT-LLM: the context leg (it produces the first token itself).
pub fn trtllm_context(body: &Body) -> Body {
    let mut leg = body.clone();
    leg.insert("stream".into(), Value::Bool(false));
    leg.remove("stream_options");
    leg.insert(
        "disaggregated_params".into(),
        serde_json::json!({"request_type": "context_only"}),
    );
    leg
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
    let response: Value = serde_json::from_slice(response).map_err(|_| BodyError::Response)?;
    let choice = response
        .get("choices")
        .and_then(|c| c.get(0))
        .ok_or(BodyError::MissingParams("choices"))?;
    let unfinished = matches!(
        choice.get("finish_reason").and_then(Value::as_str),
        Some("length" | "not_finished")
    );
    if !unfinished {
        return Ok(ContextOutcome::Finished);
    }
    match choice.get("disaggregated_params") {
        Some(Value::Object(fields)) => {
            let mut params = fields.clone();
            params.insert("request_type".into(), "generation_only".into());
            Ok(ContextOutcome::Generate(Value::Object(params)))
        }
        _ => Err(BodyError::MissingParams("disaggregated_params")),
    }
}

/// TensorRT-LLM: the generation leg is the original plus the context's params.
pub fn trtllm_generation(body: &mut Body, params: Value) {
    body.insert("disaggregated_params".into(), params);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn body(value: Value) -> Body {
        parse(value.to_string().as_bytes()).unwrap()
    }

    #[test]
    fn router_fields_from_clients_are_removed() {
        let raw = json!({"model": "m", "prompt": "p", "kv_transfer_params": {"remote_host": "evil"},
            "bootstrap_host": "evil", "bootstrap_port": 1, "bootstrap_room": 2,
            "disaggregated_params": {"request_type": "generation_only"}});
        assert!(may_hold_router_fields(raw.to_string().as_bytes()));
        let mut parsed = body(raw);
        assert!(strip_router_fields(&mut parsed));
        assert_eq!(
            Value::Object(parsed.clone()),
            json!({"model": "m", "prompt": "p"})
        );
        assert!(!strip_router_fields(&mut parsed));
        assert!(!may_hold_router_fields(
            br#"{"model":"m","prompt":"bootstrap"}"#
        ));
        assert_eq!(parse(b"[1]"), Err(BodyError::NotAnObject));
    }

    #[test]
    fn vllm_legs() {
        let original = body(json!({"model": "m", "messages": [], "stream": true,
            "stream_options": {"include_usage": true}, "max_tokens": 50,
            "max_completion_tokens": 50, "min_tokens": 5}));
        let prefill = Value::Object(vllm_prefill(&original));
        assert_eq!(prefill["stream"], false);
        assert_eq!(prefill["max_tokens"], 1);
        assert_eq!(prefill["max_completion_tokens"], 1);
        assert!(prefill.get("stream_options").is_none() && prefill.get("min_tokens").is_none());
        assert_eq!(prefill["kv_transfer_params"]["do_remote_decode"], true);

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
        let mut decode = original.clone();
        vllm_decode(&mut decode, params.clone());
        assert_eq!(decode["stream"], true);
        assert_eq!(decode["kv_transfer_params"], params);
    }

    #[test]
    fn sglang_rendezvous() {
        let mut leg = body(json!({"model": "m", "prompt": "p"}));
        sglang(&mut leg, "10.0.0.5", 8998, 42);
        assert_eq!(
            Value::Object(leg),
            json!({"model": "m", "prompt": "p", "bootstrap_host": "10.0.0.5",
                "bootstrap_port": 8998, "bootstrap_room": 42})
        );
    }

    #[test]
    fn trtllm_legs() {
        let original = body(json!({"model": "m", "prompt": "p", "max_tokens": 20, "stream": true}));
        let context = Value::Object(trtllm_context(&original));
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
        let mut generation = original.clone();
        trtllm_generation(&mut generation, params);
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
