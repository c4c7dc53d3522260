//! The rule for the fields of the OpenAI and vLLM APIs this server does not honour: each passes
//! only absent, null or holding the value that changes nothing; anything else is a 400 naming it.

use serde_json::Value;

use crate::prepare::error::ValidationError;
use crate::prepare::request::responses::ResponsesNotHonoured;
use crate::prepare::request::{ChatNotHonoured, CompletionNotHonoured, NotHonoured};

/// The one value of a field that changes nothing.
#[derive(Debug, Clone, Copy)]
enum NoOp {
    False,
    True,
    EmptyList,
    EmptyObject,
    EmptyString,
    /// One of these strings.
    OneOf(&'static [&'static str]),
    /// `["text"]`.
    TextOnly,
    /// `"disabled"`.
    Disabled,
    /// Only null.
    Nothing,
}

impl NoOp {
    fn allows(self, value: &Value) -> bool {
        match self {
            Self::False => value == &Value::Bool(false),
            Self::True => value == &Value::Bool(true),
            Self::EmptyList => value.as_array().is_some_and(Vec::is_empty),
            Self::EmptyObject => value.as_object().is_some_and(serde_json::Map::is_empty),
            Self::EmptyString => value.as_str() == Some(""),
            Self::OneOf(values) => value.as_str().is_some_and(|s| values.contains(&s)),
            Self::TextOnly => value.as_array().is_some_and(|v| v.len() == 1 && v[0] == "text"),
            Self::Disabled => value.as_str() == Some("disabled"),
            Self::Nothing => false,
        }
    }

    /// What the refusal says is accepted instead.
    fn accepted(self) -> &'static str {
        match self {
            Self::False => "false or null",
            Self::True => "true or null",
            Self::EmptyList => "[] or null",
            Self::EmptyObject => "{} or null",
            Self::EmptyString => "\"\" or null",
            Self::OneOf(_) => "\"auto\", \"default\" or null",
            Self::TextOnly => "[\"text\"] or null",
            Self::Disabled => "\"disabled\" or null",
            Self::Nothing => "null",
        }
    }
}

/// Whether `value` is set to something other than null or its no-op value.
fn changes_something(value: &Option<Value>, no_op: NoOp) -> bool {
    value.as_ref().is_some_and(|value| !value.is_null() && !no_op.allows(value))
}

fn check(fields: &[(&'static str, &Option<Value>, NoOp)]) -> Result<(), ValidationError> {
    match fields.iter().find(|(_, value, no_op)| changes_something(value, *no_op)) {
        Some(&(field, _, no_op)) => Err(ValidationError::NotHonoured { field, accepted: no_op.accepted() }),
        None => Ok(()),
    }
}

impl NotHonoured {
    /// Refuses the first field set to something that would change the answer; `n` is the
    /// request's `n`, the one `best_of` that changes nothing besides 1.
    pub fn check(&self, n: Option<i64>) -> Result<(), ValidationError> {
        if let Some(best_of) = self.best_of.as_ref().filter(|v| !v.is_null()) {
            if best_of.as_i64() != Some(n.unwrap_or(1)) && best_of.as_f64() != Some(1.0) {
                return Err(ValidationError::NotHonoured { field: "best_of", accepted: "1, `n` or null" });
            }
        }
        check(&[
            ("logits_processors", &self.logits_processors, NoOp::EmptyList),
            ("vllm_xargs", &self.vllm_xargs, NoOp::EmptyObject),
            ("kv_transfer_params", &self.kv_transfer_params, NoOp::EmptyObject),
            ("mm_processor_kwargs", &self.mm_processor_kwargs, NoOp::EmptyObject),
        ])
    }
}

impl ChatNotHonoured {
    /// Refuses the first field set to something that would change the answer.
    pub fn check(&self) -> Result<(), ValidationError> {
        check(&[
            ("parallel_tool_calls", &self.parallel_tool_calls, NoOp::True),
            ("audio", &self.audio, NoOp::Nothing),
            ("modalities", &self.modalities, NoOp::TextOnly),
            ("prediction", &self.prediction, NoOp::Nothing),
            ("web_search_options", &self.web_search_options, NoOp::Nothing),
            ("functions", &self.functions, NoOp::Nothing),
            ("function_call", &self.function_call, NoOp::Nothing),
            ("store", &self.store, NoOp::False),
            ("metadata", &self.metadata, NoOp::EmptyObject),
            ("service_tier", &self.service_tier, NoOp::OneOf(&["auto", "default"])),
            ("verbosity", &self.verbosity, NoOp::Nothing),
            ("prompt_cache_key", &self.prompt_cache_key, NoOp::Nothing),
            ("structural_tag", &self.structural_tag, NoOp::Nothing),
        ])
    }
}

impl CompletionNotHonoured {
    /// Refuses the first field set to something that would change the answer.
    pub fn check(&self) -> Result<(), ValidationError> {
        check(&[("suffix", &self.suffix, NoOp::EmptyString), ("prompt_embeds", &self.prompt_embeds, NoOp::Nothing)])
    }
}

impl ResponsesNotHonoured {
    /// Refuses the first field set to something that would change the answer. The fields that
    /// would need responses kept between requests get a refusal that says the router is
    /// stateless; an absent `store` is taken as false, since nothing is ever kept.
    pub fn check(&self) -> Result<(), ValidationError> {
        let stateless: [(&'static str, &Option<Value>, NoOp); 4] = [
            ("store", &self.store, NoOp::False),
            ("previous_response_id", &self.previous_response_id, NoOp::Nothing),
            ("background", &self.background, NoOp::False),
            ("conversation", &self.conversation, NoOp::Nothing),
        ];
        if let Some((field, ..)) = stateless.iter().find(|(_, value, no_op)| changes_something(value, *no_op)) {
            return Err(ValidationError::Stateless { field });
        }
        check(&[
            ("prompt", &self.prompt, NoOp::Nothing),
            ("include", &self.include, NoOp::EmptyList),
            ("top_logprobs", &self.top_logprobs, NoOp::Nothing),
            ("max_tool_calls", &self.max_tool_calls, NoOp::Nothing),
            ("service_tier", &self.service_tier, NoOp::OneOf(&["auto", "default"])),
            ("prompt_cache_key", &self.prompt_cache_key, NoOp::Nothing),
            ("prompt_cache_retention", &self.prompt_cache_retention, NoOp::Nothing),
            ("stream_options", &self.stream_options, NoOp::EmptyObject),
            ("truncation", &self.truncation, NoOp::Disabled),
            ("context_management", &self.context_management, NoOp::Nothing),
        ])
    }
}
