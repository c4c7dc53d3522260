//! OpenAI's Responses API answer: the `response` object and its output items, whole or as the
//! typed stream of `response.*` events. The generated text is split by the chat path's parser
//! ([`crate::respond::tool_calls`]), so reasoning, text and function calls come out as chat
//! gives them, only shaped as items.

use serde::Serialize;
use serde_json::{json, Value};
use utoipa::ToSchema;

use crate::backend::Finish;
use crate::prepare::responses::Echo;
use crate::respond::format::{ChunkFormat, Collected, ResponseMeta, SseEvent};
use crate::respond::response::Usage;
use crate::respond::stream::Delta;
use crate::respond::tool_calls::{parse_output, OutputParser, ToolCall, THINK_END};
use prompt::decode::Decoder;

mod events;

/// Where a response, or one of its items, stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ResponseStatus {
    /// Still being generated (streams only).
    InProgress,
    /// Generated to its end.
    Completed,
    /// Cut by `max_output_tokens` (or the context length).
    Incomplete,
    /// A worker failed mid-stream.
    Failed,
}

impl ResponseStatus {
    /// How a generation that ended with `finish` leaves its response and items.
    fn of(finish: Finish) -> Self {
        match finish {
            Finish::Stop => Self::Completed,
            Finish::Length => Self::Incomplete,
            Finish::Error => Self::Failed,
        }
    }

    /// An item's status: items have no `failed`, a cut one is incomplete.
    fn of_item(self) -> Self {
        if self == Self::Failed {
            Self::Incomplete
        } else {
            self
        }
    }
}

/// The `response` object.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ResponseObject {
    /// `resp_` and the request id.
    pub id: String,
    /// Always `response`.
    pub object: &'static str,
    /// Unix seconds.
    pub created_at: u64,
    /// `completed`, `incomplete` (cut by length), or in a stream `in_progress` / `failed`.
    pub status: ResponseStatus,
    /// Why an incomplete response stopped: `{"reason": "max_output_tokens"}`.
    #[schema(value_type = Option<Object>)]
    pub incomplete_details: Option<Value>,
    /// What failed, on `response.failed`: `{"code", "message"}`.
    #[schema(value_type = Option<Object>)]
    pub error: Option<Value>,
    /// The served model name.
    pub model: String,
    /// Reasoning, message and function call items, in the order generated.
    pub output: Vec<OutputItem>,
    /// Token counts; null until the response ends.
    pub usage: Option<ResponseUsage>,
    /// Always null: nothing is stored to continue from.
    #[schema(value_type = Option<String>)]
    pub previous_response_id: Option<()>,
    /// The request's settings, as the answer repeats them.
    #[serde(flatten)]
    pub echo: Echo,
}

/// One item of a response's `output`.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum OutputItem {
    /// The assistant's text.
    Message {
        /// `msg_…`.
        id: String,
        /// Always `assistant`.
        role: &'static str,
        status: ResponseStatus,
        content: Vec<OutputContent>,
    },
    /// A call of one of the request's function tools.
    FunctionCall {
        /// `fc_…`.
        id: String,
        /// `call_…`: the `call_id` its `function_call_output` answers.
        call_id: String,
        name: String,
        /// The arguments as JSON text.
        arguments: String,
        status: ResponseStatus,
    },
    /// The leading `<think>` block's text.
    Reasoning {
        /// `rs_…`.
        id: String,
        /// Always empty: no summaries are written.
        #[schema(value_type = Vec<Object>)]
        summary: Vec<Value>,
        content: Vec<OutputContent>,
        status: ResponseStatus,
    },
}

/// A part of a message's or reasoning item's `content`.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum OutputContent {
    /// Message text.
    OutputText {
        text: String,
        /// Always empty.
        #[schema(value_type = Vec<Object>)]
        annotations: Vec<Value>,
    },
    /// Reasoning text.
    ReasoningText { text: String },
}

impl OutputContent {
    fn output_text(text: String) -> Self {
        Self::OutputText { text, annotations: Vec::new() }
    }
}

/// The Responses API's `usage`.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
pub struct ResponseUsage {
    pub input_tokens: u32,
    pub input_tokens_details: InputTokensDetails,
    /// Every generated token, reasoning included.
    pub output_tokens: u32,
    pub output_tokens_details: OutputTokensDetails,
    pub total_tokens: u32,
}

/// `usage.input_tokens_details`.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
pub struct InputTokensDetails {
    /// Prompt tokens served from the workers' prefix cache (0 when they did not say).
    pub cached_tokens: u32,
}

/// `usage.output_tokens_details`.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
pub struct OutputTokensDetails {
    /// Output tokens of the reasoning item: those of the think block, up to the one that
    /// closes it.
    pub reasoning_tokens: u32,
}

impl ResponseUsage {
    /// `usage`, of which `reasoning_tokens` were reasoning.
    fn new(usage: Usage, reasoning_tokens: u32) -> Self {
        Self {
            input_tokens: usage.prompt_tokens,
            input_tokens_details: InputTokensDetails {
                cached_tokens: usage.prompt_tokens_details.map_or(0, |d| d.cached_tokens),
            },
            output_tokens: usage.completion_tokens,
            output_tokens_details: OutputTokensDetails { reasoning_tokens },
            total_tokens: usage.total_tokens,
        }
    }
}

/// The output tokens of the think block that opens `ids` (as [`parse_output`] finds it): those up
/// to and including the one that completes `</think>`, or all of them when the output ends inside
/// the block; 0 when there is none.
fn reasoning_tokens(decoder: &Decoder, ids: &[u32]) -> u32 {
    let text = |n: usize| decoder.decode(&ids[..n], false).unwrap_or_default();
    if parse_output(&text(ids.len()), false).reasoning.is_none() {
        return 0;
    }
    // Whether the first n tokens hold `</think>` only grows with n: the least n that do.
    let lengths: Vec<usize> = (1..=ids.len()).collect();
    let open = lengths.partition_point(|&n| !text(n).contains(THINK_END));
    (open + 1).min(ids.len()) as u32
}

/// A fresh item id with OpenAI's prefix for its kind.
fn item_id(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::new_v4().simple())
}

impl OutputItem {
    /// The item of `call`, `id`, with `arguments` so far.
    fn function_call(id: &str, call: &ToolCall, arguments: String, status: ResponseStatus) -> Self {
        Self::FunctionCall { id: id.to_owned(), call_id: call.id.clone(), name: call.name.clone(), arguments, status }
    }
}

/// How `/v1/responses` answers: one `response` object, or its stream of typed events.
#[derive(Debug)]
pub struct ResponsesFormat {
    /// The request's settings, repeated in every `response` object.
    echo: Echo,
    /// Parse function calls out of the text (the request offered tools).
    tools: bool,
    /// The prompt's length, for the usage of streamed responses.
    prompt_tokens: u32,
    /// The stream's state.
    stream: events::StreamState,
    /// The model's ids to text, to tell the reasoning's tokens.
    decoder: Decoder,
}

impl ResponsesFormat {
    /// The format of a response to a request with `echo`'s settings and a prompt of
    /// `prompt_tokens`; `tools` turns function-call parsing on; `decoder` is the model's.
    pub fn new(echo: Echo, tools: bool, prompt_tokens: usize, decoder: Decoder) -> Self {
        let stream = events::StreamState::new(OutputParser::new(tools));
        Self { echo, tools, prompt_tokens: prompt_tokens as u32, stream, decoder }
    }

    /// The usage of what the stream has generated so far.
    fn stream_usage(&self) -> ResponseUsage {
        let reasoning = reasoning_tokens(&self.decoder, self.stream.token_ids());
        ResponseUsage::new(self.stream.usage(self.prompt_tokens), reasoning)
    }

    fn response(&self, meta: &ResponseMeta, status: ResponseStatus, output: Vec<OutputItem>) -> ResponseObject {
        ResponseObject {
            id: meta.id.clone(),
            object: "response",
            created_at: meta.created,
            status,
            incomplete_details: (status == ResponseStatus::Incomplete).then(|| json!({"reason": "max_output_tokens"})),
            error: None,
            model: meta.model.clone(),
            output,
            usage: None,
            previous_response_id: None,
            echo: self.echo.clone(),
        }
    }
}

impl ChunkFormat for ResponsesFormat {
    fn id_prefix(&self) -> &'static str {
        "resp_"
    }

    /// The items of a whole answer: its reasoning, its text (left out when blank beside other
    /// items) and its calls.
    fn whole(&self, meta: &ResponseMeta, prompt_tokens: usize, out: Vec<Collected>) -> String {
        let out = out.into_iter().next().unwrap_or_default();
        let status = ResponseStatus::of(out.finish.unwrap_or(Finish::Stop));
        let parsed = parse_output(&out.text, self.tools);
        let reasoning = parsed.reasoning.filter(|r| !r.is_empty()).map(|text| OutputItem::Reasoning {
            id: item_id("rs"),
            summary: Vec::new(),
            content: vec![OutputContent::ReasoningText { text }],
            status: ResponseStatus::Completed,
        });
        let calls: Vec<OutputItem> = parsed
            .tool_calls
            .iter()
            .map(|call| {
                OutputItem::function_call(&item_id("fc"), call, call.arguments.clone(), ResponseStatus::Completed)
            })
            .collect();
        let blank = parsed.content.trim().is_empty();
        let message = (!blank || (reasoning.is_none() && calls.is_empty())).then(|| OutputItem::Message {
            id: item_id("msg"),
            role: "assistant",
            status: status.of_item(),
            content: vec![OutputContent::output_text(parsed.content)],
        });
        let output = reasoning.into_iter().chain(message).chain(calls).collect();
        let mut response = self.response(meta, status, output);
        let usage = Usage::new(prompt_tokens as u32, out.token_ids.len() as u32).cached(out.cached_tokens);
        response.usage = Some(ResponseUsage::new(usage, reasoning_tokens(&self.decoder, &out.token_ids)));
        serde_json::to_string(&response).unwrap_or_default()
    }

    /// `response.created` and `response.in_progress`.
    fn opening(&mut self, meta: &ResponseMeta, _usage: Option<Usage>) -> Vec<SseEvent> {
        let response = self.response(meta, ResponseStatus::InProgress, Vec::new());
        let created = self.stream.event("response.created", json!({"response": response}));
        let in_progress = self.stream.event("response.in_progress", json!({"response": response}));
        vec![created, in_progress]
    }

    fn delta(&mut self, meta: &ResponseMeta, delta: &Delta, _first: bool, _usage: Option<Usage>) -> Vec<SseEvent> {
        let mut events = self.stream.delta(delta);
        let Some(finish) = delta.finish else { return events };
        let status = ResponseStatus::of(finish);
        events.extend(self.stream.finish(status.of_item()));
        // A failed stream ends with `error()`'s events instead.
        if status != ResponseStatus::Failed {
            let mut response = self.response(meta, status, self.stream.output().to_vec());
            response.usage = Some(self.stream_usage());
            let kind = if status == ResponseStatus::Completed { "response.completed" } else { "response.incomplete" };
            events.push(self.stream.event(kind, json!({"response": response})));
        }
        events
    }

    /// Nothing: the stream ended with `response.completed` or `response.incomplete`.
    fn closing(&self, _meta: &ResponseMeta, _usage: Option<Usage>) -> Vec<SseEvent> {
        Vec::new()
    }

    /// An `error` event, then `response.failed` with what was generated.
    fn error(&mut self, meta: &ResponseMeta, body: Value) -> Vec<SseEvent> {
        let error = &body["error"];
        let fields = json!({"code": error["code"], "message": error["message"], "param": error["param"]});
        let failed = self.stream.event("error", fields);
        let mut response = self.response(meta, ResponseStatus::Failed, self.stream.output().to_vec());
        response.error = Some(json!({"code": "server_error", "message": error["message"]}));
        response.usage = Some(self.stream_usage());
        vec![failed, self.stream.event("response.failed", json!({"response": response}))]
    }
}
