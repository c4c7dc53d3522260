//! A property of SSE framing: whatever text a model generates (newlines,
//! carriage returns, `data:` and `[DONE]` inside it, any Unicode) and however
//! its tokens are chunked, a client reading the stream by the SSE rules gets
//! one JSON chunk per event, their texts concatenated are exactly that text,
//! and the stream ends with one `[DONE]`.

use std::sync::Arc;

use axum::body::{to_bytes, Body};
use axum::http::Request;
use futures::stream::{self, StreamExt};
use proptest::prelude::*;
use proto::worker::ModelCard;
use serde_json::{json, Value};
use tower::ServiceExt;

use router::backend::{Backend, Finish, GenerateRequest, TokenChunk, TokenStream};
use router::fleet::model::Model;
use router::http::app::app;
use router::http::state::AppState;
use router::testutil::{card, EOS};

/// Streams `chunks` of byte tokens, then EOS.
struct Scripted {
    chunks: Vec<Vec<u32>>,
}

impl Backend for Scripted {
    fn generate(&self, _: GenerateRequest) -> TokenStream {
        let mut chunks: Vec<_> =
            self.chunks.iter().map(|ids| Ok(TokenChunk { token_ids: ids.clone(), ..TokenChunk::default() })).collect();
        chunks.push(Ok(TokenChunk { token_ids: vec![EOS], finish: Some(Finish::Stop), ..TokenChunk::default() }));
        stream::iter(chunks).boxed()
    }
}

/// The `data` of each event of an SSE body, by the WHATWG rules: lines end
/// in CRLF, LF or CR; a blank line ends an event; `:` lines are comments;
/// one space after `data:` is dropped; several `data` lines join with LF.
fn sse_events(body: &str) -> Vec<String> {
    let body = body.replace("\r\n", "\n").replace('\r', "\n");
    let mut events = Vec::new();
    let mut data: Option<String> = None;
    for line in body.split('\n') {
        if line.is_empty() {
            events.extend(data.take());
            continue;
        }
        if line.starts_with(':') {
            continue;
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        if field == "data" {
            let value = value.strip_prefix(' ').unwrap_or(value);
            data = Some(match data {
                Some(previous) => format!("{previous}\n{value}"),
                None => value.to_owned(),
            });
        }
    }
    events.extend(data);
    events
}

/// Text fragments that stress the framing, and any character at all.
fn fragment() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("\n".to_owned()),
        Just("\r".to_owned()),
        Just("\r\n".to_owned()),
        Just("\n\n".to_owned()),
        Just("data: ".to_owned()),
        Just("[DONE]".to_owned()),
        Just(": comment".to_owned()),
        Just("\"}".to_owned()),
        Just("\u{2028}".to_owned()),
        Just("é".to_owned()),
        Just("😀".to_owned()),
        any::<char>().prop_map(String::from),
        "[a-z ]{0,6}",
    ]
}

/// A text and its bytes as tokens, cut into chunks of 1 to 5 tokens.
fn generation() -> impl Strategy<Value = (String, Vec<Vec<u32>>)> {
    prop::collection::vec(fragment(), 0..24).prop_map(|fragments| fragments.concat()).prop_flat_map(|text| {
        let ids: Vec<u32> = text.bytes().map(u32::from).collect();
        let n = ids.len();
        (Just(text), prop::collection::vec(1..=5usize, n.max(1)), Just(ids)).prop_map(|(text, sizes, ids)| {
            let mut chunks = Vec::new();
            let mut rest = ids.as_slice();
            for size in sizes {
                if rest.is_empty() {
                    break;
                }
                let (head, tail) = rest.split_at(size.min(rest.len()));
                chunks.push(head.to_vec());
                rest = tail;
            }
            (text, chunks)
        })
    })
}

async fn streamed_text(chunks: Vec<Vec<u32>>, chat: bool) -> (Vec<String>, String) {
    // A context long enough that no generation here is cut by max_tokens.
    let card = ModelCard { context_length: 1 << 16, ..card() };
    let model = Model::from_card(&card, None).unwrap();
    let app = app(AppState::ready(model, Arc::new(Scripted { chunks })));
    let (path, body) = if chat {
        ("/v1/chat/completions", json!({"messages": [{"role": "user", "content": "Hi"}], "stream": true}))
    } else {
        ("/v1/completions", json!({"prompt": "Hi", "stream": true}))
    };
    let request =
        Request::post(path).header("content-type", "application/json").body(Body::from(body.to_string())).unwrap();
    let response = app.oneshot(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let bytes = to_bytes(response.into_body(), usize::MAX).await.unwrap();
    let events = sse_events(std::str::from_utf8(&bytes).expect("an SSE body is UTF-8"));
    let mut text = String::new();
    for event in events.iter().take(events.len().saturating_sub(1)) {
        let chunk: Value = serde_json::from_str(event).unwrap_or_else(|e| panic!("event {event:?}: {e}"));
        let choice = &chunk["choices"][0];
        let piece = if chat { &choice["delta"]["content"] } else { &choice["text"] };
        text.push_str(piece.as_str().unwrap_or_default());
    }
    (events, text)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn any_text_survives_sse_framing_whole((text, chunks) in generation(), chat in any::<bool>()) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let (events, streamed) = runtime.block_on(streamed_text(chunks, chat));
        prop_assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
        prop_assert_eq!(events.iter().filter(|e| *e == "[DONE]").count(), 1);
        prop_assert_eq!(streamed, text);
    }
}

#[test]
fn the_sse_reader_follows_the_rules() {
    let body = ": keep-alive\r\ndata: a\r\n\r\ndata:b\rdata: c\r\rdata: [DONE]\n\n";
    assert_eq!(sse_events(body), ["a", "b\nc", "[DONE]"]);
}
