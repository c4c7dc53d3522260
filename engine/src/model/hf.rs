//! Hugging Face model folders: `config.json`, safetensors weights (one file or
//! shards with an index), `tokenizer.json`, `tokenizer_config.json` and
//! `generation_config.json`.
//!
//! Weights reach [`Llama::load`] under llama.cpp's names and layout, so the
//! forward pass is the one GGUF files use: [`weights`] renames the tensors and
//! reorders Q and K rows from rotate-half RoPE to adjacent pairs, as llama.cpp's
//! converter does.

mod config;
mod tokenizer_files;
mod weights;

use std::path::Path;

use super::{Llama, LoadOptions, LoadedModel, ModelError, ModelMetadata};
use config::HfConfig;
use tokenizer_files::TokenizerFiles;
use weights::SafetensorsSource;

/// Loads a Llama, Mistral (without sliding window), Qwen2, Qwen3, Phi-3 or
/// Gemma 3 (text) checkpoint from a Hugging Face folder. Matrices keep their stored f32/f16/bf16 precision
/// unless [`LoadOptions::dtype`] asks for another; activations are f32.
pub fn load_hf(dir: &Path, options: &LoadOptions) -> Result<LoadedModel, ModelError> {
    let (hf, ModelMetadata { tokenizer, info }) = read_metadata(dir, options)?;
    let config = hf.config.clone();
    let mut source = SafetensorsSource::open(dir, hf, options.dtype)?;
    let model = Llama::load(&mut source, config)?;
    Ok(LoadedModel { model, tokenizer, info })
}

/// Everything [`load_hf`] reads but the weights.
pub(super) fn load_hf_metadata(dir: &Path, options: &LoadOptions) -> Result<ModelMetadata, ModelError> {
    read_metadata(dir, options).map(|(_, metadata)| metadata)
}

/// The config (which the weights need) and the tokenizer and serving metadata.
fn read_metadata(dir: &Path, options: &LoadOptions) -> Result<(HfConfig, ModelMetadata), ModelError> {
    let hf = HfConfig::read(&dir.join("config.json"))?;
    let files = TokenizerFiles::locate(dir, options.tokenizer.as_deref())?;
    let tokenizer = files.load()?;
    let model_name = match &options.model_name {
        Some(name) => name.clone(),
        None => folder_name(dir),
    };
    let info = files.model_info(&tokenizer, &hf, &dir.join("generation_config.json"), model_name)?;
    Ok((hf, ModelMetadata { tokenizer, info }))
}

/// The folder's own name (`.` and trailing slashes resolved).
fn folder_name(dir: &Path) -> String {
    let named = dir.file_name().map(|n| n.to_string_lossy().into_owned());
    named
        .or_else(|| dir.canonicalize().ok()?.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "model".to_string())
}
