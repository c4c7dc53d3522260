//! Honour it or refuse it, walked field by field: every field of the OpenAI and vLLM request
//! bodies of `/v1/chat/completions` and `/v1/completions` (the lists below, from vLLM's
//! `ChatCompletionRequest` / `CompletionRequest` and OpenAI's API reference), and every field
//! the router's own OpenAPI document describes, is either exercised here for its effect or
//! refused with a 400 naming it. A field added to either side without a case fails the walk.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use axum::body::{to_bytes, Body};
use axum::http::{Request, StatusCode};
use futures::stream::{self, StreamExt};
use serde_json::{json, Value};
use tower::ServiceExt;
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::Layer;

use router::backend::{Backend, Finish, GenerateRequest, TokenChunk, TokenLogprobs, TokenStream};
use router::fleet::model::Model;
use router::http::app::app;
use router::http::state::AppState;
use router::testutil::{card, ids, tokenizer, EOS};

/// vLLM's `ChatCompletionRequest` and OpenAI's chat completion request.
const CHAT_FIELDS: &[&str] = &[
    // OpenAI
    "messages",
    "model",
    "frequency_penalty",
    "logit_bias",
    "logprobs",
    "top_logprobs",
    "max_tokens",
    "max_completion_tokens",
    "n",
    "presence_penalty",
    "response_format",
    "seed",
    "stop",
    "stream",
    "stream_options",
    "temperature",
    "top_p",
    "tools",
    "tool_choice",
    "reasoning_effort",
    "parallel_tool_calls",
    "user",
    "audio",
    "modalities",
    "prediction",
    "web_search_options",
    "functions",
    "function_call",
    "store",
    "metadata",
    "service_tier",
    "verbosity",
    "prompt_cache_key",
    "safety_identifier",
    // vLLM's sampling parameters
    "best_of",
    "use_beam_search",
    "top_k",
    "min_p",
    "repetition_penalty",
    "length_penalty",
    "stop_token_ids",
    "include_stop_str_in_output",
    "ignore_eos",
    "min_tokens",
    "skip_special_tokens",
    "spaces_between_special_tokens",
    "truncate_prompt_tokens",
    "prompt_logprobs",
    "allowed_token_ids",
    "bad_words",
    // vLLM's extra parameters
    "include_reasoning",
    "echo",
    "add_generation_prompt",
    "continue_final_message",
    "add_special_tokens",
    "documents",
    "chat_template",
    "chat_template_kwargs",
    "mm_processor_kwargs",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
    "structural_tag",
    "guided_decoding_backend",
    "guided_whitespace_pattern",
    "structured_outputs",
    "priority",
    "request_id",
    "logits_processors",
    "return_tokens_as_token_ids",
    "return_token_ids",
    "cache_salt",
    "kv_transfer_params",
    "vllm_xargs",
];

/// vLLM's `CompletionRequest` and OpenAI's (legacy) completion request.
const COMPLETION_FIELDS: &[&str] = &[
    // OpenAI
    "model",
    "prompt",
    "best_of",
    "echo",
    "frequency_penalty",
    "logit_bias",
    "logprobs",
    "max_tokens",
    "n",
    "presence_penalty",
    "seed",
    "stop",
    "stream",
    "stream_options",
    "suffix",
    "temperature",
    "top_p",
    "user",
    // vLLM's sampling parameters
    "prompt_embeds",
    "use_beam_search",
    "top_k",
    "min_p",
    "repetition_penalty",
    "length_penalty",
    "stop_token_ids",
    "include_stop_str_in_output",
    "ignore_eos",
    "min_tokens",
    "skip_special_tokens",
    "spaces_between_special_tokens",
    "truncate_prompt_tokens",
    "allowed_token_ids",
    "bad_words",
    "prompt_logprobs",
    // vLLM's extra parameters
    "add_special_tokens",
    "response_format",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
    "guided_decoding_backend",
    "guided_whitespace_pattern",
    "structured_outputs",
    "priority",
    "request_id",
    "logits_processors",
    "return_tokens_as_token_ids",
    "return_token_ids",
    "cache_salt",
    "kv_transfer_params",
    "vllm_xargs",
    "mm_processor_kwargs",
];

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Endpoint {
    Chat,
    Completion,
}

use Endpoint::{Chat, Completion};

impl Endpoint {
    fn path(self) -> &'static str {
        match self {
            Chat => "/v1/chat/completions",
            Completion => "/v1/completions",
        }
    }

    fn base(self) -> Value {
        match self {
            Chat => json!({"messages": [{"role": "user", "content": "Hi"}]}),
            Completion => json!({"prompt": "Hi"}),
        }
    }
}

/// What one request did.
struct Outcome {
    status: StatusCode,
    /// The JSON body; with `stream`, the last event that has `choices` or `usage`.
    body: Value,
    /// The events of a streamed answer, `[DONE]` left out.
    events: Vec<Value>,
    /// What the backend was asked, if anything.
    seen: Option<GenerateRequest>,
    /// `name=value` of every span and event field the request logged.
    logged: Vec<String>,
}

impl Outcome {
    fn seen(&self) -> &GenerateRequest {
        self.seen.as_ref().expect("the request reached the backend")
    }

    /// The prompt the backend got, as text, special tokens included.
    fn prompt(&self) -> String {
        tokenizer().decode(&self.seen().prompt_token_ids, false).unwrap()
    }

    /// The first choice's text (completions) or content (chat).
    fn text(&self) -> &str {
        let choice = &self.body["choices"][0];
        choice["text"].as_str().or(choice["message"]["content"].as_str()).unwrap_or_default()
    }
}

/// How a case must come out.
enum Expect {
    /// 200, and the check sees the field's effect.
    Effect(fn(&Outcome) -> bool),
    /// 400 with `param` naming the field (or a field inside it).
    Refused,
}

use Expect::{Effect, Refused};

/// One field, sent to one endpoint or both with `extra` merged into a minimal body.
struct Case {
    field: &'static str,
    endpoints: &'static [Endpoint],
    extra: Value,
    expect: Expect,
}

const BOTH: &[Endpoint] = &[Chat, Completion];
const CHAT: &[Endpoint] = &[Chat];
const COMPLETION: &[Endpoint] = &[Completion];

fn case(field: &'static str, endpoints: &'static [Endpoint], extra: Value, expect: Expect) -> Case {
    Case { field, endpoints, extra, expect }
}

/// A chat template that shows `var` in the prompt, then the messages.
fn showing(var: &str) -> String {
    format!("[{{{{ {var} }}}}]{{% for m in messages %}}{{{{ m.content }}}}|{{% endfor %}}")
}

fn cases() -> Vec<Case> {
    let tool = json!([{"type": "function", "function": {"name": "zebra", "parameters": {"type": "object"}}}]);
    vec![
        // Which model, what prompt.
        case("model", BOTH, json!({"model": "tiny"}), Effect(|o| o.body["model"] == "tiny")),
        case(
            "messages",
            CHAT,
            json!({"messages": [{"role": "developer", "content": "Zebra"}]}),
            Effect(|o| o.prompt().contains("<|im_start|>system\nZebra")),
        ),
        case("prompt", COMPLETION, json!({"prompt": "Zebra"}), Effect(|o| o.prompt().ends_with("Zebra"))),
        case("prompt", COMPLETION, json!({"prompt": [90, 101]}), Effect(|o| o.prompt().ends_with("Ze"))),
        case(
            "prompt",
            COMPLETION,
            json!({"prompt": ["Ze", "bra"], "n": 2}),
            Effect(|o| o.prompt().ends_with("bra") && o.body["choices"].as_array().is_some_and(|c| c.len() == 4)),
        ),
        case("suffix", COMPLETION, json!({"suffix": "tail"}), Refused),
        case("prompt_embeds", COMPLETION, json!({"prompt_embeds": "AAAA"}), Refused),
        case(
            "truncate_prompt_tokens",
            BOTH,
            json!({"truncate_prompt_tokens": 2}),
            Effect(|o| o.seen().prompt_token_ids.len() == 2),
        ),
        case(
            "add_special_tokens",
            CHAT,
            json!({"add_special_tokens": true}),
            Effect(|o| o.seen().prompt_token_ids.starts_with(&[EOS, 257])),
        ),
        case(
            "add_special_tokens",
            COMPLETION,
            json!({"add_special_tokens": false}),
            Effect(|o| *o.seen().prompt_token_ids == ids("Hi")),
        ),
        // The chat template.
        case(
            "chat_template",
            CHAT,
            json!({"chat_template": "ZZ{% for m in messages %}{{ m.content }}{% endfor %}"}),
            Effect(|o| o.prompt().ends_with("ZZHi")),
        ),
        case(
            "chat_template_kwargs",
            CHAT,
            json!({"chat_template": showing("flavour"), "chat_template_kwargs": {"flavour": "mint"}}),
            Effect(|o| o.prompt().contains("[mint]")),
        ),
        case(
            "add_generation_prompt",
            CHAT,
            json!({"add_generation_prompt": false}),
            Effect(|o| !o.prompt().contains("assistant")),
        ),
        case(
            "continue_final_message",
            CHAT,
            json!({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Sur"}], "add_generation_prompt": false, "continue_final_message": true}),
            Effect(|o| o.prompt().ends_with("Sur")),
        ),
        case(
            "documents",
            CHAT,
            json!({"chat_template": showing("documents[0].title"), "documents": [{"title": "atlas", "text": "t"}]}),
            Effect(|o| o.prompt().contains("[atlas]")),
        ),
        case(
            "reasoning_effort",
            CHAT,
            json!({"chat_template": showing("reasoning_effort"), "reasoning_effort": "high"}),
            Effect(|o| o.prompt().contains("[high]")),
        ),
        case(
            "tools",
            CHAT,
            json!({"chat_template": showing("tools[0].function.name"), "tools": tool}),
            Effect(|o| o.prompt().contains("[zebra]")),
        ),
        case(
            "tool_choice",
            CHAT,
            json!({"tools": tool, "tool_choice": "required"}),
            Effect(|o| o.seen().sampling.constraint.is_some()),
        ),
        case(
            "echo",
            CHAT,
            json!({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Sur"}], "add_generation_prompt": false, "continue_final_message": true, "echo": true}),
            Effect(|o| o.text().starts_with("Sur")),
        ),
        case("echo", COMPLETION, json!({"echo": true}), Effect(|o| o.text().starts_with("HiThe"))),
        // Sampling, passed on to the workers.
        case("temperature", BOTH, json!({"temperature": 0.5}), Effect(|o| o.seen().sampling.temperature == 0.5)),
        case("top_p", BOTH, json!({"top_p": 0.5}), Effect(|o| o.seen().sampling.top_p == 0.5)),
        case("top_k", BOTH, json!({"top_k": 5}), Effect(|o| o.seen().sampling.top_k == 5)),
        case("min_p", BOTH, json!({"min_p": 0.25}), Effect(|o| o.seen().sampling.min_p == 0.25)),
        case("seed", BOTH, json!({"seed": 7}), Effect(|o| o.seen().sampling.seed == Some(7))),
        case(
            "presence_penalty",
            BOTH,
            json!({"presence_penalty": 0.5}),
            Effect(|o| o.seen().sampling.presence_penalty == 0.5),
        ),
        case(
            "frequency_penalty",
            BOTH,
            json!({"frequency_penalty": 0.5}),
            Effect(|o| o.seen().sampling.frequency_penalty == 0.5),
        ),
        case(
            "repetition_penalty",
            BOTH,
            json!({"repetition_penalty": 1.25}),
            Effect(|o| o.seen().sampling.repetition_penalty == 1.25),
        ),
        case(
            "logit_bias",
            BOTH,
            json!({"logit_bias": {"65": 5}}),
            Effect(|o| o.seen().sampling.logit_bias == [(65, 5.0)]),
        ),
        case("max_tokens", BOTH, json!({"max_tokens": 5}), Effect(|o| o.seen().sampling.max_tokens == 5)),
        case(
            "max_completion_tokens",
            BOTH,
            json!({"max_completion_tokens": 6}),
            Effect(|o| o.seen().sampling.max_tokens == 6),
        ),
        case("min_tokens", BOTH, json!({"min_tokens": 2}), Effect(|o| o.seen().sampling.min_tokens == 2)),
        case("ignore_eos", BOTH, json!({"ignore_eos": true}), Effect(|o| o.seen().sampling.ignore_eos)),
        case(
            "stop_token_ids",
            BOTH,
            json!({"stop_token_ids": [65]}),
            Effect(|o| o.seen().sampling.stop_token_ids == [65] && o.body["choices"][0]["stop_reason"] == 65),
        ),
        case(
            "n",
            BOTH,
            json!({"n": 2}),
            Effect(|o| o.seen().sampling.n == 2 && o.body["choices"].as_array().is_some_and(|c| c.len() == 2)),
        ),
        case("best_of", BOTH, json!({"best_of": 3}), Refused),
        case(
            "use_beam_search",
            BOTH,
            json!({"use_beam_search": true, "n": 2, "max_tokens": 3}),
            Effect(|o| {
                // The last step asked one token and 2 × width alternatives after a beam.
                let s = &o.seen().sampling;
                o.body["choices"].as_array().is_some_and(|c| c.len() == 2)
                    && (s.max_tokens, s.logprobs, s.n) == (1, Some(4), 1)
                    && o.seen().request_id.contains("-beam2-")
            }),
        ),
        // What beam search cannot honour is refused by name.
        case("stream", BOTH, json!({"use_beam_search": true, "stream": true}), Refused),
        case("top_p", BOTH, json!({"use_beam_search": true, "top_p": 0.5}), Refused),
        case("length_penalty", BOTH, json!({"length_penalty": 0.5}), Refused),
        case(
            "length_penalty",
            BOTH,
            json!({"use_beam_search": true, "length_penalty": 0.5, "max_tokens": 2}),
            Effect(|o| o.seen().request_id.contains("-beam1-")),
        ),
        case(
            "allowed_token_ids",
            BOTH,
            json!({"allowed_token_ids": [65, 66]}),
            Effect(|o| o.seen().sampling.allowed_token_ids == Some(vec![65, 66])),
        ),
        case("allowed_token_ids", BOTH, json!({"allowed_token_ids": []}), Refused),
        case(
            "bad_words",
            BOTH,
            json!({"bad_words": ["Zebra"]}),
            Effect(|o| o.seen().sampling.bad_words == [ids("Zebra")]),
        ),
        case("logits_processors", BOTH, json!({"logits_processors": ["my.Processor"]}), Refused),
        case("vllm_xargs", BOTH, json!({"vllm_xargs": {"k": 1}}), Refused),
        case("mm_processor_kwargs", BOTH, json!({"mm_processor_kwargs": {"k": 1}}), Refused),
        // Structured outputs.
        case(
            "response_format",
            BOTH,
            json!({"response_format": {"type": "json_object"}}),
            Effect(|o| o.seen().sampling.constraint.is_some()),
        ),
        case(
            "structured_outputs",
            BOTH,
            json!({"structured_outputs": {"regex": "a+"}}),
            Effect(|o| o.seen().sampling.constraint.is_some()),
        ),
        case(
            "guided_json",
            BOTH,
            json!({"guided_json": {"type": "object"}}),
            Effect(|o| o.seen().sampling.constraint.is_some()),
        ),
        case("guided_regex", BOTH, json!({"guided_regex": "a+"}), Effect(|o| o.seen().sampling.constraint.is_some())),
        case(
            "guided_choice",
            BOTH,
            json!({"guided_choice": ["a", "b"]}),
            Effect(|o| o.seen().sampling.constraint.is_some()),
        ),
        case(
            "guided_grammar",
            BOTH,
            json!({"guided_grammar": "start: \"a\""}),
            Effect(|o| o.seen().sampling.constraint.is_some()),
        ),
        case(
            "guided_decoding_backend",
            BOTH,
            json!({"guided_regex": "a", "guided_decoding_backend": "xgrammar"}),
            Refused,
        ),
        case(
            "guided_whitespace_pattern",
            BOTH,
            json!({"guided_json": {"type": "object"}, "guided_whitespace_pattern": " ?"}),
            Effect(|o| format!("{:?}", o.seen().sampling.constraint).contains("Pattern")),
        ),
        case("structural_tag", CHAT, json!({"structural_tag": "{}"}), Refused),
        // What the answer holds.
        case(
            "stop",
            BOTH,
            json!({"stop": "e "}),
            Effect(|o| o.text() == "Th" && o.body["choices"][0]["stop_reason"] == "e "),
        ),
        case(
            "include_stop_str_in_output",
            BOTH,
            json!({"stop": "e ", "include_stop_str_in_output": true}),
            Effect(|o| o.text() == "The "),
        ),
        case(
            "skip_special_tokens",
            BOTH,
            json!({"skip_special_tokens": false, "include_stop_str_in_output": true}),
            Effect(|o| o.text().ends_with("end<eos>")),
        ),
        case(
            "spaces_between_special_tokens",
            BOTH,
            json!({"skip_special_tokens": false, "include_stop_str_in_output": true, "spaces_between_special_tokens": true}),
            Effect(|o| o.text().ends_with("end<eos>")),
        ),
        case(
            "logprobs",
            CHAT,
            json!({"logprobs": true}),
            Effect(|o| {
                o.seen().sampling.logprobs == Some(0)
                    && o.body["choices"][0]["logprobs"]["content"].as_array().is_some_and(|c| c.len() == 25)
            }),
        ),
        case(
            "top_logprobs",
            CHAT,
            json!({"logprobs": true, "top_logprobs": 2}),
            Effect(|o| {
                o.seen().sampling.logprobs == Some(2)
                    && o.body["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
                        .as_array()
                        .is_some_and(|t| t.len() == 2)
            }),
        ),
        case(
            "logprobs",
            COMPLETION,
            json!({"logprobs": 1}),
            Effect(|o| {
                o.seen().sampling.logprobs == Some(1)
                    && o.body["choices"][0]["logprobs"]["tokens"][0] == "T"
                    && o.body["choices"][0]["logprobs"]["text_offset"][1] == 1
            }),
        ),
        case(
            "prompt_logprobs",
            COMPLETION,
            json!({"prompt_logprobs": 1}),
            Effect(|o| {
                let scored = &o.body["choices"][0]["prompt_logprobs"];
                o.seen().sampling.prompt_logprobs == Some(1)
                    && scored[0].is_null()
                    && scored[2]["105"] == json!({"logprob": -0.5, "rank": 2, "decoded_token": "i"})
                    && scored[2]["122"]["rank"] == 1
            }),
        ),
        case(
            "prompt_logprobs",
            CHAT,
            json!({"prompt_logprobs": 0}),
            Effect(|o| {
                let scored = o.body["prompt_logprobs"].as_array().cloned().unwrap_or_default();
                scored.len() == o.seen().prompt_token_ids.len()
                    && scored[0].is_null()
                    && scored[1..].iter().all(|t| t.as_object().is_some_and(|t| t.len() == 2))
            }),
        ),
        case("prompt_logprobs", BOTH, json!({"prompt_logprobs": 1, "stream": true}), Refused),
        case(
            "echo",
            COMPLETION,
            json!({"echo": true, "logprobs": 1}),
            Effect(|o| {
                let lp = &o.body["choices"][0]["logprobs"];
                o.seen().sampling.prompt_logprobs == Some(1)
                    // The walk's model puts BOS (`<eos>` here) first.
                    && lp["tokens"].as_array().is_some_and(|t| t[..4] == [json!("<eos>"), json!("H"), json!("i"), json!("T")])
                    && lp["token_logprobs"][0].is_null()
                    && lp["top_logprobs"][0].is_null()
                    && lp["token_logprobs"][2] == -0.5
                    && lp["top_logprobs"][2] == json!({"i": -0.5, "z": -0.25})
                    && lp["token_logprobs"][3] == -1.0
                    && lp["text_offset"].as_array().is_some_and(|o| o[..4] == [json!(0), json!(5), json!(6), json!(7)])
                    && o.body["choices"][0].get("prompt_logprobs").is_none()
            }),
        ),
        case("echo", COMPLETION, json!({"echo": true, "logprobs": 1, "stream": true}), Refused),
        case(
            "return_tokens_as_token_ids",
            CHAT,
            json!({"logprobs": true, "top_logprobs": 1, "return_tokens_as_token_ids": true}),
            Effect(|o| {
                let first = &o.body["choices"][0]["logprobs"]["content"][0];
                first["token"] == "token_id:60" && first["top_logprobs"][0]["token"] == "token_id:60"
            }),
        ),
        case(
            "return_tokens_as_token_ids",
            COMPLETION,
            json!({"logprobs": 1, "return_tokens_as_token_ids": true}),
            Effect(|o| o.body["choices"][0]["logprobs"]["tokens"][0] == "token_id:84"),
        ),
        case(
            "return_token_ids",
            BOTH,
            json!({"return_token_ids": true}),
            Effect(|o| o.body["choices"][0]["token_ids"].as_array().is_some_and(|t| t.len() > 1)),
        ),
        case(
            "include_reasoning",
            CHAT,
            json!({"include_reasoning": false}),
            Effect(|o| o.body["choices"][0]["message"].get("reasoning_content").is_none()),
        ),
        case("stream", BOTH, json!({"stream": true}), Effect(|o| o.events.len() > 1)),
        case(
            "stream_options",
            BOTH,
            json!({"stream": true, "stream_options": {"include_usage": true}}),
            Effect(|o| o.events.last().is_some_and(|e| e["usage"]["completion_tokens"].is_u64())),
        ),
        case(
            "stream_options",
            BOTH,
            json!({"stream": true, "stream_options": {"continuous_usage_stats": true}}),
            Effect(|o| {
                let counts: Vec<u64> =
                    o.events.iter().filter_map(|e| e["usage"]["completion_tokens"].as_u64()).collect();
                o.events.iter().all(|e| e["usage"]["prompt_tokens"].is_u64())
                    && counts.windows(2).all(|w| w[0] <= w[1])
                    && counts.last() > Some(&0)
            }),
        ),
        // Scheduling, caching, tracing.
        case("priority", BOTH, json!({"priority": -3}), Effect(|o| o.seen().priority == -3)),
        case(
            "cache_salt",
            BOTH,
            json!({"cache_salt": "tenant-a"}),
            Effect(|o| o.seen().cache_salt.as_deref() == Some("tenant-a")),
        ),
        case(
            "request_id",
            BOTH,
            json!({"request_id": "walk-1"}),
            Effect(|o| {
                o.seen().request_id == "walk-1" && o.body["id"].as_str().is_some_and(|id| id.ends_with("-walk-1"))
            }),
        ),
        case(
            "user",
            BOTH,
            json!({"user": "walk-user-4d1c"}),
            Effect(|o| o.logged.iter().any(|f| f == "user=walk-user-4d1c")),
        ),
        case(
            "safety_identifier",
            CHAT,
            json!({"safety_identifier": "walk-safety-9b2e"}),
            Effect(|o| o.logged.iter().any(|f| f == "safety_identifier=walk-safety-9b2e")),
        ),
        case("kv_transfer_params", BOTH, json!({"kv_transfer_params": {"do_remote_decode": true}}), Refused),
        // OpenAI features with no counterpart here.
        case("parallel_tool_calls", CHAT, json!({"tools": tool, "parallel_tool_calls": false}), Refused),
        case("audio", CHAT, json!({"audio": {"voice": "alloy", "format": "wav"}}), Refused),
        case("modalities", CHAT, json!({"modalities": ["text", "audio"]}), Refused),
        case("prediction", CHAT, json!({"prediction": {"type": "content", "content": "x"}}), Refused),
        case("web_search_options", CHAT, json!({"web_search_options": {}}), Refused),
        case("functions", CHAT, json!({"functions": [{"name": "f"}]}), Refused),
        case("function_call", CHAT, json!({"function_call": "auto"}), Refused),
        case("store", CHAT, json!({"store": true}), Refused),
        case("metadata", CHAT, json!({"metadata": {"k": "v"}}), Refused),
        case("service_tier", CHAT, json!({"service_tier": "flex"}), Refused),
        case("verbosity", CHAT, json!({"verbosity": "low"}), Refused),
        case("prompt_cache_key", CHAT, json!({"prompt_cache_key": "k"}), Refused),
    ]
}

/// Answers "<think>ok</think>The end" (chat) or "The end" (completions) and eos (or the first
/// stop token id, as the engine would stop on it), with logprobs.
struct Scripted {
    seen: Mutex<Option<GenerateRequest>>,
}

impl Backend for Scripted {
    fn generate(&self, request: GenerateRequest) -> TokenStream {
        let chat = request.prompt_token_ids.ends_with(&ids("assistant\n"));
        let text = if chat { "<think>ok</think>The end" } else { "The end" };
        let n = request.sampling.n;
        let last = request.sampling.stop_token_ids.first().copied().unwrap_or(EOS);
        // Asked to score the prompt: each prompt token at logprob -0.5, second to 'z'.
        let scored: Vec<TokenChunk> = request
            .sampling
            .prompt_logprobs
            .map(|_| {
                let score = |_: &u32| TokenLogprobs { logprob: -0.5, top: vec![(b'z'.into(), -0.25)], rank: 2 };
                let prompt_logprobs = request.prompt_token_ids.iter().skip(1).map(score).collect();
                TokenChunk { prompt_logprobs, ..TokenChunk::default() }
            })
            .into_iter()
            .collect();
        *self.seen.lock().unwrap() = Some(request);
        let lp = |id: u32| TokenLogprobs { logprob: -1.0, top: vec![(id, -1.0), (b'z'.into(), -2.0)], rank: 1 };
        let chunks = (0..n).flat_map(move |index| {
            [
                TokenChunk {
                    index,
                    token_ids: ids(text),
                    logprobs: ids(text).into_iter().map(lp).collect(),
                    finish: None,
                    cached_tokens: None,
                    prompt_logprobs: vec![],
                },
                TokenChunk {
                    index,
                    token_ids: vec![last],
                    logprobs: vec![lp(last)],
                    finish: Some(Finish::Stop),
                    cached_tokens: None,
                    prompt_logprobs: vec![],
                },
            ]
        });
        stream::iter(scored.into_iter().chain(chunks).map(Ok).collect::<Vec<_>>()).boxed()
    }
}

/// Every span and event field logged in this test binary, from a global subscriber installed
/// once: a thread's own (scoped) subscriber can miss spans whose callsites other tests' threads
/// registered first. Checks look for values only their own request logs.
fn captured() -> &'static Fields {
    static CAPTURED: std::sync::OnceLock<Fields> = std::sync::OnceLock::new();
    CAPTURED.get_or_init(|| {
        let fields = Fields::default();
        tracing::subscriber::set_global_default(tracing_subscriber::registry().with(fields.clone()))
            .expect("no other global subscriber in the HTTP tests");
        fields
    })
}

/// Records `name=value` of span fields and event fields.
#[derive(Clone, Default)]
struct Fields(Arc<Mutex<Vec<String>>>);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.lock().unwrap().push(format!("{}={value:?}", field.name()));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.lock().unwrap().push(format!("{}={value}", field.name()));
    }
}

impl<S: tracing::Subscriber> Layer<S> for Fields {
    fn on_new_span(&self, attrs: &tracing::span::Attributes<'_>, _: &tracing::span::Id, _: Context<'_, S>) {
        attrs.record(&mut self.clone());
    }

    fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
        event.record(&mut self.clone());
    }
}

async fn run(app: &axum::Router, backend: &Scripted, logged: &Fields, endpoint: Endpoint, extra: &Value) -> Outcome {
    *backend.seen.lock().unwrap() = None;
    let mut body = endpoint.base();
    body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    let request =
        Request::post(endpoint.path()).header("content-type", "application/json").body(Body::from(body.to_string()));
    let response = app.clone().oneshot(request.unwrap()).await.unwrap();
    let status = response.status();
    let bytes = to_bytes(response.into_body(), usize::MAX).await.unwrap();
    let text = String::from_utf8(bytes.to_vec()).unwrap();
    let events: Vec<Value> = text
        .lines()
        .filter_map(|line| line.strip_prefix("data: "))
        .filter(|data| *data != "[DONE]")
        .map(|data| serde_json::from_str(data).unwrap())
        .collect();
    let body = if events.is_empty() { serde_json::from_str(&text).unwrap() } else { Value::Null };
    let seen = backend.seen.lock().unwrap().take();
    let logged = logged.0.lock().unwrap().clone();
    Outcome { status, body, events, seen, logged }
}

/// Every property the OpenAPI document gives a request body, through `$ref`s and `allOf`s.
fn documented(doc: &Value, schema: &Value, out: &mut BTreeSet<String>) {
    if let Some(reference) = schema["$ref"].as_str() {
        let name = reference.strip_prefix("#/components/schemas/").unwrap();
        return documented(doc, &doc["components"]["schemas"][name], out);
    }
    if let Some(properties) = schema["properties"].as_object() {
        out.extend(properties.keys().cloned());
    }
    for part in schema["allOf"].as_array().into_iter().flatten() {
        documented(doc, part, out);
    }
}

fn setup() -> (axum::Router, Arc<Scripted>) {
    let backend = Arc::new(Scripted { seen: Mutex::new(None) });
    let card = proto::worker::ModelCard { add_bos_token: true, ..card() };
    let model = Model::from_card(&card, None).unwrap();
    (app(AppState::ready(model, backend.clone())), backend)
}

#[tokio::test]
async fn every_field_of_both_apis_is_honoured_or_refused() {
    let logged = captured();
    let (app, backend) = setup();
    let doc: Value = {
        let outcome = app.clone().oneshot(Request::get("/openapi.json").body(Body::empty()).unwrap()).await.unwrap();
        serde_json::from_slice(&to_bytes(outcome.into_body(), usize::MAX).await.unwrap()).unwrap()
    };
    let cases = cases();
    for (endpoint, api) in [(Chat, CHAT_FIELDS), (Completion, COMPLETION_FIELDS)] {
        let schema = &doc["paths"][endpoint.path()]["post"]["requestBody"]["content"]["application/json"]["schema"];
        let mut ours = BTreeSet::new();
        documented(&doc, schema, &mut ours);
        // Every field of the API is one the router reads (and documents), none left unknown.
        let unread: Vec<_> = api.iter().filter(|f| !ours.contains(**f)).collect();
        assert!(unread.is_empty(), "{endpoint:?}: API fields the router does not read: {unread:?}");
        let walked: BTreeSet<&str> =
            cases.iter().filter(|c| c.endpoints.contains(&endpoint)).map(|c| c.field).collect();
        let unwalked: Vec<_> = ours.iter().filter(|f| !walked.contains(f.as_str())).collect();
        assert!(unwalked.is_empty(), "{endpoint:?}: fields with no case: {unwalked:?}");
    }
    let mut failures = Vec::new();
    for case in &cases {
        for &endpoint in case.endpoints {
            let outcome = run(&app, &backend, logged, endpoint, &case.extra).await;
            let ok = match case.expect {
                Refused => {
                    outcome.status == StatusCode::BAD_REQUEST
                        && outcome.body["error"]["param"].as_str().is_some_and(|p| {
                            p == case.field || p.strip_prefix(case.field).is_some_and(|rest| rest.starts_with('.'))
                        })
                        && outcome.seen.is_none()
                }
                Effect(check) => outcome.status == StatusCode::OK && check(&outcome),
            };
            if !ok {
                let body = if outcome.events.is_empty() { outcome.body } else { json!(outcome.events) };
                failures.push(format!("{} on {endpoint:?} with {}: {} {body}", case.field, case.extra, outcome.status));
            }
        }
    }
    assert!(failures.is_empty(), "{} cases failed:\n{}", failures.len(), failures.join("\n"));
}

/// Fields of neither API are ignored, as OpenAI and vLLM ignore them, and named in the log.
#[tokio::test]
async fn unknown_fields_are_ignored_and_logged_by_name() {
    let logged = captured();
    let (app, backend) = setup();
    for endpoint in [Chat, Completion] {
        let fields = json!({"frobnicate_walk": 1, "zz_top_walk": [1]});
        let outcome = run(&app, &backend, logged, endpoint, &fields).await;
        assert_eq!(outcome.status, StatusCode::OK, "{}", outcome.body);
        assert!(
            outcome
                .logged
                .iter()
                .any(|f| f.contains("fields=") && f.contains("frobnicate_walk") && f.contains("zz_top_walk")),
            "{:?}",
            outcome.logged
        );
    }
}
