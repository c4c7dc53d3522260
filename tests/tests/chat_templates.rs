//! A model's own chat template, rendered by the cluster as Hugging Face `transformers` renders
//! it: Qwen3's, carried by the tiny qwen3 GGUF of `tests/data/tiny`, against the renderings and
//! llama.cpp token ids recorded in `tests/data/tiny/qwen3-chat.json` by `make_tiny.py` (reasoning
//! switched off and on through `chat_template_kwargs.enable_thinking`, history with reasoning,
//! `reasoning_content`, tools, a tool round).

use serde_json::{json, Value};
use tests::{ids, post_ok, workspace_root, Cluster, ClusterOptions};

#[tokio::test]
async fn qwen3_template_renders_as_transformers_does() {
    let tiny = workspace_root().join("tests/data/tiny");
    let fixture: Value = serde_json::from_str(&std::fs::read_to_string(tiny.join("qwen3-chat.json")).unwrap()).unwrap();
    let model_file = tiny.join(fixture["model"].as_str().unwrap());
    let cluster = Cluster::start(ClusterOptions { model: Some(model_file), ..Default::default() });
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
