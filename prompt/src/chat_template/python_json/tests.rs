use minijinja::Environment;
use serde_json::json;

use super::tojson;

/// Renders `{{ value | tojson<args> }}`.
fn render(value: serde_json::Value, args: &str) -> String {
    let mut env = Environment::new();
    env.add_filter("tojson", tojson);
    env.render_str(&format!("{{{{ value | tojson{args} }}}}"), minijinja::context! { value => value }).unwrap()
}

// Each expected text is what Python 3's `json.dumps` writes for the same call.
#[test]
fn writes_as_python_json_dumps() {
    let value = json!({"b": [1, 2.5, null, true], "a": {"x": "<é & \"q\"\n>"}, "e": {}, "l": []});
    assert_eq!(
        render(value.clone(), ""),
        r#"{"b": [1, 2.5, null, true], "a": {"x": "<é & \"q\"\n>"}, "e": {}, "l": []}"#
    );
    assert_eq!(
        render(value, "(indent=2)"),
        "{\n  \"b\": [\n    1,\n    2.5,\n    null,\n    true\n  ],\n  \"a\": {\n    \"x\": \"<é & \\\"q\\\"\\n>\"\n  },\n  \"e\": {},\n  \"l\": []\n}"
    );
    assert_eq!(render(json!({"b": 1, "a": [1, 2]}), "(sort_keys=true)"), r#"{"a": [1, 2], "b": 1}"#);
    assert_eq!(render(json!({"b": 1, "a": [1, 2]}), "(separators=[',', ':'])"), r#"{"b":1,"a":[1,2]}"#);
    assert_eq!(render(json!(["é🦀", "\u{1b}"]), "(ensure_ascii=true)"), r#"["\u00e9\ud83e\udd80", "\u001b"]"#);
    assert_eq!(render(json!("x"), "(indent='\t')"), r#""x""#);
}

#[test]
fn refuses_what_it_cannot_honour() {
    let mut env = Environment::new();
    env.add_filter("tojson", tojson);
    for call in ["tojson(separators=[','])", "tojson(colour=1)", "tojson(indent=-1)"] {
        let source = format!("{{{{ 1 | {call} }}}}");
        assert!(env.render_str(&source, ()).is_err(), "{call}");
    }
}
