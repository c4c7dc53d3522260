//! vLLM's utility endpoints: `POST /tokenize`, `POST /detokenize`, `GET /version`.
//!
//! Tokenization goes through the same functions as the generation endpoints
//! (`tokenize`, `validation::chat_messages`), so `/tokenize` returns exactly
//! the prompt ids a chat or completion request would run.

use axum::extract::State;
use axum::Json;

use crate::error::{ApiError, AppJson};
use crate::model::Model;
use crate::openai::request::{DetokenizeRequest, TokenizeRequest};
use crate::openai::response::{DetokenizeResponse, TokenizeResponse, VersionResponse};
use crate::server::AppState;
use crate::tokenize;
use crate::validation::{chat_messages, check_model, ValidationError};

/// `POST /tokenize`.
pub async fn tokenize(
    State(state): State<AppState>,
    AppJson(body): AppJson<TokenizeRequest>,
) -> Result<Json<TokenizeResponse>, ApiError> {
    let model = state.model().await?;
    check_model(&model, body.model.as_deref())?;
    let return_token_strs = body.return_token_strs.unwrap_or(false);
    let tokens = tokenize_request(&model, body)?;
    Ok(Json(TokenizeResponse {
        count: tokens.len(),
        max_model_len: model.context_length,
        token_strs: return_token_strs.then(|| tokenize::token_strs(&model, &tokens)),
        tokens,
    }))
}

/// `POST /detokenize`.
pub async fn detokenize(
    State(state): State<AppState>,
    AppJson(body): AppJson<DetokenizeRequest>,
) -> Result<Json<DetokenizeResponse>, ApiError> {
    let model = state.model().await?;
    check_model(&model, body.model.as_deref())?;
    let tokens = body.tokens.ok_or(ValidationError::Missing { field: "tokens" })?;
    let ids = tokenize::vocab_ids(&model, "tokens", &tokens)?;
    Ok(Json(DetokenizeResponse { prompt: tokenize::decode(&model, &ids)? }))
}

/// `GET /version`: needs no model, so it answers while the card loads.
pub async fn version() -> Json<VersionResponse> {
    Json(VersionResponse { version: env!("CARGO_PKG_VERSION") })
}

/// The ids of either form of a tokenize request.
fn tokenize_request(model: &Model, req: TokenizeRequest) -> Result<Vec<u32>, ValidationError> {
    match (&req.prompt, &req.messages) {
        (Some(_), Some(_)) => Err(ValidationError::Unsupported {
            field: "messages",
            reason: "give either `prompt` or `messages`, not both".into(),
        }),
        (Some(prompt), None) => tokenize::text_ids(model, prompt, req.add_special_tokens.unwrap_or(true)),
        (None, Some(_)) => chat_ids(model, req),
        (None, None) => Err(ValidationError::Missing { field: "prompt" }),
    }
}

/// Renders and tokenizes the chat form exactly as `/v1/chat/completions` does.
fn chat_ids(model: &Model, req: TokenizeRequest) -> Result<Vec<u32>, ValidationError> {
    check_chat_options(&req)?;
    let messages = chat_messages(req.messages)?;
    let ids = tokenize::chat_prompt(model, &messages)?;
    // The rendered chat already holds the template's special tokens; vLLM adds
    // the tokenizer's (BOS) on top only when asked.
    Ok(if req.add_special_tokens.unwrap_or(false) { tokenize::with_bos(model, ids) } else { ids })
}

/// Chat generation always renders the model's own template with the
/// generation prompt and no extra variables; any other rendering is refused
/// rather than answered with ids no chat request would use.
fn check_chat_options(req: &TokenizeRequest) -> Result<(), ValidationError> {
    let unsupported = |field, reason: &str| Err(ValidationError::Unsupported { field, reason: reason.into() });
    if req.add_generation_prompt == Some(false) {
        return unsupported("add_generation_prompt", "only true is supported");
    }
    if req.continue_final_message == Some(true) {
        return unsupported("continue_final_message", "only false is supported");
    }
    if req.chat_template.is_some() {
        return unsupported("chat_template", "only the model's chat template is supported");
    }
    if req.chat_template_kwargs.as_ref().is_some_and(|kwargs| !kwargs.is_empty()) {
        return unsupported("chat_template_kwargs", "template variables are not supported");
    }
    Ok(())
}
