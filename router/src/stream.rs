//! From generated token ids to text deltas: incremental detokenization that
//! never splits a UTF-8 character, stop strings, `max_tokens`, and usage.
//!
//! [`Output`] is a synchronous state machine fed one token at a time, so it is
//! tested without any I/O; [`deltas`] drives it over a backend's token stream
//! and stops pulling (which cancels the generation) as soon as it finishes.

use std::sync::Arc;

use futures::stream::{self, BoxStream, StreamExt};
use tokenizers::Tokenizer;

use crate::pd::{BackendError, Finish, TokenStream};

/// Text decoded from the generated ids so far, handed out piece by piece.
///
/// Byte-level tokenizers may split one character over several tokens, and
/// decoding a lone token can differ from decoding it in context (leading
/// spaces). So each step decodes a short window: ids from `prefix_offset`,
/// compared with the same window up to `read_offset`; the difference is new
/// text unless it ends in U+FFFD, an incomplete character that the next
/// token will complete.
#[derive(Debug)]
pub struct Detokenizer {
    tokenizer: Arc<Tokenizer>,
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl Detokenizer {
    /// A detokenizer with nothing decoded yet.
    pub fn new(tokenizer: Arc<Tokenizer>) -> Self {
        Self { tokenizer, ids: Vec::new(), prefix_offset: 0, read_offset: 0 }
    }

    fn decode(&self, ids: &[u32]) -> String {
        // Special tokens (eos, end of turn) decode to nothing.
        self.tokenizer.decode(ids, true).unwrap_or_default()
    }

    /// Adds one id; returns the text it completes (maybe empty).
    pub fn push(&mut self, id: u32) -> String {
        self.ids.push(id);
        self.take(false)
    }

    /// Returns all text still held back (an incomplete character at the end
    /// of the generation comes out as U+FFFD).
    pub fn flush(&mut self) -> String {
        self.take(true)
    }

    fn take(&mut self, force: bool) -> String {
        let prefix = self.decode(&self.ids[self.prefix_offset..self.read_offset]);
        let full = self.decode(&self.ids[self.prefix_offset..]);
        if full.len() <= prefix.len() || (!force && full.ends_with('\u{FFFD}')) {
            return String::new();
        }
        let new = if full.starts_with(&prefix) {
            full[prefix.len()..].to_owned()
        } else {
            // Decoding in context changed the prefix's text: skip as many chars.
            full.chars().skip(prefix.chars().count()).collect()
        };
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        new
    }
}

/// Finds stop strings in the generated text and holds back text that may be
/// the start of one.
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
}

/// What [`StopMatcher::check`] decided for the text so far.
#[derive(Debug, PartialEq, Eq)]
pub enum StopCheck {
    /// No stop string; text up to this byte offset is safe to send.
    SafeUpTo(usize),
    /// A stop string starts at this byte offset; the text ends there.
    StopAt(usize),
}

impl StopMatcher {
    /// A matcher for `stops` (empty strings are ignored).
    pub fn new(stops: Vec<String>) -> Self {
        let stops = stops.into_iter().filter(|s| !s.is_empty()).collect();
        Self { stops }
    }

    /// Checks `text`; `from` is where new text begins (earlier text was
    /// already checked, but a stop may straddle the boundary).
    pub fn check(&self, text: &str, from: usize) -> StopCheck {
        let longest = self.stops.iter().map(String::len).max().unwrap_or(0);
        let mut start = from.saturating_sub(longest.saturating_sub(1));
        while !text.is_char_boundary(start) {
            start -= 1;
        }
        let first_stop = self.stops.iter().filter_map(|s| text[start..].find(s.as_str()).map(|i| start + i)).min();
        if let Some(at) = first_stop {
            return StopCheck::StopAt(at);
        }
        // Hold back the longest suffix that is a proper prefix of a stop.
        let held = self
            .stops
            .iter()
            .flat_map(|s| (1..s.len()).rev().filter(|&n| s.is_char_boundary(n)).map(move |n| &s[..n]))
            .filter(|prefix| text.ends_with(prefix))
            .map(|prefix| prefix.len())
            .max()
            .unwrap_or(0);
        StopCheck::SafeUpTo(text.len() - held)
    }
}

/// Text and ids to send to the client.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Delta {
    /// New text (may be empty on the finish delta).
    pub text: String,
    /// The ids generated since the last delta.
    pub token_ids: Vec<u32>,
    /// Set on the last delta.
    pub finish: Option<Finish>,
}

/// The output state of one choice.
#[derive(Debug)]
pub struct Output {
    detok: Detokenizer,
    stops: StopMatcher,
    max_tokens: u32,
    text: String,
    sent: usize,
    pending_ids: Vec<u32>,
    completion_tokens: u32,
    finished: bool,
}

impl Output {
    /// Output for a generation of at most `max_tokens` that ends at `stops`.
    pub fn new(tokenizer: Arc<Tokenizer>, stops: Vec<String>, max_tokens: u32) -> Self {
        Self {
            detok: Detokenizer::new(tokenizer),
            stops: StopMatcher::new(stops),
            max_tokens,
            text: String::new(),
            sent: 0,
            pending_ids: Vec::new(),
            completion_tokens: 0,
            finished: false,
        }
    }

    /// Generated tokens used so far (those after a stop are not counted).
    pub fn completion_tokens(&self) -> u32 {
        self.completion_tokens
    }

    /// Whether the output is complete; later tokens are ignored.
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// Feeds one generated id. `finish` is the worker's verdict when this is
    /// its last token. Returns a delta when there is text to send or the
    /// output ended.
    pub fn push(&mut self, id: u32, finish: Option<Finish>) -> Option<Delta> {
        if self.finished {
            return None;
        }
        self.completion_tokens += 1;
        self.pending_ids.push(id);
        let from = self.text.len();
        self.text.push_str(&self.detok.push(id));
        if let StopCheck::StopAt(at) = self.stops.check(&self.text, from) {
            self.text.truncate(at);
            return Some(self.finish_with(Finish::Stop));
        }
        let finish = finish.or((self.completion_tokens >= self.max_tokens).then_some(Finish::Length));
        if let Some(finish) = finish {
            return Some(self.end(finish));
        }
        let StopCheck::SafeUpTo(safe) = self.stops.check(&self.text, self.text.len()) else {
            unreachable!("stops were checked above");
        };
        (safe > self.sent).then(|| self.delta_up_to(safe, None))
    }

    /// Ends the output because the workers finished: flushes held text.
    pub fn end(&mut self, finish: Finish) -> Delta {
        let from = self.text.len();
        self.text.push_str(&self.detok.flush());
        if let StopCheck::StopAt(at) = self.stops.check(&self.text, from) {
            self.text.truncate(at);
            return self.finish_with(Finish::Stop);
        }
        self.finish_with(finish)
    }

    fn finish_with(&mut self, finish: Finish) -> Delta {
        self.finished = true;
        self.delta_up_to(self.text.len(), Some(finish))
    }

    fn delta_up_to(&mut self, end: usize, finish: Option<Finish>) -> Delta {
        let text = self.text[self.sent..end].to_owned();
        self.sent = end;
        Delta { text, token_ids: std::mem::take(&mut self.pending_ids), finish }
    }
}

/// Drives `output` over `tokens`: deltas until the finish delta or an error.
/// Dropping `tokens` once finished cancels the generation on the workers.
pub fn deltas(tokens: TokenStream, output: Output) -> BoxStream<'static, Result<Delta, BackendError>> {
    let state = Some((tokens, output, Vec::<Delta>::new()));
    stream::unfold(state, |state| async move {
        let (mut tokens, mut output, mut ready) = state?;
        loop {
            if !ready.is_empty() {
                let delta = ready.remove(0);
                let next = (!output.is_finished() || !ready.is_empty()).then_some((tokens, output, ready));
                return Some((Ok(delta), next));
            }
            let chunk = match tokens.next().await {
                Some(Ok(chunk)) => chunk,
                Some(Err(e)) => return Some((Err(e), None)),
                None => return Some((Ok(output.end(Finish::Stop)), None)),
            };
            let last = chunk.token_ids.len().saturating_sub(1);
            for (i, id) in chunk.token_ids.iter().enumerate() {
                let finish = if i == last { chunk.finish } else { None };
                ready.extend(output.push(*id, finish));
            }
            if chunk.token_ids.is_empty() {
                if let Some(finish) = chunk.finish {
                    ready.push(output.end(finish));
                }
            }
        }
    })
    .boxed()
}

#[cfg(test)]
#[path = "stream_tests.rs"]
mod tests;
