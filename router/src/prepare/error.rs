//! What the prepare stage refuses, each naming the field at fault.

use std::borrow::Cow;

/// A parameter the router cannot accept (400).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ValidationError {
    /// A required field is absent.
    #[error("`{field}` is required")]
    Missing { field: &'static str },
    /// A list or string that must not be empty is.
    #[error("`{field}` must not be empty")]
    Empty { field: &'static str },
    /// A value is out of its range.
    #[error("`{field}` must be {limit}, got {value}")]
    OutOfRange { field: &'static str, limit: &'static str, value: String },
    /// A value is valid OpenAI but not supported here.
    #[error("`{field}`: {reason}")]
    Unsupported { field: &'static str, reason: String },
    /// A chat message without the `content` its role needs (only an assistant turn that makes
    /// tool calls may leave it out).
    #[error("`messages[{index}].content` is required in a `{role}` message{}", if role == "assistant" { " without `tool_calls`" } else { "" })]
    MissingContent { index: usize, role: String },
    /// The prompt alone fills the context.
    #[error(
        "This model's maximum context length is {context_length} tokens, but the prompt has {prompt_tokens} tokens."
    )]
    PromptTooLong { prompt_tokens: usize, context_length: u32 },
    /// The prompt's text is longer than any prompt of the context's length.
    #[error(
        "This model's maximum context length is {context_length} tokens, but the prompt ({bytes} bytes) is longer than that many tokens can be."
    )]
    TextTooLong { bytes: usize, context_length: u32 },
    /// Prompt plus `max_tokens` exceed the context.
    #[error("This model's maximum context length is {context_length} tokens. However, you requested {total} tokens ({prompt_tokens} in the messages, {max_tokens} in the completion).")]
    ContextExceeded { prompt_tokens: usize, max_tokens: u32, total: u64, context_length: u32 },
    /// A token id of `field` (a prompt, `/detokenize`'s tokens) is not in the vocabulary.
    #[error("token id {value} in `{field}` must be in [0, {vocab_size})")]
    TokenOutOfVocab { field: &'static str, value: i64, vocab_size: u32 },
    /// A field of the OpenAI or vLLM API that this server does not honour, set to a value that
    /// would change the answer.
    #[error("`{field}` is not supported by this server; it may only be {accepted}")]
    NotHonoured { field: &'static str, accepted: &'static str },
    /// An item of a Responses API `input` list that is malformed or of a kind not supported.
    #[error("`input[{index}]`: {reason}")]
    InputItem { index: usize, reason: String },
    /// A field of the Responses API that needs responses kept between requests (`store: true`,
    /// `previous_response_id`, `background`, `conversation`): the router keeps none.
    #[error("`{field}` needs responses kept between requests, and this router keeps none: it is stateless, so send the whole conversation as `input`")]
    Stateless { field: &'static str },
    /// A refusal of the chat request a Responses API request was translated into, whose field
    /// the Responses API names `param`.
    #[error("{source}")]
    Translated { param: &'static str, source: Box<ValidationError> },
    /// A structured output that does not compile for the model.
    #[error("`{field}` cannot be enforced: {reason}")]
    Constraint { field: &'static str, reason: String },
    /// The chat template rejected the conversation.
    #[error("chat template error: {0}")]
    Template(String),
    /// The tokenizer failed.
    #[error("tokenization error: {0}")]
    Tokenize(String),
}

impl ValidationError {
    /// The request field at fault.
    pub fn param(&self) -> Option<Cow<'static, str>> {
        match self {
            Self::Missing { field }
            | Self::Empty { field }
            | Self::OutOfRange { field, .. }
            | Self::Unsupported { field, .. }
            | Self::Constraint { field, .. }
            | Self::NotHonoured { field, .. }
            | Self::Stateless { field }
            | Self::Translated { param: field, .. }
            | Self::TokenOutOfVocab { field, .. } => Some(Cow::Borrowed(field)),
            Self::MissingContent { index, .. } => Some(Cow::Owned(format!("messages[{index}].content"))),
            Self::InputItem { index, .. } => Some(Cow::Owned(format!("input[{index}]"))),
            Self::PromptTooLong { .. } | Self::TextTooLong { .. } => Some(Cow::Borrowed("prompt")),
            Self::ContextExceeded { .. } => Some(Cow::Borrowed("max_tokens")),
            Self::Template(_) => Some(Cow::Borrowed("messages")),
            Self::Tokenize(_) => None,
        }
    }

    /// A stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Missing { .. } | Self::MissingContent { .. } => "missing_required_parameter",
            Self::Unsupported { .. } => "unsupported_value",
            Self::NotHonoured { .. } | Self::Stateless { .. } => "unsupported_parameter",
            Self::Translated { source, .. } => source.code(),
            Self::PromptTooLong { .. } | Self::TextTooLong { .. } | Self::ContextExceeded { .. } => {
                "context_length_exceeded"
            }
            _ => "invalid_value",
        }
    }
}
