//! Several models behind one router, each with its own workers: from the
//! command line (`--decode NAME=URL`) and from etcd (grouped by the name each
//! worker registers). Mock workers: what is checked is the routing.

// The test holds its turn (a std mutex) while its processes run, awaits included.
#![allow(clippy::await_holding_lock)]

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tests::etcd::Etcd;
use tests::metrics::value;
use tests::process::Process;
use tests::{model_path, take_turn, wait_ready};

/// A mock worker serving the model as `name`, with `extra` flags.
fn worker(bin: &str, name: &str, extra: &[&str]) -> Process {
    let model = model_path();
    let mut args = vec!["--mock", "--listen", "127.0.0.1:0", "--served-model-name", name];
    args.extend(["--model", model.to_str().expect("utf-8 model path")]);
    if bin == "prefill-worker" {
        args.extend(["--kv-listen", "127.0.0.1:0"]);
    }
    args.extend(extra);
    Process::start(bin, &args)
}

async fn complete(router: &str, model: Option<&str>) -> (u16, Value) {
    let mut body = json!({"prompt": "Hello there", "max_tokens": 3});
    if let Some(model) = model {
        body["model"] = json!(model);
    }
    let response =
        reqwest::Client::new().post(format!("{router}/v1/completions")).json(&body).send().await.expect("POST");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn listed(router: &str) -> Vec<String> {
    let models: Value = reqwest::get(format!("{router}/v1/models")).await.unwrap().json().await.unwrap();
    models["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap().to_owned()).collect()
}

async fn placed(router: &str, model: &str, pool: &str) -> f64 {
    value(router, "pdserve_router_placements_total", &[("model", model), ("pool", pool)]).await
}

#[tokio::test]
async fn named_static_pools_serve_two_models_side_by_side() {
    let _turn = take_turn();
    // v1 disaggregated, v2 colocated: each model has the pools it was given.
    let v1_prefill = worker("prefill-worker", "llama/v1", &[]);
    let v1_decode = worker("decode-worker", "llama/v1", &[]);
    let v2_decode = worker("decode-worker", "llama/v2", &[]);
    let (p1, d1, d2) = (
        format!("llama/v1={}", v1_prefill.url()),
        format!("llama/v1={}", v1_decode.url()),
        format!("llama/v2={}", v2_decode.url()),
    );
    let args = ["--host", "127.0.0.1", "--port", "0", "--local-prefill-max-tokens", "0"];
    let router = Process::start("router", &[&args[..], &["--prefill", &p1, "--decode", &d1, "--decode", &d2]].concat());
    wait_ready(router.url());
    let url = router.url();

    // `/ready` is 200 once any model is; on a loaded machine the other may still be loading.
    let deadline = Instant::now() + Duration::from_secs(120);
    while listed(url).await.len() < 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(listed(url).await, ["llama/v1", "llama/v2"]);
    for model in ["llama/v1", "llama/v2", "llama/v1"] {
        let (status, answer) = complete(url, Some(model)).await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["model"], model);
    }
    assert_eq!(placed(url, "llama/v1", "prefill").await, 2.0, "v1's prompts go to its prefill worker");
    assert_eq!(placed(url, "llama/v1", "decode").await, 2.0);
    assert_eq!(placed(url, "llama/v2", "decode").await, 1.0);
    assert_eq!(placed(url, "llama/v2", "prefill").await, 0.0, "v2 has no prefill pool");

    let (status, answer) = complete(url, Some("llama/v3")).await;
    assert_eq!((status, answer["error"]["code"].as_str()), (404, Some("model_not_found")));
    let (status, answer) = complete(url, None).await;
    assert_eq!((status, answer["error"]["param"].as_str()), (400, Some("model")), "{answer}");
}

#[tokio::test]
async fn a_router_on_etcd_serves_each_registered_model_on_its_own_workers() {
    let _turn = take_turn();
    let etcd = Etcd::start();
    let prefix = format!("/models-{}", std::process::id());
    let etcd_url = etcd.url();
    let etcd_flags = ["--etcd", etcd_url.as_str(), "--etcd-prefix", prefix.as_str(), "--etcd-lease-ttl-secs", "2"];
    let router_args = ["--host", "127.0.0.1", "--port", "0", "--colocated"];
    let router = Process::start("router", &[&router_args[..], &etcd_flags[..2], &etcd_flags[2..4]].concat());
    let url = router.url().to_owned();

    let _a = worker("decode-worker", "a/v1", &etcd_flags);
    let mut b = worker("decode-worker", "b/v1", &etcd_flags);
    let deadline = Instant::now() + Duration::from_secs(30);
    while listed(&url).await.len() < 2 {
        assert!(Instant::now() < deadline, "the router never listed both models: {:?}", listed(&url).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut models = listed(&url).await;
    models.sort();
    assert_eq!(models, ["a/v1", "b/v1"]);
    for model in ["a/v1", "b/v1"] {
        let (status, answer) = complete(&url, Some(model)).await;
        assert_eq!((status, answer["model"].as_str()), (200, Some(model)), "{answer}");
        assert_eq!(placed(&url, model, "decode").await, 1.0, "{model} went to its own worker");
    }

    // b's only worker dies: b answers 503, a goes on, the router stays ready.
    b.kill();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (status, answer) = complete(&url, Some("b/v1")).await;
        if status == 503 {
            break;
        }
        assert!(Instant::now() < deadline, "b/v1 still answered {status} {answer} after its worker died");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(complete(&url, Some("a/v1")).await.0, 200);
    assert_eq!(reqwest::get(format!("{url}/ready")).await.unwrap().status(), 200);
}

/// `--chat-template` (a file or the template itself, as vLLM's) replaces the model's template
/// for every chat; a request's own `chat_template` still wins.
#[tokio::test]
async fn the_routers_chat_template_replaces_the_models() {
    let _turn = take_turn();
    let model = model_path();
    let decode =
        Process::start("decode-worker", &["--mock", "--listen", "127.0.0.1:0", "--model", model.to_str().unwrap()]);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("template.jinja");
    std::fs::write(&file, "FILE{% for m in messages %}[{{ m.content }}]{% endfor %}").unwrap();
    for (flag, want) in
        [(file.to_str().unwrap(), "FILE[Hi]"), ("ARG{% for m in messages %}<{{ m.content }}>{% endfor %}", "ARG<Hi>")]
    {
        let router = tests::start_router(&[], &[&decode], &["--chat-template", flag]);
        let url = router.url();
        let client = reqwest::Client::new();
        let text = |body: Value| {
            let client = client.clone();
            async move {
                let ids: Value =
                    client.post(format!("{url}/tokenize")).json(&body).send().await.unwrap().json().await.unwrap();
                let text: Value = client
                    .post(format!("{url}/detokenize"))
                    .json(&json!({"tokens": ids["tokens"]}))
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                text["prompt"].as_str().unwrap().to_owned()
            }
        };
        let messages = json!([{"role": "user", "content": "Hi"}]);
        assert_eq!(text(json!({"messages": messages})).await, want);
        let own = json!({"messages": messages, "chat_template": "OWN{{ messages[0].content }}"});
        assert_eq!(text(own).await, "OWNHi");
    }
}
