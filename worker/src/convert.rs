//! Wire types to engine types. The router validates requests, but a worker
//! is reachable on its own, so it re-checks what would break the engine.

use proto::worker as pb;
use tonic::Status;

/// Turns the wire sampling params into the engine's, or `invalid_argument`.
pub fn sampling(p: Option<pb::SamplingParams>) -> Result<engine::SamplingParams, Status> {
    let p = p.ok_or_else(|| Status::invalid_argument("sampling params are required"))?;
    if !(0.0..=2.0).contains(&p.temperature) {
        return Err(Status::invalid_argument(format!("temperature {} is outside [0, 2]", p.temperature)));
    }
    if !(p.top_p > 0.0 && p.top_p <= 1.0) {
        return Err(Status::invalid_argument(format!("top_p {} is outside (0, 1]", p.top_p)));
    }
    if p.max_tokens == 0 {
        return Err(Status::invalid_argument("max_tokens must be at least 1"));
    }
    Ok(engine::SamplingParams {
        temperature: p.temperature,
        top_p: p.top_p,
        top_k: p.top_k,
        seed: p.seed,
        max_tokens: p.max_tokens,
        stop_token_ids: p.stop_token_ids,
    })
}

/// The engine's finish reason on the wire.
pub fn finish_reason(r: engine::FinishReason) -> pb::FinishReason {
    match r {
        engine::FinishReason::Stop => pb::FinishReason::Stop,
        engine::FinishReason::Length => pb::FinishReason::Length,
        engine::FinishReason::Abort => pb::FinishReason::Abort,
    }
}

/// Checks the prompt is non-empty and inside the vocabulary.
pub fn prompt(ids: &[u32], vocab_size: usize) -> Result<(), Status> {
    if ids.is_empty() {
        return Err(Status::invalid_argument("prompt_token_ids is empty"));
    }
    match ids.iter().find(|&&t| t as usize >= vocab_size) {
        Some(t) => Err(Status::invalid_argument(format!("token id {t} is outside the vocabulary of {vocab_size}"))),
        None => Ok(()),
    }
}

/// The engine's refusal of a request, as a gRPC status.
pub fn engine_error(e: engine::EngineError) -> Status {
    Status::invalid_argument(e.to_string())
}
