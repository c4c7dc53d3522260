//! Request bodies of `/v1/chat/completions` and `/v1/completions`.
//!
//! Numbers are read wide (`f64`, `i64`) so that out-of-range values reach
//! validation, which names the field and the limit, instead of failing in
//! serde with a less helpful message. Unknown fields are ignored.

use std::collections::HashMap;

use serde::de::{DeserializeOwned, Error as _};
use serde::{Deserialize, Deserializer};
use serde_json::{Map, Value};
use utoipa::ToSchema;

mod schema;

/// Body of `POST /v1/chat/completions`.
#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct ChatCompletionRequest {
    /// Must equal the served model name; absent means the served model.
    pub model: Option<String>,
    /// The conversation; required.
    #[schema(value_type = Vec<ChatMessage>, min_items = 1, required = true)]
    #[serde(default, deserialize_with = "objects")]
    pub messages: Option<Vec<ChatMessage>>,
    /// Return each generated token's logprob (default false).
    pub logprobs: Option<bool>,
    /// With `logprobs`: also the this many most likely tokens per position, in [0, 20].
    #[schema(minimum = 0, maximum = 20)]
    pub top_logprobs: Option<i64>,
    /// Functions the model may call: `[{"type": "function", "function": {"name", ...}}]`.
    /// Read as raw JSON so validation names the field, and the template gets
    /// the dicts as the client wrote them.
    #[schema(schema_with = schema::tools)]
    pub tools: Option<serde_json::Value>,
    /// `"auto"` (default with tools), `"none"`, `"required"` or
    /// `{"type": "function", "function": {"name"}}`.
    #[schema(schema_with = schema::tool_choice)]
    pub tool_choice: Option<serde_json::Value>,
    /// How the conversation is rendered: generation prompt, template, variables.
    #[serde(flatten)]
    pub render: ChatRenderParams,
    /// vLLM extra: start the answer with the last message's content when it
    /// is an assistant message (the answer's role); default false.
    pub echo: Option<bool>,
    /// Shared sampling and output options.
    #[serde(flatten)]
    pub params: CommonParams,
}

/// vLLM's chat rendering options, shared by `/v1/chat/completions` and
/// `/tokenize` so both render a conversation into the same ids.
#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct ChatRenderParams {
    /// End the prompt with the assistant's turn header; default true.
    pub add_generation_prompt: Option<bool>,
    /// Leave the last message, which must be the assistant's, open for the
    /// model to continue; default false, and not with `add_generation_prompt`.
    pub continue_final_message: Option<bool>,
    /// A Jinja chat template to use instead of the model's.
    pub chat_template: Option<String>,
    /// Extra template variables (e.g. `{"enable_thinking": false}`); an
    /// object. Read as raw JSON so a non-object is a 400 naming the field.
    #[schema(value_type = Option<Object>)]
    pub chat_template_kwargs: Option<serde_json::Value>,
}

/// Body of `POST /v1/completions`.
#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct CompletionRequest {
    /// Must equal the served model name; absent means the served model.
    pub model: Option<String>,
    /// The prompt; required.
    #[schema(schema_with = schema::prompt, required = true)]
    pub prompt: Option<Prompt>,
    /// Start each choice's text with the prompt's text; default false.
    pub echo: Option<bool>,
    /// Most likely tokens per position to return. Completion logprobs are
    /// not computed here; the field is read only to refuse it with `echo`,
    /// which would need prompt logprobs.
    pub logprobs: Option<i64>,
    /// Shared sampling and output options.
    #[serde(flatten)]
    pub params: CommonParams,
}

/// Fields both endpoints accept.
#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct CommonParams {
    /// Most tokens to generate; absent means up to the context length.
    #[schema(minimum = 1)]
    pub max_tokens: Option<i64>,
    /// Newer OpenAI name for `max_tokens`; used when `max_tokens` is absent.
    #[schema(minimum = 1)]
    pub max_completion_tokens: Option<i64>,
    /// In [0, 2], default 1; 0 is greedy.
    #[schema(minimum = 0, maximum = 2)]
    pub temperature: Option<f64>,
    /// In (0, 1], default 1 (off).
    #[schema(exclusive_minimum = 0, maximum = 1)]
    pub top_p: Option<f64>,
    /// vLLM extra: -1 or 0 turn it off, else at least 1.
    #[schema(minimum = -1)]
    pub top_k: Option<i64>,
    /// Per-request RNG seed.
    pub seed: Option<i64>,
    /// Number of choices, in [1, 16], default 1; they share the prompt's KV.
    #[schema(minimum = 1, maximum = 16)]
    pub n: Option<i64>,
    /// Stream server-sent events instead of one JSON body.
    pub stream: Option<bool>,
    /// Streaming options (`include_usage`).
    #[serde(default, deserialize_with = "object")]
    pub stream_options: Option<StreamOptions>,
    /// Stop strings: one or a list of up to 4.
    #[schema(schema_with = schema::stop)]
    pub stop: Option<StopSpec>,
    /// vLLM extra: return prompt and generated token ids.
    pub return_token_ids: Option<bool>,
    /// vLLM extra: in [0, 1], default 0 (off); drops tokens less likely than
    /// `min_p` times the most likely one.
    #[schema(minimum = 0, maximum = 1)]
    pub min_p: Option<f64>,
    /// In [-2, 2], default 0: subtracted once from tokens already generated.
    #[schema(minimum = -2, maximum = 2)]
    pub presence_penalty: Option<f64>,
    /// In [-2, 2], default 0: subtracted per occurrence in the generated text.
    #[schema(minimum = -2, maximum = 2)]
    pub frequency_penalty: Option<f64>,
    /// vLLM extra: in (0, 2], default 1 (off); scales the logits of prompt
    /// and generated tokens.
    #[schema(exclusive_minimum = 0, maximum = 2)]
    pub repetition_penalty: Option<f64>,
    /// Token id (as a string key, e.g. `"50256"`) to a bias in [-100, 100].
    #[schema(schema_with = schema::logit_bias)]
    pub logit_bias: Option<HashMap<String, f64>>,
    /// vLLM extra: token ids that end generation (reason `stop`).
    #[schema(schema_with = schema::token_ids)]
    pub stop_token_ids: Option<Vec<i64>>,
    /// vLLM extra: keep generating past the model's eos tokens.
    pub ignore_eos: Option<bool>,
    /// vLLM extra: at least this many tokens before eos or a stop token
    /// may end generation; default 0, at most `max_tokens`.
    #[schema(minimum = 0)]
    pub min_tokens: Option<i64>,
    /// vLLM extra: scheduling priority, lower runs first; default 0, an i32.
    #[schema(minimum = -2147483648, maximum = 2147483647)]
    pub priority: Option<i64>,
    /// vLLM extra: only requests with the same salt share prefix-cache blocks;
    /// a non-empty string when given.
    #[schema(min_length = 1)]
    pub cache_salt: Option<String>,
    /// vLLM extra: keep the stop string that ended a choice in its text; default false.
    pub include_stop_str_in_output: Option<bool>,
    /// vLLM extra: leave special tokens out of the generated text; default true.
    pub skip_special_tokens: Option<bool>,
    /// The end user, for abuse tracing; recorded in the request's log span.
    pub user: Option<String>,
    /// vLLM extra: the request id when no `X-Request-Id` header is sent;
    /// non-empty, at most 256 printable ASCII characters.
    #[schema(min_length = 1, max_length = 256, pattern = "^[ -~]+$")]
    pub request_id: Option<String>,
    /// vLLM extra for disaggregated serving: an object (or null). Accepted
    /// and ignored: this router runs the prefill -> decode KV hand-off itself,
    /// so there are no transfer parameters for a client to pass.
    #[schema(value_type = Option<Object>)]
    pub kv_transfer_params: Option<serde_json::Value>,
    /// OpenAI's structured output: `{"type": "text"}`, `{"type": "json_object"}` or
    /// `{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`, enforced token
    /// by token. At most one of this, `structured_outputs` and the `guided_*` fields.
    #[serde(default, deserialize_with = "object")]
    #[schema(value_type = Option<Object>)]
    pub response_format: Option<constraint::api::ResponseFormat>,
    /// vLLM extra: exactly one of `json`, `regex`, `choice`, `grammar` (Lark) or
    /// `json_object`, with `disable_any_whitespace`, `disable_additional_properties`,
    /// `whitespace_pattern` and `disable_fallback`.
    #[serde(default, deserialize_with = "object")]
    #[schema(value_type = Option<Object>)]
    pub structured_outputs: Option<constraint::api::StructuredOutputs>,
    /// vLLM extra (older name of `structured_outputs.json`): a JSON schema, as an object or its text.
    #[schema(value_type = Option<Object>)]
    pub guided_json: Option<serde_json::Value>,
    /// vLLM extra (older name of `structured_outputs.regex`).
    pub guided_regex: Option<String>,
    /// vLLM extra (older name of `structured_outputs.choice`).
    pub guided_choice: Option<Vec<String>>,
    /// vLLM extra (older name of `structured_outputs.grammar`): a Lark grammar.
    pub guided_grammar: Option<String>,
    /// vLLM extra: `auto`, `guidance` or `llguidance`, the one backend there is.
    pub guided_decoding_backend: Option<String>,
    /// vLLM extra: the whitespace a `guided_json` answer may use, as a regex.
    pub guided_whitespace_pattern: Option<String>,
}

/// `stream_options` of a streaming request.
#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct StreamOptions {
    /// Send a last chunk with empty `choices` and the usage counts.
    pub include_usage: Option<bool>,
}

/// `stop`: a string or a list of strings.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum StopSpec {
    /// One stop string.
    One(String),
    /// Several stop strings.
    Many(Vec<String>),
}

/// One message of a chat.
#[derive(Debug, Deserialize, ToSchema)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant` or `tool`.
    #[schema(schema_with = schema::role)]
    pub role: String,
    /// Text, or a list of content parts; required, except in an assistant turn with `tool_calls`.
    pub content: Option<MessageContent>,
    /// Assistant turns: the calls it made, passed to the template as sent.
    #[schema(value_type = Option<Vec<Object>>)]
    pub tool_calls: Option<Vec<serde_json::Value>>,
    /// Tool turns: the id of the call this result answers; required there.
    pub tool_call_id: Option<String>,
    /// Tool turns: the function's name (optional).
    pub name: Option<String>,
}

/// A message's `content`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum MessageContent {
    /// Plain text.
    Text(String),
    /// Content parts; only `{"type": "text", "text": ...}` is supported.
    Parts(#[serde(deserialize_with = "object_list")] Vec<ContentPart>),
}

/// One element of a list-shaped `content`.
#[derive(Debug, Deserialize, ToSchema)]
pub struct ContentPart {
    /// The part's kind; only `text` is supported.
    #[serde(rename = "type")]
    #[schema(schema_with = schema::text_part)]
    pub kind: String,
    /// The text of a `text` part.
    pub text: Option<String>,
}

/// `prompt` of a completion request.
#[derive(Debug, Deserialize, ToSchema)]
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
#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct TokenizeRequest {
    /// Must equal the served model name; absent means the served model.
    pub model: Option<String>,
    /// Completion form: the text to tokenize.
    pub prompt: Option<String>,
    /// Chat form: the conversation, rendered as `/v1/chat/completions` renders it.
    #[schema(min_items = 1)]
    #[serde(default, deserialize_with = "objects")]
    pub messages: Option<Vec<ChatMessage>>,
    /// Add the model's special tokens (BOS); default true for `prompt`, false for `messages`.
    pub add_special_tokens: Option<bool>,
    /// Chat form: the tools offered to the model, rendered as chat renders them.
    #[schema(schema_with = schema::tools)]
    pub tools: Option<serde_json::Value>,
    /// Chat form: rendering options, as `/v1/chat/completions` takes them.
    #[serde(flatten)]
    pub render: ChatRenderParams,
    /// Also return each token's vocabulary string.
    pub return_token_strs: Option<bool>,
}

/// Body of vLLM's `POST /detokenize`.
#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct DetokenizeRequest {
    /// Must equal the served model name; absent means the served model.
    pub model: Option<String>,
    /// The token ids to decode; required, each in the vocabulary.
    #[schema(schema_with = schema::required_token_ids, required = true)]
    pub tokens: Option<Vec<i64>>,
}

/// An optional JSON object as `T`. serde also reads a struct from an array
/// (its fields by position), so `"stream_options": [null]` would pass for
/// options; the API's objects are objects.
fn object<'de, D: Deserializer<'de>, T: DeserializeOwned>(d: D) -> Result<Option<T>, D::Error> {
    Option::<Map<String, Value>>::deserialize(d)?
        .map(|map| T::deserialize(Value::Object(map)).map_err(D::Error::custom))
        .transpose()
}

/// A list of JSON objects, each as `T` (see [`object`]).
fn object_list<'de, D: Deserializer<'de>, T: DeserializeOwned>(d: D) -> Result<Vec<T>, D::Error> {
    Vec::<Map<String, Value>>::deserialize(d)?
        .into_iter()
        .map(|map| T::deserialize(Value::Object(map)).map_err(D::Error::custom))
        .collect()
}

/// An optional list of JSON objects, each as `T` (see [`object`]).
fn objects<'de, D: Deserializer<'de>, T: DeserializeOwned>(d: D) -> Result<Option<Vec<T>>, D::Error> {
    let Some(items) = Option::<Vec<Map<String, Value>>>::deserialize(d)? else { return Ok(None) };
    items
        .into_iter()
        .map(|map| T::deserialize(Value::Object(map)).map_err(D::Error::custom))
        .collect::<Result<_, _>>()
        .map(Some)
}
