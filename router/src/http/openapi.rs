//! The router's OpenAPI document, served at `GET /openapi.json`.
//!
//! Request schemas are derived from the request types themselves
//! ([`crate::prepare::request`]), with each field's bounds as validation checks them,
//! so the document cannot drift from what the router parses. Fields whose
//! JSON shape serde reads loosely (raw JSON, untagged enums) get the
//! schemas below, written to accept exactly what validation accepts: the
//! document is used to fuzz the router, so a schema wider or narrower than
//! validation shows up as a false failure.

use axum::http::header;
use axum::response::{IntoResponse, Response};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::http::error::{ErrorObject, ErrorResponse};

use crate::prepare::embeddings::EmbeddingRequest;
use crate::prepare::request::responses::{ResponsesNotHonoured, ResponsesRequest};
use crate::prepare::request::{
    ChatCompletionRequest, ChatMessage, ChatRenderParams, CommonParams, CompletionRequest, ContentPart,
    DetokenizeRequest, MessageContent, StreamOptions, TokenizeRequest,
};
use crate::prepare::scoring::{RerankRequest, ScoreRequest};

/// The document's root: every route the router serves.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "pdserve router",
        contact(name = "pdserve"),
        description = "OpenAI-compatible API of the pdserve disaggregated serving cluster, with vLLM's extras. \
            Every field of the OpenAI and vLLM request bodies is either honoured or refused with a 400 naming \
            it; fields of neither API are ignored."
    ),
    servers((url = "/", description = "The router that serves this document")),
    tags(
        (name = "openai", description = "OpenAI's API, with vLLM's extra fields"),
        (name = "vllm", description = "vLLM's own endpoints"),
        (name = "meta", description = "Probes, metrics and this document"),
    ),
    modifiers(&BearerScheme, &Aliases),
    paths(
        crate::http::generate::chat_completions,
        crate::http::generate::completions,
        crate::http::generate::responses,
        crate::http::embeddings::embeddings,
        crate::http::embeddings::pooling,
        crate::http::embeddings::score,
        crate::http::embeddings::rerank,
        crate::http::meta::models,
        crate::http::meta::health,
        crate::http::meta::ready,
        crate::http::meta::render_metrics,
        crate::http::openapi::openapi_json,
        crate::http::tokenize::tokenize,
        crate::http::tokenize::detokenize,
        crate::http::tokenize::version,
        crate::http::tokenize::tokenizer_info,
    ),
    components(schemas(
        ChatCompletionRequest,
        CompletionRequest,
        ResponsesRequest,
        ResponsesNotHonoured,
        EmbeddingRequest,
        ScoreRequest,
        RerankRequest,
        ChatRenderParams,
        CommonParams,
        ChatMessage,
        MessageContent,
        ContentPart,
        StreamOptions,
        TokenizeRequest,
        DetokenizeRequest,
        ErrorResponse,
        ErrorObject,
    ))
)]
pub struct ApiDoc;

/// The `bearer` security scheme the authenticated routes name: `Authorization: Bearer <key>`,
/// required only when the router is started with API keys.
struct BearerScheme;

impl Modify for BearerScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let scheme = HttpBuilder::new()
            .scheme(HttpAuthScheme::Bearer)
            .description(Some("An API key, when the router is started with `--api-keys`; none otherwise"))
            .build();
        openapi
            .components
            .get_or_insert_with(Default::default)
            .add_security_scheme("bearer", SecurityScheme::Http(scheme));
    }
}

/// The paths served under other names too, as vLLM serves them: each a copy of its operation with
/// its own `operationId`.
pub const ALIASES: [(&str, &str); 3] = [("/score", "/v1/score"), ("/rerank", "/v1/rerank"), ("/rerank", "/v2/rerank")];

struct Aliases;

impl Modify for Aliases {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        for (path, alias) in ALIASES {
            let Some(mut item) = openapi.paths.paths.get(path).cloned() else { continue };
            let suffix = alias.trim_start_matches('/').replace('/', "_");
            if let Some(operation) = item.post.as_mut() {
                operation.operation_id = Some(suffix);
            }
            openapi.paths.paths.insert(alias.to_owned(), item);
        }
    }
}

/// The document as JSON text.
pub fn document() -> String {
    ApiDoc::openapi().to_pretty_json().unwrap_or_default()
}

/// `GET /openapi.json`: built once, it never changes while the router runs.
#[utoipa::path(get, path = "/openapi.json", description = "This document.", tag = "meta",
    responses((status = 200, description = "This OpenAPI document", content_type = "application/json")))]
pub async fn openapi_json() -> Response {
    static DOCUMENT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let document = DOCUMENT.get_or_init(document).clone();
    ([(header::CONTENT_TYPE, "application/json")], document).into_response()
}

#[cfg(test)]
mod tests;
