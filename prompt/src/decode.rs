//! Token ids -> text, as the Hugging Face tokenizer gives it, from a table
//! for byte-level BPE vocabularies.
//!
//! Streaming decodes each new token twice in context (to find the text it
//! adds), and `Tokenizer::decode` builds a string per token and looks each
//! character up in a hash map. For a byte-level vocabulary the text of a run
//! of ids is only their bytes, concatenated and read as lossy UTF-8, so
//! [`Decoder`] keeps each id's bytes once per model. The text is the same;
//! `engine/tests/fast_tokenizer.rs` holds it to `Tokenizer::decode`.

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
        self.table.is_some()
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
        let Some(table) = &self.table else { return self.tokenizer.decode(ids, skip_special_tokens) };
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
        if decoder["type"] != "ByteLevel" {
            return None;
        }
        let byte_of: HashMap<char, u8> = byte_level::byte_chars().into_iter().zip(0..=255u8).collect();
        let specials: HashSet<String> =
            tokenizer.get_added_tokens_decoder().into_values().filter(|t| t.special).map(|t| t.content).collect();
        let size = tokenizer.get_vocab(true).values().max().map_or(0, |&max| max as usize + 1);
        let tokens = (0..size)
            .map(|id| {
                let spelling = tokenizer.id_to_token(u32::try_from(id).ok()?)?;
                // A spelling outside the byte alphabet (an added token's text)
                // is its own UTF-8, as the byte-level decoder takes it.
                let mapped: Option<Vec<u8>> = spelling.chars().map(|c| byte_of.get(&c).copied()).collect();
                let bytes = mapped.unwrap_or_else(|| spelling.as_bytes().to_vec()).into_boxed_slice();
                Some(TokenBytes { bytes, special: specials.contains(&spelling) })
            })
            .collect();
        Some(Self { tokens })
    }
}
