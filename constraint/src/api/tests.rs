use serde_json::json;

use super::*;

fn so(v: Value) -> StructuredOutputs {
    serde_json::from_value(v).unwrap()
}

fn rf(v: Value) -> ResponseFormat {
    serde_json::from_value(v).unwrap()
}

#[test]
fn each_field_names_itself() {
    let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
    let r = requested(
        Some(&rf(json!({"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}))),
        None,
        &Guided::default(),
    )
    .unwrap()
    .unwrap();
    assert_eq!(r.field, "response_format.json_schema.schema");
    assert_eq!(r.constraint, Constraint::Json { schema, whitespace: Whitespace::Compact });

    let r = requested(None, Some(&so(json!({"choice": ["a", "b"]}))), &Guided::default()).unwrap().unwrap();
    assert_eq!(
        (r.field, r.constraint),
        ("structured_outputs.choice", Constraint::Choice(vec!["a".into(), "b".into()]))
    );

    let guided = Guided { guided_regex: Some("[0-9]+".into()), ..Guided::default() };
    let r = requested(None, None, &guided).unwrap().unwrap();
    assert_eq!((r.field, r.constraint), ("guided_regex", Constraint::Regex("[0-9]+".into())));
}

#[test]
fn text_and_nothing_ask_for_nothing() {
    assert_eq!(requested(Some(&rf(json!({"type": "text"}))), None, &Guided::default()), Ok(None));
    assert_eq!(requested(None, None, &Guided::default()), Ok(None));
}

#[test]
fn two_structured_outputs_are_refused_naming_the_second() {
    let guided = Guided { guided_choice: Some(vec!["x".into()]), ..Guided::default() };
    let e = requested(Some(&rf(json!({"type": "json_object"}))), None, &guided).unwrap_err();
    assert_eq!(e.field, "guided_choice");
    assert!(e.reason.contains("response_format"), "{e}");
    let e =
        requested(None, Some(&so(json!({"regex": "a", "grammar": "start: \"a\""}))), &Guided::default()).unwrap_err();
    assert_eq!(e.field, "structured_outputs.grammar");
}

#[test]
fn unsupported_asks_are_refused() {
    let refused =
        |so_: Option<Value>, guided: Guided| requested(None, so_.map(so).as_ref(), &guided).unwrap_err().field;
    assert_eq!(refused(Some(json!({"structural_tag": {}})), Guided::default()), "structured_outputs.structural_tag");
    assert_eq!(refused(Some(json!({})), Guided::default()), "structured_outputs");
    assert_eq!(refused(Some(json!({"grammar": "root ::= \"a\""})), Guided::default()), "structured_outputs.grammar");
    assert_eq!(refused(Some(json!({"choice": []})), Guided::default()), "structured_outputs.choice");
    assert_eq!(refused(Some(json!({"json": "{not json"})), Guided::default()), "structured_outputs.json");
    assert_eq!(refused(Some(json!({"json": [1]})), Guided::default()), "structured_outputs.json");
    let backend = Guided {
        guided_decoding_backend: Some("xgrammar".into()),
        guided_regex: Some("a".into()),
        ..Guided::default()
    };
    assert_eq!(refused(None, backend), "guided_decoding_backend");
    assert!(serde_json::from_value::<StructuredOutputs>(json!({"jsn": {}})).is_err(), "unknown fields are errors");
    assert!(serde_json::from_value::<ResponseFormat>(json!({"type": "yaml"})).is_err());
}

#[test]
fn options_reach_the_constraint() {
    let r = requested(
        None,
        Some(&so(json!({"json": "{\"type\": \"object\"}", "disable_any_whitespace": false}))),
        &Guided::default(),
    )
    .unwrap()
    .unwrap();
    assert_eq!(r.constraint, Constraint::Json { schema: json!({"type": "object"}), whitespace: Whitespace::Flexible });
    let r = requested(None, Some(&so(json!({"json_object": true, "whitespace_pattern": " ?"}))), &Guided::default())
        .unwrap()
        .unwrap();
    assert_eq!(r.constraint, Constraint::json_object(Whitespace::Pattern(" ?".into())));
}

#[test]
fn disable_additional_properties_closes_every_object_schema_but_no_value() {
    let schema = json!({
        "type": "object",
        "properties": {
            "inner": {"type": "object", "properties": {"x": {"type": "integer"}}},
            "open": {"type": "object", "additionalProperties": true},
            "list": {"type": "array", "items": {"properties": {"y": {}}}},
            "fixed": {"const": {"type": "object"}}
        },
        "$defs": {"d": {"anyOf": [{"type": "object"}, {"type": "null"}]}}
    });
    let r =
        requested(None, Some(&so(json!({"json": schema, "disable_additional_properties": true}))), &Guided::default())
            .unwrap()
            .unwrap();
    let Constraint::Json { schema, .. } = r.constraint else { panic!() };
    assert_eq!(schema["additionalProperties"], false);
    assert_eq!(schema["properties"]["inner"]["additionalProperties"], false);
    assert_eq!(schema["properties"]["open"]["additionalProperties"], true);
    assert_eq!(schema["properties"]["list"]["items"]["additionalProperties"], false);
    assert_eq!(schema["properties"]["fixed"]["const"], json!({"type": "object"}));
    assert_eq!(schema["$defs"]["d"]["anyOf"][0]["additionalProperties"], false);
    assert!(schema["properties"].get("additionalProperties").is_none());
}
