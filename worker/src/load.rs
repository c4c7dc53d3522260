//! Model and engine start-up.

use crate::args::{EngineArgs, KvCacheMemory};
use crate::memory;
use anyhow::Context;
use engine::model::ComputeDevice;
use engine::{Engine, EngineConfig, EngineHandle, KvCacheShape};
use proto::worker as pb;
use std::sync::Arc;
use tracing::{info, warn};

/// A running engine and what the worker publishes about it.
pub struct LoadedEngine {
    pub engine: EngineHandle,
    pub card: pb::ModelCard,
    pub vocab_size: usize,
    /// Structured outputs compiled against the model's vocabulary.
    pub grammars: Arc<crate::structured::Grammars>,
    /// The draft model whose KV follows the target's in every block, for the kv-transfer layout.
    pub draft: Option<kv_transfer::DraftKv>,
}

/// Loads the model and starts the engine's step loop.
pub fn load_engine(args: &EngineArgs) -> anyhow::Result<LoadedEngine> {
    let started = std::time::Instant::now();
    if !args.model.exists() {
        anyhow::bail!("model {} not found (run scripts/fetch-model.sh)", args.model.display());
    }
    let options =
        engine::model::LoadOptions { tokenizer: args.tokenizer.clone(), dtype: args.dtype, ..Default::default() };
    let loaded =
        engine::model::load(&args.model, &options).with_context(|| format!("loading {}", args.model.display()))?;
    let loaded = loaded.with_draft_of(args.speculative_config.as_ref(), &options).context("loading the draft model")?;
    let draft = draft_kv(&loaded.model, args).context("reading the draft model")?;
    if let engine::model::Model::Llama(llama) = &loaded.model {
        let model_config = llama.config();
        check_tensor_parallel(args.tensor_parallel_size, model_config.num_heads, model_config.num_kv_heads)
            .map_err(anyhow::Error::msg)?;
    }
    let info = loaded.info;
    let max_model_len = max_model_len(args, &info)?;
    let tp_size = args.tensor_parallel_size as usize;
    // Each rank caches its share of the KV heads; the budget covers them all.
    let whole = loaded.model.kv_shape(args.block_size as usize, 0);
    let rank_shape = |num_blocks| KvCacheShape { num_kv_heads: whole.num_kv_heads / tp_size, num_blocks, ..whole };
    // Copies of the weights (shards, device matrices) are made and the loaded
    // model dropped before the KV budget is measured.
    // An encoder holds blocks only while its one step runs, and stores nothing in them.
    let encoder_blocks = loaded.model.encoder_blocks(
        args.block_size as usize,
        args.max_num_batched_tokens as usize,
        args.max_num_seqs as usize,
    );
    let model = loaded.model.place(args.device, tp_size, args.dtype).map_err(|e| anyhow::anyhow!("{e}"))?;
    let rank_block_bytes = rank_shape(1).block_bytes();
    let num_blocks = match (args.num_kv_blocks, encoder_blocks) {
        (Some(n), _) => n as usize,
        (None, Some(n)) => n,
        (None, None) => kv_blocks(args, tp_size, rank_block_bytes as u64)?,
    };
    let shape = rank_shape(num_blocks);
    let vocab_size = model.vocab_size();
    let config = EngineConfig {
        max_num_seqs: args.max_num_seqs as usize,
        max_num_batched_tokens: args.max_num_batched_tokens as usize,
        max_model_len: max_model_len as usize,
        eos_token_ids: info.eos_token_ids.clone(),
        default_seed: args.seed,
        enable_prefix_caching: args.prefix_caching(),
        speculative: args.speculative_config.clone(),
    };
    let engine = Engine::start(model, shape, config);
    let grammars =
        Arc::new(crate::structured::Grammars::new(loaded.tokenizer.clone(), vocab_size, info.eos_token_ids.clone()));
    let card = model_card(args, info, &loaded.tokenizer, max_model_len)?;
    info!(
        model = card.model_name,
        device = %args.device,
        blocks = num_blocks,
        // On GPUs as much again, in the cache's device copy.
        kv_bytes = num_blocks * rank_block_bytes * tp_size,
        secs = started.elapsed().as_secs_f32(),
        "engine ready"
    );
    Ok(LoadedEngine { engine, card, vocab_size, grammars, draft })
}

/// The kv-transfer description of `model`'s draft, if it has one (see [`kv_transfer::DraftKv`]).
fn draft_kv(model: &engine::model::Model, args: &EngineArgs) -> std::io::Result<Option<kv_transfer::DraftKv>> {
    let (engine::model::Model::Drafted(drafted), Some(path)) =
        (model, args.speculative_config.as_ref().and_then(|s| s.draft_model()))
    else {
        return Ok(None);
    };
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let size = std::fs::metadata(path)?.len();
    let layers = drafted.draft().config().num_layers as u32;
    Ok(Some(kv_transfer::DraftKv { layers, id: kv_transfer::DraftKv::id_of(&name, size) }))
}

/// The model card alone, from the tokenizer and metadata: no weights are
/// read and no engine starts. For the workers' `--mock` mode, which serves
/// the real card (the router builds its tokenizer from it) without a model.
/// Also returns the tokenizer, for the mock to pick the token it answers.
pub fn load_card(args: &EngineArgs) -> anyhow::Result<(pb::ModelCard, tokenizers::Tokenizer)> {
    if !args.model.exists() {
        anyhow::bail!("model {} not found (run scripts/fetch-model.sh)", args.model.display());
    }
    let options =
        engine::model::LoadOptions { tokenizer: args.tokenizer.clone(), dtype: args.dtype, ..Default::default() };
    let metadata = engine::model::load_metadata(&args.model, &options)
        .with_context(|| format!("reading the metadata of {}", args.model.display()))?;
    let max_model_len = max_model_len(args, &metadata.info)?;
    let card = model_card(args, metadata.info, &metadata.tokenizer, max_model_len)?;
    Ok((card, metadata.tokenizer))
}

/// `--max-model-len`, checked against the model's context length.
fn max_model_len(args: &EngineArgs, info: &engine::model::ModelInfo) -> anyhow::Result<u32> {
    let context_length = info.context_length as u32;
    match args.max_model_len {
        Some(n) if n > context_length => {
            anyhow::bail!("--max-model-len {n} exceeds the model's context length {context_length}")
        }
        Some(n) => Ok(n),
        None => Ok(context_length),
    }
}

/// What the worker publishes: the same whether it runs the model or mocks it.
fn model_card(
    args: &EngineArgs,
    info: engine::model::ModelInfo,
    tokenizer: &tokenizers::Tokenizer,
    max_model_len: u32,
) -> anyhow::Result<pb::ModelCard> {
    let tokenizer_json = tokenizer.to_string(false).map_err(|e| anyhow::anyhow!("serializing the tokenizer: {e}"))?;
    Ok(pb::ModelCard {
        model_name: args.served_model_name.clone().unwrap_or(info.model_name),
        tokenizer_json,
        chat_template: info.chat_template.unwrap_or_default(),
        context_length: max_model_len,
        block_size: args.block_size,
        eos_token_ids: info.eos_token_ids,
        bos_token: info.bos_token,
        eos_token: info.eos_token,
        add_bos_token: info.add_bos_token,
        encoder: info.encoder,
        pooling: info.pooling.map_or(pb::Pooling::Unspecified, |p| match p {
            engine::Pooling::Last => pb::Pooling::Last,
            engine::Pooling::Mean => pb::Pooling::Mean,
            engine::Pooling::Cls => pb::Pooling::Cls,
        }) as i32,
        embedding_size: u32::try_from(info.embedding_size).unwrap_or(u32::MAX),
    })
}

/// How many KV blocks the `--kv-cache-memory` budget holds, a block being
/// `rank_block_bytes` on each of `tp_size` ranks. A fraction is resolved
/// now, after loading, so that the model's own memory counts against it: on
/// GPUs, a fraction of each GPU's memory, which the cache's device copy
/// fills, as long as host memory holds the host copy.
fn kv_blocks(args: &EngineArgs, tp_size: usize, rank_block_bytes: u64) -> anyhow::Result<usize> {
    let budget = args.kv_cache_memory;
    let block_bytes = rank_block_bytes * tp_size as u64;
    let host_fraction = |fraction| -> anyhow::Result<u64> {
        let total = memory::total_memory().map_err(anyhow::Error::msg)?;
        let resident = memory::resident_memory().map_err(anyhow::Error::msg)?;
        let bytes = memory::kv_bytes_for_fraction("the worker", fraction, total, resident, block_bytes)
            .map_err(anyhow::Error::msg)?;
        Ok(bytes / block_bytes)
    };
    let blocks = match (budget, args.device) {
        (KvCacheMemory::Bytes(n), _) => n / block_bytes,
        (KvCacheMemory::Fraction(fraction), ComputeDevice::Cpu) => host_fraction(fraction)?,
        (KvCacheMemory::Fraction(fraction), device) => {
            let gpus = device
                .ranks(tp_size)
                .into_iter()
                .map(|gpu| Ok((gpu.to_string(), gpu.gpu_memory()?)))
                .collect::<Result<Vec<_>, engine::model::ModelError>>()?;
            let on_gpus = memory::kv_blocks_on_gpus(fraction, &gpus, rank_block_bytes).map_err(anyhow::Error::msg)?;
            let in_host = host_fraction(1.0)?;
            if in_host < on_gpus {
                warn!(
                    on_gpus,
                    in_host, "host memory holds fewer KV blocks than the GPUs: the host copy limits the cache"
                );
            }
            on_gpus.min(in_host)
        }
    };
    if blocks == 0 {
        anyhow::bail!("--kv-cache-memory {budget} holds no KV block ({block_bytes} B each)");
    }
    if blocks > u64::from(u32::MAX) {
        anyhow::bail!("--kv-cache-memory {budget} is more than {} blocks of {block_bytes} B", u32::MAX);
    }
    Ok(blocks as usize)
}

/// `--tensor-parallel-size`: each rank takes a whole number of attention and
/// KV heads (the MLP's split is checked when the model is sharded).
pub fn check_tensor_parallel(size: u32, num_heads: usize, num_kv_heads: usize) -> Result<(), String> {
    let n = size as usize;
    if n == 0 || !num_heads.is_multiple_of(n) || !num_kv_heads.is_multiple_of(n) {
        return Err(format!(
            "--tensor-parallel-size {size} must divide the model's {num_heads} attention heads and {num_kv_heads} KV heads"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensor_parallel_size_must_divide_the_heads() {
        assert_eq!(check_tensor_parallel(1, 9, 3), Ok(()));
        let err = check_tensor_parallel(2, 9, 3).unwrap_err();
        assert!(err.contains("9 attention heads") && err.contains("3 KV heads"), "{err}");
        assert!(check_tensor_parallel(4, 32, 2).unwrap_err().contains("2 KV heads"));
        assert!(check_tensor_parallel(0, 8, 8).is_err());
        assert_eq!(check_tensor_parallel(3, 9, 3), Ok(()));
        assert_eq!(check_tensor_parallel(2, 32, 8), Ok(()));
    }
}
