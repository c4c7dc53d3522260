//! `POST /v1/embeddings`: OpenAI's body (with vLLM's extras) and its checks, into one prompt per
//! input.

use serde::Deserialize;
use serde_json::{Map, Value};
use utoipa::ToSchema;

use crate::backend::Pooling;
use crate::fleet::model::Model;
use crate::prepare::request::{schema, Prompt, MAX_PROMPTS};
use crate::prepare::tokenize;
use crate::prepare::validate::{cache_salt, out_of_range, priority, ValidationError};

/// Body of `POST /v1/embeddings`.
#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct EmbeddingRequest {
    /// Must equal the served model name; absent means the served model.
    pub model: Option<String>,
    /// What to embed: a text, a list of texts, token ids or a list of token-id lists (each
    /// embedded on its own, at most 64); required.
    #[schema(schema_with = schema::prompt, required = true)]
    pub input: Option<Prompt>,
    /// `float` (default): each embedding a list of numbers; `base64`: the little-endian f32
    /// bytes of each, base64-encoded.
    pub encoding_format: Option<EncodingFormat>,
    /// Values per embedding: only the model's own size (it was not trained to be cut shorter).
    #[schema(minimum = 1)]
    pub dimensions: Option<i64>,
    /// The end user, logged.
    pub user: Option<String>,
    /// vLLM extra: add the tokenizer's special tokens (BOS) to a text input; default true.
    pub add_special_tokens: Option<bool>,
    /// vLLM extra: scale each embedding to unit length; default true.
    pub normalize: Option<bool>,
    /// vLLM extra: keep only the last this many tokens of each input (-1: as many as the
    /// context holds).
    pub truncate_prompt_tokens: Option<i64>,
    /// How the final hidden states of an input's tokens become one vector: `last` (default, the
    /// causal model's whole input is behind its last token), `mean` or `cls` (the first token).
    pub pooling: Option<PoolingType>,
    /// vLLM extra: admission and scheduling priority, lower first; default 0.
    pub priority: Option<i64>,
    /// vLLM extra: the request id, when no `X-Request-Id` header gives one.
    pub request_id: Option<String>,
    /// vLLM extra: isolates the inputs' prefix cache; only requests with the same salt share it.
    #[schema(min_length = 1)]
    pub cache_salt: Option<String>,
    /// Fields of neither API, ignored (and logged at debug level by name).
    #[serde(flatten)]
    #[schema(ignore)]
    pub unknown: Map<String, Value>,
}

/// `encoding_format` of an embedding request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum EncodingFormat {
    /// A JSON list of numbers.
    #[default]
    Float,
    /// Base64 of the little-endian f32 bytes.
    Base64,
}

/// `pooling` of an embedding request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum PoolingType {
    /// The last token's.
    Last,
    /// The mean over every token.
    Mean,
    /// The first token's.
    Cls,
}

/// An embedding request, checked: one prompt per input.
#[derive(Debug, Clone)]
pub struct ValidEmbedding {
    /// Each input's token ids, in input order.
    pub inputs: Vec<Vec<u32>>,
    /// How the vectors are written.
    pub encoding: EncodingFormat,
    /// Values the client expects per vector, when it said.
    pub dimensions: Option<u32>,
    pub pooling: Pooling,
    pub normalize: bool,
    pub priority: i32,
    pub cache_salt: Option<String>,
}

/// Checks `req` against `model` and tokenizes its inputs.
pub fn validate_embedding(model: &Model, req: EmbeddingRequest) -> Result<ValidEmbedding, ValidationError> {
    let add_special_tokens = req.add_special_tokens.unwrap_or(true);
    let inputs = match req.input.ok_or(ValidationError::Missing { field: "input" })? {
        Prompt::Text(text) => vec![text_input(model, &text, add_special_tokens, "input")?],
        Prompt::Texts(texts) => {
            batch(texts.len(), "input")?;
            texts.iter().map(|t| text_input(model, t, add_special_tokens, "input")).collect::<Result<_, _>>()?
        }
        Prompt::TokenIds(ids) => vec![id_input(model, &ids)?],
        Prompt::TokenIdLists(lists) => {
            batch(lists.len(), "input")?;
            lists.iter().map(|ids| id_input(model, ids)).collect::<Result<_, _>>()?
        }
    };
    let inputs = fit(model, inputs, req.truncate_prompt_tokens, "input")?;
    let dimensions = match req.dimensions {
        None => None,
        Some(d) => {
            Some(u32::try_from(d).ok().filter(|&d| d >= 1).ok_or_else(|| out_of_range("dimensions", ">= 1", d))?)
        }
    };
    let pooling = match req.pooling {
        None | Some(PoolingType::Last) => Pooling::Last,
        Some(PoolingType::Mean) => Pooling::Mean,
        Some(PoolingType::Cls) => Pooling::Cls,
    };
    Ok(ValidEmbedding {
        inputs,
        encoding: req.encoding_format.unwrap_or_default(),
        dimensions,
        pooling,
        normalize: req.normalize.unwrap_or(true),
        priority: priority(req.priority)?,
        cache_salt: cache_salt(req.cache_salt)?,
    })
}

/// Each input checked not to be empty, cut to `truncate_prompt_tokens` (vLLM's: the end is kept;
/// -1 keeps what the context holds) and checked to fit the context; a refusal names `field`.
pub(crate) fn fit(
    model: &Model,
    inputs: Vec<Vec<u32>>,
    truncate_prompt_tokens: Option<i64>,
    field: &'static str,
) -> Result<Vec<Vec<u32>>, ValidationError> {
    let keep = match truncate_prompt_tokens {
        None => None,
        Some(-1) => Some(model.context_length as usize - 1),
        Some(k) if k >= 1 => Some(k as usize),
        Some(k) => return Err(out_of_range("truncate_prompt_tokens", ">= 1, or -1", k)),
    };
    inputs
        .into_iter()
        .map(|mut ids| {
            // A text can tokenize to nothing (characters the tokenizer drops).
            if ids.is_empty() {
                return Err(ValidationError::Empty { field });
            }
            if let Some(keep) = keep {
                ids.drain(..ids.len().saturating_sub(keep));
            }
            if ids.len() >= model.context_length as usize {
                let too_long =
                    ValidationError::PromptTooLong { prompt_tokens: ids.len(), context_length: model.context_length };
                return Err(ValidationError::Translated { param: field, source: Box::new(too_long) });
            }
            Ok(ids)
        })
        .collect()
}

/// Checks a list of inputs' size: not empty, at most [`MAX_PROMPTS`].
pub(crate) fn batch(inputs: usize, field: &'static str) -> Result<(), ValidationError> {
    match inputs {
        0 => Err(ValidationError::Empty { field }),
        n if n > MAX_PROMPTS => Err(out_of_range(field, "a list of at most 64 inputs", format!("{n} inputs"))),
        _ => Ok(()),
    }
}

/// A text input's token ids; a refusal names `field`.
pub(crate) fn text_input(
    model: &Model,
    text: &str,
    add_special_tokens: bool,
    field: &'static str,
) -> Result<Vec<u32>, ValidationError> {
    if text.is_empty() {
        return Err(ValidationError::Empty { field });
    }
    tokenize::text_ids(model, text, add_special_tokens)
        .map_err(|e| ValidationError::Translated { param: field, source: Box::new(e) })
}

fn id_input(model: &Model, ids: &[i64]) -> Result<Vec<u32>, ValidationError> {
    if ids.is_empty() {
        return Err(ValidationError::Empty { field: "input" });
    }
    tokenize::vocab_ids(model, "input", ids)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::card;

    fn model() -> Model {
        Model::from_card(&card(), None).unwrap()
    }

    /// A text that tokenizes to nothing must be refused before a worker sees an empty prompt
    /// (schemathesis found a 502 for one, with its fixed seed).
    #[test]
    fn an_input_with_no_tokens_is_refused_naming_its_field() {
        let error = fit(&model(), vec![vec![1], vec![]], None, "documents").unwrap_err();
        assert!(matches!(error, ValidationError::Empty { field: "documents" }), "{error:?}");
    }

    #[test]
    fn truncation_keeps_the_end_and_the_context_bounds_every_input() {
        let model = model();
        assert_eq!(fit(&model, vec![vec![1, 2, 3, 4]], Some(2), "input").unwrap(), [vec![3, 4]]);
        let long = vec![1; model.context_length as usize];
        let error = fit(&model, vec![long.clone()], None, "text_2").unwrap_err();
        assert!(matches!(error, ValidationError::Translated { param: "text_2", .. }), "{error:?}");
        assert_eq!(fit(&model, vec![long], Some(-1), "input").unwrap()[0].len(), model.context_length as usize - 1);
    }
}
