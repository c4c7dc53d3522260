//! Orchestration tests over fake worker legs.

use std::sync::Mutex;
use std::time::Duration;

use futures::future::{self, BoxFuture, FutureExt};
use futures::stream::{self, StreamExt};
use tokio::sync::mpsc;

use super::*;
use crate::backend::Sampling;
use crate::placement::{Demand, Leg, Placement, RoundRobin, Slots};

/// Fake pools: prefill answers `prefill`, decode streams `decode_chunks`.
struct FakeLegs {
    prefill_workers: usize,
    prefill: PrefillOutcome,
    decode_chunks: Vec<Result<TokenChunk, BackendError>>,
    decode_calls: Mutex<Vec<(usize, DecodeLeg)>>,
    released: mpsc::UnboundedSender<String>,
    /// Prefill workers that answer `Unavailable`.
    failing_prefill: Vec<usize>,
    prefill_calls: Mutex<Vec<usize>>,
    /// Decode answers every hand-off with a failed KV pull.
    failing_handoff: bool,
    /// Decode workers that answer `Unavailable`.
    failing_decode: Vec<usize>,
}

impl WorkerLegs for Arc<FakeLegs> {
    fn num_prefill(&self) -> usize {
        self.prefill_workers
    }
    fn num_decode(&self) -> usize {
        2
    }
    fn prefill(&self, worker: usize, _: GenerateRequest) -> BoxFuture<'static, Result<PrefillOutcome, BackendError>> {
        self.prefill_calls.lock().unwrap().push(worker);
        if self.failing_prefill.contains(&worker) {
            return future::ready(Err(BackendError::Unavailable(format!("prefill {worker} is gone")))).boxed();
        }
        future::ready(Ok(self.prefill.clone())).boxed()
    }
    fn decode(&self, worker: usize, leg: DecodeLeg) -> BoxFuture<'static, Result<TokenStream, BackendError>> {
        let handoff = leg.handoff.is_some();
        self.decode_calls.lock().unwrap().push((worker, leg));
        if self.failing_decode.contains(&worker) {
            return future::ready(Err(BackendError::Unavailable(format!("decode {worker} is gone")))).boxed();
        }
        if handoff && self.failing_handoff {
            return future::ready(Err(BackendError::KvTransfer("the prefill worker is gone".into()))).boxed();
        }
        let chunks = self.decode_chunks.clone();
        future::ready(Ok(stream::iter(chunks).boxed())).boxed()
    }
    fn release_kv(&self, _: usize, id: String) -> BoxFuture<'static, Result<bool, BackendError>> {
        let _ = self.released.send(id);
        future::ready(Ok(true)).boxed()
    }
    fn embed(&self, leg: Leg, worker: usize, _: EmbedRequest) -> BoxFuture<'static, Result<Embedded, BackendError>> {
        let failing = match leg {
            Leg::Prefill => self.failing_prefill.contains(&worker),
            Leg::Decode => self.failing_decode.contains(&worker),
        };
        if failing {
            return future::ready(Err(BackendError::Unavailable(format!("{leg:?} {worker} is gone")))).boxed();
        }
        // The vector says where it was computed.
        let pool = if leg == Leg::Prefill { 0.0 } else { 1.0 };
        future::ready(Ok(Embedded { embedding: vec![pool, worker as f32], cached_tokens: 0 })).boxed()
    }
}

/// Opaque to the router: forwarded verbatim, never parsed (a field the
/// router has never heard of must travel too).
const HANDOFF: &str = r#"{"do_remote_prefill":true,"remote_request_id":"r","remote_block_ids":[1,2],"future_field":1}"#;

fn handoff() -> KvTransferParams {
    KvTransferParams { json: HANDOFF.into() }
}

fn chunk(ids: &[u32], finish: Option<Finish>) -> Result<TokenChunk, BackendError> {
    Ok(TokenChunk {
        index: 0,
        token_ids: ids.to_vec(),
        logprobs: vec![],
        finish,
        cached_tokens: None,
        prompt_logprobs: vec![],
    })
}

fn setup(
    prefill_workers: usize,
    finish: Option<Finish>,
    decode_chunks: Vec<Result<TokenChunk, BackendError>>,
) -> (Arc<FakeLegs>, PdBackend<Arc<FakeLegs>>, mpsc::UnboundedReceiver<String>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let legs = Arc::new(FakeLegs {
        prefill_workers,
        prefill: PrefillOutcome {
            choices: vec![FirstToken { token_id: 7, logprobs: None, finish }],
            handoff: finish.is_none().then(handoff),
            num_cached_tokens: 5,
            prompt_logprobs: vec![],
        },
        decode_chunks,
        decode_calls: Mutex::new(Vec::new()),
        released: tx,
        failing_prefill: Vec::new(),
        prefill_calls: Mutex::new(Vec::new()),
        failing_handoff: false,
        failing_decode: Vec::new(),
    });
    let backend = PdBackend::new(legs.clone(), Arc::new(RoundRobin::default()));
    (legs, backend, rx)
}

fn request() -> GenerateRequest {
    GenerateRequest {
        request_id: "r".into(),
        prompt_token_ids: Arc::new(vec![1, 2, 3]),
        sampling: Sampling { temperature: 0.0, max_tokens: 8, ..Sampling::default() },
        priority: 0,
        cache_salt: None,
        first_worker: None,
        demand: GenerateRequest::demand_for(&[1, 2, 3], None, None),
    }
}

#[tokio::test]
async fn disaggregated_sends_first_token_then_decodes_with_handoff() {
    let decoded = vec![chunk(&[8], None), chunk(&[9], Some(Finish::Length))];
    let (legs, backend, mut released) = setup(1, None, decoded);
    let items: Vec<_> = backend.generate(request()).collect().await;
    let ids: Vec<_> = items.iter().map(|c| c.as_ref().unwrap().token_ids.clone()).collect();
    assert_eq!(ids, [vec![7], vec![8], vec![9]]);
    let calls = legs.decode_calls.lock().unwrap();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].1.first_token_ids, [7]);
    assert_eq!(calls[0].1.handoff, Some(handoff()), "forwarded verbatim");
    assert!(released.try_recv().is_err(), "decode owns the hand-off");
}

#[tokio::test]
async fn dropping_after_first_token_releases_the_pin_without_decoding() {
    let (legs, backend, mut released) = setup(1, None, vec![chunk(&[8], Some(Finish::Stop))]);
    let mut tokens = backend.generate(request());
    assert_eq!(tokens.next().await.unwrap().unwrap().token_ids, [7]);
    drop(tokens);
    let id = tokio::time::timeout(Duration::from_secs(5), released.recv()).await.unwrap();
    assert_eq!(id.as_deref(), Some("r"), "released under the prefill leg's request id");
    assert!(legs.decode_calls.lock().unwrap().is_empty());
}

#[tokio::test]
async fn prefill_without_kv_transfer_params_is_an_error() {
    let (released_tx, _released) = mpsc::unbounded_channel();
    let legs = Arc::new(FakeLegs {
        prefill_workers: 1,
        prefill: PrefillOutcome {
            choices: vec![FirstToken { token_id: 7, logprobs: None, finish: None }],
            handoff: None,
            num_cached_tokens: 0,
            prompt_logprobs: vec![],
        },
        decode_chunks: vec![chunk(&[8], Some(Finish::Stop))],
        decode_calls: Mutex::new(Vec::new()),
        released: released_tx,
        failing_prefill: Vec::new(),
        prefill_calls: Mutex::new(Vec::new()),
        failing_handoff: false,
        failing_decode: Vec::new(),
    });
    let backend = PdBackend::new(legs.clone(), Arc::new(RoundRobin::default()));
    let items: Vec<_> = backend.generate(request()).collect().await;
    assert!(
        matches!(&items[..], [Err(BackendError::Worker(e))] if e.contains("without kv_transfer_params")),
        "{items:?}"
    );
    assert!(legs.decode_calls.lock().unwrap().is_empty());
}

#[tokio::test]
async fn finish_on_first_token_skips_decode() {
    let (legs, backend, _released) = setup(1, Some(Finish::Stop), vec![]);
    let items: Vec<_> = backend.generate(request()).collect().await;
    assert_eq!(items.len(), 1);
    assert_eq!(items[0].as_ref().unwrap().finish, Some(Finish::Stop));
    assert!(legs.decode_calls.lock().unwrap().is_empty());
}

#[tokio::test]
async fn colocated_decodes_without_kv_params() {
    let decoded = vec![chunk(&[7, 8], None), chunk(&[9], Some(Finish::Stop))];
    let (legs, backend, _released) = setup(0, None, decoded);
    let items: Vec<_> = backend.generate(request()).collect().await;
    assert_eq!(items.len(), 2);
    let calls = legs.decode_calls.lock().unwrap();
    assert!(calls[0].1.handoff.is_none() && calls[0].1.first_token_ids.is_empty());
}

#[tokio::test]
async fn decode_stream_without_finish_is_an_error() {
    let (_legs, backend, _released) = setup(0, None, vec![chunk(&[7], None)]);
    let items: Vec<_> = backend.generate(request()).collect().await;
    assert_eq!(items.len(), 2);
    assert!(matches!(items[1], Err(BackendError::Worker(_))));
}

#[tokio::test]
async fn n_choices_start_from_the_prefill_and_decode_until_all_finish() {
    let decoded = vec![
        Ok(TokenChunk { index: 1, token_ids: vec![21], finish: Some(Finish::Length), ..TokenChunk::default() }),
        Ok(TokenChunk { token_ids: vec![], finish: Some(Finish::Stop), ..TokenChunk::default() }),
        Ok(TokenChunk { index: 2, token_ids: vec![31], finish: Some(Finish::Length), ..TokenChunk::default() }),
        // Past every choice's finish: never read.
        Err(BackendError::Aborted),
    ];
    let lp = TokenLogprobs { logprob: -0.5, top: vec![], rank: 1 };
    let firsts = vec![
        FirstToken { token_id: 7, logprobs: None, finish: Some(Finish::Stop) },
        FirstToken { token_id: 20, logprobs: Some(lp.clone()), finish: None },
        FirstToken { token_id: 30, logprobs: None, finish: None },
    ];
    let (released_tx, mut released) = mpsc::unbounded_channel();
    let legs = Arc::new(FakeLegs {
        prefill_workers: 1,
        prefill: PrefillOutcome {
            choices: firsts,
            handoff: Some(handoff()),
            num_cached_tokens: 0,
            prompt_logprobs: vec![],
        },
        decode_chunks: decoded,
        decode_calls: Mutex::new(Vec::new()),
        released: released_tx,
        failing_prefill: Vec::new(),
        prefill_calls: Mutex::new(Vec::new()),
        failing_handoff: false,
        failing_decode: Vec::new(),
    });
    let backend = PdBackend::new(legs.clone(), Arc::new(RoundRobin::default()));
    let mut req = request();
    req.sampling.n = 3;
    let items: Vec<TokenChunk> = backend.generate(req).map(Result::unwrap).collect().await;
    let got: Vec<(u32, Vec<u32>)> = items.iter().map(|c| (c.index, c.token_ids.clone())).collect();
    assert_eq!(got, [(0, vec![7]), (1, vec![20]), (2, vec![30]), (1, vec![21]), (0, vec![]), (2, vec![31])]);
    assert_eq!(items[1].logprobs, [lp]);
    let calls = legs.decode_calls.lock().unwrap();
    assert_eq!(calls[0].1.first_token_ids, [7, 20, 30]);
    assert!(released.try_recv().is_err(), "decode owns the hand-off");
}

#[tokio::test]
async fn prefill_cached_tokens_are_counted() {
    let (_legs, backend, _released) = setup(1, None, vec![chunk(&[8], Some(Finish::Stop))]);
    let metrics = crate::metrics::Metrics::new();
    let backend = backend.with_placement_counters(metrics.placement(ModelName::known("m")));
    let _: Vec<_> = backend.generate(request()).collect().await;
    let _: Vec<_> = backend.generate(request()).collect().await;
    let cached = |metrics: &crate::metrics::Metrics| {
        let text = metrics.render(&[]).unwrap();
        text.lines().find_map(|l| {
            l.strip_prefix("pdserve_router_prefix_cached_tokens_total{model=\"m\"} ")?.parse::<u64>().ok()
        })
    };
    assert_eq!(cached(&metrics), Some(10), "5 cached tokens per prefill");

    // Colocated: no prefill answer, nothing to count.
    let (_legs, backend, _released) = setup(0, None, vec![chunk(&[8], Some(Finish::Stop))]);
    let metrics = crate::metrics::Metrics::new();
    let _: Vec<_> =
        backend.with_placement_counters(metrics.placement(ModelName::known("m"))).generate(request()).collect().await;
    assert_eq!(cached(&metrics).unwrap_or(0), 0);
}

fn with_failing_prefill(prefill_workers: usize, failing: &[usize]) -> (Arc<FakeLegs>, PdBackend<Arc<FakeLegs>>) {
    let decoded = vec![chunk(&[8], Some(Finish::Stop))];
    let (legs, _, _) = setup(prefill_workers, None, decoded);
    let mut legs = Arc::into_inner(legs).expect("only setup's backend shares it");
    legs.failing_prefill = failing.to_vec();
    let legs = Arc::new(legs);
    (legs.clone(), PdBackend::new(legs, Arc::new(RoundRobin::default())))
}

#[tokio::test]
async fn a_failed_prefill_is_retried_once_on_another_worker() {
    let (legs, backend) = with_failing_prefill(3, &[0]);
    let mut req = request();
    req.first_worker = Some(0);
    let ids: Vec<_> = backend.generate(req).map(|c| c.unwrap().token_ids).collect().await;
    assert_eq!(ids, [vec![7], vec![8]], "the client sees a normal answer");
    assert_eq!(*legs.prefill_calls.lock().unwrap(), [0, 1]);
}

#[tokio::test]
async fn a_second_prefill_failure_or_no_other_worker_is_a_clean_error() {
    for (workers, failing, calls) in [(3, vec![0, 1], vec![0, 1]), (1, vec![0], vec![0])] {
        let (legs, backend) = with_failing_prefill(workers, &failing);
        let mut req = request();
        req.first_worker = Some(0);
        let items: Vec<_> = backend.generate(req).collect().await;
        assert!(matches!(items[..], [Err(BackendError::Unavailable(_))]), "{items:?}");
        assert_eq!(*legs.prefill_calls.lock().unwrap(), calls, "retried once at most");
        assert!(legs.decode_calls.lock().unwrap().is_empty());
    }
}

/// Says every request is small enough to prefill on decode worker 1.
struct PrefillOnDecode;

impl Placement for PrefillOnDecode {
    fn pick_first(&self, _: Leg, _: &Demand, _: &Slots<'_>) -> crate::placement::Pick {
        crate::placement::Pick { worker: 0, cached_blocks: 0 }
    }
    fn pick_decode(&self, _: &Demand, _: &[usize]) -> crate::placement::DecodePick {
        crate::placement::DecodePick { worker: 1, prefill_locally: true }
    }
    fn pick_retry(&self, _: Leg, _: &Demand, _: usize, _: usize) -> Option<usize> {
        None
    }
}

#[tokio::test]
async fn a_small_uncached_remainder_skips_the_hand_off() {
    let (legs, _, _) = setup(2, None, vec![chunk(&[7, 8], Some(Finish::Stop))]);
    let backend = PdBackend::new(legs.clone(), Arc::new(PrefillOnDecode));
    let ids: Vec<_> = backend.generate(request()).map(|c| c.unwrap().token_ids).collect().await;
    assert_eq!(ids, [vec![7, 8]]);
    assert!(legs.prefill_calls.lock().unwrap().is_empty(), "no prefill worker was called");
    let calls = legs.decode_calls.lock().unwrap();
    assert_eq!(calls[0].0, 1);
    assert!(calls[0].1.handoff.is_none() && calls[0].1.first_token_ids.is_empty());
}

fn with_failing_handoff(policy: KvFailurePolicy) -> (Arc<FakeLegs>, PdBackend<Arc<FakeLegs>>) {
    let (legs, _, _) = setup(1, None, vec![chunk(&[8], None), chunk(&[9], Some(Finish::Length))]);
    let mut legs = Arc::into_inner(legs).unwrap();
    legs.failing_handoff = true;
    let legs = Arc::new(legs);
    let backend = PdBackend::new(legs.clone(), Arc::new(RoundRobin::default())).with_kv_failure_policy(policy);
    (legs, backend)
}

#[tokio::test]
async fn a_failed_hand_off_is_recomputed_on_the_decode_worker() {
    let (legs, backend) = with_failing_handoff(KvFailurePolicy::Recompute);
    let items: Vec<_> = backend.generate(request()).collect().await;
    let ids: Vec<_> = items.iter().map(|c| c.as_ref().unwrap().token_ids.clone()).collect();
    assert_eq!(ids, [vec![7], vec![8], vec![9]], "the client sees one whole answer");
    let calls = legs.decode_calls.lock().unwrap();
    assert_eq!(calls.len(), 2);
    let (worker, leg) = &calls[1];
    assert_eq!(*worker, calls[0].0, "the same decode worker: it is fine, its KV source was not");
    assert_eq!(*leg.request.prompt_token_ids, [1, 2, 3, 7], "the streamed first token ends the prompt");
    assert_eq!((leg.handoff.as_ref(), leg.first_token_ids.len()), (None, 0));
    assert_eq!(leg.request.sampling.max_tokens, 7, "one token was already generated");
    assert!(leg.request.sampling.constraint_prefix.is_empty(), "no constraint, nothing to resume");
}

#[tokio::test]
async fn a_recomputed_hand_off_resumes_the_constraint_after_the_first_token() {
    let (legs, backend) = with_failing_handoff(KvFailurePolicy::Recompute);
    let mut constrained = request();
    constrained.sampling.constraint = Some(Arc::new(constraint::Constraint::Regex("[0-9]+".into())));
    let items: Vec<_> = backend.generate(constrained).collect().await;
    assert!(items.iter().all(Result::is_ok));
    let calls = legs.decode_calls.lock().unwrap();
    let sampling = &calls[1].1.request.sampling;
    assert_eq!(*calls[1].1.request.prompt_token_ids, [1, 2, 3, 7]);
    assert_eq!(sampling.constraint_prefix, [7], "the matcher takes the first token before sampling");
}

#[tokio::test]
async fn a_recomputed_hand_off_does_not_score_the_prompt_again() {
    let (legs, backend) = with_failing_handoff(KvFailurePolicy::Recompute);
    let mut scored = request();
    scored.sampling.prompt_logprobs = Some(1);
    let items: Vec<_> = backend.generate(scored).collect().await;
    assert!(items.iter().all(Result::is_ok));
    let calls = legs.decode_calls.lock().unwrap();
    assert_eq!(calls[0].1.request.sampling.prompt_logprobs, Some(1));
    assert_eq!(calls[1].1.request.sampling.prompt_logprobs, None, "the prefill worker scored it");
}

#[tokio::test]
async fn a_failed_hand_off_fails_the_stream_when_so_configured() {
    let (legs, backend) = with_failing_handoff(KvFailurePolicy::Fail);
    let items: Vec<_> = backend.generate(request()).collect().await;
    assert_eq!(items[0].as_ref().unwrap().token_ids, [7]);
    assert!(matches!(items[1], Err(BackendError::KvTransfer(_))), "{:?}", items[1]);
    assert_eq!(items.len(), 2);
    assert_eq!(legs.decode_calls.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn colocated_retries_an_unreachable_decode_worker_on_another() {
    let (legs, _, _) = setup(0, None, vec![chunk(&[8], Some(Finish::Stop))]);
    let mut legs = Arc::into_inner(legs).unwrap();
    legs.failing_decode = vec![0];
    let legs = Arc::new(legs);
    let backend = PdBackend::new(legs.clone(), Arc::new(RoundRobin::default()));
    let items: Vec<_> = backend.generate(GenerateRequest { first_worker: Some(0), ..request() }).collect().await;
    let ids: Vec<_> = items.iter().map(|c| c.as_ref().unwrap().token_ids.clone()).collect();
    assert_eq!(ids, [vec![8]], "the client sees the answer of the second worker only");
    let calls: Vec<usize> = legs.decode_calls.lock().unwrap().iter().map(|(w, _)| *w).collect();
    assert_eq!(calls, [0, 1]);

    // Both gone: one clean error, no third try.
    let (legs, _, _) = setup(0, None, vec![chunk(&[8], Some(Finish::Stop))]);
    let mut legs = Arc::into_inner(legs).unwrap();
    legs.failing_decode = vec![0, 1];
    let legs = Arc::new(legs);
    let backend = PdBackend::new(legs.clone(), Arc::new(RoundRobin::default()));
    let items: Vec<_> = backend.generate(GenerateRequest { first_worker: Some(0), ..request() }).collect().await;
    assert!(matches!(items.as_slice(), [Err(BackendError::Unavailable(_))]), "{items:?}");
    assert_eq!(legs.decode_calls.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn an_unreachable_decode_worker_hands_off_to_another() {
    let decoded = vec![chunk(&[8], None), chunk(&[9], Some(Finish::Length))];
    let (legs, _, mut released) = setup(1, None, decoded);
    let mut legs = Arc::into_inner(legs).unwrap();
    legs.failing_decode = vec![0];
    let legs = Arc::new(legs);
    let backend = PdBackend::new(legs.clone(), Arc::new(RoundRobin::default()));
    let items: Vec<_> = backend.generate(request()).collect().await;
    let ids: Vec<_> = items.iter().map(|c| c.as_ref().unwrap().token_ids.clone()).collect();
    assert_eq!(ids, [vec![7], vec![8], vec![9]], "the client sees one whole answer");
    let calls = legs.decode_calls.lock().unwrap();
    assert_eq!(calls.iter().map(|(w, _)| *w).collect::<Vec<_>>(), [0, 1]);
    assert_eq!(calls[1].1.handoff, Some(handoff()), "the same pinned KV, pulled by the other worker");
    assert!(released.try_recv().is_err(), "the second decode worker owns the hand-off");
}

fn embed_request(first_worker: Option<usize>) -> EmbedRequest {
    EmbedRequest {
        request_id: "e".into(),
        prompt_token_ids: Arc::new(vec![1, 2, 3]),
        pooling: crate::backend::Pooling::Last,
        normalize: true,
        priority: 0,
        cache_salt: None,
        first_worker,
        demand: GenerateRequest::demand_for(&[1, 2, 3], None, None),
    }
}

#[tokio::test]
async fn an_embedding_runs_on_the_first_legs_pool_on_the_admitted_worker() {
    // Disaggregated: on the prefill worker admission picked; colocated: on a decode worker.
    let (_, disaggregated, _) = setup(2, None, vec![]);
    let embedded = disaggregated.embed(embed_request(Some(1))).await.unwrap();
    assert_eq!(embedded.embedding, [0.0, 1.0]);
    let (_, colocated, _) = setup(0, None, vec![]);
    let embedded = colocated.embed(embed_request(Some(1))).await.unwrap();
    assert_eq!(embedded.embedding, [1.0, 1.0]);
}

#[tokio::test]
async fn an_unreachable_embedding_worker_is_retried_once_on_another() {
    let (_, backend) = with_failing_prefill(2, &[0]);
    let embedded = backend.embed(embed_request(Some(0))).await.unwrap();
    assert_eq!(embedded.embedding, [0.0, 1.0], "retried on prefill worker 1");
    let (_, backend) = with_failing_prefill(2, &[0, 1]);
    let error = backend.embed(embed_request(Some(0))).await.unwrap_err();
    assert!(matches!(error, BackendError::Unavailable(_)), "{error:?}");
}
