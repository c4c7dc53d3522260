//! Gemma 3 270M (Q4_K_M) against llama.cpp's greedy outputs
//! (`tests/data/golden/gemma3-greedy.json`), teacher-forced.
//!
//! Needs the model: `scripts/fetch-model.sh gemma3`, or `PDSERVE_GEMMA3=<gguf>`.

mod common;

use common::{agreement, gemma_path as model_path, golden_file, teacher_forced_logits};

#[test]
fn teacher_forced_agreement_with_llama_cpp() {
    let model = engine::model::load_gguf_weights(&model_path()).unwrap();
    let (mut agree, mut total) = (0, 0);
    for r in golden_file("gemma3-greedy.json") {
        let (a, t) = agreement(&r, &teacher_forced_logits(&model, &r, r.completion.len()));
        (agree, total) = (agree + a, total + t);
    }
    let rate = agree as f64 / total as f64;
    println!("Gemma 3: teacher-forced agreement with llama.cpp {agree}/{total} = {:.1}%", rate * 100.0);
    assert!(rate >= 0.95, "agreement {:.1}% < 95%", rate * 100.0);
}
