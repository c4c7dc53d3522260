//! The typed events of a streamed response: each output item is added, filled by deltas and
//! done in turn, every event numbered by `sequence_number`. Text goes through the chat path's
//! incremental parser, which holds back what may still become a `<think>` or `<tool_call>`
//! tag, so a streamed response has the items a whole one has.

use serde_json::{json, Value};

use super::{item_id, OutputContent, OutputItem, ResponseStatus};
use crate::respond::format::SseEvent;
use crate::respond::response::Usage;
use crate::respond::stream::Delta;
use crate::respond::tool_calls::{OutputParser, ToolCall};

/// The item being streamed: reasoning or message text, still growing.
#[derive(Debug)]
enum Open {
    Reasoning { id: String, text: String },
    Message { id: String, text: String },
}

/// Where a streamed response stands.
#[derive(Debug)]
pub struct StreamState {
    parser: OutputParser,
    /// The next event's `sequence_number`.
    sequence: u64,
    /// The items done so far.
    output: Vec<OutputItem>,
    /// The item being streamed, at `output_index` `output.len()`.
    open: Option<Open>,
    /// Blank text not yet in any item: it opens a message only once text follows it, or when
    /// the response would otherwise have no item.
    blank: String,
    /// Every generated id so far.
    token_ids: Vec<u32>,
    cached_tokens: Option<u32>,
}

impl StreamState {
    pub fn new(parser: OutputParser) -> Self {
        Self {
            parser,
            sequence: 0,
            output: Vec::new(),
            open: None,
            blank: String::new(),
            token_ids: Vec::new(),
            cached_tokens: None,
        }
    }

    /// The items done so far.
    pub fn output(&self) -> &[OutputItem] {
        &self.output
    }

    /// The usage of what was generated so far.
    pub fn usage(&self, prompt_tokens: u32) -> Usage {
        Usage::new(prompt_tokens, self.token_ids.len() as u32).cached(self.cached_tokens)
    }

    /// Every generated id so far.
    pub fn token_ids(&self) -> &[u32] {
        &self.token_ids
    }

    /// An event of `kind` with `fields`, numbered.
    pub fn event(&mut self, kind: &'static str, fields: Value) -> SseEvent {
        let mut data = json!({"type": kind, "sequence_number": self.sequence});
        if let (Value::Object(data), Value::Object(fields)) = (&mut data, fields) {
            data.extend(fields);
        }
        self.sequence += 1;
        SseEvent::named(kind, data.to_string())
    }

    /// The events of one delta's text (not its end: see [`Self::finish`]).
    pub fn delta(&mut self, delta: &Delta) -> Vec<SseEvent> {
        self.token_ids.extend_from_slice(&delta.token_ids);
        self.cached_tokens = delta.cached_tokens.or(self.cached_tokens);
        let mut parsed = self.parser.feed(&delta.text);
        if delta.finish.is_some() {
            parsed.extend(self.parser.finish());
        }
        let mut events = Vec::new();
        if !parsed.reasoning.is_empty() {
            if !matches!(self.open, Some(Open::Reasoning { .. })) {
                self.close(ResponseStatus::Completed, &mut events);
                self.open_reasoning(&mut events);
            }
            self.append(parsed.reasoning, &mut events);
        }
        if !parsed.content.is_empty() {
            self.content(parsed.content, &mut events);
        }
        for call in parsed.tool_calls {
            self.close(ResponseStatus::Completed, &mut events);
            self.blank.clear();
            self.call(call, &mut events);
        }
        events
    }

    /// Ends the stream's items with `status`: the open one is done, and a response that has no
    /// item yet gets its (blank) message.
    pub fn finish(&mut self, status: ResponseStatus) -> Vec<SseEvent> {
        let mut events = Vec::new();
        if self.output.is_empty() && self.open.is_none() {
            self.open_message(&mut events);
            let blank = std::mem::take(&mut self.blank);
            if !blank.is_empty() {
                self.append(blank, &mut events);
            }
        }
        self.close(status, &mut events);
        events
    }

    /// Message text: appended to the open message, else held while blank, else a new message.
    fn content(&mut self, text: String, events: &mut Vec<SseEvent>) {
        if matches!(self.open, Some(Open::Message { .. })) {
            return self.append(text, events);
        }
        self.blank.push_str(&text);
        if self.blank.trim().is_empty() {
            return;
        }
        let text = std::mem::take(&mut self.blank);
        self.close(ResponseStatus::Completed, events);
        self.open_message(events);
        self.append(text, events);
    }

    fn index(&self) -> usize {
        self.output.len()
    }

    fn open_reasoning(&mut self, events: &mut Vec<SseEvent>) {
        let id = item_id("rs");
        let item = OutputItem::Reasoning {
            id: id.clone(),
            summary: Vec::new(),
            content: Vec::new(),
            status: ResponseStatus::InProgress,
        };
        let part = OutputContent::ReasoningText { text: String::new() };
        self.added(&id, item, part, events);
        self.open = Some(Open::Reasoning { id, text: String::new() });
    }

    fn open_message(&mut self, events: &mut Vec<SseEvent>) {
        let id = item_id("msg");
        let item = OutputItem::Message {
            id: id.clone(),
            role: "assistant",
            status: ResponseStatus::InProgress,
            content: Vec::new(),
        };
        self.added(&id, item, OutputContent::output_text(String::new()), events);
        self.open = Some(Open::Message { id, text: String::new() });
    }

    /// `response.output_item.added` and `response.content_part.added` of a text item.
    fn added(&mut self, id: &str, item: OutputItem, part: OutputContent, events: &mut Vec<SseEvent>) {
        let output_index = self.index();
        events.push(self.event("response.output_item.added", json!({"output_index": output_index, "item": item})));
        let fields = json!({"item_id": id, "output_index": output_index, "content_index": 0, "part": part});
        events.push(self.event("response.content_part.added", fields));
    }

    /// A text delta of the open item.
    fn append(&mut self, more: String, events: &mut Vec<SseEvent>) {
        let output_index = self.index();
        let (kind, id, extra) = match &mut self.open {
            Some(Open::Reasoning { id, text }) => {
                text.push_str(&more);
                ("response.reasoning_text.delta", id.clone(), json!({}))
            }
            Some(Open::Message { id, text }) => {
                text.push_str(&more);
                ("response.output_text.delta", id.clone(), json!({"logprobs": []}))
            }
            None => return,
        };
        let mut fields = json!({"item_id": id, "output_index": output_index, "content_index": 0, "delta": more});
        if let (Value::Object(fields), Value::Object(extra)) = (&mut fields, extra) {
            fields.extend(extra);
        }
        events.push(self.event(kind, fields));
    }

    /// The done events of the open item, if any, which joins the output with `status`.
    fn close(&mut self, status: ResponseStatus, events: &mut Vec<SseEvent>) {
        let Some(open) = self.open.take() else { return };
        let output_index = self.index();
        let (id, item, part, text_done) = match open {
            Open::Reasoning { id, text } => {
                let part = OutputContent::ReasoningText { text: text.clone() };
                let item = OutputItem::Reasoning {
                    id: id.clone(),
                    summary: Vec::new(),
                    content: vec![part.clone()],
                    status: ResponseStatus::Completed,
                };
                (id, item, part, ("response.reasoning_text.done", json!({"text": text})))
            }
            Open::Message { id, text } => {
                let part = OutputContent::output_text(text.clone());
                let item =
                    OutputItem::Message { id: id.clone(), role: "assistant", status, content: vec![part.clone()] };
                (id, item, part, ("response.output_text.done", json!({"text": text, "logprobs": []})))
            }
        };
        let (kind, mut fields) = text_done;
        if let Value::Object(fields) = &mut fields {
            fields.insert("item_id".into(), json!(id));
            fields.insert("output_index".into(), json!(output_index));
            fields.insert("content_index".into(), json!(0));
        }
        events.push(self.event(kind, fields));
        let fields = json!({"item_id": id, "output_index": output_index, "content_index": 0, "part": part});
        events.push(self.event("response.content_part.done", fields));
        events.push(self.event("response.output_item.done", json!({"output_index": output_index, "item": item})));
        self.output.push(item);
    }

    /// A function call, whole: it is parsed only once its block closes.
    fn call(&mut self, call: ToolCall, events: &mut Vec<SseEvent>) {
        let output_index = self.index();
        let id = item_id("fc");
        let added = OutputItem::function_call(&id, &call, String::new(), ResponseStatus::InProgress);
        events.push(self.event("response.output_item.added", json!({"output_index": output_index, "item": added})));
        let fields = json!({"item_id": id, "output_index": output_index, "delta": call.arguments});
        events.push(self.event("response.function_call_arguments.delta", fields));
        let fields =
            json!({"item_id": id, "output_index": output_index, "name": call.name, "arguments": call.arguments});
        events.push(self.event("response.function_call_arguments.done", fields));
        let done = OutputItem::function_call(&id, &call, call.arguments.clone(), ResponseStatus::Completed);
        events.push(self.event("response.output_item.done", json!({"output_index": output_index, "item": done})));
        self.output.push(done);
    }
}
