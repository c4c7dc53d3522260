//! Structured outputs: an answer held to a JSON schema, a regex, a list of choices or a Lark
//! grammar, token by token.
//!
//! # Layout, in the order a request uses it
//!
//! - [`api`]: the request fields that ask for a structured output (`response_format`,
//!   `structured_outputs`, `guided_*`) read into one [`Constraint`], or refused naming the field.
//! - [`spec`]: [`Constraint`], what the request asks for, as plain data (the wire carries it to
//!   both workers).
//! - [`vocabulary`]: [`Vocabulary`], a model's tokens as bytes in llguidance's token trie, built
//!   once per model; it compiles a constraint into a [`Grammar`], or refuses it with a
//!   [`ConstraintError`] saying why.
//! - [`grammar`]: [`Grammar`], one per sequence: it masks the logits of every token the
//!   constraint forbids next, then advances past the token sampled.
//!
//! The matching itself is [llguidance](https://github.com/guidance-ai/llguidance)'s, the
//! library vLLM, SGLang, llama.cpp and mistral.rs use.

pub mod api;
pub mod grammar;
pub mod spec;
pub mod vocabulary;

mod error;

pub use error::ConstraintError;
pub use grammar::{Grammar, MaskObserver, ThinkTokens};
pub use spec::{Constraint, Whitespace};
pub use vocabulary::Vocabulary;
