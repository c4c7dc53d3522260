//! `pdserve-batch` run as a process on the real model (`scripts/fetch-model.sh`, or `PDSERVE_MODEL`).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn model_path() -> PathBuf {
    let path = std::env::var_os("PDSERVE_MODEL").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf")
    });
    assert!(path.exists(), "model {} not found: run scripts/fetch-model.sh or set PDSERVE_MODEL", path.display());
    path
}

fn run_batch(input: &Path, output: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pdserve-batch"))
        .arg("--model")
        .arg(model_path())
        .arg("--input")
        .arg(input)
        .arg("--output")
        .arg(output)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run pdserve-batch")
}

fn records(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn every_line_gets_a_record_in_input_order() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("prompts.jsonl");
    let output = dir.path().join("results.jsonl");
    std::fs::write(
        &input,
        [
            r#"{"id": "chat", "messages": [{"role": "user", "content": "What is the capital of France? Answer in one word."}], "temperature": 0, "max_tokens": 8}"#,
            r#"{"prompt": "The quick brown fox", "temperature": 0, "max_tokens": 5, "ignore_eos": true}"#,
            "",
            r#"{"id": 7, "prompt_token_ids": [504, 2365, 6354], "max_tokens": 3, "seed": 1}"#,
        ]
        .join("\n"),
    )
    .unwrap();
    let out = run_batch(&input, &output);
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    let recs = records(&output);
    assert_eq!(recs.len(), 3);
    assert_eq!(recs.iter().map(|r| r["line"].as_u64().unwrap()).collect::<Vec<_>>(), [1, 2, 4]);
    assert_eq!(recs[0]["id"], "chat");
    assert!(recs[0]["text"].as_str().unwrap().contains("Paris"), "{}", recs[0]);
    assert_eq!(recs[1]["id"], serde_json::Value::Null);
    assert_eq!(recs[1]["finish_reason"], "length");
    assert_eq!(recs[1]["token_ids"].as_array().unwrap().len(), 5);
    assert_eq!(recs[1]["usage"]["completion_tokens"], 5);
    assert_eq!(recs[2]["id"], 7);
    assert_eq!(recs[2]["usage"]["prompt_tokens"], 3);
}

#[test]
fn a_bad_line_fails_before_anything_runs() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("prompts.jsonl");
    let output = dir.path().join("results.jsonl");
    std::fs::write(&input, "{\"prompt\": \"ok\"}\n{\"prompt\": \"x\", \"max_tokens\": \"many\"}\n").unwrap();
    let out = run_batch(&input, &output);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = stderr.trim_end();
    assert!(!line.contains('\n'), "one line: {stderr}");
    assert!(line.starts_with("pdserve-batch: error: "), "{line}");
    assert!(line.contains("prompts.jsonl: line 2: ") && line.contains("max_tokens"), "{line}");
    assert!(!output.exists(), "nothing ran, so no output file");
}

#[test]
fn a_request_the_engine_refuses_gets_an_error_record() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("prompts.jsonl");
    let output = dir.path().join("results.jsonl");
    std::fs::write(
        &input,
        "{\"id\": \"bad\", \"prompt_token_ids\": [4000000]}\n{\"id\": \"good\", \"prompt\": \"Hi\", \"max_tokens\": 2}\n",
    )
    .unwrap();
    let out = run_batch(&input, &output);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("1 of 2 requests failed"), "{stderr}");
    let recs = records(&output);
    assert_eq!(recs.len(), 2);
    assert_eq!(recs[0]["id"], "bad");
    assert!(recs[0]["error"].as_str().unwrap().contains("outside the vocabulary"), "{}", recs[0]);
    assert_eq!(recs[1]["id"], "good");
    assert!(recs[1]["text"].is_string());
}

#[test]
fn lines_take_structured_outputs_as_the_server_does() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("prompts.jsonl");
    let output = dir.path().join("results.jsonl");
    let schema = r#"{"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}, "year": {"type": "integer", "minimum": 1000, "maximum": 2100}}, "required": ["city", "year"], "additionalProperties": false}"#;
    std::fs::write(
        &input,
        [
            format!(r#"{{"id": "schema", "messages": [{{"role": "user", "content": "Name a capital and a year."}}], "temperature": 0, "max_tokens": 40, "response_format": {{"type": "json_schema", "json_schema": {{"name": "c", "schema": {schema}}}}}}}"#),
            r#"{"id": "choice", "prompt": "The weather today is", "temperature": 1, "seed": 3, "max_tokens": 8, "structured_outputs": {"choice": ["sunny", "rainy"]}}"#.to_string(),
            r#"{"id": "regex", "prompt": "My phone number is", "max_tokens": 20, "guided_regex": "[0-9]{3}-[0-9]{4}"}"#.to_string(),
            r#"{"id": "bad", "prompt": "x", "guided_regex": "(unclosed"}"#.to_string(),
        ]
        .join("\n"),
    )
    .unwrap();
    let out = run_batch(&input, &output);
    assert_eq!(out.status.code(), Some(1), "the bad line fails: {}", String::from_utf8_lossy(&out.stderr));
    let recs = records(&output);
    let answer: serde_json::Value = serde_json::from_str(recs[0]["text"].as_str().unwrap()).unwrap();
    assert!(["Paris", "Rome"].contains(&answer["city"].as_str().unwrap()), "{answer}");
    assert!((1000..=2100).contains(&answer["year"].as_i64().unwrap()), "{answer}");
    assert!(["sunny", "rainy"].contains(&recs[1]["text"].as_str().unwrap()), "{}", recs[1]);
    let phone = recs[2]["text"].as_str().unwrap();
    assert!(
        phone.len() == 8 && phone.as_bytes()[3] == b'-' && phone.replace('-', "").bytes().all(|b| b.is_ascii_digit()),
        "{phone:?}"
    );
    assert!(recs[3]["error"].as_str().unwrap().contains("structured output"), "{}", recs[3]);

    // Two structured outputs on one line stop the run before the model loads, naming the line.
    std::fs::write(&input, r#"{"prompt": "x", "guided_regex": "a", "guided_choice": ["a"]}"#).unwrap();
    let out = run_batch(&input, &output);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("line 1") && stderr.contains("guided_choice"), "{stderr}");
}

/// Lines take the server's sampling extras, with the server's checks: logprobs and prompt
/// logprobs in the records, allowed tokens, bad words, logit bias, special tokens kept, and a
/// `max_tokens` past the context refused for that line only.
#[test]
fn lines_take_the_servers_sampling_extras_and_its_context_check() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("prompts.jsonl");
    let output = dir.path().join("results.jsonl");
    let lines = [
        r#"{"id": "scored", "prompt": "The capital of France is", "temperature": 0, "max_tokens": 3, "logprobs": 2, "prompt_logprobs": 1}"#,
        r#"{"id": "free", "prompt": "The capital of France is", "temperature": 0, "max_tokens": 3}"#,
        r#"{"id": "banned", "prompt": "The capital of France is", "temperature": 0, "max_tokens": 3, "bad_words": ["Paris"]}"#,
        r#"{"id": "allowed", "prompt": "The capital of France is", "temperature": 0, "max_tokens": 3, "allowed_token_ids": [28, 30]}"#,
        r#"{"id": "biased", "prompt": "The capital of France is", "temperature": 0, "max_tokens": 2, "logit_bias": {"28": 100}}"#,
        r#"{"id": "too long", "prompt": "Hello", "max_tokens": 100000}"#,
        r#"{"id": "stopped", "prompt": "The capital of France is", "temperature": 0, "max_tokens": 3, "stop": "Paris"}"#,
        r#"{"id": "three", "prompt": "Once upon a time", "seed": 5, "max_tokens": 4, "n": 3}"#,
        r#"{"id": "beams", "prompt": "The capital of France is", "max_tokens": 4, "n": 2, "use_beam_search": true}"#,
        r#"{"id": "cut", "prompt": "The capital of France is", "max_tokens": 1, "truncate_prompt_tokens": 2}"#,
    ];
    std::fs::write(&input, lines.join("\n")).unwrap();
    let out = run_batch(&input, &output);
    assert_eq!(out.status.code(), Some(1), "the too-long line fails: {}", String::from_utf8_lossy(&out.stderr));
    let recs = records(&output);
    let scored = &recs[0];
    assert_eq!(scored["logprobs"].as_array().unwrap().len(), 3, "{scored}");
    assert_eq!(scored["logprobs"][0]["top"].as_array().unwrap().len(), 2, "{scored}");
    let prompt = scored["prompt_logprobs"].as_array().unwrap();
    assert_eq!(prompt.len() as u64, scored["usage"]["prompt_tokens"].as_u64().unwrap(), "{scored}");
    assert!(prompt[0].is_null() && prompt[1]["logprob"].as_f64().unwrap() < 0.0, "{scored}");
    // Greedy: scoring changes nothing of the answer.
    assert_eq!(scored["token_ids"], recs[1]["token_ids"]);
    assert!(recs[1]["text"].as_str().unwrap().contains("Paris"), "{}", recs[1]);
    assert!(!recs[2]["text"].as_str().unwrap().contains("Paris"), "{}", recs[2]);
    let allowed: Vec<u64> = recs[3]["token_ids"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap()).collect();
    assert!(allowed.iter().all(|t| [28, 30].contains(t)), "{}", recs[3]);
    assert_eq!(recs[4]["token_ids"], serde_json::json!([28, 28]), "{}", recs[4]);
    assert!(recs[5]["error"].as_str().unwrap().contains("maximum context length"), "{}", recs[5]);
    let (stopped, free) = (&recs[6], &recs[1]);
    assert_eq!(stopped["finish_reason"], "stop", "{stopped}");
    let free_text = free["text"].as_str().unwrap();
    assert_eq!(stopped["text"].as_str().unwrap(), &free_text[..free_text.find("Paris").unwrap()], "{stopped}");
    let three = recs[7]["choices"].as_array().expect("n > 1 gives a choices list");
    assert_eq!(three.len(), 3, "{}", recs[7]);
    assert!(three
        .iter()
        .enumerate()
        .all(|(i, c)| c["index"] == i && c["token_ids"].as_array().is_some_and(|t| !t.is_empty())));
    let tokens: u64 = three.iter().map(|c| c["token_ids"].as_array().unwrap().len() as u64).sum();
    assert_eq!(recs[7]["usage"]["completion_tokens"].as_u64().unwrap(), tokens, "{}", recs[7]);
    // Beam-search lines answer their beams, best first, in their place in the file.
    let beams = recs[8]["choices"].as_array().expect("beams");
    assert_eq!((recs[8]["id"].as_str(), beams.len()), (Some("beams"), 2), "{}", recs[8]);
    assert_ne!(beams[0]["token_ids"], beams[1]["token_ids"]);
    assert!(beams.iter().all(|b| b["cumulative_logprob"].as_f64().unwrap() < 0.0), "{}", recs[8]);
    assert_eq!(recs[9]["usage"]["prompt_tokens"], 2, "{}", recs[9]);
}

/// Chat lines take the server's rendering options: no generation prompt, a final message left open
/// for the model to continue, template variables; on a prompt line they are an error.
#[test]
fn chat_lines_take_the_servers_rendering_options() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("prompts.jsonl");
    let output = dir.path().join("results.jsonl");
    let user = r#"[{"role": "user", "content": "What is the capital of France?"}]"#;
    let open = r#"[{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "The capital of France is"}]"#;
    let lines = [
        format!(r#"{{"messages": {user}, "max_tokens": 1}}"#),
        format!(r#"{{"messages": {user}, "max_tokens": 1, "add_generation_prompt": false}}"#),
        format!(r#"{{"messages": {open}, "max_tokens": 3, "temperature": 0, "continue_final_message": true}}"#),
        format!(
            r#"{{"messages": {user}, "max_tokens": 1, "chat_template_kwargs": {{"enable_thinking": false}}, "tools": []}}"#
        ),
    ];
    std::fs::write(&input, lines.join("\n")).unwrap();
    let out = run_batch(&input, &output);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let recs = records(&output);
    let prompt_tokens = |i: usize| recs[i]["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(prompt_tokens(1) < prompt_tokens(0), "no assistant header: {} vs {}", prompt_tokens(1), prompt_tokens(0));
    assert!(recs[2]["text"].as_str().unwrap().contains("Paris"), "{}", recs[2]);
    assert_eq!(prompt_tokens(3), prompt_tokens(0), "{}", recs[3]);

    std::fs::write(&input, r#"{"prompt": "x", "add_generation_prompt": false}"#).unwrap();
    let out = run_batch(&input, &output);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("need \"messages\""),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `--embed` on the BERT encoder (`scripts/fetch-model.sh minilm`): Sentence-Transformers' vectors
/// (`tests/data/golden/minilm-embeddings.json`), the model's own mean pooling by default, and an
/// error record for an input past its 256 tokens while the others are written.
#[test]
fn embed_mode_writes_sentence_transformers_vectors() {
    let encoder = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.cache/models/all-MiniLM-L6-v2");
    assert!(encoder.exists(), "{} not found: run scripts/fetch-model.sh minilm", encoder.display());
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/data/golden/minilm-embeddings.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let record = &reference["records"][0];
    let dir = tempfile::tempdir().unwrap();
    let (input, output) = (dir.path().join("sentences.jsonl"), dir.path().join("vectors.jsonl"));
    let long = serde_json::json!({"prompt_token_ids": vec![1000; 300]});
    let lines = [
        serde_json::json!({"id": "cat", "prompt": record["text"]}),
        long,
        serde_json::json!({"prompt_token_ids": record["prompt_token_ids"]}),
    ];
    std::fs::write(&input, lines.map(|l| l.to_string()).join("\n")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_pdserve-batch"))
        .arg("--model")
        .arg(&encoder)
        .args(["--embed", "--no-progress", "--input"])
        .arg(&input)
        .arg("--output")
        .arg(&output)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run pdserve-batch");
    assert!(!out.status.success(), "a failed input makes the exit status 1");
    let recs = records(&output);
    assert_eq!(recs.len(), 3);
    let want: Vec<f64> = serde_json::from_value(record["embedding"].clone()).unwrap();
    for i in [0, 2] {
        let got: Vec<f64> = serde_json::from_value(recs[i]["embedding"].clone()).unwrap();
        let dot: f64 = got.iter().zip(&want).map(|(a, b)| a * b).sum();
        assert!(dot > 0.9999, "line {}: cosine {dot}", i + 1);
        assert_eq!(recs[i]["usage"]["prompt_tokens"], record["prompt_token_ids"].as_array().unwrap().len());
    }
    assert_eq!(recs[0]["id"], "cat");
    assert!(recs[1]["error"].as_str().is_some_and(|e| e.contains("300")), "{}", recs[1]);
}
