//! The bodies of `/score` (vLLM's) and `/rerank` (Jina's and Cohere's).

use serde::Serialize;
use utoipa::ToSchema;

use crate::respond::embeddings::EmbeddingUsage;

/// vLLM's score response: one score per pair, in pair order.
#[derive(Debug, Serialize, ToSchema)]
pub struct ScoreList {
    /// `score-<request id>`.
    pub id: String,
    /// Always `list`.
    pub object: &'static str,
    /// Unix seconds.
    pub created: u64,
    /// The served model name.
    pub model: String,
    /// One score per pair of texts.
    pub data: Vec<ScoreData>,
    /// Tokens of every text.
    pub usage: EmbeddingUsage,
}

/// One pair's score.
#[derive(Debug, Serialize, ToSchema)]
pub struct ScoreData {
    /// The pair's position: that of its `text_2`.
    pub index: u32,
    /// Always `score`.
    pub object: &'static str,
    /// The cosine similarity of the two texts' embeddings, in [-1, 1].
    pub score: f32,
}

/// The rerank response: the documents by relevance, best first.
#[derive(Debug, Serialize, ToSchema)]
pub struct RerankResponse {
    /// `rerank-<request id>`.
    pub id: String,
    /// The served model name.
    pub model: String,
    /// Tokens of the query and every document.
    pub usage: RerankUsage,
    /// The best `top_n` documents, most relevant first.
    pub results: Vec<RerankResult>,
}

/// Jina's rerank usage.
#[derive(Debug, Serialize, ToSchema)]
pub struct RerankUsage {
    /// Tokens of the query and every document.
    pub total_tokens: u32,
}

/// One ranked document.
#[derive(Debug, Serialize, ToSchema)]
pub struct RerankResult {
    /// Its position in `documents`.
    pub index: u32,
    /// Its text, unless `return_documents` is false.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub document: Option<RerankDocument>,
    /// The cosine similarity of its embedding and the query's.
    pub relevance_score: f32,
}

/// A ranked document's text.
#[derive(Debug, Serialize, ToSchema)]
pub struct RerankDocument {
    pub text: String,
}

/// The cosine similarity of two vectors (the dot product of unit ones, computed whole so a
/// worker's rounding of the norm does not show).
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| f64::from(*x) * f64::from(*y)).sum();
    let norm = |v: &[f32]| v.iter().map(|x| f64::from(*x) * f64::from(*x)).sum::<f64>().sqrt();
    let denominator = norm(a) * norm(b);
    if denominator == 0.0 {
        0.0
    } else {
        (dot / denominator) as f32
    }
}
