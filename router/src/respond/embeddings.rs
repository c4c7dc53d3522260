//! The body of `POST /v1/embeddings`: OpenAI's list of embeddings and its usage.

use base64::Engine as _;
use serde::Serialize;
use utoipa::ToSchema;

use crate::prepare::embeddings::EncodingFormat;

/// OpenAI's `CreateEmbeddingResponse`, with vLLM's `id` and `created`.
#[derive(Debug, Serialize, ToSchema)]
pub struct EmbeddingList {
    /// `embd-<request id>`.
    pub id: String,
    /// Always `list`.
    pub object: &'static str,
    /// Unix seconds.
    pub created: u64,
    /// The served model name.
    pub model: String,
    /// One embedding per input, in input order.
    pub data: Vec<EmbeddingData>,
    /// Tokens of every input.
    pub usage: EmbeddingUsage,
}

/// vLLM's `PoolingResponse`: [`EmbeddingList`] with `pooling` objects.
#[derive(Debug, Serialize, ToSchema)]
pub struct PoolingList {
    /// `pool-<request id>`.
    pub id: String,
    /// Always `list`.
    pub object: &'static str,
    /// Unix seconds.
    pub created: u64,
    /// The served model name.
    pub model: String,
    /// One per input, in input order.
    pub data: Vec<PoolingData>,
    /// Tokens of every input.
    pub usage: EmbeddingUsage,
}

/// One input's pooled vector, as `/pooling` answers it.
#[derive(Debug, Serialize, ToSchema)]
pub struct PoolingData {
    /// Always `pooling`.
    pub object: &'static str,
    /// The input's position.
    pub index: u32,
    /// The vector, as `encoding_format` asked.
    pub data: EmbeddingVector,
}

/// One input's embedding.
#[derive(Debug, Serialize, ToSchema)]
pub struct EmbeddingData {
    /// Always `embedding`.
    pub object: &'static str,
    /// The input's position in `input`.
    pub index: u32,
    /// The vector: numbers, or with `encoding_format: base64` the base64 of its little-endian
    /// f32 bytes.
    pub embedding: EmbeddingVector,
}

/// An embedding as `encoding_format` asked for it.
#[derive(Debug, Serialize, ToSchema)]
#[serde(untagged)]
pub enum EmbeddingVector {
    /// `float`.
    Float(Vec<f32>),
    /// `base64`.
    Base64(String),
}

impl EmbeddingVector {
    /// `values` in `format`.
    pub fn new(values: Vec<f32>, format: EncodingFormat) -> Self {
        match format {
            EncodingFormat::Float => Self::Float(values),
            EncodingFormat::Base64 => {
                let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
                Self::Base64(base64::engine::general_purpose::STANDARD.encode(bytes))
            }
        }
    }
}

/// The usage of an embedding request: its inputs' tokens, nothing generated.
#[derive(Debug, Serialize, ToSchema)]
pub struct EmbeddingUsage {
    /// Tokens of every input.
    pub prompt_tokens: u32,
    /// The same: nothing is generated.
    pub total_tokens: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_is_the_little_endian_f32_bytes() {
        let EmbeddingVector::Base64(text) = EmbeddingVector::new(vec![1.0, -0.5], EncodingFormat::Base64) else {
            panic!("not base64")
        };
        let bytes = base64::engine::general_purpose::STANDARD.decode(text).unwrap();
        assert_eq!(bytes, [1.0f32.to_le_bytes(), (-0.5f32).to_le_bytes()].concat());
    }
}
