//! Generated ids to text as they arrive: incremental detokenization that never splits a UTF-8
//! character ([`Detokenizer`]), and stop strings found across the pieces ([`StopMatcher`]).
//! Shared by the router (per choice of a stream) and the offline library (per request).

use crate::decode::Decoder;

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
    decoder: Decoder,
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
    skip_special_tokens: bool,
}

impl Detokenizer {
    /// A detokenizer with nothing decoded yet; special tokens decode to nothing.
    pub fn new(decoder: Decoder) -> Self {
        Self { decoder, ids: Vec::new(), prefix_offset: 0, read_offset: 0, skip_special_tokens: true }
    }

    /// The same detokenizer, keeping special tokens' text when
    /// `skip_special_tokens` is false (vLLM's `skip_special_tokens`).
    pub fn skip_special_tokens(self, skip_special_tokens: bool) -> Self {
        Self { skip_special_tokens, ..self }
    }

    /// The decoder it decodes with.
    pub fn decoder(&self) -> &Decoder {
        &self.decoder
    }

    fn decode(&self, ids: &[u32]) -> String {
        self.decoder.decode(ids, self.skip_special_tokens).unwrap_or_default()
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

    /// The length of the stop string that starts at `at` in `text` (the
    /// shortest, should several start there: it is the one a stream meets
    /// first). 0 when none does.
    pub fn len_at(&self, text: &str, at: usize) -> usize {
        let rest = text.get(at..).unwrap_or_default();
        self.stops.iter().filter(|s| rest.starts_with(s.as_str())).map(String::len).min().unwrap_or(0)
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
