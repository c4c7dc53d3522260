//! Builds OpenAI bodies and stream chunks from generated deltas, one
//! [`ChunkFormat`] per endpoint so the streaming loop is shared.

use std::sync::Arc;

use serde::Serialize;

use super::response::{
    AssistantMessage, ChatChoice, ChatChunk, ChatChunkChoice, ChatCompletion, ChatDelta, ChatLogprobs,
    ChatTokenLogprob, Completion, CompletionChoice, CompletionLogprobs, FunctionCall, PromptTokenLogprob, StopReason,
    ToolCallObject, TopByText, Usage, VllmPromptLogprobs,
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
    /// OpenAI's `system_fingerprint` (the router's version and the model card).
    pub system_fingerprint: String,
    /// The served model name.
    pub model: String,
    /// Each prompt's ids (one, unless a completions batch), set only when the client asked for
    /// token ids.
    pub prompt_token_ids: Option<Vec<Arc<Vec<u32>>>>,
    /// The client asked for logprobs: choices carry them, else null.
    pub logprobs: bool,
    /// The client asked for `prompt_logprobs`: the answer carries vLLM's field.
    pub prompt_logprobs_field: bool,
    /// Choices of the answer in all: `n` per prompt.
    pub n: u32,
    /// Choices per prompt (`n`): choice `i` answers prompt `i / per_prompt`.
    pub per_prompt: u32,
}

impl ResponseMeta {
    /// The prompt ids of the answer's top level: the one prompt's (none for a batch, whose
    /// choices carry their own).
    fn prompt_ids(&self) -> Option<Vec<u32>> {
        self.prompt_token_ids.as_ref().filter(|p| p.len() == 1).map(|p| p[0].to_vec())
    }

    /// The prompt ids of choice `index`.
    fn prompt_ids_of(&self, index: u32) -> Option<Vec<u32>> {
        let prompt = (index / self.per_prompt.max(1)) as usize;
        self.prompt_token_ids.as_ref().and_then(|p| p.get(prompt)).map(|ids| ids.to_vec())
    }

    /// The prompt choice `index` answers.
    fn prompt_of(&self, index: u32) -> usize {
        (index / self.per_prompt.max(1)) as usize
    }

    fn ids(&self, ids: &[u32]) -> Option<Vec<u32>> {
        self.prompt_token_ids.is_some().then(|| ids.to_vec())
    }

    fn logprobs(&self, content: &[ChatTokenLogprob]) -> Option<ChatLogprobs> {
        self.logprobs.then(|| ChatLogprobs { content: content.to_vec() })
    }

    /// Completions' logprobs of `tokens`, whose text starts `offset` characters into the choice.
    fn completion_logprobs(&self, tokens: &[ChatTokenLogprob], offset: usize) -> Option<CompletionLogprobs> {
        self.logprobs.then(|| completion_logprobs(tokens, offset))
    }
}

/// OpenAI's completions shape of `tokens`' logprobs; `offset` is where the first token's text
/// starts in the choice's text.
fn completion_logprobs(tokens: &[ChatTokenLogprob], mut offset: usize) -> CompletionLogprobs {
    let mut out = CompletionLogprobs::default();
    for token in tokens {
        let alternatives = token.top_logprobs.iter().map(|t| (t.token.as_str(), t.logprob));
        out.push(&token.token, Some((token.logprob, top_by_text(&token.token, token.logprob, alternatives))), offset);
        offset += token.token.chars().count();
    }
    out
}

/// The chosen token first, then the most likely ones not it: OpenAI's "up to logprobs + 1".
fn top_by_text<'a>(chosen: &str, logprob: f32, alternatives: impl Iterator<Item = (&'a str, f32)>) -> TopByText {
    let mut top = vec![(chosen.to_owned(), logprob)];
    for (text, logprob) in alternatives {
        if !top.iter().any(|(t, _)| t == text) {
            top.push((text.to_owned(), logprob));
        }
    }
    TopByText(top)
}

impl CompletionLogprobs {
    /// Adds one token: its text, its logprob and top tokens (none for a prompt's first), where
    /// its text starts.
    fn push(&mut self, token: &str, scored: Option<(f32, TopByText)>, offset: usize) {
        self.tokens.push(token.to_owned());
        let (logprob, top) = scored.unzip();
        self.token_logprobs.push(logprob);
        self.top_logprobs.push(top);
        self.text_offset.push(offset);
    }
}

/// An echoed prompt's tokens with their logprobs, ahead of `generated`'s (whose offsets move
/// past the prompt's text): what loglikelihood scoring reads.
fn with_prompt(prompt: &[PromptTokenLogprob], generated: CompletionLogprobs) -> CompletionLogprobs {
    let mut out = CompletionLogprobs::default();
    let mut offset = 0;
    for token in prompt {
        let alternatives = token.top.iter().map(|(_, text, logprob)| (text.as_str(), *logprob));
        let scored = token.logprob.map(|logprob| (logprob, top_by_text(&token.token, logprob, alternatives)));
        out.push(&token.token, scored, offset);
        offset += token.token.chars().count();
    }
    let shift = offset.saturating_sub(generated.text_offset.first().copied().unwrap_or(0));
    out.tokens.extend(generated.tokens);
    out.token_logprobs.extend(generated.token_logprobs);
    out.top_logprobs.extend(generated.top_logprobs);
    out.text_offset.extend(generated.text_offset.into_iter().map(|o| o + shift));
    out
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
    /// The stop string or token that ended it.
    pub stop_reason: Option<StopReason>,
    /// Prompt tokens the workers served from their prefix cache, when they said.
    pub cached_tokens: Option<u32>,
    /// With prompt logprobs asked (on choice 0): the prompt's tokens with their logprobs.
    pub prompt_logprobs: Option<Arc<Vec<PromptTokenLogprob>>>,
}

/// Serializes a chunk; our response types always serialize.
fn json(value: &impl Serialize) -> String {
    serde_json::to_string(value).unwrap_or_default()
}

/// One server-sent event: its `event:` name (typed streams such as the Responses API's name
/// each event; chat and completions send data-only events) and its `data`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// The `event:` field, when the stream names its events.
    pub name: Option<&'static str>,
    /// The `data:` field: a JSON text, or `[DONE]`.
    pub data: String,
}

impl SseEvent {
    /// A data-only event.
    pub fn data(data: String) -> Self {
        Self { name: None, data }
    }

    /// An event named `name`.
    pub fn named(name: &'static str, data: String) -> Self {
        Self { name: Some(name), data }
    }
}

/// The data-only event of `chunk`.
fn chunk(chunk: &impl Serialize) -> SseEvent {
    SseEvent::data(json(chunk))
}

/// How one endpoint shapes its answers: whole, or as server-sent events.
pub trait ChunkFormat: Send + Unpin + 'static {
    /// What response ids start with (`chatcmpl-`, `cmpl-`, `resp_`), before the request id.
    fn id_prefix(&self) -> &'static str;
    /// The whole non-streaming answer as JSON text: one [`Collected`] per
    /// choice, in order.
    fn whole(&self, meta: &ResponseMeta, prompt_tokens: usize, out: Vec<Collected>) -> String;
    /// Events sent before any text; each carries `usage` when given (vLLM's continuous usage).
    fn opening(&mut self, meta: &ResponseMeta, usage: Option<Usage>) -> Vec<SseEvent>;
    /// Events for one delta; `first` is true for the first delta. Takes
    /// `&mut self` because a format may hold text back across deltas.
    /// Each carries `usage`, the counts so far, when given (vLLM's continuous usage).
    fn delta(&mut self, meta: &ResponseMeta, delta: &Delta, first: bool, usage: Option<Usage>) -> Vec<SseEvent>;
    /// The events that end the stream, once every choice ended; `usage` when the client asked
    /// for a usage chunk. OpenAI's chunk streams end with the usage chunk, then `[DONE]`.
    fn closing(&self, meta: &ResponseMeta, usage: Option<Usage>) -> Vec<SseEvent>;
    /// The events of a failure mid-stream, after each choice it cut short ended with
    /// [`Finish::Error`]; `body` is the OpenAI error body. By default the body itself.
    fn error(&mut self, _meta: &ResponseMeta, body: serde_json::Value) -> Vec<SseEvent> {
        vec![SseEvent::data(body.to_string())]
    }
}

/// The end of an OpenAI chunk stream: the usage chunk when asked, then `[DONE]`.
fn chunk_stream_end(usage_chunk: Option<SseEvent>) -> Vec<SseEvent> {
    usage_chunk.into_iter().chain([SseEvent::data("[DONE]".into())]).collect()
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
    /// Leave `<think>` reasoning out of the answer (vLLM's `include_reasoning: false`).
    hide_reasoning: bool,
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
        Self { tools, choices: Vec::new(), echo: None, hide_reasoning: false }
    }

    /// The same format, returning reasoning as `reasoning_content` only if `include`.
    pub fn with_reasoning(self, include: bool) -> Self {
        Self { hide_reasoning: !include, ..self }
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

    fn chunk(meta: &ResponseMeta, choices: Vec<ChatChunkChoice>, usage: Option<Usage>) -> ChatChunk {
        ChatChunk {
            id: meta.id.clone(),
            object: "chat.completion.chunk",
            created: meta.created,
            model: meta.model.clone(),
            system_fingerprint: meta.system_fingerprint.clone(),
            choices,
            usage,
            prompt_token_ids: None,
        }
    }

    fn choice(delta: ChatDelta, ids: Option<Vec<u32>>, logprobs: Option<ChatLogprobs>) -> ChatChunkChoice {
        ChatChunkChoice { index: 0, delta, logprobs, finish_reason: None, stop_reason: None, token_ids: ids }
    }
}

impl ChunkFormat for ChatFormat {
    fn id_prefix(&self) -> &'static str {
        "chatcmpl-"
    }

    fn whole(&self, meta: &ResponseMeta, prompt_tokens: usize, out: Vec<Collected>) -> String {
        let mut response = chat_response(meta, prompt_tokens, out, self.tools);
        for choice in &mut response.choices {
            if let Some(echo) = &self.echo {
                let content = choice.message.content.take().unwrap_or_default();
                choice.message.content = Some(format!("{echo}{content}"));
            }
            if self.hide_reasoning {
                choice.message.reasoning_content = None;
            }
        }
        json(&response)
    }

    /// A role chunk per choice, the first with the prompt ids; then, with
    /// `echo`, a content chunk per choice with the echoed text.
    fn opening(&mut self, meta: &ResponseMeta, usage: Option<Usage>) -> Vec<SseEvent> {
        let roles = (0..meta.n.max(1)).map(|index| {
            let delta = ChatDelta { role: Some("assistant"), content: Some(String::new()), ..ChatDelta::default() };
            let choice = ChatChunkChoice { index, ..Self::choice(delta, meta.ids(&[]), None) };
            let mut chunk = Self::chunk(meta, vec![choice], usage);
            if index == 0 {
                chunk.prompt_token_ids = meta.prompt_ids();
            }
            self::chunk(&chunk)
        });
        let echoes = self.echo.iter().flat_map(|echo| {
            (0..meta.n.max(1)).map(move |index| {
                let delta = ChatDelta { content: Some(echo.clone()), ..ChatDelta::default() };
                chunk(&Self::chunk(meta, vec![ChatChunkChoice { index, ..Self::choice(delta, None, None) }], usage))
            })
        });
        roles.chain(echoes).collect()
    }

    fn delta(&mut self, meta: &ResponseMeta, delta: &Delta, _first: bool, usage: Option<Usage>) -> Vec<SseEvent> {
        let hide_reasoning = self.hide_reasoning;
        let stream = self.stream(delta.index);
        let mut parsed = stream.parser.feed(&delta.text);
        if delta.finish.is_some() {
            parsed.extend(stream.parser.finish());
        }
        stream.ids.extend_from_slice(&delta.token_ids);
        stream.logprobs.extend_from_slice(&delta.logprobs);
        let mut deltas = Vec::new();
        if !parsed.reasoning.is_empty() && !hide_reasoning {
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
            let choice = ChatChunkChoice { index: delta.index, ..Self::choice(chat_delta, ids, logprobs) };
            chunks.push(chunk(&Self::chunk(meta, vec![choice], usage)));
        }
        if let Some(finish) = delta.finish {
            let ids = meta.ids(&std::mem::take(&mut stream.ids));
            let logprobs = meta.logprobs(&std::mem::take(&mut stream.logprobs)).filter(|l| !l.content.is_empty());
            let choice = ChatChunkChoice {
                index: delta.index,
                finish_reason: Some(finish_reason(finish, stream.calls > 0)),
                stop_reason: delta.stop_reason.clone(),
                ..Self::choice(ChatDelta::default(), ids, logprobs)
            };
            chunks.push(chunk(&Self::chunk(meta, vec![choice], usage)));
        }
        chunks
    }

    fn closing(&self, meta: &ResponseMeta, usage: Option<Usage>) -> Vec<SseEvent> {
        chunk_stream_end(usage.map(|usage| chunk(&Self::chunk(meta, Vec::new(), Some(usage)))))
    }
}

/// `text_completion` chunks: one per delta, the last with its finish reason.
#[derive(Debug, Clone, Default)]
pub struct CompletionFormat {
    /// `echo`: per prompt, the text each of its choices' text starts with.
    echoes: Vec<Option<String>>,
    /// Choices per prompt.
    per_prompt: u32,
    /// Per choice: whether its first chunk (the one that carries the echo) went out, and the
    /// characters of token text its logprobs have covered so far (their next `text_offset`).
    started: Vec<(bool, usize)>,
}

impl CompletionFormat {
    /// A completion format for `per_prompt` choices of each prompt; `echoes` holds, per prompt,
    /// the text to start its choices with.
    pub fn new(echoes: Vec<Option<String>>, per_prompt: u32) -> Self {
        Self { echoes, per_prompt: per_prompt.max(1), started: Vec::new() }
    }

    /// The echo of choice `index`'s prompt.
    fn echo(&self, index: u32) -> Option<&str> {
        self.echoes.get((index / self.per_prompt) as usize).and_then(Option::as_deref)
    }

    /// Choice `index`'s progress, made on its first delta.
    fn progress(&mut self, index: u32) -> &mut (bool, usize) {
        let index = index as usize;
        if self.started.len() <= index {
            self.started.resize(index + 1, (false, 0));
        }
        &mut self.started[index]
    }
}

impl ChunkFormat for CompletionFormat {
    fn id_prefix(&self) -> &'static str {
        "cmpl-"
    }

    fn whole(&self, meta: &ResponseMeta, prompt_tokens: usize, out: Vec<Collected>) -> String {
        // Each prompt's scored tokens ride with one of its choices.
        let scored: Vec<Option<Arc<Vec<PromptTokenLogprob>>>> =
            out.chunks(self.per_prompt as usize).map(|c| c.iter().find_map(|c| c.prompt_logprobs.clone())).collect();
        let echo_lens: Vec<usize> =
            (0..out.len() as u32).map(|i| self.echo(i).map_or(0, |echo| echo.chars().count())).collect();
        let mut response = completion_response(meta, prompt_tokens, out, &echo_lens);
        for choice in &mut response.choices {
            let prompt = scored.get(meta.prompt_of(choice.index)).cloned().flatten();
            if let Some(echo) = self.echo(choice.index) {
                choice.text.insert_str(0, echo);
                // Echoed with logprobs: the prompt's tokens lead them, as OpenAI and vLLM give them.
                if let (Some(prompt), Some(generated)) = (&prompt, choice.logprobs.take()) {
                    choice.logprobs = Some(with_prompt(prompt, generated));
                }
            }
            if meta.prompt_logprobs_field {
                choice.prompt_logprobs = prompt.as_deref().map(|p| VllmPromptLogprobs::of(p));
            }
        }
        json(&response)
    }

    fn opening(&mut self, _meta: &ResponseMeta, _usage: Option<Usage>) -> Vec<SseEvent> {
        Vec::new()
    }

    fn delta(&mut self, meta: &ResponseMeta, delta: &Delta, first: bool, usage: Option<Usage>) -> Vec<SseEvent> {
        let prompt_ids = if first { meta.prompt_ids() } else { None };
        let echo_len = self.echo(delta.index).map_or(0, |echo| echo.chars().count());
        let (started, offset) = *self.progress(delta.index);
        let echo = if started { "" } else { self.echo(delta.index).unwrap_or_default() };
        let text = format!("{echo}{}", delta.text);
        let logprobs = meta.completion_logprobs(&delta.logprobs, echo_len + offset);
        let covered: usize = delta.logprobs.iter().map(|t| t.token.chars().count()).sum();
        *self.progress(delta.index) = (true, offset + covered);
        let choice = CompletionChoice {
            index: delta.index,
            text,
            logprobs,
            finish_reason: delta.finish.map(Finish::as_str),
            stop_reason: delta.stop_reason.clone(),
            // Refused with `stream`.
            prompt_logprobs: None,
            // A choice's first chunk carries its prompt's ids.
            prompt_token_ids: if started { None } else { meta.prompt_ids_of(delta.index) },
            token_ids: meta.ids(&delta.token_ids),
        };
        vec![chunk(&completion(meta, vec![choice], usage, prompt_ids))]
    }

    fn closing(&self, meta: &ResponseMeta, usage: Option<Usage>) -> Vec<SseEvent> {
        chunk_stream_end(usage.map(|usage| chunk(&completion(meta, Vec::new(), Some(usage), None))))
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
        system_fingerprint: meta.system_fingerprint.clone(),
        choices,
        usage,
        prompt_token_ids,
    }
}

/// Completion tokens count every choice's; cached tokens every prompt's.
fn usage_of(meta: &ResponseMeta, prompt_tokens: usize, out: &[Collected]) -> Usage {
    let per_prompt =
        out.chunks(meta.per_prompt.max(1) as usize).map(|c| c.iter().filter_map(|c| c.cached_tokens).max());
    let cached = per_prompt.fold(None, |sum: Option<u32>, c| c.map_or(sum, |c| Some(sum.unwrap_or(0) + c)));
    Usage::new(prompt_tokens as u32, out.iter().map(|c| c.token_ids.len() as u32).sum()).cached(cached)
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
    let usage = usage_of(meta, prompt_tokens, &out);
    let prompt_logprobs = out.iter().find_map(|c| c.prompt_logprobs.clone());
    let prompt_logprobs = prompt_logprobs.filter(|_| meta.prompt_logprobs_field).map(|p| VllmPromptLogprobs::of(&p));
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
                stop_reason: out.stop_reason,
            }
        })
        .collect();
    ChatCompletion {
        id: meta.id.clone(),
        object: "chat.completion",
        created: meta.created,
        model: meta.model.clone(),
        system_fingerprint: meta.system_fingerprint.clone(),
        choices,
        usage,
        prompt_token_ids: meta.prompt_ids(),
        prompt_logprobs,
    }
}

/// The whole `text_completion` answer. Choice `i`'s text starts after `echo_lens[i]` characters
/// of echo, which its logprobs' offsets count.
fn completion_response(
    meta: &ResponseMeta,
    prompt_tokens: usize,
    out: Vec<Collected>,
    echo_lens: &[usize],
) -> Completion {
    let usage = usage_of(meta, prompt_tokens, &out);
    let choices = (0..)
        .zip(out)
        .map(|(index, out)| CompletionChoice {
            index,
            token_ids: meta.ids(&out.token_ids),
            logprobs: meta.completion_logprobs(&out.logprobs, echo_lens.get(index as usize).copied().unwrap_or(0)),
            text: out.text,
            finish_reason: out.finish.map(Finish::as_str),
            stop_reason: out.stop_reason,
            prompt_logprobs: None,
            prompt_token_ids: meta.prompt_ids_of(index),
        })
        .collect();
    completion(meta, choices, Some(usage), meta.prompt_ids())
}
