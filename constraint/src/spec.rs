//! What a request's answer must match, as plain data.

use llguidance::api::TopLevelGrammar;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::ConstraintError;

/// What the whole answer must match.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Constraint {
    /// A JSON value valid against a JSON schema (an object; `{"type": "object"}` is any object).
    Json {
        /// The schema.
        schema: Value,
        /// Where whitespace may go between the value's tokens.
        whitespace: Whitespace,
    },
    /// Text the regex matches in full (Rust `regex` syntax, no look-around or back-references).
    Regex(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
    /// Text the grammar derives, in llguidance's Lark dialect.
    Lark(String),
}

/// Where a JSON answer may put whitespace.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Whitespace {
    /// One line, a space after each `,` and `:` (`{"a": 1, "b": [2, 3]}`): the layout models
    /// write most often, and no room for a small model to loop on newlines.
    #[default]
    Compact,
    /// Any JSON whitespace between tokens (vLLM's default).
    Flexible,
    /// Whitespace matching this regex.
    Pattern(String),
}

impl Constraint {
    /// What kind of constraint this is, for metrics and logs: `json`, `regex`, `choice` or
    /// `grammar`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Json { .. } => "json",
            Self::Regex(_) => "regex",
            Self::Choice(_) => "choice",
            Self::Lark(_) => "grammar",
        }
    }

    /// `{"type": "object"}`: any JSON object (`response_format: json_object`).
    pub fn json_object(whitespace: Whitespace) -> Self {
        Self::Json { schema: json!({"type": "object"}), whitespace }
    }

    /// The llguidance grammar this constraint is.
    pub(crate) fn to_grammar(&self) -> Result<TopLevelGrammar, ConstraintError> {
        match self {
            Self::Json { schema, whitespace } => {
                let Value::Object(fields) = schema else {
                    return Err(ConstraintError::Invalid("a JSON schema must be a JSON object".into()));
                };
                let mut schema = fields.clone();
                // A schema's own llguidance options win over the request's whitespace.
                schema.entry("x-guidance").or_insert_with(|| whitespace.options());
                Ok(TopLevelGrammar::from_json_schema(Value::Object(schema)))
            }
            Self::Regex(rx) => Ok(TopLevelGrammar::from_regex(rx)),
            Self::Choice(choices) => {
                if choices.is_empty() {
                    return Err(ConstraintError::Invalid("the list of choices is empty".into()));
                }
                let alternatives: Vec<String> = choices.iter().map(|c| regex::escape(c)).collect();
                Ok(TopLevelGrammar::from_regex(&format!("(?:{})", alternatives.join("|"))))
            }
            Self::Lark(grammar) => Ok(TopLevelGrammar::from_lark(grammar.clone())),
        }
    }
}

impl Whitespace {
    /// llguidance's JSON compile options for this layout.
    pub(crate) fn options(&self) -> Value {
        match self {
            Self::Compact => json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "}),
            Self::Flexible => json!({"whitespace_flexible": true}),
            Self::Pattern(pattern) => json!({"whitespace_pattern": pattern}),
        }
    }
}
