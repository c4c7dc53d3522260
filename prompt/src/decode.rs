//! Token ids -> text, as the Hugging Face tokenizer gives it, from a table
//! for byte-level BPE vocabularies.
//!
//! Streaming decodes each new token twice in context (to find the text it
//! adds), and `Tokenizer::decode` builds a string per token and looks each
//! character up in a hash map. For a byte-level vocabulary the text of a run
//! of ids is only their bytes, concatenated and read as lossy UTF-8, so
//! [`Decoder`] keeps each id's bytes once per model. The text is the same;
//! `engine/tests/fast_tokenizer.rs` holds it to `Tokenizer::decode`.
//!
//! A SentencePiece vocabulary with byte fallback (`▁` for a space, `<0xNN>`
//! for a byte) gets a table too, for structured outputs, which match grammars
//! on each token's bytes; its text still comes from `Tokenizer::decode`, whose
//! byte fallback replaces an invalid UTF-8 run byte by byte, not as lossy
//! UTF-8 does.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use tokenizers::Tokenizer;

use crate::byte_level;

/// Decodes ids as their tokenizer would, from a table where it can.
#[derive(Debug, Clone)]
pub struct Decoder {
    tokenizer: Arc<Tokenizer>,
    table: Option<Arc<ByteTable>>,
}

/// Each id's bytes, and whether it is a special token.
#[derive(Debug)]
struct ByteTable {
    /// Indexed by id; `None` for an id the vocabulary lacks (decoded as nothing).
    tokens: Vec<Option<TokenBytes>>,
    /// How the vocabulary spells bytes; only a byte-level one decodes from the table.
    spelling: Spelling,
}

/// How a vocabulary spells a token's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Spelling {
    /// GPT-2's byte-level alphabet: one character per byte.
    ByteLevel,
    /// SentencePiece with byte fallback: `▁` is a space, `<0xNN>` a byte, the rest UTF-8.
    SentencePiece,
}

#[derive(Debug)]
struct TokenBytes {
    bytes: Box<[u8]>,
    special: bool,
}

impl Decoder {
    /// A decoder for `tokenizer`: from a table when its decoder is GPT-2's
    /// byte-level one, else `Tokenizer::decode`.
    pub fn new(tokenizer: Arc<Tokenizer>) -> Self {
        let table = ByteTable::new(&tokenizer).map(Arc::new);
        Self { tokenizer, table }
    }

    /// Whether decoding goes through the table.
    pub fn is_fast(&self) -> bool {
        self.table.as_ref().is_some_and(|t| t.spelling == Spelling::ByteLevel)
    }

    /// How many ids the table knows (`None` without a table).
    pub fn table_len(&self) -> Option<usize> {
        self.table.as_ref().map(|t| t.tokens.len())
    }

    /// One id's bytes and whether it is a special token, from the table;
    /// `None` without a table or for an id the vocabulary lacks. Structured
    /// outputs match grammars on these bytes.
    pub fn token_bytes(&self, id: u32) -> Option<(&[u8], bool)> {
        let token = self.table.as_ref()?.tokens.get(usize::try_from(id).ok()?)?.as_ref()?;
        Some((&token.bytes, token.special))
    }

    /// The text of `ids`; special tokens' text left out when
    /// `skip_special_tokens`.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> tokenizers::Result<String> {
        let Some(table) = self.table.as_ref().filter(|_| self.is_fast()) else {
            return self.tokenizer.decode(ids, skip_special_tokens);
        };
        let mut bytes = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            let token = usize::try_from(id).ok().and_then(|i| table.tokens.get(i)).and_then(Option::as_ref);
            match token {
                Some(token) if !(skip_special_tokens && token.special) => bytes.extend_from_slice(&token.bytes),
                _ => {}
            }
        }
        Ok(match String::from_utf8(bytes) {
            Ok(text) => text,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        })
    }
}

impl ByteTable {
    fn new(tokenizer: &Tokenizer) -> Option<Self> {
        let decoder = serde_json::to_value(tokenizer.get_decoder()?).ok()?;
        let spelling = if decoder["type"] == "ByteLevel" {
            Spelling::ByteLevel
        } else if is_sentencepiece(&decoder) {
            Spelling::SentencePiece
        } else {
            return None;
        };
        let byte_of: HashMap<char, u8> = byte_level::byte_chars().into_iter().zip(0..=255u8).collect();
        let specials: HashSet<String> =
            tokenizer.get_added_tokens_decoder().into_values().filter(|t| t.special).map(|t| t.content).collect();
        let size = tokenizer.get_vocab(true).values().max().map_or(0, |&max| max as usize + 1);
        let tokens = (0..size)
            .map(|id| {
                let spelling_of = tokenizer.id_to_token(u32::try_from(id).ok()?)?;
                let bytes = match spelling {
                    // A spelling outside the byte alphabet (an added token's text)
                    // is its own UTF-8, as the byte-level decoder takes it.
                    Spelling::ByteLevel => {
                        let mapped: Option<Vec<u8>> = spelling_of.chars().map(|c| byte_of.get(&c).copied()).collect();
                        mapped.unwrap_or_else(|| spelling_of.as_bytes().to_vec())
                    }
                    Spelling::SentencePiece => sentencepiece_bytes(&spelling_of),
                };
                Some(TokenBytes { bytes: bytes.into_boxed_slice(), special: specials.contains(&spelling_of) })
            })
            .collect();
        Some(Self { tokens, spelling })
    }
}

/// Whether a decoder is exactly SentencePiece's with byte fallback and no space prefix to strip:
/// `▁` back to a space, `<0xNN>` pieces to bytes, the pieces joined (Gemma's).
fn is_sentencepiece(decoder: &serde_json::Value) -> bool {
    let Some(steps) = decoder["decoders"].as_array().filter(|_| decoder["type"] == "Sequence") else { return false };
    let kinds: Vec<&str> = steps.iter().map(|d| d["type"].as_str().unwrap_or("")).collect();
    kinds == ["Replace", "ByteFallback", "Fuse"]
        && steps[0]["pattern"]["String"] == SPACE_MARK
        && steps[0]["content"] == " "
}

/// SentencePiece's marker for a space.
const SPACE_MARK: &str = "\u{2581}";

/// A SentencePiece token's bytes: `<0xNN>` is the byte NN, anything else its text with `▁` as a
/// space.
fn sentencepiece_bytes(piece: &str) -> Vec<u8> {
    let byte = piece.strip_prefix("<0x").and_then(|h| h.strip_suffix('>')).filter(|h| h.len() == 2);
    match byte.and_then(|h| u8::from_str_radix(h, 16).ok()) {
        Some(b) => vec![b],
        None => piece.replace(SPACE_MARK, " ").into_bytes(),
    }
}

#[cfg(test)]
mod tests;
