//! Structured outputs end to end, on the default model: every answer obeys its constraint, token
//! by token, through the hand-off (the prefill worker samples the first token under the mask,
//! the decode worker's matcher takes it and continues) and when colocated, greedy and sampled,
//! streamed or not.

// The recompute test holds the cluster turn (a std mutex) for its whole run: tests run on their
// own runtimes and no task awaits the lock.
#![allow(clippy::await_holding_lock)]

use serde_json::{json, Value};
use tests::{sse, Cluster, ClusterOptions};

async fn post(url: &str, body: &Value) -> reqwest::Response {
    reqwest::Client::new().post(url).json(body).send().await.expect("POST")
}

async fn answer(router: &tests::process::Process, body: &Value) -> Value {
    let response = post(&format!("{}/v1/chat/completions", router.url()), body).await;
    let status = response.status();
    let answer: Value = response.json().await.unwrap();
    assert_eq!(status, 200, "{answer}");
    answer
}

fn ask(model: &str, question: &str, extra: Value) -> Value {
    let mut body = json!({"model": model, "messages": [{"role": "user", "content": question}],
                          "temperature": 0, "max_tokens": 80, "return_token_ids": true});
    body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    body
}

/// A JSON answer valid against the person schema below.
fn check_person(text: &str) {
    let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
    let o = v.as_object().unwrap_or_else(|| panic!("{text}"));
    assert!(o.keys().all(|k| ["name", "age", "city"].contains(&k.as_str())), "{text}");
    assert!(o["name"].as_str().is_some_and(|n| (1..=20).contains(&n.chars().count())), "{text}");
    assert!(o["age"].as_i64().is_some_and(|a| (0..=120).contains(&a)), "{text}");
    assert!(["Paris", "London", "Tokyo"].contains(&o["city"].as_str().unwrap_or("")), "{text}");
}

fn person_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 20},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "city": {"enum": ["Paris", "London", "Tokyo"]}
        },
        "required": ["name", "age", "city"],
        "additionalProperties": false
    })
}

#[tokio::test]
async fn constrained_answers_obey_and_agree_between_disaggregated_and_colocated() {
    let cluster = Cluster::start(ClusterOptions::default());
    let model = cluster.model_name().await;
    let full = |rx: &str| regex::Regex::new(&format!("^(?:{rx})$")).unwrap();
    type Check = Box<dyn Fn(&str)>;
    let cases: Vec<(&str, Value, Check)> = vec![
        (
            "Describe a person who lives in a big city.",
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "person", "strict": true, "schema": person_schema()}}}),
            Box::new(check_person),
        ),
        (
            "Is the review 'I loved every minute of it' positive or negative?",
            json!({"structured_outputs": {"choice": ["positive", "negative"]}}),
            Box::new(|t: &str| assert!(t == "positive" || t == "negative", "{t:?}")),
        ),
        (
            "Give me a phone number.",
            json!({"structured_outputs": {"regex": r"\(\d{3}\) \d{3}-\d{4}"}}),
            Box::new(move |t: &str| assert!(full(r"\(\d{3}\) \d{3}-\d{4}").is_match(t), "{t:?}")),
        ),
        (
            "Is the sky blue?",
            json!({"structured_outputs": {"grammar": "start: \"The answer is \" ANSWER \".\"\nANSWER: \"yes\" | \"no\""}}),
            Box::new(|t: &str| assert!(t == "The answer is yes." || t == "The answer is no.", "{t:?}")),
        ),
        (
            "List a few small prime numbers.",
            json!({"guided_json": {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 4}}),
            Box::new(|t: &str| {
                let v: Vec<i64> = serde_json::from_str(t).unwrap_or_else(|e| panic!("{t:?}: {e}"));
                assert!((2..=4).contains(&v.len()), "{t}");
            }),
        ),
        (
            "Reply with a JSON object holding one key, \"greeting\", whose value is a short greeting.",
            json!({"response_format": {"type": "json_object"}}),
            Box::new(|t: &str| assert!(serde_json::from_str::<Value>(t).is_ok_and(|v| v.is_object()), "{t:?}")),
        ),
    ];
    for (question, extra, check) in &cases {
        let body = ask(&model, question, extra.clone());
        let pd = answer(&cluster.router, &body).await;
        let colocated = answer(&cluster.colocated_router, &body).await;
        let choice = &pd["choices"][0];
        assert_eq!(choice["finish_reason"], "stop", "{extra}: {pd}");
        check(choice["message"]["content"].as_str().unwrap());
        assert_eq!(choice["token_ids"], colocated["choices"][0]["token_ids"], "{extra}: same tokens on both paths");
    }

    // The prefill worker's first token obeys: alone, it starts one of the choices.
    let body =
        ask(&model, "Pick one.", json!({"max_tokens": 1, "structured_outputs": {"choice": ["zebra", "quokka"]}}));
    let first = answer(&cluster.router, &body).await;
    let text = first["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    assert!(!text.is_empty() && ("zebra".starts_with(&text) || "quokka".starts_with(&text)), "{text:?}");
    assert_eq!(first["choices"][0]["finish_reason"], "length");

    // Sampled, with a seed and several choices: each obeys, the same on both paths.
    let choices = ["red", "green", "blue", "a shade of purple"];
    let body = ask(
        &model,
        "Name a colour.",
        json!({"temperature": 1.0, "seed": 7, "n": 4, "structured_outputs": {"choice": choices}}),
    );
    let pd = answer(&cluster.router, &body).await;
    let colocated = answer(&cluster.colocated_router, &body).await;
    for (a, b) in pd["choices"].as_array().unwrap().iter().zip(colocated["choices"].as_array().unwrap()) {
        assert!(choices.contains(&a["message"]["content"].as_str().unwrap()), "{a}");
        assert_eq!(a["token_ids"], b["token_ids"]);
    }

    // Streamed, the deltas add up to a valid answer.
    let mut body = ask(
        &model,
        "Describe a person.",
        json!({"stream": true, "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": person_schema()}}}),
    );
    body["temperature"] = json!(0.8);
    body["seed"] = json!(3);
    let chunks = sse::chunks(post(&format!("{}/v1/chat/completions", cluster.router.url()), &body).await).await;
    let text: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    check_person(&text);

    // A complete answer ends even under `min_tokens`: its end outranks them.
    let body = ask(&model, "Pick one.", json!({"min_tokens": 12, "structured_outputs": {"choice": ["yes", "no"]}}));
    let padded = answer(&cluster.router, &body).await;
    let text = padded["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(text == "yes" || text == "no", "{padded}");
    assert_eq!(padded["choices"][0]["finish_reason"], "stop", "{padded}");

    // Cut short mid-structure, the answer says so.
    let body = ask(
        &model,
        "Describe a person.",
        json!({"max_tokens": 4, "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": person_schema()}}}),
    );
    let cut = answer(&cluster.router, &body).await;
    assert_eq!(cut["choices"][0]["finish_reason"], "length", "{cut}");
    assert!(cut["choices"][0]["message"]["content"].as_str().unwrap().starts_with("{\""), "{cut}");

    // A required call from a question the model would answer in words: it calls, with
    // arguments valid against the tool's parameters, the same on both paths.
    let tools = json!([
        {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object",
            "properties": {"city": {"type": "string", "maxLength": 30}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"]}}},
        {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object",
            "properties": {"timezone": {"type": "string", "maxLength": 30}}, "required": ["timezone"]}}}
    ]);
    let free = answer(&cluster.router, &ask(&model, "Hello! How are you today?", json!({"tools": tools}))).await;
    assert!(free["choices"][0]["message"]["tool_calls"].is_null(), "unforced, the model answers in words: {free}");
    for (choice, name) in
        [(json!("required"), None), (json!({"type": "function", "function": {"name": "get_time"}}), Some("get_time"))]
    {
        let body = ask(&model, "Hello! How are you today?", json!({"tools": tools, "tool_choice": choice}));
        let pd = answer(&cluster.router, &body).await;
        let colocated = answer(&cluster.colocated_router, &body).await;
        assert_eq!(pd["choices"][0]["token_ids"], colocated["choices"][0]["token_ids"]);
        assert_eq!(pd["choices"][0]["finish_reason"], "tool_calls", "{pd}");
        let calls = pd["choices"][0]["message"]["tool_calls"].as_array().unwrap_or_else(|| panic!("{pd}"));
        assert!(!calls.is_empty());
        for call in calls {
            let called = call["function"]["name"].as_str().unwrap();
            let arguments: Value = serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
            match called {
                "get_weather" => {
                    assert!(
                        arguments["city"].is_string()
                            && ["celsius", "fahrenheit"].contains(&arguments["unit"].as_str().unwrap()),
                        "{arguments}"
                    )
                }
                "get_time" => assert!(arguments["timezone"].is_string(), "{arguments}"),
                other => panic!("called {other}"),
            }
            if let Some(name) = name {
                assert_eq!(called, name);
            }
        }
    }

    // The metrics saw it all: constrained requests by kind, compile and mask times.
    let router = tests::metrics::scrape(cluster.router.url()).await;
    let json = tests::metrics::sample(&router, "pdserve_router_structured_output_requests_total", &[("kind", "json")]);
    let choice =
        tests::metrics::sample(&router, "pdserve_router_structured_output_requests_total", &[("kind", "choice")]);
    assert!(json >= 4.0 && choice >= 3.0, "json {json}, choice {choice}");
    assert!(tests::metrics::sample(&router, "pdserve_router_structured_output_compile_seconds_count", &[]) >= 12.0);
    for worker in [&cluster.prefill, &cluster.decode] {
        let text = tests::metrics::scrape(&worker.health_url()).await;
        assert!(
            tests::metrics::sample(&text, "pdserve_worker_structured_output_requests_total", &[("kind", "grammar")])
                >= 1.0
        );
        assert!(tests::metrics::sample(&text, "pdserve_worker_structured_output_compile_seconds_count", &[]) >= 10.0);
        assert!(tests::metrics::sample(&text, "pdserve_worker_structured_output_mask_seconds_count", &[]) >= 10.0);
    }
}

/// The OpenAI SDK's `parse()` with a Pydantic model, `json_object`, and a corpus of 32 JSON
/// schemas (nested objects, bounded arrays, enums, `anyOf` / `oneOf` / `allOf`, `$ref`, string
/// formats and patterns, bounded numbers) asked at temperature 0 and at temperature 1 with two
/// seeds: every answer validates against its schema with the `jsonschema` package.
#[tokio::test]
async fn the_openai_sdk_parses_and_every_answer_of_a_schema_corpus_validates_independently() {
    let cluster = Cluster::start(ClusterOptions::default());
    let model = cluster.model_name().await;
    let schemas = tests::workspace_root().join("tests/data/structured/schemas.json");
    let schemas = schemas.to_str().unwrap();
    tests::python::run_client(
        "structured_outputs.py",
        cluster.router.url(),
        &model,
        &[schemas],
        "structured outputs ok",
    )
    .await;
}

/// A hand-off the decode worker cannot pull (the prefill worker advertises an address nothing
/// listens on, and no shared memory) is recomputed on the decode worker: the first token, sampled
/// under the constraint by the prefill worker, ends the new prompt, and the decode worker's matcher
/// resumes after it, so the answer is still whole, valid, and the colocated one.
#[tokio::test]
async fn a_recomputed_hand_off_keeps_the_constraint() {
    let _turn = tests::take_turn();
    let prefill =
        tests::start_prefill_with("127.0.0.1:0", &["--kv-advertise-host", "127.0.0.2", "--no-kv-shared-memory"]);
    let decode = tests::start_decode();
    let router = tests::start_router(&[&prefill], &[&decode], &["--local-prefill-max-tokens", "0"]);
    let colocated = tests::start_router(&[], &[&decode], &[]);
    let model: Value = reqwest::get(format!("{}/v1/models", router.url())).await.unwrap().json().await.unwrap();
    let model = model["data"][0]["id"].as_str().unwrap().to_string();
    let body = ask(
        &model,
        "Describe a person who lives in a big city.",
        json!({"response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": person_schema()}}}),
    );
    let pd = answer(&router, &body).await;
    let alone = answer(&colocated, &body).await;
    check_person(pd["choices"][0]["message"]["content"].as_str().unwrap());
    assert_eq!(pd["choices"][0]["finish_reason"], "stop", "{pd}");
    assert_eq!(pd["choices"][0]["token_ids"], alone["choices"][0]["token_ids"]);
    let pulled = tests::worker_stats(decode.url()).await;
    assert_eq!((pulled.kv_pulls_tcp, pulled.kv_pulls_shm), (0, 0), "recomputed, not pulled: {pulled:?}");
}
