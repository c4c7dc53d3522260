//! Chat templates: a model's Jinja chat template, rendered with minijinja the
//! way Hugging Face `transformers` renders it. Shared by the router (templates
//! from the model card) and the engine's offline batch mode (from the model).
//!
//! HF renders with `trim_blocks` and `lstrip_blocks`, passes `messages`,
//! `add_generation_prompt`, `bos_token` and `eos_token`, and offers
//! `raise_exception`. Templates are written for Python's Jinja, so they call
//! Python string and dict methods (`.strip()`, `.startswith()`, `.items()`);
//! [`python_method`] answers the common ones.

use minijinja::value::{Value, ValueKind};
use minijinja::{Environment, Error, ErrorKind, State};
use serde::Serialize;

const TEMPLATE_NAME: &str = "chat";

/// One message as the template sees it: role and flattened text.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct TemplateMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text content.
    pub content: String,
}

/// A compiled chat template. Rendering takes `&self`, so one is shared by all
/// requests without a lock.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles `source`; fails when it is not valid Jinja.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self, Error> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.add_function("raise_exception", raise_exception);
        env.set_unknown_method_callback(python_method);
        env.add_template_owned(TEMPLATE_NAME, source.to_owned())?;
        Ok(Self { env, bos_token: bos_token.to_owned(), eos_token: eos_token.to_owned() })
    }

    /// Renders the conversation followed by the assistant's turn header.
    pub fn render(&self, messages: &[TemplateMessage]) -> Result<String, Error> {
        let template = self.env.get_template(TEMPLATE_NAME)?;
        template.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => true,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        })
    }
}

/// `raise_exception(msg)`: templates call it to reject a conversation.
fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// Python methods on strings and dicts that HF templates rely on.
pub fn python_method(_state: &State, value: &Value, method: &str, args: &[Value]) -> Result<Value, Error> {
    if let Some(s) = value.as_str() {
        return string_method(s, method, args);
    }
    if value.kind() == ValueKind::Map {
        return map_method(value, method, args);
    }
    Err(Error::from(ErrorKind::UnknownMethod))
}

fn string_method(s: &str, method: &str, args: &[Value]) -> Result<Value, Error> {
    let arg = |i: usize| args.get(i).and_then(Value::as_str);
    let trim_set = |c: char| arg(0).map_or(c.is_whitespace(), |set| set.contains(c));
    let out = match method {
        "strip" => Value::from(s.trim_matches(trim_set)),
        "lstrip" => Value::from(s.trim_start_matches(trim_set)),
        "rstrip" => Value::from(s.trim_end_matches(trim_set)),
        "upper" => Value::from(s.to_uppercase()),
        "lower" => Value::from(s.to_lowercase()),
        "startswith" => Value::from(arg(0).is_some_and(|p| s.starts_with(p))),
        "endswith" => Value::from(arg(0).is_some_and(|p| s.ends_with(p))),
        "replace" => match (arg(0), arg(1)) {
            (Some(from), Some(to)) => Value::from(s.replace(from, to)),
            _ => return Err(Error::new(ErrorKind::MissingArgument, "replace(old, new)")),
        },
        "split" => match arg(0) {
            Some(sep) => s.split(sep).map(Value::from).collect(),
            None => s.split_whitespace().map(Value::from).collect(),
        },
        _ => return Err(Error::from(ErrorKind::UnknownMethod)),
    };
    Ok(out)
}

fn map_method(map: &Value, method: &str, args: &[Value]) -> Result<Value, Error> {
    let keys: Vec<Value> = map.try_iter()?.collect();
    let out = match method {
        "keys" => keys.into_iter().collect(),
        "values" => keys.iter().map(|k| map.get_item(k)).collect::<Result<Vec<_>, _>>()?.into(),
        "items" => keys
            .iter()
            .map(|k| Ok(Value::from(vec![k.clone(), map.get_item(k)?])))
            .collect::<Result<Vec<_>, Error>>()?
            .into(),
        "get" => {
            let key = args.first().cloned().unwrap_or_default();
            let found = map.get_item(&key)?;
            if found.is_undefined() {
                args.get(1).cloned().unwrap_or(Value::from(()))
            } else {
                found
            }
        }
        _ => return Err(Error::from(ErrorKind::UnknownMethod)),
    };
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: &str, content: &str) -> TemplateMessage {
        TemplateMessage { role: role.into(), content: content.into() }
    }

    const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn renders_chatml_with_generation_prompt() {
        let t = ChatTemplate::new(CHATML, "<s>", "</s>").unwrap();
        let out = t.render(&[msg("user", "Hi")]).unwrap();
        assert_eq!(out, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
    }

    #[test]
    fn python_methods_and_bos_work() {
        let src = "{{ bos_token }}{% for m in messages %}{% if m.content.startswith('x') %}{{ m.content.strip().upper() }}{% endif %}{% for k, v in m.items() %}[{{k}}]{% endfor %}{% endfor %}";
        let t = ChatTemplate::new(src, "<s>", "</s>").unwrap();
        let out = t.render(&[msg("user", "xy  ")]).unwrap();
        assert_eq!(out, "<s>XY[role][content]");
    }

    #[test]
    fn raise_exception_fails_the_render() {
        let src = "{% if messages[0].role != 'user' %}{{ raise_exception('user first') }}{% endif %}";
        let t = ChatTemplate::new(src, "", "").unwrap();
        let err = t.render(&[msg("assistant", "a")]).unwrap_err();
        assert!(err.to_string().contains("user first"), "{err}");
    }
}
