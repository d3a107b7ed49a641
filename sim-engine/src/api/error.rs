//! OpenAI-shaped error responses.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use router_core::openai_error::{error_body, ErrorKind};

#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    body: String,
}

impl ApiError {
    pub fn invalid(message: impl AsRef<str>, param: Option<&str>) -> Self {
        Self::from_kind(ErrorKind::InvalidRequest, message.as_ref(), param)
    }

    pub fn model_not_found(model: &str) -> Self {
        Self::from_kind(
            ErrorKind::ModelNotFound,
            &format!("The model `{model}` does not exist."),
            Some("model"),
        )
    }

    /// HTTP 404 for a debug or transfer resource that does not exist.
    pub fn not_found(message: String) -> Self {
        let body = serde_json::json!({
            "error": {
                "message": message,
                "type": "not_found_error",
                "param": null,
                "code": "not_found",
            }
        });
        Self {
            status: StatusCode::NOT_FOUND,
            body: body.to_string(),
        }
    }

    /// HTTP 500 (router-core has no internal-error kind: kvmesh itself never
    /// returns one, only engines do).
    pub fn internal(message: &str) -> Self {
        let body = serde_json::json!({
            "error": {
                "message": message,
                "type": "internal_server_error",
                "param": null,
                "code": "internal_error",
            }
        });
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            body: body.to_string(),
        }
    }

    fn from_kind(kind: ErrorKind, message: &str, param: Option<&str>) -> Self {
        Self {
            status: StatusCode::from_u16(kind.status()).unwrap_or(StatusCode::BAD_REQUEST),
            body: error_body(kind, message, param),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            [(header::CONTENT_TYPE, "application/json")],
            self.body,
        )
            .into_response()
    }
}
