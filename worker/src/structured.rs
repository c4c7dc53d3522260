//! Structured outputs on a worker: the model's vocabulary for grammars, built on the first
//! constrained request, and each request's constraint compiled off the async threads.

use std::sync::{Arc, OnceLock};

use constraint::{ConstraintError, Grammar, Vocabulary};
use prompt::decode::Decoder;
use proto::worker as pb;
use tokenizers::Tokenizer;
use tonic::Status;

use crate::convert;

/// What a worker compiles structured outputs against.
pub struct Grammars {
    tokenizer: Arc<Tokenizer>,
    vocab_size: usize,
    eos_token_ids: Vec<u32>,
    /// The trie takes tens of milliseconds, so workers that never see a constraint never build it.
    vocabulary: OnceLock<Result<Vocabulary, ConstraintError>>,
}

impl Grammars {
    /// For a model whose logits rows are `vocab_size` wide.
    pub fn new(tokenizer: Tokenizer, vocab_size: usize, eos_token_ids: Vec<u32>) -> Self {
        Self { tokenizer: Arc::new(tokenizer), vocab_size, eos_token_ids, vocabulary: OnceLock::new() }
    }

    fn vocabulary(&self) -> Result<&Vocabulary, ConstraintError> {
        let built = self.vocabulary.get_or_init(|| {
            Vocabulary::new(&Decoder::new(self.tokenizer.clone()), self.vocab_size, &self.eos_token_ids)
        });
        built.as_ref().map_err(Clone::clone)
    }

    /// The wire constraint compiled for this model, on a blocking thread (a schema can take
    /// milliseconds); `invalid_argument` when it does not compile.
    pub async fn compile(self: &Arc<Self>, wire: Option<pb::Constraint>) -> Result<Option<Grammar>, Status> {
        let Some(wire) = wire else { return Ok(None) };
        let constraint = convert::constraint(wire)?;
        let this = self.clone();
        let compiled = tokio::task::spawn_blocking(move || this.vocabulary()?.compile(&constraint))
            .await
            .map_err(|e| Status::internal(format!("compiling the structured output: {e}")))?;
        match compiled {
            Ok((grammar, took)) => {
                tracing::debug!(compile_ms = took.as_secs_f64() * 1e3, "structured output compiled");
                Ok(Some(grammar))
            }
            Err(e) => Err(Status::invalid_argument(format!("structured output: {e}"))),
        }
    }
}
