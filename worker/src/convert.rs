//! Wire types to engine types. The router validates requests, but a worker
//! is reachable on its own, so it re-checks what would break the engine.

use proto::worker as pb;
use tonic::Status;

/// Turns the wire sampling params into the engine's, or `invalid_argument`.
/// The engine's own [`engine::SamplingParams::validate`] checks the sampler's
/// bounds; the wire adds OpenAI's temperature ceiling and `min_tokens <=
/// max_tokens` (the engine allows more, for the prefill's one-token run).
pub fn sampling(p: Option<pb::SamplingParams>) -> Result<engine::SamplingParams, Status> {
    let p = p.ok_or_else(|| Status::invalid_argument("sampling params are required"))?;
    if p.temperature > 2.0 {
        return Err(Status::invalid_argument(format!("temperature {} is outside [0, 2]", p.temperature)));
    }
    if p.min_tokens > p.max_tokens {
        return Err(Status::invalid_argument(format!(
            "min_tokens {} is above max_tokens {}",
            p.min_tokens, p.max_tokens
        )));
    }
    // Sorted, so equal requests give equal params.
    let mut logit_bias: Vec<(u32, f32)> = p.logit_bias.into_iter().collect();
    logit_bias.sort_unstable_by_key(|&(token, _)| token);
    let params = engine::SamplingParams {
        temperature: p.temperature,
        top_p: p.top_p,
        top_k: p.top_k,
        seed: p.seed,
        max_tokens: p.max_tokens,
        stop_token_ids: p.stop_token_ids,
        min_p: p.min_p,
        presence_penalty: p.presence_penalty,
        frequency_penalty: p.frequency_penalty,
        repetition_penalty: p.repetition_penalty.unwrap_or(1.0),
        logit_bias,
        ignore_eos: p.ignore_eos,
        min_tokens: p.min_tokens,
        logprobs: p.logprobs,
        prompt_logprobs: p.prompt_logprobs,
        allowed_token_ids: Some(p.allowed_token_ids).filter(|ids| !ids.is_empty()),
        bad_words: p.bad_words.into_iter().map(|w| w.token_ids).collect(),
    };
    params.validate().map_err(engine_error)?;
    Ok(params)
}

/// A wire constraint as the constraint library's, or `invalid_argument`.
pub fn constraint(wire: pb::Constraint) -> Result<constraint::Constraint, Status> {
    use pb::constraint::Kind;
    use pb::json_constraint::Whitespace as Ws;
    match wire.kind {
        Some(Kind::Json(json)) => {
            let schema = serde_json::from_str(&json.schema)
                .map_err(|e| Status::invalid_argument(format!("constraint.json.schema is not JSON: {e}")))?;
            let whitespace = match json.whitespace {
                None => constraint::Whitespace::Compact,
                Some(Ws::Flexible(_)) => constraint::Whitespace::Flexible,
                Some(Ws::Pattern(p)) => constraint::Whitespace::Pattern(p),
            };
            Ok(constraint::Constraint::Json { schema, whitespace })
        }
        Some(Kind::Regex(rx)) => Ok(constraint::Constraint::Regex(rx)),
        Some(Kind::Choice(c)) => Ok(constraint::Constraint::Choice(c.choices)),
        Some(Kind::Lark(g)) => Ok(constraint::Constraint::Lark(g)),
        None => Err(Status::invalid_argument("constraint names no kind")),
    }
}

/// The engine's finish reason on the wire.
pub fn finish_reason(r: engine::FinishReason) -> pb::FinishReason {
    match r {
        engine::FinishReason::Stop => pb::FinishReason::Stop,
        engine::FinishReason::Length => pb::FinishReason::Length,
        engine::FinishReason::Abort => pb::FinishReason::Abort,
    }
}

/// The number of choices (`n`) of wire sampling params: 0 (unset) is 1, at
/// most [`engine::MAX_N`].
pub fn choices(p: Option<&pb::SamplingParams>) -> Result<u32, Status> {
    match p.map_or(0, |p| p.n) {
        0 => Ok(1),
        n if n <= engine::MAX_N => Ok(n),
        n => Err(Status::invalid_argument(format!("n {n} is outside [1, {}]", engine::MAX_N))),
    }
}

/// A token's logprobs on the wire.
pub fn logprobs(l: engine::TokenLogprobs) -> pb::TokenLogprobs {
    pb::TokenLogprobs {
        logprob: l.logprob,
        top: l.top.into_iter().map(|(token_id, logprob)| pb::TopLogprob { token_id, logprob }).collect(),
        rank: l.rank,
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

/// An embedding's pooling; unspecified is the causal model's default, the last token.
/// The pooling the model card names, if any.
pub fn model_pooling(card: &pb::ModelCard) -> Option<engine::Pooling> {
    (card.pooling() != pb::Pooling::Unspecified).then(|| pooling(card.pooling(), card))
}

/// A request's pooling: its own, else the model card's, else the last token's.
pub fn pooling(p: pb::Pooling, card: &pb::ModelCard) -> engine::Pooling {
    match p {
        // The model card's own, else the last token's (what a causal model has seen all by).
        pb::Pooling::Unspecified if card.pooling() != pb::Pooling::Unspecified => pooling(card.pooling(), card),
        pb::Pooling::Unspecified | pb::Pooling::Last => engine::Pooling::Last,
        pb::Pooling::Mean => engine::Pooling::Mean,
        pb::Pooling::Cls => engine::Pooling::Cls,
    }
}

/// The engine's refusal of a request, as a gRPC status.
pub fn engine_error(e: engine::EngineError) -> Status {
    match e {
        // The router routes around a worker that answers UNAVAILABLE.
        engine::EngineError::Failed(_) | engine::EngineError::Stopped => Status::unavailable(e.to_string()),
        _ => Status::invalid_argument(e.to_string()),
    }
}

/// A request's `EngineEvent::Error`: UNAVAILABLE when the whole engine has
/// failed (the router routes around the worker), INTERNAL otherwise.
pub fn request_error(error: engine::RequestError) -> Status {
    match error.kind {
        engine::FailureKind::Engine => Status::unavailable(error.message),
        _ => Status::internal(error.message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire() -> pb::SamplingParams {
        pb::SamplingParams { temperature: 0.7, top_p: 0.9, max_tokens: 32, ..Default::default() }
    }

    #[test]
    fn every_sampling_field_reaches_the_engine() {
        let p = pb::SamplingParams {
            top_k: 5,
            seed: Some(9),
            stop_token_ids: vec![3, 4],
            min_p: 0.1,
            presence_penalty: 0.5,
            frequency_penalty: -0.5,
            repetition_penalty: Some(1.2),
            logit_bias: [(7, -100.0), (2, 1.5)].into_iter().collect(),
            ignore_eos: true,
            min_tokens: 4,
            logprobs: Some(5),
            prompt_logprobs: Some(2),
            allowed_token_ids: vec![4, 9],
            bad_words: vec![pb::TokenIds { token_ids: vec![1, 2] }, pb::TokenIds { token_ids: vec![3] }],
            ..wire()
        };
        let want = engine::SamplingParams {
            temperature: 0.7,
            top_p: 0.9,
            top_k: 5,
            seed: Some(9),
            max_tokens: 32,
            stop_token_ids: vec![3, 4],
            min_p: 0.1,
            presence_penalty: 0.5,
            frequency_penalty: -0.5,
            repetition_penalty: 1.2,
            logit_bias: vec![(2, 1.5), (7, -100.0)],
            ignore_eos: true,
            min_tokens: 4,
            logprobs: Some(5),
            prompt_logprobs: Some(2),
            allowed_token_ids: Some(vec![4, 9]),
            bad_words: vec![vec![1, 2], vec![3]],
        };
        assert_eq!(sampling(Some(p)).unwrap(), want);
    }

    #[test]
    fn n_defaults_to_one_and_is_capped() {
        assert_eq!(choices(None).unwrap(), 1);
        assert_eq!(choices(Some(&wire())).unwrap(), 1);
        assert_eq!(choices(Some(&pb::SamplingParams { n: 16, ..wire() })).unwrap(), 16);
        assert!(choices(Some(&pb::SamplingParams { n: 17, ..wire() })).is_err());
    }

    #[test]
    fn absent_fields_are_the_engine_defaults() {
        let got = sampling(Some(wire())).unwrap();
        let want = engine::SamplingParams { temperature: 0.7, top_p: 0.9, max_tokens: 32, ..Default::default() };
        assert_eq!(got, want);
    }

    #[test]
    fn out_of_range_sampling_fields_are_invalid_arguments() {
        let bad = [
            pb::SamplingParams { min_p: 1.5, ..wire() },
            pb::SamplingParams { min_p: f32::NAN, ..wire() },
            pb::SamplingParams { presence_penalty: 2.5, ..wire() },
            pb::SamplingParams { frequency_penalty: -2.5, ..wire() },
            pb::SamplingParams { repetition_penalty: Some(0.0), ..wire() },
            pb::SamplingParams { repetition_penalty: Some(2.5), ..wire() },
            pb::SamplingParams { logit_bias: [(1, 101.0)].into_iter().collect(), ..wire() },
            pb::SamplingParams { min_tokens: 33, ..wire() },
            pb::SamplingParams { temperature: 2.5, ..wire() },
            pb::SamplingParams { temperature: -0.5, ..wire() },
            pb::SamplingParams { top_p: 0.0, ..wire() },
            pb::SamplingParams { max_tokens: 0, ..wire() },
            pb::SamplingParams { logprobs: Some(21), ..wire() },
        ];
        for p in bad {
            let status = sampling(Some(p.clone())).expect_err(&format!("{p:?}"));
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{p:?}");
        }
    }

    #[test]
    fn a_failed_engine_answers_unavailable_so_the_router_routes_around_it() {
        let failed = engine_error(engine::EngineError::Failed("rank 2 is gone".into()));
        assert_eq!(failed.code(), tonic::Code::Unavailable);
        assert_eq!(engine_error(engine::EngineError::Stopped).code(), tonic::Code::Unavailable);
        assert_eq!(engine_error(engine::EngineError::ZeroMaxTokens).code(), tonic::Code::InvalidArgument);
    }
}
