//! `--mock-http-listen`: an OpenAI HTTP face of the mock decode worker, for
//! benchmarks only.
//!
//! It is the "direct" baseline of the router-overhead benchmark (a server
//! that answers as fast as HTTP allows, with nothing in front of it) and the
//! worker that gateways which speak HTTP to their workers (SMG) are pointed at.
//! Every completion is `max_tokens` repetitions of the mock's token, finished
//! by `length`; nothing is tokenized, so `usage.prompt_tokens` is 0.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::Deserialize;
use tokio::net::TcpListener;
use worker::mock::MockModel;

/// `max_tokens` when a request sets none: small, as a benchmark wants.
const DEFAULT_MAX_TOKENS: u32 = 16;

/// What every answer is made of, JSON-escaped once at start-up.
struct Face {
    /// The model name, as a JSON string literal.
    model: String,
    /// The token's text, as a JSON string literal.
    token: String,
    /// `/v1/models`, built once.
    models: String,
    next_id: AtomicU64,
}

/// The fields of a completion request the mock looks at; the rest is ignored.
#[derive(Debug, Deserialize)]
struct CompletionRequest {
    #[serde(default)]
    stream: bool,
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    n: Option<u32>,
    stream_options: Option<StreamOptions>,
}

#[derive(Debug, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// Which OpenAI endpoint: they differ only in object names and where the text goes.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Chat,
    Text,
}

/// Serves the face on `listener` until the process ends.
pub async fn serve(listener: TcpListener, model: &MockModel) -> anyhow::Result<()> {
    use axum::serve::ListenerExt;
    let name = serde_json::to_string(&model.card.model_name)?;
    let face = Arc::new(Face {
        models: format!(
            r#"{{"object":"list","data":[{{"id":{name},"object":"model","created":0,"owned_by":"pdserve"}}]}}"#
        ),
        model: name,
        token: serde_json::to_string(&model.token_text)?,
        next_id: AtomicU64::new(0),
    });
    let app = Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/health", get(|| async { "ok" }))
        .with_state(face);
    // The answers are small writes in a burst: Nagle would hold them back.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, app).await?;
    Ok(())
}

async fn models(State(face): State<Arc<Face>>) -> Response {
    json(face.models.clone())
}

async fn chat(State(face): State<Arc<Face>>, body: Bytes) -> Response {
    answer(&face, Kind::Chat, &body)
}

async fn completions(State(face): State<Arc<Face>>, body: Bytes) -> Response {
    answer(&face, Kind::Text, &body)
}

fn json(body: String) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

fn answer(face: &Face, kind: Kind, body: &[u8]) -> Response {
    let request: CompletionRequest = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => {
            let message = serde_json::to_string(&e.to_string()).unwrap_or_else(|_| "\"bad request\"".into());
            let error = format!(r#"{{"error":{{"message":{message},"type":"invalid_request_error","code":400}}}}"#);
            return (StatusCode::BAD_REQUEST, json(error)).into_response();
        }
    };
    let tokens = request.max_completion_tokens.or(request.max_tokens).unwrap_or(DEFAULT_MAX_TOKENS);
    let n = request.n.unwrap_or(1).max(1);
    let id = face.next_id.fetch_add(1, Ordering::Relaxed);
    let created = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (prefix, object) = match kind {
        Kind::Chat => ("chatcmpl", "chat.completion"),
        Kind::Text => ("cmpl", "text_completion"),
    };
    let head = format!(r#""id":"{prefix}-mock-{id}","created":{created},"model":{}"#, face.model);
    let completion_tokens = u64::from(tokens) * u64::from(n);
    let usage = format!(
        r#""usage":{{"prompt_tokens":0,"completion_tokens":{completion_tokens},"total_tokens":{completion_tokens}}}"#
    );
    if !request.stream {
        // The token text is a JSON string literal: its quotes come off to repeat it inside one.
        let inner = &face.token[1..face.token.len() - 1];
        let text = inner.repeat(tokens as usize);
        let choices: Vec<String> = (0..n)
            .map(|index| match kind {
                Kind::Chat => format!(
                    r#"{{"index":{index},"message":{{"role":"assistant","content":"{text}"}},"logprobs":null,"finish_reason":"length"}}"#
                ),
                Kind::Text => format!(r#"{{"index":{index},"text":"{text}","logprobs":null,"finish_reason":"length"}}"#),
            })
            .collect();
        return json(format!(r#"{{{head},"object":"{object}","choices":[{}],{usage}}}"#, choices.join(",")));
    }
    let object = match kind {
        Kind::Chat => "chat.completion.chunk",
        Kind::Text => "text_completion",
    };
    let mut events = Vec::with_capacity((n as usize) * (tokens as usize + 1) + 2);
    let event = |choice: String| format!("data: {{{head},\"object\":\"{object}\",\"choices\":[{choice}]}}\n\n");
    for index in 0..n {
        if let Kind::Chat = kind {
            events.push(event(format!(
                r#"{{"index":{index},"delta":{{"role":"assistant","content":""}},"logprobs":null,"finish_reason":null}}"#
            )));
        }
        for i in 0..tokens {
            let finish = if i + 1 == tokens { r#""length""# } else { "null" };
            events.push(event(match kind {
                Kind::Chat => format!(
                    r#"{{"index":{index},"delta":{{"content":{}}},"logprobs":null,"finish_reason":{finish}}}"#,
                    face.token
                ),
                Kind::Text => {
                    format!(r#"{{"index":{index},"text":{},"logprobs":null,"finish_reason":{finish}}}"#, face.token)
                }
            }));
        }
        if tokens == 0 {
            let choice = match kind {
                Kind::Chat => format!(r#"{{"index":{index},"delta":{{}},"logprobs":null,"finish_reason":"length"}}"#),
                Kind::Text => format!(r#"{{"index":{index},"text":"","logprobs":null,"finish_reason":"length"}}"#),
            };
            events.push(event(choice));
        }
    }
    if request.stream_options.is_some_and(|o| o.include_usage) {
        events.push(format!("data: {{{head},\"object\":\"{object}\",\"choices\":[],{usage}}}\n\n"));
    }
    events.push("data: [DONE]\n\n".to_string());
    // Every event is ready at once: one body write is what an instant worker sends (a stream of
    // one-event chunks would cost a flush per event, and make the baseline slower than it is).
    let body = Body::from(events.concat());
    ([(header::CONTENT_TYPE, "text/event-stream"), (header::CACHE_CONTROL, "no-cache")], body).into_response()
}
