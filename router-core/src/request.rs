//! Parsing of OpenAI completion and chat requests, as far as routing needs them.
//!
//! Bodies are untrusted: every failure is a typed [`RequestError`] that maps to
//! an OpenAI error response; nothing here panics. Unknown fields are ignored so
//! engine-specific extensions pass through untouched.

use serde::Deserialize;
use thiserror::Error;

use crate::openai_error::{error_body, ErrorKind};

/// Which OpenAI endpoint a request targets; decides the body's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Completions,
    ChatCompletions,
}

impl Endpoint {
    /// Recognizes routable paths, ignoring any query string.
    pub fn from_path(path: &str) -> Option<Self> {
        let path = path.split_once('?').map_or(path, |(p, _)| p);
        match path {
            "/v1/completions" => Some(Self::Completions),
            "/v1/chat/completions" => Some(Self::ChatCompletions),
            _ => None,
        }
    }
}

/// What the model is asked to continue.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
    /// A batch of prompts in one completions request; routed by the first.
    TextBatch(Vec<String>),
    TokenBatch(Vec<Vec<u32>>),
    Chat(Vec<ChatMessage>),
}

impl Prompt {
    /// Token ids the engine will see without tokenization, if the client sent them.
    pub fn token_ids(&self) -> Option<&[u32]> {
        match self {
            Prompt::Tokens(tokens) => Some(tokens),
            Prompt::TokenBatch(batch) => batch.first().map(Vec::as_slice),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    #[serde(default)]
    pub content: Option<MessageContent>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

/// One part of a multi-part message; non-text parts keep only their type.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

/// The routing-relevant view of one request.
#[derive(Debug, Clone, PartialEq)]
pub struct InferenceRequest {
    pub model: String,
    pub prompt: Prompt,
    pub stream: bool,
    pub max_tokens: Option<u32>,
    /// `user` field: a stable client hint usable for session affinity.
    pub user: Option<String>,
}

#[derive(Debug, Error)]
pub enum RequestError {
    #[error("request body of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error("request body is required")]
    EmptyBody,
    #[error("request body is not valid JSON: {0}")]
    InvalidJson(#[source] serde_json::Error),
    #[error("missing required field '{0}'")]
    MissingField(&'static str),
    #[error("field '{field}' is invalid: {reason}")]
    InvalidField {
        field: &'static str,
        reason: &'static str,
    },
}

impl RequestError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            RequestError::TooLarge { .. } => ErrorKind::RequestTooLarge,
            _ => ErrorKind::InvalidRequest,
        }
    }

    fn param(&self) -> Option<&'static str> {
        match self {
            RequestError::MissingField(field) | RequestError::InvalidField { field, .. } => {
                Some(field)
            }
            _ => None,
        }
    }

    /// HTTP status and OpenAI error body for this error.
    pub fn to_response(&self) -> (u16, String) {
        let kind = self.kind();
        (
            kind.status(),
            error_body(kind, &self.to_string(), self.param()),
        )
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawPrompt {
    Text(String),
    Tokens(Vec<u32>),
    TextBatch(Vec<String>),
    TokenBatch(Vec<Vec<u32>>),
}

#[derive(Deserialize)]
struct RawRequest {
    model: Option<String>,
    prompt: Option<serde_json::Value>,
    messages: Option<serde_json::Value>,
    #[serde(default)]
    stream: Option<bool>,
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    user: Option<String>,
}

/// Parses a request body for `endpoint`, rejecting bodies over `limit` bytes.
pub fn parse_request(
    endpoint: Endpoint,
    body: &[u8],
    limit: usize,
) -> Result<InferenceRequest, RequestError> {
    if body.len() > limit {
        return Err(RequestError::TooLarge {
            size: body.len(),
            limit,
        });
    }
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(RequestError::EmptyBody);
    }
    let raw: RawRequest = serde_json::from_slice(body).map_err(RequestError::InvalidJson)?;
    let model = raw.model.ok_or(RequestError::MissingField("model"))?;
    if model.is_empty() {
        return Err(RequestError::InvalidField {
            field: "model",
            reason: "must not be empty",
        });
    }
    let prompt = match endpoint {
        Endpoint::Completions => parse_prompt(raw.prompt)?,
        Endpoint::ChatCompletions => parse_messages(raw.messages)?,
    };
    Ok(InferenceRequest {
        model,
        prompt,
        stream: raw.stream.unwrap_or(false),
        max_tokens: raw.max_completion_tokens.or(raw.max_tokens),
        user: raw.user,
    })
}

fn parse_prompt(value: Option<serde_json::Value>) -> Result<Prompt, RequestError> {
    let value = value.ok_or(RequestError::MissingField("prompt"))?;
    let raw: RawPrompt = serde_json::from_value(value).map_err(|_| RequestError::InvalidField {
        field: "prompt",
        reason: "must be a string, an array of token ids, or a batch of either",
    })?;
    let prompt = match raw {
        RawPrompt::Text(text) => Prompt::Text(text),
        RawPrompt::Tokens(tokens) => Prompt::Tokens(tokens),
        RawPrompt::TextBatch(batch) => Prompt::TextBatch(batch),
        RawPrompt::TokenBatch(batch) => Prompt::TokenBatch(batch),
    };
    let empty_batch = matches!(&prompt, Prompt::TextBatch(b) if b.is_empty())
        || matches!(&prompt, Prompt::TokenBatch(b) if b.is_empty());
    if empty_batch {
        return Err(RequestError::InvalidField {
            field: "prompt",
            reason: "must not be an empty batch",
        });
    }
    Ok(prompt)
}

fn parse_messages(value: Option<serde_json::Value>) -> Result<Prompt, RequestError> {
    let value = value.ok_or(RequestError::MissingField("messages"))?;
    let messages: Vec<ChatMessage> =
        serde_json::from_value(value).map_err(|_| RequestError::InvalidField {
            field: "messages",
            reason: "must be an array of {role, content} objects",
        })?;
    if messages.is_empty() {
        return Err(RequestError::InvalidField {
            field: "messages",
            reason: "must contain at least one message",
        });
    }
    Ok(Prompt::Chat(messages))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: usize = 1 << 20;

    fn parse(endpoint: Endpoint, body: &str) -> Result<InferenceRequest, RequestError> {
        parse_request(endpoint, body.as_bytes(), LIMIT)
    }

    #[test]
    fn completions_with_token_ids() {
        let r = parse(
            Endpoint::Completions,
            r#"{"model":"qwen3","prompt":[1,2,3],"max_tokens":5,"stream":true,"extra":{"x":1}}"#,
        )
        .unwrap();
        assert_eq!(r.model, "qwen3");
        assert_eq!(r.prompt.token_ids(), Some(&[1u32, 2, 3][..]));
        assert!(r.stream);
        assert_eq!(r.max_tokens, Some(5));
    }

    #[test]
    fn completions_text_and_batches() {
        let text = parse(Endpoint::Completions, r#"{"model":"m","prompt":"hi"}"#).unwrap();
        assert_eq!(text.prompt, Prompt::Text("hi".into()));
        assert_eq!(text.prompt.token_ids(), None);
        let batch = parse(
            Endpoint::Completions,
            r#"{"model":"m","prompt":[[4,5],[6]]}"#,
        )
        .unwrap();
        assert_eq!(batch.prompt.token_ids(), Some(&[4u32, 5][..]));
        let texts = parse(Endpoint::Completions, r#"{"model":"m","prompt":["a","b"]}"#).unwrap();
        assert_eq!(
            texts.prompt,
            Prompt::TextBatch(vec!["a".into(), "b".into()])
        );
    }

    #[test]
    fn chat_messages_with_text_and_parts() {
        let r = parse(
            Endpoint::ChatCompletions,
            r#"{"model":"m","max_completion_tokens":7,"max_tokens":3,"messages":[
                {"role":"system","content":"be brief"},
                {"role":"user","content":[{"type":"text","text":"hello"},{"type":"image_url","image_url":{}}]},
                {"role":"assistant","content":null,"tool_calls":[]}]}"#,
        )
        .unwrap();
        assert_eq!(r.max_tokens, Some(7), "max_completion_tokens wins");
        let Prompt::Chat(messages) = r.prompt else {
            panic!("expected chat")
        };
        assert_eq!(messages.len(), 3);
        assert_eq!(
            messages[0].content,
            Some(MessageContent::Text("be brief".into()))
        );
        assert!(matches!(&messages[1].content, Some(MessageContent::Parts(p)) if p.len() == 2));
        assert_eq!(messages[2].content, None);
    }

    #[test]
    fn errors_map_to_openai_statuses() {
        let cases: [(&[u8], u16, Option<&str>); 9] = [
            (b"{not json", 400, None),
            (b"", 400, None),
            (b"[1,2]", 400, None),
            (b"\xff\xfe{}", 400, None),
            (br#"{"prompt":[1]}"#, 400, Some("model")),
            (br#"{"model":"","prompt":[1]}"#, 400, Some("model")),
            (br#"{"model":"m"}"#, 400, Some("prompt")),
            (br#"{"model":"m","prompt":[-1]}"#, 400, Some("prompt")),
            (br#"{"model":"m","prompt":[]}"#, 400, Some("prompt")),
        ];
        for (body, status, param) in cases {
            // `[]` parses as an empty token prompt, which is valid; skip the batch check there.
            let result = parse_request(Endpoint::Completions, body, LIMIT);
            if body == br#"{"model":"m","prompt":[]}"# {
                assert!(result.is_ok());
                continue;
            }
            let err = result.expect_err(&String::from_utf8_lossy(body));
            let (got_status, json) = err.to_response();
            assert_eq!(got_status, status, "{}", String::from_utf8_lossy(body));
            let v: serde_json::Value = serde_json::from_str(&json).unwrap();
            assert!(v["error"]["message"].is_string());
            assert_eq!(v["error"]["param"].as_str(), param);
        }
    }

    #[test]
    fn too_large_is_413() {
        let err = parse_request(Endpoint::Completions, &[b' '; 11], 10).unwrap_err();
        assert_eq!(err.to_response().0, 413);
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_stack_overflow() {
        let depth = 100_000;
        let body = format!(
            r#"{{"model":"m","prompt":{}1{}}}"#,
            "[".repeat(depth),
            "]".repeat(depth)
        );
        let err = parse(Endpoint::Completions, &body).unwrap_err();
        assert_eq!(err.to_response().0, 400);
    }

    #[test]
    fn chat_requires_nonempty_messages() {
        for body in [
            r#"{"model":"m"}"#,
            r#"{"model":"m","messages":[]}"#,
            r#"{"model":"m","messages":[{"content":"x"}]}"#,
        ] {
            let err = parse(Endpoint::ChatCompletions, body).unwrap_err();
            assert_eq!(err.to_response().0, 400, "{body}");
        }
    }

    proptest::proptest! {
        /// Untrusted bodies never panic the parser, whatever their bytes.
        #[test]
        fn arbitrary_bodies_never_panic(body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
            let _ = parse_request(Endpoint::Completions, &body, LIMIT);
            let _ = parse_request(Endpoint::ChatCompletions, &body, LIMIT);
        }

        #[test]
        fn json_like_bodies_never_panic(body in r#"\{("model":"[a-z]{0,3}",)?("prompt"|"messages"):(\[[0-9,\[\]"a-z{}:-]{0,40}\]|"[a-z]{0,5}"|null|-?[0-9]{1,20})\}"#) {
            let _ = parse_request(Endpoint::Completions, body.as_bytes(), LIMIT);
            let _ = parse_request(Endpoint::ChatCompletions, body.as_bytes(), LIMIT);
        }
    }

    #[test]
    fn endpoint_from_path() {
        assert_eq!(
            Endpoint::from_path("/v1/completions"),
            Some(Endpoint::Completions)
        );
        assert_eq!(
            Endpoint::from_path("/v1/chat/completions?x=1"),
            Some(Endpoint::ChatCompletions)
        );
        assert_eq!(Endpoint::from_path("/v1/models"), None);
    }
}
