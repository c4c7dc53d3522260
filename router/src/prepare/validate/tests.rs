use serde_json::{json, Value};

use std::borrow::Cow;

use super::*;
use crate::testutil::{card, ids};

fn model() -> Model {
    Model::from_card(&card(), None).unwrap()
}

fn completion(body: Value) -> Result<ValidRequest, ValidationError> {
    validate_completion(&model(), serde_json::from_value(body).unwrap()).map(|mut batch| {
        assert_eq!(batch.len(), 1, "one prompt");
        batch.remove(0)
    })
}

fn chat(body: Value) -> Result<ValidRequest, ValidationError> {
    validate_chat(&model(), serde_json::from_value(body).unwrap())
}

fn field_of(result: Result<ValidRequest, ValidationError>) -> Option<String> {
    match result {
        Err(e) => e.param().map(Cow::into_owned),
        other => panic!("expected a validation error, got {other:?}"),
    }
}

#[test]
fn defaults_fill_every_option() {
    let req = completion(json!({"prompt": "abcd"})).unwrap();
    assert_eq!(req.prompt_token_ids, ids("abcd"));
    let want = Sampling { max_tokens: 60, ..Sampling::default() };
    assert_eq!(req.sampling, want);
    assert!(!req.stream && !req.include_usage && !req.return_token_ids && req.stops.is_empty());
}

#[test]
fn explicit_values_are_kept() {
    let req = completion(json!({
        "prompt": ["ab"], "max_completion_tokens": 5, "temperature": 0, "top_p": 0.5,
        "top_k": 40, "seed": 7, "stream": true, "stream_options": {"include_usage": true},
        "stop": "x", "return_token_ids": true, "unknown_field": 1
    }))
    .unwrap();
    let want =
        Sampling { temperature: 0.0, top_p: 0.5, top_k: 40, seed: Some(7), max_tokens: 5, ..Sampling::default() };
    assert_eq!(req.sampling, want);
    assert!(req.stream && req.include_usage && req.return_token_ids);
    assert_eq!(req.stops, ["x"]);
}

#[test]
fn max_tokens_wins_over_max_completion_tokens() {
    let req = completion(json!({"prompt": "a", "max_tokens": 3, "max_completion_tokens": 9})).unwrap();
    assert_eq!(req.sampling.max_tokens, 3);
}

#[test]
fn sampling_bounds() {
    for (field, value) in [
        ("temperature", json!(3)),
        ("temperature", json!(-0.1)),
        ("top_p", json!(0)),
        ("top_p", json!(1.5)),
        ("top_k", json!(-2)),
        ("max_tokens", json!(0)),
        ("n", json!(0)),
        ("n", json!(17)),
        ("stop", json!(["a", "b", "c", "d", "e"])),
    ] {
        let mut body = json!({"prompt": "a"});
        body[field] = value;
        assert_eq!(field_of(completion(body)).as_deref(), Some(field), "{field}");
    }
    assert_eq!(completion(json!({"prompt": "a", "top_k": -1})).unwrap().sampling.top_k, 0);
    assert_eq!(completion(json!({"prompt": "a"})).unwrap().sampling.n, 1);
    assert_eq!(completion(json!({"prompt": "a", "n": 16})).unwrap().sampling.n, 16);
    // Greedy choices are allowed (all the same).
    assert_eq!(
        chat(json!({"messages": [{"role": "user", "content": "a"}], "n": 3, "temperature": 0})).unwrap().sampling.n,
        3
    );
    assert_eq!(completion(json!({"prompt": "a", "temperature": 2})).unwrap().sampling.temperature, 2.0);
}

#[test]
fn vllm_sampling_extras_are_kept() {
    let req = completion(json!({
        "prompt": "a", "max_tokens": 8, "min_p": 0.05, "presence_penalty": -2, "frequency_penalty": 1.5,
        "repetition_penalty": 1.1, "logit_bias": {"65": -100, "7": 2.5}, "stop_token_ids": [3, 9],
        "ignore_eos": true, "min_tokens": 8
    }))
    .unwrap();
    let want = Sampling {
        max_tokens: 8,
        min_p: 0.05,
        presence_penalty: -2.0,
        frequency_penalty: 1.5,
        repetition_penalty: 1.1,
        logit_bias: vec![(7, 2.5), (65, -100.0)],
        stop_token_ids: vec![3, 9],
        ignore_eos: true,
        min_tokens: 8,
        ..Sampling::default()
    };
    assert_eq!(req.sampling, want);
    // Explicit nulls are the defaults too.
    let nulls = json!({"prompt": "a", "max_tokens": 4, "logit_bias": null, "presence_penalty": null});
    assert_eq!(completion(nulls).unwrap().sampling, Sampling { max_tokens: 4, ..Sampling::default() });
}

#[test]
fn vllm_sampling_extras_bounds() {
    for (field, value) in [
        ("min_p", json!(-0.1)),
        ("min_p", json!(1.01)),
        ("presence_penalty", json!(2.5)),
        ("presence_penalty", json!(-2.01)),
        ("frequency_penalty", json!(-3)),
        ("frequency_penalty", json!(2.1)),
        ("repetition_penalty", json!(0)),
        ("repetition_penalty", json!(-1)),
        ("repetition_penalty", json!(2.5)),
        ("logit_bias", json!({"5": 100.5})),
        ("logit_bias", json!({"5": -101})),
        ("logit_bias", json!({"5000": 1})),
        ("logit_bias", json!({"-1": 1})),
        ("logit_bias", json!({"abc": 1})),
        ("stop_token_ids", json!([1, 5000])),
        ("stop_token_ids", json!([-1])),
        ("min_tokens", json!(-1)),
        ("min_tokens", json!(6)),
    ] {
        let mut body = json!({"prompt": "a", "max_tokens": 5});
        body[field] = value.clone();
        assert_eq!(field_of(completion(body)).as_deref(), Some(field), "{field} = {value}");
    }
    let edges = json!({
        "prompt": "a", "max_tokens": 5, "min_p": 1, "presence_penalty": 2, "frequency_penalty": -2,
        "repetition_penalty": 2, "logit_bias": {"0": -100, "255": 100}, "min_tokens": 5
    });
    assert!(completion(edges).is_ok());
    let err = completion(json!({"prompt": "a", "logit_bias": {"5000": 1}})).unwrap_err();
    assert!(err.to_string().contains("`logit_bias` must be keyed by token ids"), "{err}");
    assert!(err.to_string().contains("5000"), "{err}");
    // min_tokens is checked against the resolved max_tokens, also for chat.
    let chat_req = json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "min_tokens": 3});
    assert_eq!(field_of(chat(chat_req)).as_deref(), Some("min_tokens"));
}

#[test]
fn error_message_names_field_limit_and_value() {
    let err = completion(json!({"prompt": "a", "temperature": 3})).unwrap_err();
    assert_eq!(err.to_string(), "`temperature` must be in [0, 2], got 3");
}

#[test]
fn prompt_shapes() {
    assert_eq!(completion(json!({"prompt": [1, 2]})).unwrap().prompt_token_ids, [1, 2]);
    assert_eq!(field_of(completion(json!({}))).as_deref(), Some("prompt"));
    assert_eq!(field_of(completion(json!({"prompt": ""}))).as_deref(), Some("prompt"));
    assert_eq!(field_of(completion(json!({"prompt": []}))).as_deref(), Some("prompt"));
    assert_eq!(field_of(completion(json!({"prompt": [999]}))).as_deref(), Some("prompt"));
    // Batches: one request per prompt, in order, each checked; not empty, at most 64.
    let batch =
        |prompt: Value| validate_completion(&model(), serde_json::from_value(json!({"prompt": prompt})).unwrap());
    let texts = batch(json!(["a", "bc"])).unwrap();
    assert_eq!(texts.iter().map(|v| v.prompt_token_ids.clone()).collect::<Vec<_>>(), [ids("a"), ids("bc")]);
    let lists = batch(json!([[1, 2], [3]])).unwrap();
    assert_eq!(lists.iter().map(|v| v.prompt_token_ids.clone()).collect::<Vec<_>>(), [vec![1, 2], vec![3]]);
    for bad in [json!([[]]), json!([[1], [999]]), json!(["a", ""]), json!(vec!["a"; 65])] {
        assert_eq!(batch(bad.clone()).err().and_then(|e| e.param()).as_deref(), Some("prompt"), "{bad}");
    }
}

#[test]
fn context_length_is_enforced_like_vllm() {
    let long = "a".repeat(64);
    let err = completion(json!({"prompt": long})).unwrap_err();
    assert!(matches!(err, ValidationError::PromptTooLong { prompt_tokens: 64, .. }));
    let err = completion(json!({"prompt": "a".repeat(60), "max_tokens": 5})).unwrap_err();
    assert!(matches!(err, ValidationError::ContextExceeded { total: 65, .. }));
    let ok = completion(json!({"prompt": "a".repeat(60), "max_tokens": 4})).unwrap();
    assert_eq!(ok.sampling.max_tokens, 4);
}

#[test]
fn chat_messages_are_validated_and_parts_concatenated() {
    let parts = json!({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "H"}, {"type": "text", "text": "i"}]}]});
    let plain = json!({"messages": [{"role": "user", "content": "Hi"}]});
    assert_eq!(chat(parts).unwrap().prompt_token_ids, chat(plain).unwrap().prompt_token_ids);
    assert_eq!(field_of(chat(json!({}))).as_deref(), Some("messages"));
    assert_eq!(field_of(chat(json!({"messages": []}))).as_deref(), Some("messages"));
    let bad_role = json!({"messages": [{"role": "robot", "content": "x"}]});
    assert_eq!(field_of(chat(bad_role)).as_deref(), Some("messages.role"));
    let image = json!({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]});
    assert_eq!(field_of(chat(image)).as_deref(), Some("messages.content"));
}

#[test]
fn chat_logprobs_and_top_logprobs() {
    let msgs = json!([{"role": "user", "content": "hi"}]);
    let logprobs_of = |extra: Value| {
        let mut body = json!({"messages": msgs});
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        chat(body)
    };
    assert_eq!(logprobs_of(json!({})).unwrap().sampling.logprobs, None);
    assert_eq!(logprobs_of(json!({"logprobs": false})).unwrap().sampling.logprobs, None);
    assert_eq!(logprobs_of(json!({"logprobs": true})).unwrap().sampling.logprobs, Some(0));
    assert_eq!(logprobs_of(json!({"logprobs": true, "top_logprobs": 20})).unwrap().sampling.logprobs, Some(20));
    assert_eq!(field_of(logprobs_of(json!({"top_logprobs": 2}))).as_deref(), Some("top_logprobs"));
    assert_eq!(field_of(logprobs_of(json!({"logprobs": false, "top_logprobs": 0}))).as_deref(), Some("top_logprobs"));
    assert_eq!(field_of(logprobs_of(json!({"logprobs": true, "top_logprobs": 21}))).as_deref(), Some("top_logprobs"));
    assert_eq!(field_of(logprobs_of(json!({"logprobs": true, "top_logprobs": -1}))).as_deref(), Some("top_logprobs"));
    let err = logprobs_of(json!({"logprobs": true, "top_logprobs": 21})).unwrap_err();
    assert_eq!(err.to_string(), "`top_logprobs` must be in [0, 20], got 21");
}

fn weather_tool() -> Value {
    json!({"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}})
}

fn chat_with(extra: Value) -> Result<ValidRequest, ValidationError> {
    let mut body = json!({"messages": [{"role": "user", "content": "hi"}]});
    body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    chat(body)
}

#[test]
fn tools_and_tool_choice() {
    assert!(!chat_with(json!({})).unwrap().parse_tool_calls);
    assert!(chat_with(json!({"tools": [weather_tool()]})).unwrap().parse_tool_calls);
    for choice in [json!("auto"), json!("required"), json!({"type": "function", "function": {"name": "weather"}})] {
        assert!(chat_with(json!({"tools": [weather_tool()], "tool_choice": choice})).unwrap().parse_tool_calls);
    }
    // "none" turns parsing off, with or without tools; so do empty tools.
    assert!(!chat_with(json!({"tools": [weather_tool()], "tool_choice": "none"})).unwrap().parse_tool_calls);
    assert!(!chat_with(json!({"tool_choice": "none"})).unwrap().parse_tool_calls);
    assert!(!chat_with(json!({"tools": []})).unwrap().parse_tool_calls);
}

#[test]
fn bad_tools_and_tool_choice_name_the_field() {
    let retrieval = json!({"type": "retrieval", "function": {"name": "x"}});
    for (extra, field) in [
        (json!({"tools": {"type": "function"}}), "tools"),
        (json!({"tools": [retrieval]}), "tools"),
        (json!({"tools": [{"function": {"name": "x"}}]}), "tools.type"),
        (json!({"tools": [{"type": "function"}]}), "tools.function"),
        (json!({"tools": [{"type": "function", "function": {"description": "d"}}]}), "tools.function.name"),
        (json!({"tool_choice": "auto"}), "tool_choice"),
        (json!({"tool_choice": "required"}), "tool_choice"),
        (json!({"tools": [weather_tool()], "tool_choice": "always"}), "tool_choice"),
        (
            json!({"tools": [weather_tool()], "tool_choice": {"type": "function", "function": {"name": "other"}}}),
            "tool_choice",
        ),
        (json!({"tools": [weather_tool()], "tool_choice": {"type": "function"}}), "tool_choice"),
    ] {
        assert_eq!(field_of(chat_with(extra.clone())).as_deref(), Some(field), "{extra}");
    }
}

#[test]
fn tool_messages_are_validated() {
    let call = json!({"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": "{}"}});
    let ok = json!({"messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": null, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]});
    assert!(chat(ok).is_ok());
    let no_id = json!({"messages": [{"role": "tool", "content": "sunny"}]});
    assert_eq!(field_of(chat(no_id)).as_deref(), Some("messages.tool_call_id"));
    let user_calls = json!({"messages": [{"role": "user", "content": "x", "tool_calls": [call]}]});
    assert_eq!(field_of(chat(user_calls)).as_deref(), Some("messages.tool_calls"));
    // Found by schemathesis (seed 20261206): a call that is not a call object.
    for bad in
        [json!(0.0), json!({"function": {"arguments": "{}"}}), json!({"function": {"name": "f", "arguments": 1}})]
    {
        let calls = json!({"messages": [{"role": "assistant", "tool_calls": [bad]}]});
        assert_eq!(field_of(chat(calls)).as_deref(), Some("messages.tool_calls"), "{bad}");
    }
}

#[test]
fn new_fields_default_like_vllm() {
    let req = completion(json!({"prompt": "a"})).unwrap();
    assert!(!req.include_stop_str_in_output && req.skip_special_tokens && req.echo.is_none());
    let req = completion(json!({"prompt": "a", "include_stop_str_in_output": true, "skip_special_tokens": false,
                                "echo": true, "user": "u", "request_id": "r-1", "kv_transfer_params": null}))
    .unwrap();
    assert!(req.include_stop_str_in_output && !req.skip_special_tokens);
    assert_eq!(req.echo.as_deref(), Some("a"));
    // The router runs the hand-off itself: transfer parameters from a client are refused.
    assert!(completion(json!({"prompt": "a", "kv_transfer_params": {}})).is_ok());
    let transfer = completion(json!({"prompt": "a", "kv_transfer_params": {"remote_host": "x"}}));
    assert_eq!(field_of(transfer).as_deref(), Some("kv_transfer_params"));
}

#[test]
fn new_fields_out_of_range_name_the_field() {
    let user = json!([{"role": "user", "content": "a"}]);
    let continued = json!([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]);
    for (body, field) in [
        (json!({"prompt": "a", "request_id": ""}), "request_id"),
        (json!({"prompt": "a", "request_id": "x".repeat(257)}), "request_id"),
        (json!({"prompt": "a", "request_id": "caf\u{e9}"}), "request_id"),
        (json!({"prompt": "a", "request_id": "a\tb"}), "request_id"),
        (json!({"prompt": "a", "kv_transfer_params": 5}), "kv_transfer_params"),
        (json!({"prompt": "a", "kv_transfer_params": [1]}), "kv_transfer_params"),
        (json!({"prompt": "a", "echo": true, "logprobs": 0, "stream": true}), "echo"),
    ] {
        assert_eq!(field_of(completion(body.clone())).as_deref(), Some(field), "{body}");
    }
    for (body, field) in [
        (
            json!({"messages": continued, "continue_final_message": true, "add_generation_prompt": true}),
            "continue_final_message",
        ),
        (json!({"messages": user, "continue_final_message": true}), "continue_final_message"),
        (json!({"messages": user, "chat_template_kwargs": "x"}), "chat_template_kwargs"),
        (json!({"messages": user, "chat_template": "{% for %}"}), "chat_template"),
        (json!({"messages": user, "request_id": ""}), "request_id"),
        (json!({"messages": user, "kv_transfer_params": true}), "kv_transfer_params"),
    ] {
        assert_eq!(field_of(chat(body.clone())).as_deref(), Some(field), "{body}");
    }
    // The limits themselves are accepted.
    assert!(completion(json!({"prompt": "a", "request_id": "x".repeat(256)})).is_ok());
    assert!(completion(json!({"prompt": "a", "request_id": " ~"})).is_ok());
    assert!(completion(json!({"prompt": "a", "echo": false, "logprobs": 0})).is_ok());
    assert!(chat(json!({"messages": continued, "continue_final_message": true})).is_ok());
    assert!(chat(json!({"messages": user, "chat_template_kwargs": null})).is_ok());
}

#[test]
fn chat_echo_is_the_final_assistant_message_only() {
    let continued = json!([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]);
    let req = chat(json!({"messages": continued, "echo": true, "continue_final_message": true})).unwrap();
    assert_eq!(req.echo.as_deref(), Some("b"));
    let req = chat(json!({"messages": [{"role": "user", "content": "a"}], "echo": true})).unwrap();
    assert_eq!(req.echo, None);
}

#[test]
fn tool_call_arguments_strings_become_objects() {
    let call =
        |arguments: Value| json!({"id": "c", "type": "function", "function": {"name": "f", "arguments": arguments}});
    let messages = json!([{"role": "assistant", "content": null,
                           "tool_calls": [call(json!("{\"x\": 1}")), call(json!("nope")), call(json!("3")), call(json!({"y": 2}))]}]);
    let messages = chat_messages(serde_json::from_value(messages).unwrap()).unwrap();
    let arguments: Vec<&Value> =
        messages[0].tool_calls.as_ref().unwrap().iter().map(|c| &c["function"]["arguments"]).collect();
    assert_eq!(arguments, [&json!({"x": 1}), &json!("nope"), &json!("3"), &json!({"y": 2})]);
}

#[test]
fn a_message_needs_content_unless_it_is_an_assistant_calling_tools() {
    let call = json!({"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}});
    let user = json!({"role": "user", "content": "Hi"});
    for (message, field) in [
        (json!({"role": "user"}), "messages[1].content"),
        (json!({"role": "user", "content": null}), "messages[1].content"),
        (json!({"role": "system"}), "messages[1].content"),
        (json!({"role": "tool", "tool_call_id": "c"}), "messages[1].content"),
        (json!({"role": "assistant"}), "messages[1].content"),
    ] {
        let body = json!({"messages": [user.clone(), message.clone()]});
        assert_eq!(field_of(chat(body)).as_deref(), Some(field), "{message}");
    }
    let calling = json!({"role": "assistant", "tool_calls": [call]});
    let messages = chat_messages(serde_json::from_value(json!([user, calling])).unwrap()).unwrap();
    assert_eq!(messages[1].content, "");
}

#[test]
fn spaces_between_special_tokens_false_is_taken_only_where_it_changes_nothing() {
    // The byte-level test vocabulary: its decoder puts no space between special tokens.
    assert!(completion(json!({"prompt": "a", "spaces_between_special_tokens": false})).is_ok());
    // A word-level vocabulary decodes with spaces between tokens: false would have to drop them.
    let tokenizer = json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [{"id": 2, "content": "<eos>", "single_word": false, "lstrip": false,
                          "rstrip": false, "normalized": false, "special": true}],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": true},
        "model": {"type": "WordLevel", "vocab": {"a": 0, "b": 1, "<eos>": 2}, "unk_token": "a"}
    });
    let words = proto::worker::ModelCard { tokenizer_json: tokenizer.to_string(), ..card() };
    let model = Model::from_card(&words, None).unwrap();
    let body = |v: bool| serde_json::from_value(json!({"prompt": "a b", "spaces_between_special_tokens": v})).unwrap();
    assert!(validate_completion(&model, body(true)).is_ok());
    let refused = validate_completion(&model, body(false)).map(|_| ());
    assert_eq!(refused.err().and_then(|e| e.param()).as_deref(), Some("spaces_between_special_tokens"));
}

/// An encoder's card: chat and completions are refused naming `model`, and its texts get the
/// tokenizer's own special tokens.
#[test]
fn an_encoder_generates_nothing() {
    let encoder = Model::from_card(&proto::worker::ModelCard { encoder: true, ..card() }, None).unwrap();
    let chat = validate_chat(
        &encoder,
        serde_json::from_value(json!({"messages": [{"role": "user", "content": "hi"}]})).unwrap(),
    );
    let error = chat.unwrap_err();
    assert_eq!(error.param().as_deref(), Some("model"));
    assert!(error.to_string().contains("embedding model"), "{error}");
    let completion = validate_completion(&encoder, serde_json::from_value(json!({"prompt": "hi"})).unwrap());
    assert_eq!(completion.unwrap_err().param().as_deref(), Some("model"));
}
