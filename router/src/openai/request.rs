//! Request bodies of `/v1/chat/completions` and `/v1/completions`.
//!
//! Numbers are read wide (`f64`, `i64`) so that out-of-range values reach
//! validation, which names the field and the limit, instead of failing in
//! serde with a less helpful message. Unknown fields are ignored.

use std::collections::HashMap;

use serde::Deserialize;

/// Body of `POST /v1/chat/completions`.
#[derive(Debug, Default, Deserialize)]
pub struct ChatCompletionRequest {
    /// Must equal the served model name; absent means the served model.
    pub model: Option<String>,
    /// The conversation; required.
    pub messages: Option<Vec<ChatMessage>>,
    /// Return each generated token's logprob (default false).
    pub logprobs: Option<bool>,
    /// With `logprobs`: also the this many most likely tokens per position, in [0, 20].
    pub top_logprobs: Option<i64>,
    /// Functions the model may call: `[{"type": "function", "function": {"name", ...}}]`.
    /// Read as raw JSON so validation names the field, and the template gets
    /// the dicts as the client wrote them.
    pub tools: Option<serde_json::Value>,
    /// `"auto"` (default with tools), `"none"`, `"required"` or
    /// `{"type": "function", "function": {"name"}}`.
    pub tool_choice: Option<serde_json::Value>,
    /// Shared sampling and output options.
    #[serde(flatten)]
    pub params: CommonParams,
}

/// Body of `POST /v1/completions`.
#[derive(Debug, Default, Deserialize)]
pub struct CompletionRequest {
    /// Must equal the served model name; absent means the served model.
    pub model: Option<String>,
    /// The prompt; required.
    pub prompt: Option<Prompt>,
    /// Shared sampling and output options.
    #[serde(flatten)]
    pub params: CommonParams,
}

/// Fields both endpoints accept.
#[derive(Debug, Default, Deserialize)]
pub struct CommonParams {
    /// Most tokens to generate; absent means up to the context length.
    pub max_tokens: Option<i64>,
    /// Newer OpenAI name for `max_tokens`; used when `max_tokens` is absent.
    pub max_completion_tokens: Option<i64>,
    /// In [0, 2], default 1; 0 is greedy.
    pub temperature: Option<f64>,
    /// In (0, 1], default 1 (off).
    pub top_p: Option<f64>,
    /// vLLM extra: -1 or 0 turn it off, else at least 1.
    pub top_k: Option<i64>,
    /// Per-request RNG seed.
    pub seed: Option<i64>,
    /// Number of choices, in [1, 16], default 1; they share the prompt's KV.
    pub n: Option<i64>,
    /// Stream server-sent events instead of one JSON body.
    pub stream: Option<bool>,
    /// Streaming options (`include_usage`).
    pub stream_options: Option<StreamOptions>,
    /// Stop strings: one or a list of up to 4.
    pub stop: Option<StopSpec>,
    /// vLLM extra: return prompt and generated token ids.
    pub return_token_ids: Option<bool>,
    /// vLLM extra: in [0, 1], default 0 (off); drops tokens less likely than
    /// `min_p` times the most likely one.
    pub min_p: Option<f64>,
    /// In [-2, 2], default 0: subtracted once from tokens already generated.
    pub presence_penalty: Option<f64>,
    /// In [-2, 2], default 0: subtracted per occurrence in the generated text.
    pub frequency_penalty: Option<f64>,
    /// vLLM extra: in (0, 2], default 1 (off); scales the logits of prompt
    /// and generated tokens.
    pub repetition_penalty: Option<f64>,
    /// Token id (as a string key, e.g. `"50256"`) to a bias in [-100, 100].
    pub logit_bias: Option<HashMap<String, f64>>,
    /// vLLM extra: token ids that end generation (reason `stop`).
    pub stop_token_ids: Option<Vec<i64>>,
    /// vLLM extra: keep generating past the model's eos tokens.
    pub ignore_eos: Option<bool>,
    /// vLLM extra: at least this many tokens before eos or a stop token
    /// may end generation; default 0, at most `max_tokens`.
    pub min_tokens: Option<i64>,
    /// vLLM extra: scheduling priority, lower runs first; default 0, an i32.
    pub priority: Option<i64>,
    /// vLLM extra: only requests with the same salt share prefix-cache blocks;
    /// a non-empty string when given.
    pub cache_salt: Option<String>,
}

/// `stream_options` of a streaming request.
#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    /// Send a last chunk with empty `choices` and the usage counts.
    pub include_usage: Option<bool>,
}

/// `stop`: a string or a list of strings.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum StopSpec {
    /// One stop string.
    One(String),
    /// Several stop strings.
    Many(Vec<String>),
}

/// One message of a chat.
#[derive(Debug, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant` or `tool`.
    pub role: String,
    /// Text, or a list of content parts; may be null for assistant turns.
    pub content: Option<MessageContent>,
    /// Assistant turns: the calls it made, passed to the template as sent.
    pub tool_calls: Option<Vec<serde_json::Value>>,
    /// Tool turns: the id of the call this result answers; required there.
    pub tool_call_id: Option<String>,
    /// Tool turns: the function's name (optional).
    pub name: Option<String>,
}

/// A message's `content`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum MessageContent {
    /// Plain text.
    Text(String),
    /// Content parts; only `{"type": "text", "text": ...}` is supported.
    Parts(Vec<ContentPart>),
}

/// One element of a list-shaped `content`.
#[derive(Debug, Deserialize)]
pub struct ContentPart {
    /// The part's kind; only `text` is supported.
    #[serde(rename = "type")]
    pub kind: String,
    /// The text of a `text` part.
    pub text: Option<String>,
}

/// `prompt` of a completion request.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    /// Text to tokenize.
    Text(String),
    /// Token ids, passed through (checked against the vocabulary).
    TokenIds(Vec<i64>),
    /// A batch of texts; only a batch of one is supported.
    Texts(Vec<String>),
}

/// Body of vLLM's `POST /tokenize`: the completion form (`prompt`) or the
/// chat form (`messages`), one of the two.
#[derive(Debug, Default, Deserialize)]
pub struct TokenizeRequest {
    /// Must equal the served model name; absent means the served model.
    pub model: Option<String>,
    /// Completion form: the text to tokenize.
    pub prompt: Option<String>,
    /// Chat form: the conversation, rendered as `/v1/chat/completions` renders it.
    pub messages: Option<Vec<ChatMessage>>,
    /// Add the model's special tokens (BOS); default true for `prompt`, false for `messages`.
    pub add_special_tokens: Option<bool>,
    /// Chat form: end with the assistant's turn header (default true; only true is supported).
    pub add_generation_prompt: Option<bool>,
    /// Chat form: leave the last message open (default false; only false is supported).
    pub continue_final_message: Option<bool>,
    /// Chat form: a template to use instead of the model's (not supported).
    pub chat_template: Option<String>,
    /// Chat form: extra template variables (only an empty object is supported).
    pub chat_template_kwargs: Option<serde_json::Map<String, serde_json::Value>>,
    /// Also return each token's vocabulary string.
    pub return_token_strs: Option<bool>,
}

/// Body of vLLM's `POST /detokenize`.
#[derive(Debug, Default, Deserialize)]
pub struct DetokenizeRequest {
    /// Must equal the served model name; absent means the served model.
    pub model: Option<String>,
    /// The token ids to decode; required, each in the vocabulary.
    pub tokens: Option<Vec<i64>>,
}
