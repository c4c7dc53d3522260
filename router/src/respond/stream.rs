//! From generated token ids to text deltas: incremental detokenization that
//! never splits a UTF-8 character, stop strings, `max_tokens`, and usage.
//!
//! [`Output`] is a synchronous state machine fed one token at a time, so it is
//! tested without any I/O; [`deltas`] drives it over a backend's token stream
//! and stops pulling (which cancels the generation) as soon as it finishes.

use futures::stream::{self, BoxStream, StreamExt};
use prompt::decode::Decoder;

use crate::backend::{BackendError, Finish, TokenLogprobs, TokenStream};
use std::sync::Arc;

use crate::respond::response::{ChatTokenLogprob, PromptTokenLogprob, StopReason, TopLogprob};

pub use prompt::detokenize::{Detokenizer, StopCheck, StopMatcher};

/// Text and ids of one choice to send to the client.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Delta {
    /// The choice, in `0..n`.
    pub index: u32,
    /// New text (may be empty on the finish delta).
    pub text: String,
    /// The ids generated since the last delta.
    pub token_ids: Vec<u32>,
    /// With logprobs asked: those of the tokens whose text this delta
    /// carries (see [`Output`]); else empty.
    pub logprobs: Vec<ChatTokenLogprob>,
    /// Set on the last delta.
    pub finish: Option<Finish>,
    /// With a `stop` finish: the stop string or stop token id that ended the choice (vLLM's
    /// `stop_reason`); `None` for an eos token.
    pub stop_reason: Option<StopReason>,
    /// On the last delta: the prompt tokens the workers served from their prefix cache, when
    /// they said.
    pub cached_tokens: Option<u32>,
    /// With prompt logprobs asked, on choice 0's first delta: every prompt token with its
    /// logprob.
    pub prompt_logprobs: Option<Arc<Vec<PromptTokenLogprob>>>,
}

/// Logprobs below this are sent as this (OpenAI's and vLLM's floor): JSON
/// has no `-inf`.
const MIN_LOGPROB: f32 = -9999.0;

/// A token's logprobs with the token's text (or `token_id:{id}`, when `ids_as_text`), for the
/// client.
fn token_logprob(decoder: &Decoder, id: u32, logprobs: &TokenLogprobs, ids_as_text: bool) -> ChatTokenLogprob {
    let (token, bytes) = token_text(decoder, id, ids_as_text);
    let top_logprobs = logprobs
        .top
        .iter()
        .map(|&(id, logprob)| {
            let (token, bytes) = token_text(decoder, id, ids_as_text);
            TopLogprob { token, logprob: logprob.max(MIN_LOGPROB), bytes }
        })
        .collect();
    ChatTokenLogprob { token, logprob: logprobs.logprob.max(MIN_LOGPROB), bytes, top_logprobs }
}

/// One token's text on its own (special tokens included), or vLLM's `token_id:{id}` when
/// `ids_as_text` (for tokens whose text is not valid UTF-8 alone), and its UTF-8 bytes.
fn token_text(decoder: &Decoder, id: u32, ids_as_text: bool) -> (String, Vec<u8>) {
    let text = if ids_as_text { format!("token_id:{id}") } else { decoder.decode(&[id], false).unwrap_or_default() };
    let bytes = text.as_bytes().to_vec();
    (text, bytes)
}

/// The output state of one choice.
///
/// Logprobs follow the text: each pending token remembers where its text
/// starts in `text`, and its logprobs go out with the delta that sends text
/// past that point. Tokens whose text starts at or after a stop string's cut
/// never have their logprobs reported; the finish delta of a normal end
/// carries the rest (an eos token, whose text is empty).
#[derive(Debug)]
pub struct Output {
    detok: Detokenizer,
    stops: StopMatcher,
    max_tokens: u32,
    text: String,
    sent: usize,
    pending_ids: Vec<u32>,
    /// Tokens with logprobs not yet sent: where their text starts, the id, the logprobs.
    pending_logprobs: Vec<(usize, u32, TokenLogprobs)>,
    completion_tokens: u32,
    finished: bool,
    include_stop_str: bool,
    /// The request's stop token ids that are not the model's eos: ending on one is reported as
    /// the `stop_reason`.
    stop_token_ids: Vec<u32>,
    stop_reason: Option<StopReason>,
    /// Name logprob tokens `token_id:{id}` (vLLM's `return_tokens_as_token_ids`).
    ids_as_text: bool,
    /// The latest count of prompt tokens served from the prefix cache the workers sent.
    cached_tokens: Option<u32>,
    /// With prompt logprobs asked (choice 0 only): the prompt, the logprobs received so far, and
    /// whether they went out.
    scoring: Option<Scoring>,
}

/// A prompt being scored: its ids and the logprobs of tokens `1..=logprobs.len()` received.
#[derive(Debug)]
struct Scoring {
    prompt: Arc<Vec<u32>>,
    logprobs: Vec<TokenLogprobs>,
    sent: bool,
}

impl Output {
    /// Output for a generation of at most `max_tokens` that ends at `stops`.
    pub fn new(decoder: Decoder, stops: Vec<String>, max_tokens: u32) -> Self {
        Self {
            detok: Detokenizer::new(decoder),
            stops: StopMatcher::new(stops),
            max_tokens,
            text: String::new(),
            sent: 0,
            pending_ids: Vec::new(),
            pending_logprobs: Vec::new(),
            completion_tokens: 0,
            finished: false,
            include_stop_str: false,
            stop_token_ids: Vec::new(),
            stop_reason: None,
            ids_as_text: false,
            cached_tokens: None,
            scoring: None,
        }
    }

    /// The same output reporting `prompt`'s logprobs (as the workers send them) on its first
    /// delta.
    pub fn score_prompt(self, prompt: Arc<Vec<u32>>) -> Self {
        Self { scoring: Some(Scoring { prompt, logprobs: Vec::new(), sent: false }), ..self }
    }

    /// Takes more of the prompt's logprobs, in order.
    pub fn prompt_logprobs(&mut self, more: Vec<TokenLogprobs>) {
        if let Some(scoring) = &mut self.scoring {
            scoring.logprobs.extend(more);
        }
    }

    /// The prompt's tokens with their logprobs, once: the first delta carries them.
    fn take_prompt_logprobs(&mut self) -> Option<Arc<Vec<PromptTokenLogprob>>> {
        let scoring = self.scoring.as_mut().filter(|s| !s.sent)?;
        scoring.sent = true;
        let (decoder, ids_as_text) = (self.detok.decoder(), self.ids_as_text);
        let scored = scoring.prompt.iter().enumerate().map(|(position, &id)| {
            let (token, _) = token_text(decoder, id, ids_as_text);
            let logprobs = position.checked_sub(1).and_then(|i| scoring.logprobs.get(i));
            PromptTokenLogprob {
                id,
                token,
                logprob: logprobs.map(|l| l.logprob.max(MIN_LOGPROB)),
                rank: logprobs.map_or(0, |l| l.rank),
                top: logprobs
                    .map(|l| {
                        let text = |id| token_text(decoder, id, ids_as_text).0;
                        l.top.iter().map(|&(id, lp)| (id, text(id), lp.max(MIN_LOGPROB))).collect()
                    })
                    .unwrap_or_default(),
            }
        });
        Some(Arc::new(scored.collect()))
    }

    /// Notes the workers' count of prompt tokens served from their prefix cache; the last
    /// delta reports the latest.
    pub fn cached_tokens(&mut self, count: u32) {
        self.cached_tokens = Some(count);
    }

    /// The same output naming the tokens of its logprobs `token_id:{id}` rather than by their
    /// text, when `ids_as_text` (vLLM's `return_tokens_as_token_ids`).
    pub fn tokens_as_ids(self, ids_as_text: bool) -> Self {
        Self { ids_as_text, ..self }
    }

    /// The same output reporting an end on one of `ids` (the request's stop token ids that are
    /// not eos tokens) as its `stop_reason`.
    pub fn stop_token_ids(self, ids: Vec<u32>) -> Self {
        Self { stop_token_ids: ids, ..self }
    }

    /// The same output keeping the stop string that ends it in the text
    /// (vLLM's `include_stop_str_in_output`).
    pub fn include_stop_str(self, include_stop_str: bool) -> Self {
        Self { include_stop_str, ..self }
    }

    /// The same output with special tokens' text kept when
    /// `skip_special_tokens` is false.
    pub fn skip_special_tokens(self, skip_special_tokens: bool) -> Self {
        Self { detok: self.detok.skip_special_tokens(skip_special_tokens), ..self }
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
        self.push_with_logprobs(id, None, finish)
    }

    /// [`Self::push`] for a token that comes with its logprobs.
    pub fn push_with_logprobs(
        &mut self,
        id: u32,
        logprobs: Option<TokenLogprobs>,
        finish: Option<Finish>,
    ) -> Option<Delta> {
        if self.finished {
            return None;
        }
        self.completion_tokens += 1;
        self.pending_ids.push(id);
        let from = self.text.len();
        if let Some(logprobs) = logprobs {
            self.pending_logprobs.push((from, id, logprobs));
        }
        // vLLM leaves the token that stopped the generation (eos, a stop
        // token id) out of the text unless stop strings are kept; it matters
        // once special tokens are not skipped.
        if finish == Some(Finish::Stop) && self.stop_token_ids.contains(&id) {
            self.stop_reason = Some(StopReason::Token(id));
        }
        let stop_token = finish == Some(Finish::Stop) && !self.include_stop_str;
        if !stop_token {
            self.text.push_str(&self.detok.push(id));
        }
        if let StopCheck::StopAt(at) = self.stops.check(&self.text, from) {
            return Some(self.cut_at_stop(at));
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
            return self.cut_at_stop(at);
        }
        self.finish_with(finish)
    }

    /// Ends the text where a stop string starts, or where it ends when the
    /// stop string is kept; the tokens from there on are not reported in
    /// logprobs.
    fn cut_at_stop(&mut self, at: usize) -> Delta {
        let len = self.stops.len_at(&self.text, at);
        self.stop_reason = Some(StopReason::Text(self.text[at..at + len].to_owned()));
        let at = if self.include_stop_str { at + len } else { at };
        self.text.truncate(at);
        self.pending_logprobs.retain(|&(start, _, _)| start < at);
        self.finish_with(Finish::Stop)
    }

    fn finish_with(&mut self, finish: Finish) -> Delta {
        self.finished = true;
        self.delta_up_to(self.text.len(), Some(finish))
    }

    fn delta_up_to(&mut self, end: usize, finish: Option<Finish>) -> Delta {
        let text = self.text[self.sent..end].to_owned();
        self.sent = end;
        // Logprobs of the tokens whose text starts before `end`; on the last
        // delta, of every token left.
        let sent = if finish.is_some() {
            self.pending_logprobs.len()
        } else {
            self.pending_logprobs.partition_point(|&(start, _, _)| start < end)
        };
        let (decoder, ids_as_text) = (self.detok.decoder(), self.ids_as_text);
        let logprobs =
            self.pending_logprobs.drain(..sent).map(|(_, id, l)| token_logprob(decoder, id, &l, ids_as_text)).collect();
        let stop_reason = if finish == Some(Finish::Stop) { self.stop_reason.take() } else { None };
        let cached_tokens = if finish.is_some() { self.cached_tokens } else { None };
        let token_ids = std::mem::take(&mut self.pending_ids);
        let prompt_logprobs = self.take_prompt_logprobs();
        Delta { index: 0, text, token_ids, logprobs, finish, stop_reason, cached_tokens, prompt_logprobs }
    }
}

/// Drives one [`Output`] per choice over `tokens` (`outputs[i]` is choice
/// `i`): deltas until every choice's finish delta or an error. Dropping
/// `tokens` once all are finished cancels the generation on the workers.
pub fn deltas(tokens: TokenStream, outputs: Vec<Output>) -> BoxStream<'static, Result<Delta, BackendError>> {
    let state = Some((tokens, outputs, Vec::<Delta>::new()));
    stream::unfold(state, |state| async move {
        let (mut tokens, mut outputs, mut ready) = state?;
        loop {
            let all_finished = outputs.iter().all(Output::is_finished);
            if !ready.is_empty() {
                let delta = ready.remove(0);
                let next = (!all_finished || !ready.is_empty()).then_some((tokens, outputs, ready));
                return Some((Ok(delta), next));
            }
            if all_finished {
                return None;
            }
            let chunk = match tokens.next().await {
                Some(Ok(chunk)) => chunk,
                Some(Err(e)) => return Some((Err(e), None)),
                None => {
                    // The workers ended without a reason for these choices.
                    for (index, output) in (0..).zip(outputs.iter_mut()).filter(|(_, o)| !o.is_finished()) {
                        ready.push(Delta { index, ..output.end(Finish::Stop) });
                    }
                    continue;
                }
            };
            let index = chunk.index;
            if index as usize >= outputs.len() {
                let error = format!("the workers sent choice {index} of {}", outputs.len());
                return Some((Err(BackendError::Worker(error)), None));
            }
            if !chunk.prompt_logprobs.is_empty() {
                // They belong to the request: choice 0 reports them.
                outputs[0].prompt_logprobs(chunk.prompt_logprobs);
            }
            let output = &mut outputs[index as usize];
            if let Some(count) = chunk.cached_tokens {
                output.cached_tokens(count);
            }
            let last = chunk.token_ids.len().saturating_sub(1);
            let mut logprobs = chunk.logprobs.into_iter();
            for (i, id) in chunk.token_ids.iter().enumerate() {
                let finish = if i == last { chunk.finish } else { None };
                ready.extend(output.push_with_logprobs(*id, logprobs.next(), finish).map(|d| Delta { index, ..d }));
            }
            if chunk.token_ids.is_empty() && !output.is_finished() {
                if let Some(finish) = chunk.finish {
                    ready.push(Delta { index, ..output.end(finish) });
                }
            }
        }
    })
    .boxed()
}

#[cfg(test)]
mod tests;
