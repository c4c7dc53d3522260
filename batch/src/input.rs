//! The input file: one JSON object per line.
//!
//! A line holds exactly one of `prompt` (text), `prompt_token_ids` (ids) or `messages` (a chat,
//! `[{"role", "content"}]`), an optional `id` (any JSON value, echoed back), and optional sampling
//! fields with vLLM's names and defaults (`logprobs` and `prompt_logprobs` as counts of top tokens,
//! `logit_bias`, `allowed_token_ids`, `bad_words`, `skip_special_tokens` among them), chat
//! rendering options (`tools`, `chat_template_kwargs`, `add_generation_prompt`,
//! `continue_final_message`), `stop` strings (at most 4), `include_stop_str_in_output`, `n`,
//! `truncate_prompt_tokens`, and `use_beam_search` with `length_penalty` (`n` beams over a prompt),
//! and at most one structured output (`response_format`, `structured_outputs` or a `guided_*`
//! field, as the server takes them). Unknown fields are errors, so a misspelt parameter never goes
//! unnoticed. Blank lines are skipped.

use constraint::api::{requested, Guided, ResponseFormat, StructuredOutputs};
use engine::offline::{BeamSearchParams, ChatMessage, ChatOptions, Input, Prompt, Request};
use engine::SamplingParams;
use serde::Deserialize;
use std::collections::HashMap;

/// One request of the file.
#[derive(Debug, Clone)]
pub struct Line {
    /// 1-based line number in the file.
    pub number: usize,
    pub id: Option<serde_json::Value>,
    pub request: Request,
    /// Beam search instead of sampling (`use_beam_search`, with `n` beams), over this prompt.
    pub beam: Option<(BeamSearchParams, Prompt)>,
}

/// A line as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLine {
    id: Option<serde_json::Value>,
    prompt: Option<String>,
    prompt_token_ids: Option<Vec<u32>>,
    messages: Option<Vec<RawMessage>>,
    max_tokens: Option<u32>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<u32>,
    min_p: Option<f32>,
    seed: Option<u64>,
    stop_token_ids: Option<Vec<u32>>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    repetition_penalty: Option<f32>,
    ignore_eos: Option<bool>,
    min_tokens: Option<u32>,
    logprobs: Option<u32>,
    prompt_logprobs: Option<u32>,
    logit_bias: Option<HashMap<String, f32>>,
    allowed_token_ids: Option<Vec<u32>>,
    bad_words: Option<Vec<String>>,
    skip_special_tokens: Option<bool>,
    stop: Option<Stop>,
    include_stop_str_in_output: Option<bool>,
    n: Option<u32>,
    truncate_prompt_tokens: Option<usize>,
    use_beam_search: Option<bool>,
    length_penalty: Option<f32>,
    tools: Option<Vec<serde_json::Value>>,
    chat_template_kwargs: Option<serde_json::Map<String, serde_json::Value>>,
    add_generation_prompt: Option<bool>,
    continue_final_message: Option<bool>,
    response_format: Option<ResponseFormat>,
    structured_outputs: Option<StructuredOutputs>,
    guided_json: Option<serde_json::Value>,
    guided_regex: Option<String>,
    guided_choice: Option<Vec<String>>,
    guided_grammar: Option<String>,
    guided_decoding_backend: Option<String>,
    guided_whitespace_pattern: Option<String>,
}

/// `stop`: a string or a list of strings, as the server takes it.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMessage {
    role: String,
    content: String,
}

/// A bad line, with its number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineError {
    pub number: usize,
    pub message: String,
}

impl std::fmt::Display for LineError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}: {}", self.number, self.message)
    }
}

/// Parses every non-blank line; on failure, every bad line (so one run shows them all).
pub fn parse(text: &str) -> Result<Vec<Line>, Vec<LineError>> {
    each_line(text, parse_line, |number, (id, request, beam)| Line { number, id, request, beam })
}

/// Every non-blank line through `parse`, then `line` with its 1-based number; on failure, every
/// bad line.
pub fn each_line<P, L>(
    text: &str,
    parse: impl Fn(&str) -> Result<P, String>,
    line: impl Fn(usize, P) -> L,
) -> Result<Vec<L>, Vec<LineError>> {
    let mut lines = Vec::new();
    let mut errors = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        if raw.trim().is_empty() {
            continue;
        }
        match parse(raw) {
            Ok(parsed) => lines.push(line(i + 1, parsed)),
            Err(message) => errors.push(LineError { number: i + 1, message }),
        }
    }
    if errors.is_empty() {
        Ok(lines)
    } else {
        Err(errors)
    }
}

/// The line's fields, or an error naming the field that is wrong (serde names only unknown ones).
fn raw_line(value: serde_json::Value) -> Result<RawLine, String> {
    let serde_json::Value::Object(fields) = value else { return Err("not a JSON object".into()) };
    match serde_json::from_value::<RawLine>(serde_json::Value::Object(fields.clone())) {
        Ok(line) => Ok(line),
        Err(e) => {
            // Every field is optional, so each one alone is a complete line: the first that fails
            // alone is the culprit.
            for (key, field) in fields {
                let alone = serde_json::Value::Object([(key.clone(), field)].into_iter().collect());
                if let Err(e) = serde_json::from_value::<RawLine>(alone) {
                    return Err(format!("field {key:?}: {e}"));
                }
            }
            Err(e.to_string())
        }
    }
}

type Parsed = (Option<serde_json::Value>, Request, Option<(BeamSearchParams, Prompt)>);

fn parse_line(raw: &str) -> Result<Parsed, String> {
    let value: serde_json::Value = serde_json::from_str(raw).map_err(|e| format!("not valid JSON: {e}"))?;
    let line = raw_line(value)?;
    let input = match (line.prompt, line.prompt_token_ids, line.messages) {
        (Some(text), None, None) => Input::Prompt(Prompt::Text(text)),
        (None, Some(ids), None) if !ids.is_empty() => Input::Prompt(Prompt::TokenIds(ids)),
        (None, Some(_), None) => return Err("prompt_token_ids is empty".into()),
        (None, None, Some(messages)) if !messages.is_empty() => {
            Input::Chat(messages.into_iter().map(|m| ChatMessage::text(m.role, m.content)).collect())
        }
        (None, None, Some(_)) => return Err("messages is empty".into()),
        _ => return Err("needs exactly one of \"prompt\", \"prompt_token_ids\" or \"messages\"".into()),
    };
    let d = SamplingParams::default();
    let sampling = SamplingParams {
        max_tokens: line.max_tokens.unwrap_or(d.max_tokens),
        temperature: line.temperature.unwrap_or(d.temperature),
        top_p: line.top_p.unwrap_or(d.top_p),
        top_k: line.top_k.unwrap_or(d.top_k),
        min_p: line.min_p.unwrap_or(d.min_p),
        seed: line.seed.or(d.seed),
        stop_token_ids: line.stop_token_ids.unwrap_or(d.stop_token_ids.clone()),
        presence_penalty: line.presence_penalty.unwrap_or(d.presence_penalty),
        frequency_penalty: line.frequency_penalty.unwrap_or(d.frequency_penalty),
        repetition_penalty: line.repetition_penalty.unwrap_or(d.repetition_penalty),
        ignore_eos: line.ignore_eos.unwrap_or(d.ignore_eos),
        min_tokens: line.min_tokens.unwrap_or(d.min_tokens),
        logprobs: line.logprobs,
        prompt_logprobs: line.prompt_logprobs,
        logit_bias: logit_bias(line.logit_bias.unwrap_or_default())?,
        allowed_token_ids: line.allowed_token_ids,
        ..d
    };
    sampling.validate().map_err(|e| e.to_string())?;
    let guided = Guided {
        guided_json: line.guided_json,
        guided_regex: line.guided_regex,
        guided_choice: line.guided_choice,
        guided_grammar: line.guided_grammar,
        guided_decoding_backend: line.guided_decoding_backend,
        guided_whitespace_pattern: line.guided_whitespace_pattern,
    };
    let constraint = requested(line.response_format.as_ref(), line.structured_outputs.as_ref(), &guided)
        .map_err(|e| e.to_string())?
        .map(|r| r.constraint);
    let bad_words = line.bad_words.unwrap_or_default();
    if bad_words.iter().any(|w| w.trim().is_empty()) {
        return Err("bad_words: a word is empty".into());
    }
    let skip_special_tokens = line.skip_special_tokens.unwrap_or(true);
    let stop: Vec<String> = match line.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(list)) => list,
    };
    if stop.len() > 4 {
        return Err(format!("stop: at most 4 strings, got {}", stop.len()));
    }
    let stop = stop.into_iter().filter(|s| !s.is_empty()).collect();
    let include_stop_str_in_output = line.include_stop_str_in_output.unwrap_or(false);
    // The server's ceiling, which the engine alone does not hold lines to.
    if sampling.temperature > 2.0 {
        return Err(format!("temperature: in [0, 2], got {}", sampling.temperature));
    }
    if line.truncate_prompt_tokens == Some(0) {
        return Err("truncate_prompt_tokens: at least 1".into());
    }
    let truncate_prompt_tokens = line.truncate_prompt_tokens;
    let n = line.n.unwrap_or(1);
    if !(1..=16).contains(&n) {
        return Err(format!("n: in [1, 16], got {n}"));
    }
    let chat = chat_options(
        &input,
        line.tools,
        line.chat_template_kwargs,
        line.add_generation_prompt,
        line.continue_final_message,
    )?;
    let request = Request {
        input,
        sampling,
        constraint,
        bad_words,
        skip_special_tokens,
        chat,
        stop,
        include_stop_str_in_output,
        n,
        truncate_prompt_tokens,
    };
    let beam = beam_search(line.use_beam_search, line.length_penalty, &request)?;
    let beam = match (beam, &request.input) {
        (Some(params), Input::Prompt(prompt)) => Some((params, prompt.clone())),
        (Some(_), Input::Chat(_)) => return Err("messages: not with use_beam_search, which takes a prompt".into()),
        (None, _) => None,
    };
    Ok((line.id, request, beam))
}

/// `use_beam_search` (with `length_penalty`): `n` beams over a prompt, as `LLM.beam_search`
/// takes it, and nothing a beam search cannot honour.
fn beam_search(
    on: Option<bool>,
    length_penalty: Option<f32>,
    request: &Request,
) -> Result<Option<BeamSearchParams>, String> {
    if on != Some(true) {
        return match length_penalty {
            Some(p) if p != 1.0 => Err("length_penalty: only with use_beam_search".into()),
            _ => Ok(None),
        };
    }
    let s = &request.sampling;
    let d = SamplingParams::default();
    let unsupported = [
        ("temperature", s.temperature != 0.0 && s.temperature != 1.0),
        ("top_p", s.top_p != d.top_p),
        ("top_k", s.top_k != d.top_k),
        ("min_p", s.min_p != d.min_p),
        ("penalties", s.presence_penalty != 0.0 || s.frequency_penalty != 0.0 || s.repetition_penalty != 1.0),
        ("logit_bias", !s.logit_bias.is_empty()),
        ("min_tokens", s.min_tokens != 0),
        ("stop", !request.stop.is_empty()),
        ("logprobs", s.logprobs.is_some() || s.prompt_logprobs.is_some()),
        ("allowed_token_ids", s.allowed_token_ids.is_some()),
        ("bad_words", !request.bad_words.is_empty()),
        ("structured output", request.constraint.is_some()),
    ];
    if let Some((field, _)) = unsupported.iter().find(|(_, set)| *set) {
        return Err(format!("{field}: not with use_beam_search"));
    }
    if request.n > 10 {
        return Err(format!("n: at most 10 beams with use_beam_search, got {}", request.n));
    }
    Ok(Some(BeamSearchParams {
        beam_width: request.n as usize,
        max_tokens: s.max_tokens,
        length_penalty: length_penalty.unwrap_or(1.0),
        ignore_eos: s.ignore_eos,
    }))
}

/// A chat line's rendering options, as the server checks them: they need `messages`, and a
/// final message left open is not also given the assistant's turn header.
fn chat_options(
    input: &Input,
    tools: Option<Vec<serde_json::Value>>,
    kwargs: Option<serde_json::Map<String, serde_json::Value>>,
    add_generation_prompt: Option<bool>,
    continue_final_message: Option<bool>,
) -> Result<ChatOptions, String> {
    let asked =
        tools.is_some() || kwargs.is_some() || add_generation_prompt.is_some() || continue_final_message.is_some();
    if asked && !matches!(input, Input::Chat(_)) {
        return Err(
            "tools, chat_template_kwargs, add_generation_prompt and continue_final_message need \"messages\"".into()
        );
    }
    let continue_final_message = continue_final_message.unwrap_or(false);
    if continue_final_message && add_generation_prompt == Some(true) {
        return Err("continue_final_message cannot be true together with add_generation_prompt".into());
    }
    Ok(ChatOptions {
        tools,
        add_generation_prompt: add_generation_prompt.unwrap_or(!continue_final_message),
        continue_final_message,
        kwargs,
    })
}

/// `logit_bias` as the server takes it: token ids as string keys, biases in [-100, 100] (checked
/// with the rest of the sampling), sorted by id.
fn logit_bias(map: HashMap<String, f32>) -> Result<Vec<(u32, f32)>, String> {
    let mut biases = map
        .into_iter()
        .map(|(key, bias)| {
            key.trim()
                .parse::<u32>()
                .map(|t| (t, bias))
                .map_err(|_| format!("logit_bias: key {key:?} is not a token id"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    biases.sort_unstable_by_key(|&(t, _)| t);
    Ok(biases)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_three_kinds_of_line_parse_with_their_sampling() {
        let text = r#"{"prompt": "Hi", "max_tokens": 3, "id": "a"}

{"prompt_token_ids": [1, 2], "temperature": 0}
{"messages": [{"role": "user", "content": "Hi"}], "seed": 7, "stop_token_ids": [2]}"#;
        let lines = parse(text).unwrap();
        assert_eq!(lines.iter().map(|l| l.number).collect::<Vec<_>>(), [1, 3, 4]);
        assert_eq!(lines[0].id, Some(serde_json::json!("a")));
        assert_eq!(lines[0].request.sampling.max_tokens, 3);
        assert_eq!(lines[1].request.input, Input::Prompt(Prompt::TokenIds(vec![1, 2])));
        assert_eq!(lines[1].request.sampling.temperature, 0.0);
        assert!(matches!(&lines[2].request.input, Input::Chat(m) if m[0].content == "Hi"));
        assert_eq!(lines[2].request.sampling.seed, Some(7));
        assert_eq!(lines[2].request.sampling.stop_token_ids, [2]);
    }

    #[test]
    fn bad_lines_are_all_named() {
        let text = "{\"prompt\": \"ok\"}\n{\"prompt\": \"x\", \"temprature\": 1}\nnot json\n{\"prompt\": \"a\", \"messages\": []}\n{\"prompt\": \"t\", \"top_p\": 0}";
        let errors = parse(text).unwrap_err();
        assert_eq!(errors.iter().map(|e| e.number).collect::<Vec<_>>(), [2, 3, 4, 5]);
        assert!(errors[0].message.contains("temprature"), "{}", errors[0]);
        assert!(errors[2].message.contains("exactly one"), "{}", errors[2]);
        assert!(errors[3].to_string().starts_with("line 5: top_p"), "{}", errors[3]);
    }
}
