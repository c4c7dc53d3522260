//! A model's vocabulary as llguidance sees it: each token's bytes in a trie, and the parser
//! factory that compiles constraints against it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use llguidance::{Matcher, ParserFactory};
use prompt::decode::Decoder;
use toktrie::{TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};

use crate::grammar::{MaskObserver, ThinkTokens};
use crate::{Constraint, ConstraintError, Grammar};

/// A model's tokens, ready to compile constraints against. Built once per model (the trie takes
/// tens of milliseconds), shared by every request.
pub struct Vocabulary {
    factory: ParserFactory,
    /// Every token that ends generation; the trie knows only the first as its eos.
    eos: Arc<[u32]>,
    /// Given to every grammar compiled here.
    observer: Option<MaskObserver>,
    /// The model's reasoning tags, when it has both as single tokens.
    think: Option<ThinkTokens>,
}

impl std::fmt::Debug for Vocabulary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vocabulary").field("vocab_size", &self.vocab_size()).field("eos", &self.eos).finish()
    }
}

/// The token trie as llguidance's tokenizer environment.
struct Env {
    trie: TokTrie,
}

impl TokenizerEnv for Env {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    /// Greedy longest-match: llguidance tokenizes only grammar literals with it, to find tokens
    /// it may force.
    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie.greedy_tokenize(s)
    }
}

impl Vocabulary {
    /// The vocabulary of a model whose logits rows are `vocab_size` wide (ids the tokenizer lacks
    /// are never allowed) and whose generation ends at `eos_token_ids`.
    ///
    /// Needs the decoder's byte table (a byte-level BPE vocabulary, or SentencePiece with byte
    /// fallback): a grammar matches bytes, so each token's bytes must be known exactly.
    pub fn new(decoder: &Decoder, vocab_size: usize, eos_token_ids: &[u32]) -> Result<Self, ConstraintError> {
        if decoder.table_len().is_none() {
            return Err(ConstraintError::Vocabulary(
                "its tokens' bytes are unknown (neither byte-level BPE nor SentencePiece with byte fallback)".into(),
            ));
        }
        let Some(&first_eos) = eos_token_ids.first() else {
            return Err(ConstraintError::Vocabulary("it has no end-of-sequence token".into()));
        };
        let vocab_size =
            u32::try_from(vocab_size).map_err(|_| ConstraintError::Vocabulary("too many tokens".into()))?;
        let words: Vec<Vec<u8>> = (0..vocab_size)
            .map(|id| match decoder.token_bytes(id) {
                // llguidance spells special tokens behind a 0xFF marker, so no text matches them.
                Some((bytes, true)) => [&[TokTrie::SPECIAL_TOKEN_MARKER], bytes].concat(),
                Some((bytes, false)) => bytes.to_vec(),
                None => Vec::new(),
            })
            .collect();
        let id_of = |text: &[u8]| {
            let unmarked = |w: &Vec<u8>| w.strip_prefix(&[TokTrie::SPECIAL_TOKEN_MARKER]).unwrap_or(w) == text;
            words.iter().position(unmarked).and_then(|id| u32::try_from(id).ok())
        };
        let think = id_of(b"<think>").zip(id_of(b"</think>")).map(|(open, close)| ThinkTokens { open, close });
        let trie = TokTrie::from(&TokRxInfo::new(vocab_size, first_eos), &words);
        let env: TokEnv = Arc::new(Env { trie });
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| ConstraintError::Vocabulary(e.to_string()))?;
        factory.quiet();
        // A failure's message is logged once; the parser's whole state would flood the log.
        factory.limits_mut().verbose_errors = false;
        Ok(Self { factory, eos: eos_token_ids.into(), observer: None, think })
    }

    /// Every grammar compiled from now on tells `observer` how long each of its masks took.
    pub fn with_mask_observer(mut self, observer: MaskObserver) -> Self {
        self.observer = Some(observer);
        self
    }

    /// The model's `<think>` and `</think>` tokens, when it has both: its grammars leave the
    /// reasoning between them free.
    pub fn think_tokens(&self) -> Option<ThinkTokens> {
        self.think
    }

    /// Width of the masks: the logits row's.
    pub fn vocab_size(&self) -> usize {
        self.factory.tok_env().tok_trie().vocab_size()
    }

    /// Compiles `constraint` into a fresh matcher, and how long that took; a constraint that does
    /// not compile is refused with llguidance's reason.
    pub fn compile(&self, constraint: &Constraint) -> Result<(Grammar, Duration), ConstraintError> {
        let start = Instant::now();
        let grammar = constraint.to_grammar()?;
        let parser = self.factory.create_parser(grammar).map_err(|e| ConstraintError::Invalid(e.to_string()))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(error) = matcher.get_error() {
            return Err(ConstraintError::Invalid(error));
        }
        let grammar = Grammar::new(matcher, self.eos.clone(), self.vocab_size(), self.observer.clone(), self.think);
        Ok((grammar, start.elapsed()))
    }
}
