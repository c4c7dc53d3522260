//! Prefill -> decode orchestration behind the [`Backend`] trait.
//!
//! The generate step only sees [`Backend::generate`], which turns a validated
//! request into a stream of generated token ids. [`PdBackend`] implements it
//! over the three worker calls of [`WorkerLegs`] ([`grpc`], fakes in tests):
//!
//! ```text
//! disaggregated: Prefill(remote_decode) ──first token──► client (at once)
//!                 └─ remote_prefill ──► Decode(first token, remote_prefill) ──tokens──► client
//! colocated:     Decode(no kv params) ──all tokens, first included──► client
//! ```
//!
//! The token stream is lazy: the decode call is made only when the consumer
//! asks for the token after the first. A consumer that stops after the first
//! token (stop string, client gone) drops the stream while the prefill
//! worker's blocks are still pinned; the `KvPin` guard then releases them
//! at once instead of waiting for the worker's timeout. Dropping the stream
//! during decode drops the gRPC stream, which cancels the work on the worker.

pub mod grpc;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use futures::future::{BoxFuture, FutureExt};
use futures::stream::{self, StreamExt};
use prometheus::IntCounterVec;
use proto::worker::KvTransferParams;

use crate::admission::{hold, Chooser};
use crate::backend::{
    Backend, BackendError, EmbedRequest, Embedded, Finish, GenerateRequest, TokenChunk, TokenLogprobs, TokenStream,
};
use crate::fleet::model::ModelName;
use crate::placement::{Demand, Leg, Placement, Slots};

/// What the prefill worker answered.
#[derive(Debug, Clone)]
pub struct PrefillOutcome {
    /// Each choice's first token, in choice order (`n` of them).
    pub choices: Vec<FirstToken>,
    /// Where the pinned KV waits, for the decode worker: the prefill worker's
    /// `kv_transfer_params`, opaque here and forwarded verbatim; `None` when
    /// every choice ended on its first token. The blocks are pinned under the
    /// prefill leg's `request_id`.
    pub handoff: Option<KvTransferParams>,
    /// Prompt tokens the worker served from its prefix cache.
    pub num_cached_tokens: u32,
    /// With `Sampling::prompt_logprobs`: prompt tokens 1.. with their logprobs.
    pub prompt_logprobs: Vec<TokenLogprobs>,
}

/// One choice's first token, sampled by the prefill worker.
#[derive(Debug, Clone, PartialEq)]
pub struct FirstToken {
    /// The token.
    pub token_id: u32,
    /// Its logprobs, when asked: the decode worker does not send them again.
    pub logprobs: Option<TokenLogprobs>,
    /// Set when it already ends the choice.
    pub finish: Option<Finish>,
}

/// A decode call: remote KV (`handoff` and `first_token_ids`) or local prefill.
#[derive(Debug, Clone)]
pub struct DecodeLeg {
    /// The request.
    pub request: GenerateRequest,
    /// The prefill worker's `kv_transfer_params`, verbatim; `None` when colocated.
    pub handoff: Option<KvTransferParams>,
    /// The token the prefill worker sampled for each choice; empty when colocated.
    pub first_token_ids: Vec<u32>,
}

/// The worker calls [`PdBackend`] is built from. Worker indices are in
/// `0..num_prefill()` / `0..num_decode()`.
pub trait WorkerLegs: Send + Sync + 'static {
    /// Prefill workers; 0 means colocated serving.
    fn num_prefill(&self) -> usize;
    /// Decode workers; at least 1.
    fn num_decode(&self) -> usize;
    /// `Prefill.Prefill` with `remote_decode`.
    fn prefill(
        &self,
        worker: usize,
        request: GenerateRequest,
    ) -> BoxFuture<'static, Result<PrefillOutcome, BackendError>>;
    /// `Decode.Decode`, opened: the stream of its chunks.
    fn decode(&self, worker: usize, leg: DecodeLeg) -> BoxFuture<'static, Result<TokenStream, BackendError>>;
    /// `Prefill.ReleaseKv`: frees blocks no decode worker will pull.
    fn release_kv(&self, worker: usize, remote_request_id: String) -> BoxFuture<'static, Result<bool, BackendError>>;
    /// `Worker.Embed` on worker `worker` of the `leg` pool.
    fn embed(
        &self,
        leg: Leg,
        worker: usize,
        request: EmbedRequest,
    ) -> BoxFuture<'static, Result<Embedded, BackendError>>;
}

/// What placement decided for one model, counted: where requests went, and
/// how much of their prompts the chosen worker had cached.
#[derive(Debug, Clone)]
pub struct PlacementCounters {
    /// The `model` label of every count.
    pub model: ModelName,
    /// Prompt tokens the prefill workers served from their prefix cache, by `model`.
    pub cached_tokens: IntCounterVec,
    /// Leading prompt blocks cached on the chosen first-leg worker, by `model`.
    pub hit_blocks: IntCounterVec,
    /// Full prompt blocks, by `model`.
    pub total_blocks: IntCounterVec,
    /// Legs placed, by `model`, `pool` (`prefill` / `decode`) and `worker` index.
    pub placements: IntCounterVec,
}

impl PlacementCounters {
    fn placed(&self, leg: Leg, worker: usize) {
        let pool = match leg {
            Leg::Prefill => "prefill",
            Leg::Decode => "decode",
        };
        self.placements.with_label_values(&[self.model.label(), pool, &worker.to_string()]).inc();
    }

    fn first_leg(&self, cached_blocks: usize, total_blocks: usize) {
        let model = [self.model.label()];
        self.hit_blocks.with_label_values(&model).inc_by(cached_blocks as u64);
        self.total_blocks.with_label_values(&model).inc_by(total_blocks as u64);
    }

    fn cached_tokens(&self, tokens: u32) {
        self.cached_tokens.with_label_values(&[self.model.label()]).inc_by(tokens.into());
    }
}

/// What the client sees when the KV hand-off fails after the first token
/// went out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum KvFailurePolicy {
    /// The decode worker computes the prompt (and the first token) itself
    /// and the answer goes on; only for `n` = 1, whose first token is one
    /// more prompt token. The default: the client sees a complete answer.
    #[default]
    Recompute,
    /// The stream ends with `finish_reason: "error"`.
    Fail,
}

/// [`Backend`] over prefill and decode pools.
pub struct PdBackend<L> {
    legs: Arc<L>,
    placement: Arc<dyn Placement>,
    /// This router's open decode streams per decode worker, for placement.
    decode_in_flight: Arc<Vec<AtomicUsize>>,
    counters: Option<PlacementCounters>,
    on_kv_failure: KvFailurePolicy,
}

impl<L: WorkerLegs> PdBackend<L> {
    /// A backend that places requests with `placement`.
    pub fn new(legs: L, placement: Arc<dyn Placement>) -> Self {
        let decode_in_flight = Arc::new((0..legs.num_decode()).map(|_| AtomicUsize::new(0)).collect());
        Self {
            legs: Arc::new(legs),
            placement,
            decode_in_flight,
            counters: None,
            on_kv_failure: KvFailurePolicy::default(),
        }
    }

    /// The same backend answering a failed KV hand-off by `policy`.
    pub fn with_kv_failure_policy(self, policy: KvFailurePolicy) -> Self {
        Self { on_kv_failure: policy, ..self }
    }

    /// The same backend counting its placements into `counters`, and each
    /// prefill's prefix-cached prompt tokens (only the prefill answer reports
    /// them, so the colocated path adds none).
    pub fn with_placement_counters(self, counters: PlacementCounters) -> Self {
        Self { counters: Some(counters), ..self }
    }

    fn count_placement(&self, leg: Leg, worker: usize) {
        if let Some(counters) = &self.counters {
            counters.placed(leg, worker);
        }
    }

    /// Admission's pick of the first leg's worker for a prompt of `demand`, counted.
    fn chooser(&self, demand: Arc<Demand>) -> Chooser {
        let placement = self.placement.clone();
        let leg = self.first_leg();
        let counters = self.counters.clone();
        Box::new(move |in_flight: &[usize], cap: usize| {
            let pick = placement.pick_first(leg, &demand, &Slots { in_flight, cap });
            if let Some(counters) = counters {
                counters.first_leg(pick.cached_blocks, demand.hashes.len());
                counters.placed(leg, pick.worker);
            }
            pick.worker
        })
    }

    /// The first leg's pool.
    fn first_leg(&self) -> Leg {
        if self.legs.num_prefill() == 0 {
            Leg::Decode
        } else {
            Leg::Prefill
        }
    }

    /// Decode on `worker` only, prefilling there; counted in `decode_in_flight`.
    /// A worker found unreachable before anything was sent is retried once
    /// on another decode worker: the client cannot tell.
    fn colocated(&self, worker: usize, request: GenerateRequest) -> TokenStream {
        let n = request.sampling.n.max(1);
        let demand = request.demand.clone();
        let leg = DecodeLeg { request, handoff: None, first_token_ids: Vec::new() };
        let (legs, placement, in_flight) = (self.legs.clone(), self.placement.clone(), self.decode_in_flight.clone());
        let opened = async move {
            let slot = DecodeSlot::take(&in_flight, worker);
            let error = match legs.decode(worker, leg.clone()).await {
                Ok(tokens) => return Ok((tokens, slot)),
                Err(e @ BackendError::Unavailable(_)) => e,
                Err(e) => return Err(e),
            };
            placement.mark_down(Leg::Decode, worker);
            let Some(retry) = placement.pick_retry(Leg::Decode, &demand, worker, legs.num_decode()) else {
                return Err(error);
            };
            tracing::warn!(failed = worker, retry, %error, "decode worker unreachable; retrying on another");
            let slot = DecodeSlot::take(&in_flight, retry);
            match legs.decode(retry, leg).await {
                Ok(tokens) => Ok((tokens, slot)),
                Err(e) => {
                    if matches!(e, BackendError::Unavailable(_)) {
                        placement.mark_down(Leg::Decode, retry);
                    }
                    Err(e)
                }
            }
        };
        stream::once(opened)
            .flat_map(move |opened| match opened {
                Ok((tokens, slot)) => hold(until_finish(tokens, n), slot),
                Err(e) => stream::iter([Err(e)]).boxed(),
            })
            .boxed()
    }
}

impl<L: WorkerLegs> Backend for PdBackend<L> {
    fn block_size(&self) -> Option<u32> {
        self.placement.block_size()
    }

    fn first_leg_chooser(&self, request: &GenerateRequest) -> Option<Chooser> {
        Some(self.chooser(request.demand.clone()))
    }

    fn embed_chooser(&self, request: &EmbedRequest) -> Option<Chooser> {
        Some(self.chooser(request.demand.clone()))
    }

    /// On the first leg's pool, where admission held its slot: prefill workers, or the decode
    /// workers when colocated. A worker found unreachable is retried once on another.
    fn embed(&self, request: EmbedRequest) -> BoxFuture<'static, Result<Embedded, BackendError>> {
        let leg = self.first_leg();
        let num = match leg {
            Leg::Prefill => self.legs.num_prefill(),
            Leg::Decode => self.legs.num_decode(),
        };
        let worker = request.first_worker.filter(|&w| w < num).unwrap_or_else(|| {
            let idle = vec![0; num];
            self.placement.pick_first(leg, &request.demand, &Slots { in_flight: &idle, cap: usize::MAX }).worker
        });
        let (legs, placement) = (self.legs.clone(), self.placement.clone());
        async move {
            let error = match legs.embed(leg, worker, request.clone()).await {
                Err(e @ BackendError::Unavailable(_)) => e,
                answer => return answer,
            };
            placement.mark_down(leg, worker);
            let Some(retry) = placement.pick_retry(leg, &request.demand, worker, num) else {
                return Err(error);
            };
            tracing::warn!(failed = worker, retry, %error, "worker unreachable for an embedding; retrying on another");
            let answer = legs.embed(leg, retry, request).await;
            if matches!(answer, Err(BackendError::Unavailable(_))) {
                placement.mark_down(leg, retry);
            }
            answer
        }
        .boxed()
    }

    fn generate(&self, request: GenerateRequest) -> TokenStream {
        let n = request.sampling.n.max(1);
        let demand = request.demand.clone();
        // Admission holds a slot on the first leg's worker: use that one.
        let first_worker = |num: usize| {
            request.first_worker.filter(|&w| w < num).unwrap_or_else(|| {
                let idle = vec![0; num];
                self.placement
                    .pick_first(self.first_leg(), &demand, &Slots { in_flight: &idle, cap: usize::MAX })
                    .worker
            })
        };
        if self.legs.num_prefill() == 0 {
            let worker = first_worker(self.legs.num_decode());
            return self.colocated(worker, request);
        }
        let prefill_worker = first_worker(self.legs.num_prefill());
        let in_flight: Vec<usize> = self.decode_in_flight.iter().map(|c| c.load(Ordering::Relaxed)).collect();
        let decode = self.placement.pick_decode(&demand, &in_flight);
        self.count_placement(Leg::Decode, decode.worker);
        if decode.prefill_locally {
            tracing::debug!(
                decode_worker = decode.worker,
                "uncached part below the hand-off threshold: prefilling on decode"
            );
            return self.colocated(decode.worker, request);
        }
        let run = PdRun {
            legs: self.legs.clone(),
            placement: self.placement.clone(),
            demand,
            prefill_worker,
            decode_worker: decode.worker,
            decode_slot: DecodeSlot::take(&self.decode_in_flight, decode.worker),
            n,
            counters: self.counters.clone(),
            on_kv_failure: self.on_kv_failure,
        };
        stream::unfold((run, PdState::Prefill(request)), |(run, state)| async move {
            let (items, next) = run.step(state).await?;
            Some((stream::iter(items), (run, next)))
        })
        .flatten()
        .boxed()
    }
}

/// Where a disaggregated request stands.
enum PdState<L: WorkerLegs> {
    /// Nothing sent yet.
    Prefill(GenerateRequest),
    /// The first token went out; the KV is pinned on the prefill worker.
    Handoff { leg: DecodeLeg, pin: KvPin<L> },
    /// Decode is streaming.
    Decoding(TokenStream),
    /// Over.
    Done,
}

struct PdRun<L> {
    legs: Arc<L>,
    placement: Arc<dyn Placement>,
    demand: Arc<Demand>,
    prefill_worker: usize,
    decode_worker: usize,
    /// Counts this request on its decode worker until the run is dropped.
    decode_slot: Arc<DecodeSlot>,
    /// Choices of the request.
    n: u32,
    counters: Option<PlacementCounters>,
    on_kv_failure: KvFailurePolicy,
}

/// What to yield (the prefill yields every choice's first token at once), and where we are then.
type Step<L> = (Vec<Result<TokenChunk, BackendError>>, PdState<L>);

impl<L: WorkerLegs> PdRun<L> {
    /// Makes the next call and returns what to yield and where we are then.
    async fn step(&self, state: PdState<L>) -> Option<Step<L>> {
        match state {
            PdState::Prefill(request) => Some(self.prefill(request).await),
            PdState::Handoff { leg, pin } => {
                let recompute =
                    (self.on_kv_failure == KvFailurePolicy::Recompute && self.n == 1).then(|| recompute_leg(&leg));
                let (worker, opened) = self.open_decode(leg).await;
                let opened = match opened {
                    Ok(tokens) => {
                        // The decode worker owns the hand-off now: it pulls, then releases.
                        pin.disarm();
                        Ok(tokens)
                    }
                    // `pin` drops armed after this, releasing the blocks.
                    Err(BackendError::KvTransfer(error)) if recompute.is_some() => {
                        tracing::warn!(%error, "KV hand-off failed; the decode worker recomputes the prompt");
                        self.legs.decode(worker, recompute.expect("checked above")).await
                    }
                    Err(e) => Err(e),
                };
                Some(self.decoding(worker, opened))
            }
            PdState::Decoding(mut tokens) => {
                let item = tokens.next().await?;
                Some((vec![item], PdState::Decoding(tokens)))
            }
            PdState::Done => None,
        }
    }

    /// Opens the decode leg on the chosen decode worker or, when that one
    /// cannot be reached, once on another: the KV is still pinned on the
    /// prefill worker, so any decode worker can pull it, and the client has
    /// only seen the first token. Returns the worker that answered last.
    async fn open_decode(&self, leg: DecodeLeg) -> (usize, Result<TokenStream, BackendError>) {
        let first = self.decode_worker;
        let error = match self.legs.decode(first, leg.clone()).await {
            Err(e @ BackendError::Unavailable(_)) => e,
            opened => return (first, opened),
        };
        self.placement.mark_down(Leg::Decode, first);
        let Some(retry) = self.placement.pick_retry(Leg::Decode, &self.demand, first, self.legs.num_decode()) else {
            return (first, Err(error));
        };
        tracing::warn!(failed = first, retry, %error, "decode worker unreachable; handing off to another");
        let slot = DecodeSlot::take(&self.decode_slot.counters, retry);
        let opened = self.legs.decode(retry, leg).await.map(|tokens| hold(tokens, slot));
        (retry, opened)
    }

    /// Where an opened decode leg leads: its tokens, or its error, marking
    /// an unreachable decode `worker` down.
    fn decoding(&self, worker: usize, opened: Result<TokenStream, BackendError>) -> Step<L> {
        match opened {
            Ok(tokens) => (Vec::new(), PdState::Decoding(until_finish(tokens, self.n))),
            Err(e) => {
                if matches!(e, BackendError::Unavailable(_)) {
                    self.placement.mark_down(Leg::Decode, worker);
                }
                (vec![Err(e)], PdState::Done)
            }
        }
    }

    /// The prefill call, retried once on another prefill worker when the
    /// first fails: nothing reached the client yet, so a retry is invisible.
    async fn call_prefill(&self, request: &GenerateRequest) -> Result<(usize, PrefillOutcome), BackendError> {
        let first = self.prefill_worker;
        let error = match self.legs.prefill(first, request.clone()).await {
            Ok(outcome) => return Ok((first, outcome)),
            Err(e) => e,
        };
        if matches!(error, BackendError::Unavailable(_)) {
            self.placement.mark_down(Leg::Prefill, first);
        }
        let Some(retry) = self.placement.pick_retry(Leg::Prefill, &self.demand, first, self.legs.num_prefill()) else {
            return Err(error);
        };
        tracing::warn!(failed = first, retry, %error, "prefill failed; retrying on another prefill worker");
        let outcome = self.legs.prefill(retry, request.clone()).await.inspect_err(|e| {
            if matches!(e, BackendError::Unavailable(_)) {
                self.placement.mark_down(Leg::Prefill, retry);
            }
        })?;
        Ok((retry, outcome))
    }

    async fn prefill(&self, request: GenerateRequest) -> Step<L> {
        let (prefill_worker, outcome) = match self.call_prefill(&request).await {
            Ok(answered) => answered,
            Err(e) => return (vec![Err(e)], PdState::Done),
        };
        if let Some(counters) = &self.counters {
            counters.cached_tokens(outcome.num_cached_tokens);
        }
        if outcome.choices.len() != self.n as usize {
            let error = format!("prefill answered {} choices for n = {}", outcome.choices.len(), self.n);
            return (vec![Err(BackendError::Worker(error))], PdState::Done);
        }
        // The prefill worker pins under the request id it was sent: the key to release.
        let pin = outcome.handoff.as_ref().map(|_| KvPin {
            legs: self.legs.clone(),
            worker: prefill_worker,
            remote_request_id: Some(request.request_id.clone()),
        });
        let all_finished = outcome.choices.iter().all(|c| c.finish.is_some());
        let cached_tokens = Some(outcome.num_cached_tokens);
        // The request's prompt logprobs ride with choice 0's first token.
        let mut prompt_logprobs = Some(outcome.prompt_logprobs);
        let first_token_ids: Vec<u32> = outcome.choices.iter().map(|c| c.token_id).collect();
        let firsts: Vec<Result<TokenChunk, BackendError>> = outcome
            .choices
            .into_iter()
            .zip(0..)
            .map(|(c, index)| {
                Ok(TokenChunk {
                    index,
                    token_ids: vec![c.token_id],
                    logprobs: c.logprobs.into_iter().collect(),
                    finish: c.finish,
                    cached_tokens,
                    prompt_logprobs: prompt_logprobs.take().unwrap_or_default(),
                })
            })
            .collect();
        match (all_finished, pin, outcome.handoff) {
            // Every choice finished on its first token; a pin, if any, is released on drop.
            (true, _, _) => (firsts, PdState::Done),
            (false, Some(pin), Some(handoff)) => {
                let leg = DecodeLeg { request, handoff: Some(handoff), first_token_ids };
                (firsts, PdState::Handoff { leg, pin })
            }
            _ => (vec![Err(BackendError::Worker("prefill answered without kv_transfer_params".into()))], PdState::Done),
        }
    }
}

/// The colocated leg that replaces a failed hand-off of a one-choice
/// request: the first token, already streamed, becomes the prompt's last, and
/// the decode worker generates the rest.
fn recompute_leg(leg: &DecodeLeg) -> DecodeLeg {
    let mut request = leg.request.clone();
    let mut prompt = request.prompt_token_ids.as_ref().clone();
    prompt.extend(&leg.first_token_ids);
    request.prompt_token_ids = Arc::new(prompt);
    let sampling = &mut request.sampling;
    sampling.max_tokens = sampling.max_tokens.saturating_sub(1).max(1);
    sampling.min_tokens = sampling.min_tokens.saturating_sub(1);
    // The first token was sampled under the constraint: the matcher resumes after it.
    if sampling.constraint.is_some() {
        sampling.constraint_prefix.extend(&leg.first_token_ids);
    }
    // The prefill worker already scored the prompt; the recomputed one needs no logits rows.
    sampling.prompt_logprobs = None;
    DecodeLeg { request, handoff: None, first_token_ids: Vec::new() }
}

/// Blocks pinned on a prefill worker. Dropped armed, it asks the worker to
/// release them in a background task (Drop cannot await).
struct KvPin<L: WorkerLegs> {
    legs: Arc<L>,
    worker: usize,
    remote_request_id: Option<String>,
}

impl<L: WorkerLegs> KvPin<L> {
    /// The blocks are someone else's to release now.
    fn disarm(mut self) {
        self.remote_request_id = None;
    }
}

impl<L: WorkerLegs> Drop for KvPin<L> {
    fn drop(&mut self) {
        let Some(id) = self.remote_request_id.take() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return; // Shutting down: the worker's pin timeout frees the blocks.
        };
        let release = self.legs.release_kv(self.worker, id.clone());
        runtime.spawn(async move {
            match release.await {
                Ok(released) => {
                    tracing::debug!(remote_request_id = %id, released, "released pinned KV")
                }
                Err(e) => tracing::warn!(remote_request_id = %id, error = %e, "ReleaseKv failed"),
            }
        });
    }
}

/// One request counted on a decode worker, uncounted when dropped.
#[derive(Debug)]
struct DecodeSlot {
    counters: Arc<Vec<AtomicUsize>>,
    worker: usize,
}

impl DecodeSlot {
    fn take(counters: &Arc<Vec<AtomicUsize>>, worker: usize) -> Arc<Self> {
        if let Some(counter) = counters.get(worker) {
            counter.fetch_add(1, Ordering::Relaxed);
        }
        Arc::new(Self { counters: counters.clone(), worker })
    }
}

impl Drop for DecodeSlot {
    fn drop(&mut self) {
        if let Some(counter) = self.counters.get(self.worker) {
            counter.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Ends `tokens` once each of its `n` choices sent its finish chunk, or at
/// the first error, and turns an end before that into an error.
fn until_finish(tokens: TokenStream, n: u32) -> TokenStream {
    let finished = vec![false; n.max(1) as usize];
    stream::unfold(Some((tokens, finished)), |state| async move {
        let (mut tokens, mut finished) = state?;
        let item = match tokens.next().await {
            Some(item) => item,
            None => Err(BackendError::Worker("decode stream ended without a finish reason".into())),
        };
        let item = item.and_then(|chunk| match finished.get_mut(chunk.index as usize) {
            Some(done) => {
                *done |= chunk.finish.is_some();
                Ok(chunk)
            }
            None => Err(BackendError::Worker(format!("decode sent choice {} of {}", chunk.index, finished.len()))),
        });
        let over = item.is_err() || finished.iter().all(|&done| done);
        Some((item, (!over).then_some((tokens, finished))))
    })
    .boxed()
}

#[cfg(test)]
mod tests;
