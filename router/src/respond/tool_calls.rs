//! Splits generated chat text into reasoning, content and tool calls, the
//! way vLLM's Hermes tool parser and think-tag reasoning parsers do.
//!
//! - `<think>…</think>` at the very start of the output is reasoning
//!   (`reasoning_content`); content after it loses its leading whitespace.
//! - With tools, each `<tool_call>{"name": …, "arguments": {…}}</tool_call>`
//!   block is a call; a block whose JSON does not parse stays in the content.
//! - With tools, an output that is as a whole a JSON call object (or a list
//!   of them) is a call too, for models that answer in bare JSON.
//!
//! [`OutputParser`] is incremental so streams hold back only text that may
//! still turn into a tag (as stop strings are held back in `stream.rs`);
//! [`parse_output`] runs the same machine over a whole text, so a streamed
//! answer and a whole one always agree.

use serde_json::Value;

const THINK_START: &str = "<think>";
/// The end of a think block.
pub(crate) const THINK_END: &str = "</think>";
const CALL_START: &str = "<tool_call>";
const CALL_END: &str = "</tool_call>";

/// One parsed function call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCall {
    /// `call_<random>`, unique per call.
    pub id: String,
    /// The function's name.
    pub name: String,
    /// The arguments as a JSON string (OpenAI's shape).
    pub arguments: String,
}

/// What a piece of output turned into.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Parsed {
    /// Text inside the think block.
    pub reasoning: String,
    /// Text for `content`.
    pub content: String,
    /// Completed calls, in order.
    pub tool_calls: Vec<ToolCall>,
}

impl Parsed {
    /// Appends what came after `self`.
    pub fn extend(&mut self, other: Parsed) {
        self.reasoning.push_str(&other.reasoning);
        self.content.push_str(&other.content);
        self.tool_calls.extend(other.tool_calls);
    }
}

/// A whole output, split.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ParsedOutput {
    /// The think block's text, when the output started with one.
    pub reasoning: Option<String>,
    /// The rest of the text, tool-call blocks taken out.
    pub content: String,
    /// The calls found (only when tools were on).
    pub tool_calls: Vec<ToolCall>,
}

/// Splits a whole output; `tools` turns tool-call parsing on.
pub fn parse_output(text: &str, tools: bool) -> ParsedOutput {
    let mut parser = OutputParser::new(tools);
    let mut parsed = parser.feed(text);
    parsed.extend(parser.finish());
    ParsedOutput {
        reasoning: parser.saw_reasoning.then_some(parsed.reasoning),
        content: parsed.content,
        tool_calls: parsed.tool_calls,
    }
}

/// Where the parser is in the output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Nothing decided yet: a think block may still start.
    Start,
    /// Inside `<think>`.
    Reasoning,
    /// Plain content, before its first non-blank character.
    ContentStart,
    /// Plain content.
    Content,
    /// Inside `<tool_call>`, waiting for its end.
    Call,
    /// The content opened with `{` or `[`: held whole, it may be a bare JSON call.
    Json,
}

/// Incremental splitter of one choice's output.
#[derive(Debug)]
pub struct OutputParser {
    tools: bool,
    phase: Phase,
    /// Text received but not yet handed out.
    pending: String,
    /// Drop blanks at the start of content (right after `</think>`).
    trim_content: bool,
    saw_reasoning: bool,
}

impl OutputParser {
    /// A parser; `tools` turns tool-call parsing on.
    pub fn new(tools: bool) -> Self {
        Self { tools, phase: Phase::Start, pending: String::new(), trim_content: false, saw_reasoning: false }
    }

    /// Adds text; returns what is now certain.
    pub fn feed(&mut self, text: &str) -> Parsed {
        self.pending.push_str(text);
        let mut out = Parsed::default();
        while self.step(&mut out) {}
        out
    }

    /// Ends the output: everything held back comes out.
    pub fn finish(&mut self) -> Parsed {
        let mut out = Parsed::default();
        let rest = std::mem::take(&mut self.pending);
        match self.phase {
            Phase::Start | Phase::ContentStart | Phase::Content => out.content.push_str(self.content_text(&rest)),
            Phase::Reasoning => out.reasoning.push_str(&rest),
            // An unclosed block at the end (eos instead of `</tool_call>`)
            // still counts when its JSON is whole.
            Phase::Call => match parse_call(&rest) {
                Some(call) => out.tool_calls.push(call),
                None => out.content = format!("{CALL_START}{rest}"),
            },
            Phase::Json => match parse_json_calls(&rest) {
                Some(calls) => out.tool_calls = calls,
                None => {
                    // Not a call after all: scan it as ordinary content.
                    self.phase = Phase::Content;
                    out = self.feed(&rest);
                    out.extend(self.finish());
                }
            },
        }
        self.phase = Phase::Content;
        out
    }

    fn content_text<'a>(&self, text: &'a str) -> &'a str {
        if self.trim_content {
            text.trim_start()
        } else {
            text
        }
    }

    /// One move of the state machine; false when it must wait for more text.
    fn step(&mut self, out: &mut Parsed) -> bool {
        match self.phase {
            Phase::Start => self.step_start(),
            Phase::Reasoning => self.step_reasoning(out),
            Phase::ContentStart => self.step_content_start(),
            Phase::Content => self.step_content(out),
            Phase::Call => self.step_call(out),
            Phase::Json => false,
        }
    }

    fn step_start(&mut self) -> bool {
        let text = self.pending.trim_start();
        if let Some(rest) = text.strip_prefix(THINK_START) {
            self.pending = rest.to_owned();
            self.phase = Phase::Reasoning;
            self.saw_reasoning = true;
            return true;
        }
        if THINK_START.starts_with(text) {
            return false;
        }
        self.phase = Phase::ContentStart;
        true
    }

    fn step_reasoning(&mut self, out: &mut Parsed) -> bool {
        if let Some(at) = self.pending.find(THINK_END) {
            out.reasoning.push_str(&self.pending[..at]);
            self.pending.drain(..at + THINK_END.len());
            self.phase = Phase::ContentStart;
            self.trim_content = true;
            return true;
        }
        let safe = self.pending.len() - held_prefix(&self.pending, THINK_END);
        out.reasoning.extend(self.pending.drain(..safe));
        false
    }

    /// Blanks at the start of content are held (or dropped after a think
    /// block) until the first real character says whether it is bare JSON.
    fn step_content_start(&mut self) -> bool {
        if self.trim_content {
            self.pending = self.pending.trim_start().to_owned();
        }
        let Some(first) = self.pending.trim_start().chars().next() else {
            // Nothing to hold for without tools: blanks are content.
            return !self.trim_content && !self.tools && self.start_content();
        };
        if self.tools && matches!(first, '{' | '[') {
            self.phase = Phase::Json;
            self.trim_content = false;
            return false;
        }
        self.start_content()
    }

    fn start_content(&mut self) -> bool {
        self.phase = Phase::Content;
        self.trim_content = false;
        !self.pending.is_empty()
    }

    fn step_content(&mut self, out: &mut Parsed) -> bool {
        if !self.tools {
            out.content.push_str(&std::mem::take(&mut self.pending));
            return false;
        }
        if let Some(at) = self.pending.find(CALL_START) {
            out.content.push_str(&self.pending[..at]);
            self.pending.drain(..at + CALL_START.len());
            self.phase = Phase::Call;
            return true;
        }
        let safe = self.pending.len() - held_prefix(&self.pending, CALL_START);
        out.content.extend(self.pending.drain(..safe));
        false
    }

    fn step_call(&mut self, out: &mut Parsed) -> bool {
        let Some(at) = self.pending.find(CALL_END) else {
            return false;
        };
        let body: String = self.pending.drain(..at + CALL_END.len()).collect();
        let inner = &body[..at];
        match parse_call(inner) {
            Some(call) => out.tool_calls.push(call),
            // Malformed: the block goes out as the model wrote it.
            None => out.content.push_str(&format!("{CALL_START}{body}")),
        }
        self.phase = Phase::Content;
        true
    }
}

/// Length of the longest suffix of `text` that is a proper prefix of `tag`:
/// text that may still become the tag, so it is held back.
fn held_prefix(text: &str, tag: &str) -> usize {
    (1..tag.len()).rev().find(|&n| text.ends_with(&tag[..n])).unwrap_or(0)
}

/// One call object: `{"name": ..., "arguments": {...}}` (or `parameters`).
fn call_from_value(value: &Value) -> Option<ToolCall> {
    let object = value.as_object()?;
    let name = object.get("name")?.as_str()?.to_owned();
    let arguments = match object.get("arguments").or_else(|| object.get("parameters")) {
        None | Some(Value::Null) => "{}".to_owned(),
        // Already a JSON string, as OpenAI sends it.
        Some(Value::String(s)) => s.clone(),
        Some(value) => value.to_string(),
    };
    Some(ToolCall { id: call_id(), name, arguments })
}

/// The JSON inside one `<tool_call>` block.
fn parse_call(text: &str) -> Option<ToolCall> {
    call_from_value(&serde_json::from_str(text.trim()).ok()?)
}

/// A whole output that is one call object or a non-empty list of them.
fn parse_json_calls(text: &str) -> Option<Vec<ToolCall>> {
    match serde_json::from_str(text.trim()).ok()? {
        Value::Array(items) if !items.is_empty() => items.iter().map(call_from_value).collect(),
        value @ Value::Object(_) => Some(vec![call_from_value(&value)?]),
        _ => None,
    }
}

/// `call_` and 24 random hex digits.
fn call_id() -> String {
    let hex = uuid::Uuid::new_v4().simple().to_string();
    format!("call_{}", &hex[..24])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn calls(out: &ParsedOutput) -> Vec<(&str, &str)> {
        out.tool_calls.iter().map(|c| (c.name.as_str(), c.arguments.as_str())).collect()
    }

    #[test]
    fn one_call_with_text_around() {
        let out = parse_output(
            "Let me check.\n<tool_call>\n{\"name\": \"weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>",
            true,
        );
        assert_eq!(calls(&out), [("weather", r#"{"city":"Paris"}"#)]);
        assert_eq!(out.content, "Let me check.\n");
        assert_eq!(out.reasoning, None);
        assert!(out.tool_calls[0].id.starts_with("call_") && out.tool_calls[0].id.len() == 29);
    }

    #[test]
    fn several_calls_get_distinct_ids() {
        let text = "<tool_call>{\"name\": \"a\", \"arguments\": {}}</tool_call>\n<tool_call>{\"name\": \"b\", \"parameters\": {\"x\": 1}}</tool_call>";
        let out = parse_output(text, true);
        assert_eq!(calls(&out), [("a", "{}"), ("b", r#"{"x":1}"#)]);
        assert_eq!(out.content.trim(), "");
        assert_ne!(out.tool_calls[0].id, out.tool_calls[1].id);
    }

    #[test]
    fn malformed_json_stays_content() {
        let text = "<tool_call>{\"name\": \"a\", \"arguments\": {</tool_call> ok";
        let out = parse_output(text, true);
        assert!(out.tool_calls.is_empty());
        assert_eq!(out.content, text);
        // And a block without a name is no call either.
        let text = "<tool_call>{\"arguments\": {}}</tool_call>";
        assert_eq!(parse_output(text, true).content, text);
    }

    #[test]
    fn unclosed_block_at_the_end_counts_when_whole() {
        let out = parse_output("<tool_call>{\"name\": \"a\", \"arguments\": {}}", true);
        assert_eq!(calls(&out), [("a", "{}")]);
        assert_eq!(parse_output("<tool_call>{\"name\"", true).content, "<tool_call>{\"name\"");
    }

    #[test]
    fn bare_json_fallback() {
        let out = parse_output(" {\"name\": \"a\", \"arguments\": {\"q\": \"x\"}}", true);
        assert_eq!(calls(&out), [("a", r#"{"q":"x"}"#)]);
        assert_eq!(out.content, "");
        let out =
            parse_output("[{\"name\": \"a\", \"parameters\": {}}, {\"name\": \"b\", \"arguments\": \"{}\"}]", true);
        assert_eq!(calls(&out), [("a", "{}"), ("b", "{}")]);
        // JSON that is not a call is content, unchanged.
        assert_eq!(parse_output("{\"answer\": 4}", true).content, "{\"answer\": 4}");
        assert_eq!(parse_output("[1, 2]", true).content, "[1, 2]");
    }

    #[test]
    fn without_tools_nothing_is_a_call() {
        let text = "<tool_call>{\"name\": \"a\", \"arguments\": {}}</tool_call>";
        assert_eq!(parse_output(text, false), ParsedOutput { content: text.into(), ..Default::default() });
        let json = "{\"name\": \"a\", \"arguments\": {}}";
        assert_eq!(parse_output(json, false).content, json);
    }

    #[test]
    fn think_block_is_reasoning() {
        let out = parse_output("<think>\nIt is 4.\n</think>\n\nFour.", false);
        assert_eq!(out.reasoning.as_deref(), Some("\nIt is 4.\n"));
        assert_eq!(out.content, "Four.");
        // Truncated inside the block: all reasoning.
        let out = parse_output("<think>hmm", false);
        assert_eq!((out.reasoning.as_deref(), out.content.as_str()), (Some("hmm"), ""));
        // Not at the start: content, untouched.
        let text = "  So <think>x</think> y";
        assert_eq!(parse_output(text, false), ParsedOutput { content: text.into(), ..Default::default() });
        assert_eq!(parse_output("<thin", false).content, "<thin");
    }

    #[test]
    fn think_then_call() {
        let out = parse_output(
            "<think>need weather</think>\n<tool_call>{\"name\": \"w\", \"arguments\": {}}</tool_call>",
            true,
        );
        assert_eq!(out.reasoning.as_deref(), Some("need weather"));
        assert_eq!(calls(&out), [("w", "{}")]);
        assert_eq!(out.content, "");
    }

    /// Feeding one character at a time gives what parsing the whole does:
    /// no tag is handed out half-seen.
    #[test]
    fn streaming_agrees_with_whole() {
        let texts = [
            "<think>a < b</think>\n\nHi <tool_call>{\"name\": \"f\", \"arguments\": {\"k\": \"<\"}}</tool_call> bye <tool_",
            "plain <tool text",
            "  {\"name\": \"f\", \"arguments\": {}}",
            "  {not json} <tool_call>{\"name\": \"g\", \"arguments\": {}}</tool_call>",
            "\n\nHello",
        ];
        for text in texts {
            for tools in [false, true] {
                let whole = parse_output(text, tools);
                let mut parser = OutputParser::new(tools);
                let mut streamed = Parsed::default();
                for c in text.chars() {
                    streamed.extend(parser.feed(&c.to_string()));
                }
                streamed.extend(parser.finish());
                assert_eq!(streamed.content, whole.content, "{text:?} tools={tools}");
                assert_eq!(streamed.reasoning, whole.reasoning.unwrap_or_default(), "{text:?}");
                let names =
                    |c: &[ToolCall]| c.iter().map(|c| (c.name.clone(), c.arguments.clone())).collect::<Vec<_>>();
                assert_eq!(names(&streamed.tool_calls), names(&whole.tool_calls), "{text:?}");
            }
        }
    }
}
