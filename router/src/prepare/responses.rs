//! OpenAI's stateless Responses API on the chat path: a [`ResponsesRequest`] becomes the
//! [`ChatCompletionRequest`] it means (instructions and input items as messages, flat function
//! tools as chat tools, `text.format` as `response_format`), which [`validate_chat`] then
//! renders, tokenizes and checks as it does any chat request. Refusals of that chat request are
//! renamed into the Responses API's terms, so `param` names the field the client sent.

use std::collections::HashMap;

use constraint::api::{JsonSchemaFormat, ResponseFormat};
use serde::Serialize;
use serde_json::{json, Map, Value};
use utoipa::ToSchema;

use crate::fleet::model::Model;
use crate::prepare::error::ValidationError;
use crate::prepare::request::responses::ResponsesRequest;
use crate::prepare::request::{ChatCompletionRequest, ChatMessage, ChatNotHonoured, CommonParams, MessageContent};
use crate::prepare::validate::{validate_chat, ValidRequest};

/// Most `metadata` pairs, as OpenAI allows.
const MAX_METADATA: usize = 16;

/// The request's settings as the response object repeats them.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Echo {
    /// The system message put first, as sent.
    pub instructions: Option<String>,
    /// As sent; null means up to the context length.
    pub max_output_tokens: Option<i64>,
    /// As sent, else 1.
    pub temperature: f64,
    /// As sent, else 1.
    pub top_p: f64,
    /// The function tools, as sent.
    #[schema(value_type = Vec<Object>)]
    pub tools: Vec<Value>,
    /// As sent, else `auto`.
    pub tool_choice: Value,
    /// Always true: only true is accepted.
    pub parallel_tool_calls: bool,
    /// `{"format": ...}` as sent, else `{"format": {"type": "text"}}`.
    #[schema(value_type = Object)]
    pub text: Value,
    /// As sent, else `{}`.
    #[schema(value_type = Object)]
    pub metadata: Map<String, Value>,
    /// `{"effort", "summary": null}`.
    #[schema(value_type = Object)]
    pub reasoning: Value,
    /// Always `disabled`.
    pub truncation: &'static str,
    /// As sent.
    pub user: Option<String>,
    /// Always false: nothing is kept.
    pub store: bool,
    /// Always false: the router answers while the client waits.
    pub background: bool,
}

/// A Responses API request ready to run as a chat request, and what its answer echoes.
#[derive(Debug)]
pub struct ValidResponses {
    /// The chat request it was translated into, validated.
    pub valid: ValidRequest,
    /// The settings the response object repeats.
    pub echo: Echo,
}

/// Validates a Responses API request: refuses what it cannot honour, translates the rest onto
/// chat and validates that.
pub fn validate_responses(model: &Model, req: ResponsesRequest) -> Result<ValidResponses, ValidationError> {
    req.not_honoured.check()?;
    let echo = echo(&req)?;
    let chat = to_chat(req)?;
    let valid = validate_chat(model, chat).map_err(in_responses_terms)?;
    Ok(ValidResponses { valid, echo })
}

fn echo(req: &ResponsesRequest) -> Result<Echo, ValidationError> {
    let metadata = match &req.metadata {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(pairs)) if pairs.len() <= MAX_METADATA && pairs.values().all(Value::is_string) => {
            pairs.clone()
        }
        Some(other) => return Err(out_of_range("metadata", "an object of at most 16 string values", other)),
    };
    let text = req.text.clone().filter(|t| !t.is_null()).unwrap_or_else(|| json!({"format": {"type": "text"}}));
    let effort = req.reasoning.as_ref().and_then(|r| r.get("effort")).cloned().unwrap_or(Value::Null);
    Ok(Echo {
        instructions: req.instructions.clone(),
        max_output_tokens: req.max_output_tokens,
        temperature: req.temperature.unwrap_or(1.0),
        top_p: req.top_p.unwrap_or(1.0),
        tools: req.tools.as_ref().and_then(Value::as_array).cloned().unwrap_or_default(),
        tool_choice: req.tool_choice.clone().filter(|c| !c.is_null()).unwrap_or_else(|| json!("auto")),
        parallel_tool_calls: true,
        text,
        metadata,
        reasoning: json!({"effort": effort, "summary": null}),
        truncation: "disabled",
        user: req.user.clone(),
        store: false,
        background: false,
    })
}

/// The chat request a Responses API request means.
fn to_chat(req: ResponsesRequest) -> Result<ChatCompletionRequest, ValidationError> {
    let mut messages: Vec<ChatMessage> = req.instructions.map(|text| message("system", text)).into_iter().collect();
    messages.extend(input_messages(req.input)?);
    Ok(ChatCompletionRequest {
        model: req.model,
        messages: Some(messages),
        tools: chat_tools(req.tools)?,
        tool_choice: chat_tool_choice(req.tool_choice)?,
        reasoning_effort: reasoning_effort(req.reasoning)?,
        safety_identifier: req.safety_identifier,
        params: CommonParams {
            max_completion_tokens: req.max_output_tokens,
            temperature: req.temperature,
            top_p: req.top_p,
            stream: req.stream,
            user: req.user,
            response_format: response_format(req.text)?,
            priority: req.priority,
            cache_salt: req.cache_salt,
            request_id: req.request_id,
            ..CommonParams::default()
        },
        chat_not_honoured: ChatNotHonoured {
            parallel_tool_calls: req.parallel_tool_calls,
            ..ChatNotHonoured::default()
        },
        ..ChatCompletionRequest::default()
    })
}

fn message(role: &str, text: String) -> ChatMessage {
    ChatMessage {
        role: role.to_owned(),
        content: Some(MessageContent::Text(text)),
        tool_calls: None,
        tool_call_id: None,
        name: None,
        reasoning_content: None,
    }
}

/// `input` as chat messages: a string is one user message; a list's items become messages in
/// order, a `function_call` joining the assistant message before it (as a chat answer holds its
/// text and calls together), a `function_call_output` becoming a tool message, a `reasoning`
/// item's text the next assistant message's `reasoning_content`.
fn input_messages(input: Option<Value>) -> Result<Vec<ChatMessage>, ValidationError> {
    let items = match input {
        None | Some(Value::Null) => return Err(ValidationError::Missing { field: "input" }),
        Some(Value::String(text)) => return Ok(vec![message("user", text)]),
        Some(Value::Array(items)) if items.is_empty() => return Err(ValidationError::Empty { field: "input" }),
        Some(Value::Array(items)) => items,
        Some(other) => return Err(out_of_range("input", "a string or a list of items", other)),
    };
    let mut messages: Vec<ChatMessage> = Vec::with_capacity(items.len());
    let mut call_names: HashMap<String, String> = HashMap::new();
    let mut reasoning: Option<String> = None;
    for (index, item) in items.into_iter().enumerate() {
        let bad = |reason: String| ValidationError::InputItem { index, reason };
        let Value::Object(item) = item else { return Err(bad("must be an object".into())) };
        let string = |key: &str| match item.get(key) {
            Some(Value::String(s)) => Ok(s.clone()),
            _ => Err(bad(format!("`{key}` must be a string"))),
        };
        match item.get("type").map(|t| t.as_str()) {
            None | Some(Some("message")) => {
                let role = string("role")?;
                if !matches!(role.as_str(), "user" | "assistant" | "system" | "developer") {
                    return Err(bad(format!("`role` must be one of user, assistant, system, developer, not `{role}`")));
                }
                let text = content_text(item.get("content")).map_err(bad)?;
                let mut message = message(&role, text);
                if role == "assistant" {
                    message.reasoning_content = reasoning.take();
                }
                messages.push(message);
            }
            Some(Some("function_call")) => {
                let (call_id, name, arguments) = (string("call_id")?, string("name")?, string("arguments")?);
                call_names.insert(call_id.clone(), name.clone());
                let call =
                    json!({"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}});
                match messages.last_mut().filter(|m| m.role == "assistant") {
                    Some(assistant) => assistant.tool_calls.get_or_insert_with(Vec::new).push(call),
                    None => messages.push(ChatMessage {
                        content: None,
                        tool_calls: Some(vec![call]),
                        reasoning_content: reasoning.take(),
                        ..message("assistant", String::new())
                    }),
                }
            }
            Some(Some("function_call_output")) => {
                let call_id = string("call_id")?;
                let output = match item.get("output") {
                    Some(Value::String(text)) => text.clone(),
                    parts @ Some(Value::Array(_)) => content_text(parts).map_err(bad)?,
                    _ => return Err(bad("`output` must be a string or a list of text parts".into())),
                };
                messages.push(ChatMessage {
                    tool_call_id: Some(call_id.clone()),
                    name: call_names.get(&call_id).cloned(),
                    ..message("tool", output)
                });
            }
            Some(Some("reasoning")) => {
                let text = match item.get("content") {
                    None | Some(Value::Null) => String::new(),
                    parts => content_text(parts).map_err(bad)?,
                };
                reasoning = Some(text);
            }
            Some(Some(kind)) => {
                return Err(bad(format!(
                    "items of type `{kind}` are not supported; only messages, `function_call`, \
                     `function_call_output` and `reasoning` (this router keeps no items to reference)"
                )))
            }
            Some(None) => return Err(bad("`type` must be a string".into())),
        }
    }
    Ok(messages)
}

/// A message's `content` (or a call output's, or a reasoning item's) as text: a string, or the
/// texts of its text parts joined.
fn content_text(content: Option<&Value>) -> Result<String, String> {
    let parts = match content {
        Some(Value::String(text)) => return Ok(text.clone()),
        Some(Value::Array(parts)) => parts,
        _ => return Err("`content` must be a string or a list of text parts".into()),
    };
    let mut text = String::new();
    for part in parts {
        let kind = part.get("type").and_then(Value::as_str);
        if !matches!(kind, Some("input_text" | "output_text" | "reasoning_text" | "text")) {
            return Err(format!(
                "content parts of type `{}` are not supported, only text parts",
                kind.unwrap_or("(none)")
            ));
        }
        match part.get("text") {
            Some(Value::String(part)) => text.push_str(part),
            _ => return Err("a text part's `text` must be a string".into()),
        }
    }
    Ok(text)
}

/// Flat Responses function tools (`{"type": "function", "name", ...}`) as chat tools
/// (`{"type": "function", "function": {"name", ...}}`).
fn chat_tools(tools: Option<Value>) -> Result<Option<Value>, ValidationError> {
    let tools = match tools {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Array(tools)) => tools,
        Some(other) => return Err(out_of_range("tools", "a list of tools", other)),
    };
    let chat_tool = |tool: Value| {
        match tool.get("type").and_then(Value::as_str) {
            Some("function") => {}
            Some(kind) => {
                return Err(ValidationError::Unsupported {
                    field: "tools",
                    reason: format!("tools of type `{kind}` are not supported: this router runs no built-in tools, only `function` tools"),
                })
            }
            None => return Err(ValidationError::Missing { field: "tools.type" }),
        }
        match tool.get("name").and_then(Value::as_str) {
            Some("") => return Err(ValidationError::Empty { field: "tools.name" }),
            Some(_) => {}
            None => return Err(ValidationError::Missing { field: "tools.name" }),
        }
        let function: Map<String, Value> = ["name", "description", "parameters", "strict"]
            .into_iter()
            .filter_map(|key| tool.get(key).filter(|v| !v.is_null()).map(|v| (key.to_owned(), v.clone())))
            .collect();
        Ok(json!({"type": "function", "function": function}))
    };
    tools.into_iter().map(chat_tool).collect::<Result<Vec<_>, _>>().map(|tools| Some(Value::Array(tools)))
}

/// `tool_choice`: the strings as chat takes them, `{"type": "function", "name"}` in chat's
/// nested shape.
fn chat_tool_choice(choice: Option<Value>) -> Result<Option<Value>, ValidationError> {
    const SHAPES: &str = r#""none", "auto", "required" or {"type": "function", "name": ...}"#;
    match choice {
        None | Some(Value::Null) => Ok(None),
        Some(choice @ Value::String(_)) => Ok(Some(choice)),
        Some(Value::Object(choice)) => match (choice.get("type").and_then(Value::as_str), choice.get("name")) {
            (Some("function"), Some(Value::String(name))) => {
                Ok(Some(json!({"type": "function", "function": {"name": name}})))
            }
            (Some("function"), _) => Err(ValidationError::Missing { field: "tool_choice.name" }),
            (Some(kind), _) => Err(ValidationError::Unsupported {
                field: "tool_choice",
                reason: format!("choices of type `{kind}` are not supported: this router runs only `function` tools"),
            }),
            (None, _) => Err(out_of_range("tool_choice", SHAPES, Value::Object(choice))),
        },
        Some(other) => Err(out_of_range("tool_choice", SHAPES, other)),
    }
}

/// `text.format` as chat's `response_format`; `text.verbosity` only null.
fn response_format(text: Option<Value>) -> Result<Option<ResponseFormat>, ValidationError> {
    let text = match text {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Object(text)) => text,
        Some(other) => return Err(out_of_range("text", "an object", other)),
    };
    if text.get("verbosity").is_some_and(|v| !v.is_null()) {
        return Err(ValidationError::NotHonoured { field: "text.verbosity", accepted: "null" });
    }
    let format = match text.get("format") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Object(format)) => format,
        Some(other) => return Err(out_of_range("text.format", "an object", other)),
    };
    match format.get("type").and_then(Value::as_str) {
        Some("text") => Ok(Some(ResponseFormat::Text)),
        Some("json_object") => Ok(Some(ResponseFormat::JsonObject)),
        Some("json_schema") => {
            let name = format.get("name").and_then(Value::as_str);
            let name = name.ok_or(ValidationError::Missing { field: "text.format.name" })?;
            let schema = format.get("schema").filter(|s| s.is_object());
            let schema = schema.ok_or(ValidationError::Missing { field: "text.format.schema" })?;
            let optional = |key: &'static str, ok: fn(&Value) -> bool| match format.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(value) if ok(value) => Ok(Some(value.clone())),
                Some(other) => Err(out_of_range(key, "a string (description) or a boolean (strict)", other)),
            };
            let description = optional("description", Value::is_string)?.and_then(|d| d.as_str().map(str::to_owned));
            let strict = optional("strict", Value::is_boolean)?.and_then(|s| s.as_bool());
            let json_schema =
                JsonSchemaFormat { name: name.to_owned(), description, schema: Some(schema.clone()), strict };
            Ok(Some(ResponseFormat::JsonSchema { json_schema }))
        }
        Some(kind) => Err(ValidationError::Unsupported {
            field: "text.format",
            reason: format!("formats of type `{kind}` are not supported, only text, json_object and json_schema"),
        }),
        None => Err(ValidationError::Missing { field: "text.format.type" }),
    }
}

/// `reasoning.effort` as chat's `reasoning_effort`; no summaries are written, so `summary` and
/// `generate_summary` only null.
fn reasoning_effort(reasoning: Option<Value>) -> Result<Option<Value>, ValidationError> {
    let reasoning = match reasoning {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Object(reasoning)) => reasoning,
        Some(other) => return Err(out_of_range("reasoning", "an object", other)),
    };
    for field in ["summary", "generate_summary"] {
        if reasoning.get(field).is_some_and(|v| !v.is_null()) {
            let field = if field == "summary" { "reasoning.summary" } else { "reasoning.generate_summary" };
            return Err(ValidationError::NotHonoured { field, accepted: "null" });
        }
    }
    Ok(reasoning.get("effort").cloned())
}

fn out_of_range(field: &'static str, limit: &'static str, value: impl ToString) -> ValidationError {
    ValidationError::OutOfRange { field, limit, value: value.to_string().chars().take(80).collect() }
}

/// A chat field as the Responses API names it.
fn responses_field(field: &'static str) -> &'static str {
    match field {
        "messages" | "prompt" => "input",
        f if f.starts_with("messages.") => "input",
        "max_tokens" | "max_completion_tokens" => "max_output_tokens",
        f if f.starts_with("response_format") => "text.format",
        "reasoning_effort" => "reasoning.effort",
        "tools.function" | "tools.function.name" => "tools.name",
        f => f,
    }
}

/// A refusal of the translated chat request, naming the field the client sent.
fn in_responses_terms(e: ValidationError) -> ValidationError {
    use ValidationError as E;
    match e {
        E::Missing { field } => E::Missing { field: responses_field(field) },
        E::Empty { field } => E::Empty { field: responses_field(field) },
        E::OutOfRange { field, limit, value } => E::OutOfRange { field: responses_field(field), limit, value },
        E::Unsupported { field, reason } => E::Unsupported { field: responses_field(field), reason },
        E::NotHonoured { field, accepted } => E::NotHonoured { field: responses_field(field), accepted },
        E::Constraint { field, reason } => E::Constraint { field: responses_field(field), reason },
        E::TokenOutOfVocab { field, value, vocab_size } => {
            E::TokenOutOfVocab { field: responses_field(field), value, vocab_size }
        }
        e @ E::ContextExceeded { .. } => E::Translated { param: "max_output_tokens", source: Box::new(e) },
        e @ (E::MissingContent { .. } | E::PromptTooLong { .. } | E::TextTooLong { .. } | E::Template(_)) => {
            E::Translated { param: "input", source: Box::new(e) }
        }
        e @ (E::Stateless { .. } | E::Translated { .. } | E::InputItem { .. } | E::Tokenize(_)) => e,
    }
}
