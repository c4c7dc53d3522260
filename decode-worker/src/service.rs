//! The `Decode` gRPC service.

use engine::{EngineEvent, EngineHandle, EngineRequest, FailureKind, KvLanding, KvReservation, KvSource};
use futures::Stream;
use kv_transfer::{KvPuller, KvTransferError, KvTransferParams, PullTarget, RemotePrefill, Transport};

use proto::worker as pb;
use std::pin::Pin;
use std::sync::Arc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};
use tracing::{info_span, Instrument};
use worker::blocks::pull_target;
use worker::convert;
use worker::structured::Grammars;

type ChunkStream = Pin<Box<dyn Stream<Item = Result<pb::DecodeChunk, Status>> + Send>>;

/// Generates tokens from handed-off KV, or from a local prefill.
pub struct DecodeService {
    engine: EngineHandle,
    /// One per tensor-parallel rank, each pulling that rank's heads.
    pullers: Vec<Arc<KvPuller>>,
    vocab_size: usize,
    layer_streaming: bool,
    grammars: Arc<Grammars>,
}

impl DecodeService {
    /// `pullers[r]` pulls with rank `r`'s layout of this engine.
    ///
    /// # Panics
    /// If there is not one puller per rank of the engine.
    pub fn new(engine: EngineHandle, pullers: Vec<Arc<KvPuller>>, vocab_size: usize, grammars: Arc<Grammars>) -> Self {
        assert_eq!(pullers.len(), engine.tp_size(), "one KV puller per tensor-parallel rank");
        Self { engine, pullers, vocab_size, layer_streaming: false, grammars }
    }

    /// Decodes while the KV streams in, layer by layer (`--kv-layer-streaming`;
    /// single-rank engines only: with several ranks a step would wait for
    /// the slowest rank's layer anyway).
    pub fn with_layer_streaming(self, on: bool) -> Self {
        Self { layer_streaming: on, ..self }
    }

    /// Where the prompt's KV comes from: pulled from the prefill worker, or computed here.
    async fn kv_source(&self, req: &pb::DecodeRequest, n: u32) -> Result<KvSource, Status> {
        let params = req.kv_transfer_params.clone().map(KvTransferParams::try_from).transpose();
        let remote = match params.map_err(|e| Status::invalid_argument(e.to_string()))? {
            None => return Ok(KvSource::Compute),
            Some(KvTransferParams::RemoteDecode) => {
                return Err(Status::invalid_argument("a decode worker takes do_remote_prefill, not do_remote_decode"))
            }
            Some(KvTransferParams::RemotePrefill(r)) => r,
        };
        let first_token =
            req.first_token_id.ok_or_else(|| Status::invalid_argument("do_remote_prefill needs first_token_id"))?;
        let first_tokens = if req.first_token_ids.is_empty() { vec![first_token] } else { req.first_token_ids.clone() };
        if first_tokens.len() != n as usize || first_tokens[0] != first_token {
            return Err(Status::invalid_argument(format!(
                "do_remote_prefill with n = {n} needs {n} first_token_ids starting with first_token_id, got {first_tokens:?}"
            )));
        }
        if remote.num_tokens as usize != req.prompt_token_ids.len() {
            return Err(Status::invalid_argument(format!(
                "the handed-off KV covers {} tokens, the prompt has {}",
                remote.num_tokens,
                req.prompt_token_ids.len()
            )));
        }
        // The router tells a failed pull (the prefill side's fault, or the
        // network's) from a failed decode worker by this code.
        let failed = |e: kv_transfer::KvTransferError| Status::data_loss(e.to_string());
        // Straight into the engine's cache when it has room now; a failed or
        // cancelled pull drops the reservation, which frees the blocks.
        if let Some(blocks) = self.engine.reserve_kv(req.prompt_token_ids.len()).await.map_err(convert::engine_error)? {
            // One choice only: forks copy the prompt's last block at admission.
            if self.layer_streaming && n == 1 && self.pullers.len() == 1 {
                let landing = self.stream_in(&blocks, remote);
                return Ok(KvSource::Reserved { blocks, first_tokens, landing: Some(landing) });
            }
            let targets = self.pullers.iter().map(|p| pull_target(&blocks, p.layout())).collect();
            let transport = self.pull_and_release(&remote, targets).await.map_err(failed)?;
            tracing::debug!(blocks = ?blocks.block_ids(), ?transport, "pulled the prompt's KV into its blocks");
            return Ok(KvSource::Reserved { blocks, first_tokens, landing: None });
        }
        // A full cache: the bytes (every rank's, rank after rank) wait for
        // room at admission.
        let per_rank = self.pullers[0].buffer_len(&remote);
        let mut data = vec![0; per_rank * self.pullers.len()];
        let targets = data
            .chunks_mut(per_rank.max(1))
            .zip(&self.pullers)
            .map(|(chunk, p)| PullTarget::buffer(chunk, p.layout()))
            .collect();
        let transport = self.pull_and_release(&remote, targets).await.map_err(failed)?;
        tracing::debug!(bytes = data.len(), ?transport, "pulled the prompt's KV");
        Ok(KvSource::Provided { data, first_tokens })
    }

    /// Every rank pulls its heads into its target at once; then the pins are
    /// released (see `KvPuller::release_after`).
    async fn pull_and_release(
        &self,
        remote: &RemotePrefill,
        mut targets: Vec<PullTarget<'_>>,
    ) -> Result<Transport, KvTransferError> {
        let span = kv_pull_span(remote, self.pullers.len());
        let pull = async {
            if let ([puller], [target]) = (&self.pullers[..], &mut targets[..]) {
                return puller.pull_and_release(remote, target).await;
            }
            let pulls = self.pullers.iter().zip(&mut targets).map(|(puller, target)| puller.pull_into(remote, target));
            let pulled = futures::future::try_join_all(pulls).await;
            let mut transports = self.pullers[0].release_after(remote, pulled).await?;
            Ok(transports.pop().unwrap_or(Transport::Tcp))
        };
        let pulled = pull.instrument(span.clone()).await;
        record_pull(&span, &pulled);
        pulled
    }

    /// Pulls into `blocks` in the background, reporting each layer as it
    /// lands. The pull holds its own share of the blocks until it ends, so
    /// an aborted request never frees blocks that are still being written.
    fn stream_in(&self, blocks: &KvReservation, remote: RemotePrefill) -> Arc<KvLanding> {
        let puller = &self.pullers[0];
        let landing = KvLanding::new(puller.layout().num_layers as usize);
        let reporter = landing.reporter();
        let (held, puller) = (blocks.share(), puller.clone());
        let span = kv_pull_span(&remote, 1);
        let pull = async move {
            let layout = *puller.layout();
            let progress = reporter.landing().clone();
            let mut target = pull_target(&held, &layout).with_progress(move |layers| progress.landed(layers));
            let pulled = puller.pull_and_release(&remote, &mut target).instrument(span.clone()).await;
            record_pull(&span, &pulled);
            match pulled {
                Ok(transport) => tracing::debug!(?transport, "the prompt's KV streamed in"),
                Err(e) => reporter.landing().fail(e.to_string()),
            }
        };
        tokio::spawn(pull.in_current_span());
        landing
    }

    async fn start(&self, mut req: pb::DecodeRequest) -> Result<ChunkStream, Status> {
        convert::prompt(&req.prompt_token_ids, self.vocab_size)?;
        let n = convert::choices(req.sampling.as_ref())?;
        // The matcher takes the prefill's first token before sampling the rest.
        let grammar = self.grammars.compile(req.sampling.as_mut(), &req.prompt_token_ids).await?;
        let sampling = convert::sampling(req.sampling.clone())?;
        let kv = self.kv_source(&req, n).await?;
        let engine_req = EngineRequest {
            pooling: None,
            request_id: req.request_id,
            prompt_token_ids: req.prompt_token_ids,
            sampling,
            kv,
            pin_on_finish: false,
            cache_salt: req.cache_salt,
            priority: req.priority,
            n,
            grammar,
        };
        let streaming = matches!(&engine_req.kv, KvSource::Reserved { landing: Some(_), .. });
        let mut events = self.engine.submit(engine_req).map_err(convert::engine_error)?;
        // Streaming in, a failed pull shows as the request's error: answer
        // it as a failed pull (the router's policy decides), as without
        // streaming, rather than as a stream that breaks.
        let mut first = None;
        if streaming {
            match events.recv().await {
                Some(EngineEvent::Error(e)) if e.kind == FailureKind::Handoff => {
                    return Err(Status::data_loss(e.message))
                }
                event => first = event,
            }
        }
        // Dropping this stream (the router cancelled) drops the receiver, which aborts the sequence.
        let events = tokio_stream::iter(first).chain(UnboundedReceiverStream::new(events));
        let chunks = events.map(move |event| match event {
            EngineEvent::Token { index, id, logprobs, num_cached_tokens } => Ok(pb::DecodeChunk {
                token_ids: vec![id],
                finish_reason: pb::FinishReason::Unspecified as i32,
                logprobs: logprobs.map(convert::logprobs).into_iter().collect(),
                index,
                num_cached_tokens: u32::try_from(num_cached_tokens).unwrap_or(u32::MAX),
                prompt_logprobs: Vec::new(),
            }),
            EngineEvent::PromptLogprobs { logprobs, .. } => Ok(pb::DecodeChunk {
                prompt_logprobs: logprobs.into_iter().map(convert::logprobs).collect(),
                ..pb::DecodeChunk::default()
            }),
            EngineEvent::Finished { index, reason, num_cached_tokens, .. } => Ok(pb::DecodeChunk {
                token_ids: vec![],
                finish_reason: convert::finish_reason(reason) as i32,
                logprobs: vec![],
                index,
                num_cached_tokens: u32::try_from(num_cached_tokens).unwrap_or(u32::MAX),
                prompt_logprobs: Vec::new(),
            }),
            EngineEvent::Error(e) => Err(convert::request_error(e)),
            EngineEvent::Embedding(_) => Err(Status::internal("an embedding for a generation")),
        });
        Ok(Box::pin(chunks))
    }
}

/// The kv-transfer hop of a request: a child of the decode span, and the
/// parent of the prefill worker's `kv_serve` spans (the pull request carries
/// its context).
fn kv_pull_span(remote: &RemotePrefill, ranks: usize) -> tracing::Span {
    info_span!(
        "kv_pull",
        otel.kind = "client",
        remote_request_id = %remote.remote_request_id,
        remote_host = %remote.remote_host,
        blocks = remote.remote_block_ids.len(),
        tokens = remote.num_tokens,
        ranks,
        transport = tracing::field::Empty,
        error = tracing::field::Empty,
    )
}

fn record_pull(span: &tracing::Span, pulled: &Result<Transport, KvTransferError>) {
    match pulled {
        Ok(transport) => span.record("transport", tracing::field::debug(transport)),
        Err(e) => span.record("error", tracing::field::display(e)),
    };
}

#[tonic::async_trait]
impl pb::decode_server::Decode for DecodeService {
    type DecodeStream = ChunkStream;

    async fn decode(&self, request: Request<pb::DecodeRequest>) -> Result<Response<ChunkStream>, Status> {
        let span = info_span!(
            "decode",
            otel.kind = "server",
            request_id = %request.get_ref().request_id,
            prompt_tokens = request.get_ref().prompt_token_ids.len(),
        );
        cluster::telemetry::set_parent(&span, request.metadata());
        let req = request.into_inner();
        self.start(req).instrument(span).await.map(Response::new)
    }
}
