//! Response bodies and stream chunks of the OpenAI endpoints.

use serde::Serialize;
use utoipa::ToSchema;

/// Token counts of one request.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq, ToSchema)]
pub struct Usage {
    /// Tokens in the prompt.
    pub prompt_tokens: u32,
    /// Generated tokens that were used (up to and including a stop).
    pub completion_tokens: u32,
    /// Their sum.
    pub total_tokens: u32,
    /// The prompt tokens served from the workers' prefix cache, once the workers said.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_tokens_details: Option<PromptTokensDetails>,
}

/// OpenAI's `usage.prompt_tokens_details`.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq, ToSchema)]
pub struct PromptTokensDetails {
    /// Prompt tokens whose KV came from the prefix cache rather than being computed.
    pub cached_tokens: u32,
}

impl Usage {
    /// Usage with `total_tokens` filled in.
    pub fn new(prompt_tokens: u32, completion_tokens: u32) -> Self {
        let total_tokens = prompt_tokens + completion_tokens;
        Self { prompt_tokens, completion_tokens, total_tokens, prompt_tokens_details: None }
    }

    /// The same usage with `cached` prompt tokens served from the prefix cache, when known.
    pub fn cached(self, cached: Option<u32>) -> Self {
        Self { prompt_tokens_details: cached.map(|cached_tokens| PromptTokensDetails { cached_tokens }), ..self }
    }
}

/// `GET /v1/models`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ModelList {
    /// Always `list`.
    pub object: &'static str,
    /// The served model.
    pub data: Vec<ModelObject>,
}

/// One entry of [`ModelList`].
#[derive(Debug, Serialize, ToSchema)]
pub struct ModelObject {
    /// The served model name.
    pub id: String,
    /// Always `model`.
    pub object: &'static str,
    /// Unix seconds when the router loaded the model card.
    pub created: u64,
    /// Always `pdserve`.
    pub owned_by: &'static str,
    /// Context length in tokens.
    pub max_model_len: u32,
}

/// Non-streaming chat answer (`chat.completion`).
#[derive(Debug, Serialize, ToSchema)]
pub struct ChatCompletion {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    /// The router's version and model card, hashed (`fp_` and 12 hex digits).
    pub system_fingerprint: String,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
    /// vLLM extra, with `return_token_ids`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_token_ids: Option<Vec<u32>>,
    /// vLLM extra, with `prompt_logprobs`: the prompt's tokens with their logprobs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_logprobs: Option<VllmPromptLogprobs>,
}

/// A chat choice's `logprobs` (OpenAI's shape): one entry per reported token.
#[derive(Debug, Clone, Default, Serialize, PartialEq, ToSchema)]
pub struct ChatLogprobs {
    pub content: Vec<ChatTokenLogprob>,
}

/// One generated token's logprob and the most likely alternatives.
#[derive(Debug, Clone, Serialize, PartialEq, ToSchema)]
pub struct ChatTokenLogprob {
    /// The token's text.
    pub token: String,
    pub logprob: f32,
    /// The UTF-8 bytes of `token`.
    pub bytes: Vec<u8>,
    /// Most likely first; as many as `top_logprobs` asked.
    pub top_logprobs: Vec<TopLogprob>,
}

/// One of the most likely tokens at a position.
#[derive(Debug, Clone, Serialize, PartialEq, ToSchema)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

/// One choice of [`ChatCompletion`].
#[derive(Debug, Serialize, ToSchema)]
pub struct ChatChoice {
    pub index: u32,
    pub message: AssistantMessage,
    /// Null unless the request asked for logprobs.
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<&'static str>,
    /// vLLM extra: with `finish_reason: "stop"`, the stop string or stop token id that ended the
    /// choice; null otherwise.
    pub stop_reason: Option<StopReason>,
    /// vLLM extra, with `return_token_ids`: the generated ids.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_ids: Option<Vec<u32>>,
}

/// The generated message.
#[derive(Debug, Serialize, ToSchema)]
pub struct AssistantMessage {
    /// Always `assistant`.
    pub role: &'static str,
    /// The text; null when a think block or tool calls took all of it.
    pub content: Option<String>,
    /// vLLM's field: the text of a leading `<think>` block, when there was one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
    /// Calls parsed from the text (only with `tools`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCallObject>,
}

/// One tool call: whole in a message; in a stream chunk with its `index`.
#[derive(Debug, Clone, Serialize, PartialEq, ToSchema)]
pub struct ToolCallObject {
    /// Stream chunks only: the call's position among the choice's calls.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index: Option<u32>,
    /// `call_<random>`.
    pub id: String,
    /// Always `function`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub function: FunctionCall,
}

/// The function a [`ToolCallObject`] calls.
#[derive(Debug, Clone, Serialize, PartialEq, ToSchema)]
pub struct FunctionCall {
    pub name: String,
    /// The arguments, a JSON object as a string.
    pub arguments: String,
}

/// One streamed chat event (`chat.completion.chunk`).
#[derive(Debug, Serialize, ToSchema)]
pub struct ChatChunk {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    /// The router's version and model card, hashed (`fp_` and 12 hex digits).
    pub system_fingerprint: String,
    pub choices: Vec<ChatChunkChoice>,
    /// Only on the usage chunk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// vLLM extra on the first chunk, with `return_token_ids`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_token_ids: Option<Vec<u32>>,
}

/// One choice of a [`ChatChunk`].
#[derive(Debug, Serialize, ToSchema)]
pub struct ChatChunkChoice {
    pub index: u32,
    pub delta: ChatDelta,
    /// Null unless the request asked for logprobs: then those of the tokens
    /// whose text this chunk carries.
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<&'static str>,
    /// vLLM extra: with `finish_reason: "stop"`, the stop string or stop token id that ended the
    /// choice; null otherwise.
    pub stop_reason: Option<StopReason>,
    /// vLLM extra, with `return_token_ids`: the ids behind this delta.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_ids: Option<Vec<u32>>,
}

/// What a chat chunk adds; every field absent on the finish chunk (`{}`).
#[derive(Debug, Default, Serialize, ToSchema)]
pub struct ChatDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// vLLM's field: text of the leading `<think>` block.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
    /// A call, sent whole once its block is complete.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallObject>>,
}

/// Completion answer (`text_completion`), whole or as one stream chunk.
#[derive(Debug, Serialize, ToSchema)]
pub struct Completion {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    /// The router's version and model card, hashed (`fp_` and 12 hex digits).
    pub system_fingerprint: String,
    pub choices: Vec<CompletionChoice>,
    /// Always on a whole answer; on a stream only in the usage chunk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// vLLM extra, with `return_token_ids`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_token_ids: Option<Vec<u32>>,
}

/// One choice of a [`Completion`].
#[derive(Debug, Serialize, ToSchema)]
pub struct CompletionChoice {
    pub index: u32,
    pub text: String,
    /// With `logprobs`: those of this choice's (or this chunk's) tokens; else null.
    pub logprobs: Option<CompletionLogprobs>,
    pub finish_reason: Option<&'static str>,
    /// vLLM extra: with `finish_reason: "stop"`, the stop string or stop token id that ended the
    /// choice; null otherwise.
    pub stop_reason: Option<StopReason>,
    /// vLLM extra, with `prompt_logprobs`: the prompt's tokens with their logprobs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_logprobs: Option<VllmPromptLogprobs>,
    /// vLLM extra, with `return_token_ids`: vLLM puts the prompt ids here.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_token_ids: Option<Vec<u32>>,
    /// vLLM extra, with `return_token_ids`: the generated ids (of this delta).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_ids: Option<Vec<u32>>,
}

/// One prompt token as vLLM's prompt logprobs describe it: its logprob given the tokens before
/// it (none for the first), its rank there, and the most likely tokens there.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptTokenLogprob {
    /// The token.
    pub id: u32,
    /// Its text on its own (or `token_id:{id}`).
    pub token: String,
    /// `None` for the prompt's first token, which nothing predicts.
    pub logprob: Option<f32>,
    /// Its rank among the vocabulary there, 1 for the most likely.
    pub rank: u32,
    /// The most likely tokens there, most likely first: id, text, logprob.
    pub top: Vec<(u32, String, f32)>,
}

/// vLLM's `prompt_logprobs` field: per prompt token, null for the first, else an object from
/// token id (as text) to `{logprob, rank, decoded_token}` holding the prompt token and the most
/// likely ones.
#[derive(Debug, Clone, PartialEq, ToSchema)]
#[schema(value_type = Vec<Option<std::collections::HashMap<String, VllmLogprob>>>)]
pub struct VllmPromptLogprobs(pub Vec<Option<Vec<(u32, VllmLogprob)>>>);

/// One entry of vLLM's logprob dictionaries.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct VllmLogprob {
    pub logprob: f32,
    /// 1 for the most likely; null where vLLM does not know it (a top token other than the
    /// prompt token).
    pub rank: Option<u32>,
    pub decoded_token: String,
}

impl Serialize for VllmPromptLogprobs {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        struct Entries<'a>(&'a [(u32, VllmLogprob)]);
        impl Serialize for Entries<'_> {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.collect_map(self.0.iter().map(|(id, l)| (id.to_string(), l)))
            }
        }
        serializer.collect_seq(self.0.iter().map(|entry| entry.as_deref().map(Entries)))
    }
}

impl VllmPromptLogprobs {
    /// The field for `tokens`: the prompt token first, then the most likely ones not it.
    pub fn of(tokens: &[PromptTokenLogprob]) -> Self {
        Self(
            tokens
                .iter()
                .map(|t| {
                    let logprob = t.logprob?;
                    let own = VllmLogprob { logprob, rank: Some(t.rank), decoded_token: t.token.clone() };
                    let mut entries = vec![(t.id, own)];
                    for (rank, (id, text, logprob)) in (1..).zip(&t.top) {
                        if *id != t.id {
                            let l = VllmLogprob { logprob: *logprob, rank: Some(rank), decoded_token: text.clone() };
                            entries.push((*id, l));
                        }
                    }
                    Some(entries)
                })
                .collect(),
        )
    }
}

/// What ended a choice with `finish_reason: "stop"`, as vLLM reports it in `stop_reason`: the
/// stop string, or the stop token id (null for the model's eos).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
#[serde(untagged)]
pub enum StopReason {
    /// A stop string matched.
    Text(String),
    /// One of `stop_token_ids` was generated.
    Token(u32),
}

/// One server-sent event of a streamed answer, as the OpenAPI document describes
/// `text/event-stream`: `data` holds a chunk (`chat.completion.chunk` or `text_completion`) as
/// JSON text, and the last event's is `[DONE]`.
#[derive(Debug, Serialize, ToSchema)]
pub struct StreamEvent {
    /// The chunk as JSON text, or `[DONE]`.
    pub data: String,
}

/// One server-sent event of a typed stream (the Responses API's), as the OpenAPI document
/// describes `text/event-stream`: `event` names it, and `data` holds the event as JSON text,
/// whose `type` is that name and whose `sequence_number` counts up from 0.
#[derive(Debug, Serialize, ToSchema)]
pub struct NamedStreamEvent {
    /// The event's type, e.g. `response.output_text.delta`.
    pub event: String,
    /// The event as JSON text.
    pub data: String,
}

/// OpenAI's completions `logprobs`: parallel lists, one entry per token.
#[derive(Debug, Clone, Default, Serialize, PartialEq, ToSchema)]
pub struct CompletionLogprobs {
    /// Each token's text.
    pub tokens: Vec<String>,
    /// Each token's logprob; null for an echoed prompt's first token, which nothing predicts.
    pub token_logprobs: Vec<Option<f32>>,
    /// Per token: the token itself and the `logprobs` most likely tokens, by text, most likely
    /// first (at most `logprobs` + 1 entries, as OpenAI); null where `token_logprobs` is.
    pub top_logprobs: Vec<Option<TopByText>>,
    /// Each token's offset, in characters, in the choice's text.
    pub text_offset: Vec<usize>,
}

/// A JSON object from token text to logprob, in insertion order.
#[derive(Debug, Clone, Default, PartialEq, ToSchema)]
#[schema(value_type = std::collections::HashMap<String, f32>)]
pub struct TopByText(pub Vec<(String, f32)>);

impl Serialize for TopByText {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.0.iter().map(|(token, logprob)| (token, logprob)))
    }
}

/// vLLM's `POST /tokenize` answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct TokenizeResponse {
    /// Number of tokens.
    pub count: usize,
    /// The context length, as `/v1/models` reports it.
    pub max_model_len: u32,
    /// The token ids.
    pub tokens: Vec<u32>,
    /// Each token's vocabulary string when `return_token_strs` was set, else null.
    pub token_strs: Option<Vec<String>>,
}

/// vLLM's `POST /detokenize` answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct DetokenizeResponse {
    /// The decoded text.
    pub prompt: String,
}

/// vLLM's `GET /tokenizer_info` answer: what a client needs to tokenize as the server does
/// through `/tokenize` (lm-evaluation-harness's remote tokenizer reads it).
#[derive(Debug, Serialize, ToSchema)]
pub struct TokenizerInfo {
    /// Always `PreTrainedTokenizerFast`: the tokenizer is a Hugging Face `tokenizer.json`.
    pub tokenizer_class: &'static str,
    /// The end-of-sequence token's text.
    pub eos_token: String,
    /// The beginning-of-sequence token's text.
    pub bos_token: String,
    /// Whether text prompts get BOS first.
    pub add_bos_token: bool,
    /// Longest prompt plus completion, in tokens.
    pub model_max_length: u32,
    /// The chat template's Jinja source; null when the model has none.
    pub chat_template: Option<String>,
}

/// vLLM's `GET /version` answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct VersionResponse {
    /// The router's crate version.
    pub version: &'static str,
}
