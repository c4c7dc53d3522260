//! The output file: one JSON object per input line, in input order.
//!
//! Success: `{"line", "id", "text", "token_ids", "finish_reason", "usage": {"prompt_tokens",
//! "completion_tokens", "total_tokens", "cached_tokens"}}`, plus `logprobs` (one entry per token)
//! and `prompt_logprobs` (one per prompt token, null first) when the line asked for them, each
//! entry `{"token_id", "logprob", "rank", "top": [[token_id, logprob], ...]}`. Failure:
//! `{"line", "id", "error"}`.
//! `line` is the 1-based input line, `id` the line's own `id` (null when it had none), and
//! `finish_reason` is `stop` (EOS or a stop token) or `length` (`max_tokens` or the context).

use crate::input::Line;
use engine::offline::{OfflineError, Output};
use engine::{FinishReason, TokenLogprobs};
use serde_json::{json, Value};

/// The record of a request that ran.
pub fn success(line: &Line, out: &Output) -> Value {
    let finish_reason = match out.finish_reason {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
        FinishReason::Abort => "abort",
    };
    let completion = out.token_ids.len();
    let mut record = json!({
        "line": line.number,
        "id": line.id,
        "text": out.text,
        "token_ids": out.token_ids,
        "finish_reason": finish_reason,
        "usage": {
            "prompt_tokens": out.num_prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": out.num_prompt_tokens + completion,
            "cached_tokens": out.num_cached_tokens,
        },
    });
    let sampling = &line.request.sampling;
    if sampling.logprobs.is_some() {
        record["logprobs"] = out.token_ids.iter().zip(&out.logprobs).map(|(&id, l)| entry(id, l)).collect();
    }
    if sampling.prompt_logprobs.is_some() {
        let prompt = &out.prompt_token_ids;
        let scored = prompt.iter().skip(1).zip(&out.prompt_logprobs).map(|(&id, l)| entry(id, l));
        record["prompt_logprobs"] = std::iter::once(Value::Null).chain(scored).collect();
    }
    record
}

/// One token's logprob entry.
fn entry(token_id: u32, l: &TokenLogprobs) -> Value {
    json!({"token_id": token_id, "logprob": l.logprob, "rank": l.rank, "top": l.top})
}

/// The record of a request that failed.
pub fn failure(line: &Line, error: &OfflineError) -> Value {
    json!({ "line": line.number, "id": line.id, "error": error.to_string() })
}
