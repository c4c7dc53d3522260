//! The tiny Qwen3 model of `tests/data/tiny` (random weights, Qwen3's vocabulary tags and its
//! own chat template) served by the whole cluster:
//!
//! - its template rendered as Hugging Face `transformers` renders it, against the renderings and
//!   llama.cpp token ids recorded in `tests/data/tiny/qwen3-chat.json` by `make_tiny.py`
//!   (reasoning switched off and on through `chat_template_kwargs.enable_thinking`, history with
//!   reasoning, `reasoning_content`, tools, a tool round);
//! - a structured output holding the answer after the reasoning, across the hand-off.

use serde_json::{json, Value};
use tests::{ids, post_ok, workspace_root, Cluster, ClusterOptions};

/// `qwen3-chat.json`.
fn fixture() -> Value {
    let path = workspace_root().join("tests/data/tiny/qwen3-chat.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// A cluster serving the fixture's model.
fn cluster(fixture: &Value) -> Cluster {
    let model = workspace_root().join("tests/data/tiny").join(fixture["model"].as_str().unwrap());
    Cluster::start(ClusterOptions { model: Some(model), ..Default::default() })
}

#[tokio::test]
async fn qwen3_template_renders_as_transformers_does() {
    let fixture = fixture();
    let cluster = cluster(&fixture);
    let model = cluster.model_name().await;
    let tokenize = format!("{}/tokenize", cluster.router.url());
    let chats = fixture["chats"].as_array().unwrap();
    assert!(chats.len() >= 7);
    for chat in chats {
        let mut body = json!({"model": model, "messages": chat["messages"]});
        for key in ["tools", "chat_template_kwargs", "add_generation_prompt"] {
            if let Some(value) = chat.get(key) {
                body[key] = value.clone();
            }
        }
        let tokens = post_ok(&tokenize, body).await;
        assert_eq!(ids(&tokens["tokens"]), ids(&chat["token_ids"]), "{}: {}", chat["name"], chat["text"]);
    }

    // A chat request renders the same way, disaggregated and colocated.
    let off = chats.iter().find(|c| c["name"] == "thinking off").unwrap();
    assert!(off["text"].as_str().unwrap().ends_with("<think>\n\n</think>\n\n"));
    let body = json!({"model": model, "messages": off["messages"], "chat_template_kwargs": off["chat_template_kwargs"],
                      "max_tokens": 2, "return_token_ids": true});
    for router in [&cluster.router, &cluster.colocated_router] {
        let answer = post_ok(&format!("{}/v1/chat/completions", router.url()), body.clone()).await;
        assert_eq!(ids(&answer["prompt_token_ids"]), ids(&off["token_ids"]));
    }
}

/// A prompt that opens the reasoning leaves it free, and the constraint holds the text after
/// `</think>`: the first token (sampled by the prefill worker, here pushed to `</think>` by a
/// logit bias) closes the reasoning, and the decode worker's matcher, placed after the same
/// prompt, takes it and holds the rest to the choice. The same colocated.
#[tokio::test]
async fn a_structured_output_holds_the_answer_after_the_reasoning() {
    let fixture = fixture();
    let cluster = cluster(&fixture);
    let model = cluster.model_name().await;
    let close: u32 = 399;
    let prompt = "<|im_start|>user\nIs 2+2 four?<|im_end|>\n<|im_start|>assistant\n<think>\n";
    let body = json!({"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0,
                      "structured_outputs": {"choice": ["yes", "no"]}, "logit_bias": {close.to_string(): 100},
                      "return_token_ids": true});
    for router in [&cluster.router, &cluster.colocated_router] {
        let answer = post_ok(&format!("{}/v1/completions", router.url()), body.clone()).await;
        let choice = &answer["choices"][0];
        assert_eq!(ids(&choice["token_ids"])[0], u64::from(close), "{answer}");
        let text = choice["text"].as_str().unwrap();
        assert!(["</think>yes", "</think>no"].contains(&text), "{answer}");
        assert_eq!(choice["finish_reason"], "stop", "{answer}");
    }
}
