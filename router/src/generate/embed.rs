//! The generate step of an embedding: the caller's limits, the admission queue and one worker call
//! per input, all inputs at once. No HTTP here.

use std::sync::Arc;
use std::time::Instant;

use futures::future::try_join_all;

use crate::backend::{BackendError, EmbedRequest, Embedded, GenerateRequest};
use crate::generate::{GenerateError, Job};
use crate::metrics::Metrics;
use crate::prepare::embeddings::ValidEmbedding;
use crate::tenancy::usage::{Outcome, UsageRecord, UsageSink};

/// Why an embedding failed.
#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    /// A limit or the admission queue refused an input.
    #[error(transparent)]
    Refused(#[from] GenerateError),
    /// A worker failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
}

/// Embeds every input of `valid` (the `i`-th as request `<id>-<i>` when there are several, as a
/// completions batch's prompts), each admitted like a prompt to generate from: held to the
/// caller's limits, waiting for its turn, placed by prefix affinity under the cache salt.
/// Returns the vectors in input order; dropping the future cancels what still runs.
pub async fn embed(metrics: &Metrics, usage: UsageSink, job: Job<ValidEmbedding>) -> Result<Vec<Embedded>, EmbedError> {
    let Job { request_id, arrival: _, caller, served, model, valid } = job;
    let batched = valid.inputs.len() > 1;
    let name = model.served_name.as_str();
    let inputs = valid.inputs.into_iter().enumerate().map(|(i, prompt)| {
        let request_id = if batched { format!("{request_id}-{i}") } else { request_id.clone() };
        let (caller, served, usage) = (caller.clone(), served.clone(), usage.clone());
        let cache_salt = valid.cache_salt.clone();
        async move {
            let running = caller
                .check_request()
                .and_then(|()| caller.admit(prompt.len(), 0))
                .inspect_err(|e| metrics.tenants().limited(caller.tenant(), caller.key_id(), e.kind()))
                .map_err(GenerateError::from)?;
            let prompt = Arc::new(prompt);
            let demand = GenerateRequest::demand_for(&prompt, cache_salt.as_deref(), served.backend.block_size());
            let mut request = EmbedRequest {
                request_id,
                prompt_token_ids: prompt.clone(),
                pooling: valid.pooling,
                normalize: valid.normalize,
                priority: valid.priority,
                cache_salt,
                first_worker: None,
                demand,
            };
            let queued = Instant::now();
            let chooser = served.backend.embed_chooser(&request);
            let permit = served.admission.admit_with(request.priority, chooser).await.map_err(GenerateError::from)?;
            metrics.observe_queue_time(name, queued.elapsed());
            metrics.count_prompt_tokens(name, prompt.len());
            request.first_worker = Some(permit.worker());
            let record = UsageRecord::start(usage, &caller, &request.request_id, name, prompt.len(), running);
            // The admission slot is held until the worker answers (or the client leaves).
            let answer = served.backend.embed(request).await;
            drop(permit);
            record.end(if answer.is_ok() { Outcome::Completed } else { Outcome::Failed });
            Ok::<_, EmbedError>(answer?)
        }
    });
    try_join_all(inputs).await
}
