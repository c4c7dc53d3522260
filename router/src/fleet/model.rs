//! What the router knows about the served model, built once from the
//! [`ModelCard`] a worker publishes: tokenizer, chat template and limits.

use std::str::FromStr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prompt::decode::Decoder;
use prompt::encode::Encoder;
use proto::worker::ModelCard;
use tokenizers::Tokenizer;

use constraint::{Constraint, ConstraintError, Vocabulary};
use prompt::chat_template::ChatTemplate;

/// Why a model card could not be turned into a [`Model`].
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// `tokenizer_json` is not a valid `tokenizer.json`.
    #[error("model card tokenizer_json is invalid: {0}")]
    Tokenizer(String),
    /// `chat_template` does not compile.
    #[error("model card chat_template is invalid: {0}")]
    Template(#[from] minijinja::Error),
    /// `context_length` is zero.
    #[error("model card context_length must be > 0")]
    NoContext,
}

/// What a model serves, from its card.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Serves {
    /// Generation, and embeddings pooled from its hidden states (a decoder).
    Generation,
    /// Embeddings only (an encoder, BERT): it has no LM head, and its tokenizer's post-processor
    /// puts its special tokens (`[CLS]` … `[SEP]`) around a text.
    Embeddings,
}

/// The served model. Immutable after start-up and shared by every request.
#[derive(Debug)]
pub struct Model {
    /// The name clients must put in `model`.
    pub served_name: String,
    /// Longest prompt + completion, in tokens.
    pub context_length: u32,
    /// Token ids must be below this (added tokens included).
    pub vocab_size: u32,
    /// The model's tokenizer.
    pub tokenizer: Arc<Tokenizer>,
    /// Text -> ids with the tokenizer's results, on its fast path when it has one.
    pub encoder: Encoder,
    /// Ids -> text with the tokenizer's results, from a table when it can.
    pub decoder: Decoder,
    /// The chat template; `None` when the card has none (chat is then refused).
    pub template: Option<ChatTemplate>,
    /// The chat template's Jinja source, empty when there is none (`/tokenizer_info`).
    pub template_source: String,
    /// The BOS token's text, the template's `bos_token` (also for a request's own template).
    pub bos_token: String,
    /// The EOS token's text, the template's `eos_token`.
    pub eos_token: String,
    /// Prepended to text prompts of `/v1/completions` when set.
    pub bos_token_id: Option<u32>,
    /// Unix seconds when the card was loaded, shown by `/v1/models`.
    pub created: u64,
    /// Texts longer than this cannot fit the context whatever their tokens
    /// (see [`Model::from_card`]), so they are refused without tokenizing.
    pub max_prompt_bytes: usize,
    /// Tokens that end generation.
    pub eos_token_ids: Vec<u32>,
    /// OpenAI's `system_fingerprint`: names this router's version and the model card it serves,
    /// so a client can tell when the backend configuration behind its answers changed.
    pub fingerprint: String,
    /// Generation and embeddings, or embeddings only.
    pub serves: Serves,
    /// Values in one embedding, when the card says.
    pub embedding_size: Option<u32>,
    /// The vocabulary structured outputs compile against; built on the first one.
    vocabulary: OnceLock<Result<Vocabulary, ConstraintError>>,
}

/// `fp_` and 12 hex digits of an FNV-1a hash of the router's version and the card's contents:
/// stable across restarts, different when either changes.
fn fingerprint(card: &ModelCard) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes.iter().chain(&[0xff]) {
            hash = (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    };
    eat(env!("CARGO_PKG_VERSION").as_bytes());
    eat(card.model_name.as_bytes());
    eat(card.tokenizer_json.as_bytes());
    eat(card.chat_template.as_bytes());
    eat(&card.context_length.to_le_bytes());
    eat(&card.block_size.to_le_bytes());
    for id in &card.eos_token_ids {
        eat(&id.to_le_bytes());
    }
    format!("fp_{:012x}", hash >> 16)
}

/// Slack on the longest token's spelling as the most text one token covers:
/// normalizers can fold several input bytes into one (NFKC ligatures).
const TOKEN_BYTES_SLACK: usize = 4;

impl Model {
    /// Builds the model from a card; `served_name` overrides `card.model_name`.
    pub fn from_card(card: &ModelCard, served_name: Option<String>) -> Result<Self, ModelError> {
        if card.context_length == 0 {
            return Err(ModelError::NoContext);
        }
        let tokenizer = Tokenizer::from_str(&card.tokenizer_json).map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        let template = if card.chat_template.trim().is_empty() {
            None
        } else {
            Some(ChatTemplate::new(&card.chat_template, &card.bos_token, &card.eos_token)?)
        };
        let tokenizer = Arc::new(tokenizer);
        let bos_token_id = card.add_bos_token.then(|| tokenizer.token_to_id(&card.bos_token)).flatten();
        let vocab_size = u32::try_from(tokenizer.get_vocab_size(true)).unwrap_or(u32::MAX);
        // No token stands for more text than its spelling in the vocabulary
        // (byte-level and sentencepiece spellings are longer than their bytes),
        // so a text over this many bytes has more tokens than the context.
        let longest_token = tokenizer.get_vocab(true).keys().map(String::len).max().unwrap_or(1);
        let max_prompt_bytes =
            (card.context_length as usize).saturating_mul(longest_token).saturating_mul(TOKEN_BYTES_SLACK);
        Ok(Self {
            served_name: served_name.unwrap_or_else(|| card.model_name.clone()),
            context_length: card.context_length,
            vocab_size,
            encoder: Encoder::new(tokenizer.clone()),
            decoder: Decoder::new(tokenizer.clone()),
            tokenizer,
            template,
            template_source: card.chat_template.clone(),
            bos_token: card.bos_token.clone(),
            eos_token: card.eos_token.clone(),
            bos_token_id,
            created: unix_now(),
            max_prompt_bytes,
            eos_token_ids: card.eos_token_ids.clone(),
            fingerprint: fingerprint(card),
            serves: if card.encoder { Serves::Embeddings } else { Serves::Generation },
            embedding_size: (card.embedding_size > 0).then_some(card.embedding_size),
            vocabulary: OnceLock::new(),
        })
    }

    /// Compiles a structured output against the model's vocabulary, to refuse one that cannot
    /// be enforced before any worker runs; returns how long the compile took. The workers
    /// compile it again for their matchers.
    pub fn check_constraint(&self, constraint: &Constraint) -> Result<Duration, ConstraintError> {
        let vocabulary = self
            .vocabulary
            .get_or_init(|| Vocabulary::new(&self.decoder, self.vocab_size as usize, &self.eos_token_ids));
        let (_, took) = vocabulary.as_ref().map_err(Clone::clone)?.compile(constraint)?;
        Ok(took)
    }
}

/// Seconds since the Unix epoch (0 if the clock is before it).
pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// A served model's name, shared by everything that labels or finds it: known
/// from the start (a named static pool, an etcd registration) or set once its
/// card loads, which is always before its first request runs.
#[derive(Debug, Clone, Default)]
pub struct ModelName(Arc<OnceLock<String>>);

impl ModelName {
    /// A name known now.
    pub fn known(name: impl Into<String>) -> Self {
        let cell = OnceLock::new();
        let _ = cell.set(name.into());
        Self(Arc::new(cell))
    }

    /// A name learnt later, with [`ModelName::learn`].
    pub fn unknown() -> Self {
        Self::default()
    }

    /// The name, if known.
    pub fn get(&self) -> Option<&str> {
        self.0.get().map(String::as_str)
    }

    /// Sets the name unless it is already known; the name it has after.
    pub fn learn(&self, name: &str) -> &str {
        self.0.get_or_init(|| name.to_owned())
    }

    /// The name as a metric label: empty while unknown, which no request sees.
    pub fn label(&self) -> &str {
        self.get().unwrap_or_default()
    }
}
