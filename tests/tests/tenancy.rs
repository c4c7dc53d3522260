//! API keys and usage through the real router binary: `--api-keys` guards
//! the API, `--usage-log` receives one line per request, and a bad keys file
//! stops the router at start-up with a one-line reason. Keys kept in etcd
//! are followed live.

// The etcd test holds its turn (a std mutex) while its processes run, awaits included.
#![allow(clippy::await_holding_lock)]

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

/// A keys file with one tenant and these keys, at `requests_per_minute`.
fn keys_file(keys: &[&str]) -> String {
    let mut text = String::from("[tenants.acme]\nrequests_per_minute = 1000\n");
    for key in keys {
        text.push_str(&format!("[[keys]]\nid = \"{key}\"\ntenant = \"acme\"\nsha256 = \"{}\"\n", sha256_hex(key)));
    }
    text
}

/// The status of a completion sent with `key`.
async fn status_with(router: &str, key: &str) -> u16 {
    let body = json!({"prompt": "Hello", "max_tokens": 2});
    let response = reqwest::Client::new().post(format!("{router}/v1/completions")).bearer_auth(key).json(&body).send();
    response.await.unwrap().status().as_u16()
}

/// Waits until a request with `key` gets `status`.
async fn until_status(router: &str, key: &str, status: u16) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while status_with(router, key).await != status {
        assert!(std::time::Instant::now() < deadline, "{key} never got {status}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_in_etcd_are_followed_live_and_a_bad_version_is_refused() {
    let _turn = tests::take_turn();
    let etcd = tests::etcd::Etcd::start();
    let prefix = format!("/keys-{}", std::process::id());
    let key_path = format!("{prefix}/api-keys");
    let url = etcd.url();
    let model = model_path();
    let worker_flags = [
        "--mock",
        "--listen",
        "127.0.0.1:0",
        "--model",
        model.to_str().unwrap(),
        "--etcd",
        &url,
        "--etcd-prefix",
        &prefix,
    ];
    let _decode = Process::start("decode-worker", &worker_flags);
    let router = Process::start(
        "router",
        &[
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--etcd",
            &url,
            "--etcd-prefix",
            &prefix,
            "--colocated",
            "--api-keys-from-etcd",
        ],
    );
    tests::wait_ready(router.url());
    // Nothing written yet: closed, not open.
    assert_eq!(status_with(router.url(), "sk-one").await, 401);

    let mut etcd_client = etcd_client::Client::connect([url.as_str()], None).await.unwrap();
    etcd_client.put(key_path.as_str(), keys_file(&["sk-one"]), None).await.unwrap();
    until_status(router.url(), "sk-one", 200).await;
    assert_eq!(status_with(router.url(), "sk-two").await, 401);

    // Rotate: two in, one out.
    etcd_client.put(key_path.as_str(), keys_file(&["sk-two"]), None).await.unwrap();
    until_status(router.url(), "sk-one", 401).await;
    assert_eq!(status_with(router.url(), "sk-two").await, 200);

    // A broken version is refused: the keys in use stay.
    etcd_client.put(key_path.as_str(), "[[keys]]\nid = 1\n", None).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(status_with(router.url(), "sk-two").await, 200);

    // Deleted: every key is refused (fail closed).
    etcd_client.delete(key_path.as_str(), None).await.unwrap();
    until_status(router.url(), "sk-two", 401).await;
}
