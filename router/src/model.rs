//! What the router knows about the served model, built once from the
//! [`ModelCard`] a worker publishes: tokenizer, chat template and limits.

use std::str::FromStr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use proto::worker::ModelCard;
use tokenizers::Tokenizer;

use cluster::chat_template::ChatTemplate;

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
    /// The chat template; `None` when the card has none (chat is then refused).
    pub template: Option<ChatTemplate>,
    /// The BOS token's text, the template's `bos_token` (also for a request's own template).
    pub bos_token: String,
    /// The EOS token's text, the template's `eos_token`.
    pub eos_token: String,
    /// Prepended to text prompts of `/v1/completions` when set.
    pub bos_token_id: Option<u32>,
    /// Unix seconds when the card was loaded, shown by `/v1/models`.
    pub created: u64,
}

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
        let bos_token_id = card.add_bos_token.then(|| tokenizer.token_to_id(&card.bos_token)).flatten();
        let vocab_size = u32::try_from(tokenizer.get_vocab_size(true)).unwrap_or(u32::MAX);
        Ok(Self {
            served_name: served_name.unwrap_or_else(|| card.model_name.clone()),
            context_length: card.context_length,
            vocab_size,
            tokenizer: Arc::new(tokenizer),
            template,
            bos_token: card.bos_token.clone(),
            eos_token: card.eos_token.clone(),
            bos_token_id,
            created: unix_now(),
        })
    }
}

/// Seconds since the Unix epoch (0 if the clock is before it).
pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
