//! Model loading (GGUF files and Hugging Face folders) and the Llama forward pass.
//!
//! [`load`] reads a model into a [`LoadedModel`]: the [`Llama`] weights
//! (read-only, stepped through [`crate::Forward`]), the tokenizer, and the
//! [`ModelInfo`] that the serving layers need (chat template, special tokens,
//! context length). A `.gguf` file goes through [`load_gguf_with`], which
//! takes all of that from the file; a folder with `config.json` through
//! [`load_hf`] (safetensors weights, `tokenizer.json`, `tokenizer_config.json`).
//!
//! What every part shares ([`Config`], [`ModelInfo`], [`ModelError`], the load
//! options) is in `config`, a leaf, so the loaders here use the forward passes
//! and the forward passes use only it.

mod attention;
mod awake;
pub(crate) mod bert;
pub(crate) mod config;
mod device;
mod device_llama;
mod drafted;
mod hf;
pub(crate) mod kernels;
mod linear;
mod llama;
mod loaded;
mod parallel;
mod vmath;

use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use candle_core::quantized::gguf_file::Content;

pub use bert::{Bert, BertConfig};
pub use config::{
    Activation, Arch, Config, LoadOptions, ModelError, ModelInfo, ModelMetadata, SlidingWindow, WeightDtype,
};
#[cfg(not(feature = "cuda"))]
pub(crate) use device::no_cuda;
pub use device::{ComputeDevice, GpuMemory};
pub use device_llama::DeviceLlama;
pub use drafted::Drafted;
pub use hf::load_hf;
pub use llama::Llama;
pub use loaded::{Loaded, LoadedModel};
pub use parallel::{place, TensorParallel};

/// The weights [`load`] reads: a decoder, or an encoder for embeddings.
pub enum Model {
    /// A decoder: Llama and the families that are Llama with a few changes.
    Llama(Llama),
    /// A BERT encoder (Hugging Face folders only).
    Bert(Bert),
    /// A decoder with the draft model of its speculative decoding (see [`Drafted`]).
    Drafted(Box<Drafted>),
}

impl Model {
    /// The KV cache shape the engine allocates for this model.
    pub fn kv_shape(&self, block_size: usize, num_blocks: usize) -> crate::KvCacheShape {
        match self {
            Self::Llama(m) => m.kv_shape(block_size, num_blocks),
            Self::Bert(m) => m.kv_shape(block_size, num_blocks),
            Self::Drafted(m) => m.kv_shape(block_size, num_blocks),
        }
    }

    /// For an encoder, the KV blocks its engine needs: those of one step of whole prompts
    /// (`max_num_batched_tokens` tokens over at most `max_num_seqs` prompts), since a prompt
    /// holds its blocks for its one step only and they store nothing. `None` for a decoder,
    /// whose cache is sized by memory.
    pub fn encoder_blocks(
        &self,
        block_size: usize,
        max_num_batched_tokens: usize,
        max_num_seqs: usize,
    ) -> Option<usize> {
        match self {
            Self::Llama(_) | Self::Drafted(_) => None,
            Self::Bert(_) => Some(max_num_batched_tokens.div_ceil(block_size.max(1)) + max_num_seqs),
        }
    }

    /// Puts the model where the engine steps it: on `device`, across `tp_size` ranks (see
    /// [`place`]). An encoder runs on one rank.
    pub fn place(
        self,
        device: ComputeDevice,
        tp_size: usize,
        dtype: WeightDtype,
    ) -> Result<std::sync::Arc<dyn crate::Forward>, ModelError> {
        match self {
            Self::Llama(m) => place(std::sync::Arc::new(m), device, tp_size, dtype),
            // The draft's proposing passes and its KV layers are the CPU kernels' for now.
            Self::Drafted(_) if device != ComputeDevice::Cpu => {
                Err(ModelError::Draft(format!("a target with a draft model runs on the CPU kernels, not on {device}")))
            }
            Self::Drafted(m) => m.place(tp_size),
            Self::Bert(_) if tp_size > 1 => Err(ModelError::TensorParallel(format!(
                "size {tp_size}: a BERT encoder runs on one rank (it is small enough not to need more)"
            ))),
            Self::Bert(m) => Ok(match device {
                ComputeDevice::Cpu => std::sync::Arc::new(m),
                device => {
                    let dtype = match dtype {
                        WeightDtype::Auto | WeightDtype::F32 => candle_core::DType::F32,
                        WeightDtype::F16 => candle_core::DType::F16,
                        WeightDtype::BF16 => candle_core::DType::BF16,
                    };
                    std::sync::Arc::new(m.to_device(&device.candle()?, dtype)?)
                }
            }),
        }
    }
}

impl Loaded<Model> {
    /// The model paired with `speculative`'s draft model, when it names one (loaded with
    /// `options`): the two must share their vocabulary token for token and their KV geometry.
    pub fn with_draft_of(
        self,
        speculative: Option<&crate::SpeculativeConfig>,
        options: &LoadOptions,
    ) -> Result<Self, ModelError> {
        let Some(path) = speculative.and_then(|s| s.draft_model()) else { return Ok(self) };
        let Model::Llama(target) = self.model else {
            return Err(ModelError::Draft("speculative decoding needs a decoder to verify the drafts".into()));
        };
        let draft = load(path, options)?;
        let Model::Llama(draft_model) = draft.model else {
            return Err(ModelError::Draft(format!("{} is not a decoder", path.display())));
        };
        if draft.tokenizer.get_vocab(true) != self.tokenizer.get_vocab(true) {
            return Err(ModelError::Draft(format!(
                "{}'s vocabulary is not the target's: its tokens would mean other text",
                path.display()
            )));
        }
        let model = Model::Drafted(Box::new(Drafted::new(target, draft_model)?));
        Ok(Self { model, ..self })
    }
}

impl From<LoadedModel> for Loaded<Model> {
    fn from(m: LoadedModel) -> Self {
        Loaded { model: Model::Llama(m.model), tokenizer: m.tokenizer, info: m.info }
    }
}

impl Loaded<Model> {
    /// The decoder, or an error naming what the caller needs it for (the
    /// model is an encoder).
    pub fn into_decoder(self) -> Result<LoadedModel, ModelError> {
        match self.model {
            Model::Llama(model) => Ok(Loaded { model, tokenizer: self.tokenizer, info: self.info }),
            Model::Bert(_) => Err(ModelError::EncoderOnly(self.info.model_name)),
            Model::Drafted(_) => Err(ModelError::Draft("a decoder paired with its draft stays paired".into())),
        }
    }
}

/// Loads a model from `path`: a `.gguf` file, or a Hugging Face folder
/// (one with `config.json`; a BERT encoder's loads as [`Model::Bert`]).
pub fn load(path: &Path, options: &LoadOptions) -> Result<Loaded<Model>, ModelError> {
    match format(path, options)? {
        Format::HfFolder => hf::load_folder(path, options),
        Format::Gguf => load_gguf_with(path, options).map(Into::into),
    }
}

/// Reads what [`load`] reads except the weights: a GGUF file's header and
/// metadata (its tensor data is never read), or a Hugging Face folder's
/// config and tokenizer files. For workers that publish a model card without
/// running the model (the workers' `--mock`), in milliseconds instead of a load.
pub fn load_metadata(path: &Path, options: &LoadOptions) -> Result<ModelMetadata, ModelError> {
    match format(path, options)? {
        Format::HfFolder => hf::load_hf_metadata(path, options),
        Format::Gguf => {
            let (content, _) = read_gguf(path)?;
            let (_, metadata) = gguf_metadata(path, &content, options)?;
            Ok(metadata)
        }
    }
}

/// Which loader a path takes.
enum Format {
    HfFolder,
    Gguf,
}

/// The checks [`load`] and [`load_metadata`] share, so that a mock worker
/// refuses the same paths and options a real one does.
fn format(path: &Path, options: &LoadOptions) -> Result<Format, ModelError> {
    if !path.exists() {
        return Err(ModelError::NotFound(path.to_path_buf()));
    }
    if path.is_dir() && path.join("config.json").is_file() {
        return Ok(Format::HfFolder);
    }
    let is_gguf = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
    if !(is_gguf && path.is_file()) {
        return Err(ModelError::UnknownFormat(path.to_path_buf()));
    }
    if options.dtype != WeightDtype::Auto {
        return Err(ModelError::DtypeForGguf(options.dtype));
    }
    if options.tokenizer.is_some() {
        return Err(ModelError::TokenizerForGguf);
    }
    Ok(Format::Gguf)
}

/// Loads a Llama GGUF file with default [`LoadOptions`].
pub fn load_gguf(path: &Path) -> Result<LoadedModel, ModelError> {
    load_gguf_with(path, &LoadOptions::default())
}

/// Loads a Llama GGUF file: weights, tokenizer and serving metadata.
pub fn load_gguf_with(path: &Path, options: &LoadOptions) -> Result<LoadedModel, ModelError> {
    let (content, mut reader) = read_gguf(path)?;
    let (config, ModelMetadata { tokenizer, info }) = gguf_metadata(path, &content, options)?;
    let mut source = llama::GgufSource { content: &content, reader: &mut reader, arch: config.arch };
    let model = Llama::load(&mut source, config)?;
    Ok(LoadedModel { model, tokenizer, info })
}

/// Loads only the weights of a GGUF file: for tools and tests that feed
/// token ids and need no tokenizer or serving metadata.
pub fn load_gguf_weights(path: &Path) -> Result<Llama, ModelError> {
    let (content, mut reader) = read_gguf(path)?;
    let config = Config::from_gguf(&content)?;
    let mut source = llama::GgufSource { content: &content, reader: &mut reader, arch: config.arch };
    Llama::load(&mut source, config)
}

/// A GGUF file's header (metadata and tensor index, not the tensor data) and
/// the reader positioned after it.
fn read_gguf(path: &Path) -> Result<(Content, BufReader<File>), ModelError> {
    let file = File::open(path).map_err(|source| ModelError::Open { path: path.to_path_buf(), source })?;
    let mut reader = BufReader::new(file);
    let content = Content::read(&mut reader).map_err(|source| ModelError::Gguf { path: path.to_path_buf(), source })?;
    Ok((content, reader))
}

/// The model shape, tokenizer and serving metadata of a GGUF header.
fn gguf_metadata(path: &Path, content: &Content, options: &LoadOptions) -> Result<(Config, ModelMetadata), ModelError> {
    let config = Config::from_gguf(content)?;
    let tokenizer = crate::tokenizer::from_gguf(content)?;
    let model_name = match &options.model_name {
        Some(name) => name.clone(),
        None => path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".to_string()),
    };
    let info = ModelInfo::from_gguf(content, model_name, &config)?;
    Ok((config, ModelMetadata { tokenizer, info }))
}
