//! Hugging Face model folders: `config.json`, safetensors weights (one file or
//! shards with an index), `tokenizer.json`, `tokenizer_config.json` and
//! `generation_config.json`.
//!
//! Weights reach [`Llama::load`] under llama.cpp's names and layout, so the
//! forward pass is the one GGUF files use: [`weights`] renames the tensors and
//! reorders Q and K rows from rotate-half RoPE to adjacent pairs, as llama.cpp's
//! converter does. BERT encoders (`BertModel`) load into [`Bert`] instead,
//! with the pooling and length of their Sentence-Transformers config.

mod config;
mod sentence_transformers;
mod tokenizer_files;
mod weights;

use std::path::Path;

use super::bert::{Bert, BertConfig};
use super::{Llama, LoadOptions, Loaded, LoadedModel, Model, ModelError, ModelMetadata};
use config::{FolderConfig, HfConfig};
use tokenizer_files::TokenizerFiles;
use weights::SafetensorsSource;

/// Loads a Llama, Mistral (without sliding window), Qwen2, Qwen3, Phi-3 or
/// Gemma 3 (text) checkpoint from a Hugging Face folder. Matrices keep their stored f32/f16/bf16 precision
/// unless [`LoadOptions::dtype`] asks for another; activations are f32.
pub fn load_hf(dir: &Path, options: &LoadOptions) -> Result<LoadedModel, ModelError> {
    load_decoder(dir, options, HfConfig::read(&dir.join("config.json"))?)
}

fn load_decoder(dir: &Path, options: &LoadOptions, hf: HfConfig) -> Result<LoadedModel, ModelError> {
    let ModelMetadata { tokenizer, info } = decoder_metadata(dir, options, &hf)?;
    let config = hf.config.clone();
    let mut source = SafetensorsSource::open(dir, hf, options.dtype)?;
    let model = Llama::load(&mut source, config)?;
    Ok(LoadedModel { model, tokenizer, info })
}

/// The folder's `config.json`, read once: a decoder's or a BERT encoder's.
fn read_folder(dir: &Path) -> Result<FolderConfig, ModelError> {
    FolderConfig::read(&dir.join("config.json"), || sentence_transformers::max_seq_length(dir))
}

/// Loads a Hugging Face folder: a decoder (as [`load_hf`]), or a BERT encoder
/// (`BertModel`, from a Sentence-Transformers folder too) on the CPU, its weights in f32
/// unless [`LoadOptions::dtype`] asks for another.
pub(super) fn load_folder(dir: &Path, options: &LoadOptions) -> Result<Loaded<Model>, ModelError> {
    let config = match read_folder(dir)? {
        FolderConfig::Decoder(hf) => return load_decoder(dir, options, hf).map(Into::into),
        FolderConfig::Encoder(config) => config,
    };
    let ModelMetadata { tokenizer, info } = encoder_metadata(dir, options, &config)?;
    let dtype = match options.dtype {
        super::WeightDtype::Auto | super::WeightDtype::F32 => candle_core::DType::F32,
        super::WeightDtype::F16 => candle_core::DType::F16,
        super::WeightDtype::BF16 => candle_core::DType::BF16,
    };
    let model = Bert::load(dir, config, &candle_core::Device::Cpu, dtype)?;
    Ok(Loaded { model: Model::Bert(model), tokenizer, info })
}

/// Everything [`load_folder`] reads but the weights.
pub(super) fn load_hf_metadata(dir: &Path, options: &LoadOptions) -> Result<ModelMetadata, ModelError> {
    match read_folder(dir)? {
        FolderConfig::Encoder(config) => encoder_metadata(dir, options, &config),
        FolderConfig::Decoder(hf) => decoder_metadata(dir, options, &hf),
    }
}

/// A decoder's tokenizer and serving metadata.
fn decoder_metadata(dir: &Path, options: &LoadOptions, hf: &HfConfig) -> Result<ModelMetadata, ModelError> {
    let files = TokenizerFiles::locate(dir, options.tokenizer.as_deref())?;
    let tokenizer = files.load()?;
    let mut info = files.model_info(&tokenizer, hf, &dir.join("generation_config.json"), model_name(dir, options))?;
    info.pooling = sentence_transformers::pooling(dir)?;
    Ok(ModelMetadata { tokenizer, info })
}

/// An encoder's tokenizer and serving metadata.
fn encoder_metadata(dir: &Path, options: &LoadOptions, config: &BertConfig) -> Result<ModelMetadata, ModelError> {
    let files = TokenizerFiles::locate(dir, options.tokenizer.as_deref())?;
    let tokenizer = files.load()?;
    let info = TokenizerFiles::encoder_info(
        model_name(dir, options),
        config.context_length,
        config.hidden,
        sentence_transformers::pooling(dir)?,
    );
    Ok(ModelMetadata { tokenizer, info })
}

fn model_name(dir: &Path, options: &LoadOptions) -> String {
    match &options.model_name {
        Some(name) => name.clone(),
        None => folder_name(dir),
    }
}

/// The folder's own name (`.` and trailing slashes resolved).
fn folder_name(dir: &Path) -> String {
    let named = dir.file_name().map(|n| n.to_string_lossy().into_owned());
    named
        .or_else(|| dir.canonicalize().ok()?.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "model".to_string())
}
