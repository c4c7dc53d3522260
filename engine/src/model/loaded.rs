//! A loaded model: weights, tokenizer and metadata together.

use super::config::ModelInfo;
use super::llama::Llama;

/// A model ready to serve: weights `M` (a decoder, [`Llama`], unless said otherwise), its
/// tokenizer and metadata.
pub struct Loaded<M = Llama> {
    pub model: M,
    pub tokenizer: tokenizers::Tokenizer,
    pub info: ModelInfo,
}

/// A loaded decoder, which generates (and embeds).
pub type LoadedModel = Loaded<Llama>;
