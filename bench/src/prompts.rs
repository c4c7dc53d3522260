//! Prompts of real token ids, distinct per sequence.
//!
//! Every prompt is the tokenized text `"Record N. "` followed by a fixed English paragraph repeated
//! until the prompt has the length asked for, where `N` is a serial number never reused in one
//! process. The first KV block therefore differs between any two prompts, and the chained block
//! hash makes every later block differ too: prefix caching cannot shorten figures 1–3. Both engines
//! get the same ids (llama.cpp takes token ids directly), so tokenizer differences do not matter.

use std::sync::atomic::{AtomicU64, Ordering};
use tokenizers::Tokenizer;

/// English text the prompts repeat: ordinary tokens, no special ones.
const PARAGRAPH: &str = "The river runs past the old mill, where the miller keeps a ledger of every sack of grain \
brought in from the farms up the valley. In spring the water rises and the wheel turns faster; in late summer it \
slows, and the farmers wait on the bank, talking about the weather, the price of flour and the new bridge the \
county promised to build before the next harvest. ";

/// Builds prompts from the model's tokenizer.
pub struct Prompts<'a> {
    tokenizer: &'a Tokenizer,
    paragraph: Vec<u32>,
    serial: AtomicU64,
}

impl<'a> Prompts<'a> {
    /// Tokenizes the paragraph once.
    pub fn new(tokenizer: &'a Tokenizer) -> anyhow::Result<Self> {
        let paragraph = encode(tokenizer, PARAGRAPH)?;
        anyhow::ensure!(!paragraph.is_empty(), "the tokenizer produced no tokens for the prompt text");
        Ok(Self { tokenizer, paragraph, serial: AtomicU64::new(0) })
    }

    /// A new prompt of exactly `len` tokens, unlike any other this value made.
    pub fn next(&self, len: usize) -> anyhow::Result<Vec<u32>> {
        let serial = self.serial.fetch_add(1, Ordering::Relaxed);
        let mut ids = encode(self.tokenizer, &format!("Record {serial}. "))?;
        while ids.len() < len {
            let take = (len - ids.len()).min(self.paragraph.len());
            ids.extend_from_slice(&self.paragraph[..take]);
        }
        ids.truncate(len);
        Ok(ids)
    }

    /// `count` new prompts of `len` tokens each.
    pub fn batch(&self, count: usize, len: usize) -> anyhow::Result<Vec<Vec<u32>>> {
        (0..count).map(|_| self.next(len)).collect()
    }
}

fn encode(tokenizer: &Tokenizer, text: &str) -> anyhow::Result<Vec<u32>> {
    let encoding = tokenizer.encode(text, false).map_err(|e| anyhow::anyhow!("tokenizing the prompt text: {e}"))?;
    Ok(encoding.get_ids().to_vec())
}
