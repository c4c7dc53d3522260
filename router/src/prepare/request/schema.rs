//! Schemas for the request fields whose JSON shape serde reads loosely (raw
//! JSON, untagged enums), written to accept exactly what validation accepts:
//! the OpenAPI document built from them is used to fuzz the router, so a
//! schema wider or narrower than validation shows up as a false failure.

use utoipa::openapi::schema::{AdditionalProperties, ArrayBuilder, Object, ObjectBuilder, OneOfBuilder, Schema, Type};
use utoipa::openapi::RefOr;

use super::MAX_PROMPTS;

fn string() -> ObjectBuilder {
    ObjectBuilder::new().schema_type(Type::String)
}

fn null() -> Object {
    ObjectBuilder::new().schema_type(Type::Null).build()
}

fn string_enum(values: &[&str]) -> ObjectBuilder {
    string().enum_values(Some(values.iter().copied()))
}

/// `{"type": "function", "function": {"name": <non-empty>, ...}}`, other keys free.
fn function_object() -> Object {
    let function =
        ObjectBuilder::new().schema_type(Type::Object).property("name", string().min_length(Some(1))).required("name");
    ObjectBuilder::new()
        .schema_type(Type::Object)
        .property("type", string_enum(&["function"]))
        .required("type")
        .property("function", function)
        .required("function")
        .build()
}

/// Chat `tools`: a list of function tools, or null.
pub fn tools() -> impl Into<RefOr<Schema>> {
    OneOfBuilder::new().item(ArrayBuilder::new().items(function_object())).item(null())
}

/// Chat `tool_choice`: `none`, `auto`, `required`, a named function, or null.
/// (A named function must be one of `tools`, which a schema cannot say.)
pub fn tool_choice() -> impl Into<RefOr<Schema>> {
    OneOfBuilder::new().item(string_enum(&["none", "auto", "required"])).item(function_object()).item(null())
}

/// `stop`: one string or up to 4, or null.
pub fn stop() -> impl Into<RefOr<Schema>> {
    OneOfBuilder::new().item(string()).item(ArrayBuilder::new().items(string()).max_items(Some(4))).item(null())
}

/// Completion `prompt`: non-empty text, non-empty token ids, or a batch of
/// exactly one non-empty text.
pub fn prompt() -> impl Into<RefOr<Schema>> {
    let text = || string().min_length(Some(1));
    OneOfBuilder::new()
        .item(text())
        .item(ArrayBuilder::new().items(token_id()).min_items(Some(1)))
        .item(ArrayBuilder::new().items(text()).min_items(Some(1)).max_items(Some(MAX_PROMPTS)))
        .item(
            ArrayBuilder::new()
                .items(ArrayBuilder::new().items(token_id()).min_items(Some(1)))
                .min_items(Some(1))
                .max_items(Some(MAX_PROMPTS)),
        )
}

fn token_id() -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::Integer)
        .format(Some(utoipa::openapi::SchemaFormat::KnownFormat(utoipa::openapi::KnownFormat::Int64)))
        .minimum(Some(0))
}

/// Token ids (each in the vocabulary, which the document cannot bound), or null.
pub fn token_ids() -> impl Into<RefOr<Schema>> {
    OneOfBuilder::new().item(ArrayBuilder::new().items(token_id())).item(null())
}

/// `allowed_token_ids`: a non-empty list of token ids, or null.
pub fn allowed_token_ids() -> impl Into<RefOr<Schema>> {
    OneOfBuilder::new().item(ArrayBuilder::new().items(token_id()).min_items(Some(1))).item(null())
}

/// `/detokenize`'s `tokens`: required, so not null.
pub fn required_token_ids() -> impl Into<RefOr<Schema>> {
    ArrayBuilder::new().items(token_id())
}

/// `logit_bias`: token id keys to biases in [-100, 100], or null.
pub fn logit_bias() -> impl Into<RefOr<Schema>> {
    let bias = ObjectBuilder::new().schema_type(Type::Number).minimum(Some(-100)).maximum(Some(100));
    let map = ObjectBuilder::new()
        .schema_type(Type::Object)
        .property_names(Some(string().pattern(Some(r"^\s*[0-9]+\s*$"))))
        .additional_properties(Some(AdditionalProperties::RefOr(RefOr::T(Schema::Object(bias.build())))));
    OneOfBuilder::new().item(map).item(null())
}

/// A message's `role`.
pub fn role() -> impl Into<RefOr<Schema>> {
    string_enum(&["system", "user", "assistant", "tool"])
}

/// A content part's `type`: only text parts are supported.
pub fn text_part() -> impl Into<RefOr<Schema>> {
    string_enum(&["text"])
}

/// Chat `reasoning_effort`: OpenAI's levels, or null.
pub fn reasoning_effort() -> impl Into<RefOr<Schema>> {
    OneOfBuilder::new().item(string_enum(&["minimal", "low", "medium", "high"])).item(null())
}

/// A refused field that passes only as null or `values`, the values that change nothing.
fn only(values: ObjectBuilder) -> impl Into<RefOr<Schema>> {
    OneOfBuilder::new().item(values).item(null())
}

/// A refused field: only null.
pub fn only_null() -> impl Into<RefOr<Schema>> {
    null()
}

/// A refused flag: only false or null.
pub fn only_false() -> impl Into<RefOr<Schema>> {
    only(ObjectBuilder::new().schema_type(Type::Boolean).enum_values(Some([false])))
}

/// A flag whose other value is refused: only true or null.
pub fn only_true() -> impl Into<RefOr<Schema>> {
    only(ObjectBuilder::new().schema_type(Type::Boolean).enum_values(Some([true])))
}

/// `best_of`: only 1 (with the default `n`) or null; validation also takes it equal to `n`.
pub fn no_op_best_of() -> impl Into<RefOr<Schema>> {
    only(ObjectBuilder::new().schema_type(Type::Integer).enum_values(Some([1])))
}

/// A refused list: only `[]` or null.
pub fn only_empty_list() -> impl Into<RefOr<Schema>> {
    OneOfBuilder::new().item(ArrayBuilder::new().max_items(Some(0))).item(null())
}

/// A refused object: only `{}` or null.
pub fn only_empty_object() -> impl Into<RefOr<Schema>> {
    only(ObjectBuilder::new().schema_type(Type::Object).max_properties(Some(0)))
}

/// A refused string: only `""` or null.
pub fn only_empty_string() -> impl Into<RefOr<Schema>> {
    only(string().max_length(Some(0)))
}

/// Chat `modalities`: only `["text"]` or null.
pub fn only_text_modality() -> impl Into<RefOr<Schema>> {
    OneOfBuilder::new()
        .item(ArrayBuilder::new().items(string_enum(&["text"])).min_items(Some(1)).max_items(Some(1)))
        .item(null())
}

/// Chat `service_tier`: only `auto`, `default` or null.
pub fn only_default_tier() -> impl Into<RefOr<Schema>> {
    only(string_enum(&["auto", "default"]))
}

/// Responses `truncation`: only `disabled` or null.
pub fn only_disabled() -> impl Into<RefOr<Schema>> {
    only(string_enum(&["disabled"]))
}

/// Responses `input`: a user message's text, or a non-empty list of items (objects, each
/// checked by validation: messages, function calls and their outputs, reasoning).
pub fn responses_input() -> impl Into<RefOr<Schema>> {
    let item = ObjectBuilder::new().schema_type(Type::Object);
    OneOfBuilder::new().item(string()).item(ArrayBuilder::new().items(item).min_items(Some(1)))
}

/// `{"type": "function", "name": <non-empty>, ...}`: a Responses function tool, or a named
/// `tool_choice`; other keys free.
fn flat_function() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::Object)
        .property("type", string_enum(&["function"]))
        .required("type")
        .property("name", string().min_length(Some(1)))
        .required("name")
        .build()
}

/// Responses `tools`: a list of function tools, or null.
pub fn responses_tools() -> impl Into<RefOr<Schema>> {
    OneOfBuilder::new().item(ArrayBuilder::new().items(flat_function())).item(null())
}

/// Responses `tool_choice`: `none`, `auto`, `required`, a named function, or null. (A named
/// function must be one of `tools`, which a schema cannot say.)
pub fn responses_tool_choice() -> impl Into<RefOr<Schema>> {
    OneOfBuilder::new().item(string_enum(&["none", "auto", "required"])).item(flat_function()).item(null())
}
