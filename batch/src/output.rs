//! The output file: one JSON object per input line, in input order.
//!
//! Success: `{"line", "id", "text", "token_ids", "finish_reason", "usage": {"prompt_tokens",
//! "completion_tokens", "total_tokens", "cached_tokens"}}`. Failure: `{"line", "id", "error"}`.
//! `line` is the 1-based input line, `id` the line's own `id` (null when it had none), and
//! `finish_reason` is `stop` (EOS or a stop token) or `length` (`max_tokens` or the context).

use crate::input::Line;
use engine::offline::{OfflineError, Output};
use engine::FinishReason;
use serde_json::{json, Value};

/// The record of a request that ran.
pub fn success(line: &Line, out: &Output) -> Value {
    let finish_reason = match out.finish_reason {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
        FinishReason::Abort => "abort",
    };
    let completion = out.token_ids.len();
    json!({
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
    })
}

/// The record of a request that failed.
pub fn failure(line: &Line, error: &OfflineError) -> Value {
    json!({ "line": line.number, "id": line.id, "error": error.to_string() })
}
