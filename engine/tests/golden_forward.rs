//! The forward pass against llama.cpp's greedy outputs (`tests/data/golden/`), and
//! batching/chunking invariants of the paged forward.
//!
//! Needs the model: `scripts/fetch-model.sh`, or `PDSERVE_MODEL=<gguf>`.

mod common;

use common::{agreement, argmax, blocks, default_model, golden, teacher_forced_logits};

use engine::{Forward, ForwardBatch, KvStorage};

const BLOCK_SIZE: usize = 16;

fn kv(num_blocks: usize) -> KvStorage {
    KvStorage::new(default_model().model.kv_shape(BLOCK_SIZE, num_blocks))
}

/// One forward step of one sequence whose prompt has `prompt_len` tokens.
fn step(kv: &mut KvStorage, tokens: &[u32], context_start: usize, prompt_len: usize, table: &[u32]) -> Vec<f32> {
    let mut batch = ForwardBatch::default();
    batch.push(tokens, context_start, prompt_len, table.to_vec(), true);
    default_model().model.forward(&batch, kv).unwrap().data
}

#[test]
fn teacher_forced_agreement_with_llama_cpp() {
    let (mut agree, mut total) = (0, 0);
    for r in golden() {
        let rows = teacher_forced_logits(&default_model().model, &r, r.completion.len().min(16));
        let (a, t) = agreement(&r, &rows);
        (agree, total) = (agree + a, total + t);
    }
    let rate = agree as f64 / total as f64;
    println!("teacher-forced agreement: {agree}/{total} = {:.1}%", rate * 100.0);
    assert!(rate >= 0.95, "agreement {:.1}% < 95%", rate * 100.0);
}

#[test]
fn greedy_capital_of_france_one_word() {
    let r = golden().into_iter().find(|r| r.id == "capital-france-one-word").expect("record");
    let loaded = default_model();
    let table = blocks(0, (r.prompt.len() + r.completion.len()).div_ceil(BLOCK_SIZE));
    let mut cache = kv(table.len());
    let mut logits = step(&mut cache, &r.prompt, 0, r.prompt.len(), &table);
    let mut out = Vec::new();
    while out.len() < r.completion.len() {
        let next = argmax(&logits);
        out.push(next);
        if loaded.info.eos_token_ids.contains(&next) {
            break;
        }
        logits = step(&mut cache, &[next], r.prompt.len() + out.len() - 1, r.prompt.len(), &table);
    }
    let text = loaded.tokenizer.decode(&out, true).unwrap();
    assert_eq!(text, "The capital of France is Paris.");
    assert_eq!(out, r.completion);
}

#[test]
fn mixed_batch_matches_sequences_run_alone() {
    let records = golden();
    let prompts: Vec<&[u32]> = records.iter().take(4).map(|r| r.prompt.as_slice()).collect();
    // Blocks per sequence: up to 128 tokens.
    let per_seq = 8;
    // Alone: prefill each prompt, then one decode step of a fixed token.
    let mut alone = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        let table = blocks((i * per_seq) as u32, per_seq);
        let mut cache = kv(prompts.len() * per_seq);
        let prefill = step(&mut cache, p, 0, p.len(), &table);
        let decode = step(&mut cache, &[argmax(&prefill)], p.len(), p.len(), &table);
        alone.push((argmax(&prefill), argmax(&decode), decode));
    }
    // Together: seq 0 prefills alone first; then one step mixes seq 0's
    // decode with the prefills of seqs 1..4.
    let mut cache = kv(prompts.len() * per_seq);
    let table = |i: usize| blocks((i * per_seq) as u32, per_seq);
    step(&mut cache, prompts[0], 0, prompts[0].len(), &table(0));
    let mut batch = ForwardBatch::default();
    batch.push(&[alone[0].0], prompts[0].len(), prompts[0].len(), table(0), true);
    for (i, p) in prompts.iter().enumerate().skip(1) {
        batch.push(p, 0, p.len(), table(i), true);
    }
    let logits = default_model().model.forward(&batch, &mut cache).unwrap();
    assert_eq!(logits.num_rows(), prompts.len());
    // Seq 0's decode row rode beside long prefills yet kept its own weight
    // path: its logits are the very numbers it gets alone.
    assert_eq!(logits.row(0), alone[0].2.as_slice(), "a decode row's logits depend on its batch");
    for (i, a) in alone.iter().enumerate().skip(1) {
        assert_eq!(argmax(logits.row(i)), a.0, "seq {i} prefill");
    }
    // Then seqs 1..4 decode together.
    let mut batch = ForwardBatch::default();
    for (i, p) in prompts.iter().enumerate().skip(1) {
        batch.push(&[alone[i].0], p.len(), p.len(), table(i), true);
    }
    let logits = default_model().model.forward(&batch, &mut cache).unwrap();
    for (i, a) in alone.iter().enumerate().skip(1) {
        let row = logits.row(i - 1);
        assert_eq!(argmax(row), a.1, "seq {i} decode");
        assert_eq!(row, a.2.as_slice(), "seq {i}: decode logits depend on the batch");
    }
}

#[test]
fn chunked_prefill_matches_one_chunk() {
    let r = &golden()[0];
    let table = blocks(0, r.prompt.len().div_ceil(BLOCK_SIZE));
    let mut cache = kv(table.len());
    let whole = step(&mut cache, &r.prompt, 0, r.prompt.len(), &table);
    // Split inside a block, so the second chunk starts mid-block.
    let split = 21;
    let mut cache = kv(table.len());
    let mut batch = ForwardBatch::default();
    batch.push(&r.prompt[..split], 0, r.prompt.len(), table.clone(), false);
    let none = default_model().model.forward(&batch, &mut cache).unwrap();
    assert_eq!(none.num_rows(), 0);
    let chunked = step(&mut cache, &r.prompt[split..], split, r.prompt.len(), &table);
    // Every row's numbers are independent of its chunk: prefix caching and
    // chunked prefill change no output.
    assert_eq!(whole, chunked, "chunked prefill changed the logits");
}

#[test]
fn invalid_batches_are_rejected() {
    let mut cache = kv(1);
    let mut batch = ForwardBatch::default();
    batch.push(&[1; 20], 0, 20, vec![0], true); // 20 tokens need 2 blocks of 16
    assert!(default_model().model.forward(&batch, &mut cache).is_err());
    let mut batch = ForwardBatch::default();
    batch.push(&[1], 0, 1, vec![5], true); // block id outside the cache
    assert!(default_model().model.forward(&batch, &mut cache).is_err());
    let mut batch = ForwardBatch::default();
    batch.push(&[u32::MAX], 0, 1, vec![0], true);
    assert!(default_model().model.forward(&batch, &mut cache).is_err());
}

/// CPU seconds this process has used (utime + stime, in 10 ms ticks):
/// unlike wall time, unaffected by other processes on a busy machine.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap().split_whitespace().collect();
    (fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap()) / 100.0
}

/// Rough throughput, wall and CPU time:
/// `cargo test --release -p engine --test golden_forward speed -- --ignored --nocapture`
/// (the bench command compares with llama.cpp).
#[test]
#[ignore = "timing, not a check"]
fn speed() {
    use std::time::Instant;
    let m = &default_model().model;
    let per_seq = 40;
    let report = |what: String, tokens: usize, wall: Instant, cpu: f64| {
        let (wall, cpu) = (wall.elapsed().as_secs_f64(), cpu_seconds() - cpu);
        println!("{what}: {:.0} tok/s wall, {:.0} tok per CPU second", tokens as f64 / wall, tokens as f64 / cpu);
    };
    for prompt_len in [128usize, 512] {
        let prompt: Vec<u32> = (0..prompt_len as u32).map(|i| 1000 + i * 7).collect();
        let mut cache = KvStorage::new(m.kv_shape(BLOCK_SIZE, per_seq));
        let mut batch = ForwardBatch::default();
        batch.push(&prompt, 0, prompt.len(), blocks(0, per_seq), true);
        m.forward(&batch, &mut cache).unwrap(); // warm-up
        let (wall, cpu) = (Instant::now(), cpu_seconds());
        let reps = 4;
        for _ in 0..reps {
            m.forward(&batch, &mut cache).unwrap();
        }
        report(format!("prefill {prompt_len}"), reps * prompt_len, wall, cpu);
    }
    let prompt: Vec<u32> = (0..128).map(|i| 1000 + i * 7).collect();
    for seqs in [1usize, 4, 16] {
        let steps = 64;
        let mut cache = KvStorage::new(m.kv_shape(BLOCK_SIZE, seqs * per_seq));
        let table = |i: usize| blocks((i * per_seq) as u32, per_seq);
        let mut batch = ForwardBatch::default();
        for i in 0..seqs {
            batch.push(&prompt, 0, prompt.len(), table(i), false);
        }
        m.forward(&batch, &mut cache).unwrap();
        let (wall, cpu) = (Instant::now(), cpu_seconds());
        for s in 0..steps {
            let mut batch = ForwardBatch::default();
            for i in 0..seqs {
                batch.push(&[1000 + s as u32], prompt.len() + s, prompt.len(), table(i), true);
            }
            m.forward(&batch, &mut cache).unwrap();
        }
        report(format!("decode batch {seqs}"), steps * seqs, wall, cpu);
    }
}
