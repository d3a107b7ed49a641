//! OpenAI-shaped error bodies: `{"error":{"message","type","param","code"}}`.

use serde::Serialize;

/// The error classes kvmesh returns to clients, each with its HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// 400: the body is not a valid request.
    InvalidRequest,
    /// 404: the model is not served here.
    ModelNotFound,
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
            ErrorKind::RequestTooLarge => 413,
            ErrorKind::NoWorkerAvailable => 503,
        }
    }

    fn type_name(self) -> &'static str {
        match self {
            ErrorKind::InvalidRequest | ErrorKind::RequestTooLarge => "invalid_request_error",
            ErrorKind::ModelNotFound => "not_found_error",
            ErrorKind::NoWorkerAvailable => "service_unavailable_error",
        }
    }

    fn code(self) -> &'static str {
        match self {
            ErrorKind::InvalidRequest => "invalid_request",
            ErrorKind::ModelNotFound => "model_not_found",
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
