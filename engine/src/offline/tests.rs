//! Offline batch mode on the real model (`scripts/fetch-model.sh`, or `PDSERVE_MODEL`).

use super::*;
use std::path::PathBuf;
use std::sync::OnceLock;

fn model_path() -> PathBuf {
    let path = std::env::var_os("PDSERVE_MODEL").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf")
    });
    assert!(path.exists(), "model {} not found: run scripts/fetch-model.sh or set PDSERVE_MODEL", path.display());
    path
}

/// One engine for every test of this file: loading is the slow part.
fn llm() -> &'static Llm {
    static LLM: OnceLock<Llm> = OnceLock::new();
    LLM.get_or_init(|| {
        let loaded = crate::model::load_gguf(&model_path()).expect("load the model");
        let config = LlmConfig { kv_cache_bytes: 128 << 20, ..LlmConfig::default() };
        Llm::new(loaded, config).expect("start the engine")
    })
}

fn greedy(max_tokens: u32) -> SamplingParams {
    SamplingParams { temperature: 0.0, max_tokens, ..SamplingParams::default() }
}

#[test]
fn chat_answers_the_capital_of_france() {
    let question = ChatMessage::text("user", "What is the capital of France? Answer in one word.");
    let outputs = llm().chat(vec![vec![question]], &greedy(16)).unwrap();
    assert_eq!(outputs.len(), 1);
    let out = &outputs[0];
    assert!(out.first().text.contains("Paris"), "{:?}", out.first().text);
    assert!(out.num_prompt_tokens > 10, "the template wraps the question: {out:?}");
    assert!(out.first().token_ids.len() <= 16);
}

#[test]
fn batched_outputs_keep_input_order_and_match_single_runs() {
    let llm = llm();
    let prompts: Vec<Vec<u32>> = ["The quick brown fox", "Once upon a time, in a land", "1, 2, 3, 4,", "Rust is a"]
        .iter()
        .map(|text| llm.tokenizer().encode(*text, false).unwrap().get_ids().to_vec())
        .collect();
    // Different lengths, so a mix-up of order would show.
    let lengths = [12, 5, 9, 7];
    let requests: Vec<Request> = prompts
        .iter()
        .zip(lengths)
        .map(|(ids, n)| Request::new(Input::Prompt(Prompt::TokenIds(ids.clone())), greedy(n)))
        .collect();
    let mut reports = Vec::new();
    let batched = llm.run(requests, &mut |p| reports.push(*p));
    for ((ids, n), result) in prompts.iter().zip(lengths).zip(&batched) {
        let out = result.as_ref().unwrap();
        assert_eq!(out.num_prompt_tokens, ids.len());
        assert!(out.first().token_ids.len() <= n as usize);
        let alone = llm.generate(vec![Prompt::TokenIds(ids.clone())], &greedy(n)).unwrap();
        assert_eq!(alone[0].first().token_ids, out.first().token_ids, "prompt {ids:?}");
        assert_eq!(alone[0].first().text, out.first().text);
    }
    let last = reports.last().expect("progress was reported");
    assert_eq!((last.done, last.total), (4, 4));
    let generated: usize = batched.iter().map(|r| r.as_ref().unwrap().first().token_ids.len()).sum();
    assert_eq!(last.generated_tokens, generated);
}

#[test]
fn a_failed_request_does_not_stop_the_others() {
    let llm = llm();
    let requests = vec![
        Request::new(Input::Prompt(Prompt::TokenIds(vec![])), greedy(2)),
        Request::new(Input::Prompt(Prompt::Text("Hello".into())), greedy(2)),
    ];
    let results = llm.run(requests, &mut |_| {});
    assert!(matches!(results[0], Err(OfflineError::Rejected(EngineError::EmptyPrompt { .. }))), "{:?}", results[0]);
    assert!(results[1].is_ok(), "{:?}", results[1]);
    let err = llm.generate(vec![Prompt::TokenIds(vec![])], &greedy(2)).unwrap_err();
    assert!(err.to_string().starts_with("request 0: "), "{err}");
}

#[test]
fn max_tokens_past_the_context_is_refused_as_the_server_refuses_it() {
    let llm = llm();
    let context = llm.engine().max_model_len();
    let prompt = Prompt::Text("Hello".into());
    let err = llm.generate(vec![prompt.clone()], &greedy(context as u32)).unwrap_err();
    let OfflineError::Request { source, .. } = err else { panic!("{err}") };
    assert!(
        matches!(*source, OfflineError::ContextExceeded { max_tokens, context_length, .. }
            if max_tokens as usize == context && context_length == context),
        "{source}"
    );
    // What fits runs.
    assert!(llm.generate(vec![prompt], &greedy(2)).is_ok());
}

#[test]
fn beam_search_of_width_one_is_greedy_and_wider_beams_are_distinct_and_best_first() {
    let llm = llm();
    let prompt = Prompt::Text("The capital of France is".into());
    let params = BeamSearchParams { beam_width: 1, max_tokens: 6, length_penalty: 0.0, ignore_eos: false };
    let beams = llm.beam_search(vec![prompt.clone()], &params).unwrap();
    let greedy_tokens = llm.generate(vec![prompt.clone()], &greedy(6)).unwrap().remove(0).first().token_ids.clone();
    assert_eq!(beams[0][0].token_ids, greedy_tokens, "one beam is the greedy path");

    let wide = BeamSearchParams { beam_width: 3, length_penalty: 1.0, ..params };
    let beams = llm.beam_search(vec![prompt.clone(), Prompt::Text("Hello".into())], &wide).unwrap();
    assert_eq!(beams.len(), 2);
    for found in &beams {
        assert_eq!(found.len(), 3);
        assert!(found.windows(2).all(|w| w[0].token_ids != w[1].token_ids), "{found:?}");
        // Best first by vLLM's score: cumulative logprob over (prompt + beam) length.
        assert!(found.iter().all(|b| b.cumulative_logprob <= 0.0 && !b.token_ids.is_empty()));
    }
    assert_eq!(llm.beam_search(vec![prompt], &wide).unwrap()[0], beams[0], "deterministic");
    let too_wide = BeamSearchParams { beam_width: 11, ..wide };
    assert!(llm.beam_search(vec![Prompt::Text("x".into())], &too_wide).is_err());
}

#[test]
fn stop_strings_end_the_output_where_they_start_and_stop_the_generation() {
    let llm = llm();
    let input = Input::Prompt(Prompt::Text("The capital of France is".into()));
    let free = llm.run(vec![Request::new(input.clone(), greedy(12))], &mut |_| {}).remove(0).unwrap().first().clone();
    let at = free.text.find("Paris").expect("greedy names Paris");
    let stopped = Request { stop: vec!["Paris".into()], ..Request::new(input.clone(), greedy(12)) };
    let kept = Request { include_stop_str_in_output: true, ..stopped.clone() };
    let outs: Vec<Choice> =
        llm.run(vec![stopped, kept], &mut |_| {}).into_iter().map(|r| r.unwrap().first().clone()).collect();
    assert_eq!(outs[0].text, free.text[..at]);
    assert_eq!(outs[1].text, free.text[..at + "Paris".len()]);
    for out in &outs {
        assert_eq!(out.finish_reason, FinishReason::Stop);
        // Generation stopped at the token that completed the stop string.
        assert!(out.token_ids.len() < free.token_ids.len(), "{out:?}");
        assert_eq!(out.token_ids[..], free.token_ids[..out.token_ids.len()]);
    }
}

#[test]
fn n_choices_come_from_one_prompt_each_drawing_its_own_stream() {
    let llm = llm();
    let input = Input::Prompt(Prompt::Text("Once upon a time".into()));
    let sampling = SamplingParams { temperature: 1.0, seed: Some(5), max_tokens: 8, ..SamplingParams::default() };
    let three = Request { n: 3, ..Request::new(input.clone(), sampling.clone()) };
    let out = llm.run(vec![three], &mut |_| {}).remove(0).unwrap();
    assert_eq!(out.choices.len(), 3);
    assert!(out.choices.iter().all(|c| !c.token_ids.is_empty()));
    assert!(
        out.choices[0].token_ids != out.choices[1].token_ids || out.choices[1].token_ids != out.choices[2].token_ids
    );
    // Choice 0 is what one choice draws with the same seed.
    let one = llm.run(vec![Request::new(input, sampling)], &mut |_| {}).remove(0).unwrap();
    assert_eq!(one.choices.len(), 1);
    assert_eq!(one.first().token_ids, out.first().token_ids);
}
