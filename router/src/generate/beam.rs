//! vLLM's beam search, over any backend: each step asks every live beam's next token
//! distribution (one token, its `2 × width` most likely alternatives as raw logprobs), keeps the
//! `width` best continuations by score, and sets aside those that end. The answer is the `width`
//! best beams, as token chunks of choices `0..width`, so the rest of the pipeline
//! (detokenization, stop reasons, usage) treats them as `n` choices.
//!
//! A beam's score is vLLM's: its cumulative logprob over its length (prompt included, a final eos
//! left out) raised to `length_penalty`.

use std::sync::Arc;

use futures::stream::{self, StreamExt};

use crate::backend::{Backend, BackendError, BeamSearch, Finish, GenerateRequest, Sampling, TokenChunk, TokenStream};

/// One beam: its generated tokens, its cumulative logprob, and whether it ended.
#[derive(Debug, Clone, PartialEq)]
struct Beam {
    tokens: Vec<u32>,
    logprob: f32,
    ended: bool,
}

impl Beam {
    fn score(&self, prompt_len: usize, length_penalty: f32, eos: &[u32]) -> f32 {
        let mut len = prompt_len + self.tokens.len();
        if self.tokens.last().is_some_and(|t| eos.contains(t)) {
            len -= 1;
        }
        self.logprob / (len.max(1) as f32).powf(length_penalty)
    }
}

/// Runs `search` for `request` (whose `sampling.max_tokens`, `stop_token_ids` and `ignore_eos`
/// apply) on `backend`; `eos` are the model's end tokens.
pub fn beam_search(
    backend: Arc<dyn Backend>,
    request: GenerateRequest,
    search: BeamSearch,
    eos: Vec<u32>,
) -> TokenStream {
    stream::once(async move { run(backend.as_ref(), &request, search, &eos).await })
        .flat_map(|result| match result {
            Ok(chunks) => stream::iter(chunks.into_iter().map(Ok)).boxed(),
            Err(e) => stream::iter([Err(e)]).boxed(),
        })
        .boxed()
}

async fn run(
    backend: &dyn Backend,
    request: &GenerateRequest,
    search: BeamSearch,
    eos: &[u32],
) -> Result<Vec<TokenChunk>, BackendError> {
    let width = search.width.max(1) as usize;
    let prompt_len = request.prompt_token_ids.len();
    let ends = |token: u32| {
        request.sampling.stop_token_ids.contains(&token) || (!request.sampling.ignore_eos && eos.contains(&token))
    };
    let score = |beam: &Beam| beam.score(prompt_len, search.length_penalty, eos);
    let mut live = vec![Beam { tokens: Vec::new(), logprob: 0.0, ended: false }];
    let mut ended = Vec::new();
    for step in 0..request.sampling.max_tokens {
        let asks = live.iter().enumerate().map(|(i, beam)| next_tokens(backend, request, beam, step, i, width));
        let alternatives = futures::future::try_join_all(asks).await?;
        let mut candidates = Vec::new();
        for (beam, alternatives) in live.iter().zip(alternatives) {
            for (token, logprob) in alternatives {
                let mut tokens = beam.tokens.clone();
                tokens.push(token);
                let next = Beam { tokens, logprob: beam.logprob + logprob, ended: ends(token) };
                if next.ended {
                    ended.push(next);
                } else {
                    candidates.push(next);
                }
            }
        }
        // Stable: equal scores keep the order they were asked in, so beams are deterministic.
        candidates.sort_by(|a, b| score(b).total_cmp(&score(a)));
        candidates.truncate(width);
        live = candidates;
        if live.is_empty() {
            break;
        }
    }
    ended.extend(live);
    ended.sort_by(|a, b| score(b).total_cmp(&score(a)));
    ended.truncate(width);
    Ok((0..)
        .zip(ended)
        .map(|(index, beam)| TokenChunk {
            index,
            finish: Some(if beam.ended { Finish::Stop } else { Finish::Length }),
            token_ids: beam.tokens,
            ..TokenChunk::default()
        })
        .collect())
}

/// The `2 × width` most likely next tokens after `beam`, with their raw logprobs.
async fn next_tokens(
    backend: &dyn Backend,
    request: &GenerateRequest,
    beam: &Beam,
    step: u32,
    index: usize,
    width: usize,
) -> Result<Vec<(u32, f32)>, BackendError> {
    let mut prompt = request.prompt_token_ids.as_ref().clone();
    prompt.extend(&beam.tokens);
    let sampling = Sampling {
        temperature: 0.0,
        max_tokens: 1,
        logprobs: Some(2 * width as u32),
        ignore_eos: true,
        n: 1,
        ..Sampling::default()
    };
    let ask = GenerateRequest {
        request_id: format!("{}-beam{step}-{index}", request.request_id),
        demand: GenerateRequest::demand_for(&prompt, request.cache_salt.as_deref(), backend.block_size()),
        prompt_token_ids: Arc::new(prompt),
        sampling,
        ..request.clone()
    };
    let mut tokens = backend.generate(ask);
    while let Some(chunk) = tokens.next().await {
        if let Some(logprobs) = chunk?.logprobs.into_iter().next() {
            return Ok(logprobs.top);
        }
    }
    Err(BackendError::Worker("a beam step ended without its token's logprobs".into()))
}

#[cfg(test)]
mod tests;
