//! vLLM's beam search over any backend ([`prompt::beam`] keeps the beams): each step asks every
//! live beam's next token (one token, its `2 × width` most likely alternatives as raw logprobs) as
//! a request of its own. The answer is the `width` best beams, as token chunks of choices
//! `0..width`, so the rest of the pipeline (detokenization, stop reasons, usage) treats them as
//! `n` choices.

use std::sync::Arc;

use futures::stream::{self, StreamExt};
use prompt::beam::{Beam, Beams};

use crate::backend::{Backend, BackendError, BeamSearch, Finish, GenerateRequest, Sampling, TokenChunk, TokenStream};

/// Runs `search` for `request` (whose `sampling.max_tokens`, `stop_token_ids` and `ignore_eos`
/// apply) on `backend`; `eos` are the model's end tokens.
pub fn beam_search(
    backend: Arc<dyn Backend>,
    request: GenerateRequest,
    search: BeamSearch,
    eos: Vec<u32>,
) -> TokenStream {
    stream::once(async move { run(backend.as_ref(), &request, search, eos).await })
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
    eos: Vec<u32>,
) -> Result<Vec<TokenChunk>, BackendError> {
    let sampling = &request.sampling;
    let mut ends = sampling.stop_token_ids.clone();
    if !sampling.ignore_eos {
        ends.extend(&eos);
    }
    let prompt_len = request.prompt_token_ids.len();
    let mut beams = Beams::new(search.width as usize, search.length_penalty, prompt_len, ends, eos);
    for step in 0..sampling.max_tokens {
        if beams.live().is_empty() {
            break;
        }
        let asks = beams
            .live()
            .iter()
            .enumerate()
            .map(|(i, beam)| next_tokens(backend, request, beam, step, i, beams.alternatives()));
        let alternatives = futures::future::try_join_all(asks).await?;
        beams.step(alternatives);
    }
    Ok((0..)
        .zip(beams.finish())
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
    alternatives: usize,
) -> Result<Vec<(u32, f32)>, BackendError> {
    let mut prompt = request.prompt_token_ids.as_ref().clone();
    prompt.extend(&beam.tokens);
    let sampling = Sampling {
        temperature: 0.0,
        max_tokens: 1,
        logprobs: Some(alternatives as u32),
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
