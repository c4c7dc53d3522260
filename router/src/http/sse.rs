//! A generation's deltas as server-sent events, written from a task of
//! their own.

use std::convert::Infallible;

use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::IntoResponse;
use futures::stream::{BoxStream, StreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tracing::Instrument;

use crate::backend::{BackendError, Finish};
use crate::http::error::ApiError;
use crate::respond::format::{ChunkFormat, ResponseMeta};
use crate::respond::response::Usage;
use crate::respond::stream::Delta;

/// Stream events buffered between the generation task and the client.
const EVENT_BUFFER: usize = 32;

/// One streaming answer in the making.
pub struct Streamed<F> {
    /// The answer's id, model and choices.
    pub meta: ResponseMeta,
    /// How each chunk is written.
    pub format: F,
    /// The generation's deltas.
    pub deltas: BoxStream<'static, Result<Delta, BackendError>>,
    /// The prompt's length, for the usage chunk.
    pub prompt_tokens: usize,
    /// Whether a usage chunk ends the stream.
    pub include_usage: bool,
}

/// Runs the stream in its own task so a slow client never stalls the token
/// stream's bookkeeping, and stops it (dropping the generation) as soon as
/// the client goes away.
pub fn sse<F: ChunkFormat>(streamed: Streamed<F>) -> impl IntoResponse {
    let (tx, rx) = mpsc::channel(EVENT_BUFFER);
    tokio::spawn(write_events(streamed, tx).in_current_span());
    Sse::new(ReceiverStream::new(rx)).keep_alive(KeepAlive::default())
}

async fn write_events<F: ChunkFormat>(mut s: Streamed<F>, tx: mpsc::Sender<Result<Event, Infallible>>) {
    let send = |data: String| {
        let tx = tx.clone();
        async move { tx.send(Ok(Event::default().data(data))).await.is_ok() }
    };
    for chunk in s.format.opening(&s.meta) {
        if !send(chunk).await {
            return;
        }
    }
    let mut completion_tokens = 0;
    let mut first = true;
    let mut finished = vec![false; s.meta.n.max(1) as usize];
    loop {
        let next = tokio::select! {
            next = s.deltas.next() => next,
            () = tx.closed() => {
                tracing::info!("client disconnected");
                return;
            }
        };
        let delta = match next {
            None => break,
            Some(Ok(delta)) => delta,
            Some(Err(e)) => {
                let error = ApiError::from(e);
                tracing::warn!(%error, "stream failed");
                // Each choice the failure cut short ends visibly, as vLLM's
                // do: `finish_reason: "error"`, then the error itself.
                for index in (0..finished.len()).filter(|&i| !finished[i]) {
                    let end = Delta { index: index as u32, finish: Some(Finish::Error), ..Delta::default() };
                    for chunk in s.format.delta(&s.meta, &end, first) {
                        send(chunk).await;
                    }
                    first = false;
                }
                send(error.body().to_string()).await;
                break;
            }
        };
        if let Some(done) = finished.get_mut(delta.index as usize) {
            *done |= delta.finish.is_some();
        }
        completion_tokens += delta.token_ids.len();
        for chunk in s.format.delta(&s.meta, &delta, first) {
            if !send(chunk).await {
                return;
            }
        }
        first = false;
    }
    tracing::info!(prompt_tokens = s.prompt_tokens, completion_tokens, "request done");
    if s.include_usage {
        let usage = Usage::new(s.prompt_tokens as u32, completion_tokens as u32);
        send(s.format.usage(&s.meta, usage)).await;
    }
    send("[DONE]".to_owned()).await;
}
