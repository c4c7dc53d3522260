//! `POST /v1/embeddings`: OpenAI's body (with vLLM's extras) and its checks, into one prompt per
//! input.

use serde::Deserialize;
use serde_json::{Map, Value};
use utoipa::ToSchema;

use crate::backend::Pooling;
use crate::fleet::model::Model;
use crate::fleet::model::Serves;
use crate::prepare::request::{objects, schema, ChatMessage, ChatRenderParams, Prompt, MAX_PROMPTS};
use crate::prepare::tokenize;
use crate::prepare::validate::{cache_salt, chat_messages, chat_render, out_of_range, priority, ValidationError};

/// Body of `POST /v1/embeddings`.
#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct EmbeddingRequest {
    /// Must equal the served model name; absent means the served model.
    pub model: Option<String>,
    /// What to embed: a text, a list of texts, token ids or a list of token-id lists (each
    /// embedded on its own, at most 64); this or `messages` is required.
    #[schema(schema_with = schema::prompt)]
    pub input: Option<Prompt>,
    /// vLLM's chat form: one conversation, rendered by the model's chat template (or
    /// `chat_template`) and embedded as one input; instead of `input`.
    #[schema(min_items = 1)]
    #[serde(default, deserialize_with = "objects")]
    pub messages: Option<Vec<ChatMessage>>,
    /// Chat form: end the rendered conversation with the assistant's turn header; default false.
    pub add_generation_prompt: Option<bool>,
    /// Chat form: leave the last message, an assistant's, open; default false.
    pub continue_final_message: Option<bool>,
    /// Chat form: a Jinja chat template to use instead of the model's.
    pub chat_template: Option<String>,
    /// Chat form: extra template variables; an object.
    #[schema(value_type = Option<Object>)]
    pub chat_template_kwargs: Option<Value>,
    /// `float` (default): each embedding a list of numbers; `base64`: the little-endian f32
    /// bytes of each, base64-encoded.
    pub encoding_format: Option<EncodingFormat>,
    /// Values per embedding: only the model's own size (it was not trained to be cut shorter).
    #[schema(minimum = 1)]
    pub dimensions: Option<i64>,
    /// The end user, logged.
    pub user: Option<String>,
    /// vLLM extra: add the tokenizer's special tokens (BOS; an encoder's `[CLS]` and `[SEP]`) to a
    /// text input; default true, and false for `messages` (the template has put its own).
    pub add_special_tokens: Option<bool>,
    /// vLLM extra: scale each embedding to unit length; default true.
    pub normalize: Option<bool>,
    /// vLLM extra: keep only the last this many tokens of each input (-1: as many as the
    /// context holds).
    pub truncate_prompt_tokens: Option<i64>,
    /// How the final hidden states of an input's tokens become one vector: `last` (the causal
    /// model's whole input is behind its last token), `mean` or `cls` (the first token); default
    /// the model's own (its Sentence-Transformers pooling config's), else `last`.
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
    let inputs = match (req.input, req.messages) {
        (Some(_), Some(_)) => {
            return Err(ValidationError::Unsupported {
                field: "messages",
                reason: "give either `input` or `messages`, not both".into(),
            })
        }
        (None, None) => return Err(ValidationError::Missing { field: "input" }),
        (None, Some(messages)) => {
            let render = ChatRenderParams {
                add_generation_prompt: Some(req.add_generation_prompt.unwrap_or(false)),
                continue_final_message: req.continue_final_message,
                chat_template: req.chat_template,
                chat_template_kwargs: req.chat_template_kwargs,
            };
            let messages = chat_messages(Some(messages))?;
            let render = chat_render(render, &messages, None)?;
            let ids = tokenize::render_chat(model, &messages, &render)?;
            // The template has put its special tokens; the tokenizer's BOS only when asked.
            vec![if req.add_special_tokens.unwrap_or(false) { tokenize::with_bos(model, ids) } else { ids }]
        }
        (Some(input), None) => {
            let chat_only = [
                (req.add_generation_prompt.is_some(), "add_generation_prompt"),
                (req.continue_final_message.is_some(), "continue_final_message"),
                (req.chat_template.is_some(), "chat_template"),
                (req.chat_template_kwargs.is_some(), "chat_template_kwargs"),
            ];
            if let Some((_, field)) = chat_only.into_iter().find(|(given, _)| *given) {
                return Err(ValidationError::Unsupported {
                    field,
                    reason: "applies to the chat form (`messages`) only".into(),
                });
            }
            input_ids(model, input, req.add_special_tokens.unwrap_or(true))?
        }
    };
    let inputs = fit(model, inputs, req.truncate_prompt_tokens, "input")?;
    let dimensions = match req.dimensions {
        None => None,
        Some(d) => {
            let d = u32::try_from(d).ok().filter(|&d| d >= 1).ok_or_else(|| out_of_range("dimensions", ">= 1", d))?;
            match model.embedding_size {
                Some(size) if size != d => return Err(not_matryoshka(size as usize, d)),
                _ => Some(d),
            }
        }
    };
    let pooling = match req.pooling {
        None => Pooling::Model,
        Some(PoolingType::Last) => Pooling::Last,
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

/// `dimensions` other than the model's own size, which it was not trained to cut to.
pub(crate) fn not_matryoshka(size: usize, wanted: u32) -> ValidationError {
    ValidationError::Unsupported {
        field: "dimensions",
        reason: format!(
            "this model's embeddings have {size} dimensions and it was not trained for shorter ones (Matryoshka), \
             so {wanted} cannot be given"
        ),
    }
}

/// The token ids of each input of the `input` form.
fn input_ids(model: &Model, input: Prompt, add_special_tokens: bool) -> Result<Vec<Vec<u32>>, ValidationError> {
    Ok(match input {
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
    // A decoder's worker keeps a position after the prompt; an encoder's prompt may fill the context.
    let room = model.context_length as usize - usize::from(model.serves == Serves::Generation);
    let keep = match truncate_prompt_tokens {
        None => None,
        Some(-1) => Some(room),
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
            if ids.len() > room {
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

    /// An encoder's input may fill its context: it generates nothing after it.
    #[test]
    fn an_encoder_input_may_fill_the_context() {
        let encoder = Model::from_card(&proto::worker::ModelCard { encoder: true, ..card() }, None).unwrap();
        let full = vec![1; encoder.context_length as usize];
        assert_eq!(fit(&encoder, vec![full.clone()], None, "input").unwrap(), [full]);
        let over = vec![1; encoder.context_length as usize + 1];
        assert!(fit(&encoder, vec![over], None, "input").is_err());
    }

    fn body(json: serde_json::Value) -> EmbeddingRequest {
        serde_json::from_value(json).unwrap()
    }

    /// vLLM's chat form: the conversation rendered as chat renders it, without the assistant's
    /// turn header unless asked; one input.
    #[test]
    fn messages_render_through_the_chat_template_as_one_input() {
        let model = model();
        let messages = serde_json::json!([{"role": "user", "content": "hi"}]);
        let valid = validate_embedding(&model, body(serde_json::json!({"messages": messages}))).unwrap();
        let rendered = tokenize::render_chat(
            &model,
            &chat_messages(serde_json::from_value(messages.clone()).unwrap()).unwrap(),
            &chat_render(ChatRenderParams { add_generation_prompt: Some(false), ..Default::default() }, &[], None)
                .unwrap(),
        )
        .unwrap();
        assert_eq!(valid.inputs, std::slice::from_ref(&rendered));
        let open = body(serde_json::json!({"messages": messages, "add_generation_prompt": true}));
        let open = validate_embedding(&model, open).unwrap();
        assert!(open.inputs[0].len() > rendered.len() && open.inputs[0].starts_with(&rendered), "{open:?}");
    }

    #[test]
    fn input_and_messages_exclude_each_other_and_chat_fields_need_messages() {
        let model = model();
        let messages = serde_json::json!([{"role": "user", "content": "hi"}]);
        let both = body(serde_json::json!({"input": "hi", "messages": messages}));
        let error = validate_embedding(&model, both).unwrap_err();
        assert!(matches!(error, ValidationError::Unsupported { field: "messages", .. }), "{error:?}");
        let stray = body(serde_json::json!({"input": "hi", "chat_template_kwargs": {}}));
        let error = validate_embedding(&model, stray).unwrap_err();
        assert!(matches!(error, ValidationError::Unsupported { field: "chat_template_kwargs", .. }), "{error:?}");
        let error = validate_embedding(&model, body(serde_json::json!({}))).unwrap_err();
        assert!(matches!(error, ValidationError::Missing { field: "input" }), "{error:?}");
    }

    /// A card that says its embedding size has `dimensions` checked before anything runs.
    #[test]
    fn dimensions_other_than_the_cards_size_are_refused_up_front() {
        let sized = Model::from_card(&proto::worker::ModelCard { embedding_size: 8, ..card() }, None).unwrap();
        let error = validate_embedding(&sized, body(serde_json::json!({"input": "hi", "dimensions": 4}))).unwrap_err();
        assert!(matches!(error, ValidationError::Unsupported { field: "dimensions", .. }), "{error:?}");
        let own = validate_embedding(&sized, body(serde_json::json!({"input": "hi", "dimensions": 8}))).unwrap();
        assert_eq!(own.dimensions, Some(8));
    }

    /// No `pooling` leaves it to the model (the worker applies its own); a named one is sent.
    #[test]
    fn pooling_defaults_to_the_models_own() {
        let model = model();
        assert_eq!(
            validate_embedding(&model, body(serde_json::json!({"input": "hi"}))).unwrap().pooling,
            Pooling::Model
        );
        let mean = body(serde_json::json!({"input": "hi", "pooling": "mean"}));
        assert_eq!(validate_embedding(&model, mean).unwrap().pooling, Pooling::Mean);
    }
}
