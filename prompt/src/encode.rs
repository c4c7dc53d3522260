//! Text -> token ids, as the Hugging Face tokenizer gives them, without its
//! slow path for the byte-level BPE vocabularies (GPT-2's pre-tokenizer).
//!
//! `Tokenizer::encode` tracks every character's offsets through each stage
//! and runs GPT-2's split pattern on Oniguruma; for a chat prompt that is
//! about 90% of its cost, while the BPE merges themselves are cached per
//! word. [`Encoder`] does the same stages on plain `&str` slices: added
//! tokens by Aho-Corasick (leftmost-longest, as HF's added vocabulary),
//! digits isolated when the pre-tokenizer says so, GPT-2's pattern on the
//! `regex` crate, each piece's bytes mapped to GPT-2's byte alphabet, and
//! HF's own BPE model (with its word cache) for the merges. The ids are the
//! same; `engine/tests/fast_tokenizer.rs` holds it to `Tokenizer::encode` over the
//! code points and random text.
//!
//! Any other pipeline (a normalizer, SentencePiece, added tokens that strip
//! or normalize, ...) is left to `Tokenizer::encode`.

use std::sync::Arc;

use aho_corasick::{AhoCorasick, MatchKind};
use regex::Regex;
use tokenizers::{Model, ModelWrapper, PreTokenizerWrapper, Tokenizer};

use crate::byte_level;

/// GPT-2's split pattern without its `\s+(?!\S)` lookahead, which the
/// `regex` crate lacks; [`ByteLevelBpe::pieces`] gives a whitespace run the
/// same end the lookahead would.
const GPT2_PATTERN: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+";

/// Encodes text as its tokenizer would, faster where it can.
#[derive(Debug, Clone)]
pub struct Encoder {
    tokenizer: Arc<Tokenizer>,
    fast: Option<Arc<ByteLevelBpe>>,
}

impl Encoder {
    /// An encoder for `tokenizer`: the fast path when its pipeline is one
    /// [`Encoder`] reproduces, else `Tokenizer::encode`.
    pub fn new(tokenizer: Arc<Tokenizer>) -> Self {
        let fast = ByteLevelBpe::new(&tokenizer).map(Arc::new);
        Self { tokenizer, fast }
    }

    /// Whether the fast path is in use.
    pub fn is_fast(&self) -> bool {
        self.fast.is_some()
    }

    /// The ids of `text`, special tokens in it parsed, none added
    /// (`Tokenizer::encode(text, false)`).
    pub fn encode(&self, text: &str) -> tokenizers::Result<Vec<u32>> {
        match &self.fast {
            Some(fast) => fast.encode(self.tokenizer.get_model(), text),
            None => Ok(self.tokenizer.encode(text, false)?.get_ids().to_vec()),
        }
    }
}

/// What a byte-level BPE pipeline needs, taken from its tokenizer.
#[derive(Debug)]
struct ByteLevelBpe {
    /// The added tokens' spellings, matched as HF's added vocabulary matches them.
    added: Option<AhoCorasick>,
    /// The id of each pattern of `added`.
    added_ids: Vec<u32>,
    /// Each digit is a piece of its own (the `Digits(individual)` pre-tokenizer).
    split_digits: bool,
    pattern: Regex,
    /// GPT-2's printable stand-in for each byte.
    byte_chars: [char; 256],
}

impl ByteLevelBpe {
    /// The fast path's tables, if `tokenizer` is a plain byte-level BPE.
    fn new(tokenizer: &Tokenizer) -> Option<Self> {
        if tokenizer.get_normalizer().is_some()
            || tokenizer.get_truncation().is_some()
            || tokenizer.get_padding().is_some()
        {
            return None;
        }
        let ModelWrapper::BPE(bpe) = tokenizer.get_model() else { return None };
        let plain_bpe = bpe.dropout.is_none()
            && bpe.unk_token.is_none()
            && bpe.continuing_subword_prefix.is_none()
            && bpe.end_of_word_suffix.is_none()
            && !bpe.byte_fallback
            && !bpe.ignore_merges;
        if !plain_bpe {
            return None;
        }
        let split_digits = byte_level_pre_tokenizer(tokenizer.get_pre_tokenizer()?)?;
        let mut added: Vec<(u32, String)> = Vec::new();
        for (id, token) in tokenizer.get_added_tokens_decoder() {
            if token.normalized || token.lstrip || token.rstrip || token.single_word {
                return None;
            }
            added.push((id, token.content));
        }
        added.sort();
        let (added_ids, spellings): (Vec<u32>, Vec<String>) = added.into_iter().unzip();
        let added = if spellings.is_empty() {
            None
        } else {
            Some(AhoCorasick::builder().match_kind(MatchKind::LeftmostLongest).build(&spellings).ok()?)
        };
        Some(Self {
            added,
            added_ids,
            split_digits,
            pattern: Regex::new(GPT2_PATTERN).ok()?,
            byte_chars: byte_level::byte_chars(),
        })
    }

    fn encode(&self, model: &ModelWrapper, text: &str) -> tokenizers::Result<Vec<u32>> {
        let mut ids = Vec::with_capacity(text.len() / 3 + 1);
        let mut word = String::new();
        let mut start = 0;
        if let Some(added) = &self.added {
            for found in added.find_iter(text) {
                self.encode_plain(model, &text[start..found.start()], &mut word, &mut ids)?;
                ids.push(self.added_ids[found.pattern().as_usize()]);
                start = found.end();
            }
        }
        self.encode_plain(model, &text[start..], &mut word, &mut ids)?;
        Ok(ids)
    }

    /// Text without added tokens: digits apart if so configured, then GPT-2's pieces.
    fn encode_plain(
        &self,
        model: &ModelWrapper,
        text: &str,
        word: &mut String,
        ids: &mut Vec<u32>,
    ) -> tokenizers::Result<()> {
        if !self.split_digits {
            return self.encode_pieces(model, text, word, ids);
        }
        let mut start = 0;
        for (at, c) in text.char_indices().filter(|(_, c)| c.is_numeric()) {
            self.encode_pieces(model, &text[start..at], word, ids)?;
            let end = at + c.len_utf8();
            self.encode_pieces(model, &text[at..end], word, ids)?;
            start = end;
        }
        self.encode_pieces(model, &text[start..], word, ids)
    }

    fn encode_pieces(
        &self,
        model: &ModelWrapper,
        text: &str,
        word: &mut String,
        ids: &mut Vec<u32>,
    ) -> tokenizers::Result<()> {
        let mut at = 0;
        while at < text.len() {
            let end = self.piece_end(text, at);
            word.clear();
            word.extend(text[at..end].bytes().map(|b| self.byte_chars[usize::from(b)]));
            ids.extend(model.tokenize(word)?.into_iter().map(|token| token.id));
            at = end;
        }
        Ok(())
    }

    /// Where the piece starting at `at` ends. GPT-2's pattern covers every
    /// character, so a match always starts at `at`; a whitespace run followed
    /// by more text leaves its last character to the next piece, which is what
    /// `\s+(?!\S)` backtracking to a shorter run does.
    fn piece_end(&self, text: &str, at: usize) -> usize {
        let Some(found) = self.pattern.find_at(text, at).filter(|m| m.start() == at) else {
            // Unreachable for this pattern; one character is still a piece.
            return at + text[at..].chars().next().map_or(1, char::len_utf8);
        };
        let piece = found.as_str();
        let is_space_run = piece.chars().all(char::is_whitespace);
        if !is_space_run || found.end() == text.len() {
            return found.end();
        }
        match piece.char_indices().last() {
            Some((last, _)) if last > 0 => at + last,
            _ => found.end(),
        }
    }
}

/// Whether `pre` is GPT-2's byte-level splitting, and if so whether digits
/// are split apart first.
fn byte_level_pre_tokenizer(pre: &PreTokenizerWrapper) -> Option<bool> {
    let value = serde_json::to_value(pre).ok()?;
    let is_byte_level =
        |v: &serde_json::Value| v["type"] == "ByteLevel" && v["add_prefix_space"] == false && v["use_regex"] == true;
    if is_byte_level(&value) {
        return Some(false);
    }
    match value["pretokenizers"].as_array().map(Vec::as_slice) {
        Some([digits, byte_level])
            if value["type"] == "Sequence"
                && digits["type"] == "Digits"
                && digits["individual_digits"] == true
                && is_byte_level(byte_level) =>
        {
            Some(true)
        }
        _ => None,
    }
}
