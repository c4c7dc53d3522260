//! Hugging Face model folders (`config.json`, safetensors, tokenizer files)
//! against a plain-Rust reference of the transformers formulation: rotate-half
//! RoPE on the checkpoint's own (unpermuted) Q/K weights, RMSNorm, grouped-query
//! causal attention, SiLU-gated MLP, tied or untied LM head, Qwen2's Q/K/V
//! biases. Each test writes a tiny model into a temporary folder: no network.
//!
//! `cargo test -p engine --test hf_safetensors -- --nocapture` prints the
//! largest logit difference of each case.

use std::collections::BTreeMap;
use std::path::Path;

use engine::forward::RankModel;
use engine::model::{load, load_metadata, ComputeDevice, LoadOptions, LoadedModel, TensorParallel, WeightDtype};
use engine::{
    Engine, EngineConfig, EngineError, EngineEvent, EngineHandle, EngineRequest, FinishReason, Forward, ForwardBatch,
    KvCacheShape, KvSource, KvStorage, SamplingParams,
};
use half::{bf16, f16};
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::{json, Value};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::Arc;
use std::time::Duration;
use tokenizers::models::wordlevel::WordLevel;
use tokenizers::pre_tokenizers::whitespace::Whitespace;
use tokenizers::{AddedToken, Tokenizer};

/// Largest tolerated |engine - reference| logit: the engine computes in f32,
/// the reference in f64 from the same weights, and logits are a few units
/// large. A wrong RoPE layout, a missing bias or a swapped tensor moves
/// logits by O(1).
const TOLERANCE: f64 = 1e-4;

/// Tokens every model's tokenizer has; ids 4.. are the words `w4`, `w5`, ...
const SPECIALS: [&str; 4] = ["<unk>", "<s>", "</s>", "<|im_end|>"];
/// The tokenizer covers fewer ids than the model's (padded) vocabulary, as in Qwen2.
const TOKENIZER_VOCAB: usize = 260;
const CONTEXT: usize = 64;
const CHAT_TEMPLATE: &str = "{% for m in messages %}<s>{{ m.content }}</s>{% endfor %}";

#[derive(Debug, Clone, Copy, PartialEq)]
enum Arch {
    Llama,
    Qwen2,
}

/// The shape and storage of a tiny checkpoint.
#[derive(Debug, Clone)]
struct Spec {
    arch: Arch,
    layers: usize,
    hidden: usize,
    heads: usize,
    kv_heads: usize,
    ffn: usize,
    vocab: usize,
    tied: bool,
    /// How the checkpoint stores every tensor.
    dtype: Dtype,
    /// 1: `model.safetensors`; more: shards and `model.safetensors.index.json`.
    shards: usize,
    rope_theta: f64,
    eps: f64,
}

impl Spec {
    fn llama() -> Self {
        Self {
            arch: Arch::Llama,
            layers: 2,
            hidden: 64,
            heads: 4,
            kv_heads: 2,
            ffn: 128,
            vocab: 300,
            tied: true,
            dtype: Dtype::F32,
            shards: 1,
            rope_theta: 10_000.0,
            eps: 1e-5,
        }
    }

    fn qwen2() -> Self {
        Self { arch: Arch::Qwen2, rope_theta: 1_000_000.0, eps: 1e-6, ..Self::llama() }
    }

    fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }

    fn config_json(&self) -> Value {
        let (architecture, model_type) = match self.arch {
            Arch::Llama => ("LlamaForCausalLM", "llama"),
            Arch::Qwen2 => ("Qwen2ForCausalLM", "qwen2"),
        };
        json!({
            "architectures": [architecture],
            "model_type": model_type,
            "hidden_size": self.hidden,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim(),
            "intermediate_size": self.ffn,
            "vocab_size": self.vocab,
            "rope_theta": self.rope_theta,
            "rope_scaling": null,
            "rms_norm_eps": self.eps,
            "max_position_embeddings": CONTEXT,
            "tie_word_embeddings": self.tied,
            "hidden_act": "silu",
            "attention_bias": false,
            "use_sliding_window": false,
            "sliding_window": 32,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "torch_dtype": "float32",
        })
    }
}

/// Deterministic uniform numbers in [-1, 1) (SplitMix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 52) as f64 - 1.0
    }
}

fn round(dtype: Dtype, x: f32) -> f32 {
    match dtype {
        Dtype::F16 => f16::from_f32(x).to_f32(),
        Dtype::BF16 => bf16::from_f32(x).to_f32(),
        _ => x,
    }
}

/// A tensor of the test model: its shape and values.
type Entry = (Vec<usize>, Vec<f32>);

/// A checkpoint's tensors by Hugging Face name: shape and values, the values
/// exactly what the stored dtype holds.
#[derive(Clone)]
struct Weights(BTreeMap<String, Entry>);

impl Weights {
    fn random(spec: &Spec, seed: u64) -> Self {
        let mut rng = Rng(seed);
        let mut map = BTreeMap::new();
        // Uniform in offset ± scale; matrices get scale sqrt(3 / fan_in) so
        // activations keep unit variance and attention is neither flat nor one-hot.
        let mut add = |name: String, shape: Vec<usize>, offset: f64, scale: f64| {
            let n = shape.iter().product();
            let values = (0..n).map(|_| round(spec.dtype, (offset + scale * rng.next()) as f32)).collect();
            map.insert(name, (shape, values));
        };
        let (h, hd) = (spec.hidden, spec.head_dim());
        let (q_dim, kv_dim) = (spec.heads * hd, spec.kv_heads * hd);
        let fan = |n: usize| (3.0 / n as f64).sqrt();
        add("model.embed_tokens.weight".into(), vec![spec.vocab, h], 0.0, 1.0);
        for l in 0..spec.layers {
            let p = format!("model.layers.{l}");
            add(format!("{p}.input_layernorm.weight"), vec![h], 1.0, 0.2);
            add(format!("{p}.self_attn.q_proj.weight"), vec![q_dim, h], 0.0, fan(h));
            add(format!("{p}.self_attn.k_proj.weight"), vec![kv_dim, h], 0.0, fan(h));
            add(format!("{p}.self_attn.v_proj.weight"), vec![kv_dim, h], 0.0, fan(h));
            add(format!("{p}.self_attn.o_proj.weight"), vec![h, q_dim], 0.0, fan(q_dim));
            if spec.arch == Arch::Qwen2 {
                add(format!("{p}.self_attn.q_proj.bias"), vec![q_dim], 0.0, 0.5);
                add(format!("{p}.self_attn.k_proj.bias"), vec![kv_dim], 0.0, 0.5);
                add(format!("{p}.self_attn.v_proj.bias"), vec![kv_dim], 0.0, 0.5);
            }
            add(format!("{p}.post_attention_layernorm.weight"), vec![h], 1.0, 0.2);
            add(format!("{p}.mlp.gate_proj.weight"), vec![spec.ffn, h], 0.0, fan(h));
            add(format!("{p}.mlp.up_proj.weight"), vec![spec.ffn, h], 0.0, fan(h));
            add(format!("{p}.mlp.down_proj.weight"), vec![h, spec.ffn], 0.0, fan(spec.ffn));
        }
        add("model.norm.weight".into(), vec![h], 1.0, 0.2);
        if !spec.tied {
            add("lm_head.weight".into(), vec![spec.vocab, h], 0.0, fan(h));
        }
        Self(map)
    }

    fn get(&self, name: &str) -> &[f32] {
        &self.0[name].1
    }

    /// The same weights with every matrix rounded to `dtype` (what loading
    /// with `--dtype` should hold); norms and biases stay as stored.
    fn matrices_rounded(&self, dtype: Dtype) -> Self {
        let mut out = self.clone();
        for (shape, values) in out.0.values_mut() {
            if shape.len() == 2 {
                values.iter_mut().for_each(|x| *x = round(dtype, *x));
            }
        }
        out
    }
}

fn to_bytes(dtype: Dtype, values: &[f32]) -> Vec<u8> {
    match dtype {
        Dtype::F32 => values.iter().flat_map(|x| x.to_le_bytes()).collect(),
        Dtype::F16 => values.iter().flat_map(|&x| f16::from_f32(x).to_le_bytes()).collect(),
        Dtype::BF16 => values.iter().flat_map(|&x| bf16::from_f32(x).to_le_bytes()).collect(),
        other => panic!("no writer for {other:?}"),
    }
}

fn write_safetensors(path: &Path, dtype: Dtype, tensors: &[(&String, &Entry)]) {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(name, (shape, values))| (name.to_string(), shape.clone(), to_bytes(dtype, values)))
        .collect();
    let views: Vec<(String, TensorView)> = bytes
        .iter()
        .map(|(name, shape, data)| (name.clone(), TensorView::new(dtype, shape.clone(), data).unwrap()))
        .collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

fn write_json(path: &Path, value: &Value) {
    std::fs::write(path, serde_json::to_string_pretty(value).unwrap()).unwrap();
}

/// A word-level tokenizer: the specials, then `{prefix}4`, `{prefix}5`, ...
fn write_tokenizer(dir: &Path, prefix: &str) {
    let vocab = (0..TOKENIZER_VOCAB as u32).map(|id| match SPECIALS.get(id as usize) {
        Some(s) => (s.to_string(), id),
        None => (format!("{prefix}{id}"), id),
    });
    let model = WordLevel::builder().vocab(vocab.collect()).unk_token("<unk>".into()).build().unwrap();
    let mut tokenizer = Tokenizer::new(model);
    tokenizer.with_pre_tokenizer(Some(Whitespace {}));
    tokenizer.add_special_tokens(&SPECIALS.map(|s| AddedToken::from(s, true)));
    tokenizer.save(dir.join("tokenizer.json"), false).unwrap();
}

/// Writes a complete model folder; `edit` may change `config.json` first.
fn write_model(dir: &Path, spec: &Spec, weights: &Weights, edit: impl FnOnce(&mut Value)) {
    let mut config = spec.config_json();
    edit(&mut config);
    write_json(&dir.join("config.json"), &config);
    write_tokenizer(dir, "w");
    write_json(
        &dir.join("tokenizer_config.json"),
        &json!({
            "add_bos_token": true,
            "bos_token": "<s>",
            "eos_token": {"content": "</s>", "lstrip": false, "rstrip": false, "special": true},
            "chat_template": CHAT_TEMPLATE,
        }),
    );
    write_json(&dir.join("generation_config.json"), &json!({"bos_token_id": 1, "eos_token_id": [2, 3]}));

    let tensors: Vec<_> = weights.0.iter().collect();
    if spec.shards == 1 {
        write_safetensors(&dir.join("model.safetensors"), spec.dtype, &tensors);
        return;
    }
    let mut weight_map = serde_json::Map::new();
    let per_shard = tensors.len().div_ceil(spec.shards);
    for (i, chunk) in tensors.chunks(per_shard).enumerate() {
        let file = format!("model-{:05}-of-{:05}.safetensors", i + 1, spec.shards);
        write_safetensors(&dir.join(&file), spec.dtype, chunk);
        for (name, _) in chunk {
            weight_map.insert(name.to_string(), Value::from(file.clone()));
        }
    }
    write_json(&dir.join("model.safetensors.index.json"), &json!({"metadata": {}, "weight_map": weight_map}));
}

fn matvec(w: &[f32], x: &[f64]) -> Vec<f64> {
    w.chunks_exact(x.len()).map(|row| row.iter().zip(x).map(|(&a, b)| a as f64 * b).sum()).collect()
}

fn rms_norm(x: &[f64], w: &[f32], eps: f64) -> Vec<f64> {
    let scale = 1.0 / (x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64 + eps).sqrt();
    x.iter().zip(w).map(|(v, &g)| v * scale * g as f64).collect()
}

/// transformers' `apply_rotary_pos_emb`: dimension `i` of each head rotates
/// with `i + head_dim / 2` (`rotate_half`) at frequency `theta^(-2i/head_dim)`.
fn rope_rotate_half(x: &mut [f64], head_dim: usize, pos: usize, theta: f64) {
    let half = head_dim / 2;
    for head in x.chunks_exact_mut(head_dim) {
        for i in 0..half {
            let angle = pos as f64 * theta.powf(-2.0 * i as f64 / head_dim as f64);
            let (sin, cos) = angle.sin_cos();
            let (a, b) = (head[i], head[i + half]);
            head[i] = a * cos - b * sin;
            head[i + half] = b * cos + a * sin;
        }
    }
}

fn add_bias(x: &mut [f64], w: &Weights, name: &str) {
    if let Some((_, b)) = w.0.get(name) {
        x.iter_mut().zip(b).for_each(|(v, &b)| *v += b as f64);
    }
}

/// The logits after each token of `tokens`, computed the transformers way.
fn reference(spec: &Spec, w: &Weights, tokens: &[u32]) -> Vec<Vec<f64>> {
    let (h, hd) = (spec.hidden, spec.head_dim());
    let group = spec.heads / spec.kv_heads;
    let embed = w.get("model.embed_tokens.weight");
    let lm_head = if spec.tied { embed } else { w.get("lm_head.weight") };
    let mut keys: Vec<Vec<Vec<f64>>> = vec![Vec::new(); spec.layers];
    let mut values: Vec<Vec<Vec<f64>>> = vec![Vec::new(); spec.layers];
    let mut out = Vec::new();
    for (pos, &token) in tokens.iter().enumerate() {
        let t = token as usize;
        let mut x: Vec<f64> = embed[t * h..(t + 1) * h].iter().map(|&v| v as f64).collect();
        for l in 0..spec.layers {
            let p = |name: &str| format!("model.layers.{l}.{name}");
            let hn = rms_norm(&x, w.get(&p("input_layernorm.weight")), spec.eps);
            let mut q = matvec(w.get(&p("self_attn.q_proj.weight")), &hn);
            let mut k = matvec(w.get(&p("self_attn.k_proj.weight")), &hn);
            let mut v = matvec(w.get(&p("self_attn.v_proj.weight")), &hn);
            add_bias(&mut q, w, &p("self_attn.q_proj.bias"));
            add_bias(&mut k, w, &p("self_attn.k_proj.bias"));
            add_bias(&mut v, w, &p("self_attn.v_proj.bias"));
            rope_rotate_half(&mut q, hd, pos, spec.rope_theta);
            rope_rotate_half(&mut k, hd, pos, spec.rope_theta);
            keys[l].push(k);
            values[l].push(v);
            let mut attn = vec![0.0; spec.heads * hd];
            for head in 0..spec.heads {
                let kv = (head / group) * hd;
                let qh = &q[head * hd..(head + 1) * hd];
                let scores: Vec<f64> = keys[l]
                    .iter()
                    .map(|k| qh.iter().zip(&k[kv..kv + hd]).map(|(a, b)| a * b).sum::<f64>() / (hd as f64).sqrt())
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let exps: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let total: f64 = exps.iter().sum();
                for (e, v) in exps.iter().zip(&values[l]) {
                    for d in 0..hd {
                        attn[head * hd + d] += e / total * v[kv + d];
                    }
                }
            }
            let o = matvec(w.get(&p("self_attn.o_proj.weight")), &attn);
            x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
            let hn = rms_norm(&x, w.get(&p("post_attention_layernorm.weight")), spec.eps);
            let gate = matvec(w.get(&p("mlp.gate_proj.weight")), &hn);
            let up = matvec(w.get(&p("mlp.up_proj.weight")), &hn);
            let act: Vec<f64> = gate.iter().zip(&up).map(|(g, u)| g / (1.0 + (-g).exp()) * u).collect();
            let down = matvec(w.get(&p("mlp.down_proj.weight")), &act);
            x.iter_mut().zip(&down).for_each(|(a, b)| *a += b);
        }
        out.push(matvec(lm_head, &rms_norm(&x, w.get("model.norm.weight"), spec.eps)));
    }
    out
}

/// The engine's logits after each token: the first `prompt_len` from one
/// step that prefills every prefix of the prompt as its own sequence, the
/// rest from decode steps of the whole prompt's sequence, one token each.
fn engine_logits(m: &LoadedModel, tokens: &[u32], prompt_len: usize) -> Vec<Vec<f32>> {
    const BLOCK_SIZE: usize = 4;
    let per_seq = tokens.len().div_ceil(BLOCK_SIZE);
    let mut kv = KvStorage::new(m.model.kv_shape(BLOCK_SIZE, per_seq * prompt_len));
    let mut rows = Vec::new();
    for batch in logit_batches(tokens, prompt_len, per_seq) {
        let logits = m.model.forward(&batch, &mut kv).unwrap();
        rows.extend((0..batch.num_logits()).map(|i| logits.row(i).to_vec()));
    }
    rows
}

/// [`engine_logits`] from the forward pass on candle tensors
/// ([`engine::model::DeviceLlama`], on the CPU device).
fn device_logits(m: &LoadedModel, tokens: &[u32], prompt_len: usize) -> Vec<Vec<f32>> {
    const BLOCK_SIZE: usize = 4;
    let device = engine::model::DeviceLlama::new(&m.model, &candle_core::Device::Cpu, candle_core::DType::F32).unwrap();
    let per_seq = tokens.len().div_ceil(BLOCK_SIZE);
    let mut kv = KvStorage::new(m.model.kv_shape(BLOCK_SIZE, per_seq * prompt_len));
    let mut rows = Vec::new();
    for batch in logit_batches(tokens, prompt_len, per_seq) {
        let logits = device.forward(&batch, &mut kv).unwrap();
        rows.extend((0..batch.num_logits()).map(|i| logits.row(i).to_vec()));
    }
    rows
}

/// The batches of [`engine_logits`]: one step prefilling every prefix of the
/// prompt as its own sequence, then decode steps of the whole prompt's
/// sequence, one token each. Block ids are reversed, so that logical and
/// physical order differ.
fn logit_batches(tokens: &[u32], prompt_len: usize, per_seq: usize) -> Vec<ForwardBatch> {
    let table = |seq: usize| -> Vec<u32> { (seq * per_seq..(seq + 1) * per_seq).rev().map(|b| b as u32).collect() };
    let mut first = ForwardBatch::default();
    for len in 1..=prompt_len {
        first.push(&tokens[..len], 0, len, table(len - 1), true);
    }
    let mut batches = vec![first];
    for pos in prompt_len..tokens.len() {
        let mut batch = ForwardBatch::default();
        batch.push(&tokens[pos..pos + 1], pos, prompt_len, table(prompt_len - 1), true);
        batches.push(batch);
    }
    batches
}

/// Every logits row of the batches, with the model sharded over `world`
/// CPU ranks (rank 0's; every rank must agree).
fn tensor_parallel_logits(m: &LoadedModel, world: usize, tokens: &[u32], prompt_len: usize) -> Vec<Vec<f32>> {
    const BLOCK_SIZE: usize = 4;
    let per_seq = tokens.len().div_ceil(BLOCK_SIZE);
    let batches = logit_batches(tokens, prompt_len, per_seq);
    let shards: Vec<_> = (0..world).map(|r| m.model.shard(r, world).unwrap()).collect();
    let ranks: Vec<Vec<Vec<f32>>> = std::thread::scope(|s| {
        let handles: Vec<_> = shards
            .iter()
            .zip(engine::comm::cpu::CpuGroup::ranks(world))
            .map(|(shard, comm)| {
                let batches = &batches;
                s.spawn(move || {
                    let mut kv = KvStorage::new(shard.kv_shape(BLOCK_SIZE, per_seq * prompt_len));
                    let mut rows = Vec::new();
                    for batch in batches {
                        let logits = shard.forward_rank(batch, &mut kv, &comm).unwrap();
                        rows.extend((0..batch.num_logits()).map(|i| logits.row(i).to_vec()));
                    }
                    rows
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(ranks.iter().all(|r| *r == ranks[0]), "every rank returns the same logits");
    ranks.into_iter().next().unwrap()
}

#[test]
fn two_and_four_cpu_ranks_compute_the_logits_of_one() {
    for spec in [Spec { heads: 8, kv_heads: 4, ..Spec::llama() }, Spec { heads: 8, kv_heads: 4, ..Spec::qwen2() }] {
        let dir = tempfile::tempdir().unwrap();
        write_model(dir.path(), &spec, &Weights::random(&spec, 42), |_| {});
        let m = load_ok(dir.path(), &LoadOptions::default());
        let tokens = test_tokens(&spec);
        let one = engine_logits(&m, &tokens, 7);
        for world in [2, 4] {
            let sharded = tensor_parallel_logits(&m, world, &tokens, 7);
            let diff =
                one.iter().flatten().zip(sharded.iter().flatten()).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
            println!("{:?} 8/4 heads, TP={world} vs TP=1: largest |logit difference| {diff:.2e}", spec.arch);
            assert_eq!(one.len(), sharded.len());
            assert!(diff < 1e-4, "TP={world}: logits differ by {diff}");
        }
        let error = m.model.shard(0, 3).err().expect("8 heads do not split in 3").to_string();
        assert!(error.contains("8 heads / 4 KV heads"), "{error}");
    }
}

/// Requests that exercise what a tensor-parallel engine must keep in step on
/// every rank: concurrent prefills and decodes, a fork (`n = 2`, whose
/// partial block is copied), and seeded sampling.
fn tp_requests(spec: &Spec) -> Vec<EngineRequest> {
    let tokens = test_tokens(spec);
    let request = |i: usize, prompt: &[u32], sampling: SamplingParams, n: u32| EngineRequest {
        pooling: None,
        request_id: format!("r{i}"),
        prompt_token_ids: prompt.to_vec(),
        sampling: SamplingParams { ignore_eos: true, ..sampling },
        kv: KvSource::Compute,
        pin_on_finish: false,
        cache_salt: None,
        priority: 0,
        n,
        grammar: None,
    };
    let seeded = SamplingParams { temperature: 0.8, seed: Some(5), max_tokens: 12, ..SamplingParams::default() };
    vec![
        request(0, &tokens, SamplingParams::greedy(20), 1),
        request(1, &tokens[3..], SamplingParams::greedy(16), 1),
        request(2, &tokens[..6], seeded, 2),
        request(3, &tokens[1..2], SamplingParams::greedy(24), 1),
    ]
}

fn tp_engine(model: Arc<dyn Forward>, shape: KvCacheShape) -> EngineHandle {
    let config = EngineConfig {
        max_num_seqs: 8,
        max_num_batched_tokens: 16,
        max_model_len: CONTEXT,
        eos_token_ids: vec![2],
        default_seed: 0,
        enable_prefix_caching: true,
        speculative: None,
    };
    Engine::start(model, shape, config)
}

/// Every event of a request, or a panic if it has not ended within 10 s.
fn events_of(mut events: tokio::sync::mpsc::UnboundedReceiver<EngineEvent>) -> Vec<EngineEvent> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        while let Some(event) = events.blocking_recv() {
            let _ = tx.send(event);
        }
    });
    let mut out = Vec::new();
    loop {
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(event) => out.push(event),
            Err(RecvTimeoutError::Disconnected) => return out,
            Err(RecvTimeoutError::Timeout) => panic!("no end of the request within 10 s: {out:?}"),
        }
    }
}

/// Each request's tokens per choice, the requests submitted at once.
fn served_tokens(engine: &EngineHandle, requests: Vec<EngineRequest>) -> Vec<Vec<Vec<u32>>> {
    let streams: Vec<_> = requests.into_iter().map(|r| (r.n, engine.submit(r).unwrap())).collect();
    streams
        .into_iter()
        .map(|(n, events)| {
            let mut choices = vec![Vec::new(); n as usize];
            for event in events_of(events) {
                match event {
                    EngineEvent::Token { index, id, .. } => choices[index as usize].push(id),
                    EngineEvent::Finished { reason, .. } => assert_eq!(reason, FinishReason::Length),
                    EngineEvent::Error(e) => panic!("request failed: {e}"),
                    EngineEvent::PromptLogprobs { .. } => panic!("prompt logprobs were not asked for"),
                    EngineEvent::Embedding(_) => panic!("no embedding was asked for"),
                }
            }
            choices
        })
        .collect()
}

/// The 8/4-head tiny llama (its folder must outlive the model) and what
/// [`tp_requests`] get from an engine on its one shard of one rank, which is
/// the whole model on the engine's kernels.
fn served_on_one_rank() -> (Spec, tempfile::TempDir, LoadedModel, Vec<Vec<Vec<u32>>>) {
    let spec = Spec { heads: 8, kv_heads: 4, ..Spec::llama() };
    let dir = tempfile::tempdir().unwrap();
    write_model(dir.path(), &spec, &Weights::random(&spec, 42), |_| {});
    let m = load_ok(dir.path(), &LoadOptions::default());
    let one = tp_engine(Arc::new(m.model.shard(0, 1).unwrap()), m.model.kv_shape(4, 64));
    let want = served_tokens(&one, tp_requests(&spec));
    (spec, dir, m, want)
}

/// Ranks on candle devices (the CPU device here; GPUs over NCCL with the
/// `cuda` feature) serve what the engine's kernels serve on one rank.
#[test]
fn an_engine_on_device_ranks_serves_what_one_rank_serves() {
    let (spec, _dir, m, want) = served_on_one_rank();
    for world in [1, 2, 4] {
        let tp = TensorParallel::on_devices(&m.model, ComputeDevice::Cpu, world, WeightDtype::Auto).unwrap();
        let shape = tp.kv_shape(4, 64);
        assert_eq!(shape.num_kv_heads, 4 / world, "each rank caches its share of the KV heads");
        let engine = tp_engine(Arc::new(tp), shape);
        assert_eq!(engine.tp_size(), world);
        assert_eq!(served_tokens(&engine, tp_requests(&spec)), want, "{world} device ranks");
    }
    let error = TensorParallel::on_devices(&m.model, ComputeDevice::Cpu, 3, WeightDtype::Auto).err().unwrap();
    assert!(error.to_string().contains("8 heads / 4 KV heads"), "{error}");
    let error = TensorParallel::on_devices(&m.model, ComputeDevice::Cuda(1), 2, WeightDtype::Auto).err().unwrap();
    assert!(error.to_string().contains("use --device cuda"), "{error}");
}

#[test]
fn an_engine_on_two_and_four_ranks_serves_what_one_rank_serves() {
    let (spec, _dir, m, want) = served_on_one_rank();
    for world in [2, 4] {
        let tp = TensorParallel::new(&m.model, world).unwrap();
        let shape = tp.kv_shape(4, 64);
        assert_eq!(shape.num_kv_heads, 4 / world, "each rank caches its share of the KV heads");
        let engine = tp_engine(Arc::new(tp), shape);
        assert_eq!(engine.tp_size(), world);
        assert_eq!(served_tokens(&engine, tp_requests(&spec)), want, "TP={world}");
        // The prompt blocks each rank cached are reused by a repeat.
        let repeat = served_tokens(&engine, tp_requests(&spec).into_iter().take(1).collect());
        assert_eq!(repeat[0], want[0], "TP={world}, from the prefix cache");
        engine.sync();
        assert_eq!(engine.stats().num_sequences, 0);
    }
}

#[test]
fn a_dead_rank_fails_the_engine_cleanly() {
    let spec = Spec { heads: 8, kv_heads: 4, ..Spec::llama() };
    let dir = tempfile::tempdir().unwrap();
    write_model(dir.path(), &spec, &Weights::random(&spec, 42), |_| {});
    let m = load_ok(dir.path(), &LoadOptions::default());
    let tp = Arc::new(TensorParallel::new(&m.model, 2).unwrap());
    let engine = tp_engine(tp.clone(), tp.kv_shape(4, 64));
    let mut requests = tp_requests(&spec);
    requests[0].sampling.max_tokens = 50;
    let mut running = engine.submit(requests.remove(0)).unwrap();
    assert!(matches!(running.blocking_recv(), Some(EngineEvent::Token { .. })));
    assert_eq!(engine.failure(), None);

    tp.kill_rank(1);
    let rest = events_of(running);
    let Some(EngineEvent::Error(error)) = rest.last() else { panic!("the running request must fail: {rest:?}") };
    assert_eq!(error.kind, engine::FailureKind::Engine, "{error}");
    assert!(error.message.contains("the engine has failed") && error.message.contains("rank 1"), "{error}");
    assert!(engine.failure().is_some_and(|f| f.contains("rank 1")));
    let refused = engine.submit(requests.remove(0)).unwrap_err();
    assert!(matches!(refused, EngineError::Failed(_)), "{refused}");
    engine.sync();
    assert_eq!(engine.stats().num_sequences, 0, "nothing is left live");
}

/// Tokens of a test sequence: some beyond the tokenizer's vocabulary (but in
/// the model's), to reach every embedding row kind.
fn test_tokens(spec: &Spec) -> Vec<u32> {
    let mut rng = Rng(7);
    (0..11).map(|_| ((rng.next() + 1.0) / 2.0 * spec.vocab as f64) as u32 % spec.vocab as u32).collect()
}

/// Largest |engine - reference| over every position's logits, and the largest |reference|.
fn max_difference(spec: &Spec, m: &LoadedModel, reference_weights: &Weights) -> (f64, f64) {
    let tokens = test_tokens(spec);
    let want = reference(spec, reference_weights, &tokens);
    let got = engine_logits(m, &tokens, 7);
    assert_eq!(got.len(), want.len());
    let (mut diff, mut scale) = (0.0f64, 0.0f64);
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(g.len(), spec.vocab);
        for (&a, &b) in g.iter().zip(w) {
            diff = diff.max((a as f64 - b).abs());
            scale = scale.max(b.abs());
        }
    }
    (diff, scale)
}

fn load_ok(dir: &Path, options: &LoadOptions) -> LoadedModel {
    load(dir, options).and_then(|m| m.into_decoder()).unwrap_or_else(|e| panic!("loading {}: {e}", dir.display()))
}

/// Writes `spec` with seeded weights, loads it with `options` and checks
/// every position's logits against the reference.
fn check_against_reference(label: &str, spec: &Spec, options: &LoadOptions) {
    let dir = tempfile::tempdir().unwrap();
    let weights = Weights::random(spec, 42);
    write_model(dir.path(), spec, &weights, |_| {});
    let m = load_ok(dir.path(), options);
    let (diff, scale) = max_difference(spec, &m, &weights);
    println!("{label}: largest |logit difference| {diff:.2e} (logits up to {scale:.2})");
    assert!(scale > 1.0, "{label}: logits of {scale} are too flat to test anything");
    assert!(diff <= TOLERANCE, "{label}: logits differ from the reference by {diff}");
}

#[test]
fn llama_f32_tied() {
    check_against_reference("llama f32 tied", &Spec::llama(), &LoadOptions::default());
}

#[test]
fn llama_f16_untied_sharded_8_heads() {
    let spec = Spec { dtype: Dtype::F16, tied: false, shards: 2, heads: 8, kv_heads: 4, ..Spec::llama() };
    check_against_reference("llama f16 untied 2 shards 8/4 heads", &spec, &LoadOptions::default());
}

#[test]
fn llama_bf16_untied_sharded() {
    let spec = Spec { dtype: Dtype::BF16, tied: false, shards: 2, ..Spec::llama() };
    check_against_reference("llama bf16 untied 2 shards", &spec, &LoadOptions::default());
}

#[test]
fn qwen2_with_qkv_biases() {
    check_against_reference("qwen2 f32 biases", &Spec::qwen2(), &LoadOptions::default());
    let spec = Spec { dtype: Dtype::BF16, tied: false, heads: 8, kv_heads: 4, ..Spec::qwen2() };
    check_against_reference("qwen2 bf16 biases untied 8/4 heads", &spec, &LoadOptions::default());
}

/// The forward pass on candle tensors computes what the reference does, on
/// the shapes the CPU kernels are checked on (GQA, biases, untied heads).
#[test]
fn the_device_forward_matches_the_reference() {
    for (label, spec) in [
        ("llama f32 tied", Spec::llama()),
        (
            "qwen2 bf16 biases untied 8/4 heads",
            Spec { dtype: Dtype::BF16, tied: false, heads: 8, kv_heads: 4, ..Spec::qwen2() },
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let weights = Weights::random(&spec, 42);
        write_model(dir.path(), &spec, &weights, |_| {});
        let m = load_ok(dir.path(), &LoadOptions::default());
        let tokens = test_tokens(&spec);
        let want = reference(&spec, &weights, &tokens);
        let got = device_logits(&m, &tokens, 7);
        assert_eq!(got.len(), want.len());
        let diff =
            got.iter().flatten().zip(want.iter().flatten()).map(|(&a, b)| (a as f64 - b).abs()).fold(0.0, f64::max);
        println!("{label} on candle tensors: largest |logit difference| {diff:.2e}");
        assert!(diff <= TOLERANCE, "{label}: logits differ from the reference by {diff}");
    }
}

/// `--dtype` rounds an f32 checkpoint's matrices at load: the engine matches
/// the rounded weights and not the original ones.
#[test]
fn dtype_converts_matrices_at_load() {
    let spec = Spec { tied: false, ..Spec::llama() };
    let dir = tempfile::tempdir().unwrap();
    let weights = Weights::random(&spec, 42);
    write_model(dir.path(), &spec, &weights, |_| {});
    for (dtype, rounded) in [(WeightDtype::BF16, Dtype::BF16), (WeightDtype::F16, Dtype::F16)] {
        let m = load_ok(dir.path(), &LoadOptions { dtype, ..LoadOptions::default() });
        let (diff, _) = max_difference(&spec, &m, &weights.matrices_rounded(rounded));
        let (unrounded, _) = max_difference(&spec, &m, &weights);
        println!("llama f32 loaded as {dtype}: largest |logit difference| {diff:.2e} ({unrounded:.2e} to f32 weights)");
        assert!(diff <= TOLERANCE, "{dtype}: logits differ from the rounded reference by {diff}");
        assert!(unrounded > TOLERANCE, "{dtype}: the weights were not rounded ({unrounded})");
    }
    let m = load_ok(dir.path(), &LoadOptions { dtype: WeightDtype::F32, ..LoadOptions::default() });
    assert!(max_difference(&spec, &m, &weights).0 <= TOLERANCE);
}

#[test]
fn serving_metadata_comes_from_the_tokenizer_and_generation_files() {
    let spec = Spec::llama();
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("tiny-llama");
    std::fs::create_dir(&dir).unwrap();
    write_model(&dir, &spec, &Weights::random(&spec, 1), |_| {});
    let m = load_ok(&dir, &LoadOptions::default());
    assert_eq!(m.info.model_name, "tiny-llama");
    assert_eq!(m.info.chat_template.as_deref(), Some(CHAT_TEMPLATE));
    assert_eq!(m.info.context_length, CONTEXT);
    assert_eq!(m.info.bos_token_id, Some(1));
    assert_eq!(m.info.bos_token, "<s>");
    assert_eq!(m.info.eos_token, "</s>");
    assert_eq!(m.info.eos_token_ids, [2, 3], "config.json's EOS, then generation_config.json's");
    assert!(m.info.add_bos_token);
    assert_eq!(m.tokenizer.encode("w5 w17 <|im_end|>", false).unwrap().get_ids(), [5, 17, 3]);

    // A list of named templates: the `default` one; no add_bos_token: whether
    // the tokenizer's post-processor adds BOS (this one does not).
    write_json(
        &dir.join("tokenizer_config.json"),
        &json!({
            "bos_token": {"content": "<s>"},
            "eos_token": "<|im_end|>",
            "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}],
        }),
    );
    std::fs::remove_file(dir.join("generation_config.json")).unwrap();
    let named = LoadOptions { model_name: Some("served".into()), ..LoadOptions::default() };
    let m = load_ok(&dir, &named);
    assert_eq!(m.info.model_name, "served");
    assert_eq!(m.info.chat_template.as_deref(), Some("D"));
    assert_eq!(m.info.eos_token, "<|im_end|>");
    assert_eq!(m.info.eos_token_ids, [2]);
    assert!(!m.info.add_bos_token);

    // Newer transformers save the template beside the config, in chat_template.jinja.
    write_json(&dir.join("tokenizer_config.json"), &json!({"eos_token": "</s>"}));
    std::fs::write(dir.join("chat_template.jinja"), "J").unwrap();
    assert_eq!(load_ok(&dir, &LoadOptions::default()).info.chat_template.as_deref(), Some("J"));
}

#[test]
fn metadata_is_what_a_full_load_reads_and_needs_no_weights() {
    let spec = Spec::llama();
    let dir = tempfile::tempdir().unwrap();
    write_model(dir.path(), &spec, &Weights::random(&spec, 1), |_| {});
    let full = load_ok(dir.path(), &LoadOptions::default());
    // The workers' --mock publishes its model card from the metadata alone: it
    // must be the card a full load gives, and must not touch the weights.
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "safetensors") {
            std::fs::remove_file(path).unwrap();
        }
    }
    assert!(load(dir.path(), &LoadOptions::default()).is_err(), "the weights are gone");
    let metadata = load_metadata(dir.path(), &LoadOptions::default()).unwrap();
    assert_eq!(metadata.info, full.info);
    assert_eq!(metadata.tokenizer.to_string(false).unwrap(), full.tokenizer.to_string(false).unwrap());
}

#[test]
fn tokenizer_override_takes_a_file_or_a_folder() {
    let spec = Spec::llama();
    let dir = tempfile::tempdir().unwrap();
    write_model(dir.path(), &spec, &Weights::random(&spec, 1), |_| {});
    let other = tempfile::tempdir().unwrap();
    write_tokenizer(other.path(), "v");
    for custom in [other.path().to_path_buf(), other.path().join("tokenizer.json")] {
        let m = load_ok(dir.path(), &LoadOptions { tokenizer: Some(custom), ..LoadOptions::default() });
        assert_eq!(m.tokenizer.encode("v9", false).unwrap().get_ids(), [9]);
        // The model folder's tokenizer_config.json still applies.
        assert_eq!(m.info.chat_template.as_deref(), Some(CHAT_TEMPLATE));
    }
    let missing = LoadOptions { tokenizer: Some(other.path().join("nope.json")), ..LoadOptions::default() };
    let err = load(dir.path(), &missing).err().expect("a missing tokenizer fails").to_string();
    assert!(err.contains("nope.json"), "{err}");
}

/// Loads a model written with `spec`, after `weights` and `config` edits,
/// expecting an error that contains every one of `needles`.
fn expect_error(
    spec: &Spec,
    edit_weights: impl FnOnce(&mut Weights),
    edit_config: impl FnOnce(&mut Value),
    needles: &[&str],
) {
    let dir = tempfile::tempdir().unwrap();
    let mut weights = Weights::random(spec, 3);
    edit_weights(&mut weights);
    write_model(dir.path(), spec, &weights, edit_config);
    let err = match load(dir.path(), &LoadOptions::default()) {
        Ok(_) => panic!("loading succeeded, expected an error with {needles:?}"),
        Err(e) => e.to_string(),
    };
    for needle in needles {
        assert!(err.contains(needle), "error {err:?} does not mention {needle:?}");
    }
}

#[test]
fn missing_and_misshapen_tensors_are_named() {
    let up = "model.layers.1.mlp.up_proj.weight";
    expect_error(&Spec::llama(), |w| drop(w.0.remove(up)), |_| {}, &[up, "model.safetensors"]);
    let sharded = Spec { shards: 2, ..Spec::llama() };
    expect_error(&sharded, |w| drop(w.0.remove(up)), |_| {}, &[up, "index.json"]);

    let k = "model.layers.0.self_attn.k_proj.weight";
    let transposed = |w: &mut Weights| {
        let (shape, _) = w.0.get_mut(k).unwrap();
        shape.reverse();
    };
    expect_error(&Spec::llama(), transposed, |_| {}, &[k, "shape [64, 32]", "expected [32, 64]"]);

    // Untied models need lm_head.weight; Qwen2 needs its biases.
    let untied = Spec::llama();
    expect_error(&untied, |_| {}, |c| c["tie_word_embeddings"] = json!(false), &["lm_head.weight"]);
    let bias = "model.layers.0.self_attn.q_proj.bias";
    expect_error(&Spec::qwen2(), |w| drop(w.0.remove(bias)), |_| {}, &[bias]);
}

#[test]
fn unsupported_configurations_are_named() {
    let spec = Spec::llama();
    let none = |_: &mut Weights| {};
    expect_error(&spec, none, |c| c["architectures"] = json!(["GPT2LMHeadModel"]), &["GPT2LMHeadModel", "config.json"]);
    expect_error(
        &spec,
        none,
        |c| c["rope_scaling"] = json!({"type": "yarn", "factor": 4.0}),
        &["unsupported rope_scaling type `yarn`"],
    );
    expect_error(&spec, none, |c| c["head_dim"] = json!(32), &["head_dim 32", "16"]);
    expect_error(&spec, none, |c| c["hidden_act"] = json!("gelu"), &["hidden_act `gelu`"]);
    expect_error(&spec, none, |c| c["quantization_config"] = json!({"quant_method": "awq"}), &["`awq`"]);
    expect_error(
        &spec,
        none,
        |c| drop(c.as_object_mut().unwrap().remove("hidden_size")),
        &["`hidden_size` is missing"],
    );
    let mistral = |window: Value| {
        move |c: &mut Value| {
            c["architectures"] = json!(["MistralForCausalLM"]);
            c["sliding_window"] = window;
        }
    };
    expect_error(&spec, none, mistral(json!(16)), &["sliding_window 16"]);

    // Mistral without a window is Llama's shape.
    let dir = tempfile::tempdir().unwrap();
    let weights = Weights::random(&spec, 5);
    write_model(dir.path(), &spec, &weights, mistral(Value::Null));
    let m = load_ok(dir.path(), &LoadOptions::default());
    assert!(max_difference(&spec, &m, &weights).0 <= TOLERANCE);
}

#[test]
fn paths_that_are_no_model_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let error = |path: &Path, options: &LoadOptions| load(path, options).err().expect("an error").to_string();
    assert!(error(&dir.path().join("absent"), &LoadOptions::default()).contains("does not exist"));
    assert!(error(dir.path(), &LoadOptions::default()).contains("config.json"));
    let gguf = dir.path().join("model.gguf");
    std::fs::write(&gguf, b"not read").unwrap();
    let f16 = LoadOptions { dtype: WeightDtype::F16, ..LoadOptions::default() };
    assert!(error(&gguf, &f16).contains("GGUF weights keep their stored quantization"));
}
