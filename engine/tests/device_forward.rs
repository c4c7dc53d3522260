//! The forward pass on candle tensors ([`DeviceLlama`]), here on candle's CPU
//! device: llama.cpp's greedy outputs (`tests/data/golden/`), the engine's own
//! kernels, batching and chunking, and the device mirror of the KV cache.
//! The same code runs on a GPU with `--features cuda` (`PDSERVE_TEST_DEVICE=cuda`
//! runs these tests there).
//!
//! Needs the model: `scripts/fetch-model.sh`, or `PDSERVE_MODEL=<gguf>`.

mod common;

use std::sync::{Arc, OnceLock};

use candle_core::DType;
use common::{argmax, blocks, default_model, golden, greedy_request as request};
use engine::model::{ComputeDevice, DeviceLlama};
use engine::{
    Engine, EngineConfig, EngineEvent, EngineRequest, Forward, ForwardBatch, KvCacheShape, KvLanding, KvReservation,
    KvSource, KvStorage, NgramLookup, SpeculationStats, SpeculativeConfig, SpeculativeMethod, TokenLogprobs,
};
use tokio::sync::mpsc::UnboundedReceiver;

const BLOCK_SIZE: usize = 16;

fn on_cuda() -> bool {
    std::env::var("PDSERVE_TEST_DEVICE").is_ok_and(|d| d == "cuda")
}

/// The weights' dtype on the device under test.
fn device_dtype() -> DType {
    if on_cuda() {
        DType::BF16
    } else {
        DType::F32
    }
}

/// The device under test: the CPU in f32, or the first GPU in bf16 when
/// `PDSERVE_TEST_DEVICE=cuda`. Shared by the tests that only compare logits:
/// its mirror follows whichever test's cache stepped last.
fn device_model() -> &'static DeviceLlama {
    static MODEL: OnceLock<DeviceLlama> = OnceLock::new();
    MODEL.get_or_init(own_device_model)
}

/// A model of its own on the device under test, for a test that checks what
/// its mirror keeps between steps (the shared one is rebuilt whenever another
/// test steps it on another cache).
fn own_device_model() -> DeviceLlama {
    let device = if on_cuda() { ComputeDevice::Cuda(0) } else { ComputeDevice::Cpu };
    let device = device.candle().expect("the device under test");
    DeviceLlama::new(&default_model().model, &device, device_dtype()).expect("copying the model to the device")
}

fn kv(num_blocks: usize) -> KvStorage {
    KvStorage::new(default_model().model.kv_shape(BLOCK_SIZE, num_blocks))
}

/// The gap between the best and the second-best logit.
fn margin(row: &[f32]) -> f32 {
    let best = argmax(row) as usize;
    let second = row.iter().enumerate().filter(|&(i, _)| i != best).map(|(_, &x)| x).fold(f32::MIN, f32::max);
    row[best] - second
}

fn softmax(row: &[f32]) -> Vec<f32> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exp: Vec<f32> = row.iter().map(|x| (x - max).exp()).collect();
    let sum: f32 = exp.iter().sum();
    exp.into_iter().map(|e| e / sum).collect()
}

/// How much probability mass moves between the two rows' next-token
/// distributions (total variation distance, 0 to 1).
fn total_variation(a: &[f32], b: &[f32]) -> f32 {
    softmax(a).iter().zip(softmax(b)).map(|(p, q)| (p - q).abs()).sum::<f32>() / 2.0
}

fn step(
    model: &dyn Forward,
    kv: &mut KvStorage,
    tokens: &[u32],
    context_start: usize,
    prompt_len: usize,
    table: &[u32],
) -> Vec<f32> {
    let mut batch = ForwardBatch::default();
    batch.push(tokens, context_start, prompt_len, table.to_vec(), true);
    model.forward(&batch, kv).unwrap().data
}

/// Teacher-forced over the golden records: llama.cpp's token wherever its
/// choice was clear, and the engine's CPU kernels' choice wherever theirs
/// was. The two differ in more than rounding: the kernels quantize each
/// activation row to 8 bits (as llama.cpp does), this path multiplies in f32;
/// so their next-token distributions are compared with a tolerance that
/// covers that (measured: at most 15% of the probability mass moves, at a
/// near-tie). The exact check
/// of this path is `hf_safetensors`' `the_device_forward_matches_the_reference`
/// (1e-4 against an f64 reference).
#[test]
fn matches_llama_cpp_and_the_cpu_kernels() {
    let device = device_model();
    let cpu = &default_model().model;
    let (mut agree, mut total, mut largest) = (0, 0, 0.0f32);
    let mut differ = Vec::new();
    for r in golden() {
        let steps = r.completion.len().min(16);
        let mut table = blocks(0, (r.prompt.len() + steps).div_ceil(BLOCK_SIZE));
        table.reverse();
        let (mut dev_kv, mut cpu_kv) = (kv(table.len()), kv(table.len()));
        for k in 0..=steps {
            let (tokens, start) = match k {
                0 => (&r.prompt[..], 0),
                _ => (&r.completion[k - 1..k], r.prompt.len() + k - 1),
            };
            let got = step(device, &mut dev_kv, tokens, start, r.prompt.len(), &table);
            let want = step(cpu, &mut cpu_kv, tokens, start, r.prompt.len(), &table);
            largest = largest.max(total_variation(&got, &want));
            if margin(&want) >= 0.5 && argmax(&got) != argmax(&want) {
                differ.push((r.id.clone(), k));
            }
            if k < steps && r.margins[k] >= 0.5 {
                total += 1;
                agree += usize::from(argmax(&got) == r.completion[k]);
            }
        }
    }
    let rate = agree as f64 / total as f64;
    println!("teacher-forced agreement with llama.cpp: {agree}/{total} = {:.1}%", rate * 100.0);
    println!("largest total variation distance from the CPU kernels' distribution: {largest:.4}");
    assert!(rate >= 0.95, "agreement {:.1}% < 95%", rate * 100.0);
    assert!(differ.is_empty(), "greedy tokens differ from the CPU kernels' clear choices at {differ:?}");
    assert!(largest < 0.25, "{:.0}% of a next-token distribution moved", largest * 100.0);
}

#[test]
fn greedy_capital_of_france_one_word() {
    let r = golden().into_iter().find(|r| r.id == "capital-france-one-word").expect("record");
    let model = device_model();
    let table = blocks(0, (r.prompt.len() + r.completion.len()).div_ceil(BLOCK_SIZE));
    let mut cache = kv(table.len());
    let mut logits = step(model, &mut cache, &r.prompt, 0, r.prompt.len(), &table);
    let mut out = Vec::new();
    while out.len() < r.completion.len() {
        let next = argmax(&logits);
        out.push(next);
        if default_model().info.eos_token_ids.contains(&next) {
            break;
        }
        logits = step(model, &mut cache, &[next], r.prompt.len() + out.len() - 1, r.prompt.len(), &table);
    }
    assert_eq!(default_model().tokenizer.decode(&out, true).unwrap(), "The capital of France is Paris.");
}

/// How far two computations of the same logits may be apart when only the
/// batch around them differs: f32 rounding on the CPU. On a GPU the bf16
/// GEMMs round every projection's output to 8 bits of mantissa, and cuBLAS
/// may pick another algorithm for another batch shape.
fn batch_tolerance() -> f32 {
    if on_cuda() {
        0.25
    } else {
        1e-3
    }
}

fn assert_close(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let tolerance = batch_tolerance();
    let diff = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(diff < tolerance, "{what}: logits differ by {diff}");
    // A near-tie within the rounding may flip on a GPU; on the CPU every choice counts.
    if !on_cuda() || margin(want) > 2.0 * tolerance {
        assert_eq!(argmax(got), argmax(want), "{what}: greedy token");
    }
}

/// A mixed step (two decodes between two prefills), then a decode batch of
/// contexts of different lengths, give each sequence what it gets alone; a
/// prefill split mid-block gives what one chunk does.
#[test]
fn batching_and_chunking_change_no_row() {
    let model = device_model();
    let records = golden();
    let prompts: Vec<&[u32]> = records.iter().take(4).map(|r| r.prompt.as_slice()).collect();
    let lens: Vec<usize> = prompts.iter().map(|p| p.len()).collect();
    assert!(lens[1..].iter().any(|&l| l != lens[1]), "the decode batch needs contexts of different lengths: {lens:?}");
    let per_seq = 8;
    let table = |i: usize| blocks((i * per_seq) as u32, per_seq);
    let mut alone = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        let mut cache = kv(prompts.len() * per_seq);
        let prefill = step(model, &mut cache, p, 0, p.len(), &table(i));
        let decode = step(model, &mut cache, &[argmax(&prefill)], p.len(), p.len(), &table(i));
        alone.push((prefill, decode));
    }
    let decode_of = |i: usize, batch: &mut ForwardBatch| {
        batch.push(&[argmax(&alone[i].0)], prompts[i].len(), prompts[i].len(), table(i), true);
    };
    let prefill_of = |i: usize, batch: &mut ForwardBatch| batch.push(prompts[i], 0, prompts[i].len(), table(i), true);

    let mut cache = kv(prompts.len() * per_seq);
    for (i, p) in prompts.iter().enumerate().take(2) {
        step(model, &mut cache, p, 0, p.len(), &table(i));
    }
    let mut batch = ForwardBatch::default();
    prefill_of(2, &mut batch);
    decode_of(0, &mut batch);
    decode_of(1, &mut batch);
    prefill_of(3, &mut batch);
    let logits = model.forward(&batch, &mut cache).unwrap();
    assert_close(logits.row(0), &alone[2].0, "seq 2 prefill before two decodes");
    assert_close(logits.row(1), &alone[0].1, "seq 0 decode between prefills");
    assert_close(logits.row(2), &alone[1].1, "seq 1 decode between prefills");
    assert_close(logits.row(3), &alone[3].0, "seq 3 prefill after two decodes");

    let mut batch = ForwardBatch::default();
    for i in 1..prompts.len() {
        decode_of(i, &mut batch);
    }
    let mut cache = kv(prompts.len() * per_seq);
    for (i, p) in prompts.iter().enumerate().skip(1) {
        step(model, &mut cache, p, 0, p.len(), &table(i));
    }
    let logits = model.forward(&batch, &mut cache).unwrap();
    for (i, (_, decode)) in alone.iter().enumerate().skip(1) {
        assert_close(logits.row(i - 1), decode, &format!("seq {i} decode in a batch"));
    }

    let p = prompts[0];
    let split = 21;
    let mut cache = kv(per_seq);
    let mut batch = ForwardBatch::default();
    batch.push(&p[..split], 0, p.len(), table(0), false);
    assert_eq!(model.forward(&batch, &mut cache).unwrap().num_rows(), 0);
    let chunked = step(model, &mut cache, &p[split..], split, p.len(), &table(0));
    assert_close(&chunked, &alone[0].0, "a prefill in two chunks");
}

/// Attention in tiles (a prefill's query rows, a decode batch's sequences)
/// gives what one product gives.
#[test]
fn attention_in_tiles_changes_no_row() {
    let records = golden();
    let prompts: Vec<&[u32]> = records.iter().take(3).map(|r| r.prompt.as_slice()).collect();
    let longest = prompts.iter().map(|p| p.len() + 1).max().unwrap();
    // Two query rows, or two sequences, per product.
    let heads = default_model().model.config().num_heads;
    let tiled = own_device_model().with_max_attention_scores(2 * heads * longest);
    let per_seq = 8;
    let table = |i: usize| blocks((i * per_seq) as u32, per_seq);
    let run = |model: &DeviceLlama| {
        let mut cache = kv(prompts.len() * per_seq);
        let mut prefill = ForwardBatch::default();
        for (i, p) in prompts.iter().enumerate() {
            prefill.push(p, 0, p.len(), table(i), true);
        }
        let first = model.forward(&prefill, &mut cache).unwrap();
        let mut decode = ForwardBatch::default();
        for (i, p) in prompts.iter().enumerate() {
            decode.push(&[argmax(first.row(i))], p.len(), p.len(), table(i), true);
        }
        (first.clone(), model.forward(&decode, &mut cache).unwrap())
    };
    let (whole, tiles) = (run(device_model()), run(&tiled));
    for i in 0..prompts.len() {
        assert_close(tiles.0.row(i), whole.0.row(i), &format!("seq {i} prefill in tiles"));
        assert_close(tiles.1.row(i), whole.1.row(i), &format!("seq {i} decode in a group"));
    }
}

/// The host cache is what peers read: every step's K/V land there, the very
/// bytes the CPU kernels' cache holds for the same tokens (up to rounding).
/// Blocks written from outside (a hand-off) reach the device mirror before a
/// step reads them.
#[test]
fn the_host_cache_and_the_device_mirror_stay_equal() {
    let model = &own_device_model();
    let r = &golden()[1];
    let p = &r.prompt;
    let n = p.len().div_ceil(BLOCK_SIZE);
    let mut cache = kv(2 * n + 1);
    let first = step(model, &mut cache, p, 0, p.len(), &blocks(0, n + 1));
    let mut ours = Vec::new();
    cache.read_blocks(&blocks(0, n), &mut ours).unwrap();
    let next = [argmax(&first)];
    let decode = step(model, &mut cache, &next, p.len(), p.len(), &blocks(0, n + 1));

    // The host cache holds what the CPU kernels compute for the prompt, up
    // to their 8-bit activations (K and V reach about 20 in size here).
    let mut cpu_cache = kv(n);
    step(&default_model().model, &mut cpu_cache, p, 0, p.len(), &blocks(0, n));
    let mut theirs = Vec::new();
    cpu_cache.read_blocks(&blocks(0, n), &mut theirs).unwrap();
    let floats = |b: &[u8]| b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect::<Vec<_>>();
    let diff = floats(&ours).iter().zip(floats(&theirs)).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(diff < 1.0, "host KV differs from the CPU kernels' by {diff}");

    // Hand the prompt's blocks over to blocks n.. of the same cache, as a
    // KV transfer would: the decode step there must read them.
    cache.write_blocks(&blocks(n as u32, n), &ours).unwrap();
    let moved = step(model, &mut cache, &next, p.len(), p.len(), &blocks(n as u32, n + 1));
    assert_close(&moved, &decode, "a decode over handed-off blocks");
}

/// Prompt lookup's verifying passes on the device: a sequence's token and its drafts in one
/// pass, a logits row each, the KV past the first rejected draft written over by the next pass.
/// Each answer is the run without drafts' token for token, with the same logprobs, up to the
/// first token whose two best logprobs were too close to call: a pass of several rows may sum a
/// row's products in another grouping than a one-row decode (a GPU's kernels do), which moves a
/// logit by rounding only.
#[test]
fn drafts_verified_on_the_device_keep_the_greedy_tokens() {
    // bf16 on a GPU rounds each layer's output to 8 bits of mantissa, f32 on the CPU to 24.
    let (too_close, tolerance) = if on_cuda() { (0.25, 0.1) } else { (0.01, 1e-3) };
    let records = golden();
    // Each prompt twice in a row: the model goes on repeating it, so drafts are accepted.
    let prompts: Vec<Vec<u32>> =
        records.iter().take(3).map(|r| [r.prompt.clone(), r.prompt.clone()].concat()).collect();
    let shape = default_model().model.kv_shape(BLOCK_SIZE, 64);
    let run = |speculative: Option<SpeculativeConfig>| -> (Vec<Vec<(u32, TokenLogprobs)>>, SpeculationStats) {
        let config = EngineConfig {
            max_num_seqs: 4,
            max_num_batched_tokens: 512,
            max_model_len: 512,
            eos_token_ids: vec![],
            default_seed: 0,
            enable_prefix_caching: false,
            speculative,
        };
        let engine = Engine::start(Arc::new(own_device_model()), shape, config);
        let answers = prompts
            .iter()
            .enumerate()
            .map(|(i, prompt)| {
                let mut request = request(&format!("r{i}"), prompt, 48);
                request.sampling.logprobs = Some(2);
                let mut events = engine.submit(request).unwrap();
                let mut tokens = Vec::new();
                loop {
                    match events.blocking_recv().expect("a final event") {
                        EngineEvent::Token { id, logprobs: Some(logprobs), .. } => tokens.push((id, logprobs)),
                        EngineEvent::Finished { .. } => return tokens,
                        other => panic!("unexpected {other:?}"),
                    }
                }
            })
            .collect();
        (answers, engine.stats().speculation)
    };
    let (plain, _) = run(None);
    let drafts = SpeculativeConfig {
        method: SpeculativeMethod::Ngram(NgramLookup { prompt_lookup_max: 3, prompt_lookup_min: 1 }),
        num_speculative_tokens: 4,
        disable_by_batch_size: usize::MAX,
    };
    let (speculated, stats) = run(Some(drafts));
    assert!(stats.num_accepted_tokens >= 10, "too few drafts accepted to show anything: {stats:?}");
    let mut compared = 0;
    for (i, (plain, speculated)) in plain.iter().zip(&speculated).enumerate() {
        for (j, ((id, logprobs), (drafted_id, drafted_logprobs))) in plain.iter().zip(speculated).enumerate() {
            if logprobs.top[0].1 - logprobs.top[1].1 < too_close {
                break;
            }
            assert_eq!(id, drafted_id, "answer {i}, token {j}: drafts changed the greedy token");
            let moved = (logprobs.logprob - drafted_logprobs.logprob).abs();
            assert!(moved < tolerance, "answer {i}, token {j}: its logprob moved by {moved}");
            compared += 1;
        }
    }
    assert!(compared >= 64, "only {compared} tokens were clear enough to compare");
}

/// Every token a request heard, and its last event.
fn collect(mut rx: UnboundedReceiver<EngineEvent>) -> (Vec<u32>, EngineEvent) {
    let mut tokens = Vec::new();
    loop {
        match rx.blocking_recv().expect("the engine ended a request without a final event") {
            EngineEvent::Token { id, .. } => tokens.push(id),
            last => return (tokens, last),
        }
    }
}

/// Writes layers `layers` of a hand-off payload into reserved blocks through
/// the arena, as a KV puller does.
fn land(blocks: &KvReservation, data: &[u8], shape: KvCacheShape, layers: std::ops::Range<usize>) {
    let seg = shape.segment_bytes();
    let ids = blocks.block_ids();
    for lkv in layers.start * 2..layers.end * 2 {
        for (i, &id) in ids.iter().enumerate() {
            let src = &data[(lkv * ids.len() + i) * seg..][..seg];
            let at = shape.segment_offset(lkv / 2, lkv % 2, id as usize);
            // SAFETY: a reserved block's segment, inside the arena.
            unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), blocks.as_mut_ptr(0).add(at), seg) };
        }
    }
}

/// A decode engine on the device continues a prompt whose KV a puller wrote
/// into reserved blocks behind the forward pass's back, whole or streaming in
/// layer by layer, exactly as the engine that computed the prompt does.
#[test]
fn kv_handed_off_through_the_arena_reaches_the_device() {
    let records = golden();
    let prompt = &records[0].prompt;
    let shape = default_model().model.kv_shape(BLOCK_SIZE, 24);
    let config = EngineConfig {
        max_num_seqs: 4,
        max_num_batched_tokens: 2048,
        max_model_len: 256,
        eos_token_ids: vec![],
        default_seed: 0,
        // Freed blocks are reused at once, still holding other KV on the device.
        enable_prefix_caching: false,
        speculative: None,
    };
    let start = || Engine::start(Arc::new(own_device_model()), shape, config.clone());
    let prefill = start();
    let (first, last) = collect(
        prefill.submit(EngineRequest { pooling: None, pin_on_finish: true, ..request("pre", prompt, 1) }).unwrap(),
    );
    let EngineEvent::Finished { pinned_blocks: Some(pinned), .. } = last else { panic!("{last:?}") };
    let mut data = Vec::new();
    prefill.read_blocks(&pinned, &mut data).unwrap();
    let (whole, _) = collect(prefill.submit(request("whole", prompt, 8)).unwrap());
    assert_eq!(whole[0], first[0]);

    let decode = start();
    collect(decode.submit(request("other", &records[1].prompt, 8)).unwrap());
    let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
    for streamed in [false, true] {
        let blocks = runtime.block_on(decode.reserve_kv(prompt.len())).unwrap().expect("free blocks");
        let landing = if streamed {
            let landing = KvLanding::new(shape.num_layers);
            let (reporter, held, data) = (landing.reporter(), blocks.share(), data.clone());
            std::thread::spawn(move || {
                for l in 0..shape.num_layers {
                    std::thread::sleep(std::time::Duration::from_millis(2));
                    land(&held, &data, shape, l..l + 1);
                    reporter.landing().landed(l as u32 + 1);
                }
            });
            Some(landing)
        } else {
            land(&blocks, &data, shape, 0..shape.num_layers);
            None
        };
        let kv = KvSource::Reserved { blocks, first_tokens: vec![first[0]], landing };
        let (got, last) =
            collect(decode.submit(EngineRequest { pooling: None, kv, ..request("handed-off", prompt, 8) }).unwrap());
        assert!(matches!(last, EngineEvent::Finished { .. }), "{last:?}");
        assert_eq!(got, whole[1..], "decoding from {} KV", if streamed { "streamed" } else { "landed" });
    }
}
