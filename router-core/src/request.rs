//! Parsing of OpenAI completion and chat requests, as far as routing needs them.
//!
//! Bodies are untrusted: every failure is a typed [`RequestError`] that maps to
//! an OpenAI error response; nothing here panics. Unknown fields are ignored so
//! engine-specific extensions pass through untouched.
//!
//! Memory is bounded by the body, not by its shape. Nothing is parsed into a
//! generic JSON tree (which costs ~80× a body of tiny nested values): the
//! prompt is read by typed visitors straight into what routing keeps, fields
//! routing ignores are skipped without allocating, a batch keeps only the
//! prompt it is routed by, and element counts are capped.
//!
//! The body is scanned once at the top level, which splits a chat's
//! messages out as raw JSON; each message is then parsed and digested from
//! its own bytes (the digests key the prompt cache), so no pass reads the
//! whole body a second time.

use std::collections::HashMap;

use serde::de::{self, DeserializeSeed, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;
use thiserror::Error;
use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

use crate::openai_error::{bounded_message, error_body, ErrorKind};

pub mod lax;

/// Which OpenAI endpoint a request targets; decides the body's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Completions,
    ChatCompletions,
}

/// Whether `body` is a JSON object, as far as its first byte tells: serde's
/// derive reads a struct from a JSON array too, field by field in order.
pub fn is_json_object(body: &[u8]) -> bool {
    body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{')
}

/// Header on a filter's `/v1/tokenize` call naming the body's field the
/// engine reads the prompt from ([`Endpoint::prompt_field`]): a body may
/// carry both, and a chat engine ignores a stray `prompt` (and a
/// completions engine stray `messages`).
pub const PROMPT_FIELD_HEADER: &str = "x-kvmesh-prompt-field";

impl Endpoint {
    /// The body field this endpoint's engines read the prompt from.
    pub fn prompt_field(self) -> &'static str {
        match self {
            Self::Completions => "prompt",
            Self::ChatCompletions => "messages",
        }
    }

    /// The endpoint whose engines read the prompt from `field`.
    pub fn from_prompt_field(field: &[u8]) -> Option<Self> {
        [Self::Completions, Self::ChatCompletions]
            .into_iter()
            .find(|endpoint| endpoint.prompt_field().as_bytes() == field)
    }

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
    /// A batch of text prompts in one completions request, routed by its
    /// first prompt (the only one kept).
    TextBatch(String),
    /// A batch of token-id prompts, routed by its first (the only one kept).
    TokenBatch(Vec<u32>),
    Chat(Vec<ChatMessage>),
}

impl Prompt {
    /// Whether the prompt may be prefilled on another worker. Not a batch:
    /// an engine's prefill leg answers with the transfer parameters of its
    /// first prompt only, and the decode leg would apply them to every one.
    pub fn can_prefill_remotely(&self) -> bool {
        !matches!(self, Prompt::TextBatch(_) | Prompt::TokenBatch(_))
    }

    /// Token ids the engine will see without tokenization, if the client sent them.
    pub fn token_ids(&self) -> Option<&[u32]> {
        match self {
            Prompt::Tokens(tokens) | Prompt::TokenBatch(tokens) => Some(tokens),
            _ => None,
        }
    }
}

/// Body fields that steer a prefill/decode handshake, or the data-parallel
/// rank that serves a request (SGLang's `routed_dp_rank` and its older
/// name `data_parallel_rank`, as the `X-Data-Parallel-Rank` header does):
/// only the router may set them (a client's could make an engine fetch KV
/// from any host, crash a connector that expects the router's shape, or
/// pick a rank the router did not). vLLM also reads `kv_transfer_params`
/// and `ec_transfer_params` (its encoder-cache transfer) from `vllm_xargs`,
/// which is refused when it names one.
pub const HANDSHAKE_FIELDS: [&str; 9] = [
    "kv_transfer_params",
    "ec_transfer_params",
    "bootstrap_host",
    "bootstrap_port",
    "bootstrap_room",
    "disagg_prefill_dp_rank",
    "disaggregated_params",
    "routed_dp_rank",
    "data_parallel_rank",
];

/// Most token ids one prompt may hold: more than any model's context, and a
/// bound on what a body of single-digit ids can make the router store.
pub const MAX_PROMPT_TOKENS: usize = 1 << 20;

/// Most messages one chat request may hold.
pub const MAX_MESSAGES: usize = 1 << 16;
/// Most content parts one chat request may hold, over all its messages.
pub const MAX_CONTENT_PARTS: usize = 1 << 16;

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    #[serde(default)]
    pub content: Option<MessageContent>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

/// One part of a multi-part message; non-text parts keep only their kind.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: PartKind,
    #[serde(default)]
    pub text: Option<String>,
}

/// The `type` of a content part: only text matters to routing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PartKind {
    Text,
    /// Images, audio, files, ...: their bytes are not part of the routed text.
    Other,
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
    /// `cache_salt`: isolates this request's KV blocks from every request
    /// with another (or no) salt, as the engines do.
    pub cache_salt: Option<String>,
    /// The client sent one of [`HANDSHAKE_FIELDS`] (matched by parsed key,
    /// whatever its escaping), even as `null`.
    pub has_handshake_fields: bool,
    /// Digests of the prompt's JSON as the client sent it.
    pub raw_digests: RawDigests,
}

/// xxh3 digests of a prompt's raw JSON, which the prompt cache keys its
/// tokenizations by (`routing::prompt_cache`): a client that re-sends the
/// same bytes gets the same digests.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum RawDigests {
    /// Token-id prompts and batches, which need no tokenization.
    #[default]
    None,
    /// The `prompt` string, quotes and escapes included.
    Text(u64),
    Chat {
        /// `tools` then `chat_template_kwargs` (`null` when absent),
        /// chained: they change how every message renders.
        context: u64,
        /// One per message, in order.
        messages: Vec<u64>,
    },
}

#[derive(Debug, Error)]
pub enum RequestError {
    #[error("request body of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error("request body is required")]
    EmptyBody,
    #[error("request body must be a JSON object")]
    NotAnObject,
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
        // serde's errors quote the value they could not read, whole.
        let message = bounded_message(format_args!("{self}"));
        (kind.status(), error_body(kind, &message, self.param()))
    }
}

/// The top level of a request: the prompt fields stay raw (borrowed from
/// the body) until the endpoint says which one to read.
#[derive(Deserialize)]
struct RawRequest<'a> {
    model: Option<String>,
    #[serde(borrow, default)]
    prompt: Option<&'a RawValue>,
    #[serde(borrow, default)]
    messages: Option<RawMessages<'a>>,
    #[serde(borrow, default)]
    tools: Option<&'a RawValue>,
    #[serde(borrow, default)]
    chat_template_kwargs: Option<&'a RawValue>,
    #[serde(default, deserialize_with = "lax::flag")]
    stream: bool,
    #[serde(default, deserialize_with = "lax::count")]
    max_tokens: Option<u32>,
    #[serde(default, deserialize_with = "lax::count")]
    max_completion_tokens: Option<u32>,
    user: Option<String>,
    cache_salt: Option<String>,
    #[serde(default)]
    kv_transfer_params: Present,
    #[serde(default)]
    ec_transfer_params: Present,
    #[serde(default)]
    bootstrap_host: Present,
    #[serde(default)]
    bootstrap_port: Present,
    #[serde(default)]
    bootstrap_room: Present,
    #[serde(default)]
    disagg_prefill_dp_rank: Present,
    #[serde(default)]
    disaggregated_params: Present,
    #[serde(default)]
    routed_dp_rank: Present,
    #[serde(default)]
    data_parallel_rank: Present,
    /// vLLM's extra sampling arguments: only their keys matter here.
    #[serde(default)]
    vllm_xargs: Option<HashMap<String, de::IgnoredAny>>,
}

impl RawRequest<'_> {
    /// Digest of what renders every message: the tools and the template
    /// arguments.
    fn chat_context(&self) -> u64 {
        [self.tools, self.chat_template_kwargs]
            .iter()
            .fold(0, |digest, part| {
                let raw = part.map_or("null", RawValue::get);
                xxh3_64_with_seed(raw.as_bytes(), digest)
            })
    }

    fn has_handshake_fields(&self) -> bool {
        [
            self.kv_transfer_params,
            self.ec_transfer_params,
            self.bootstrap_host,
            self.bootstrap_port,
            self.bootstrap_room,
            self.disagg_prefill_dp_rank,
            self.disaggregated_params,
            self.routed_dp_rank,
            self.data_parallel_rank,
        ]
        .contains(&Present(true))
    }

    /// A handshake field inside `vllm_xargs` cannot be removed by a
    /// top-level rewrite, so such a request is refused.
    fn smuggles_handshake_fields(&self) -> bool {
        self.vllm_xargs
            .iter()
            .flat_map(HashMap::keys)
            .any(|key| HANDSHAKE_FIELDS.contains(&key.as_str()))
    }
}

/// Whether a field was in the body, whatever its value (`null` included);
/// the value is skipped without being stored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Present(bool);

impl<'de> Deserialize<'de> for Present {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        de::IgnoredAny::deserialize(deserializer).map(|_| Present(true))
    }
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
    if !is_json_object(body) {
        return Err(RequestError::NotAnObject);
    }
    let mut raw: RawRequest<'_> =
        serde_json::from_slice(body).map_err(RequestError::InvalidJson)?;
    let has_handshake_fields = raw.has_handshake_fields();
    if raw.smuggles_handshake_fields() {
        return Err(RequestError::InvalidField {
            field: "vllm_xargs",
            reason: "must not set handshake fields such as kv_transfer_params",
        });
    }
    let model = raw
        .model
        .take()
        .ok_or(RequestError::MissingField("model"))?;
    if model.is_empty() {
        return Err(RequestError::InvalidField {
            field: "model",
            reason: "must not be empty",
        });
    }
    let (prompt, raw_digests) = match endpoint {
        Endpoint::Completions => {
            let prompt = parse_prompt(raw.prompt)?;
            let digests = match (&prompt, raw.prompt) {
                (Prompt::Text(_), Some(text)) => RawDigests::Text(xxh3_64(text.get().as_bytes())),
                _ => RawDigests::None,
            };
            (prompt, digests)
        }
        Endpoint::ChatCompletions => {
            let context = raw.chat_context();
            let (messages, digests) = parse_messages(raw.messages)?;
            let digests = RawDigests::Chat {
                context,
                messages: digests,
            };
            (Prompt::Chat(messages), digests)
        }
    };
    Ok(InferenceRequest {
        model,
        prompt,
        has_handshake_fields,
        raw_digests,
        stream: raw.stream,
        max_tokens: raw.max_completion_tokens.or(raw.max_tokens),
        user: raw.user,
        cache_salt: raw.cache_salt,
    })
}

fn parse_prompt(value: Option<&RawValue>) -> Result<Prompt, RequestError> {
    let value = value.ok_or(RequestError::MissingField("prompt"))?;
    let raw = value.get();
    // Every token but the last is followed by a comma: sizing the token
    // vector once keeps its growth from holding two copies at a time. The
    // first of a batch of token arrays ends at the first `]`.
    let commas = |bytes: &[u8]| bytes.iter().filter(|&&b| b == b',').count() + 1;
    let head = raw
        .as_bytes()
        .split(|&b| b == b']')
        .next()
        .unwrap_or_default();
    let visitor = PromptVisitor {
        tokens_bound: commas(raw.as_bytes()),
        head_bound: commas(head),
    };
    let mut de = serde_json::Deserializer::from_str(raw);
    de.deserialize_any(visitor)
        .map_err(|_| RequestError::InvalidField {
            field: "prompt",
            reason: "must be a string, an array of at most 1048576 token ids, or a batch of either",
        })
}

fn invalid_messages() -> RequestError {
    RequestError::InvalidField {
        field: "messages",
        reason: "must be an array of {role, content} objects (at most 65536 messages and 65536 content parts)",
    }
}

/// The chat's messages, and the digest of each one's raw JSON.
fn parse_messages(
    value: Option<RawMessages<'_>>,
) -> Result<(Vec<ChatMessage>, Vec<u64>), RequestError> {
    let raw = match value.ok_or(RequestError::MissingField("messages"))? {
        RawMessages::List(raw) => raw,
        RawMessages::Invalid => return Err(invalid_messages()),
    };
    if raw.is_empty() {
        return Err(RequestError::InvalidField {
            field: "messages",
            reason: "must contain at least one message",
        });
    }
    let mut messages = Vec::with_capacity(raw.len());
    let mut digests = Vec::with_capacity(raw.len());
    let mut parts = 0usize;
    for message in raw {
        let json = message.get();
        let parsed: ChatMessage = serde_json::from_str(json).map_err(|_| invalid_messages())?;
        if let Some(MessageContent::Parts(p)) = &parsed.content {
            parts = parts.saturating_add(p.len());
        }
        if parts > MAX_CONTENT_PARTS {
            return Err(invalid_messages());
        }
        digests.push(xxh3_64(json.as_bytes()));
        messages.push(parsed);
    }
    Ok((messages, digests))
}

/// `prompt`: a string, token ids, or a batch of either. The first element
/// of an array decides which; the rest must match it.
struct PromptVisitor {
    /// At least as many as the token ids the prompt can hold.
    tokens_bound: usize,
    /// At least as many as the first array of a batch can hold.
    head_bound: usize,
}

impl<'de> Visitor<'de> for PromptVisitor {
    type Value = Prompt;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a string, an array of token ids, or a batch of either")
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<Prompt, E> {
        Ok(Prompt::Text(text.to_owned()))
    }

    fn visit_string<E: de::Error>(self, text: String) -> Result<Prompt, E> {
        Ok(Prompt::Text(text))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Prompt, A::Error> {
        let head = BatchHeadSeed {
            tokens_bound: self.head_bound,
        };
        match seq.next_element_seed(head)? {
            // `[]`: an empty token prompt, which engines accept as such.
            None => Ok(Prompt::Tokens(Vec::new())),
            Some(BatchHead::Token(first)) => {
                let mut tokens = Vec::with_capacity(self.tokens_bound.min(MAX_PROMPT_TOKENS));
                tokens.push(first);
                while let Some(token) = seq.next_element::<u32>()? {
                    push_token(&mut tokens, token)?;
                }
                Ok(Prompt::Tokens(tokens))
            }
            // A batch of one is one prompt (it may be prefilled remotely).
            Some(BatchHead::Text(first)) => Ok(if more_prompts::<StrOnly, _>(&mut seq)? {
                Prompt::TextBatch(first)
            } else {
                Prompt::Text(first)
            }),
            Some(BatchHead::Tokens(first)) => Ok(if more_prompts::<TokensOnly, _>(&mut seq)? {
                Prompt::TokenBatch(first)
            } else {
                Prompt::Tokens(first)
            }),
        }
    }
}

/// Reads a batch's remaining prompts (checked, not kept); true if it had any.
fn more_prompts<'de, T: Deserialize<'de>, A: SeqAccess<'de>>(
    seq: &mut A,
) -> Result<bool, A::Error> {
    let mut more = false;
    while seq.next_element::<T>()?.is_some() {
        more = true;
    }
    Ok(more)
}

/// The first element of a `prompt` array.
enum BatchHead {
    Token(u32),
    Text(String),
    Tokens(Vec<u32>),
}

/// Reads a [`BatchHead`], sizing a token array by `tokens_bound`.
struct BatchHeadSeed {
    tokens_bound: usize,
}

impl<'de> DeserializeSeed<'de> for BatchHeadSeed {
    type Value = BatchHead;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<BatchHead, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for BatchHeadSeed {
    type Value = BatchHead;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a token id, a string or an array of token ids")
    }

    fn visit_u64<E: de::Error>(self, token: u64) -> Result<BatchHead, E> {
        u32::try_from(token)
            .map(BatchHead::Token)
            .map_err(|_| E::custom("token id out of range"))
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<BatchHead, E> {
        Ok(BatchHead::Text(text.to_owned()))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<BatchHead, A::Error> {
        let mut tokens = Vec::with_capacity(self.tokens_bound.min(MAX_PROMPT_TOKENS));
        while let Some(token) = seq.next_element::<u32>()? {
            push_token(&mut tokens, token)?;
        }
        Ok(BatchHead::Tokens(tokens))
    }
}

fn push_token<E: de::Error>(tokens: &mut Vec<u32>, token: u32) -> Result<(), E> {
    if tokens.len() == MAX_PROMPT_TOKENS {
        return Err(E::custom("too many token ids"));
    }
    tokens.push(token);
    Ok(())
}

/// A string checked and dropped without being copied out of the parser.
struct StrOnly;

impl<'de> Deserialize<'de> for StrOnly {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct StrVisitor;
        impl Visitor<'_> for StrVisitor {
            type Value = StrOnly;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string")
            }

            fn visit_str<E: de::Error>(self, _: &str) -> Result<StrOnly, E> {
                Ok(StrOnly)
            }
        }
        deserializer.deserialize_str(StrVisitor)
    }
}

/// An array of token ids checked and dropped without being stored.
struct TokensOnly;

impl<'de> Deserialize<'de> for TokensOnly {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TokensVisitor;
        impl<'de> Visitor<'de> for TokensVisitor {
            type Value = TokensOnly;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an array of token ids")
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<TokensOnly, A::Error> {
                while seq.next_element::<u32>()?.is_some() {}
                Ok(TokensOnly)
            }
        }
        deserializer.deserialize_seq(TokensVisitor)
    }
}

/// The `messages` field split into its elements' raw JSON, in the body's
/// one top-level pass. Anything else is kept as invalid rather than failing
/// the whole body: only the chat endpoint reads the field.
enum RawMessages<'a> {
    List(Vec<&'a RawValue>),
    /// Not an array, or more than [`MAX_MESSAGES`] elements.
    Invalid,
}

impl<'de: 'a, 'a> Deserialize<'de> for RawMessages<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(RawMessagesVisitor(std::marker::PhantomData))
    }
}

struct RawMessagesVisitor<'a>(std::marker::PhantomData<&'a ()>);

impl<'de: 'a, 'a> Visitor<'de> for RawMessagesVisitor<'a> {
    type Value = RawMessages<'a>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an array of messages")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut messages = Vec::new();
        while let Some(message) = seq.next_element::<&'de RawValue>()? {
            if messages.len() == MAX_MESSAGES {
                while seq.next_element::<de::IgnoredAny>()?.is_some() {}
                return Ok(RawMessages::Invalid);
            }
            messages.push(message);
        }
        Ok(RawMessages::List(messages))
    }

    fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        while map
            .next_entry::<de::IgnoredAny, de::IgnoredAny>()?
            .is_some()
        {}
        Ok(RawMessages::Invalid)
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(RawMessages::Invalid)
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Ok(RawMessages::Invalid)
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Ok(RawMessages::Invalid)
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Ok(RawMessages::Invalid)
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
        Ok(RawMessages::Invalid)
    }
}

impl<'de> Deserialize<'de> for MessageContent {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ContentVisitor;
        impl<'de> Visitor<'de> for ContentVisitor {
            type Value = MessageContent;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string or an array of content parts")
            }

            fn visit_str<E: de::Error>(self, text: &str) -> Result<MessageContent, E> {
                Ok(MessageContent::Text(text.to_owned()))
            }

            fn visit_string<E: de::Error>(self, text: String) -> Result<MessageContent, E> {
                Ok(MessageContent::Text(text))
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<MessageContent, A::Error> {
                let mut parts = Vec::new();
                while let Some(part) = seq.next_element::<ContentPart>()? {
                    if parts.len() == MAX_CONTENT_PARTS {
                        return Err(de::Error::custom("too many content parts"));
                    }
                    parts.push(part);
                }
                Ok(MessageContent::Parts(parts))
            }
        }
        deserializer.deserialize_any(ContentVisitor)
    }
}

impl<'de> Deserialize<'de> for PartKind {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KindVisitor;
        impl Visitor<'_> for KindVisitor {
            type Value = PartKind;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a content part type")
            }

            fn visit_str<E: de::Error>(self, kind: &str) -> Result<PartKind, E> {
                Ok(if kind == "text" {
                    PartKind::Text
                } else {
                    PartKind::Other
                })
            }
        }
        deserializer.deserialize_str(KindVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: usize = 1 << 20;

    fn parse(endpoint: Endpoint, body: &str) -> Result<InferenceRequest, RequestError> {
        parse_request(endpoint, body.as_bytes(), LIMIT)
    }

    #[test]
    fn each_endpoint_names_its_prompt_field() {
        for endpoint in [Endpoint::Completions, Endpoint::ChatCompletions] {
            let field = endpoint.prompt_field().as_bytes();
            assert_eq!(Endpoint::from_prompt_field(field), Some(endpoint));
        }
        assert_eq!(Endpoint::from_prompt_field(b"Prompt"), None);
    }

    #[test]
    fn only_an_object_is_a_request() {
        let array = r#"["qwen3","hi",null,null,null,false,2,null,null,null,{"x":1}]"#;
        for body in [array, " [] ", "\"qwen3\"", "7"] {
            let err = parse(Endpoint::Completions, body).unwrap_err();
            assert!(matches!(err, RequestError::NotAnObject), "{body}: {err}");
            assert_eq!(err.to_response().0, 400);
        }
        assert!(matches!(
            parse(Endpoint::Completions, " \n "),
            Err(RequestError::EmptyBody)
        ));
    }

    #[test]
    fn an_error_quotes_at_most_a_bounded_part_of_the_request() {
        let huge = format!(
            r#"{{"model":"m","prompt":"x","stream":"{}"}}"#,
            "\\\"".repeat(100_000)
        );
        let (status, body) = parse(Endpoint::Completions, &huge)
            .unwrap_err()
            .to_response();
        assert_eq!(status, 400);
        // JSON escaping may grow the cut message up to 6× (`\u00XX`).
        let bound = 6 * crate::openai_error::MAX_MESSAGE_BYTES + 200;
        assert!(body.len() < bound, "{}", body.len());
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

    /// Engines validate with pydantic's lax mode (`lax`), and so does this.
    #[test]
    fn loosely_typed_scalars_read_as_the_engines_read_them() {
        let r = parse(
            Endpoint::Completions,
            r#"{"model":"m","prompt":[1],"stream":"true","max_tokens":"5","max_completion_tokens":6.0}"#,
        )
        .unwrap();
        assert_eq!((r.stream, r.max_tokens), (true, Some(6)));
        let err = parse(
            Endpoint::Completions,
            r#"{"model":"m","prompt":[1],"stream":"maybe"}"#,
        )
        .unwrap_err();
        assert_eq!(err.to_response().0, 400);
        assert!(err.to_string().contains("maybe"), "{err}");
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
        assert_eq!(texts.prompt, Prompt::TextBatch("a".into()));
        assert!(!texts.prompt.can_prefill_remotely());
        // A batch of one is one prompt.
        let one = parse(Endpoint::Completions, r#"{"model":"m","prompt":["a"]}"#).unwrap();
        assert_eq!(one.prompt, Prompt::Text("a".into()));
        let one = parse(Endpoint::Completions, r#"{"model":"m","prompt":[[4,5]]}"#).unwrap();
        assert_eq!(one.prompt, Prompt::Tokens(vec![4, 5]));
        assert!(one.prompt.can_prefill_remotely());
        for mixed in [
            r#"["a",[1]]"#,
            r#"[[1],"a"]"#,
            r#"[1,"a"]"#,
            r#"[[1],[-1]]"#,
        ] {
            let body = format!(r#"{{"model":"m","prompt":{mixed}}}"#);
            assert!(parse(Endpoint::Completions, &body).is_err(), "{mixed}");
        }
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
    fn salt_and_handshake_fields_are_read_by_parsed_key() {
        let plain = parse(Endpoint::Completions, r#"{"model":"m","prompt":"p"}"#).unwrap();
        assert!(!plain.has_handshake_fields);
        assert_eq!(plain.cache_salt, None);
        for field in HANDSHAKE_FIELDS {
            let escaped: String = field
                .chars()
                .map(|c| {
                    if c == 's' || c == '_' {
                        format!("\\u{:04x}", c as u32)
                    } else {
                        c.to_string()
                    }
                })
                .collect();
            for key in [field.to_owned(), escaped] {
                for value in ["null", "{}", "1", r#""h""#] {
                    let body = format!(r#"{{"model":"m","prompt":"p","{key}":{value}}}"#);
                    let request = parse(Endpoint::Completions, &body).unwrap();
                    assert!(request.has_handshake_fields, "{body}");
                }
            }
            // Two spellings of one key are a duplicate field, not a bypass.
            let twice = format!(r#"{{"model":"m","prompt":"p","{field}":1,"{field}":2}}"#);
            assert!(parse(Endpoint::Completions, &twice).is_err());
        }
        let salted = parse(
            Endpoint::ChatCompletions,
            r#"{"model":"m","cache_\u0073alt":"tenant","messages":[{"role":"user","content":"hi"}]}"#,
        )
        .unwrap();
        assert_eq!(salted.cache_salt.as_deref(), Some("tenant"));
    }

    /// vLLM copies `vllm_xargs` into the request's extra arguments and takes
    /// `kv_transfer_params` from there: a value a connector does not expect
    /// (`""`) kills its engine core.
    #[test]
    fn handshake_fields_inside_vllm_xargs_are_refused() {
        for key in [
            "kv_transfer_params",
            r"kv_tr\u0061nsfer_params",
            "ec_transfer_params",
        ] {
            let body = format!(r#"{{"model":"m","prompt":"p","vllm_xargs":{{"a":1,"{key}":""}}}}"#);
            let err = parse(Endpoint::Completions, &body).expect_err(&body);
            let (status, json) = err.to_response();
            assert_eq!(status, 400, "{body}");
            assert!(json.contains(r#""param":"vllm_xargs""#), "{json}");
        }
        let fine = parse(
            Endpoint::Completions,
            r#"{"model":"m","prompt":"p","vllm_xargs":{"temperature_boost":2,"x":[1]}}"#,
        )
        .unwrap();
        assert!(!fine.has_handshake_fields);
        assert!(parse(
            Endpoint::Completions,
            r#"{"model":"m","prompt":"p","vllm_xargs":null}"#
        )
        .is_ok());
    }

    #[test]
    fn raw_digests_cover_each_message_and_the_text_prompt_as_sent() {
        let chat = parse(
            Endpoint::ChatCompletions,
            r#"{"model":"m","messages":[{"role":"user","content":"a"}, {"role":"user","content":"b"}]}"#,
        )
        .unwrap();
        let RawDigests::Chat { messages, .. } = &chat.raw_digests else {
            panic!("expected chat digests: {:?}", chat.raw_digests)
        };
        assert_eq!(
            messages,
            &[
                xxh3_64(br#"{"role":"user","content":"a"}"#),
                xxh3_64(br#"{"role":"user","content":"b"}"#)
            ]
        );
        let text = parse(Endpoint::Completions, r#"{"model":"m","prompt":"hi\n"}"#).unwrap();
        assert_eq!(text.raw_digests, RawDigests::Text(xxh3_64(br#""hi\n""#)));
        for tokens in [r#"[1,2]"#, r#"[[1],[2]]"#, r#"["a","b"]"#] {
            let body = format!(r#"{{"model":"m","prompt":{tokens}}}"#);
            let request = parse(Endpoint::Completions, &body).unwrap();
            assert_eq!(request.raw_digests, RawDigests::None, "{tokens}");
        }
    }

    #[test]
    fn only_the_chat_endpoint_reads_messages() {
        for messages in ["{}", "1", r#""x""#, "true", r#"[{"role":"user"},1]"#] {
            let body = format!(r#"{{"model":"m","prompt":"p","messages":{messages}}}"#);
            assert!(parse(Endpoint::Completions, &body).is_ok(), "{body}");
            let err = parse(Endpoint::ChatCompletions, &body).unwrap_err();
            assert_eq!(err.param(), Some("messages"), "{body}");
        }
        let too_many = format!(
            r#"{{"model":"m","messages":[{}]}}"#,
            vec!["{}"; MAX_MESSAGES + 1].join(",")
        );
        let err = parse(Endpoint::ChatCompletions, &too_many).unwrap_err();
        assert_eq!(err.param(), Some("messages"));
        assert!(
            parse(Endpoint::Completions, &too_many).is_err(),
            "no prompt"
        );
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
