//! Builds OpenAI bodies and stream chunks from generated deltas, one
//! [`ChunkFormat`] per endpoint so the streaming loop is shared.

use std::sync::Arc;

use serde::Serialize;

use super::response::{
    AssistantMessage, ChatChoice, ChatChunk, ChatChunkChoice, ChatCompletion, ChatDelta, ChatLogprobs,
    ChatTokenLogprob, Completion, CompletionChoice, Usage,
};
use crate::pd::Finish;
use crate::stream::Delta;

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
    /// The whole non-streaming answer: one [`Collected`] per choice, in order.
    fn whole(&self, meta: &ResponseMeta, prompt_tokens: usize, out: Vec<Collected>) -> serde_json::Value;
    /// Chunks sent before any text.
    fn opening(&self, meta: &ResponseMeta) -> Vec<String>;
    /// Chunks for one delta; `first` is true for the first delta.
    fn delta(&self, meta: &ResponseMeta, delta: &Delta, first: bool) -> Vec<String>;
    /// The usage chunk (`choices: []`).
    fn usage(&self, meta: &ResponseMeta, usage: Usage) -> String;
}

/// `chat.completion.chunk`: a role chunk, content chunks, an empty-delta finish chunk.
#[derive(Debug, Clone, Copy)]
pub struct ChatFormat;

impl ChatFormat {
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
        finish: Option<Finish>,
        ids: Option<Vec<u32>>,
        logprobs: Option<ChatLogprobs>,
    ) -> ChatChunkChoice {
        ChatChunkChoice { index, delta, logprobs, finish_reason: finish.map(Finish::as_str), token_ids: ids }
    }
}

impl ChunkFormat for ChatFormat {
    fn id_prefix(&self) -> &'static str {
        "chatcmpl"
    }

    fn whole(&self, meta: &ResponseMeta, prompt_tokens: usize, out: Vec<Collected>) -> serde_json::Value {
        serde_json::to_value(chat_response(meta, prompt_tokens, out)).unwrap_or_default()
    }

    /// A role chunk per choice; the first carries the prompt ids.
    fn opening(&self, meta: &ResponseMeta) -> Vec<String> {
        (0..meta.n.max(1))
            .map(|index| {
                let delta = ChatDelta { role: Some("assistant"), content: Some(String::new()) };
                let mut chunk = Self::chunk(meta, vec![Self::choice(index, delta, None, meta.ids(&[]), None)]);
                if index == 0 {
                    chunk.prompt_token_ids = meta.prompt_ids();
                }
                json(&chunk)
            })
            .collect()
    }

    fn delta(&self, meta: &ResponseMeta, delta: &Delta, _first: bool) -> Vec<String> {
        let mut chunks = Vec::new();
        let mut ids = meta.ids(&delta.token_ids);
        // The logprobs ride with the text; tokens without text (eos) ride
        // with the finish chunk.
        let mut logprobs = meta.logprobs(&delta.logprobs);
        if !delta.text.is_empty() {
            let content = ChatDelta { role: None, content: Some(delta.text.clone()) };
            let choice = Self::choice(delta.index, content, None, ids.take(), logprobs.take());
            chunks.push(json(&Self::chunk(meta, vec![choice])));
        }
        if let Some(finish) = delta.finish {
            let ids = ids.or_else(|| meta.ids(&[]));
            let logprobs = logprobs.filter(|l| !l.content.is_empty());
            let choice = Self::choice(delta.index, ChatDelta::default(), Some(finish), ids, logprobs);
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
#[derive(Debug, Clone, Copy)]
pub struct CompletionFormat;

impl ChunkFormat for CompletionFormat {
    fn id_prefix(&self) -> &'static str {
        "cmpl"
    }

    fn whole(&self, meta: &ResponseMeta, prompt_tokens: usize, out: Vec<Collected>) -> serde_json::Value {
        serde_json::to_value(completion_response(meta, prompt_tokens, out)).unwrap_or_default()
    }

    fn opening(&self, _meta: &ResponseMeta) -> Vec<String> {
        Vec::new()
    }

    fn delta(&self, meta: &ResponseMeta, delta: &Delta, first: bool) -> Vec<String> {
        let prompt_ids = if first { meta.prompt_ids() } else { None };
        let choice = CompletionChoice {
            index: delta.index,
            text: delta.text.clone(),
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

/// The whole `chat.completion` answer.
pub fn chat_response(meta: &ResponseMeta, prompt_tokens: usize, out: Vec<Collected>) -> ChatCompletion {
    let usage = usage_of(prompt_tokens, &out);
    let choices = (0..)
        .zip(out)
        .map(|(index, out)| ChatChoice {
            index,
            token_ids: meta.ids(&out.token_ids),
            logprobs: meta.logprobs(&out.logprobs),
            message: AssistantMessage { role: "assistant", content: out.text },
            finish_reason: out.finish.map(Finish::as_str),
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
