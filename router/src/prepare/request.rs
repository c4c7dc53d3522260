//! Request bodies of `/v1/chat/completions` and `/v1/completions`.
//!
//! Numbers are read wide (`f64`, `i64`) so that out-of-range values reach
//! validation, which names the field and the limit, instead of failing in
//! serde with a less helpful message.
//!
//! Every field of the OpenAI and vLLM APIs is a field here: either honoured, or read as raw JSON
//! into a `…NotHonoured` struct so validation can refuse it by name unless it holds its no-op
//! value. Fields of neither API are ignored, as OpenAI and vLLM ignore them, and collected into
//! `unknown` so the handler can log their names.

use std::collections::HashMap;

use serde::de::{DeserializeOwned, Error as _};
use serde::{Deserialize, Deserializer};
use serde_json::{Map, Value};
use utoipa::ToSchema;

pub mod responses;
pub(crate) mod schema;

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
    /// vLLM extra: also add the tokenizer's special tokens (BOS) before the rendered
    /// conversation; default false, as the chat template writes its own.
    pub add_special_tokens: Option<bool>,
    /// vLLM extra: documents for retrieval-augmented generation, each an object of strings
    /// (`{"title", "text"}`), passed to the chat template as `documents`.
    #[schema(value_type = Option<Vec<Object>>)]
    pub documents: Option<serde_json::Value>,
    /// OpenAI's reasoning effort (`minimal`, `low`, `medium`, `high`), passed to the chat
    /// template as `reasoning_effort` as vLLM does; templates that do not read it ignore it.
    #[schema(schema_with = schema::reasoning_effort)]
    pub reasoning_effort: Option<serde_json::Value>,
    /// vLLM extra: return the `<think>` reasoning as `reasoning_content`; default true. When
    /// false the reasoning is left out of the answer (it still counts in `usage`).
    pub include_reasoning: Option<bool>,
    /// OpenAI: a stable identifier of the end user, for abuse tracing; recorded in the request's
    /// log span as `user` is.
    pub safety_identifier: Option<String>,
    /// Shared sampling and output options.
    #[serde(flatten)]
    pub params: CommonParams,
    /// Fields of both APIs that are refused unless they hold their no-op value.
    #[serde(flatten)]
    pub not_honoured: NotHonoured,
    /// Chat fields of the OpenAI and vLLM APIs that are refused unless they hold their no-op value.
    #[serde(flatten)]
    pub chat_not_honoured: ChatNotHonoured,
    /// Fields of neither API, ignored (and logged at debug level by name).
    #[serde(flatten)]
    #[schema(ignore)]
    pub unknown: Map<String, Value>,
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
    /// Return each generated token's logprob and this many most likely alternatives per
    /// position, in [0, 20], in OpenAI's completions shape (`tokens`, `token_logprobs`,
    /// `top_logprobs`, `text_offset`); with `echo`, the prompt's tokens first (the first with
    /// null logprobs), as loglikelihood scoring reads them. Not `echo` with `stream`.
    #[schema(minimum = 0, maximum = 20)]
    pub logprobs: Option<i64>,
    /// vLLM extra: add the tokenizer's special tokens (BOS) to a text prompt; default true.
    pub add_special_tokens: Option<bool>,
    /// Shared sampling and output options.
    #[serde(flatten)]
    pub params: CommonParams,
    /// Fields of both APIs that are refused unless they hold their no-op value.
    #[serde(flatten)]
    pub not_honoured: NotHonoured,
    /// Completion fields of the OpenAI and vLLM APIs that are refused unless they hold their
    /// no-op value.
    #[serde(flatten)]
    pub completion_not_honoured: CompletionNotHonoured,
    /// Fields of neither API, ignored (and logged at debug level by name).
    #[serde(flatten)]
    #[schema(ignore)]
    pub unknown: Map<String, Value>,
}

/// Fields both endpoints accept.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
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
    /// vLLM extra: name the tokens of `logprobs` `token_id:{id}` rather than by their text (for
    /// tokens whose bytes are not valid UTF-8 alone); default false.
    pub return_tokens_as_token_ids: Option<bool>,
    /// vLLM extra, default true: whether a decoder's space before a special token that follows
    /// another stays (true is the decoder's own output). False is taken for byte-level
    /// vocabularies, whose decoder puts no such space, and refused for others.
    pub spaces_between_special_tokens: Option<bool>,
    /// The end user, for abuse tracing; recorded in the request's log span.
    pub user: Option<String>,
    /// vLLM extra: the request id when no `X-Request-Id` header is sent;
    /// non-empty, at most 256 printable ASCII characters.
    #[schema(min_length = 1, max_length = 256, pattern = "^[ -~]+$")]
    pub request_id: Option<String>,
    /// vLLM extra: each prompt token's logprob given the tokens before it, with this many most
    /// likely tokens there, in [0, 20], in the answer's `prompt_logprobs`; not with `stream`.
    /// The prompt is then computed whole, without the prefix cache.
    #[schema(minimum = 0, maximum = 20)]
    pub prompt_logprobs: Option<i64>,
    /// vLLM extra: token ids the answer is restricted to (not empty, each in the vocabulary);
    /// their logprobs still describe the model's raw logits.
    #[schema(schema_with = schema::allowed_token_ids)]
    pub allowed_token_ids: Option<Vec<i64>>,
    /// vLLM extra: words the answer may not contain, each tokenized as it would start the text
    /// and as it would follow a space; a word's last token is masked after the rest of it.
    pub bad_words: Option<Vec<String>>,
    /// vLLM extra: answer the `n` (at most 10) best beams of a beam search instead of sampling;
    /// not with `stream`, and not with sampling options it cannot honour (a temperature other
    /// than 0 or 1, top-p/k, min-p, penalties, bias, stop strings, logprobs, structured outputs).
    pub use_beam_search: Option<bool>,
    /// vLLM extra: with `use_beam_search`, a beam's cumulative logprob is divided by its length to
    /// this power; default 1.
    pub length_penalty: Option<f64>,
    /// vLLM extra: keep only the last this many tokens of the prompt (at least 1); a prompt no
    /// longer than that is kept whole.
    #[schema(minimum = 1)]
    pub truncate_prompt_tokens: Option<i64>,
    /// OpenAI's structured output: `{"type": "text"}`, `{"type": "json_object"}`,
    /// `{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`, or vLLM's
    /// `{"type": "structural_tag", "structures": [{"begin", "schema", "end"}], "triggers"}`,
    /// enforced token by token. At most one of this, `structured_outputs` and the `guided_*`
    /// fields.
    #[serde(default, deserialize_with = "object")]
    #[schema(value_type = Option<Object>)]
    pub response_format: Option<constraint::api::ResponseFormat>,
    /// vLLM extra: exactly one of `json`, `regex`, `choice`, `grammar` (Lark), `json_object`
    /// or `structural_tag` (`{"structures": [{"begin", "schema", "end"}], "triggers"}`, or its
    /// JSON text), with `disable_any_whitespace`, `disable_additional_properties`,
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
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
pub struct StreamOptions {
    /// Send a last chunk with empty `choices` and the usage counts.
    pub include_usage: Option<bool>,
    /// vLLM extra: also put the usage so far (prompt tokens, tokens generated up to that chunk)
    /// in every chunk; default false.
    pub continuous_usage_stats: Option<bool>,
}

/// Fields both endpoints' APIs define that this server does not honour. Each is read as raw
/// JSON: null, absence or the value that changes nothing passes; anything else is a 400 naming
/// the field and saying it is not supported. The OpenAPI document allows only those values.
#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct NotHonoured {
    /// vLLM: candidates to sample per choice before keeping the best. Only `n` (the default)
    /// is accepted: every choice generated is returned.
    #[schema(schema_with = schema::no_op_best_of)]
    pub best_of: Option<Value>,
    /// vLLM: server-side logits processors by qualified name. Not supported: only null or `[]`.
    #[schema(schema_with = schema::only_empty_list)]
    pub logits_processors: Option<Value>,
    /// vLLM: arguments for custom extensions. None are installed: only null or `{}`.
    #[schema(schema_with = schema::only_empty_object)]
    pub vllm_xargs: Option<Value>,
    /// vLLM for disaggregated serving: this router runs the prefill -> decode KV hand-off
    /// itself, so there are no transfer parameters for a client to pass: only null or `{}`.
    #[schema(schema_with = schema::only_empty_object)]
    pub kv_transfer_params: Option<Value>,
    /// vLLM: keyword arguments of a multimodal processor. No model here is multimodal: only
    /// null or `{}`.
    #[schema(schema_with = schema::only_empty_object)]
    pub mm_processor_kwargs: Option<Value>,
}

/// Chat fields of the OpenAI and vLLM APIs that this server does not honour (see
/// [`NotHonoured`]).
#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct ChatNotHonoured {
    /// OpenAI: false allows at most one tool call. Only true (the default) or null.
    #[schema(schema_with = schema::only_true)]
    pub parallel_tool_calls: Option<Value>,
    /// OpenAI: audio output. Not supported: only null.
    #[schema(schema_with = schema::only_null)]
    pub audio: Option<Value>,
    /// OpenAI: output modalities. Only `["text"]` or null.
    #[schema(schema_with = schema::only_text_modality)]
    pub modalities: Option<Value>,
    /// OpenAI: predicted output. Not supported: only null.
    #[schema(schema_with = schema::only_null)]
    pub prediction: Option<Value>,
    /// OpenAI: web search. Not supported: only null.
    #[schema(schema_with = schema::only_null)]
    pub web_search_options: Option<Value>,
    /// OpenAI's deprecated function calling; use `tools`. Only null.
    #[schema(schema_with = schema::only_null)]
    pub functions: Option<Value>,
    /// OpenAI's deprecated function calling; use `tool_choice`. Only null.
    #[schema(schema_with = schema::only_null)]
    pub function_call: Option<Value>,
    /// OpenAI: store the completion. Nothing is stored here: only false or null.
    #[schema(schema_with = schema::only_false)]
    pub store: Option<Value>,
    /// OpenAI: tags for stored completions. Nothing is stored here: only null or `{}`.
    #[schema(schema_with = schema::only_empty_object)]
    pub metadata: Option<Value>,
    /// OpenAI: processing tier. Only `auto`, `default` or null.
    #[schema(schema_with = schema::only_default_tier)]
    pub service_tier: Option<Value>,
    /// OpenAI: verbosity of the answer. Not supported: only null.
    #[schema(schema_with = schema::only_null)]
    pub verbosity: Option<Value>,
    /// OpenAI: a key grouping requests for prompt caching. Not supported (use vLLM's
    /// `cache_salt`, or rely on the router's prefix affinity): only null.
    #[schema(schema_with = schema::only_null)]
    pub prompt_cache_key: Option<Value>,
    /// vLLM: the deprecated top-level structural tag. Send it as
    /// `structured_outputs.structural_tag`: only null here.
    #[schema(schema_with = schema::only_null)]
    pub structural_tag: Option<Value>,
}

/// Completion fields of the OpenAI and vLLM APIs that this server does not honour (see
/// [`NotHonoured`]).
#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct CompletionNotHonoured {
    /// OpenAI: text after the completion (fill-in-the-middle). Not supported, as in vLLM: only
    /// null or `""`.
    #[schema(schema_with = schema::only_empty_string)]
    pub suffix: Option<Value>,
    /// vLLM: prompt embeddings instead of a prompt. Not supported: only null.
    #[schema(schema_with = schema::only_null)]
    pub prompt_embeds: Option<Value>,
}

/// `stop`: a string or a list of strings.
#[derive(Debug, Clone, Deserialize, ToSchema)]
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
    /// Assistant turns: the reasoning an earlier answer returned beside its content (vLLM's
    /// `reasoning_content`), passed to the template, which decides what of it to show the model
    /// (Qwen3's keeps it for turns after the last user message).
    pub reasoning_content: Option<String>,
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

/// Most prompts one completion request may batch: each runs as its own request on the workers.
pub const MAX_PROMPTS: usize = 64;

/// `prompt` of a completion request.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum Prompt {
    /// Text to tokenize.
    Text(String),
    /// Token ids, passed through (checked against the vocabulary).
    TokenIds(Vec<i64>),
    /// A batch of texts: each prompt runs on its own, with `n` choices each.
    Texts(Vec<String>),
    /// A batch of token-id prompts (what lm-evaluation-harness sends).
    TokenIdLists(Vec<Vec<i64>>),
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
pub(crate) fn objects<'de, D: Deserializer<'de>, T: DeserializeOwned>(d: D) -> Result<Option<Vec<T>>, D::Error> {
    let Some(items) = Option::<Vec<Map<String, Value>>>::deserialize(d)? else { return Ok(None) };
    items
        .into_iter()
        .map(|map| T::deserialize(Value::Object(map)).map_err(D::Error::custom))
        .collect::<Result<_, _>>()
        .map(Some)
}
