//! Builds OpenAI bodies and stream chunks from generated deltas, one
//! [`ChunkFormat`] per endpoint so the streaming loop is shared.

use std::sync::Arc;

use serde::Serialize;

use super::response::{
    AssistantMessage, ChatChoice, ChatChunk, ChatChunkChoice, ChatCompletion, ChatDelta, ChatLogprobs,
    ChatTokenLogprob, Completion, CompletionChoice, FunctionCall, ToolCallObject, Usage,
};
use crate::backend::Finish;
use crate::respond::stream::Delta;
use crate::respond::tool_calls::{parse_output, OutputParser, ToolCall};

/// What every chunk of one response shares.
#[derive(Debug, Clone)]
pub struct ResponseMeta {
    /// `chatcmpl-<uuid>` or `cmpl-<uuid>`.
    pub id: String,
    /// Unix seconds.
    pub created: u64,
    /// The served model name.
    pub model: String,
    /// The prompt ids, set only when the client asked for token ids.
    pub prompt_token_ids: Option<Arc<Vec<u32>>>,
    /// The client asked for logprobs (chat only): choices carry them, else null.
    pub logprobs: bool,
    /// Choices of the answer (`n`).
    pub n: u32,
}

impl ResponseMeta {
    fn prompt_ids(&self) -> Option<Vec<u32>> {
        self.prompt_token_ids.as_ref().map(|ids| ids.to_vec())
    }

    fn ids(&self, ids: &[u32]) -> Option<Vec<u32>> {
        self.prompt_token_ids.is_some().then(|| ids.to_vec())
    }

    fn logprobs(&self, content: &[ChatTokenLogprob]) -> Option<ChatLogprobs> {
        self.logprobs.then(|| ChatLogprobs { content: content.to_vec() })
    }
}

/// A whole generation of one choice, for non-streaming answers.
#[derive(Debug, Default)]
pub struct Collected {
    /// All text.
    pub text: String,
    /// All generated ids.
    pub token_ids: Vec<u32>,
    /// The logprobs of the reported tokens (when asked).
    pub logprobs: Vec<ChatTokenLogprob>,
    /// Why it ended.
    pub finish: Option<Finish>,
}

/// Serializes a chunk; our response types always serialize.
fn json(value: &impl Serialize) -> String {
    serde_json::to_string(value).unwrap_or_default()
}

/// How one endpoint shapes its answers: whole, or as stream chunks (JSON strings).
pub trait ChunkFormat: Send + 'static {
    /// Prefix of response ids (`chatcmpl`, `cmpl`).
    fn id_prefix(&self) -> &'static str;
    /// The whole non-streaming answer as JSON text: one [`Collected`] per
    /// choice, in order.
    fn whole(&self, meta: &ResponseMeta, prompt_tokens: usize, out: Vec<Collected>) -> String;
    /// Chunks sent before any text.
    fn opening(&self, meta: &ResponseMeta) -> Vec<String>;
    /// Chunks for one delta; `first` is true for the first delta. Takes
    /// `&mut self` because a format may hold text back across deltas.
    fn delta(&mut self, meta: &ResponseMeta, delta: &Delta, first: bool) -> Vec<String>;
    /// The usage chunk (`choices: []`).
    fn usage(&self, meta: &ResponseMeta, usage: Usage) -> String;
}

/// `chat.completion.chunk`: a role chunk, content (reasoning, tool-call)
/// chunks, an empty-delta finish chunk.
///
/// Text goes through one [`OutputParser`] per choice, which holds back what
/// may still become a `<think>` or `<tool_call>` tag; the ids and logprobs of
/// held text ride with the next chunk that is sent.
#[derive(Debug, Default)]
pub struct ChatFormat {
    /// Parse tool calls out of the text (the request offered tools).
    tools: bool,
    /// Per choice, in choice order, made on its first delta.
    choices: Vec<ChoiceStream>,
    /// `echo`: the final assistant message's content each answer starts with.
    echo: Option<String>,
}

/// One streamed choice's parser and what it has not sent yet.
#[derive(Debug)]
struct ChoiceStream {
    parser: OutputParser,
    ids: Vec<u32>,
    logprobs: Vec<ChatTokenLogprob>,
    /// Tool calls sent so far (the next call's `index`).
    calls: u32,
}

impl ChatFormat {
    /// A chat format; `tools` turns tool-call parsing on.
    pub fn new(tools: bool) -> Self {
        Self { tools, choices: Vec::new(), echo: None }
    }

    /// The same format, starting each choice's content with `echo` (vLLM's
    /// chat `echo`: sent whole, right after the role chunks, when streaming).
    pub fn with_echo(self, echo: Option<String>) -> Self {
        Self { echo, ..self }
    }

    fn stream(&mut self, index: u32) -> &mut ChoiceStream {
        let index = index as usize;
        while self.choices.len() <= index {
            let parser = OutputParser::new(self.tools);
            self.choices.push(ChoiceStream { parser, ids: Vec::new(), logprobs: Vec::new(), calls: 0 });
        }
        &mut self.choices[index]
    }

    fn chunk(meta: &ResponseMeta, choices: Vec<ChatChunkChoice>) -> ChatChunk {
        ChatChunk {
            id: meta.id.clone(),
            object: "chat.completion.chunk",
            created: meta.created,
            model: meta.model.clone(),
            choices,
            usage: None,
            prompt_token_ids: None,
        }
    }

    fn choice(
        index: u32,
        delta: ChatDelta,
        finish_reason: Option<&'static str>,
        ids: Option<Vec<u32>>,
        logprobs: Option<ChatLogprobs>,
    ) -> ChatChunkChoice {
        ChatChunkChoice { index, delta, logprobs, finish_reason, token_ids: ids }
    }
}

impl ChunkFormat for ChatFormat {
    fn id_prefix(&self) -> &'static str {
        "chatcmpl"
    }

    fn whole(&self, meta: &ResponseMeta, prompt_tokens: usize, out: Vec<Collected>) -> String {
        let mut response = chat_response(meta, prompt_tokens, out, self.tools);
        if let Some(echo) = &self.echo {
            for choice in &mut response.choices {
                let content = choice.message.content.take().unwrap_or_default();
                choice.message.content = Some(format!("{echo}{content}"));
            }
        }
        json(&response)
    }

    /// A role chunk per choice, the first with the prompt ids; then, with
    /// `echo`, a content chunk per choice with the echoed text.
    fn opening(&self, meta: &ResponseMeta) -> Vec<String> {
        let roles = (0..meta.n.max(1)).map(|index| {
            let delta = ChatDelta { role: Some("assistant"), content: Some(String::new()), ..ChatDelta::default() };
            let mut chunk = Self::chunk(meta, vec![Self::choice(index, delta, None, meta.ids(&[]), None)]);
            if index == 0 {
                chunk.prompt_token_ids = meta.prompt_ids();
            }
            json(&chunk)
        });
        let echoes = self.echo.iter().flat_map(|echo| {
            (0..meta.n.max(1)).map(move |index| {
                let delta = ChatDelta { content: Some(echo.clone()), ..ChatDelta::default() };
                json(&Self::chunk(meta, vec![Self::choice(index, delta, None, None, None)]))
            })
        });
        roles.chain(echoes).collect()
    }

    fn delta(&mut self, meta: &ResponseMeta, delta: &Delta, _first: bool) -> Vec<String> {
        let stream = self.stream(delta.index);
        let mut parsed = stream.parser.feed(&delta.text);
        if delta.finish.is_some() {
            parsed.extend(stream.parser.finish());
        }
        stream.ids.extend_from_slice(&delta.token_ids);
        stream.logprobs.extend_from_slice(&delta.logprobs);
        let mut deltas = Vec::new();
        if !parsed.reasoning.is_empty() {
            deltas.push(ChatDelta { reasoning_content: Some(parsed.reasoning), ..ChatDelta::default() });
        }
        if !parsed.content.is_empty() {
            deltas.push(ChatDelta { content: Some(parsed.content), ..ChatDelta::default() });
        }
        for call in parsed.tool_calls {
            let call = tool_call_object(call, Some(stream.calls));
            stream.calls += 1;
            deltas.push(ChatDelta { tool_calls: Some(vec![call]), ..ChatDelta::default() });
        }
        // The ids and logprobs ride with the first chunk after them; tokens
        // without text (eos) ride with the finish chunk.
        let mut chunks = Vec::new();
        for chat_delta in deltas {
            let ids = meta.ids(&std::mem::take(&mut stream.ids));
            let logprobs = meta.logprobs(&std::mem::take(&mut stream.logprobs));
            let choice = Self::choice(delta.index, chat_delta, None, ids, logprobs);
            chunks.push(json(&Self::chunk(meta, vec![choice])));
        }
        if let Some(finish) = delta.finish {
            let ids = meta.ids(&std::mem::take(&mut stream.ids));
            let logprobs = meta.logprobs(&std::mem::take(&mut stream.logprobs)).filter(|l| !l.content.is_empty());
            let reason = finish_reason(finish, stream.calls > 0);
            let choice = Self::choice(delta.index, ChatDelta::default(), Some(reason), ids, logprobs);
            chunks.push(json(&Self::chunk(meta, vec![choice])));
        }
        chunks
    }

    fn usage(&self, meta: &ResponseMeta, usage: Usage) -> String {
        let mut chunk = Self::chunk(meta, Vec::new());
        chunk.usage = Some(usage);
        json(&chunk)
    }
}

/// `text_completion` chunks: one per delta, the last with its finish reason.
#[derive(Debug, Clone, Default)]
pub struct CompletionFormat {
    /// `echo`: the prompt's text each choice's text starts with.
    echo: Option<String>,
    /// Choices whose first chunk went out (the one that carries the echo).
    started: Vec<bool>,
}

impl CompletionFormat {
    /// A completion format; `echo` is the prompt text to start each choice with.
    pub fn new(echo: Option<String>) -> Self {
        Self { echo, started: Vec::new() }
    }

    /// The echo for choice `index` if its first chunk has not gone out yet.
    fn echo_for(&mut self, index: u32) -> &str {
        let index = index as usize;
        if self.started.len() <= index {
            self.started.resize(index + 1, false);
        }
        let first = !std::mem::replace(&mut self.started[index], true);
        match &self.echo {
            Some(echo) if first => echo,
            _ => "",
        }
    }
}

impl ChunkFormat for CompletionFormat {
    fn id_prefix(&self) -> &'static str {
        "cmpl"
    }

    fn whole(&self, meta: &ResponseMeta, prompt_tokens: usize, out: Vec<Collected>) -> String {
        let mut response = completion_response(meta, prompt_tokens, out);
        if let Some(echo) = &self.echo {
            for choice in &mut response.choices {
                choice.text.insert_str(0, echo);
            }
        }
        json(&response)
    }

    fn opening(&self, _meta: &ResponseMeta) -> Vec<String> {
        Vec::new()
    }

    fn delta(&mut self, meta: &ResponseMeta, delta: &Delta, first: bool) -> Vec<String> {
        let prompt_ids = if first { meta.prompt_ids() } else { None };
        let text = format!("{}{}", self.echo_for(delta.index), delta.text);
        let choice = CompletionChoice {
            index: delta.index,
            text,
            logprobs: None,
            finish_reason: delta.finish.map(Finish::as_str),
            prompt_token_ids: prompt_ids.clone(),
            token_ids: meta.ids(&delta.token_ids),
        };
        let chunk = completion(meta, vec![choice], None, prompt_ids);
        vec![json(&chunk)]
    }

    fn usage(&self, meta: &ResponseMeta, usage: Usage) -> String {
        json(&completion(meta, Vec::new(), Some(usage), None))
    }
}

fn completion(
    meta: &ResponseMeta,
    choices: Vec<CompletionChoice>,
    usage: Option<Usage>,
    prompt_token_ids: Option<Vec<u32>>,
) -> Completion {
    Completion {
        id: meta.id.clone(),
        object: "text_completion",
        created: meta.created,
        model: meta.model.clone(),
        choices,
        usage,
        prompt_token_ids,
    }
}

/// Completion tokens count every choice's.
fn usage_of(prompt_tokens: usize, out: &[Collected]) -> Usage {
    Usage::new(prompt_tokens as u32, out.iter().map(|c| c.token_ids.len() as u32).sum())
}

/// `tool_calls` once a choice made calls (OpenAI and vLLM do so whatever
/// ended the generation), else the generation's own reason.
fn finish_reason(finish: Finish, made_calls: bool) -> &'static str {
    if made_calls {
        "tool_calls"
    } else {
        finish.as_str()
    }
}

fn tool_call_object(call: ToolCall, index: Option<u32>) -> ToolCallObject {
    ToolCallObject {
        index,
        id: call.id,
        kind: "function",
        function: FunctionCall { name: call.name, arguments: call.arguments },
    }
}

/// The message of a whole generation: the text as is, unless it opened with
/// a think block or (with `tools`) holds tool calls; then those are split
/// out and `content` is what is left, null when nothing but blanks is.
fn assistant_message(text: String, tools: bool) -> AssistantMessage {
    let parsed = parse_output(&text, tools);
    if parsed.reasoning.is_none() && parsed.tool_calls.is_empty() {
        return AssistantMessage {
            role: "assistant",
            content: Some(text),
            reasoning_content: None,
            tool_calls: Vec::new(),
        };
    }
    AssistantMessage {
        role: "assistant",
        content: Some(parsed.content).filter(|c| !c.trim().is_empty()),
        reasoning_content: parsed.reasoning,
        tool_calls: parsed.tool_calls.into_iter().map(|call| tool_call_object(call, None)).collect(),
    }
}

/// The whole `chat.completion` answer; `tools` turns tool-call parsing on.
pub fn chat_response(meta: &ResponseMeta, prompt_tokens: usize, out: Vec<Collected>, tools: bool) -> ChatCompletion {
    let usage = usage_of(prompt_tokens, &out);
    let choices = (0..)
        .zip(out)
        .map(|(index, out)| {
            let message = assistant_message(out.text, tools);
            let made_calls = !message.tool_calls.is_empty();
            ChatChoice {
                index,
                token_ids: meta.ids(&out.token_ids),
                logprobs: meta.logprobs(&out.logprobs),
                message,
                finish_reason: out.finish.map(|f| finish_reason(f, made_calls)),
            }
        })
        .collect();
    ChatCompletion {
        id: meta.id.clone(),
        object: "chat.completion",
        created: meta.created,
        model: meta.model.clone(),
        choices,
        usage,
        prompt_token_ids: meta.prompt_ids(),
    }
}

/// The whole `text_completion` answer.
pub fn completion_response(meta: &ResponseMeta, prompt_tokens: usize, out: Vec<Collected>) -> Completion {
    let usage = usage_of(prompt_tokens, &out);
    let choices = (0..)
        .zip(out)
        .map(|(index, out)| CompletionChoice {
            index,
            token_ids: meta.ids(&out.token_ids),
            text: out.text,
            logprobs: None,
            finish_reason: out.finish.map(Finish::as_str),
            prompt_token_ids: meta.prompt_ids(),
        })
        .collect();
    completion(meta, choices, Some(usage), meta.prompt_ids())
}
