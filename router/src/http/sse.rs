//! A generation's deltas as server-sent events.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use axum::response::{IntoResponse, Response};
use futures::stream::{BoxStream, Stream, StreamExt};
use tokio::time::{Instant, Sleep};
use tracing::Span;

use crate::backend::{BackendError, Finish};
use crate::http::error::ApiError;
use crate::respond::format::{ChunkFormat, ResponseMeta, SseEvent};
use crate::respond::response::Usage;
use crate::respond::stream::Delta;

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

/// How long the answer's head waits for its first events: a first token that comes sooner goes
/// out with the head, in one write that wakes the client once; after a longer wait (a long
/// prompt prefilling) the head goes alone, and the keep-alive comments follow it.
const HEAD_WAIT: Duration = Duration::from_millis(50);

/// The answer as an event stream that hyper polls itself: no task or
/// channel between the generation and the connection, so a token costs no
/// extra wake-up on its way out. A client that goes away drops the body,
/// and with it the generation.
pub async fn sse<F: ChunkFormat>(streamed: Streamed<F>) -> Response {
    let mut events = EventStream::new(streamed, tracing::Span::current());
    let body = match tokio::time::timeout(HEAD_WAIT, events.next()).await {
        Ok(Some(first)) => Body::from_stream(futures::stream::once(std::future::ready(first)).chain(events)),
        Ok(None) | Err(_) => Body::from_stream(events),
    };
    ([(CONTENT_TYPE, "text/event-stream"), (CACHE_CONTROL, "no-cache")], body).into_response()
}

/// Events written as `event: ...` (when named) and `data: ...` lines into one buffer, sent as
/// one write: every delta already generated goes out together instead of one write (and one
/// wake-up of the connection) per event.
#[derive(Default)]
struct Events(String);

impl Events {
    /// Adds one event. Our payloads are single-line JSON (or `[DONE]`).
    fn push(&mut self, event: &SseEvent) {
        if let Some(name) = event.name {
            self.0.push_str("event: ");
            self.0.push_str(name);
            self.0.push('\n');
        }
        self.0.push_str("data: ");
        self.0.push_str(&event.data);
        self.0.push_str("\n\n");
    }

    fn extend(&mut self, events: Vec<SseEvent>) {
        for event in &events {
            self.push(event);
        }
    }

    /// Takes what was added, if anything, as one write.
    fn take(&mut self) -> Option<Bytes> {
        (!self.0.is_empty()).then(|| Bytes::from(std::mem::take(&mut self.0)))
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

/// The events of one answer, written as the generation's deltas arrive.
struct EventStream<F> {
    s: Streamed<F>,
    events: Events,
    progress: Progress,
    keep_alive: Pin<Box<Sleep>>,
    /// The request's span, entered while the stream is polled.
    span: Span,
    ended: bool,
}

impl<F: ChunkFormat> EventStream<F> {
    fn new(mut s: Streamed<F>, span: Span) -> Self {
        let mut events = Events::default();
        let opening_usage = s.continuous_usage.then(|| Usage::new(s.prompt_tokens as u32, 0));
        events.extend(s.format.opening(&s.meta, opening_usage));
        let prompts = (s.meta.n / s.meta.per_prompt.max(1)).max(1) as usize;
        let progress = Progress {
            completion_tokens: 0,
            cached_tokens: vec![None; prompts],
            first: true,
            finished: vec![false; s.meta.n.max(1) as usize],
        };
        Self { s, events, progress, keep_alive: Box::pin(tokio::time::sleep(KEEP_ALIVE)), span, ended: false }
    }
}

/// The closing events (for chunk streams: usage when asked, then `[DONE]`).
fn close<F: ChunkFormat>(s: &Streamed<F>, progress: &Progress, events: &mut Events) {
    tracing::info!(prompt_tokens = s.prompt_tokens, completion_tokens = progress.completion_tokens, "request done");
    let usage = Usage::new(s.prompt_tokens as u32, progress.completion_tokens as u32).cached(progress.cached());
    events.extend(s.format.closing(&s.meta, s.include_usage.then_some(usage)));
}

impl<F: ChunkFormat> Stream for EventStream<F> {
    type Item = Result<Bytes, Infallible>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let Self { s, events, progress, keep_alive, span, ended } = self.get_mut();
        if *ended {
            return Poll::Ready(None);
        }
        let _entered = span.enter();
        // Every delta already generated goes into one write.
        while let Poll::Ready(item) = s.deltas.poll_next_unpin(cx) {
            if !add(s, events, progress, item) {
                close(s, progress, events);
                *ended = true;
                return Poll::Ready(events.take().map(Ok));
            }
        }
        // The role chunks wait for the first token and go out with it, as
        // vLLM sends them: one write fewer, and no chunk without content.
        if !progress.first {
            if let Some(write) = events.take() {
                keep_alive.as_mut().reset(Instant::now() + KEEP_ALIVE);
                return Poll::Ready(Some(Ok(write)));
            }
        }
        if keep_alive.as_mut().poll(cx).is_ready() {
            events.0.push_str(":\n\n");
            keep_alive.as_mut().reset(Instant::now() + KEEP_ALIVE);
            return Poll::Ready(events.take().map(Ok));
        }
        Poll::Pending
    }
}

impl<F> Drop for EventStream<F> {
    fn drop(&mut self) {
        if !self.ended {
            let _entered = self.span.enter();
            tracing::info!("client disconnected");
        }
    }
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
                events.extend(s.format.delta(&s.meta, &end, progress.first, usage));
                progress.first = false;
            }
            events.extend(s.format.error(&s.meta, error.body()));
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
    events.extend(s.format.delta(&s.meta, &delta, progress.first, usage));
    progress.first = false;
    true
}
