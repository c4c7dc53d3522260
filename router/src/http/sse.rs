//! A generation's deltas as server-sent events, written from a task of
//! their own.

use std::convert::Infallible;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use axum::response::{IntoResponse, Response};
use futures::stream::{BoxStream, StreamExt};
use futures::FutureExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tracing::Instrument;

use crate::backend::{BackendError, Finish};
use crate::http::error::ApiError;
use crate::respond::format::{ChunkFormat, ResponseMeta};
use crate::respond::response::Usage;
use crate::respond::stream::Delta;

/// Writes (each one or more events) buffered between the generation task
/// and the client.
const EVENT_BUFFER: usize = 32;

/// An idle stream sends an empty comment this often, so proxies and load
/// balancers do not time it out while a long prompt prefills.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

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
    /// Whether every chunk carries the usage so far (vLLM's `continuous_usage_stats`).
    pub continuous_usage: bool,
}

impl<F> Streamed<F> {
    /// The usage so far, for every chunk when continuous usage is asked.
    fn running_usage(&self, progress: &Progress) -> Option<Usage> {
        let usage = Usage::new(self.prompt_tokens as u32, progress.completion_tokens as u32);
        self.continuous_usage.then(|| usage.cached(progress.cached()))
    }
}

/// Runs the stream in its own task so a slow client never stalls the token
/// stream's bookkeeping, and stops it (dropping the generation) as soon as
/// the client goes away.
pub fn sse<F: ChunkFormat>(streamed: Streamed<F>) -> Response {
    let (tx, rx) = mpsc::channel(EVENT_BUFFER);
    tokio::spawn(write_events(streamed, tx).in_current_span());
    let body = Body::from_stream(ReceiverStream::new(rx).map(Ok::<Bytes, Infallible>));
    ([(CONTENT_TYPE, "text/event-stream"), (CACHE_CONTROL, "no-cache")], body).into_response()
}

/// Events written as `data: ...` lines into one buffer, sent as one write:
/// every delta already generated goes out together instead of one write
/// (and one wake-up of the connection) per event.
#[derive(Default)]
struct Events(String);

impl Events {
    /// Adds one event. Our payloads are single-line JSON (or `[DONE]`).
    fn push(&mut self, data: &str) {
        self.0.push_str("data: ");
        self.0.push_str(data);
        self.0.push_str("\n\n");
    }

    /// Sends what was added, if anything; false once the client is gone.
    async fn send(&mut self, tx: &mpsc::Sender<Bytes>) -> bool {
        if self.0.is_empty() {
            return true;
        }
        tx.send(Bytes::from(std::mem::take(&mut self.0))).await.is_ok()
    }
}

/// Where a stream stands between writes.
struct Progress {
    completion_tokens: usize,
    /// Per prompt: its tokens served from the prefix cache, once a choice said.
    cached_tokens: Vec<Option<u32>>,
    first: bool,
    finished: Vec<bool>,
}

impl Progress {
    /// The prompt tokens served from the prefix cache, over every prompt that said.
    fn cached(&self) -> Option<u32> {
        self.cached_tokens.iter().flatten().copied().reduce(|a, b| a + b)
    }
}

async fn write_events<F: ChunkFormat>(mut s: Streamed<F>, tx: mpsc::Sender<Bytes>) {
    let mut events = Events::default();
    let opening_usage = s.continuous_usage.then(|| Usage::new(s.prompt_tokens as u32, 0));
    for chunk in s.format.opening(&s.meta, opening_usage) {
        events.push(&chunk);
    }
    let prompts = (s.meta.n / s.meta.per_prompt.max(1)).max(1) as usize;
    let mut progress = Progress {
        completion_tokens: 0,
        cached_tokens: vec![None; prompts],
        first: true,
        finished: vec![false; s.meta.n.max(1) as usize],
    };
    loop {
        // The role chunks wait for the first token and go out with it, as
        // vLLM sends them: one write fewer, and no chunk without content.
        if !progress.first && !events.send(&tx).await {
            return;
        }
        let next = tokio::select! {
            next = s.deltas.next() => next,
            () = tx.closed() => {
                tracing::info!("client disconnected");
                return;
            }
            () = tokio::time::sleep(KEEP_ALIVE) => {
                events.0.push_str(":\n\n");
                if !events.send(&tx).await {
                    return;
                }
                continue;
            }
        };
        // This delta and every one already generated, in one write.
        let mut next = Some(next);
        let mut ended = false;
        while let Some(item) = next {
            if !add(&mut s, &mut events, &mut progress, item) {
                ended = true;
                break;
            }
            next = s.deltas.next().now_or_never();
        }
        if ended {
            break;
        }
    }
    tracing::info!(prompt_tokens = s.prompt_tokens, completion_tokens = progress.completion_tokens, "request done");
    if s.include_usage {
        let usage = Usage::new(s.prompt_tokens as u32, progress.completion_tokens as u32).cached(progress.cached());
        events.push(&s.format.usage(&s.meta, usage));
    }
    events.push("[DONE]");
    events.send(&tx).await;
}

/// Adds the events of one item of the stream; false when it ended the stream.
fn add<F: ChunkFormat>(
    s: &mut Streamed<F>,
    events: &mut Events,
    progress: &mut Progress,
    item: Option<Result<Delta, BackendError>>,
) -> bool {
    let delta = match item {
        None => return false,
        Some(Ok(delta)) => delta,
        Some(Err(e)) => {
            let error = ApiError::from(e);
            tracing::warn!(%error, "stream failed");
            // Each choice the failure cut short ends visibly, as vLLM's
            // do: `finish_reason: "error"`, then the error itself.
            for index in (0..progress.finished.len()).filter(|&i| !progress.finished[i]) {
                let end = Delta { index: index as u32, finish: Some(Finish::Error), ..Delta::default() };
                let usage = s.running_usage(progress);
                for chunk in s.format.delta(&s.meta, &end, progress.first, usage) {
                    events.push(&chunk);
                }
                progress.first = false;
            }
            events.push(&error.body().to_string());
            return false;
        }
    };
    if let Some(done) = progress.finished.get_mut(delta.index as usize) {
        *done |= delta.finish.is_some();
    }
    progress.completion_tokens += delta.token_ids.len();
    if let Some(cached) = progress.cached_tokens.get_mut((delta.index / s.meta.per_prompt.max(1)) as usize) {
        *cached = delta.cached_tokens.or(*cached);
    }
    let usage = s.running_usage(progress);
    for chunk in s.format.delta(&s.meta, &delta, progress.first, usage) {
        events.push(&chunk);
    }
    progress.first = false;
    true
}
