//! The `Prefill` gRPC service.

use engine::{EngineEvent, EngineHandle, EngineRequest, KvSource};
use kv_transfer::{KvConnector, KvTransferParams};
use proto::worker as pb;
use tonic::{Request, Response, Status};
use tracing::{info_span, Instrument};
use worker::convert;

/// Runs prompts on the engine and pins their KV for remote decode.
pub struct PrefillService {
    engine: EngineHandle,
    connector: KvConnector,
    vocab_size: usize,
    max_model_len: usize,
}

impl PrefillService {
    pub fn new(engine: EngineHandle, connector: KvConnector, vocab_size: usize, max_model_len: usize) -> Self {
        Self { engine, connector, vocab_size, max_model_len }
    }

    async fn run(&self, req: pb::PrefillRequest) -> Result<pb::PrefillResponse, Status> {
        convert::prompt(&req.prompt_token_ids, self.vocab_size)?;
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
            request_id: req.request_id.clone(),
            prompt_token_ids: req.prompt_token_ids,
            // Prefill makes the first token only; decode makes the rest.
            sampling: engine::SamplingParams { max_tokens: 1, ..sampling },
            kv: KvSource::Compute,
            pin_on_finish: remote_decode,
            cache_salt: req.cache_salt,
            priority: 0,
        };
        let mut events = self.engine.submit(engine_req).map_err(convert::engine_error)?;
        let mut first = None;
        while let Some(event) = events.recv().await {
            match event {
                EngineEvent::Token(t) => first = Some(t),
                EngineEvent::Finished { reason, pinned_blocks, num_cached_tokens, .. } => {
                    let first = first.ok_or_else(|| Status::internal("engine finished without a token"))?;
                    let mut response =
                        self.answer(&req.request_id, first, reason, pinned_blocks, wanted_tokens, prompt_len);
                    response.num_cached_tokens = u32::try_from(num_cached_tokens).unwrap_or(u32::MAX);
                    return Ok(response);
                }
                EngineEvent::Error(e) => return Err(Status::internal(e)),
            }
        }
        Err(Status::internal("engine dropped the request"))
    }

    /// Decides whether the first token ends the request; pins the KV when it does not.
    fn answer(
        &self,
        request_id: &str,
        first: u32,
        reason: engine::FinishReason,
        pinned: Option<Vec<u32>>,
        wanted_tokens: u32,
        prompt_len: usize,
    ) -> pb::PrefillResponse {
        let finish = match reason {
            engine::FinishReason::Length if wanted_tokens > 1 && !self.at_context_end(prompt_len) => None,
            engine::FinishReason::Length => Some(pb::FinishReason::Length),
            other => Some(convert::finish_reason(other)),
        };
        let mut response = pb::PrefillResponse {
            request_id: request_id.to_string(),
            first_token_id: first,
            finish_reason: finish.unwrap_or(pb::FinishReason::Unspecified) as i32,
            kv_transfer_params: None,
            num_cached_tokens: 0,
        };
        match (finish, pinned) {
            (None, Some(blocks)) => {
                let remote = self.connector.pin(request_id, blocks, prompt_len as u32);
                response.kv_transfer_params = Some(KvTransferParams::RemotePrefill(remote).into());
            }
            // Finished on the first token: nothing to hand off.
            (Some(_), Some(blocks)) => self.engine.release_blocks(&blocks),
            (_, None) => {}
        }
        response
    }

    fn at_context_end(&self, prompt_len: usize) -> bool {
        prompt_len + 1 >= self.max_model_len
    }
}

#[tonic::async_trait]
impl pb::prefill_server::Prefill for PrefillService {
    async fn prefill(&self, request: Request<pb::PrefillRequest>) -> Result<Response<pb::PrefillResponse>, Status> {
        let req = request.into_inner();
        let span = info_span!("prefill", request_id = %req.request_id, prompt_tokens = req.prompt_token_ids.len());
        self.run(req).instrument(span).await.map(Response::new)
    }

    async fn release_kv(
        &self,
        request: Request<pb::ReleaseKvRequest>,
    ) -> Result<Response<pb::ReleaseKvResponse>, Status> {
        let released = self.connector.release(&request.into_inner().remote_request_id);
        Ok(Response::new(pb::ReleaseKvResponse { released }))
    }
}
