//! The generate step, between a prepared request and its answer: the
//! caller's limits, the admission queue, the backend (prefill -> decode), and
//! the stream decorators that time, detokenize, meter and count what comes
//! back. No HTTP here; `crate::http::generate` adapts the result to JSON or
//! server-sent events.

use std::sync::Arc;
use std::time::Instant;

use futures::stream::BoxStream;

use crate::admission::{hold, AdmissionError};
use crate::backend::{BackendError, GenerateRequest};
use beam::beam_search;

mod beam;
mod embed;

use crate::fleet::model::Model;
use crate::fleet::served::ServedModel;
use crate::metrics::Metrics;
use crate::prepare::validate::ValidRequest;
use crate::respond::stream::{deltas, Delta, Output};
use crate::tenancy::limits::{LimitError, Running};
use crate::tenancy::usage::{meter, UsageRecord, UsageSink};
use crate::tenancy::Caller;
pub use embed::{embed, EmbedError};

/// One prepared request (a generation's, or [`embed`]'s) and who asked for it.
pub struct Job<V = ValidRequest> {
    /// The request id: the client's, or a fresh one.
    pub request_id: String,
    /// When the request arrived, the origin of its time to first token.
    pub arrival: Instant,
    /// Who sent it; the request already runs under its tenant's cache salt.
    pub caller: Caller,
    /// The model it runs on, with its workers and queue.
    pub served: Arc<ServedModel>,
    /// That model's card.
    pub model: Arc<Model>,
    /// The validated request.
    pub valid: V,
}

/// A generation under way.
pub struct Generation {
    /// Each choice's text deltas, interleaved, until every choice finished
    /// or the backend failed. Dropping it cancels the generation and frees
    /// its admission slot.
    pub deltas: BoxStream<'static, Result<Delta, BackendError>>,
    /// The prompt's token ids.
    pub prompt: Arc<Vec<u32>>,
}

/// Why a generation did not start.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    /// The caller's key refused it (rate, tokens, concurrency, prompt size).
    #[error(transparent)]
    Limit(#[from] LimitError),
    /// The admission queue refused it.
    #[error(transparent)]
    Admission(#[from] AdmissionError),
}

/// Starts `job`: checks the caller's limits, waits for its turn in the
/// model's admission queue, and starts the backend. Returns once the request
/// is admitted, before any token, so a refusal is a plain error; a caller
/// that stops waiting drops this future and its place in line.
pub async fn generate(metrics: &Metrics, usage: UsageSink, job: Job) -> Result<Generation, GenerateError> {
    let Job { request_id, arrival, caller, served, model, valid } = job;
    let running = caller_limits(metrics, &caller, &valid)?;
    let prompt = Arc::new(valid.prompt_token_ids);
    // As vLLM: an end on the model's eos has no `stop_reason`, even when it is a stop token id.
    let stop_reasons: Vec<u32> =
        valid.sampling.stop_token_ids.iter().copied().filter(|id| !model.eos_token_ids.contains(id)).collect();
    // Each choice has its own detokenizer, stop strings and max_tokens count.
    let mut outputs: Vec<Output> = (0..valid.sampling.n.max(1))
        .map(|_| {
            Output::new(model.decoder.clone(), valid.stops.clone(), valid.sampling.max_tokens)
                .include_stop_str(valid.include_stop_str_in_output)
                .skip_special_tokens(valid.skip_special_tokens)
                .stop_token_ids(stop_reasons.clone())
                .tokens_as_ids(valid.return_tokens_as_token_ids)
        })
        .collect();
    if valid.sampling.prompt_logprobs.is_some() {
        // The prompt's logprobs are the request's: choice 0 reports them.
        let first = outputs.remove(0).score_prompt(prompt.clone());
        outputs.insert(0, first);
    }
    let beam = valid.beam;
    let queued = Instant::now();
    let demand = GenerateRequest::demand_for(&prompt, valid.cache_salt.as_deref(), served.backend.block_size());
    let mut request = GenerateRequest {
        request_id,
        prompt_token_ids: prompt.clone(),
        sampling: valid.sampling,
        priority: valid.priority,
        cache_salt: valid.cache_salt,
        first_worker: None,
        demand,
    };
    // Placement runs when the turn comes, on the load of that moment.
    let chooser = served.backend.first_leg_chooser(&request);
    let permit = served.admission.admit_with(request.priority, chooser).await?;
    let name = model.served_name.as_str();
    // Only admitted requests: a refusal never waited, and its prompt never runs.
    metrics.observe_queue_time(name, queued.elapsed());
    metrics.count_prompt_tokens(name, prompt.len());
    if let (Some(constraint), Some(took)) = (&request.sampling.constraint, valid.constraint_compile) {
        metrics.count_structured_output(name, constraint.kind(), took);
    }
    request.first_worker = Some(permit.worker());
    let record = UsageRecord::start(usage, &caller, &request.request_id, name, prompt.len(), running);
    let tokens = match beam {
        Some(search) => beam_search(served.backend.clone(), request, search, model.eos_token_ids.clone()),
        None => served.backend.generate(request),
    };
    // The slot is held until the token stream ends or is dropped (client gone).
    let tokens = hold(metrics.time_tokens(name, tokens, arrival), permit);
    let deltas = meter(metrics.count_deltas(name, deltas(tokens, outputs)), record);
    Ok(Generation { deltas, prompt })
}

/// Holds `valid` to its caller's limits, counting a refusal in the metrics.
fn caller_limits(metrics: &Metrics, caller: &Caller, valid: &ValidRequest) -> Result<Running, LimitError> {
    let most_new_tokens = u64::from(valid.sampling.max_tokens) * u64::from(valid.sampling.n.max(1));
    caller.check_request().and_then(|()| caller.admit(valid.prompt_token_ids.len(), most_new_tokens)).inspect_err(|e| {
        metrics.tenants().limited(caller.tenant(), caller.key_id(), e.kind());
    })
}
