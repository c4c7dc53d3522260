//! A loaded model: weights, tokenizer and metadata together.

use super::config::ModelInfo;
use super::llama::Llama;

/// A model ready to serve.
pub struct LoadedModel {
    pub model: Llama,
    pub tokenizer: tokenizers::Tokenizer,
    pub info: ModelInfo,
}
