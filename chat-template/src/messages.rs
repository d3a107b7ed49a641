//! OpenAI chat messages as engines normalize them before templating.

use serde_json::Value;
use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum MessageError {
    #[error("each message must be an object")]
    NotAnObject,
    #[error("each message needs a string role")]
    MissingRole,
    #[error("message content must be a string or a list of parts")]
    InvalidContent,
}

/// Message content may be a string, null (→ ""), or a list of parts whose
/// text parts are joined with newlines, as vLLM does for string templates.
pub fn flatten_message(message: &Value) -> Result<Value, MessageError> {
    let object = message.as_object().ok_or(MessageError::NotAnObject)?;
    if !object.get("role").is_some_and(Value::is_string) {
        return Err(MessageError::MissingRole);
    }
    let content = match object.get("content") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(text)) => text.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter(|part| part.get("type").and_then(Value::as_str) == Some("text"))
            .filter_map(|part| part.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join("\n"),
        Some(_) => return Err(MessageError::InvalidContent),
    };
    let mut flattened = object.clone();
    flattened.insert("content".into(), Value::String(content));
    Ok(Value::Object(flattened))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn flattens_every_content_shape() {
        let parts = json!({"role": "user", "content": [
            {"type": "text", "text": "a"}, {"type": "image_url"}, {"type": "text", "text": "b"}]});
        assert_eq!(flatten_message(&parts).unwrap()["content"], "a\nb");
        let null = json!({"role": "assistant", "content": null, "tool_calls": []});
        let flat = flatten_message(&null).unwrap();
        assert_eq!(flat["content"], "");
        assert!(flat["tool_calls"].is_array(), "other fields are kept");
        assert_eq!(flatten_message(&json!("x")), Err(MessageError::NotAnObject));
        assert_eq!(
            flatten_message(&json!({"content": "x"})),
            Err(MessageError::MissingRole)
        );
        assert_eq!(
            flatten_message(&json!({"role": "user", "content": 5})),
            Err(MessageError::InvalidContent)
        );
    }
}
