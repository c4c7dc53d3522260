//! vLLM's utility endpoints: `POST /tokenize`, `POST /detokenize`, `GET /tokenizer_info`,
//! `GET /version`.
//!
//! Tokenization goes through the same functions as the generation endpoints
//! (`tokenize`, `validation::chat_messages`), so `/tokenize` returns exactly
//! the prompt ids a chat or completion request would run.

use axum::extract::{Query, State};
use axum::Json;

use crate::fleet::model::Model;
use crate::http::error::ErrorResponse;
use crate::http::error::{ApiError, AppJson};
use crate::http::state::AppState;
use crate::prepare::request::{DetokenizeRequest, TokenizeRequest};
use crate::prepare::tokenize;
use crate::prepare::validate::{chat_messages, chat_render, chat_tools, ValidationError};
use crate::respond::response::{DetokenizeResponse, TokenizeResponse, TokenizerInfo, VersionResponse};
use crate::tenancy::Caller;

/// `POST /tokenize`.
#[utoipa::path(post, path = "/tokenize", description = "vLLM's tokenize: a prompt or a conversation, rendered and tokenized as generation would.", tag = "vllm", request_body = TokenizeRequest, security((), ("bearer" = [])), responses(
    (status = 200, description = "`tokens`, `count`, `max_model_len`, maybe `token_strs`", body = TokenizeResponse),
    (status = 400, description = "A parameter is missing or invalid; `param` names it", body = ErrorResponse),
    (status = 401, description = "API keys are configured and none valid was given", body = ErrorResponse),
    (status = 403, description = "The key's tenant may not use `model`", body = ErrorResponse),
    (status = 404, description = "`model` is not a served model", body = ErrorResponse),
    (status = 503, description = "The model is still loading", body = ErrorResponse)))]
pub async fn tokenize(
    State(state): State<AppState>,
    caller: Caller,
    AppJson(body): AppJson<TokenizeRequest>,
) -> Result<Json<TokenizeResponse>, ApiError> {
    let (_, model) = state.model(body.model.as_deref()).await?;
    caller.authorize(&model.served_name)?;
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
#[utoipa::path(post, path = "/detokenize", description = "vLLM's detokenize: token ids to text, special tokens kept.", tag = "vllm", request_body = DetokenizeRequest, security((), ("bearer" = [])), responses(
    (status = 200, description = "The decoded `prompt`", body = DetokenizeResponse),
    (status = 400, description = "`tokens` is missing or out of the vocabulary", body = ErrorResponse),
    (status = 401, description = "API keys are configured and none valid was given", body = ErrorResponse),
    (status = 403, description = "The key's tenant may not use `model`", body = ErrorResponse),
    (status = 404, description = "`model` is not a served model", body = ErrorResponse),
    (status = 503, description = "The model is still loading", body = ErrorResponse)))]
pub async fn detokenize(
    State(state): State<AppState>,
    caller: Caller,
    AppJson(body): AppJson<DetokenizeRequest>,
) -> Result<Json<DetokenizeResponse>, ApiError> {
    let (_, model) = state.model(body.model.as_deref()).await?;
    caller.authorize(&model.served_name)?;
    let tokens = body.tokens.ok_or(ValidationError::Missing { field: "tokens" })?;
    let ids = tokenize::vocab_ids(&model, "tokens", &tokens)?;
    Ok(Json(DetokenizeResponse { prompt: tokenize::decode(&model, &ids)? }))
}

/// `GET /tokenizer_info`'s query.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct TokenizerInfoQuery {
    /// The served model; needed only when several are served.
    pub model: Option<String>,
}

/// `GET /tokenizer_info`: the model's tokenizer settings and chat template, as vLLM's.
#[utoipa::path(get, path = "/tokenizer_info", description = "vLLM's tokenizer info: special tokens, context length and chat template.", tag = "vllm", params(TokenizerInfoQuery), security((), ("bearer" = [])),
    responses(
        (status = 200, description = "The tokenizer's special tokens, context length and chat template", body = TokenizerInfo),
        (status = 400, description = "Several models are served and none was named", body = ErrorResponse),
        (status = 401, description = "API keys are configured and none valid was given", body = ErrorResponse),
        (status = 403, description = "The key's tenant may not use `model`", body = ErrorResponse),
        (status = 404, description = "`model` is not a served model", body = ErrorResponse),
        (status = 503, description = "The model is still loading", body = ErrorResponse)))]
pub async fn tokenizer_info(
    State(state): State<AppState>,
    caller: Caller,
    Query(query): Query<TokenizerInfoQuery>,
) -> Result<Json<TokenizerInfo>, ApiError> {
    let (_, model) = state.model(query.model.as_deref()).await?;
    caller.authorize(&model.served_name)?;
    Ok(Json(TokenizerInfo {
        tokenizer_class: "PreTrainedTokenizerFast",
        eos_token: model.eos_token.clone(),
        bos_token: model.bos_token.clone(),
        add_bos_token: model.bos_token_id.is_some(),
        model_max_length: model.context_length,
        chat_template: Some(model.template_source.clone()).filter(|t| !t.trim().is_empty()),
    }))
}

/// `GET /version`: needs no model, so it answers while the card loads.
#[utoipa::path(get, path = "/version", description = "The router's version.", tag = "vllm",
    responses((status = 200, description = "The router's `version`", body = VersionResponse)))]
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
        // Tools are rendered by the chat template only: with a plain prompt they would be ignored.
        (Some(_), None) if req.tools.is_some() => Err(ValidationError::Unsupported {
            field: "tools",
            reason: "tools are rendered only with `messages`".into(),
        }),
        (Some(prompt), None) => tokenize::text_ids(model, prompt, req.add_special_tokens.unwrap_or(true)),
        (None, Some(_)) => chat_ids(model, req),
        (None, None) => Err(ValidationError::Missing { field: "prompt" }),
    }
}

/// Renders and tokenizes the chat form exactly as `/v1/chat/completions` does,
/// with the same tools and rendering options.
fn chat_ids(model: &Model, req: TokenizeRequest) -> Result<Vec<u32>, ValidationError> {
    let messages = chat_messages(req.messages)?;
    // Without `tool_choice`, tools are offered whenever there are any, as in chat.
    let tools = chat_tools(req.tools, None)?;
    let render = chat_render(req.render, &messages, tools)?;
    let ids = tokenize::render_chat(model, &messages, &render)?;
    // The rendered chat already holds the template's special tokens; vLLM adds
    // the tokenizer's (BOS) on top only when asked.
    Ok(if req.add_special_tokens.unwrap_or(false) { tokenize::with_bos(model, ids) } else { ids })
}
