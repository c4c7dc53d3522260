//! The output file: one JSON object per input line, in input order.
//!
//! Success: `{"line", "id", "text", "token_ids", "finish_reason", "usage": {"prompt_tokens",
//! "completion_tokens", "total_tokens", "cached_tokens"}}` (with `n` > 1, a `choices` list of
//! `{"index", "text", "token_ids", "finish_reason"}` instead), plus `logprobs` (one entry per token)
//! and `prompt_logprobs` (one per prompt token, null first) when the line asked for them, each
//! entry `{"token_id", "logprob", "rank", "top": [[token_id, logprob], ...]}`. Failure:
//! `{"line", "id", "error"}`.
//! `line` is the 1-based input line, `id` the line's own `id` (null when it had none), and
//! `finish_reason` is `stop` (EOS or a stop token) or `length` (`max_tokens` or the context).

use crate::input::Line;
use engine::offline::{BeamOutput, Choice, OfflineError, Output};
use engine::{FinishReason, TokenLogprobs};
use serde_json::{json, Value};

/// The record of a request that ran: its one choice's fields, or with `n` > 1 a `choices` list
/// of them (each with its `index`).
pub fn success(line: &Line, out: &Output) -> Value {
    let sampling = &line.request.sampling;
    let completion: usize = out.choices.iter().map(|c| c.token_ids.len()).sum();
    let mut record = json!({
        "line": line.number,
        "id": line.id,
        "usage": {
            "prompt_tokens": out.num_prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": out.num_prompt_tokens + completion,
            "cached_tokens": out.num_cached_tokens,
        },
    });
    let choices: Vec<Value> = out.choices.iter().map(|c| choice(c, sampling.logprobs.is_some())).collect();
    match <[Value; 1]>::try_from(choices) {
        Ok([one]) => record.as_object_mut().unwrap().extend(one.as_object().unwrap().clone()),
        Err(choices) => {
            let indexed = choices.into_iter().enumerate().map(|(i, mut c)| {
                c["index"] = json!(i);
                c
            });
            record["choices"] = indexed.collect();
        }
    }
    if sampling.prompt_logprobs.is_some() {
        let prompt = &out.prompt_token_ids;
        let scored = prompt.iter().skip(1).zip(&out.prompt_logprobs).map(|(&id, l)| entry(id, l));
        record["prompt_logprobs"] = std::iter::once(Value::Null).chain(scored).collect();
    }
    record
}

/// The record of a beam-search line: its beams, best first, as `choices` (each with its `index`
/// and `cumulative_logprob`).
pub fn beams(line: &Line, beams: &[BeamOutput]) -> Value {
    let completion: usize = beams.iter().map(|b| b.token_ids.len()).sum();
    let choices: Vec<Value> = (0..)
        .zip(beams)
        .map(|(index, b): (usize, &BeamOutput)| {
            let finish = if b.finish_reason == FinishReason::Stop { "stop" } else { "length" };
            json!({"index": index, "text": b.text, "token_ids": b.token_ids, "finish_reason": finish,
                   "cumulative_logprob": b.cumulative_logprob})
        })
        .collect();
    json!({"line": line.number, "id": line.id, "choices": choices, "usage": {"completion_tokens": completion}})
}

/// One choice's fields.
fn choice(c: &Choice, logprobs: bool) -> Value {
    let finish_reason = match c.finish_reason {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
        FinishReason::Abort => "abort",
    };
    let mut fields = json!({"text": c.text, "token_ids": c.token_ids, "finish_reason": finish_reason});
    if logprobs {
        fields["logprobs"] = c.token_ids.iter().zip(&c.logprobs).map(|(&id, l)| entry(id, l)).collect();
    }
    fields
}

/// One token's logprob entry.
fn entry(token_id: u32, l: &TokenLogprobs) -> Value {
    json!({"token_id": token_id, "logprob": l.logprob, "rank": l.rank, "top": l.top})
}

/// The record of a request that failed.
pub fn failure(line: &Line, error: &OfflineError) -> Value {
    json!({ "line": line.number, "id": line.id, "error": error.to_string() })
}
