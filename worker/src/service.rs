//! The `Worker` gRPC service every worker serves.

use crate::convert;
use crate::kv_events::{KvEventConfig, KvEventPublisher, KvEventStream};
use engine::{EngineEvent, EngineHandle, EngineRequest};
use kv_transfer::{KvConnectors, KvPuller};
use proto::worker as pb;
use std::sync::Arc;
use tonic::{Request, Response, Status};

/// Model card, stats and KV event stream of one worker.
#[derive(Clone)]
pub struct WorkerService {
    card: pb::ModelCard,
    engine: EngineHandle,
    /// The KV server of a prefill worker, whose pins the stats report.
    connector: Option<KvConnectors>,
    /// The KV pullers of a decode worker (one per rank), whose pulls the stats count.
    pullers: Vec<Arc<KvPuller>>,
    /// The one consumer of the engine's KV events, shared by every subscriber.
    kv_events: KvEventPublisher,
}

impl WorkerService {
    /// Also starts the engine's [`KvEventPublisher`], so it must be called on
    /// a tokio runtime, once per engine (a second publisher would split the
    /// engine's events with the first).
    pub fn new(card: pb::ModelCard, engine: EngineHandle, connector: Option<KvConnectors>) -> Self {
        let kv_events = KvEventPublisher::start(engine.clone(), KvEventConfig::default());
        Self { card, engine, connector, pullers: Vec::new(), kv_events }
    }

    /// The same service reporting the pullers' pulls in its stats.
    pub fn with_pullers(self, pullers: Vec<Arc<KvPuller>>) -> Self {
        Self { pullers, ..self }
    }

    /// The KV event publisher, for the caller to [`shutdown`](KvEventPublisher::shutdown)
    /// when the server stops: a graceful shutdown waits for open streams, and
    /// `SubscribeKvEvents` streams never end on their own.
    pub fn kv_events(&self) -> &KvEventPublisher {
        &self.kv_events
    }
}

#[tonic::async_trait]
impl pb::worker_server::Worker for WorkerService {
    type SubscribeKvEventsStream = KvEventStream;

    async fn get_model_card(&self, _: Request<pb::GetModelCardRequest>) -> Result<Response<pb::ModelCard>, Status> {
        Ok(Response::new(self.card.clone()))
    }

    async fn get_stats(&self, _: Request<pb::GetStatsRequest>) -> Result<Response<pb::WorkerStats>, Status> {
        // A failed engine (a tensor-parallel rank died) serves nothing more.
        if let Some(reason) = self.engine.failure() {
            return Err(Status::unavailable(format!("the engine has failed: {reason}")));
        }
        let stats = self.engine.stats();
        let pins = self.connector.as_ref().map(|c| c.stats()).unwrap_or_default();
        let pulls =
            self.pullers.iter().map(|p| p.counts()).fold(Default::default(), |a: kv_transfer::PullCounts, b| {
                kv_transfer::PullCounts { tcp: a.tcp + b.tcp, shm: a.shm + b.shm }
            });
        Ok(Response::new(pb::WorkerStats {
            num_sequences: stats.num_sequences as u32,
            free_blocks: stats.free_blocks as u32,
            total_blocks: stats.total_blocks as u32,
            // The engine's count, not the pin table's: a block held without a pin is a leak to see.
            pinned_blocks: stats.held_blocks as u32,
            pinned_requests: pins.requests as u32,
            kv_pulls_tcp: pulls.tcp,
            kv_pulls_shm: pulls.shm,
        }))
    }

    async fn subscribe_kv_events(
        &self,
        _: Request<pb::SubscribeKvEventsRequest>,
    ) -> Result<Response<Self::SubscribeKvEventsStream>, Status> {
        Ok(Response::new(self.kv_events.subscribe()))
    }

    async fn embed(&self, request: Request<pb::EmbedRequest>) -> Result<Response<pb::EmbedResponse>, Status> {
        let req = request.into_inner();
        let span =
            tracing::info_span!("embed", request_id = %req.request_id, prompt_tokens = req.prompt_token_ids.len());
        let _entered = span.enter();
        convert::prompt(&req.prompt_token_ids, self.engine.vocab_size())?;
        let pooling = convert::pooling(req.pooling(), &self.card);
        let request = EngineRequest {
            cache_salt: req.cache_salt,
            priority: req.priority,
            ..EngineRequest::embedding(req.request_id, req.prompt_token_ids, pooling)
        };
        // Dropping the receiver (the router gave up) aborts the request.
        let mut events = self.engine.submit(request).map_err(convert::engine_error)?;
        drop(_entered);
        let mut pooled = None;
        while let Some(event) = events.recv().await {
            match event {
                EngineEvent::Embedding(v) => pooled = Some(v),
                EngineEvent::Finished { num_cached_tokens, .. } => {
                    let mut embedding =
                        pooled.ok_or_else(|| Status::internal("an embedding request ended without one"))?;
                    if req.normalize {
                        engine::l2_normalize(&mut embedding);
                    }
                    let num_cached_tokens = u32::try_from(num_cached_tokens).unwrap_or(u32::MAX);
                    return Ok(Response::new(pb::EmbedResponse { embedding, num_cached_tokens }));
                }
                EngineEvent::Error(e) => return Err(convert::request_error(e)),
                EngineEvent::Token { .. } | EngineEvent::PromptLogprobs { .. } => {
                    return Err(Status::internal("an embedding request generated"))
                }
            }
        }
        Err(Status::internal("the engine dropped an embedding request"))
    }
}

/// Accepted connections with `TCP_NODELAY` set. Tonic's own incoming stream
/// leaves Nagle on, which can hold a token's small gRPC frame back for the
/// peer's ACK.
pub fn nodelay_incoming(
    listener: tokio::net::TcpListener,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> + Send + 'static {
    futures::stream::unfold(listener, |listener| async move {
        let accepted = listener.accept().await.map(|(stream, _)| {
            // Best effort: a socket that refuses it still works, only slower.
            let _ = stream.set_nodelay(true);
            stream
        });
        Some((accepted, listener))
    })
}
