//! API keys and usage through the real router binary: `--api-keys` guards
//! the API, `--usage-log` receives one line per request, and a bad keys file
//! stops the router at start-up with a one-line reason.

use std::process::Command;

use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tests::process::Process;
use tests::{bin, model_path, start_router};

/// The keys file's digest of `key`, computed as its documentation says
/// (`printf %s "$KEY" | sha256sum`).
fn sha256_hex(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

#[tokio::test]
async fn keys_from_a_file_guard_the_router_and_usage_is_logged() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.toml");
    let usage = dir.path().join("usage.jsonl");
    std::fs::write(
        &keys,
        format!(
            "[tenants.acme]\nrequests_per_minute = 100\n\n[[keys]]\nid = \"acme-ci\"\ntenant = \"acme\"\nsha256 = \"{}\"\n",
            sha256_hex("sk-test-123")
        ),
    )
    .unwrap();
    let model = model_path();
    let decode =
        Process::start("decode-worker", &["--mock", "--listen", "127.0.0.1:0", "--model", model.to_str().unwrap()]);
    let router =
        start_router(&[], &[&decode], &["--api-keys", keys.to_str().unwrap(), "--usage-log", usage.to_str().unwrap()]);
    let url = format!("{}/v1/completions", router.url());
    let body = json!({"prompt": "Hello", "max_tokens": 3});
    let client = reqwest::Client::new();

    let refused = client.post(&url).json(&body).send().await.unwrap();
    assert_eq!(refused.status(), 401);
    let refused: Value = refused.json().await.unwrap();
    assert_eq!(refused["error"]["code"], "invalid_api_key", "{refused}");

    let answer = client.post(&url).bearer_auth("sk-test-123").json(&body).send().await.unwrap();
    assert_eq!(answer.status(), 200);
    let answer: Value = answer.json().await.unwrap();
    let request_id = answer["id"].as_str().unwrap().to_owned();

    let logged = std::fs::read_to_string(&usage).unwrap();
    let lines: Vec<Value> = logged.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 1, "only the admitted request uses anything: {logged}");
    let line = &lines[0];
    assert_eq!(
        (&line["tenant"], &line["key"], &line["outcome"]),
        (&json!("acme"), &json!("acme-ci"), &json!("completed"))
    );
    assert_eq!(line["completion_tokens"], answer["usage"]["completion_tokens"], "{line} vs {answer}");
    assert_eq!(line["prompt_tokens"], answer["usage"]["prompt_tokens"], "{line} vs {answer}");
    assert!(!logged.contains("sk-test-123"), "the secret never reaches the log");
    assert!(!request_id.is_empty());

    let metrics = client.get(format!("{}/metrics", router.url())).send().await.unwrap().text().await.unwrap();
    assert!(
        metrics.contains(r#"pdserve_router_key_requests_total{key="acme-ci",outcome="completed",tenant="acme"} 1"#),
        "{metrics}"
    );
}

#[test]
fn a_bad_keys_file_stops_the_router_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.toml");
    std::fs::write(&keys, "[[keys]]\nid = \"k\"\ntenant = \"nobody\"\nsha256 = \"00\"\n").unwrap();
    for (file, reason) in [(keys.to_str().unwrap(), "tenant `nobody`"), ("/nonexistent/keys.toml", "cannot read")] {
        let output = Command::new(bin("router"))
            .args(["--host", "127.0.0.1", "--port", "0", "--decode", "http://127.0.0.1:9", "--api-keys", file])
            .output()
            .unwrap();
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        let errors: Vec<&str> = stderr.lines().filter(|l| l.contains("router:") || l.contains("error")).collect();
        assert!(stderr.contains(reason), "{stderr}");
        assert_eq!(errors.len(), 1, "one line: {stderr}");
    }
}
