//! Body of `POST /v1/responses`, OpenAI's stateless Responses API.
//!
//! As for chat, every field of the API is a field here: honoured (and translated onto a chat
//! request by [`crate::prepare::responses`]), or read as raw JSON into
//! [`ResponsesNotHonoured`] so validation refuses it by name unless it holds its no-op value.
//! Fields of neither are ignored and collected into `unknown` for the log. The polymorphic
//! fields (`input`, `tools`, `tool_choice`, `text`, `reasoning`) are raw JSON, read item by
//! item so that a refusal names the item at fault.

use serde::Deserialize;
use serde_json::{Map, Value};
use utoipa::ToSchema;

use super::schema;

/// Body of `POST /v1/responses`.
#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct ResponsesRequest {
    /// Must equal the served model name; absent means the served model.
    pub model: Option<String>,
    /// The conversation: a user message's text, or a list of items (messages with `role` and
    /// `content`, `function_call`s, `function_call_output`s, `reasoning`); required.
    #[schema(schema_with = schema::responses_input, required = true)]
    pub input: Option<Value>,
    /// A system message put before `input`.
    pub instructions: Option<String>,
    /// Most tokens to generate; absent means up to the context length.
    #[schema(minimum = 1)]
    pub max_output_tokens: Option<i64>,
    /// In [0, 2], default 1; 0 is greedy.
    #[schema(minimum = 0, maximum = 2)]
    pub temperature: Option<f64>,
    /// In (0, 1], default 1 (off).
    #[schema(exclusive_minimum = 0, maximum = 1)]
    pub top_p: Option<f64>,
    /// Function tools in the Responses shape: `[{"type": "function", "name", "description",
    /// "parameters", "strict"}]`. Built-in tools (`web_search`, `file_search`, ...) are refused.
    #[schema(schema_with = schema::responses_tools)]
    pub tools: Option<Value>,
    /// `"auto"` (default with tools), `"none"`, `"required"` or `{"type": "function", "name"}`.
    #[schema(schema_with = schema::responses_tool_choice)]
    pub tool_choice: Option<Value>,
    /// Only true (the default) or null: the model may always make several calls.
    #[schema(schema_with = schema::only_true)]
    pub parallel_tool_calls: Option<Value>,
    /// `{"format": {"type": "text"} | {"type": "json_object"} | {"type": "json_schema", "name",
    /// "schema", "strict"}}`, enforced token by token as chat's `response_format`.
    #[schema(value_type = Option<Object>)]
    pub text: Option<Value>,
    /// Stream typed server-sent events instead of one JSON body.
    pub stream: Option<bool>,
    /// The end user, for abuse tracing; recorded in the request's log span.
    pub user: Option<String>,
    /// A stable identifier of the end user; recorded in the request's log span as `user` is.
    pub safety_identifier: Option<String>,
    /// Up to 16 string values, echoed in the response.
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<Value>,
    /// `{"effort"}`, passed to the chat template as chat's `reasoning_effort`; `summary` only null.
    #[schema(value_type = Option<Object>)]
    pub reasoning: Option<Value>,
    /// vLLM extra: scheduling priority, lower runs first; default 0, an i32.
    #[schema(minimum = -2147483648, maximum = 2147483647)]
    pub priority: Option<i64>,
    /// vLLM extra: only requests with the same salt share prefix-cache blocks; a non-empty string
    /// when given.
    #[schema(min_length = 1)]
    pub cache_salt: Option<String>,
    /// vLLM extra: the request id when no `X-Request-Id` header is sent; non-empty, at most 256
    /// printable ASCII characters.
    #[schema(min_length = 1, max_length = 256, pattern = "^[ -~]+$")]
    pub request_id: Option<String>,
    /// Fields of the Responses API that are refused unless they hold their no-op value.
    #[serde(flatten)]
    pub not_honoured: ResponsesNotHonoured,
    /// Fields of neither API, ignored (and logged at debug level by name).
    #[serde(flatten)]
    #[schema(ignore)]
    pub unknown: Map<String, Value>,
}

/// Fields of the Responses API this server does not honour, each read as raw JSON: null,
/// absence or the value that changes nothing passes, anything else is a 400 naming the field.
#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct ResponsesNotHonoured {
    /// Keep the response for later retrieval. The router is stateless: only false or null
    /// (absent, as SDKs send it, means nothing is stored).
    #[schema(schema_with = schema::only_false)]
    pub store: Option<Value>,
    /// Continue a stored response. The router is stateless: only null.
    #[schema(schema_with = schema::only_null)]
    pub previous_response_id: Option<Value>,
    /// Run the response in the background. The router is stateless: only false or null.
    #[schema(schema_with = schema::only_false)]
    pub background: Option<Value>,
    /// A stored conversation. The router is stateless: only null.
    #[schema(schema_with = schema::only_null)]
    pub conversation: Option<Value>,
    /// A stored prompt template. Not supported: only null.
    #[schema(schema_with = schema::only_null)]
    pub prompt: Option<Value>,
    /// Extra output data. None is produced here: only `[]` or null.
    #[schema(schema_with = schema::only_empty_list)]
    pub include: Option<Value>,
    /// Most likely tokens per position in the output. Not supported: only null.
    #[schema(schema_with = schema::only_null)]
    pub top_logprobs: Option<Value>,
    /// Most built-in tool calls. There are no built-in tools here: only null.
    #[schema(schema_with = schema::only_null)]
    pub max_tool_calls: Option<Value>,
    /// Processing tier. Only `auto`, `default` or null.
    #[schema(schema_with = schema::only_default_tier)]
    pub service_tier: Option<Value>,
    /// A key grouping requests for prompt caching. Not supported: only null.
    #[schema(schema_with = schema::only_null)]
    pub prompt_cache_key: Option<Value>,
    /// How long cached prompts are kept. Not supported: only null.
    #[schema(schema_with = schema::only_null)]
    pub prompt_cache_retention: Option<Value>,
    /// Streaming options (obfuscation). Not supported: only `{}` or null.
    #[schema(schema_with = schema::only_empty_object)]
    pub stream_options: Option<Value>,
    /// Only `"disabled"` (the default) or null: a prompt too long for the context is refused.
    #[schema(schema_with = schema::only_disabled)]
    pub truncation: Option<Value>,
    /// Server-side context compaction. Not supported: only null.
    #[schema(schema_with = schema::only_null)]
    pub context_management: Option<Value>,
}
