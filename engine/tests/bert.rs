//! A BERT encoder, all-MiniLM-L6-v2 from its Sentence-Transformers folder, against
//! Sentence-Transformers' own embeddings (`tests/data/golden/minilm-embeddings.json`, made by
//! `make_minilm_embeddings.py` beside it): the same token ids, the folder's mean pooling, and
//! vectors at cosine ≥ 0.9999.
//!
//! Needs the model: `scripts/fetch-model.sh minilm`, or `PDSERVE_ENCODER=<folder>`.

use std::path::PathBuf;

use engine::model::{load, LoadOptions, Model};
use engine::offline::{Input, Llm, LlmConfig, OfflineError, Prompt};
use engine::{Pooling, SamplingParams};

/// Sentence-Transformers' vectors, normalized: the same model gives cosine 1 - ε (float noise).
const SAME: f32 = 0.9999;

fn model_dir() -> PathBuf {
    std::env::var_os("PDSERVE_ENCODER")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.cache/models/all-MiniLM-L6-v2"))
}

fn reference() -> serde_json::Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/data/golden/minilm-embeddings.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("reference JSON")
}

fn floats(v: &serde_json::Value) -> Vec<f32> {
    serde_json::from_value(v.clone()).expect("a list of numbers")
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (norm(a) * norm(b))
}

fn llm() -> Llm {
    let dir = model_dir();
    let loaded = load(&dir, &LoadOptions::default()).unwrap_or_else(|e| panic!("loading {}: {e}", dir.display()));
    assert!(matches!(loaded.model, Model::Bert(_)), "a BertModel folder loads as an encoder");
    assert!(loaded.info.encoder);
    assert_eq!(loaded.info.pooling, Some(Pooling::Mean), "1_Pooling/config.json names mean pooling");
    assert_eq!(loaded.info.context_length, 256, "sentence_bert_config.json's max_seq_length");
    assert_eq!(loaded.info.embedding_size, 384);
    Llm::new(loaded, LlmConfig { max_num_batched_tokens: 512, ..LlmConfig::default() }).expect("an engine")
}

/// Every sentence, batched together: [CLS] … [SEP] ids as the folder's tokenizer gives them, and
/// Sentence-Transformers' vectors.
#[test]
fn minilm_embeds_as_sentence_transformers_does() {
    let llm = llm();
    assert_eq!(llm.default_pooling(), Pooling::Mean);
    let reference = reference();
    let records = reference["records"].as_array().expect("records");
    let texts: Vec<String> = records.iter().map(|r| r["text"].as_str().expect("text").to_string()).collect();
    for (text, r) in texts.iter().zip(records) {
        let ids = llm.prompt_ids(&Input::Prompt(Prompt::Text(text.clone()))).unwrap();
        let want: Vec<u32> = serde_json::from_value(r["prompt_token_ids"].clone()).unwrap();
        assert_eq!(ids, want, "{text:?}: token ids");
    }
    let vectors = llm.encode(texts.iter().cloned().map(Prompt::Text).collect(), Pooling::Mean, true).unwrap();
    let mut lowest = f32::INFINITY;
    for ((v, r), text) in vectors.iter().zip(records).zip(&texts) {
        assert_eq!(v.len(), 384);
        let c = cosine(v, &floats(&r["embedding"]));
        assert!(c >= SAME, "{text:?}: cosine {c} to Sentence-Transformers'");
        lowest = lowest.min(c);
    }
    eprintln!("lowest cosine to Sentence-Transformers': {lowest}");
    // Different sentences are far apart, so the bound above tells a wrong model from a right one.
    let apart = cosine(&vectors[0], &vectors[2]);
    assert!(apart < 0.5, "unrelated sentences at cosine {apart}");

    // Alone, each gives what it gave batched: a row never depends on the others.
    let alone = llm.encode(vec![Prompt::Text(texts[6].clone())], Pooling::Mean, true).unwrap();
    let c = cosine(&alone[0], &vectors[6]);
    assert!(c > 0.999_999, "batched vs alone: cosine {c}");
}

/// The rerank set: the query's cosine to each document orders them as Sentence-Transformers'.
#[test]
fn minilm_ranks_documents_as_sentence_transformers_does() {
    let llm = llm();
    let rerank = &reference()["rerank"];
    let query = rerank["query"].as_str().unwrap().to_string();
    let documents: Vec<String> =
        rerank["documents"].as_array().unwrap().iter().map(|d| d.as_str().unwrap().to_string()).collect();
    let want = floats(&rerank["scores"]);
    let inputs = std::iter::once(query).chain(documents).map(Prompt::Text).collect();
    let vectors = llm.encode(inputs, llm.default_pooling(), true).unwrap();
    let scores: Vec<f32> = vectors[1..].iter().map(|d| cosine(&vectors[0], d)).collect();
    for (got, want) in scores.iter().zip(&want) {
        assert!((got - want).abs() < 1e-3, "score {got}, Sentence-Transformers' {want}");
    }
    let order = |s: &[f32]| {
        let mut idx: Vec<usize> = (0..s.len()).collect();
        idx.sort_by(|&a, &b| s[b].total_cmp(&s[a]));
        idx
    };
    assert_eq!(order(&scores), order(&want));
}

/// An encoder embeds only: generation is refused at submit, and so is a prompt past its length.
#[test]
fn an_encoder_refuses_generation_and_overlong_prompts() {
    let llm = llm();
    let err = llm.generate(vec![Prompt::Text("Hello".into())], &SamplingParams::greedy(4)).unwrap_err();
    let OfflineError::Request { source, .. } = err else { panic!("a per-request error, got {err}") };
    assert!(matches!(*source, OfflineError::Rejected(engine::EngineError::EncoderOnly)), "{source}");
    let long = Prompt::TokenIds(vec![1000; 257]);
    assert!(llm.encode(vec![long], Pooling::Mean, true).is_err(), "257 tokens exceed max_seq_length 256");
    let full = Prompt::TokenIds([101].into_iter().chain(vec![1000; 254]).chain([102]).collect());
    assert_eq!(llm.encode(vec![full], Pooling::Mean, true).unwrap()[0].len(), 384, "256 tokens fit");
}
