//! Every weight format with a kernel, in one real model: the default model
//! rewritten with its projections in `Q4_0`, `Q5_0`, `Q5_1`, `Q8_0`,
//! `Q4_K`, `Q5_K` and `Q6_K` (Q, K and V of different formats in one
//! layer, as in llama.cpp's `Q4_K_M` files), loaded without any
//! requantization, and run against llama.cpp's greedy outputs for the
//! original file and against the same weights dequantized to f32.
//!
//! Needs the model: `scripts/fetch-model.sh`, or `PDSERVE_MODEL=<gguf>`.

mod common;

use std::fs::File;
use std::io::BufReader;

use candle_core::quantized::gguf_file::{self, Content};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Device;
use common::{agreement, argmax, golden, model_path, teacher_forced_logits};

/// The format tensor `name` of `cols` columns is rewritten in: K-quants
/// where the width allows (multiples of 256, as llama.cpp requires), the
/// 32-value formats elsewhere, varied by layer so every pairing occurs.
fn format_of(name: &str, cols: usize) -> Option<GgmlDType> {
    let layer: usize = name.strip_prefix("blk.")?.split('.').next()?.parse().ok()?;
    let pick = |options: &[GgmlDType]| options[layer % options.len()];
    let kind = name.split('.').nth(2)?;
    Some(match kind {
        "attn_q" | "attn_k" => pick(&[GgmlDType::Q5_0, GgmlDType::Q5_1, GgmlDType::Q8_0]),
        "attn_v" => pick(&[GgmlDType::Q8_0, GgmlDType::Q5_0]),
        "attn_output" => pick(&[GgmlDType::Q4_0, GgmlDType::Q8_0]),
        "ffn_gate" | "ffn_up" => pick(&[GgmlDType::Q8_0, GgmlDType::Q5_1]),
        "ffn_down" if cols.is_multiple_of(256) => pick(&[GgmlDType::Q6K, GgmlDType::Q5K, GgmlDType::Q4K]),
        _ => return None,
    })
}

/// Writes the mixed-format copy of the default model into `dir`; with
/// `dense`, its rewritten tensors dequantized to f32 (the same values).
fn rewrite(dir: &std::path::Path, dense: bool) -> std::path::PathBuf {
    let path = model_path();
    let mut reader = BufReader::new(File::open(&path).unwrap());
    let content = Content::read(&mut reader).unwrap();
    let mut tensors = Vec::new();
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    for name in names {
        let t = content.tensor(&mut reader, name, &Device::Cpu).unwrap();
        let dims = t.shape().dims().to_vec();
        let t = match format_of(name, *dims.last().unwrap()) {
            Some(dtype) => {
                let t = QTensor::quantize(&t.dequantize(&Device::Cpu).unwrap(), dtype).unwrap();
                if dense {
                    QTensor::quantize(&t.dequantize(&Device::Cpu).unwrap(), GgmlDType::F32).unwrap()
                } else {
                    t
                }
            }
            None => t,
        };
        tensors.push((name.clone(), t));
    }
    let metadata: Vec<(&str, &gguf_file::Value)> = content.metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let out = dir.join(if dense { "dense.gguf" } else { "mixed.gguf" });
    gguf_file::write(&mut File::create(&out).unwrap(), &metadata, &tensors).unwrap();
    out
}

/// Teacher-forced logits of `model` along each golden record (16 steps).
fn logits_along_golden(model: &engine::model::Llama) -> Vec<Vec<Vec<f32>>> {
    golden().iter().map(|r| teacher_forced_logits(model, r, r.completion.len().min(16))).collect()
}

/// The gap between the two largest values.
fn margin(row: &[f32]) -> f32 {
    let (mut a, mut b) = (f32::MIN, f32::MIN);
    for &x in row {
        if x > a {
            (a, b) = (x, a);
        } else if x > b {
            b = x;
        }
    }
    a - b
}

#[test]
fn a_model_of_every_format_agrees_with_llama_cpp_and_with_its_own_values() {
    let dir = tempfile::tempdir().unwrap();
    let load = |dense| engine::model::load_gguf(&rewrite(dir.path(), dense)).unwrap().model;
    let ours = logits_along_golden(&load(false));
    let (mut agree, mut total) = (0, 0);
    for (r, rows) in golden().iter().zip(&ours) {
        let (a, t) = agreement(r, rows);
        (agree, total) = (agree + a, total + t);
    }
    let rate = agree as f64 / total as f64;
    println!("mixed formats: teacher-forced agreement with llama.cpp {agree}/{total} = {:.1}%", rate * 100.0);
    // The rewrite quantizes the file's quantized weights again, so this
    // model is not quite llama.cpp's: the bar is below the original's 95%.
    assert!(rate >= 0.9, "agreement {:.1}% < 90%", rate * 100.0);

    // Against the very values of this file, only the activations'
    // quantization differs: the greedy token at every clear position.
    let dense = logits_along_golden(&load(true));
    let (mut same, mut clear, mut worst) = (0, 0, 0.0f32);
    let (mut sum, mut count) = (0.0f64, 0usize);
    for (a, b) in ours.iter().flatten().zip(dense.iter().flatten()) {
        worst = worst.max(a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max));
        sum += a.iter().zip(b).map(|(x, y)| f64::from((x - y).abs())).sum::<f64>();
        count += a.len();
        if margin(b) >= 0.5 {
            clear += 1;
            same += usize::from(argmax(a) == argmax(b));
        }
    }
    let mean = sum / count as f64;
    println!("mixed formats against their f32 values: greedy equal at {same}/{clear} clear positions, logit difference mean {mean:.4} largest {worst:.3}");
    assert_eq!(same, clear, "greedy differs from the f32 weights at a clear position");
    // The default model's own Q4_1 kernels, checked the same way, differ by
    // 0.20 on average (activations quantized to 8 bits); this mix by 0.26.
    assert!(mean < 0.5, "logits differ from the f32 weights' by {mean} on average");
}
