//! Structured outputs on a worker: the model's vocabulary for grammars, built on the first
//! constrained request, and each request's constraint compiled off the async threads.

use std::sync::{Arc, OnceLock};

use constraint::{ConstraintError, Grammar, Vocabulary};
use prometheus::{Histogram, HistogramOpts, IntCounterVec, Opts, Registry};
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
    metrics: Metrics,
}

/// What `/metrics` shows of structured outputs.
#[derive(Clone)]
struct Metrics {
    requests: IntCounterVec,
    compile: Histogram,
    mask: Histogram,
}

impl Metrics {
    fn new() -> Self {
        let histogram = |name: &str, help: &str, buckets: &[f64]| {
            Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))
                .expect("valid histogram options")
        };
        Self {
            requests: IntCounterVec::new(
                Opts::new("structured_output_requests_total", "Requests held to a structured output, by kind."),
                &["kind"],
            )
            .expect("valid counter options"),
            compile: histogram(
                "structured_output_compile_seconds",
                "Time to compile a request's structured output against the vocabulary.",
                &[0.0001, 0.0003, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0],
            ),
            mask: histogram(
                "structured_output_mask_seconds",
                "Time to mask one row of logits for one constrained sequence (on the engine's step thread).",
                &[0.000005, 0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01],
            ),
        }
    }
}

impl Grammars {
    /// For a model whose logits rows are `vocab_size` wide.
    pub fn new(tokenizer: Tokenizer, vocab_size: usize, eos_token_ids: Vec<u32>) -> Self {
        Self {
            tokenizer: Arc::new(tokenizer),
            vocab_size,
            eos_token_ids,
            vocabulary: OnceLock::new(),
            metrics: Metrics::new(),
        }
    }

    /// Adds the structured-output metrics to a worker's registry.
    pub fn register(&self, registry: &Registry) -> Result<(), prometheus::Error> {
        registry.register(Box::new(self.metrics.requests.clone()))?;
        registry.register(Box::new(self.metrics.compile.clone()))?;
        registry.register(Box::new(self.metrics.mask.clone()))
    }

    fn vocabulary(&self) -> Result<&Vocabulary, ConstraintError> {
        let built = self.vocabulary.get_or_init(|| {
            let mask = self.metrics.mask.clone();
            Vocabulary::new(&Decoder::new(self.tokenizer.clone()), self.vocab_size, &self.eos_token_ids)
                .map(|v| v.with_mask_observer(Arc::new(move |took| mask.observe(took.as_secs_f64()))))
        });
        built.as_ref().map_err(Clone::clone)
    }

    /// The request's constraint (taken out of its sampling params) compiled for this model, on a
    /// blocking thread (a schema can take milliseconds), placed after the prompt (whose think
    /// tags say whether the answer starts in reasoning) and past the answer's tokens already
    /// generated (`constraint_prefix`, which end `prompt`); `invalid_argument` when it does not
    /// compile.
    pub async fn compile(
        self: &Arc<Self>,
        sampling: Option<&mut pb::SamplingParams>,
        prompt: &[u32],
    ) -> Result<Option<Grammar>, Status> {
        let Some(sampling) = sampling else { return Ok(None) };
        let Some(wire) = sampling.constraint.take() else { return Ok(None) };
        let prefix = std::mem::take(&mut sampling.constraint_prefix);
        let constraint = convert::constraint(wire)?;
        let kind = constraint.kind();
        let this = self.clone();
        let compiled = tokio::task::spawn_blocking(move || this.vocabulary()?.compile(&constraint))
            .await
            .map_err(|e| Status::internal(format!("compiling the structured output: {e}")))?;
        match compiled {
            Ok((mut grammar, took)) => {
                tracing::debug!(compile_ms = took.as_secs_f64() * 1e3, "structured output compiled");
                self.metrics.requests.with_label_values(&[kind]).inc();
                self.metrics.compile.observe(took.as_secs_f64());
                let Some(asked) = prompt.len().checked_sub(prefix.len()).filter(|_| prompt.ends_with(&prefix)) else {
                    return Err(Status::invalid_argument("constraint_prefix is not the end of the prompt"));
                };
                grammar.follow_prompt(&prompt[..asked]);
                for token in prefix {
                    grammar.accept(token);
                }
                Ok(Some(grammar))
            }
            Err(e) => Err(Status::invalid_argument(format!("structured output: {e}"))),
        }
    }
}
