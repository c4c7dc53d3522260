//! Gemma 3 270M (Q4_K_M) against llama.cpp's greedy outputs
//! (`tests/data/golden/gemma3-greedy.json`), teacher-forced.
//!
//! Needs the model: `scripts/fetch-model.sh gemma3`, or `PDSERVE_GEMMA3=<gguf>`.

mod common;

use std::path::PathBuf;

use common::{argmax, blocks, golden_file};
use engine::{Forward, ForwardBatch, KvStorage};

fn model_path() -> PathBuf {
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

#[test]
fn teacher_forced_agreement_with_llama_cpp() {
    let model = engine::model::load_gguf_weights(&model_path()).unwrap();
    const BLOCK_SIZE: usize = 16;
    let (mut agree, mut total) = (0, 0);
    for r in golden_file("gemma3-greedy.json") {
        let steps = r.completion.len();
        let table = blocks(0, (r.prompt.len() + steps).div_ceil(BLOCK_SIZE));
        let mut kv = KvStorage::new(model.kv_shape(BLOCK_SIZE, table.len()));
        let mut step = |tokens: &[u32], start: usize| {
            let mut batch = ForwardBatch::default();
            batch.push(tokens, start, r.prompt.len(), table.clone(), true);
            model.forward(&batch, &mut kv).unwrap().data
        };
        let mut logits = step(&r.prompt, 0);
        let mut misses = Vec::new();
        for k in 0..steps {
            if r.margins[k] >= 0.5 {
                total += 1;
                let got = argmax(&logits);
                if got == r.completion[k] {
                    agree += 1;
                } else {
                    misses.push((k, got, r.completion[k]));
                }
            }
            if k + 1 < steps {
                logits = step(&r.completion[k..k + 1], r.prompt.len() + k);
            }
        }
        if !misses.is_empty() {
            println!("{}: (position, ours, llama.cpp) differ at {misses:?}", r.id);
        }
    }
    let rate = agree as f64 / total as f64;
    println!("Gemma 3: teacher-forced agreement with llama.cpp {agree}/{total} = {:.1}%", rate * 100.0);
    assert!(rate >= 0.95, "agreement {:.1}% < 95%", rate * 100.0);
}
