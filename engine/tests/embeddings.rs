//! Embeddings on the real model: a prompt's final hidden states (after the output norm) pooled by
//! its last token or by the mean, against llama.cpp's (`tests/data/golden/smollm2-embeddings.json`,
//! made by `make_embeddings.py` beside it).
//!
//! Needs the model: `scripts/fetch-model.sh`, or `PDSERVE_MODEL=<gguf>` (with its own reference file
//! in `PDSERVE_EMBEDDINGS`).

mod common;

use std::path::PathBuf;
use std::sync::Arc;

use engine::{Engine, EngineConfig, EngineError, EngineEvent, EngineHandle, EngineRequest, FinishReason, Pooling};

const BLOCK_SIZE: usize = 16;

/// One sentence of the reference file: its token ids and llama.cpp's normalized embeddings.
struct Reference {
    text: String,
    prompt: Vec<u32>,
    last: Vec<f32>,
    mean: Vec<f32>,
}

fn references() -> Vec<Reference> {
    let path = std::env::var_os("PDSERVE_EMBEDDINGS").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/data/golden/smollm2-embeddings.json")
    });
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let json: serde_json::Value = serde_json::from_str(&text).expect("reference JSON");
    let ids = |r: &serde_json::Value| -> Vec<u32> { serde_json::from_value(r["prompt_token_ids"].clone()).unwrap() };
    let vector = |r: &serde_json::Value, name: &str| -> Vec<f32> { serde_json::from_value(r[name].clone()).unwrap() };
    json["records"]
        .as_array()
        .expect("records")
        .iter()
        .map(|r| Reference {
            text: r["text"].as_str().expect("text").to_string(),
            prompt: ids(r),
            last: vector(r, "last"),
            mean: vector(r, "mean"),
        })
        .collect()
}

fn start(max_num_batched_tokens: usize) -> EngineHandle {
    let loaded = engine::model::load_gguf(&common::model_path()).expect("loading the model");
    let shape = loaded.model.kv_shape(BLOCK_SIZE, 64);
    let config = EngineConfig {
        max_num_seqs: 8,
        max_num_batched_tokens,
        max_model_len: 512,
        eos_token_ids: loaded.info.eos_token_ids.clone(),
        default_seed: 0,
        enable_prefix_caching: true,
        speculative: None,
    };
    Engine::start(Arc::new(loaded.model), shape, config)
}

/// The pooled vector of one request, checking that it then finishes with no token.
fn embed(engine: &EngineHandle, request: EngineRequest) -> Vec<f32> {
    embed_counting_cached(engine, request).0
}

/// [`embed`], with the prompt tokens that came from the prefix cache.
fn embed_counting_cached(engine: &EngineHandle, request: EngineRequest) -> (Vec<f32>, usize) {
    let id = request.request_id.clone();
    let mut events = engine.submit(request).unwrap_or_else(|e| panic!("{id}: {e}"));
    let mut pooled = None;
    loop {
        match events.blocking_recv().expect("a final event") {
            EngineEvent::Embedding(v) => assert!(pooled.replace(v).is_none(), "{id}: two embeddings"),
            EngineEvent::Finished { reason, num_cached_tokens, .. } => {
                assert_eq!(reason, FinishReason::Stop, "{id}");
                return (pooled.unwrap_or_else(|| panic!("{id}: finished without an embedding")), num_cached_tokens);
            }
            EngineEvent::Token { .. } => panic!("{id}: an embedding request generated a token"),
            EngineEvent::PromptLogprobs { .. } => panic!("{id}: prompt logprobs were not asked for"),
            EngineEvent::Error(e) => panic!("{id}: {e}"),
        }
    }
}

fn normalized(v: &[f32]) -> Vec<f32> {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter().map(|x| x / norm).collect()
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "dimensions");
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    dot / (a.iter().map(|x| x * x).sum::<f32>().sqrt() * b.iter().map(|x| x * x).sum::<f32>().sqrt())
}

/// llama.cpp quantizes activations as the engine does but sums in another order: the vectors
/// agree to float noise, far closer than two different sentences (about 0.8 here).
const SAME: f32 = 0.999;

#[test]
fn last_token_and_mean_embeddings_match_llama_cpp() {
    let engine = start(2048);
    let refs = references();
    for (i, r) in refs.iter().enumerate() {
        let last = embed(&engine, EngineRequest::embedding(format!("last-{i}"), r.prompt.clone(), Pooling::Last));
        let mean = embed(&engine, EngineRequest::embedding(format!("mean-{i}"), r.prompt.clone(), Pooling::Mean));
        let (c_last, c_mean) = (cosine(&normalized(&last), &r.last), cosine(&normalized(&mean), &r.mean));
        eprintln!("{:?}: cosine to llama.cpp last {c_last:.6}, mean {c_mean:.6}", r.text);
        assert!(c_last >= SAME, "{:?}: last-token embedding at cosine {c_last} to llama.cpp's", r.text);
        assert!(c_mean >= SAME, "{:?}: mean embedding at cosine {c_mean} to llama.cpp's", r.text);
    }
    // The ranking a retrieval would make: the paraphrase is nearest to the first sentence.
    let ours: Vec<Vec<f32>> = refs
        .iter()
        .enumerate()
        .map(|(i, r)| embed(&engine, EngineRequest::embedding(format!("rank-{i}"), r.prompt.clone(), Pooling::Last)))
        .collect();
    let nearest = (1..ours.len()).max_by(|&a, &b| cosine(&ours[0], &ours[a]).total_cmp(&cosine(&ours[0], &ours[b])));
    assert_eq!(nearest, Some(1), "{:?} is not nearest to {:?}", refs[1].text, refs[0].text);
    engine.sync();
    let stats = engine.stats();
    assert_eq!(stats.free_blocks, stats.total_blocks, "embedding requests leave no block held: {stats:?}");
}

#[test]
fn a_prompt_pooled_over_chunks_or_after_a_cache_hit_gives_the_same_vector() {
    // 20 tokens a step: a 70-token prompt is prefilled in four chunks.
    let chunked = start(20);
    let whole = start(2048);
    let prompt: Vec<u32> = references().iter().cycle().flat_map(|r| r.prompt.clone()).take(70).collect();
    assert_eq!(prompt.len(), 70);
    for pooling in [Pooling::Last, Pooling::Mean, Pooling::Cls] {
        let one = embed(&whole, EngineRequest::embedding("whole", prompt.clone(), pooling));
        let four = embed(&chunked, EngineRequest::embedding("chunked", prompt.clone(), pooling));
        let c = cosine(&one, &four);
        assert!(c >= 0.9999, "{pooling:?}: chunked prefill at cosine {c} to one pass");
        // Again on the engine that has the prompt's full blocks cached: last-token pooling
        // reuses them (the last token is computed anyway); mean and first-token pooling need
        // every token's state, so they compute the prompt whole.
        let (again, cached) = embed_counting_cached(&whole, EngineRequest::embedding("again", prompt.clone(), pooling));
        assert_eq!(cached, if pooling == Pooling::Last { 64 } else { 0 }, "{pooling:?}: cached prompt tokens");
        let c = cosine(&one, &again);
        assert!(c >= 0.9999, "{pooling:?}: after a cache hit at cosine {c} to the first pass");
    }
}

#[test]
fn an_embedding_request_asking_for_generation_features_is_refused() {
    let engine = start(2048);
    let prompt = vec![1, 2, 3];
    let two = EngineRequest { n: 2, ..EngineRequest::embedding("two", prompt.clone(), Pooling::Last) };
    assert!(matches!(engine.submit(two), Err(EngineError::InvalidEmbedding(_))));
    let pinned = EngineRequest { pin_on_finish: true, ..EngineRequest::embedding("pin", prompt, Pooling::Last) };
    assert!(matches!(engine.submit(pinned), Err(EngineError::InvalidEmbedding(_))));
}

/// The offline `Llm::encode`, from text: the tokenizer gives llama.cpp's ids, and the vectors
/// its embeddings, unit length.
#[test]
fn offline_encode_embeds_texts_as_llama_cpp_does() {
    use engine::offline::{Llm, LlmConfig, Prompt};
    let loaded = engine::model::load_gguf(&common::model_path()).expect("loading the model");
    let llm = Llm::new(loaded, LlmConfig::default()).expect("an engine");
    let refs = references();
    for r in &refs {
        let ids = llm.prompt_ids(&engine::offline::Input::Prompt(Prompt::Text(r.text.clone()))).unwrap();
        assert_eq!(ids, r.prompt, "{:?}: token ids", r.text);
    }
    let prompts = refs.iter().map(|r| Prompt::Text(r.text.clone())).collect();
    let vectors = llm.encode(prompts, Pooling::Last, true).expect("embeddings");
    assert_eq!(vectors.len(), refs.len());
    for (v, r) in vectors.iter().zip(&refs) {
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "{:?}: norm {norm}", r.text);
        let c = cosine(v, &r.last);
        assert!(c >= SAME, "{:?}: cosine {c} to llama.cpp's", r.text);
    }
}
