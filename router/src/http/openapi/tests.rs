use axum::body::{to_bytes, Body};
use axum::http::{Request, StatusCode};
use serde_json::Value;
use tower::ServiceExt;

use crate::http::app::served_routes;

fn document() -> Value {
    serde_json::from_str(&super::document()).expect("the document is JSON")
}

/// Follows a local `$ref` (`#/components/schemas/X`).
fn resolve<'a>(doc: &'a Value, schema: &'a Value) -> &'a Value {
    match schema.get("$ref").and_then(Value::as_str) {
        Some(reference) => {
            let name = reference.strip_prefix("#/components/schemas/").expect("a local ref");
            resolve(doc, &doc["components"]["schemas"][name])
        }
        None => schema,
    }
}

/// The schema of `field` in `schema`, looking through `allOf` (flattened structs).
fn property<'a>(doc: &'a Value, schema: &'a Value, field: &str) -> Option<&'a Value> {
    let schema = resolve(doc, schema);
    if let Some(found) = schema["properties"].get(field) {
        return Some(found);
    }
    schema["allOf"].as_array()?.iter().find_map(|part| property(doc, part, field))
}

/// Whether `schema` (or a part of its `allOf`) requires `field`.
fn requires(doc: &Value, schema: &Value, field: &str) -> bool {
    let schema = resolve(doc, schema);
    let here = schema["required"].as_array().is_some_and(|r| r.iter().any(|f| f == field));
    here || schema["allOf"].as_array().is_some_and(|parts| parts.iter().any(|p| requires(doc, p, field)))
}

fn request_schema<'a>(doc: &'a Value, path: &str) -> &'a Value {
    &doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
}

#[test]
fn lists_exactly_the_routes_the_router_serves() {
    let doc = document();
    assert!(doc["openapi"].as_str().is_some_and(|v| v.starts_with('3')), "{}", doc["openapi"]);
    let paths = doc["paths"].as_object().unwrap();
    let served = served_routes();
    for (method, path) in &served {
        let method = method.as_str().to_lowercase();
        assert!(paths.get(*path).and_then(|p| p.get(&method)).is_some(), "{method} {path} is not documented");
    }
    let documented: usize = paths.values().map(|p| p.as_object().unwrap().len()).sum();
    assert_eq!(documented, served.len(), "documented operations the router does not serve: {paths:?}");
    for path in [
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/responses",
        "/v1/embeddings",
        "/score",
        "/v1/score",
        "/rerank",
        "/v1/rerank",
        "/v2/rerank",
        "/v1/models",
        "/tokenize",
        "/detokenize",
        "/health",
        "/ready",
        "/metrics",
        "/version",
        "/openapi.json",
    ] {
        assert!(paths.contains_key(path), "{path}");
    }
}

#[test]
fn request_fields_carry_the_validated_ranges() {
    let doc = document();
    let chat = request_schema(&doc, "/v1/chat/completions");
    let completion = request_schema(&doc, "/v1/completions");
    let num = |v: &Value| v.as_f64();
    for schema in [chat, completion] {
        let temperature = property(&doc, schema, "temperature").expect("temperature");
        assert_eq!((num(&temperature["minimum"]), num(&temperature["maximum"])), (Some(0.0), Some(2.0)));
        let top_p = property(&doc, schema, "top_p").unwrap();
        assert_eq!((num(&top_p["exclusiveMinimum"]), num(&top_p["maximum"])), (Some(0.0), Some(1.0)));
        let n = property(&doc, schema, "n").unwrap();
        assert_eq!((num(&n["minimum"]), num(&n["maximum"])), (Some(1.0), Some(16.0)));
        let request_id = property(&doc, schema, "request_id").unwrap();
        assert_eq!((request_id["minLength"].as_u64(), request_id["maxLength"].as_u64()), (Some(1), Some(256)));
        for field in ["include_stop_str_in_output", "skip_special_tokens", "user", "kv_transfer_params", "echo"] {
            assert!(property(&doc, schema, field).is_some(), "{field}");
        }
    }
    for field in ["add_generation_prompt", "continue_final_message", "chat_template", "chat_template_kwargs", "tools"] {
        assert!(property(&doc, chat, field).is_some(), "{field}");
    }
    let top_logprobs = property(&doc, chat, "top_logprobs").unwrap();
    assert_eq!((num(&top_logprobs["minimum"]), num(&top_logprobs["maximum"])), (Some(0.0), Some(20.0)));
    // Required fields are required; `stop` allows at most 4 strings.
    assert!(requires(&doc, chat, "messages"));
    assert!(requires(&doc, completion, "prompt"));
    assert!(!requires(&doc, chat, "temperature"));
    let stop = property(&doc, chat, "stop").unwrap();
    assert!(stop["oneOf"].as_array().unwrap().iter().any(|s| s["maxItems"] == 4), "{stop}");
}

#[test]
fn errors_have_the_openai_shape() {
    let doc = document();
    let error = &doc["components"]["schemas"]["ErrorObject"];
    for field in ["message", "type", "param", "code"] {
        assert!(error["properties"].get(field).is_some(), "{field}");
    }
    let responses = &doc["paths"]["/v1/chat/completions"]["post"]["responses"];
    // Streaming answers are server-sent events.
    for kind in ["application/json", "text/event-stream"] {
        assert!(responses["200"]["content"].get(kind).is_some(), "{kind}");
    }
    for status in ["400", "404", "429", "502", "503"] {
        let schema = &responses[status]["content"]["application/json"]["schema"]["$ref"];
        assert_eq!(schema, "#/components/schemas/ErrorResponse", "{status}");
    }
}

#[test]
fn every_answer_has_its_body_schema_and_the_servers_and_bearer_scheme_are_named() {
    let doc = document();
    assert_eq!(doc["servers"][0]["url"], "/");
    let bearer = &doc["components"]["securitySchemes"]["bearer"];
    assert_eq!((bearer["type"].as_str(), bearer["scheme"].as_str()), (Some("http"), Some("bearer")), "{bearer}");
    let bodies = [
        ("/v1/chat/completions", "post", "ChatCompletion", true),
        ("/v1/completions", "post", "Completion", true),
        ("/v1/models", "get", "ModelList", true),
        ("/tokenize", "post", "TokenizeResponse", true),
        ("/detokenize", "post", "DetokenizeResponse", true),
        ("/version", "get", "VersionResponse", false),
    ];
    for (path, method, schema, keyed) in bodies {
        let operation = &doc["paths"][path][method];
        let body = &operation["responses"]["200"]["content"]["application/json"]["schema"]["$ref"];
        assert_eq!(body.as_str(), Some(format!("#/components/schemas/{schema}").as_str()), "{path}");
        if !keyed {
            assert!(operation.get("security").is_none(), "{path}");
            continue;
        }
        // Open without keys, or with a Bearer key when the router has them.
        let security = operation["security"].as_array().expect("security listed");
        assert!(security.iter().any(|s| s.get("bearer").is_some()), "{path}");
        assert!(security.iter().any(|s| s.as_object().is_some_and(|s| s.is_empty())), "{path}");
    }
    for path in ["/v1/chat/completions", "/v1/completions"] {
        let stream = &doc["paths"][path]["post"]["responses"]["200"]["content"]["text/event-stream"]["schema"]["$ref"];
        assert_eq!(stream, "#/components/schemas/StreamEvent", "{path}");
    }
}

#[tokio::test]
async fn served_at_openapi_json_and_every_documented_route_exists() {
    let (state, _tx) = crate::http::state::AppState::loading(std::sync::Arc::new(NoBackend));
    let app = crate::http::app::app(state);
    let response = app.clone().oneshot(Request::get("/openapi.json").body(Body::empty()).unwrap()).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = serde_json::from_slice(&to_bytes(response.into_body(), usize::MAX).await.unwrap()).unwrap();
    assert_eq!(body, document());
    // An undocumented path is a 404 here, so a documented one must not be.
    let unknown = app.clone().oneshot(Request::get("/nope").body(Body::empty()).unwrap()).await.unwrap();
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
    for (path, item) in body["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            // Model-bound GETs wait for the model: only probe the method and path
            // with a body the generation routes reject before waiting.
            let request = Request::builder()
                .method(method.to_uppercase().as_str())
                .uri(path)
                .header("content-type", "application/json")
                .body(Body::from("{not json"))
                .unwrap();
            let probe = tokio::time::timeout(std::time::Duration::from_millis(200), app.clone().oneshot(request));
            if let Ok(response) = probe.await {
                let status = response.unwrap().status();
                assert!(status != StatusCode::NOT_FOUND && status != StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
            }
        }
    }
}

/// A backend that is never called: the routes above fail or answer before generating.
struct NoBackend;

impl crate::backend::Backend for NoBackend {
    fn generate(&self, _: crate::backend::GenerateRequest) -> crate::backend::TokenStream {
        unreachable!("no generation in these tests")
    }
}
