//! Renders chat messages to the prompt string the model sees, with the model's
//! own Jinja template from `tokenizer_config.json`, configured like Hugging
//! Face `apply_chat_template` (trim_blocks, lstrip_blocks, Python string
//! methods, `raise_exception`, Python-style `tojson`).

use std::path::Path;

use minijinja::value::Value;
use minijinja::{Environment, Error as JinjaError, ErrorKind as JinjaErrorKind};
use thiserror::Error;

/// Template used without a model template (byte-level fallback or a
/// `tokenizer_config.json` without `chat_template`): one
/// `<|role|>\ncontent\n` section per message, then `<|assistant|>\n`.
pub const FALLBACK_TEMPLATE: &str =
    "{% for message in messages %}<|{{ message.role }}|>\n{{ message.content }}\n{% endfor %}\
     {% if add_generation_prompt %}<|assistant|>\n{% endif %}";

const TEMPLATE_NAME: &str = "chat";

#[derive(Debug, Error)]
pub enum ChatTemplateError {
    #[error("reading {path}: {message}")]
    Config { path: String, message: String },
    #[error("compiling the chat template: {0}")]
    Compile(String),
    #[error("rendering the chat template: {0}")]
    Render(String),
}

pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl ChatTemplate {
    /// The template from `tokenizer_config.json` beside `tokenizer_json`, or
    /// the fallback when that file is missing or has no `chat_template`.
    pub fn for_tokenizer(tokenizer_json: &Path) -> Result<Self, ChatTemplateError> {
        let config_path = tokenizer_json.with_file_name("tokenizer_config.json");
        let Some(config) = read_config(&config_path)? else {
            tracing::warn!(path = %config_path.display(), "no tokenizer_config.json; using the fallback chat template");
            return Self::fallback();
        };
        let template = template_source(&config).unwrap_or_else(|| {
            tracing::warn!("tokenizer_config.json has no chat_template; using the fallback");
            FALLBACK_TEMPLATE.to_owned()
        });
        Self::from_config(template, &config)
    }

    /// The template of a file an operator named: a `.jinja` template (as
    /// newer models ship `chat_template.jinja`), or a
    /// `tokenizer_config.json`-shaped JSON file of any name. Unlike the
    /// tokenizer's own, it must exist and hold a template, since falling
    /// back would tokenize differently from the engine without anyone
    /// noticing.
    pub fn from_config_file(path: &Path) -> Result<Self, ChatTemplateError> {
        let config_error = |message: &str| ChatTemplateError::Config {
            path: path.display().to_string(),
            message: message.to_owned(),
        };
        if path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("jinja"))
        {
            let source = std::fs::read_to_string(path).map_err(|e| config_error(&e.to_string()))?;
            return Self::new(source, String::new(), String::new());
        }
        let config = read_config(path)?.ok_or_else(|| config_error("no such file"))?;
        let template = template_source(&config).ok_or_else(|| config_error("no chat_template"))?;
        Self::from_config(template, &config)
    }

    fn from_config(
        template: String,
        config: &serde_json::Value,
    ) -> Result<Self, ChatTemplateError> {
        Self::new(
            template,
            special_token(config, "bos_token"),
            special_token(config, "eos_token"),
        )
    }

    pub fn fallback() -> Result<Self, ChatTemplateError> {
        Self::new(FALLBACK_TEMPLATE.to_owned(), String::new(), String::new())
    }

    fn new(
        source: String,
        bos_token: String,
        eos_token: String,
    ) -> Result<Self, ChatTemplateError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_filter("tojson", python_tojson);
        env.add_template_owned(TEMPLATE_NAME, source)
            .map_err(|e| ChatTemplateError::Compile(e.to_string()))?;
        Ok(Self {
            env,
            bos_token,
            eos_token,
        })
    }

    /// Renders `messages` (OpenAI message objects, content already flattened
    /// to strings) with `add_generation_prompt=true`; `kwargs` are the
    /// request's `chat_template_kwargs` (e.g. `enable_thinking`).
    pub fn render(
        &self,
        messages: &[serde_json::Value],
        tools: Option<&serde_json::Value>,
        kwargs: Option<&serde_json::Map<String, serde_json::Value>>,
    ) -> Result<String, ChatTemplateError> {
        self.render_conversation(messages, tools, kwargs, true)
    }

    /// As [`render`](Self::render); without the generation prompt it renders
    /// the conversation as history, as the next turn will contain it.
    pub fn render_conversation(
        &self,
        messages: &[serde_json::Value],
        tools: Option<&serde_json::Value>,
        kwargs: Option<&serde_json::Map<String, serde_json::Value>>,
        add_generation_prompt: bool,
    ) -> Result<String, ChatTemplateError> {
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| ChatTemplateError::Render(e.to_string()))?;
        let mut context = serde_json::Map::new();
        if let Some(kwargs) = kwargs {
            context.extend(kwargs.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        context.insert(
            "messages".into(),
            serde_json::Value::from(messages.to_vec()),
        );
        context.insert("add_generation_prompt".into(), add_generation_prompt.into());
        context.insert("bos_token".into(), self.bos_token.clone().into());
        context.insert("eos_token".into(), self.eos_token.clone().into());
        if let Some(tools) = tools {
            context.insert("tools".into(), tools.clone());
        }
        template
            .render(Value::from_serialize(&context))
            .map_err(|e| ChatTemplateError::Render(e.to_string()))
    }
}

/// A `tokenizer_config.json`-shaped file's JSON, `None` when it does not exist.
fn read_config(path: &Path) -> Result<Option<serde_json::Value>, ChatTemplateError> {
    let config_error = |message: String| ChatTemplateError::Config {
        path: path.display().to_string(),
        message,
    };
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(config_error(e.to_string())),
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| config_error(e.to_string()))
}

/// `chat_template` is a string, or a list of `{name, template}` (pick "default").
fn template_source(config: &serde_json::Value) -> Option<String> {
    match config.get("chat_template")? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Array(named) => named
            .iter()
            .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
            .or_else(|| named.first())
            .and_then(|t| t.get("template"))
            .and_then(|t| t.as_str())
            .map(str::to_owned),
        _ => None,
    }
}

/// A special token is a string or an `AddedToken` object with `content`.
fn special_token(config: &serde_json::Value, key: &str) -> String {
    match config.get(key) {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(obj) => obj
            .get("content")
            .and_then(|c| c.as_str())
            .unwrap_or_default()
            .to_owned(),
        None => String::new(),
    }
}

fn raise_exception(message: String) -> Result<Value, JinjaError> {
    Err(JinjaError::new(JinjaErrorKind::InvalidOperation, message))
}

/// Hugging Face's `tojson`: `json.dumps(x, ensure_ascii=False)` — `", "` and
/// `": "` separators, no HTML escaping (minijinja's own filter differs in both).
fn python_tojson(value: Value) -> Result<Value, JinjaError> {
    let mut out = String::new();
    write_python_json(&value, &mut out)?;
    Ok(Value::from_safe_string(out))
}

fn write_python_json(value: &Value, out: &mut String) -> Result<(), JinjaError> {
    use minijinja::value::ValueKind;
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => out.push_str(&value.to_string()),
        ValueKind::String => {
            let text = value.as_str().unwrap_or_default();
            let quoted = serde_json::to_string(text)
                .map_err(|e| JinjaError::new(JinjaErrorKind::BadSerialization, e.to_string()))?;
            out.push_str(&quoted);
        }
        ValueKind::Seq | ValueKind::Iterable => {
            out.push('[');
            for (i, item) in value.try_iter()?.enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_python_json(&item, out)?;
            }
            out.push(']');
        }
        ValueKind::Map => {
            out.push('{');
            for (i, key) in value.try_iter()?.enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_python_json(&Value::from(key.to_string()), out)?;
                out.push_str(": ");
                write_python_json(&value.get_item(&key)?, out)?;
            }
            out.push('}');
        }
        _ => {
            return Err(JinjaError::new(
                JinjaErrorKind::BadSerialization,
                "value cannot be serialized to JSON",
            ))
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn fallback_template_is_documented_shape() {
        let t = ChatTemplate::fallback().unwrap();
        let rendered = t
            .render(&[json!({"role":"user","content":"hi"})], None, None)
            .unwrap();
        assert_eq!(rendered, "<|user|>\nhi\n<|assistant|>\n");
    }

    #[test]
    fn python_methods_trim_blocks_and_tojson_match_hf() {
        let t = ChatTemplate::new(
            "{% for m in messages %}\n  {%- if m.content.startswith('x') %}{{ m.content.upper() }}{% endif %}\n{% endfor %}{{ tools | tojson }}"
                .into(),
            String::new(),
            String::new(),
        )
        .unwrap();
        let rendered = t
            .render(
                &[json!({"role":"user","content":"xy<"})],
                Some(&json!([{"a": [1, "é"]}])),
                None,
            )
            .unwrap();
        assert_eq!(rendered, "XY<[{\"a\": [1, \"é\"]}]");
    }

    #[test]
    fn raise_exception_fails_rendering() {
        let t = ChatTemplate::new(
            "{{ raise_exception('bad roles') }}".into(),
            String::new(),
            String::new(),
        )
        .unwrap();
        let err = t.render(&[], None, None).unwrap_err();
        assert!(err.to_string().contains("bad roles"));
    }
}
