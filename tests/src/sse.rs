//! Reading an OpenAI server-sent-event stream.

use futures::StreamExt;

/// The `data:` payloads of an SSE response, in order, `[DONE]` included as a string.
pub async fn events(response: reqwest::Response) -> Vec<String> {
    assert_eq!(response.status(), 200, "streaming request failed");
    let content_type =
        response.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    assert!(content_type.starts_with("text/event-stream"), "content-type {content_type}");
    let mut body = String::new();
    let mut stream = response.bytes_stream();
    while let Some(chunk) = stream.next().await {
        body.push_str(std::str::from_utf8(&chunk.expect("stream chunk")).expect("utf-8 SSE"));
    }
    body.split("\n\n")
        .filter_map(|event| event.lines().find_map(|l| l.strip_prefix("data:")).map(|d| d.trim().to_string()))
        .collect()
}

/// The JSON chunks of a stream, checking that it ends with exactly one `[DONE]`.
pub async fn chunks(response: reqwest::Response) -> Vec<serde_json::Value> {
    let events = events(response).await;
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "stream must end with [DONE]: {events:?}");
    events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap_or_else(|err| panic!("chunk {e}: {err}")))
        .collect()
}
