//! vLLM's `/score` and the Jina / Cohere `/rerank` bodies and their checks: every text embedded once,
//! and the pairs whose cosine similarity is the answer (as vLLM scores with an embedding model).

use serde::Deserialize;
use serde_json::{Map, Value};
use utoipa::ToSchema;

use crate::backend::Pooling;
use crate::fleet::model::Model;
use crate::prepare::embeddings::{batch, fit, text_input, EncodingFormat, ValidEmbedding};
use crate::prepare::request::MAX_PROMPTS;
use crate::prepare::validate::{cache_salt, out_of_range, priority, ValidationError};

/// Body of vLLM's `POST /score` (also `/v1/score`).
#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct ScoreRequest {
    /// Must equal the served model name; absent means the served model.
    pub model: Option<String>,
    /// One text, scored against each of `text_2`; or a list as long as `text_2`, scored pair by pair.
    #[schema(schema_with = texts_schema, required = true)]
    pub text_1: Option<Texts>,
    /// The texts `text_1` is scored against.
    #[schema(schema_with = texts_schema, required = true)]
    pub text_2: Option<Texts>,
    /// vLLM extra: keep only the last this many tokens of each text (-1: as many as the context holds).
    pub truncate_prompt_tokens: Option<i64>,
    /// vLLM extra: admission and scheduling priority, lower first; default 0.
    pub priority: Option<i64>,
    /// vLLM extra: the request id, when no `X-Request-Id` header gives one.
    pub request_id: Option<String>,
    /// Isolates the texts' prefix cache; only requests with the same salt share it.
    #[schema(min_length = 1)]
    pub cache_salt: Option<String>,
    /// The end user, logged.
    pub user: Option<String>,
    /// Fields of neither API, ignored (and logged at debug level by name).
    #[serde(flatten)]
    #[schema(ignore)]
    pub unknown: Map<String, Value>,
}

/// Body of `POST /rerank` (also `/v1/rerank`, `/v2/rerank`): Jina's and Cohere's shape.
#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct RerankRequest {
    /// Must equal the served model name; absent means the served model.
    pub model: Option<String>,
    /// What the documents are ranked for.
    #[schema(min_length = 1, required = true)]
    pub query: Option<String>,
    /// The texts to rank (at most 63).
    #[schema(required = true, min_items = 1, max_items = 63)]
    pub documents: Option<Vec<String>>,
    /// Return the best this many; absent or 0: every document.
    #[schema(minimum = 0)]
    pub top_n: Option<i64>,
    /// Cohere's: include each document's text in its result; default true.
    pub return_documents: Option<bool>,
    /// vLLM extra: keep only the last this many tokens of each text (-1: as many as the context holds).
    pub truncate_prompt_tokens: Option<i64>,
    /// vLLM extra: admission and scheduling priority, lower first; default 0.
    pub priority: Option<i64>,
    /// vLLM extra: the request id, when no `X-Request-Id` header gives one.
    pub request_id: Option<String>,
    /// Isolates the texts' prefix cache; only requests with the same salt share it.
    #[schema(min_length = 1)]
    pub cache_salt: Option<String>,
    /// The end user, logged.
    pub user: Option<String>,
    /// Fields of neither API, ignored (and logged at debug level by name).
    #[serde(flatten)]
    #[schema(ignore)]
    pub unknown: Map<String, Value>,
}

/// `text_1` or `text_2` of a score request.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum Texts {
    /// One text.
    One(String),
    /// Several.
    Many(Vec<String>),
}

impl Texts {
    fn into_vec(self) -> Vec<String> {
        match self {
            Self::One(text) => vec![text],
            Self::Many(texts) => texts,
        }
    }
}

fn texts_schema() -> impl Into<utoipa::openapi::RefOr<utoipa::openapi::schema::Schema>> {
    use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, OneOfBuilder, Type};
    let text = || ObjectBuilder::new().schema_type(Type::String).min_length(Some(1));
    OneOfBuilder::new().item(text()).item(ArrayBuilder::new().items(text()).min_items(Some(1)).max_items(Some(32)))
}

/// A score or rerank request, checked: the texts to embed, and which pairs of them to compare.
#[derive(Debug, Clone)]
pub struct ValidScoring {
    /// Every text once, as an embedding request (last token, normalized: a dot product is the cosine).
    pub embedding: ValidEmbedding,
    /// The pairs `(a, b)` of inputs of `embedding` to score, in answer order.
    pub pairs: Vec<(usize, usize)>,
}

/// Most texts on each side of a score request: both sides together are at most [`MAX_PROMPTS`].
const MAX_SIDE: usize = MAX_PROMPTS / 2;

/// Checks a score request: `text_1` one text or as many as `text_2`.
pub fn validate_score(model: &Model, req: ScoreRequest) -> Result<ValidScoring, ValidationError> {
    let first = req.text_1.ok_or(ValidationError::Missing { field: "text_1" })?.into_vec();
    let second = req.text_2.ok_or(ValidationError::Missing { field: "text_2" })?.into_vec();
    for (texts, field) in [(&first, "text_1"), (&second, "text_2")] {
        batch(texts.len(), field)?;
        if texts.len() > MAX_SIDE {
            return Err(out_of_range(field, "at most 32 texts", texts.len()));
        }
    }
    if first.len() != 1 && first.len() != second.len() {
        return Err(ValidationError::Unsupported {
            field: "text_1",
            reason: format!("{} texts for {} in text_2: give one, or as many as text_2", first.len(), second.len()),
        });
    }
    let pairs = (0..second.len()).map(|j| (if first.len() == 1 { 0 } else { j }, first.len() + j)).collect();
    let mut inputs = tokenized(model, &first, req.truncate_prompt_tokens, "text_1")?;
    inputs.extend(tokenized(model, &second, req.truncate_prompt_tokens, "text_2")?);
    let embedding = embedding(inputs, req.priority, req.cache_salt)?;
    Ok(ValidScoring { embedding, pairs })
}

/// A rerank request, checked, and how many results it wants and whether with their texts.
pub fn validate_rerank(model: &Model, req: RerankRequest) -> Result<(ValidScoring, usize, bool), ValidationError> {
    let query = req.query.ok_or(ValidationError::Missing { field: "query" })?;
    let documents = req.documents.ok_or(ValidationError::Missing { field: "documents" })?;
    if documents.is_empty() {
        return Err(ValidationError::Empty { field: "documents" });
    }
    // With the query, one request's inputs.
    if documents.len() >= MAX_PROMPTS {
        return Err(out_of_range("documents", "at most 63 documents", documents.len()));
    }
    let top_n = match req.top_n {
        None | Some(0) => documents.len(),
        Some(n) if n >= 1 => (n as usize).min(documents.len()),
        Some(n) => return Err(out_of_range("top_n", ">= 0", n)),
    };
    let mut inputs = tokenized(model, std::slice::from_ref(&query), req.truncate_prompt_tokens, "query")?;
    inputs.extend(tokenized(model, &documents, req.truncate_prompt_tokens, "documents")?);
    let pairs = (1..=documents.len()).map(|d| (0, d)).collect();
    let embedding = embedding(inputs, req.priority, req.cache_salt)?;
    Ok((ValidScoring { embedding, pairs }, top_n, req.return_documents.unwrap_or(true)))
}

fn tokenized(
    model: &Model,
    texts: &[String],
    truncate_prompt_tokens: Option<i64>,
    field: &'static str,
) -> Result<Vec<Vec<u32>>, ValidationError> {
    let ids = texts.iter().map(|t| text_input(model, t, true, field)).collect::<Result<_, _>>()?;
    fit(model, ids, truncate_prompt_tokens, field)
}

fn embedding(
    inputs: Vec<Vec<u32>>,
    priority_field: Option<i64>,
    salt: Option<String>,
) -> Result<ValidEmbedding, ValidationError> {
    Ok(ValidEmbedding {
        inputs,
        encoding: EncodingFormat::Float,
        dimensions: None,
        pooling: Pooling::Model,
        normalize: true,
        priority: priority(priority_field)?,
        cache_salt: cache_salt(salt)?,
    })
}
