//! OpenAI body + vLLM extras -> [`ValidRequest`], with no option left open.
//!
//! Every bound is checked here so handlers never do; each error names the
//! field, the limit and the value given.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use constraint::api::{Guided, Requested};
use constraint::Constraint;

use crate::backend::{BeamSearch, Sampling, MAX_BEAM_WIDTH};
use crate::fleet::model::{Model, Serves};
pub use crate::prepare::error::ValidationError;
use crate::prepare::request::{
    ChatCompletionRequest, ChatMessage, ChatRenderParams, CommonParams, CompletionRequest, MessageContent, Prompt,
    StopSpec, MAX_PROMPTS,
};
use crate::prepare::tokenize::{self, ChatRender};
use prompt::chat_template::TemplateMessage;

/// Most stop strings per request (OpenAI's limit).
pub const MAX_STOP_STRINGS: usize = 4;

/// Most `top_logprobs` per position (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: u32 = 20;

/// Longest `request_id` a body may carry: it is logged and sent back in a header.
pub const MAX_REQUEST_ID_LEN: usize = 256;

/// Most choices (`n`) per request: each is a sequence on the workers, and
/// the workers cap it at the same value.
pub const MAX_N: u32 = 16;

/// A request ready to run: prompt tokenized, every default filled in.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidRequest {
    /// The prompt's token ids.
    pub prompt_token_ids: Vec<u32>,
    /// Sampling, with `max_tokens` resolved against the context length.
    pub sampling: Sampling,
    /// Stop strings (non-empty strings only).
    pub stops: Vec<String>,
    /// Answer with server-sent events.
    pub stream: bool,
    /// Send a usage chunk at the end of the stream.
    pub include_usage: bool,
    /// Put the usage so far in every chunk of the stream (vLLM extra).
    pub continuous_usage: bool,
    /// Return prompt and generated token ids (vLLM extra).
    pub return_token_ids: bool,
    /// Chat with tools (and `tool_choice` not `none`): parse tool calls out
    /// of the generated text.
    pub parse_tool_calls: bool,
    /// Admission and scheduling priority, lower first (vLLM extra).
    pub priority: i32,
    /// Prefix-cache salt (vLLM extra); `None` shares with unsalted requests.
    pub cache_salt: Option<String>,
    /// Text each choice starts with (`echo`): the prompt's text for
    /// completions, the final assistant message's content for chat.
    pub echo: Option<String>,
    /// Keep the stop string that ended a choice in its text (vLLM extra).
    pub include_stop_str_in_output: bool,
    /// Leave special tokens out of the generated text (vLLM extra).
    pub skip_special_tokens: bool,
    /// How long the router took to compile `sampling.constraint`, when there is one.
    pub constraint_compile: Option<Duration>,
    /// Return a chat's `<think>` reasoning as `reasoning_content` (vLLM extra); when false it
    /// is left out.
    pub include_reasoning: bool,
    /// Name logprob tokens `token_id:{id}` rather than by their text (vLLM extra).
    pub return_tokens_as_token_ids: bool,
    /// Beam search instead of sampling (vLLM extra): `sampling.n` beams.
    pub beam: Option<BeamSearch>,
    /// The answer carries vLLM's `prompt_logprobs` field (the request asked for it by name, not
    /// only through `echo` with `logprobs`).
    pub prompt_logprobs_field: bool,
}

/// Refuses generation from a model that serves embeddings only, naming `model`.
fn generates(model: &Model) -> Result<(), ValidationError> {
    match model.serves {
        Serves::Generation => Ok(()),
        Serves::Embeddings => Err(ValidationError::Unsupported {
            field: "model",
            reason: format!(
                "`{}` is an embedding model (an encoder with no LM head): it serves /v1/embeddings, \
                 /pooling, /score and /rerank, not generation",
                model.served_name
            ),
        }),
    }
}

/// Validates a chat request: renders, tokenizes and checks every parameter.
pub fn validate_chat(model: &Model, req: ChatCompletionRequest) -> Result<ValidRequest, ValidationError> {
    generates(model)?;
    req.not_honoured.check(req.params.n)?;
    req.chat_not_honoured.check()?;
    let messages = chat_messages(req.messages)?;
    let logprobs = chat_logprobs(req.logprobs, req.top_logprobs)?;
    let tool_choice = req.tool_choice.clone();
    let tools = chat_tools(req.tools, req.tool_choice)?;
    let forced_calls = tools.as_deref().and_then(|tools| forced_tool_calls(tools, tool_choice.as_ref()));
    let parse_tool_calls = tools.is_some();
    let mut render = chat_render(req.render, &messages, tools)?;
    template_extras(&mut render, req.documents, req.reasoning_effort)?;
    let mut prompt = tokenize::render_chat(model, &messages, &render)?;
    if req.add_special_tokens.unwrap_or(false) {
        prompt = tokenize::with_bos(model, prompt);
    }
    // vLLM echoes the last message only when it has the answer's role.
    let echo = req.echo.unwrap_or(false).then(|| messages.last().filter(|m| m.role == "assistant")).flatten();
    let echo = echo.map(|m| m.content.clone());
    let mut valid = finish(model, prompt, req.params)?;
    if let Some(calls) = forced_calls {
        if valid.beam.is_some() {
            return Err(ValidationError::Unsupported {
                field: "tool_choice",
                reason: "a required tool call is a structured output, which beam search cannot hold to".into(),
            });
        }
        if valid.sampling.constraint.is_some() {
            return Err(ValidationError::Unsupported {
                field: "tool_choice",
                reason: "a required tool call is itself a structured output; drop the other one".into(),
            });
        }
        let took = model
            .check_constraint(&calls)
            .map_err(|e| ValidationError::Constraint { field: "tool_choice", reason: e.to_string() })?;
        valid.sampling.constraint = Some(Arc::new(calls));
        valid.constraint_compile = Some(took);
    }
    valid.sampling.logprobs = logprobs;
    valid.parse_tool_calls = parse_tool_calls;
    valid.echo = echo;
    valid.include_reasoning = req.include_reasoning.unwrap_or(true);
    Ok(valid)
}

/// vLLM's `documents` and OpenAI's `reasoning_effort`, as template variables of those names
/// (unless `chat_template_kwargs` sets them, which wins as in vLLM).
fn template_extras(
    render: &mut ChatRender,
    documents: Option<serde_json::Value>,
    reasoning_effort: Option<serde_json::Value>,
) -> Result<(), ValidationError> {
    let documents = match documents {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::Array(documents))
            if documents
                .iter()
                .all(|d| d.as_object().is_some_and(|d| d.values().all(serde_json::Value::is_string))) =>
        {
            Some(serde_json::Value::Array(documents))
        }
        Some(other) => return Err(out_of_range("documents", "a list of objects of strings", other)),
    };
    let reasoning_effort = match reasoning_effort {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(effort)) if REASONING_EFFORTS.contains(&effort.as_str()) => {
            Some(serde_json::Value::String(effort))
        }
        Some(other) => return Err(out_of_range("reasoning_effort", "one of minimal, low, medium, high", other)),
    };
    for (name, value) in [("documents", documents), ("reasoning_effort", reasoning_effort)] {
        if let Some(value) = value {
            render.kwargs.get_or_insert_with(Default::default).entry(name).or_insert(value);
        }
    }
    Ok(())
}

/// OpenAI's `reasoning_effort` levels.
const REASONING_EFFORTS: [&str; 4] = ["minimal", "low", "medium", "high"];

impl Default for ChatRender {
    fn default() -> Self {
        Self {
            tools: None,
            add_generation_prompt: true,
            continue_final_message: false,
            chat_template: None,
            kwargs: None,
        }
    }
}

/// Checks vLLM's rendering options against the conversation: not both
/// `add_generation_prompt` and `continue_final_message` set true, the latter
/// only after an assistant message; `chat_template_kwargs` an object.
/// Shared by chat completions and `/tokenize`.
pub fn chat_render(
    params: ChatRenderParams,
    messages: &[TemplateMessage],
    tools: Option<Vec<serde_json::Value>>,
) -> Result<ChatRender, ValidationError> {
    let continue_final_message = params.continue_final_message.unwrap_or(false);
    if continue_final_message && params.add_generation_prompt == Some(true) {
        return Err(ValidationError::Unsupported {
            field: "continue_final_message",
            reason: "cannot be true together with `add_generation_prompt`".into(),
        });
    }
    if continue_final_message && messages.last().is_none_or(|m| m.role != "assistant") {
        return Err(ValidationError::Unsupported {
            field: "continue_final_message",
            reason: "needs the last message to be an assistant message".into(),
        });
    }
    let kwargs = match params.chat_template_kwargs {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::Object(kwargs)) => Some(kwargs),
        Some(other) => return Err(out_of_range("chat_template_kwargs", "an object", other)),
    };
    Ok(ChatRender {
        tools,
        add_generation_prompt: params.add_generation_prompt.unwrap_or(true),
        continue_final_message,
        chat_template: params.chat_template,
        kwargs,
    })
}

/// Validates a completion request: tokenizes each prompt and checks every parameter. A batch of
/// prompts gives one request per prompt, in order, each with the same parameters.
pub fn validate_completion(model: &Model, req: CompletionRequest) -> Result<Vec<ValidRequest>, ValidationError> {
    generates(model)?;
    req.not_honoured.check(req.params.n)?;
    req.completion_not_honoured.check()?;
    let echo = req.echo.unwrap_or(false);
    let logprobs = completion_logprobs(req.logprobs)?;
    let echo_logprobs = echo && logprobs.is_some();
    if echo_logprobs && req.params.stream == Some(true) {
        return Err(ValidationError::Unsupported {
            field: "echo",
            reason: "echo with logprobs scores the prompt, which is not available with `stream`".into(),
        });
    }
    let skip_special_tokens = req.params.skip_special_tokens.unwrap_or(true);
    let add_special_tokens = req.add_special_tokens.unwrap_or(true);
    // Each prompt's ids, and the text its choices start with under `echo`.
    let prompts: Vec<(Vec<u32>, Option<String>)> =
        match req.prompt.ok_or(ValidationError::Missing { field: "prompt" })? {
            Prompt::Text(text) => vec![(text_prompt(model, &text, add_special_tokens)?, echo.then_some(text))],
            Prompt::Texts(texts) => {
                batch(texts.len())?;
                let prompt = |text: String| Ok((text_prompt(model, &text, add_special_tokens)?, echo.then_some(text)));
                texts.into_iter().map(prompt).collect::<Result<_, ValidationError>>()?
            }
            Prompt::TokenIds(ids) => vec![id_prompt(model, &ids, echo, skip_special_tokens)?],
            Prompt::TokenIdLists(lists) => {
                batch(lists.len())?;
                lists.iter().map(|ids| id_prompt(model, ids, echo, skip_special_tokens)).collect::<Result<_, _>>()?
            }
        };
    prompts
        .into_iter()
        .map(|(prompt, echo_text)| {
            let mut valid = finish(model, prompt, req.params.clone())?;
            valid.echo = echo_text;
            valid.sampling.logprobs = logprobs;
            // As vLLM: echoed logprobs score the prompt with as many top tokens as the answer's.
            if echo_logprobs {
                valid.sampling.prompt_logprobs = valid.sampling.prompt_logprobs.or(logprobs);
            }
            Ok(valid)
        })
        .collect()
}

/// Checks a batch's size: not empty, at most [`MAX_PROMPTS`].
fn batch(prompts: usize) -> Result<(), ValidationError> {
    match prompts {
        0 => Err(ValidationError::Empty { field: "prompt" }),
        n if n > MAX_PROMPTS => Err(out_of_range("prompt", "a batch of at most 64 prompts", format!("{n} prompts"))),
        _ => Ok(()),
    }
}

/// A token-id prompt and, under `echo`, its text.
fn id_prompt(
    model: &Model,
    ids: &[i64],
    echo: bool,
    skip_special_tokens: bool,
) -> Result<(Vec<u32>, Option<String>), ValidationError> {
    let ids = tokenize::token_id_prompt(model, ids)?;
    let text = if echo { Some(tokenize::decode_with(model, &ids, skip_special_tokens)?) } else { None };
    Ok((ids, text))
}

fn text_prompt(model: &Model, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, ValidationError> {
    if text.is_empty() {
        return Err(ValidationError::Empty { field: "prompt" });
    }
    tokenize::text_ids(model, text, add_special_tokens)
}

/// Completions' `logprobs`: the number of most likely tokens per position, in [0, 20].
fn completion_logprobs(logprobs: Option<i64>) -> Result<Option<u32>, ValidationError> {
    match logprobs {
        None => Ok(None),
        Some(k) if (0..=i64::from(MAX_TOP_LOGPROBS)).contains(&k) => Ok(Some(k as u32)),
        Some(k) => Err(out_of_range("logprobs", "in [0, 20]", k)),
    }
}

/// A chat's `messages` as the chat template sees them: required, not empty,
/// known roles and text-only content. Shared by `/v1/chat/completions` and
/// `/tokenize` so both render the same conversation into the same ids.
pub fn chat_messages(messages: Option<Vec<ChatMessage>>) -> Result<Vec<TemplateMessage>, ValidationError> {
    let messages = messages.ok_or(ValidationError::Missing { field: "messages" })?;
    if messages.is_empty() {
        return Err(ValidationError::Empty { field: "messages" });
    }
    messages.into_iter().enumerate().map(|(index, message)| template_message(index, message)).collect()
}

fn template_message(index: usize, message: ChatMessage) -> Result<TemplateMessage, ValidationError> {
    let mut message = message;
    // OpenAI's newer name for the system role; templates know only `system`.
    if message.role == "developer" {
        message.role = "system".into();
    }
    if !matches!(message.role.as_str(), "system" | "user" | "assistant" | "tool") {
        return Err(ValidationError::OutOfRange {
            field: "messages.role",
            limit: "one of system, developer, user, assistant, tool",
            value: message.role,
        });
    }
    if message.tool_calls.is_some() && message.role != "assistant" {
        return Err(ValidationError::Unsupported {
            field: "messages.tool_calls",
            reason: format!("only assistant messages carry tool calls, not `{}`", message.role),
        });
    }
    if message.role == "tool" && message.tool_call_id.is_none() {
        return Err(ValidationError::Missing { field: "messages.tool_call_id" });
    }
    if let Some(bad) = message.tool_calls.iter().flatten().find(|call| !is_tool_call(call)) {
        return Err(ValidationError::OutOfRange {
            field: "messages.tool_calls",
            limit: "a list of calls, each `{\"function\": {\"name\": ..., \"arguments\": ...}}`",
            value: bad.to_string().chars().take(80).collect(),
        });
    }
    let content = match message.content {
        // As OpenAI: only an assistant turn that calls tools may come without content.
        None if message.role == "assistant" && message.tool_calls.is_some() => String::new(),
        None => return Err(ValidationError::MissingContent { index, role: message.role }),
        Some(MessageContent::Text(text)) => text,
        Some(MessageContent::Parts(parts)) => {
            let mut text = String::new();
            for part in parts {
                if part.kind != "text" {
                    return Err(ValidationError::Unsupported {
                        field: "messages.content",
                        reason: format!("content parts of type `{}` are not supported", part.kind),
                    });
                }
                text.push_str(part.text.as_deref().unwrap_or_default());
            }
            text
        }
    };
    let tool_calls = message.tool_calls.map(|calls| calls.into_iter().map(parse_tool_call_arguments).collect());
    Ok(TemplateMessage {
        role: message.role,
        content,
        tool_calls,
        tool_call_id: message.tool_call_id,
        name: message.name,
        reasoning_content: message.reasoning_content,
    })
}

/// An OpenAI tool call as templates read it: an object whose `function` names the function,
/// with `arguments` as JSON text or an object, if at all.
fn is_tool_call(call: &serde_json::Value) -> bool {
    let function = call.get("function");
    let arguments = function.and_then(|f| f.get("arguments"));
    function.and_then(|f| f.get("name")).is_some_and(serde_json::Value::is_string)
        && arguments.is_none_or(|a| a.is_string() || a.is_object())
}

/// A tool call's `arguments` as a JSON object when the client sent it as a
/// JSON string (the OpenAI shape): templates such as Qwen's and Hermes'
/// iterate it as a mapping, as vLLM renders it. A string that is not a JSON
/// object is kept as sent.
fn parse_tool_call_arguments(mut call: serde_json::Value) -> serde_json::Value {
    let arguments = call.get_mut("function").and_then(|f| f.get_mut("arguments"));
    if let Some(arguments) = arguments {
        let parsed = arguments.as_str().and_then(|s| serde_json::from_str::<serde_json::Value>(s).ok());
        if let Some(object @ serde_json::Value::Object(_)) = parsed {
            *arguments = object;
        }
    }
    call
}

/// `tools` and `tool_choice` -> the tools to render, `None` when the model
/// is offered none (no tools, or `tool_choice: "none"`, which vLLM also
/// renders without tools). Each tool must be a function with a name; a
/// named `tool_choice` must name one of them.
pub fn chat_tools(
    tools: Option<serde_json::Value>,
    tool_choice: Option<serde_json::Value>,
) -> Result<Option<Vec<serde_json::Value>>, ValidationError> {
    let tools = match tools {
        None | Some(serde_json::Value::Null) => Vec::new(),
        Some(serde_json::Value::Array(tools)) => tools,
        Some(other) => return Err(out_of_range("tools", "a list of tools", other)),
    };
    let names = tools.iter().map(tool_name).collect::<Result<Vec<_>, _>>()?;
    let choice = tool_choice.filter(|c| !c.is_null());
    let wants_tools = match &choice {
        None => !tools.is_empty(),
        Some(serde_json::Value::String(s)) if s == "none" => false,
        Some(serde_json::Value::String(s)) if s == "auto" || s == "required" => true,
        Some(named @ serde_json::Value::Object(_)) => {
            let name = named_choice(named)?;
            if !names.contains(&name) {
                return Err(out_of_range("tool_choice", "a function named in `tools`", name));
            }
            true
        }
        Some(other) => {
            return Err(out_of_range(
                "tool_choice",
                r#""none", "auto", "required" or {"type": "function", "function": {"name": ...}}"#,
                other,
            ))
        }
    };
    if wants_tools && tools.is_empty() {
        return Err(ValidationError::Unsupported {
            field: "tool_choice",
            reason: "needs `tools`, unless it is \"none\"".into(),
        });
    }
    Ok(wants_tools.then_some(tools))
}

/// A tool's function name; the tool must be `{"type": "function", "function": {"name": ...}}`.
fn tool_name(tool: &serde_json::Value) -> Result<&str, ValidationError> {
    match tool.get("type").and_then(serde_json::Value::as_str) {
        Some("function") => {}
        Some(kind) => {
            return Err(ValidationError::Unsupported {
                field: "tools",
                reason: format!("tools of type `{kind}` are not supported, only `function`"),
            })
        }
        None => return Err(ValidationError::Missing { field: "tools.type" }),
    }
    let function = tool.get("function").filter(|f| f.is_object());
    let function = function.ok_or(ValidationError::Missing { field: "tools.function" })?;
    match function.get("name").and_then(serde_json::Value::as_str) {
        Some("") => Err(ValidationError::Empty { field: "tools.function.name" }),
        Some(name) => Ok(name),
        None => Err(ValidationError::Missing { field: "tools.function.name" }),
    }
}

/// `tool_choice: "required"` or a named function, as a grammar: the answer is calls in the
/// Hermes format the tool-call parser reads (`<tool_call>{"name": ..., "arguments": {...}}
/// </tool_call>`), each naming an allowed tool with arguments valid against its `parameters`.
/// "required" allows one call or more, a named function exactly one. `None` for "auto"/"none".
fn forced_tool_calls(tools: &[serde_json::Value], choice: Option<&serde_json::Value>) -> Option<Constraint> {
    let only = match choice? {
        serde_json::Value::String(s) if s == "required" => None,
        named @ serde_json::Value::Object(_) => Some(named_choice(named).ok()?),
        _ => return None,
    };
    let calls: Vec<serde_json::Value> = tools
        .iter()
        .filter_map(|tool| {
            let function = &tool["function"];
            let name = function["name"].as_str().filter(|name| only.is_none_or(|only| only == *name))?;
            let parameters =
                function.get("parameters").cloned().unwrap_or_else(|| serde_json::json!({"type": "object"}));
            Some(serde_json::json!({
                "type": "object",
                "properties": {"name": {"const": name}, "arguments": parameters},
                "required": ["name", "arguments"],
                "additionalProperties": false
            }))
        })
        .collect();
    let schema = serde_json::json!({
        "anyOf": calls,
        "x-guidance": {"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "}
    });
    let start = if only.is_some() { "start: call" } else { "start: call (\"\\n\" call)*" };
    Some(Constraint::Lark(format!(
        "{start}\ncall: \"<tool_call>\\n\" arguments \"\\n</tool_call>\"\narguments: %json {schema}\n"
    )))
}

/// The function a `{"type": "function", "function": {"name"}}` choice names.
fn named_choice(choice: &serde_json::Value) -> Result<&str, ValidationError> {
    let kind = choice.get("type").and_then(serde_json::Value::as_str);
    let name = choice.get("function").and_then(|f| f.get("name")).and_then(serde_json::Value::as_str);
    match (kind, name) {
        (Some("function"), Some(name)) => Ok(name),
        _ => Err(out_of_range("tool_choice", r#"{"type": "function", "function": {"name": ...}}"#, choice)),
    }
}

/// Checks the shared parameters against the tokenized prompt.
fn finish(model: &Model, mut prompt: Vec<u32>, params: CommonParams) -> Result<ValidRequest, ValidationError> {
    if prompt.is_empty() {
        return Err(ValidationError::Empty { field: "prompt" });
    }
    if let Some(keep) = params.truncate_prompt_tokens {
        let keep = usize::try_from(keep)
            .ok()
            .filter(|&k| k >= 1)
            .ok_or_else(|| out_of_range("truncate_prompt_tokens", ">= 1", keep))?;
        // vLLM keeps the end of the prompt, nearest to what is generated.
        prompt.drain(..prompt.len().saturating_sub(keep));
    }
    if prompt.len() >= model.context_length as usize {
        return Err(ValidationError::PromptTooLong {
            prompt_tokens: prompt.len(),
            context_length: model.context_length,
        });
    }
    let room = model.context_length - prompt.len() as u32;
    let max_tokens = match params.max_tokens.or(params.max_completion_tokens) {
        None => room,
        Some(n) if n < 1 => return Err(out_of_range("max_tokens", ">= 1", n)),
        Some(n) if n > i64::from(room) => {
            return Err(ValidationError::ContextExceeded {
                prompt_tokens: prompt.len(),
                max_tokens: u32::try_from(n).unwrap_or(u32::MAX),
                total: prompt.len() as u64 + n as u64,
                context_length: model.context_length,
            })
        }
        Some(n) => n as u32,
    };
    let n = match params.n.unwrap_or(1) {
        n if (1..=i64::from(MAX_N)).contains(&n) => n as u32,
        n => return Err(out_of_range("n", "in [1, 16]", n)),
    };
    let (constraint, constraint_compile) = structured_output(model, &params)?.unzip();
    let beam_params = (params.use_beam_search, params.length_penalty);
    let prompt_logprobs = match params.prompt_logprobs {
        None => None,
        Some(k) if (0..=i64::from(MAX_TOP_LOGPROBS)).contains(&k) => Some(k as u32),
        Some(k) => return Err(out_of_range("prompt_logprobs", "in [0, 20]", k)),
    };
    // The decoder's own spacing is vLLM's `true`; `false` changes nothing only where the decoder
    // puts no space between special tokens, as the byte-level one.
    if params.spaces_between_special_tokens == Some(false) && !model.decoder.is_fast() {
        return Err(ValidationError::Unsupported {
            field: "spaces_between_special_tokens",
            reason:
                "false is taken only for byte-level vocabularies, whose decoder puts no space between special tokens"
                    .into(),
        });
    }
    if prompt_logprobs.is_some() && params.stream == Some(true) {
        return Err(ValidationError::Unsupported {
            field: "prompt_logprobs",
            reason: "not available with `stream`, as in vLLM".into(),
        });
    }
    let sampling = Sampling {
        temperature: temperature(params.temperature)?,
        top_p: top_p(params.top_p)?,
        top_k: top_k(params.top_k)?,
        // Clients send any integer; the bits are what seed the RNG.
        seed: params.seed.map(|s| s as u64),
        max_tokens,
        min_p: in_range("min_p", "in [0, 1]", params.min_p, 0.0, |p| (0.0..=1.0).contains(&p))?,
        presence_penalty: penalty("presence_penalty", params.presence_penalty)?,
        frequency_penalty: penalty("frequency_penalty", params.frequency_penalty)?,
        repetition_penalty: in_range("repetition_penalty", "in (0, 2]", params.repetition_penalty, 1.0, |r| {
            r > 0.0 && r <= 2.0
        })?,
        logit_bias: logit_bias(params.logit_bias, model.vocab_size)?,
        stop_token_ids: stop_token_ids(params.stop_token_ids, model.vocab_size)?,
        ignore_eos: params.ignore_eos.unwrap_or(false),
        min_tokens: min_tokens(params.min_tokens, max_tokens)?,
        // Chat sets it after; the completions endpoint returns none.
        logprobs: None,
        prompt_logprobs,
        allowed_token_ids: allowed_token_ids(model, params.allowed_token_ids.as_deref())?,
        bad_words: bad_words(model, params.bad_words.as_deref().unwrap_or_default())?,
        n,
        constraint,
        constraint_prefix: Vec::new(),
    };
    let stream = params.stream.unwrap_or(false);
    if let Some(id) = &params.request_id {
        check_request_id(id)?;
    }
    Ok(ValidRequest {
        prompt_token_ids: prompt,
        sampling,
        stops: stops(params.stop)?,
        stream,
        include_usage: stream && params.stream_options.as_ref().and_then(|o| o.include_usage).unwrap_or(false),
        continuous_usage: stream && params.stream_options.and_then(|o| o.continuous_usage_stats).unwrap_or(false),
        return_token_ids: params.return_token_ids.unwrap_or(false),
        // Chat sets it after; completions never parse tool calls.
        parse_tool_calls: false,
        priority: priority(params.priority)?,
        cache_salt: cache_salt(params.cache_salt)?,
        // Set by the endpoint, which knows what the prompt's text is.
        echo: None,
        include_stop_str_in_output: params.include_stop_str_in_output.unwrap_or(false),
        skip_special_tokens: params.skip_special_tokens.unwrap_or(true),
        constraint_compile,
        // Chat sets it after; completions have no reasoning to leave out.
        include_reasoning: true,
        return_tokens_as_token_ids: params.return_tokens_as_token_ids.unwrap_or(false),
        prompt_logprobs_field: prompt_logprobs.is_some(),
        beam: None,
    })
    .and_then(|valid| beam_search(beam_params, valid))
}

/// The request's one structured output, compiled once against the model's vocabulary so a bad
/// one is refused here, before any worker runs.
fn structured_output(
    model: &Model,
    params: &CommonParams,
) -> Result<Option<(Arc<Constraint>, Duration)>, ValidationError> {
    let guided = Guided {
        guided_json: params.guided_json.clone(),
        guided_regex: params.guided_regex.clone(),
        guided_choice: params.guided_choice.clone(),
        guided_grammar: params.guided_grammar.clone(),
        guided_decoding_backend: params.guided_decoding_backend.clone(),
        guided_whitespace_pattern: params.guided_whitespace_pattern.clone(),
    };
    let requested =
        constraint::api::requested(params.response_format.as_ref(), params.structured_outputs.as_ref(), &guided)
            .map_err(|e| ValidationError::Unsupported { field: e.field, reason: e.reason })?;
    let Some(Requested { constraint, field }) = requested else { return Ok(None) };
    let took = model
        .check_constraint(&constraint)
        .map_err(|e| ValidationError::Constraint { field, reason: e.to_string() })?;
    Ok(Some((Arc::new(constraint), took)))
}

/// A body's `request_id` (vLLM extra): it becomes a log field and a response
/// header, so it must be non-empty, short and printable ASCII.
pub fn check_request_id(id: &str) -> Result<(), ValidationError> {
    if id.is_empty() {
        return Err(ValidationError::Empty { field: "request_id" });
    }
    if id.len() > MAX_REQUEST_ID_LEN {
        return Err(out_of_range("request_id", "at most 256 characters", format!("{} characters", id.len())));
    }
    if !id.bytes().all(|b| b.is_ascii_graphic() || b == b' ') {
        return Err(out_of_range("request_id", "printable ASCII", format!("{id:?}")));
    }
    Ok(())
}

/// vLLM's `priority`: any i32, default 0.
pub(crate) fn priority(value: Option<i64>) -> Result<i32, ValidationError> {
    let value = value.unwrap_or(0);
    i32::try_from(value).map_err(|_| out_of_range("priority", "in [-2147483648, 2147483647]", value))
}

/// vLLM's `cache_salt`: a non-empty string when given.
pub(crate) fn cache_salt(value: Option<String>) -> Result<Option<String>, ValidationError> {
    match value {
        Some(salt) if salt.is_empty() => Err(ValidationError::Empty { field: "cache_salt" }),
        salt => Ok(salt),
    }
}

/// Chat's `logprobs` (a flag) and `top_logprobs` (in [0, 20], only with
/// `logprobs`), as the number of top tokens to return per position.
fn chat_logprobs(logprobs: Option<bool>, top_logprobs: Option<i64>) -> Result<Option<u32>, ValidationError> {
    match (logprobs.unwrap_or(false), top_logprobs) {
        (false, None) => Ok(None),
        (false, Some(k)) => Err(out_of_range("top_logprobs", "absent unless `logprobs` is true", k)),
        (true, None) => Ok(Some(0)),
        (true, Some(k)) if (0..=i64::from(MAX_TOP_LOGPROBS)).contains(&k) => Ok(Some(k as u32)),
        (true, Some(k)) => Err(out_of_range("top_logprobs", "in [0, 20]", k)),
    }
}

pub(crate) fn out_of_range(field: &'static str, limit: &'static str, value: impl ToString) -> ValidationError {
    ValidationError::OutOfRange { field, limit, value: value.to_string() }
}

fn temperature(value: Option<f64>) -> Result<f32, ValidationError> {
    match value.unwrap_or(1.0) {
        t if (0.0..=2.0).contains(&t) => Ok(t as f32),
        t => Err(out_of_range("temperature", "in [0, 2]", t)),
    }
}

fn top_p(value: Option<f64>) -> Result<f32, ValidationError> {
    match value.unwrap_or(1.0) {
        p if p > 0.0 && p <= 1.0 => Ok(p as f32),
        p => Err(out_of_range("top_p", "in (0, 1]", p)),
    }
}

/// vLLM's convention: -1 and 0 turn top-k off (0 on the wire).
fn top_k(value: Option<i64>) -> Result<u32, ValidationError> {
    match value.unwrap_or(-1) {
        -1 | 0 => Ok(0),
        k if k >= 1 => Ok(u32::try_from(k).unwrap_or(u32::MAX)),
        k => Err(out_of_range("top_k", "-1, 0 (off) or >= 1", k)),
    }
}

/// An optional float: `default` when absent, else it must pass `ok`.
fn in_range(
    field: &'static str,
    limit: &'static str,
    value: Option<f64>,
    default: f64,
    ok: impl Fn(f64) -> bool,
) -> Result<f32, ValidationError> {
    match value.unwrap_or(default) {
        v if ok(v) => Ok(v as f32),
        v => Err(out_of_range(field, limit, v)),
    }
}

/// OpenAI's presence and frequency penalties: in [-2, 2], default 0 (off).
fn penalty(field: &'static str, value: Option<f64>) -> Result<f32, ValidationError> {
    in_range(field, "in [-2, 2]", value, 0.0, |p| (-2.0..=2.0).contains(&p))
}

/// Token ids arrive as string keys (`{"50256": -100}`); each must name a token
/// of the vocabulary, each bias be in [-100, 100]. Sorted by id.
fn logit_bias(value: Option<HashMap<String, f64>>, vocab_size: u32) -> Result<Vec<(u32, f32)>, ValidationError> {
    let mut biases = Vec::new();
    for (key, bias) in value.unwrap_or_default() {
        let token = key.trim().parse::<u32>().ok().filter(|&t| t < vocab_size).ok_or_else(|| {
            out_of_range(
                "logit_bias",
                "keyed by token ids in [0, vocab_size)",
                format!("{key:?} (vocab_size {vocab_size})"),
            )
        })?;
        if !(-100.0..=100.0).contains(&bias) {
            return Err(out_of_range("logit_bias", "biases in [-100, 100]", format!("{bias} for token {token}")));
        }
        biases.push((token, bias as f32));
    }
    biases.sort_unstable_by_key(|&(token, _)| token);
    Ok(biases)
}

fn stop_token_ids(value: Option<Vec<i64>>, vocab_size: u32) -> Result<Vec<u32>, ValidationError> {
    value
        .unwrap_or_default()
        .into_iter()
        .map(|id| {
            u32::try_from(id).ok().filter(|&t| t < vocab_size).ok_or_else(|| {
                out_of_range(
                    "stop_token_ids",
                    "token ids in [0, vocab_size)",
                    format!("{id} (vocab_size {vocab_size})"),
                )
            })
        })
        .collect()
}

/// vLLM's `use_beam_search` and `length_penalty`: `n` beams, and nothing a beam search cannot
/// honour (it scores beams by the model's raw logprobs and answers whole).
fn beam_search(
    (use_beam_search, length_penalty): (Option<bool>, Option<f64>),
    mut valid: ValidRequest,
) -> Result<ValidRequest, ValidationError> {
    let asked_penalty = length_penalty;
    let length_penalty = length_penalty.unwrap_or(1.0);
    if !length_penalty.is_finite() {
        return Err(out_of_range("length_penalty", "a finite number", length_penalty));
    }
    if use_beam_search != Some(true) {
        if asked_penalty.is_some_and(|p| p != 1.0) {
            return Err(ValidationError::Unsupported {
                field: "length_penalty",
                reason: "weighs beams: only with `use_beam_search`".into(),
            });
        }
        return Ok(valid);
    }
    let s = &valid.sampling;
    let unsupported = [
        ("stream", valid.stream),
        ("temperature", s.temperature != 0.0 && s.temperature != 1.0),
        ("top_p", s.top_p != 1.0),
        ("top_k", s.top_k != 0),
        ("min_p", s.min_p != 0.0),
        ("presence_penalty", s.presence_penalty != 0.0),
        ("frequency_penalty", s.frequency_penalty != 0.0),
        ("repetition_penalty", s.repetition_penalty != 1.0),
        ("logit_bias", !s.logit_bias.is_empty()),
        ("min_tokens", s.min_tokens != 0),
        ("stop", !valid.stops.is_empty()),
        ("prompt_logprobs", s.prompt_logprobs.is_some()),
        ("allowed_token_ids", s.allowed_token_ids.is_some()),
        ("bad_words", !s.bad_words.is_empty()),
        ("response_format", s.constraint.is_some()),
    ];
    if let Some((field, _)) = unsupported.into_iter().find(|(_, set)| *set) {
        return Err(ValidationError::Unsupported {
            field,
            reason: "not with `use_beam_search`, which scores beams by the model's raw logprobs and answers whole"
                .into(),
        });
    }
    if s.n > MAX_BEAM_WIDTH {
        return Err(out_of_range("n", "at most 10 beams with `use_beam_search`", s.n));
    }
    valid.beam = Some(BeamSearch { width: s.n, length_penalty: length_penalty as f32 });
    Ok(valid)
}

/// vLLM's `allowed_token_ids`: not empty, each in the vocabulary.
fn allowed_token_ids(model: &Model, ids: Option<&[i64]>) -> Result<Option<Vec<u32>>, ValidationError> {
    match ids {
        None => Ok(None),
        Some([]) => Err(ValidationError::Empty { field: "allowed_token_ids" }),
        Some(ids) => tokenize::vocab_ids(model, "allowed_token_ids", ids).map(Some),
    }
}

/// vLLM's `bad_words` as token sequences: each word as it would start the text, and as it would
/// follow a space when that spelling is a different token sequence of the same length.
fn bad_words(model: &Model, words: &[String]) -> Result<Vec<Vec<u32>>, ValidationError> {
    if words.iter().any(|w| w.trim_start().is_empty()) {
        return Err(ValidationError::Empty { field: "bad_words" });
    }
    prompt::bad_words::bad_word_sequences(words, |text| tokenize::text_ids(model, text, false))
}

fn min_tokens(value: Option<i64>, max_tokens: u32) -> Result<u32, ValidationError> {
    match value.unwrap_or(0) {
        n if (0..=i64::from(max_tokens)).contains(&n) => Ok(n as u32),
        n => Err(out_of_range("min_tokens", "in [0, max_tokens]", format!("{n} (max_tokens {max_tokens})"))),
    }
}

fn stops(stop: Option<StopSpec>) -> Result<Vec<String>, ValidationError> {
    let stops = match stop {
        None => Vec::new(),
        Some(StopSpec::One(s)) => vec![s],
        Some(StopSpec::Many(list)) => list,
    };
    if stops.len() > MAX_STOP_STRINGS {
        return Err(out_of_range("stop", "at most 4 strings", stops.len()));
    }
    Ok(stops.into_iter().filter(|s| !s.is_empty()).collect())
}

#[cfg(test)]
mod tests;
