//! Our side: the engine in-process, driven through [`EngineHandle::submit`] as the workers drive it.

use crate::prompts::Prompts;
use engine::model::{ComputeDevice, Llama, LoadedModel, ModelInfo, WeightDtype};
use engine::{Engine, EngineConfig, EngineEvent, EngineHandle, EngineRequest, KvCacheShape, SamplingParams};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Tokens per KV block: the workers' default.
pub const BLOCK_SIZE: usize = 16;

/// The loaded model, shared by every engine the bench starts.
pub struct Ours {
    model: Arc<Llama>,
    pub tokenizer: tokenizers::Tokenizer,
    info: ModelInfo,
}

/// When one request's events arrived.
#[derive(Debug, Clone)]
pub struct Timeline {
    pub submitted: Instant,
    /// One instant per generated token, in order.
    pub tokens: Vec<Instant>,
    /// The generated token ids, in order.
    pub token_ids: Vec<u32>,
    /// Prompt tokens whose KV came from the prefix cache.
    pub cached_tokens: usize,
}

impl Timeline {
    /// Submission to first token.
    pub fn ttft_secs(&self) -> f64 {
        self.tokens.first().map_or(f64::NAN, |t| t.duration_since(self.submitted).as_secs_f64())
    }
}

static NEXT_ID: AtomicU64 = AtomicU64::new(0);

impl Ours {
    /// Loads the GGUF as the workers do (`engine::model::load_gguf`).
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let LoadedModel { model, tokenizer, info } =
            engine::model::load_gguf(path).map_err(|e| anyhow::anyhow!("loading {}: {e}", path.display()))?;
        Ok(Self { model: Arc::new(model), tokenizer, info })
    }

    /// Bytes of one KV block of [`BLOCK_SIZE`] tokens.
    pub fn block_bytes(&self) -> usize {
        self.model.kv_shape(BLOCK_SIZE, 1).block_bytes()
    }

    /// Starts an engine over the shared weights with `num_blocks` KV blocks.
    pub fn engine(&self, num_blocks: usize, max_num_seqs: usize, prefix_caching: bool) -> EngineHandle {
        let shape = self.model.kv_shape(BLOCK_SIZE, num_blocks);
        Engine::start(self.model.clone(), shape, self.config(max_num_seqs, prefix_caching))
    }

    /// Like [`Ours::engine`], with the model placed as a worker's `--device`
    /// and `--tensor-parallel-size` place it (each rank's cache `num_blocks`
    /// blocks of its heads).
    pub fn engine_on(
        &self,
        device: ComputeDevice,
        tp_size: usize,
        num_blocks: usize,
        max_num_seqs: usize,
    ) -> anyhow::Result<EngineHandle> {
        let model = engine::model::place(self.model.clone(), device, tp_size, WeightDtype::Auto)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let whole = self.model.kv_shape(BLOCK_SIZE, num_blocks);
        let shape = KvCacheShape { num_kv_heads: whole.num_kv_heads / tp_size, ..whole };
        Ok(Engine::start(model, shape, self.config(max_num_seqs, true)))
    }

    fn config(&self, max_num_seqs: usize, prefix_caching: bool) -> EngineConfig {
        EngineConfig {
            max_num_seqs,
            // The workers' default step budget.
            max_num_batched_tokens: 2048,
            max_model_len: self.info.context_length,
            eos_token_ids: self.info.eos_token_ids.clone(),
            default_seed: 0,
            enable_prefix_caching: prefix_caching,
            speculative: None,
        }
    }

    /// Tokens that end generation.
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.info.eos_token_ids
    }

    /// A prompt source over this model's tokenizer.
    pub fn prompts(&self) -> anyhow::Result<Prompts<'_>> {
        Prompts::new(&self.tokenizer)
    }
}

/// KV blocks that `seqs` sequences of `tokens` tokens each need.
pub fn blocks_for(seqs: usize, tokens: usize) -> usize {
    seqs * tokens.div_ceil(BLOCK_SIZE)
}

/// Submits every prompt at once (greedy, `max_tokens` each, EOS ignored so every request generates
/// exactly `max_tokens`) and records when each token arrives.
pub async fn run(engine: &EngineHandle, prompts: Vec<Vec<u32>>, max_tokens: u32) -> anyhow::Result<Vec<Timeline>> {
    run_constrained(engine, prompts, max_tokens, None).await
}

/// [`run`], every request held to a copy of `grammar` when one is given.
pub async fn run_constrained(
    engine: &EngineHandle,
    prompts: Vec<Vec<u32>>,
    max_tokens: u32,
    grammar: Option<&constraint::Grammar>,
) -> anyhow::Result<Vec<Timeline>> {
    let mut pending = Vec::with_capacity(prompts.len());
    for prompt in prompts {
        let sampling = SamplingParams { temperature: 0.0, max_tokens, ignore_eos: true, ..SamplingParams::default() };
        let request_id = format!("bench-{}", NEXT_ID.fetch_add(1, Ordering::Relaxed));
        let request =
            EngineRequest { grammar: grammar.cloned(), ..EngineRequest::generate(request_id, prompt, sampling) };
        let submitted = Instant::now();
        let events = engine.submit(request)?;
        pending.push((submitted, events));
    }
    let waits = pending.into_iter().map(|(submitted, mut events)| async move {
        let mut tokens = Vec::with_capacity(max_tokens as usize);
        let mut token_ids = Vec::with_capacity(max_tokens as usize);
        while let Some(event) = events.recv().await {
            match event {
                EngineEvent::Token { id, .. } => {
                    tokens.push(Instant::now());
                    token_ids.push(id);
                }
                EngineEvent::Finished { num_cached_tokens, .. } => {
                    return Ok(Timeline { submitted, tokens, token_ids, cached_tokens: num_cached_tokens })
                }
                EngineEvent::Error(e) => anyhow::bail!("engine error: {e}"),
                EngineEvent::PromptLogprobs { .. } => anyhow::bail!("prompt logprobs were not asked for"),
                EngineEvent::Embedding(_) => anyhow::bail!("no embedding was asked for"),
            }
        }
        anyhow::bail!("the engine dropped a request without finishing it")
    });
    futures::future::try_join_all(waits).await
}

/// Decode tokens/s over a set of requests run together: tokens that arrived after every request had
/// its first token, over the time from that moment to the last token (llama-batched-bench's S_TG:
/// decode steps only, prefill excluded).
pub fn decode_tokens_per_sec(timelines: &[Timeline]) -> anyhow::Result<f64> {
    let start = timelines.iter().filter_map(|t| t.tokens.first()).max().copied();
    let end = timelines.iter().filter_map(|t| t.tokens.last()).max().copied();
    let (Some(start), Some(end)) = (start, end) else { anyhow::bail!("no tokens were generated") };
    let counted: usize = timelines.iter().map(|t| t.tokens.iter().filter(|&&at| at > start).count()).sum();
    let secs = end.duration_since(start).as_secs_f64();
    anyhow::ensure!(counted > 0 && secs > 0.0, "too few tokens to time decoding");
    Ok(counted as f64 / secs)
}

/// One short request, so thread pools, allocations and page faults are out of the way.
pub async fn warm_up(engine: &EngineHandle, prompts: &Prompts<'_>) -> anyhow::Result<()> {
    run(engine, vec![prompts.next(64)?], 8).await.map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn timeline(start: Instant, token_ms: &[u64]) -> Timeline {
        Timeline {
            submitted: start,
            tokens: token_ms.iter().map(|&ms| start + Duration::from_millis(ms)).collect(),
            token_ids: vec![0; token_ms.len()],
            cached_tokens: 0,
        }
    }

    #[test]
    fn decode_rate_counts_tokens_after_every_first_token() {
        let t0 = Instant::now();
        // One sequence: 4 tokens after the first, over 400 ms.
        let one = decode_tokens_per_sec(&[timeline(t0, &[1000, 1100, 1200, 1300, 1400])]).unwrap();
        assert!((one - 10.0).abs() < 1e-6, "{one}");
        // Two sequences: the window opens at the later first token (1100 ms); 3 + 3 tokens after it.
        let two = [timeline(t0, &[1000, 1100, 1200, 1300, 1400]), timeline(t0, &[1100, 1200, 1300, 1400])];
        let rate = decode_tokens_per_sec(&two).unwrap();
        assert!((rate - 6.0 / 0.3).abs() < 1e-6, "{rate}");
    }
}
