//! Model and engine start-up.

use crate::args::EngineArgs;
use anyhow::Context;
use engine::{Engine, EngineConfig, EngineHandle};
use proto::worker as pb;
use std::sync::Arc;
use tracing::info;

/// A running engine and what the worker publishes about it.
pub struct LoadedEngine {
    pub engine: EngineHandle,
    pub card: pb::ModelCard,
    pub vocab_size: usize,
}

/// Loads the model and starts the engine's step loop.
pub fn load_engine(args: &EngineArgs) -> anyhow::Result<LoadedEngine> {
    let started = std::time::Instant::now();
    if !args.model.is_file() {
        anyhow::bail!("model file {} not found (run scripts/fetch-model.sh)", args.model.display());
    }
    let loaded = engine::model::load_gguf(&args.model).with_context(|| format!("loading {}", args.model.display()))?;
    let info = loaded.info;
    let context_length = info.context_length as u32;
    let max_model_len = match args.max_model_len {
        Some(n) if n > context_length => {
            anyhow::bail!("--max-model-len {n} exceeds the model's context length {context_length}")
        }
        Some(n) => n,
        None => context_length,
    };
    let tokenizer_json =
        loaded.tokenizer.to_string(false).map_err(|e| anyhow::anyhow!("serializing the tokenizer: {e}"))?;
    let block_bytes = loaded.model.kv_shape(args.block_size as usize, 1).block_bytes();
    let num_blocks = match args.num_kv_blocks {
        Some(n) => n as usize,
        None => usize::try_from(args.kv_cache_memory / block_bytes as u64).unwrap_or(usize::MAX),
    };
    if num_blocks == 0 {
        anyhow::bail!("--kv-cache-memory {} B holds no KV block ({block_bytes} B each)", args.kv_cache_memory);
    }
    if u32::try_from(num_blocks).is_err() {
        anyhow::bail!(
            "--kv-cache-memory {} B is more than {} blocks of {block_bytes} B",
            args.kv_cache_memory,
            u32::MAX
        );
    }
    let shape = loaded.model.kv_shape(args.block_size as usize, num_blocks);
    let vocab_size = engine::Forward::vocab_size(&loaded.model);
    let config = EngineConfig {
        max_num_seqs: args.max_num_seqs as usize,
        max_num_batched_tokens: args.max_num_batched_tokens as usize,
        max_model_len: max_model_len as usize,
        eos_token_ids: info.eos_token_ids.clone(),
        default_seed: args.seed,
        enable_prefix_caching: !args.no_prefix_caching,
    };
    let engine = Engine::start(Arc::new(loaded.model), shape, config);
    let card = pb::ModelCard {
        model_name: args.served_model_name.clone().unwrap_or(info.model_name),
        tokenizer_json,
        chat_template: info.chat_template.unwrap_or_default(),
        context_length: max_model_len,
        block_size: args.block_size,
        eos_token_ids: info.eos_token_ids,
        bos_token: info.bos_token,
        eos_token: info.eos_token,
        add_bos_token: info.add_bos_token,
    };
    info!(
        model = card.model_name,
        blocks = num_blocks,
        kv_bytes = num_blocks * block_bytes,
        secs = started.elapsed().as_secs_f32(),
        "engine ready"
    );
    Ok(LoadedEngine { engine, card, vocab_size })
}
