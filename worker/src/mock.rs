//! `--mock`: the worker services without a model, for benchmarks only.
//!
//! A mock worker publishes the real model card (the router builds its
//! tokenizer and chat template from it, so requests go through the router
//! exactly as they would) but never runs the model: `Prefill` answers at once
//! with a fixed token and a fake hand-off, `Decode` streams the rest of
//! `max_tokens` in one burst of one-token chunks, `Embed` answers one fixed
//! unit vector. What a benchmark then
//! measures is everything around the model: the router, gRPC, HTTP.
//!
//! The mock checks nothing it does not need to shape its answer: it costs
//! microseconds per request, so that the router's overhead is what shows.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use kv_transfer::{KvTransferParams, RemotePrefill};
use proto::worker as pb;
use tonic::{Request, Response, Status};

use crate::args::EngineArgs;
use crate::kv_events::{KvEventConfig, KvEventPublisher, KvEventSource, KvEventStream};

/// What the mock services answer with: the model card and the one token
/// every answer repeats.
#[derive(Debug, Clone)]
pub struct MockModel {
    /// The real model's card, read without loading its weights.
    pub card: pb::ModelCard,
    /// An ordinary token (never eos): every generated token is this one, so
    /// generation never stops before `max_tokens`.
    pub token_id: u32,
    /// The token's text, for the mock's OpenAI HTTP face.
    pub token_text: String,
    /// With [`MockModel::with_reply`]: the tokens a colocated decode answers
    /// with instead, ending with the model's eos token and a stop.
    pub reply: Option<Vec<u32>>,
}

/// Text the fixed token is taken from: one ordinary word-piece in any vocabulary.
const TOKEN_SOURCE: &str = " hello";

impl MockModel {
    /// Reads the model's tokenizer and metadata (not its weights) and picks
    /// the token to answer with.
    pub fn load(args: &EngineArgs) -> anyhow::Result<Self> {
        let (card, tokenizer) = crate::load::load_card(args)?;
        let encoded = tokenizer.encode(TOKEN_SOURCE, false).map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?;
        let token_id = encoded
            .get_ids()
            .iter()
            .copied()
            .find(|id| !card.eos_token_ids.contains(id))
            .ok_or_else(|| anyhow::anyhow!("{TOKEN_SOURCE:?} has no ordinary token in this vocabulary"))?;
        let token_text = tokenizer.decode(&[token_id], true).map_err(|e| anyhow::anyhow!("decoding: {e}"))?;
        Ok(Self { card, token_id, token_text, reply: None })
    }

    /// The same mock answering colocated requests with `text`, tokenized by
    /// the model's tokenizer: client tests get a fixed, known answer (a tool
    /// call, say) that a small real model would not give reliably.
    pub fn with_reply(self, args: &EngineArgs, text: &str) -> anyhow::Result<Self> {
        let (_, tokenizer) = crate::load::load_card(args)?;
        let encoded = tokenizer.encode(text, false).map_err(|e| anyhow::anyhow!("tokenizing the reply: {e}"))?;
        let mut reply = encoded.get_ids().to_vec();
        // A real worker stops on an eos token and sends it last; the router
        // leaves that token out of the text, so the mock must send one too.
        let eos = self.card.eos_token_ids.first().copied();
        reply.extend(eos);
        Ok(Self { reply: Some(reply), ..self })
    }
}

/// A KV event source with nothing cached, ever: subscribers get an empty
/// snapshot, then heartbeats.
struct NoKvEvents {
    block_size: u32,
}

impl KvEventSource for NoKvEvents {
    fn take_events(&self) -> Vec<engine::KvEvent> {
        Vec::new()
    }

    fn load(&self) -> pb::WorkerLoad {
        pb::WorkerLoad::default()
    }

    fn block_size(&self) -> u32 {
        self.block_size
    }
}

/// The `Worker` service of a mock: the real card, zero stats, an empty KV
/// event stream.
#[derive(Clone)]
pub struct MockWorker {
    card: pb::ModelCard,
    kv_events: KvEventPublisher,
}

impl MockWorker {
    /// Starts the (empty) KV event publisher, so it must be called on a tokio runtime.
    pub fn new(card: pb::ModelCard) -> Self {
        let source = NoKvEvents { block_size: card.block_size };
        let kv_events = KvEventPublisher::start(source, KvEventConfig::default());
        Self { card, kv_events }
    }

    /// The KV event publisher, to shut down before a graceful server stop
    /// (its streams never end on their own).
    pub fn kv_events(&self) -> &KvEventPublisher {
        &self.kv_events
    }
}

#[tonic::async_trait]
impl pb::worker_server::Worker for MockWorker {
    type SubscribeKvEventsStream = KvEventStream;

    async fn get_model_card(&self, _: Request<pb::GetModelCardRequest>) -> Result<Response<pb::ModelCard>, Status> {
        Ok(Response::new(self.card.clone()))
    }

    async fn get_stats(&self, _: Request<pb::GetStatsRequest>) -> Result<Response<pb::WorkerStats>, Status> {
        Ok(Response::new(pb::WorkerStats::default()))
    }

    async fn subscribe_kv_events(
        &self,
        _: Request<pb::SubscribeKvEventsRequest>,
    ) -> Result<Response<Self::SubscribeKvEventsStream>, Status> {
        Ok(Response::new(self.kv_events.subscribe()))
    }

    /// The same unit vector for every prompt ([`MOCK_EMBEDDING_DIMENSIONS`] values): the mock
    /// computes nothing, as for its tokens.
    async fn embed(&self, request: Request<pb::EmbedRequest>) -> Result<Response<pb::EmbedResponse>, Status> {
        if request.get_ref().prompt_token_ids.is_empty() {
            return Err(Status::invalid_argument("prompt_token_ids is empty"));
        }
        let value = (1.0 / MOCK_EMBEDDING_DIMENSIONS as f64).sqrt() as f32;
        let embedding = vec![value; MOCK_EMBEDDING_DIMENSIONS];
        Ok(Response::new(pb::EmbedResponse { embedding, num_cached_tokens: 0 }))
    }
}

/// Values in the mock's embeddings.
pub const MOCK_EMBEDDING_DIMENSIONS: usize = 8;

/// Choices a request asks for: `n`, where 0 (unset) means 1.
fn choices(sampling: &pb::SamplingParams) -> u32 {
    sampling.n.max(1)
}

/// The `Prefill` service of a mock: the first token at once, and a hand-off
/// that points nowhere (the mock decode worker never pulls it).
#[derive(Debug, Clone)]
pub struct MockPrefill {
    token_id: u32,
    engine_id: String,
}

impl MockPrefill {
    /// Answers with `model`'s token; `engine_id` goes in the fake hand-offs.
    pub fn new(model: &MockModel, engine_id: String) -> Self {
        Self { token_id: model.token_id, engine_id }
    }
}

#[tonic::async_trait]
impl pb::prefill_server::Prefill for MockPrefill {
    async fn prefill(&self, request: Request<pb::PrefillRequest>) -> Result<Response<pb::PrefillResponse>, Status> {
        let request = request.into_inner();
        let sampling = request.sampling.unwrap_or_default();
        // One token was all it asked for: the request ends here and nothing
        // is handed off, as a real prefill worker answers.
        let finish = if sampling.max_tokens <= 1 { pb::FinishReason::Length } else { pb::FinishReason::Unspecified };
        let remote_decode = matches!(
            request.kv_transfer_params.map(KvTransferParams::try_from),
            Some(Ok(KvTransferParams::RemoteDecode))
        );
        let kv_transfer_params = (remote_decode && finish == pb::FinishReason::Unspecified).then(|| {
            KvTransferParams::RemotePrefill(RemotePrefill {
                remote_engine_id: self.engine_id.clone(),
                remote_block_ids: Vec::new(),
                remote_host: "127.0.0.1".to_string(),
                remote_port: 0,
                tp_size: 1,
                remote_request_id: request.request_id.clone(),
                num_tokens: request.prompt_token_ids.len() as u32,
                lease_ms: 0,
                remote_ports: Vec::new(),
            })
            .into()
        });
        let choice = pb::PrefillChoice { token_id: self.token_id, logprobs: None, finish_reason: finish as i32 };
        let prompt_logprobs = certain_prompt(&request.prompt_token_ids, sampling.prompt_logprobs);
        Ok(Response::new(pb::PrefillResponse {
            request_id: request.request_id,
            first_token_id: self.token_id,
            finish_reason: finish as i32,
            kv_transfer_params,
            num_cached_tokens: 0,
            first_token_logprobs: None,
            choices: vec![choice; choices(&sampling) as usize],
            prompt_logprobs,
        }))
    }

    async fn release_kv(&self, _: Request<pb::ReleaseKvRequest>) -> Result<Response<pb::ReleaseKvResponse>, Status> {
        // Nothing was pinned; answering "released" keeps the router's logs quiet.
        Ok(Response::new(pb::ReleaseKvResponse { released: true }))
    }
}

/// The mock's prompt logprobs, with `top` of them asked: a model certain of every prompt token
/// (logprob 0, rank 1), from token 1 on.
fn certain_prompt(prompt: &[u32], top: Option<u32>) -> Vec<pb::TokenLogprobs> {
    let Some(top) = top else { return Vec::new() };
    let certain = |&token_id: &u32| pb::TokenLogprobs {
        logprob: 0.0,
        rank: 1,
        top: (top > 0).then_some(pb::TopLogprob { token_id, logprob: 0.0 }).into_iter().collect(),
    };
    prompt.iter().skip(1).map(certain).collect()
}

/// A decode answer: every chunk at once.
type ChunkStream = Pin<Box<dyn Stream<Item = Result<pb::DecodeChunk, Status>> + Send>>;

/// The `Decode` service of a mock: all of a request's tokens at once.
#[derive(Debug, Clone)]
pub struct MockDecode {
    token_id: u32,
    reply: Option<Arc<Vec<u32>>>,
}

impl MockDecode {
    /// Answers with `model`'s token (or its reply, colocated).
    pub fn new(model: &MockModel) -> Self {
        Self { token_id: model.token_id, reply: model.reply.clone().map(Arc::new) }
    }
}

#[tonic::async_trait]
impl pb::decode_server::Decode for MockDecode {
    type DecodeStream = ChunkStream;

    async fn decode(&self, request: Request<pb::DecodeRequest>) -> Result<Response<ChunkStream>, Status> {
        let request = request.into_inner();
        let sampling = request.sampling.unwrap_or_default();
        let handed_off = matches!(
            request.kv_transfer_params.map(KvTransferParams::try_from),
            Some(Ok(KvTransferParams::RemotePrefill(_)))
        );
        // After a hand-off the prefill worker already sent the first token.
        let max_tokens = sampling.max_tokens.max(1);
        // Colocated, the prompt's logprobs come first, as a real worker sends them.
        let scored = (!handed_off).then(|| certain_prompt(&request.prompt_token_ids, sampling.prompt_logprobs));
        let scored = scored
            .filter(|l| !l.is_empty())
            .map(|prompt_logprobs| Ok(pb::DecodeChunk { prompt_logprobs, ..pb::DecodeChunk::default() }));
        if let (Some(reply), false) = (self.reply.clone(), handed_off) {
            let chunks = scored.into_iter().chain(reply_chunks(reply, max_tokens, &sampling));
            return Ok(Response::new(Box::pin(futures::stream::iter(chunks))));
        }
        let count = if handed_off { max_tokens - 1 } else { max_tokens };
        let token_id = self.token_id;
        let chunks = (0..choices(&sampling)).flat_map(move |index| {
            // A choice with nothing left still gets its finishing chunk.
            (0..count.max(1)).map(move |i| {
                let last = i + 1 >= count;
                Ok(pb::DecodeChunk {
                    token_ids: if count == 0 { Vec::new() } else { vec![token_id] },
                    finish_reason: if last { pb::FinishReason::Length } else { pb::FinishReason::Unspecified } as i32,
                    index,
                    ..pb::DecodeChunk::default()
                })
            })
        });
        let chunks = scored.into_iter().chain(chunks);
        Ok(Response::new(Box::pin(futures::stream::iter(chunks))))
    }
}

/// Each choice: the reply's tokens up to `max_tokens` in one chunk, then a
/// stop (or length, when cut short).
fn reply_chunks(
    reply: Arc<Vec<u32>>,
    max_tokens: u32,
    sampling: &pb::SamplingParams,
) -> impl Iterator<Item = Result<pb::DecodeChunk, Status>> + Send + 'static {
    let cut = (max_tokens as usize).min(reply.len());
    let finish = if cut < reply.len() { pb::FinishReason::Length } else { pb::FinishReason::Stop };
    (0..choices(sampling)).map(move |index| {
        Ok(pb::DecodeChunk {
            token_ids: reply[..cut].to_vec(),
            finish_reason: finish as i32,
            index,
            ..Default::default()
        })
    })
}
