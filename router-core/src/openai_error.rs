//! OpenAI-shaped error bodies: `{"error":{"message","type","param","code"}}`.

use std::fmt::{self, Write};

use serde::Serialize;

/// Longest message an error body carries. Messages may quote the request
/// (a model name, a value that could not be read): an attacker's 8 MiB
/// value must be neither sent back nor copied whole, escaped twice over,
/// inside a filter VM whose memory never shrinks.
pub const MAX_MESSAGE_BYTES: usize = 512;

/// Formats a message, stopping at [`MAX_MESSAGE_BYTES`] (cut at a character
/// boundary, marked with `…`): formatting ends there, so no copy of a long
/// argument is made. (A serde error already holds the value it quotes; that
/// copy is serde's, made once, and dropped with the error.)
pub fn bounded_message(args: fmt::Arguments<'_>) -> String {
    let mut message = BoundedMessage::default();
    // An error only says the limit was reached.
    let _ = message.write_fmt(args);
    message.text
}

#[derive(Default)]
struct BoundedMessage {
    text: String,
    cut: bool,
}

impl Write for BoundedMessage {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        if self.cut {
            return Err(fmt::Error);
        }
        let room = MAX_MESSAGE_BYTES.saturating_sub(self.text.len());
        if s.len() <= room {
            self.text.push_str(s);
            return Ok(());
        }
        let mut end = room;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        self.text.push_str(&s[..end]);
        self.text.push('…');
        self.cut = true;
        Err(fmt::Error)
    }
}

/// The error classes kvmesh returns to clients, each with its HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// 400: the body is not a valid request.
    InvalidRequest,
    /// 404: the model is not served here.
    ModelNotFound,
    /// 405: an inference path asked with another method than POST.
    MethodNotAllowed,
    /// 413: the body exceeds the configured limit.
    RequestTooLarge,
    /// 503: no worker can take the request.
    NoWorkerAvailable,
}

impl ErrorKind {
    pub fn status(self) -> u16 {
        match self {
            ErrorKind::InvalidRequest => 400,
            ErrorKind::ModelNotFound => 404,
            ErrorKind::MethodNotAllowed => 405,
            ErrorKind::RequestTooLarge => 413,
            ErrorKind::NoWorkerAvailable => 503,
        }
    }

    fn type_name(self) -> &'static str {
        match self {
            ErrorKind::InvalidRequest
            | ErrorKind::RequestTooLarge
            | ErrorKind::MethodNotAllowed => "invalid_request_error",
            ErrorKind::ModelNotFound => "not_found_error",
            ErrorKind::NoWorkerAvailable => "service_unavailable_error",
        }
    }

    fn code(self) -> &'static str {
        match self {
            ErrorKind::InvalidRequest => "invalid_request",
            ErrorKind::ModelNotFound => "model_not_found",
            ErrorKind::MethodNotAllowed => "method_not_allowed",
            ErrorKind::RequestTooLarge => "request_too_large",
            ErrorKind::NoWorkerAvailable => "no_worker_available",
        }
    }
}

#[derive(Serialize)]
struct Envelope<'a> {
    error: Body<'a>,
}

#[derive(Serialize)]
struct Body<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: &'a str,
}

/// Serializes an OpenAI error body. Infallible: the envelope holds only strings.
pub fn error_body(kind: ErrorKind, message: &str, param: Option<&str>) -> String {
    let bounded;
    let message = if message.len() > MAX_MESSAGE_BYTES {
        bounded = bounded_message(format_args!("{message}"));
        &bounded
    } else {
        message
    };
    let envelope = Envelope {
        error: Body {
            message,
            kind: kind.type_name(),
            param,
            code: kind.code(),
        },
    };
    serde_json::to_string(&envelope).unwrap_or_else(|_| {
        r#"{"error":{"message":"internal error","type":"internal_error","param":null,"code":"internal"}}"#
            .to_owned()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_messages_are_cut_at_a_character_boundary() {
        let long = "é".repeat(MAX_MESSAGE_BYTES);
        let message = bounded_message(format_args!("The model '{long}' does not exist."));
        assert!(message.len() <= MAX_MESSAGE_BYTES + '…'.len_utf8());
        assert!(message.starts_with("The model 'éé"));
        assert!(message.ends_with('…'));
        let body: serde_json::Value =
            serde_json::from_str(&error_body(ErrorKind::ModelNotFound, &long, None)).unwrap();
        let sent = body["error"]["message"].as_str().unwrap();
        assert!(sent.len() <= MAX_MESSAGE_BYTES + '…'.len_utf8());
        assert_eq!(bounded_message(format_args!("short {}", 1)), "short 1");
    }

    #[test]
    fn body_has_openai_shape_and_escapes_message() {
        let body = error_body(
            ErrorKind::ModelNotFound,
            "model \"x\" not found",
            Some("model"),
        );
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["error"]["message"], "model \"x\" not found");
        assert_eq!(v["error"]["type"], "not_found_error");
        assert_eq!(v["error"]["code"], "model_not_found");
        assert_eq!(v["error"]["param"], "model");
        assert_eq!(ErrorKind::ModelNotFound.status(), 404);
        assert_eq!(ErrorKind::RequestTooLarge.status(), 413);
    }
}
