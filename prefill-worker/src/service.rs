//! The `Prefill` gRPC service.

use engine::{EngineEvent, EngineHandle, EngineRequest, KvSource};
use kv_transfer::{KvConnectors, KvTransferParams};
use proto::worker as pb;
use std::sync::Arc;
use tonic::{Request, Response, Status};
use tracing::{info_span, Instrument};
use worker::convert;
use worker::structured::Grammars;

/// One choice's first token and how it ended, as the engine reported them.
#[derive(Default)]
struct FirstToken {
    token: Option<(u32, Option<engine::TokenLogprobs>)>,
    reason: Option<engine::FinishReason>,
}

/// Runs prompts on the engine and pins their KV for remote decode.
pub struct PrefillService {
    engine: EngineHandle,
    connector: KvConnectors,
    vocab_size: usize,
    max_model_len: usize,
    grammars: Arc<Grammars>,
}

impl PrefillService {
    pub fn new(
        engine: EngineHandle,
        connector: KvConnectors,
        vocab_size: usize,
        max_model_len: usize,
        grammars: Arc<Grammars>,
    ) -> Self {
        Self { engine, connector, vocab_size, max_model_len, grammars }
    }

    async fn run(&self, mut req: pb::PrefillRequest) -> Result<pb::PrefillResponse, Status> {
        convert::prompt(&req.prompt_token_ids, self.vocab_size)?;
        let n = convert::choices(req.sampling.as_ref())?;
        // The first token is sampled under the constraint, as the decode worker continues it.
        let grammar = self.grammars.compile(req.sampling.as_mut(), &req.prompt_token_ids).await?;
        let sampling = convert::sampling(req.sampling)?;
        let remote_decode = match req.kv_transfer_params.map(KvTransferParams::try_from).transpose() {
            Ok(None) => false,
            Ok(Some(KvTransferParams::RemoteDecode)) => true,
            Ok(Some(KvTransferParams::RemotePrefill(_))) => {
                return Err(Status::invalid_argument("a prefill worker takes do_remote_decode, not do_remote_prefill"))
            }
            Err(e) => return Err(Status::invalid_argument(e.to_string())),
        };
        let wanted_tokens = sampling.max_tokens;
        let prompt_len = req.prompt_token_ids.len();
        let engine_req = EngineRequest {
            pooling: None,
            request_id: req.request_id.clone(),
            prompt_token_ids: req.prompt_token_ids,
            // Prefill makes the first token only; decode makes the rest.
            sampling: engine::SamplingParams { max_tokens: 1, ..sampling },
            kv: KvSource::Compute,
            pin_on_finish: remote_decode,
            cache_salt: req.cache_salt,
            priority: req.priority,
            n,
            grammar,
        };
        let mut events = self.engine.submit(engine_req).map_err(convert::engine_error)?;
        // Every choice hears one token and `Finished`; choice 0's carries the pin.
        let mut choices: Vec<FirstToken> = (0..n).map(|_| FirstToken::default()).collect();
        let (mut pinned, mut num_cached_tokens, mut prompt_logprobs) = (None, 0, Vec::new());
        while let Some(event) = events.recv().await {
            match event {
                EngineEvent::Token { index, id, logprobs, .. } => {
                    let choice = choices.get_mut(index as usize).ok_or_else(|| Status::internal("bad choice"))?;
                    choice.token = Some((id, logprobs));
                }
                EngineEvent::Finished { index, reason, pinned_blocks, num_cached_tokens: cached, .. } => {
                    let choice = choices.get_mut(index as usize).ok_or_else(|| Status::internal("bad choice"))?;
                    choice.reason = Some(reason);
                    pinned = pinned.or(pinned_blocks);
                    num_cached_tokens = cached;
                }
                EngineEvent::PromptLogprobs { logprobs, .. } => {
                    prompt_logprobs.extend(logprobs.into_iter().map(convert::logprobs));
                }
                EngineEvent::Error(e) => return Err(convert::request_error(e)),
                EngineEvent::Embedding(_) => return Err(Status::internal("an embedding for a prefill")),
            }
        }
        let mut response = self.answer(&req.request_id, choices, pinned, wanted_tokens, prompt_len)?;
        response.num_cached_tokens = u32::try_from(num_cached_tokens).unwrap_or(u32::MAX);
        response.prompt_logprobs = prompt_logprobs;
        Ok(response)
    }

    /// Decides which choices end on their first token; pins the KV when any goes on.
    fn answer(
        &self,
        request_id: &str,
        choices: Vec<FirstToken>,
        pinned: Option<Vec<u32>>,
        wanted_tokens: u32,
        prompt_len: usize,
    ) -> Result<pb::PrefillResponse, Status> {
        let mut wire = Vec::with_capacity(choices.len());
        for choice in choices {
            let ((token_id, logprobs), reason) = choice
                .token
                .zip(choice.reason)
                .ok_or_else(|| Status::internal("engine finished a choice without a token"))?;
            let finish = match reason {
                engine::FinishReason::Length if wanted_tokens > 1 && !self.at_context_end(prompt_len) => None,
                engine::FinishReason::Length => Some(pb::FinishReason::Length),
                other => Some(convert::finish_reason(other)),
            };
            wire.push(pb::PrefillChoice {
                token_id,
                // The decode worker never emits the first token: its logprobs travel from here.
                logprobs: logprobs.map(convert::logprobs),
                finish_reason: finish.unwrap_or(pb::FinishReason::Unspecified) as i32,
            });
        }
        let first = wire.first().cloned().ok_or_else(|| Status::internal("no choice"))?;
        let all_finished = wire.iter().all(|c| c.finish_reason() != pb::FinishReason::Unspecified);
        let mut response = pb::PrefillResponse {
            request_id: request_id.to_string(),
            first_token_id: first.token_id,
            finish_reason: if all_finished { first.finish_reason } else { pb::FinishReason::Unspecified as i32 },
            kv_transfer_params: None,
            num_cached_tokens: 0,
            first_token_logprobs: first.logprobs,
            choices: wire,
            prompt_logprobs: Vec::new(),
        };
        match (all_finished, pinned) {
            (false, Some(blocks)) => {
                let remote = self.connector.pin(request_id, blocks, prompt_len as u32);
                response.kv_transfer_params = Some(KvTransferParams::RemotePrefill(remote).into());
            }
            // Every choice finished on its first token: nothing to hand off.
            (true, Some(blocks)) => self.engine.release_blocks(&blocks),
            (_, None) => {}
        }
        Ok(response)
    }

    fn at_context_end(&self, prompt_len: usize) -> bool {
        prompt_len + 1 >= self.max_model_len
    }
}

#[tonic::async_trait]
impl pb::prefill_server::Prefill for PrefillService {
    async fn prefill(&self, request: Request<pb::PrefillRequest>) -> Result<Response<pb::PrefillResponse>, Status> {
        let span = info_span!(
            "prefill",
            otel.kind = "server",
            request_id = %request.get_ref().request_id,
            prompt_tokens = request.get_ref().prompt_token_ids.len(),
        );
        cluster::telemetry::set_parent(&span, request.metadata());
        let req = request.into_inner();
        self.run(req).instrument(span).await.map(Response::new)
    }

    async fn release_kv(
        &self,
        request: Request<pb::ReleaseKvRequest>,
    ) -> Result<Response<pb::ReleaseKvResponse>, Status> {
        let span =
            info_span!("release_kv", otel.kind = "server", remote_request_id = %request.get_ref().remote_request_id);
        cluster::telemetry::set_parent(&span, request.metadata());
        let _entered = span.enter();
        let released = self.connector.release(&request.into_inner().remote_request_id);
        tracing::debug!(released, "released pinned KV");
        Ok(Response::new(pb::ReleaseKvResponse { released }))
    }
}
