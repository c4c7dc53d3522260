//! The API fields that ask for a structured output, as OpenAI and vLLM spell them, read into
//! one [`Constraint`]: OpenAI's `response_format`, vLLM's `structured_outputs` and the older
//! top-level `guided_*` fields that clients still send. The router and the offline batch read
//! requests through here, so both accept and refuse the same things.

use serde::Deserialize;
use serde_json::Value;

use crate::{Constraint, Whitespace};

/// OpenAI's `response_format`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ResponseFormat {
    /// Free text: no constraint.
    Text,
    /// Any JSON object.
    JsonObject,
    /// JSON valid against `json_schema.schema`.
    JsonSchema {
        /// The schema and its name.
        json_schema: JsonSchemaFormat,
    },
    /// vLLM's structural tag, in its `structures` + `triggers` shape.
    StructuralTag(StructuralTag),
}

/// vLLM's structural tag (the `structures` + `triggers` shape vLLM's guidance backend takes):
/// free text, in which each trigger starts one of the structures whose `begin` starts with it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StructuralTag {
    /// `"structural_tag"`, or absent.
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// What each trigger may start.
    #[serde(default)]
    pub structures: Vec<TagStructure>,
    /// The texts that start a structure.
    #[serde(default)]
    pub triggers: Vec<String>,
    /// xgrammar's newer shape: refused, naming it.
    pub format: Option<Value>,
}

/// One structure of a structural tag: `begin`, a JSON value valid against `schema`, `end`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TagStructure {
    /// The opening text; it starts with one of the triggers.
    pub begin: String,
    /// The JSON schema of the value between `begin` and `end`.
    pub schema: Value,
    /// The closing text.
    pub end: String,
}

/// `response_format.json_schema`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonSchemaFormat {
    /// The schema's name (OpenAI requires one; it does not change the answer).
    pub name: String,
    /// What the schema is for (not shown to the model, as with vLLM).
    pub description: Option<String>,
    /// The schema; absent means any JSON value.
    pub schema: Option<Value>,
    /// Always enforced: `false` is accepted and enforced all the same, as vLLM does.
    pub strict: Option<bool>,
}

/// vLLM's `structured_outputs`: exactly one of `json`, `regex`, `choice`, `grammar` and
/// `json_object`, and options.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StructuredOutputs {
    /// A JSON schema, as an object or as its text.
    pub json: Option<Value>,
    /// A regex the whole answer must match.
    pub regex: Option<String>,
    /// The answer is exactly one of these.
    pub choice: Option<Vec<String>>,
    /// A grammar in llguidance's Lark dialect.
    pub grammar: Option<String>,
    /// Any JSON object.
    pub json_object: Option<bool>,
    /// A structural tag ([`StructuralTag`]), as an object or as its JSON text.
    pub structural_tag: Option<Value>,
    /// There is no other backend to fall back to: accepted either way.
    pub disable_fallback: Option<bool>,
    /// `true` (our default): JSON on one line, a space after `,` and `:`; `false`: any JSON
    /// whitespace between tokens.
    pub disable_any_whitespace: Option<bool>,
    /// Objects of the schema without `additionalProperties` get `false`.
    pub disable_additional_properties: Option<bool>,
    /// JSON whitespace must match this regex.
    pub whitespace_pattern: Option<String>,
}

/// vLLM's older top-level fields.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct Guided {
    /// `guided_json`: a JSON schema, as an object or as its text.
    pub guided_json: Option<Value>,
    /// `guided_regex`.
    pub guided_regex: Option<String>,
    /// `guided_choice`.
    pub guided_choice: Option<Vec<String>>,
    /// `guided_grammar` (Lark).
    pub guided_grammar: Option<String>,
    /// `guided_decoding_backend`: `auto`, `guidance` or `llguidance` (the one there is).
    pub guided_decoding_backend: Option<String>,
    /// `guided_whitespace_pattern`.
    pub guided_whitespace_pattern: Option<String>,
}

/// A structured output a request asked for, and the field that asked (errors name it).
#[derive(Debug, Clone, PartialEq)]
pub struct Requested {
    /// What the answer must match.
    pub constraint: Constraint,
    /// The request field it came from, as `structured_outputs.json`.
    pub field: &'static str,
}

/// A structured-output field that cannot be honoured, named.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{field}`: {reason}")]
pub struct FieldError {
    /// The request field at fault.
    pub field: &'static str,
    /// Why.
    pub reason: String,
}

fn refuse(field: &'static str, reason: impl Into<String>) -> FieldError {
    FieldError { field, reason: reason.into() }
}

/// The one structured output of a request, if any; a 400's worth of reason when the fields ask
/// for two, or for something not supported.
pub fn requested(
    response_format: Option<&ResponseFormat>,
    structured_outputs: Option<&StructuredOutputs>,
    guided: &Guided,
) -> Result<Option<Requested>, FieldError> {
    let mut found: Vec<Requested> = Vec::new();
    match response_format {
        None | Some(ResponseFormat::Text) => {}
        Some(ResponseFormat::JsonObject) => {
            found.push(Requested { constraint: Constraint::json_object(Whitespace::Compact), field: "response_format" })
        }
        Some(ResponseFormat::JsonSchema { json_schema }) => {
            let field = "response_format.json_schema.schema";
            let schema = json_schema.schema.clone().unwrap_or_else(|| Value::Object(Default::default()));
            found.push(Requested { constraint: json(field, schema, Whitespace::Compact)?, field });
        }
        Some(ResponseFormat::StructuralTag(tag)) => {
            let field = "response_format";
            found.push(Requested { constraint: structural_tag(field, tag)?, field });
        }
    }
    if let Some(so) = structured_outputs {
        found.extend(from_structured_outputs(so)?);
    }
    found.extend(from_guided(guided)?);
    match found.len() {
        0 | 1 => Ok(found.pop()),
        _ => Err(refuse(
            found[1].field,
            format!("`{}` already constrains the answer; a request may ask for one structured output", found[0].field),
        )),
    }
}

fn from_structured_outputs(so: &StructuredOutputs) -> Result<Vec<Requested>, FieldError> {
    let whitespace = match (&so.whitespace_pattern, so.disable_any_whitespace) {
        (Some(pattern), _) => Whitespace::Pattern(pattern.clone()),
        (None, Some(false)) => Whitespace::Flexible,
        (None, _) => Whitespace::Compact,
    };
    let mut found = Vec::new();
    if let Some(schema) = &so.json {
        let field = "structured_outputs.json";
        let mut schema = schema_value(field, schema.clone())?;
        if so.disable_additional_properties == Some(true) {
            close_objects(&mut schema);
        }
        found.push(Requested { constraint: json(field, schema, whitespace.clone())?, field });
    }
    if let Some(rx) = &so.regex {
        found.push(Requested { constraint: Constraint::Regex(rx.clone()), field: "structured_outputs.regex" });
    }
    if let Some(choice) = &so.choice {
        found.push(Requested {
            constraint: choices("structured_outputs.choice", choice)?,
            field: "structured_outputs.choice",
        });
    }
    if let Some(grammar) = &so.grammar {
        found.push(Requested {
            constraint: lark("structured_outputs.grammar", grammar)?,
            field: "structured_outputs.grammar",
        });
    }
    if let Some(tag) = &so.structural_tag {
        let field = "structured_outputs.structural_tag";
        let tag: StructuralTag = serde_json::from_value(schema_value(field, tag.clone())?)
            .map_err(|e| refuse(field, format!("is not a structural tag (`structures` and `triggers`): {e}")))?;
        if tag.kind.as_deref().is_some_and(|kind| kind != "structural_tag") {
            return Err(refuse(field, "`type` must be `structural_tag`"));
        }
        found.push(Requested { constraint: structural_tag(field, &tag)?, field });
    }
    if so.json_object == Some(true) {
        found.push(Requested {
            constraint: Constraint::json_object(whitespace),
            field: "structured_outputs.json_object",
        });
    }
    if found.is_empty() {
        return Err(refuse(
            "structured_outputs",
            "names no constraint: give one of `json`, `regex`, `choice`, `grammar`, `json_object` or `structural_tag`",
        ));
    }
    Ok(found)
}

fn from_guided(g: &Guided) -> Result<Vec<Requested>, FieldError> {
    if let Some(backend) = &g.guided_decoding_backend {
        if !matches!(backend.as_str(), "auto" | "guidance" | "llguidance") {
            return Err(refuse(
                "guided_decoding_backend",
                format!("`{backend}` is not available; the backend is `guidance` (llguidance)"),
            ));
        }
    }
    let whitespace = g.guided_whitespace_pattern.clone().map_or(Whitespace::Compact, Whitespace::Pattern);
    let mut found = Vec::new();
    if let Some(schema) = &g.guided_json {
        let schema = schema_value("guided_json", schema.clone())?;
        found.push(Requested { constraint: json("guided_json", schema, whitespace)?, field: "guided_json" });
    }
    if let Some(rx) = &g.guided_regex {
        found.push(Requested { constraint: Constraint::Regex(rx.clone()), field: "guided_regex" });
    }
    if let Some(choice) = &g.guided_choice {
        found.push(Requested { constraint: choices("guided_choice", choice)?, field: "guided_choice" });
    }
    if let Some(grammar) = &g.guided_grammar {
        found.push(Requested { constraint: lark("guided_grammar", grammar)?, field: "guided_grammar" });
    }
    Ok(found)
}

/// A schema given as an object or as its JSON text.
fn schema_value(field: &'static str, schema: Value) -> Result<Value, FieldError> {
    match schema {
        Value::String(text) => {
            serde_json::from_str(&text).map_err(|e| refuse(field, format!("is not a JSON schema: {e}")))
        }
        other => Ok(other),
    }
}

fn json(field: &'static str, schema: Value, whitespace: Whitespace) -> Result<Constraint, FieldError> {
    if !schema.is_object() {
        return Err(refuse(field, "a JSON schema must be a JSON object"));
    }
    Ok(Constraint::Json { schema, whitespace })
}

fn choices(field: &'static str, choice: &[String]) -> Result<Constraint, FieldError> {
    if choice.is_empty() {
        return Err(refuse(field, "must list at least one choice"));
    }
    Ok(Constraint::Choice(choice.to_vec()))
}

fn lark(field: &'static str, grammar: &str) -> Result<Constraint, FieldError> {
    if grammar.contains("::=") {
        return Err(refuse(field, "GBNF grammars are not supported; write the grammar in Lark syntax (`rule: ...`)"));
    }
    Ok(Constraint::Lark(grammar.to_string()))
}

/// A structural tag as a Lark grammar: free text, where a trigger can only go on as one of the
/// structures beginning with it. Each trigger ends a lazy lexeme (text up to and including the
/// first trigger), so the text before a structure never holds a trigger; the text after the last
/// structure is free, as in vLLM's guidance backend. JSON inside a structure is compact.
fn structural_tag(field: &'static str, tag: &StructuralTag) -> Result<Constraint, FieldError> {
    if tag.format.is_some() {
        return Err(refuse(field, "xgrammar's `format` shape is not supported; give `structures` and `triggers`"));
    }
    let (structures, triggers) = (&tag.structures, &tag.triggers);
    if structures.is_empty() {
        return Err(refuse(field, "`structures` must list at least one structure"));
    }
    if triggers.is_empty() || triggers.iter().any(String::is_empty) {
        return Err(refuse(field, "`triggers` must list at least one non-empty text"));
    }
    let literal = |text: &str| if text.is_empty() { String::new() } else { Value::from(text).to_string() };
    let mut tags = Vec::new();
    let mut rules = String::new();
    for (i, structure) in structures.iter().enumerate() {
        let Some(trigger) = triggers.iter().find(|t| structure.begin.starts_with(t.as_str())) else {
            return Err(refuse(field, format!("`begin` {:?} starts with none of the triggers", structure.begin)));
        };
        let Value::Object(schema) = &structure.schema else {
            return Err(refuse(field, format!("the schema of {:?} must be a JSON object", structure.begin)));
        };
        let mut schema = schema.clone();
        schema.entry("x-guidance").or_insert_with(|| Whitespace::Compact.options());
        let rest = literal(&structure.begin[trigger.len()..]);
        rules.push_str(&format!("tag_{i}_trigger[lazy]: TEXT {}\n", literal(trigger)));
        rules.push_str(&format!(
            "tag_{i}: tag_{i}_trigger {rest} %json {} {}\n",
            Value::Object(schema),
            literal(&structure.end)
        ));
        tags.push(format!("tag_{i}"));
    }
    let grammar = format!("%llguidance {{}}\nstart: ({})* TEXT\nTEXT: /(.|\\n)*/\n{rules}", tags.join(" | "));
    Ok(Constraint::Lark(grammar))
}

/// `additionalProperties: false` on every object schema that does not set it, through every
/// keyword that holds subschemas (never into `const`, `enum` or `default` values).
fn close_objects(schema: &mut Value) {
    let Value::Object(fields) = schema else { return };
    if fields.get("type").is_some_and(|t| t == "object") || fields.contains_key("properties") {
        fields.entry("additionalProperties").or_insert(Value::Bool(false));
    }
    for (key, value) in fields.iter_mut() {
        match key.as_str() {
            "properties" | "patternProperties" | "$defs" | "definitions" => {
                if let Value::Object(named) = value {
                    named.values_mut().for_each(close_objects);
                }
            }
            "anyOf" | "oneOf" | "allOf" | "prefixItems" => {
                if let Value::Array(list) = value {
                    list.iter_mut().for_each(close_objects);
                }
            }
            "items" | "additionalProperties" | "additionalItems" | "not" => close_objects(value),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests;
