//! Chat templates: a model's Jinja chat template, rendered with minijinja the
//! way Hugging Face `transformers` renders it. Shared by the router (templates
//! from the model card) and the engine's offline batch mode (from the model).
//!
//! HF renders with `trim_blocks` and `lstrip_blocks`, passes `messages`,
//! `add_generation_prompt`, `bos_token`, `eos_token` and `tools` (the tool
//! dicts, or none), and offers
//! `raise_exception`. Templates are written for Python's Jinja, so they call
//! Python string and dict methods (`.strip()`, `.startswith()`, `.items()`);
//! [`python_method`] answers the common ones, and `tojson` writes JSON as
//! HF's does (Python's `json.dumps`: `", "` and `": "` between items, no HTML
//! escaping), not as minijinja's built-in does.

use minijinja::value::{Value, ValueKind};
use minijinja::{Environment, Error, ErrorKind, State};
use serde::Serialize;

mod python_json;

const TEMPLATE_NAME: &str = "chat";

/// One message as the template sees it: role, flattened text, and the tool
/// fields HF passes through as the client sent them. Absent tool fields are
/// left out of the dict (not null), so `'tool_calls' in message` and
/// `message.items()` behave as they do in Python.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct TemplateMessage {
    /// `system`, `user`, `assistant` or `tool`.
    pub role: String,
    /// The text content.
    pub content: String,
    /// An assistant turn's calls, OpenAI-shaped
    /// (`{"id", "type": "function", "function": {"name", "arguments"}}`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<serde_json::Value>>,
    /// A `tool` turn: the id of the call it answers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// A `tool` turn: the function's name, when the client gave it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// An assistant turn's reasoning, when the client sent it back beside the content (vLLM's
    /// `reasoning_content`); Qwen3's template renders it in the last turn's think block.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
}

impl TemplateMessage {
    /// A plain text message, without tool fields.
    pub fn text(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self { role: role.into(), content: content.into(), ..Self::default() }
    }
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
        env.add_filter("tojson", python_json::tojson);
        env.set_unknown_method_callback(python_method);
        env.add_template_owned(TEMPLATE_NAME, source.to_owned())?;
        Ok(Self { env, bos_token: bos_token.to_owned(), eos_token: eos_token.to_owned() })
    }

    /// Compiles another template (a request's `chat_template`) that renders
    /// with this one's BOS and EOS tokens, which come from the model, not the
    /// template.
    pub fn with_source(&self, source: &str) -> Result<Self, Error> {
        Self::new(source, &self.bos_token, &self.eos_token)
    }

    /// Renders the conversation followed by the assistant's turn header.
    pub fn render(&self, messages: &[TemplateMessage]) -> Result<String, Error> {
        self.render_with_tools(messages, None)
    }

    /// [`Self::render`] with the tools the model may call (OpenAI tool dicts,
    /// `{"type": "function", "function": {...}}`), passed as HF's `tools`;
    /// `None` renders `tools` as none, as HF does without tools.
    pub fn render_with_tools(
        &self,
        messages: &[TemplateMessage],
        tools: Option<&[serde_json::Value]>,
    ) -> Result<String, Error> {
        self.render_with(messages, &RenderOptions { tools, ..RenderOptions::default() })
    }

    /// Renders with every HF `apply_chat_template` option in `options`.
    ///
    /// `continue_final_message` renders without the generation prompt and
    /// cuts the text right after the last message's content, as HF does, so
    /// the model continues that message instead of starting a new turn.
    pub fn render_with(&self, messages: &[TemplateMessage], options: &RenderOptions<'_>) -> Result<String, Error> {
        let template = self.env.get_template(TEMPLATE_NAME)?;
        let extra = options.kwargs.map(Value::from_serialize).unwrap_or_default();
        // Explicit variables come first: minijinja resolves a name in the
        // first context that has it, so kwargs cannot replace `messages`.
        let rendered = template.render(minijinja::context! {
            messages => messages,
            tools => options.tools,
            add_generation_prompt => options.add_generation_prompt && !options.continue_final_message,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
            ..extra
        })?;
        if !options.continue_final_message {
            return Ok(rendered);
        }
        let last = messages.last().map_or("", |m| m.content.as_str());
        cut_after_final_message(rendered, last)
    }
}

/// How to render a chat, beyond the messages: HF's `apply_chat_template`
/// options. The default is what a plain chat request renders.
#[derive(Debug, Clone, Copy)]
pub struct RenderOptions<'a> {
    /// OpenAI tool dicts for the template's `tools`; `None` renders none.
    pub tools: Option<&'a [serde_json::Value]>,
    /// End with the assistant's turn header (default true).
    pub add_generation_prompt: bool,
    /// Leave the last message open for the model to continue (default false);
    /// wins over `add_generation_prompt`.
    pub continue_final_message: bool,
    /// Extra template variables (vLLM's `chat_template_kwargs`, e.g. `enable_thinking`).
    pub kwargs: Option<&'a serde_json::Map<String, serde_json::Value>>,
}

impl Default for RenderOptions<'_> {
    fn default() -> Self {
        Self { tools: None, add_generation_prompt: true, continue_final_message: false, kwargs: None }
    }
}

/// HF's `continue_final_message` cut: the text up to the end of the last
/// occurrence of the final message's content. Templates may strip the
/// content, so it is searched stripped, and kept with its leading spaces
/// removed only when the template kept them.
fn cut_after_final_message(rendered: String, final_message: &str) -> Result<String, Error> {
    let stripped = final_message.trim();
    let Some(at) = rendered.rfind(stripped) else {
        return Err(Error::new(
            ErrorKind::InvalidOperation,
            "continue_final_message is set but the final message does not appear in the rendered chat",
        ));
    };
    let lstripped = final_message.trim_start();
    let keep = if rendered[at..].starts_with(lstripped) { lstripped.len() } else { stripped.len() };
    let mut rendered = rendered;
    rendered.truncate(at + keep);
    Ok(rendered)
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
        TemplateMessage::text(role, content)
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
    fn generation_prompt_off_and_continue_final_message() {
        let t = ChatTemplate::new(CHATML, "<s>", "</s>").unwrap();
        let off = RenderOptions { add_generation_prompt: false, ..RenderOptions::default() };
        assert_eq!(t.render_with(&[msg("user", "Hi")], &off).unwrap(), "<|im_start|>user\nHi<|im_end|>\n");
        let cont = RenderOptions { continue_final_message: true, ..RenderOptions::default() };
        let out = t.render_with(&[msg("user", "Hi"), msg("assistant", "Hello, ")], &cont).unwrap();
        assert_eq!(out, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello, ");
        // A template that strips the content: the cut keeps what it rendered.
        let strip = ChatTemplate::new("{% for m in messages %}[{{ m.content.strip() }}]{% endfor %}", "", "").unwrap();
        assert_eq!(strip.render_with(&[msg("assistant", " ab ")], &cont).unwrap(), "[ab");
        // A template that drops the content entirely cannot be continued.
        let drop = ChatTemplate::new("{% for m in messages %}{{ m.role }}{% endfor %}", "", "").unwrap();
        assert!(drop.render_with(&[msg("assistant", "xyz")], &cont).is_err());
    }

    #[test]
    fn kwargs_become_variables_but_never_replace_the_standard_ones() {
        let src = "{{ messages | length }}{% if enable_thinking is defined %}:{{ enable_thinking }}{% endif %}";
        let t = ChatTemplate::new(src, "", "").unwrap();
        let kwargs = serde_json::json!({"enable_thinking": false, "messages": []});
        let options = RenderOptions { kwargs: kwargs.as_object(), ..RenderOptions::default() };
        assert_eq!(t.render_with(&[msg("user", "Hi")], &options).unwrap(), "1:False");
        assert_eq!(t.render(&[msg("user", "Hi")]).unwrap(), "1");
    }

    #[test]
    fn with_source_keeps_the_models_special_tokens() {
        let t = ChatTemplate::new(CHATML, "<s>", "</s>").unwrap();
        let other = t.with_source("{{ bos_token }}{{ messages[0].content }}{{ eos_token }}").unwrap();
        assert_eq!(other.render(&[msg("user", "Hi")]).unwrap(), "<s>Hi</s>");
        assert!(t.with_source("{% if %}").is_err());
    }

    #[test]
    fn raise_exception_fails_the_render() {
        let src = "{% if messages[0].role != 'user' %}{{ raise_exception('user first') }}{% endif %}";
        let t = ChatTemplate::new(src, "", "").unwrap();
        let err = t.render(&[msg("assistant", "a")]).unwrap_err();
        assert!(err.to_string().contains("user first"), "{err}");
    }

    /// Prints tools, assistant tool calls and tool results the way HF
    /// templates (Qwen2.5, Hermes) read them.
    const TOOLS: &str = "{% if tools %}TOOLS:{% for t in tools %}[{{ t.function.name }}: {{ t.function.description }}]{% endfor %}|{% endif %}{% for m in messages %}{{ m.role }}:{% if m.tool_calls %}{% for c in m.tool_calls %}<call {{ c.id }} {{ c.function.name }} {{ c.function.arguments }}>{% endfor %}{% elif m.role == 'tool' %}<result {{ m.tool_call_id }}>{{ m.content }}{% else %}{{ m.content }}{% endif %}|{% endfor %}";

    #[test]
    fn renders_tools_tool_calls_and_tool_results() {
        let t = ChatTemplate::new(TOOLS, "", "").unwrap();
        let tools = [
            serde_json::json!({"type": "function", "function": {"name": "get_weather", "description": "Weather now"}}),
        ];
        let call = serde_json::json!({"id": "call_1", "type": "function",
                                      "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}});
        let messages = [
            msg("user", "Weather?"),
            TemplateMessage { tool_calls: Some(vec![call]), ..msg("assistant", "") },
            TemplateMessage { tool_call_id: Some("call_1".into()), ..msg("tool", "sunny") },
        ];
        let out = t.render_with_tools(&messages, Some(&tools)).unwrap();
        assert_eq!(
            out,
            "TOOLS:[get_weather: Weather now]|user:Weather?|assistant:<call call_1 get_weather {\"city\": \"Paris\"}>|tool:<result call_1>sunny|"
        );
        // Without tools the template sees none, and messages keep only role and content.
        assert_eq!(t.render(&[msg("user", "Hi")]).unwrap(), "user:Hi|");
    }
}
