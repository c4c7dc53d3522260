//! What the model tests share: where the model and llama.cpp's reference
//! outputs are.

use std::path::PathBuf;

/// The default GGUF (`scripts/fetch-model.sh`), or `PDSERVE_MODEL`.
pub fn model_path() -> PathBuf {
    let path = std::env::var_os("PDSERVE_MODEL").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf")
    });
    assert!(path.exists(), "model {} not found: run scripts/fetch-model.sh or set PDSERVE_MODEL", path.display());
    path
}

/// Gemma 3 270M (`scripts/fetch-model.sh gemma3`), or `PDSERVE_GEMMA3`.
#[allow(dead_code)]
pub fn gemma_path() -> PathBuf {
    let path = std::env::var_os("PDSERVE_GEMMA3")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.cache/models/gemma-3-270m-q4_k_m.gguf"));
    assert!(
        path.exists(),
        "model {} not found: run scripts/fetch-model.sh gemma3 or set PDSERVE_GEMMA3",
        path.display()
    );
    path
}

/// The default model, loaded once per test binary.
#[allow(dead_code)]
pub fn default_model() -> &'static engine::model::LoadedModel {
    static MODEL: std::sync::OnceLock<engine::model::LoadedModel> = std::sync::OnceLock::new();
    MODEL.get_or_init(|| {
        let path = model_path();
        engine::model::load_gguf(&path).unwrap_or_else(|e| panic!("loading {}: {e}", path.display()))
    })
}

/// One reference record of `tests/data/golden/smollm2-greedy.json`.
#[allow(dead_code)] // each test binary reads the fields it needs
pub struct Record {
    pub id: String,
    pub prompt: Vec<u32>,
    pub completion: Vec<u32>,
    pub margins: Vec<f64>,
}

/// llama.cpp's greedy outputs for the default model (`tests/data/golden/`), or `PDSERVE_GOLDEN`.
#[allow(dead_code)]
pub fn golden() -> Vec<Record> {
    let path = std::env::var_os("PDSERVE_GOLDEN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/data/golden/smollm2-greedy.json"));
    read_golden(&path)
}

/// `tests/data/golden/<name>`.
#[allow(dead_code)]
pub fn golden_file(name: &str) -> Vec<Record> {
    read_golden(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/data/golden").join(name))
}

fn read_golden(path: &std::path::Path) -> Vec<Record> {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("golden file {}: {e} (set PDSERVE_GOLDEN)", path.display()));
    let json: serde_json::Value = serde_json::from_str(&text).expect("golden JSON");
    let ids = |v: &serde_json::Value| -> Vec<u32> { serde_json::from_value(v.clone()).unwrap() };
    json["records"]
        .as_array()
        .expect("records")
        .iter()
        .map(|r| Record {
            id: r["id"].as_str().unwrap().to_string(),
            prompt: ids(&r["prompt_token_ids"]),
            completion: ids(&r["completion_token_ids"]),
            margins: serde_json::from_value(r["top2_margins"].clone()).unwrap(),
        })
        .collect()
}

/// The id of the largest logit.
#[allow(dead_code)]
pub fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x > row[best] {
            best = i;
        }
    }
    best as u32
}

/// One sequence's blocks: `first..first + n`.
#[allow(dead_code)]
pub fn blocks(first: u32, n: usize) -> Vec<u32> {
    (first..first + n as u32).collect()
}

/// A greedy request for `max_tokens` that computes its own prompt.
#[allow(dead_code)]
pub fn greedy_request(id: &str, prompt: &[u32], max_tokens: u32) -> engine::EngineRequest {
    engine::EngineRequest::generate(id, prompt.to_vec(), engine::SamplingParams::greedy(max_tokens))
}

/// The logits `model` gives teacher-forced along a golden record: after its
/// prompt, then after each of its first `steps - 1` completion tokens, so
/// row `k` predicts `completion[k]`. The block table runs backwards, so that
/// logical and physical block order differ.
#[allow(dead_code)]
pub fn teacher_forced_logits(model: &engine::model::Llama, r: &Record, steps: usize) -> Vec<Vec<f32>> {
    use engine::{Forward, ForwardBatch, KvStorage};
    const BLOCK_SIZE: usize = 16;
    let mut table = blocks(0, (r.prompt.len() + steps).div_ceil(BLOCK_SIZE));
    table.reverse();
    let mut kv = KvStorage::new(model.kv_shape(BLOCK_SIZE, table.len()));
    let mut step = |tokens: &[u32], start: usize| {
        let mut batch = ForwardBatch::default();
        batch.push(tokens, start, r.prompt.len(), table.clone(), true);
        model.forward(&batch, &mut kv).unwrap().data
    };
    let mut rows = vec![step(&r.prompt, 0)];
    for k in 0..steps.saturating_sub(1) {
        rows.push(step(&r.completion[k..k + 1], r.prompt.len() + k));
    }
    rows
}

/// `(agreed, clear)`: how many of the record's clear positions (llama.cpp's
/// top-2 margin >= 0.5) the rows' greedy choice matches; prints the misses.
#[allow(dead_code)]
pub fn agreement(r: &Record, rows: &[Vec<f32>]) -> (usize, usize) {
    let mut misses = Vec::new();
    let (mut agreed, mut clear) = (0, 0);
    for (k, row) in rows.iter().enumerate().filter(|(k, _)| r.margins[*k] >= 0.5) {
        clear += 1;
        let got = argmax(row);
        if got == r.completion[k] {
            agreed += 1;
        } else {
            misses.push((k, got, r.completion[k]));
        }
    }
    if !misses.is_empty() {
        println!("{}: (position, ours, llama.cpp) differ at {misses:?}", r.id);
    }
    (agreed, clear)
}
