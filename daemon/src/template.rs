//! Chat templates: the Jinja template that turns `messages` into a prompt,
//! rendered with minijinja (the engine Hugging Face templates are written
//! for). Taken from, in order: the model's `chat_template` setting in the
//! daemon config, `chat_template` in the model directory's `ember.toml`,
//! `tokenizer_config.json`'s `chat_template`, else a plain "Role: text" template for base models such as the
//! demo models (which also stops generation at the next "\nUser:").

use std::path::Path;

use minijinja::{Environment, ErrorKind};
use serde::Serialize;

use crate::api::Message;

/// The template for models without one.
pub const DEFAULT_TEMPLATE: &str = "{% for m in messages %}\
{% if m.role == 'system' %}{{ m.content }}\n\n\
{% else %}{{ m.role | capitalize }}: {{ m.content }}\n{% endif %}\
{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}";

/// A compiled chat template.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    bos: String,
    eos: String,
    stops: Vec<String>,
}

#[derive(Serialize)]
struct Ctx<'a> {
    messages: &'a [Message],
    add_generation_prompt: bool,
    bos_token: &'a str,
    eos_token: &'a str,
}

#[derive(Debug, Default, serde::Deserialize)]
struct TokenizerConfig {
    chat_template: Option<serde_json::Value>,
    bos_token: Option<serde_json::Value>,
    eos_token: Option<serde_json::Value>,
}

fn token_text(v: &Option<serde_json::Value>) -> String {
    match v {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Object(o)) => o
            .get("content")
            .and_then(|c| c.as_str())
            .unwrap_or_default()
            .to_string(),
        _ => String::new(),
    }
}

impl ChatTemplate {
    /// The template for the model in `dir`: `configured` (daemon config), else
    /// `from_model` (its ember.toml), else its tokenizer_config.json, else the default.
    pub fn for_model(
        dir: &Path,
        configured: Option<&str>,
        from_model: Option<&str>,
    ) -> Result<ChatTemplate, String> {
        let cfg: TokenizerConfig = std::fs::read_to_string(dir.join("tokenizer_config.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default();
        let from_file = match &cfg.chat_template {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            // A list of named templates: take "default".
            Some(serde_json::Value::Array(list)) => list.iter().find_map(|t| {
                (t.get("name")?.as_str()? == "default")
                    .then(|| t.get("template")?.as_str().map(String::from))
                    .flatten()
            }),
            _ => None,
        };
        let (source, stops) = match (configured.or(from_model), from_file) {
            (Some(c), _) => (c.to_string(), vec![]),
            (None, Some(f)) => (f, vec![]),
            (None, None) => (DEFAULT_TEMPLATE.to_string(), vec!["\nUser:".to_string()]),
        };
        ChatTemplate::new(
            source,
            token_text(&cfg.bos_token),
            token_text(&cfg.eos_token),
            stops,
        )
    }

    fn new(
        source: String,
        bos: String,
        eos: String,
        stops: Vec<String>,
    ) -> Result<ChatTemplate, String> {
        let mut env = Environment::new();
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_template_owned("chat", source)
            .map_err(|e| format!("chat template does not compile: {e}"))?;
        Ok(ChatTemplate {
            env,
            bos,
            eos,
            stops,
        })
    }

    /// The prompt for `messages`, ending where the assistant's reply starts.
    pub fn render(&self, messages: &[Message]) -> Result<String, String> {
        let t = self.env.get_template("chat").map_err(|e| e.to_string())?;
        t.render(minijinja::value::Serde(Ctx {
            messages,
            add_generation_prompt: true,
            bos_token: &self.bos,
            eos_token: &self.eos,
        }))
        .map_err(|e| format!("the chat template refused these messages: {e}"))
    }

    /// Stop sequences the template implies.
    pub fn stops(&self) -> &[String] {
        &self.stops
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msgs(v: &[(&str, &str)]) -> Vec<Message> {
        v.iter()
            .map(|(r, c)| Message {
                role: r.to_string(),
                content: c.to_string(),
            })
            .collect()
    }

    #[test]
    fn default_template_renders_roles() {
        let d = tempfile::tempdir().unwrap();
        let t = ChatTemplate::for_model(d.path(), None, None).unwrap();
        let p = t
            .render(&msgs(&[
                ("system", "Be brief."),
                ("user", "Who made light?"),
            ]))
            .unwrap();
        assert_eq!(p, "Be brief.\n\nUser: Who made light?\nAssistant:");
        assert_eq!(t.stops(), ["\nUser:"]);
    }

    #[test]
    fn tokenizer_config_template_is_used_and_can_refuse() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("tokenizer_config.json"),
            r#"{"bos_token": "<s>", "chat_template": "{{ bos_token }}{% for m in messages %}{% if m.role == 'tool' %}{{ raise_exception('no tools') }}{% endif %}[{{ m.role }}]{{ m.content }}{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"}"#,
        )
        .unwrap();
        let t = ChatTemplate::for_model(d.path(), None, None).unwrap();
        assert_eq!(
            t.render(&msgs(&[("user", "hi")])).unwrap(),
            "<s>[user]hi[assistant]"
        );
        let e = t.render(&msgs(&[("tool", "x")])).unwrap_err();
        assert!(e.contains("no tools"), "{e}");
        assert!(ChatTemplate::for_model(d.path(), Some("{% for %}"), None).is_err());
        let t =
            ChatTemplate::for_model(d.path(), None, Some("<{{ messages[0].content }}>")).unwrap();
        assert_eq!(t.render(&msgs(&[("user", "hi")])).unwrap(), "<hi>");
    }
}
