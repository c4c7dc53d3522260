//! The clients the platform's users already use work unchanged.

use futures::StreamExt;
use serde_json::json;
use std::path::PathBuf;
use tests::{workspace_root, Cluster, ClusterOptions};
use vllm_client::{StreamEvent, VllmClient};

const PARIS: &str = "What is the capital of France? Answer in one word.";

/// The Python that has `openai` installed: `PDSERVE_PYTHON`, else the project's venv.
fn python() -> PathBuf {
    std::env::var_os("PDSERVE_PYTHON").map(PathBuf::from).unwrap_or_else(|| workspace_root().join(".venv/bin/python"))
}

#[tokio::test]
async fn openai_python_sdk_chats() {
    let cluster = Cluster::start(ClusterOptions::default());
    let model = cluster.model_name().await;
    let python = python();
    assert!(
        python.is_file(),
        "{} is missing: run scripts/test.sh, which installs the openai package",
        python.display()
    );
    let script = workspace_root().join("tests/python/openai_chat.py");
    let base = format!("{}/v1", cluster.router.url());
    let output = tokio::process::Command::new(&python).arg(&script).arg(&base).arg(&model).output().await.unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "openai client failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("openai client ok"), "{stdout}");
}

#[tokio::test]
async fn vllm_client_crate_chats() {
    let cluster = Cluster::start(ClusterOptions::default());
    let model = cluster.model_name().await;
    let client = VllmClient::new(format!("{}/v1", cluster.router.url()));
    let messages = json!([{"role": "user", "content": PARIS}]);

    let response = client
        .chat
        .completions()
        .create()
        .model(model.clone())
        .messages(messages.clone())
        .temperature(0.0)
        .max_tokens(32)
        .send()
        .await
        .expect("vllm-client send");
    let text = response.content.clone().expect("content");
    assert!(text.contains("Paris"), "{text}");
    assert_eq!(response.finish_reason.as_deref(), Some("stop"));

    let mut stream = client
        .chat
        .completions()
        .create()
        .model(model)
        .messages(messages)
        .temperature(0.0)
        .max_tokens(32)
        .stream(true)
        .send_stream()
        .await
        .expect("vllm-client send_stream")
        .into_stream();
    let mut streamed = String::new();
    let mut done = false;
    while let Some(event) = stream.next().await {
        match event {
            StreamEvent::Content(delta) => streamed.push_str(&delta),
            StreamEvent::Done => done = true,
            StreamEvent::Error(e) => panic!("stream error: {e}"),
            _ => {}
        }
    }
    assert!(done, "the stream ended without [DONE]");
    assert_eq!(streamed, text);
}
