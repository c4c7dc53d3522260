//! The architectures without a small real checkpoint here (qwen2, qwen3,
//! phi3), on tiny random-weight GGUFs against llama.cpp's logits on the same
//! files (`tests/data/tiny/`, written by its `make_tiny.py`): every
//! position's logits within the activations' quantization noise, the same
//! greedy token wherever llama.cpp's choice is clear, the `qwen2`
//! pre-tokenizer's ids equal to llama.cpp's, a tensor-parallel shard
//! computing what one rank does, and the same weights in a Hugging Face
//! folder (`<arch>-hf/`, Hugging Face's names, layout and config) loading
//! to the same model. Gemma 3 is here too, with a window of 8 positions that
//! the 24-token sequence crosses.

use std::path::PathBuf;

use candle_core::{DType, Device};
use engine::comm::cpu::CpuGroup;
use engine::forward::RankModel;
use engine::model::{DeviceLlama, Llama};
use engine::{Forward, ForwardBatch, KvStorage};
use serde_json::Value;

fn data() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/data/tiny")
}

fn reference() -> Value {
    serde_json::from_str(&std::fs::read_to_string(data().join("tiny-logits.json")).unwrap()).unwrap()
}

fn argmax(row: &[f32]) -> usize {
    (0..row.len()).fold(0, |best, i| if row[i] > row[best] { i } else { best })
}

fn margin(row: &[f32]) -> f32 {
    let best = argmax(row);
    let second = row.iter().enumerate().filter(|(i, _)| *i != best).map(|(_, &x)| x).fold(f32::MIN, f32::max);
    row[best] - second
}

const BLOCK_SIZE: usize = 4;

/// One prefill step of `sequence` asking for every position's logits, its
/// blocks in reverse order.
fn prefill(sequence: &[u32]) -> ForwardBatch {
    let mut batch = ForwardBatch::default();
    let table: Vec<u32> = (0..sequence.len().div_ceil(BLOCK_SIZE) as u32).rev().collect();
    batch.push(sequence, 0, sequence.len(), table, true);
    batch.score_last();
    batch
}

fn rows(data: Vec<f32>, vocab_size: usize) -> Vec<Vec<f32>> {
    data.chunks(vocab_size).map(<[f32]>::to_vec).collect()
}

/// Every position's logits of `sequence`.
fn logits(model: &Llama, sequence: &[u32]) -> Vec<Vec<f32>> {
    let mut kv = KvStorage::new(model.kv_shape(BLOCK_SIZE, sequence.len().div_ceil(BLOCK_SIZE)));
    rows(model.forward(&prefill(sequence), &mut kv).unwrap().data, model.config().vocab_size)
}

/// Every position's logits of `sequence` from `model`: the first `prefill`
/// tokens in one step, then one decode step per token, with `model`'s own
/// cache shape.
fn stepped_logits(model: &dyn Forward, kv: &mut KvStorage, sequence: &[u32], prefill: usize) -> Vec<Vec<f32>> {
    let table: Vec<u32> = (0..sequence.len().div_ceil(BLOCK_SIZE) as u32).rev().collect();
    let vocab = model.vocab_size();
    let mut batch = ForwardBatch::default();
    batch.push(&sequence[..prefill], 0, prefill, table.clone(), true);
    batch.score_last();
    let mut out = rows(model.forward(&batch, kv).unwrap().data, vocab);
    for p in prefill..sequence.len() {
        let mut batch = ForwardBatch::default();
        batch.push(&sequence[p..p + 1], p, prefill, table.clone(), true);
        out.extend(rows(model.forward(&batch, kv).unwrap().data, vocab));
    }
    out
}

/// The same with the model sharded over `world` CPU ranks (rank 0's logits).
fn sharded_logits(model: &Llama, world: usize, sequence: &[u32]) -> Vec<Vec<f32>> {
    let shards: Vec<Llama> = (0..world).map(|r| model.shard(r, world).unwrap()).collect();
    let batch = prefill(sequence);
    std::thread::scope(|s| {
        let ranks: Vec<_> = shards
            .iter()
            .zip(CpuGroup::ranks(world))
            .map(|(shard, comm)| {
                let batch = &batch;
                s.spawn(move || {
                    let mut kv = KvStorage::new(shard.kv_shape(BLOCK_SIZE, sequence.len().div_ceil(BLOCK_SIZE)));
                    shard.forward_rank(batch, &mut kv, &comm).unwrap().data
                })
            })
            .collect();
        let first = ranks.into_iter().map(|r| r.join().unwrap()).next().unwrap();
        rows(first, model.config().vocab_size)
    })
}

/// Holds `got` to `want` at every position: every logit within `tolerance`,
/// and the same greedy token wherever `want`'s choice is clear (a top-2
/// margin of 0.5 or more). Returns the largest difference and the number of
/// clear positions.
fn assert_matches(what: &str, got: &[Vec<f32>], want: &[Vec<f32>], tolerance: f32) -> (f32, usize) {
    assert_eq!(got.len(), want.len(), "{what}: positions");
    let (mut worst, mut clear) = (0.0f32, 0);
    for (p, (a, b)) in got.iter().zip(want).enumerate() {
        let diff = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
        worst = worst.max(diff);
        assert!(diff < tolerance, "{what}, position {p}: a logit differs by {diff} (tolerance {tolerance})");
        if margin(b) >= 0.5 {
            clear += 1;
            assert_eq!(argmax(a), argmax(b), "{what}, position {p}: the greedy token differs where it is clear");
        }
    }
    (worst, clear)
}

#[test]
fn tiny_models_of_each_architecture_match_llama_cpp() {
    let reference = reference();
    let sequence: Vec<u32> = serde_json::from_value(reference["sequence"].clone()).unwrap();
    for (arch, want) in reference["models"].as_object().unwrap() {
        let loaded = engine::model::load_gguf(&data().join(want["file"].as_str().unwrap())).unwrap();
        assert_eq!(format!("{:?}", loaded.model.config().arch).to_lowercase(), *arch);
        let theirs: Vec<Vec<f32>> = serde_json::from_value(want["logits"].clone()).unwrap();
        let scale = theirs.iter().flatten().fold(0.0f32, |m, x| m.max(x.abs()));
        // Both sides quantize activations to 8 bits per 32 values, llama.cpp
        // with f16 scales and this engine with f32 ones: noise of a percent.
        let tolerance = 0.02 * scale;
        let ours = logits(&loaded.model, &sequence);
        let (worst, clear) = assert_matches(&format!("{arch} GGUF against llama.cpp"), &ours, &theirs, tolerance);
        println!(
            "{arch}: largest logit difference {worst:.4} (logits up to {scale:.2}), {clear} clear positions equal"
        );
        assert!(clear >= sequence.len() / 2, "{arch}: only {clear} clear positions");

        for case in want["tokenizations"].as_array().unwrap() {
            let text = case["text"].as_str().unwrap();
            let ids: Vec<u32> = serde_json::from_value(case["token_ids"].clone()).unwrap();
            assert_eq!(loaded.tokenizer.encode(text, false).unwrap().get_ids(), ids, "{arch}: {text:?}");
        }

        // The Hugging Face folder: rotate-half Q/K rows, Gemma's norms
        // stored without their +1, fused Phi-3 matrices, f32 weights that
        // take candle's GEMM (no quantized activations).
        let hf = engine::model::load_hf(&data().join(format!("{arch}-hf")), &Default::default()).unwrap();
        assert_eq!(hf.model.config().arch, loaded.model.config().arch);
        let from_hf = logits(&hf.model, &sequence);
        let (worst, _) = assert_matches(&format!("{arch} HF folder against llama.cpp"), &from_hf, &theirs, tolerance);
        println!("{arch}: the Hugging Face folder's largest logit difference {worst:.4}");

        // The candle device path (on candle's CPU device here), prefilling
        // half and decoding the rest: the decode batch's window masks too.
        let device = DeviceLlama::new(&loaded.model, &Device::Cpu, DType::F32).unwrap();
        let mut kv = KvStorage::new(loaded.model.kv_shape(BLOCK_SIZE, sequence.len().div_ceil(BLOCK_SIZE)));
        let on_device = stepped_logits(&device, &mut kv, &sequence, sequence.len() / 2);
        let (worst, _) =
            assert_matches(&format!("{arch} device path against llama.cpp"), &on_device, &theirs, tolerance);
        println!("{arch}: the device path's largest logit difference {worst:.4}");

        // Two ranks (2 KV heads, 4 heads, 128 MLP columns split evenly).
        let sharded = sharded_logits(&loaded.model, 2, &sequence);
        assert_matches(&format!("{arch} on two ranks against one"), &sharded, &ours, tolerance);
    }
}
