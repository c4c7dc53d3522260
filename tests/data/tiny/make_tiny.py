"""Writes tiny random-weight GGUFs of the architectures no small real checkpoint covers here
(qwen2, qwen3, phi3), and llama.cpp's logits on them, the reference
`engine/tests/tiny_architectures.rs` holds the engine to.

    python3 -m venv .cache/golden-venv
    .cache/golden-venv/bin/pip install llama-cpp-python==0.3.36 gguf==0.19.0 numpy
    .cache/golden-venv/bin/python tests/data/tiny/make_tiny.py

Each model has 2 layers, a width of 64 and a 400-token byte-level BPE vocabulary with the `qwen2`
pre-tokenizer (Qwen's digit and punctuation splitting); its projections are Q8_0, its norms and
embeddings f32. The weights come from a fixed-seed generator, written once and committed beside
the logits (`<arch>.gguf`, `tiny-logits.json`), so the test needs neither Python nor llama.cpp.
"""

import json
from pathlib import Path

import gguf
import numpy as np
from llama_cpp import Llama

HERE = Path(__file__).resolve().parent
VERSION = "llama-cpp-python 0.3.36, gguf 0.19.0"

HIDDEN, LAYERS, HEADS, KV_HEADS, FFN, CONTEXT = 64, 2, 4, 2, 128, 256
# Per architecture: the head size, and which optional parts it has.
ARCHS = {
    "qwen2": {"head_dim": 16, "bias": True},
    # Qwen3's head size is its own: 4 heads of 32 are 128 wide on a 64-wide residual.
    "qwen3": {"head_dim": 32, "qk_norm": True},
    "phi3": {"head_dim": 16, "fused": True},
}

# Token ids the logits are taken along (a prompt of 24 tokens, every position's logits kept).
SEQUENCE = [1, 300, 17, 45, 301, 88, 302, 120, 9, 303, 250, 304, 33, 305, 61, 306, 200, 2, 307, 99, 308, 150, 309, 77]

# Texts whose token ids the reference also records, to hold the `qwen2` pre-tokenizer to llama.cpp's.
TEXTS = [
    "Hello world, the answer is 12345!",
    "  two spaces\tand a tab\n\nnewlines   and 3.14159",
    "I'm here; you're there. They'll come, we've gone.",
    "x=f(a,b)+g[c]*2 // comment",
    "Émigré café — naïve façade 🦀",
]


def byte_chars() -> list:
    """GPT-2's printable stand-in for each byte."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def vocabulary() -> tuple:
    """Three special tokens, the 256 bytes, then merged pieces up to 400 tokens."""
    b = byte_chars()
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + b
    types = [3, 3, 3] + [1] * 256
    pieces = ["Ġt", "he", "Ġthe", "in", "er", "an", "Ġa", "re", "on", "Ġw", "or", "Ġs", "en", "at", "es", "is", "Ġc",
              "ll", "ou", "Ġh", "ed", "it", "Ġo", "Ġf", "ar", "Ġb", "ĠI", "'s", "'re", "'ll", "'ve", "ĠĠ", "ĠĠĠ",
              "12", "34", "Ġ1", "ĠHe", "llo", "Hello", "Ġwor", "ld", "Ġworld", "Ġan", "sw", "Ġans", "Ġanswer", "wer",
              "ĊĊ", "Ġ=", "()", "Ġ//", "Ġcom", "ment", "Ġcomment"]
    merges = []
    for p in pieces:
        # Every piece is the merge of its longest known prefix and the rest.
        for cut in range(len(p) - 1, 0, -1):
            left, right = p[:cut], p[cut:]
            if left in tokens and right in tokens:
                merges.append(f"{left} {right}")
                tokens.append(p)
                types.append(1)
                break
    while len(tokens) < 400:
        tokens.append(f"<unused{len(tokens)}>")
        types.append(3)
    return tokens, types, merges


def write(arch: str, spec: dict, rng: np.random.Generator) -> Path:
    hd = spec["head_dim"]
    q_dim, kv_dim = HEADS * hd, KV_HEADS * hd
    tokens, types, merges = vocabulary()
    path = HERE / f"{arch}.gguf"
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(CONTEXT)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(hd)
    if hd != HIDDEN // HEADS:
        w.add_key_length(hd)
        w.add_value_length(hd)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)

    def mat(rows, cols, scale=None):
        scale = scale or 1.0 / np.sqrt(cols)
        return (rng.standard_normal((rows, cols)) * scale).astype(np.float32)

    def norm(n):
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    def q8(name, data):
        q8_0 = gguf.GGMLQuantizationType.Q8_0
        w.add_tensor(name, gguf.quants.quantize(data, q8_0), raw_dtype=q8_0)

    w.add_tensor("token_embd.weight", mat(len(tokens), HIDDEN, 1.0))
    w.add_tensor("output_norm.weight", norm(HIDDEN))
    # A sharper head than the layers', so that many positions have a clear greedy choice.
    w.add_tensor("output.weight", mat(len(tokens), HIDDEN, 4.0 / np.sqrt(HIDDEN)))
    for i in range(LAYERS):
        n = lambda t: f"blk.{i}.{t}"
        w.add_tensor(n("attn_norm.weight"), norm(HIDDEN))
        w.add_tensor(n("ffn_norm.weight"), norm(HIDDEN))
        if spec.get("fused"):
            q8(n("attn_qkv.weight"), mat(q_dim + 2 * kv_dim, HIDDEN))
            q8(n("ffn_up.weight"), mat(2 * FFN, HIDDEN))
        else:
            q8(n("attn_q.weight"), mat(q_dim, HIDDEN))
            q8(n("attn_k.weight"), mat(kv_dim, HIDDEN))
            q8(n("attn_v.weight"), mat(kv_dim, HIDDEN))
            q8(n("ffn_gate.weight"), mat(FFN, HIDDEN))
            q8(n("ffn_up.weight"), mat(FFN, HIDDEN))
        q8(n("attn_output.weight"), mat(HIDDEN, q_dim))
        q8(n("ffn_down.weight"), mat(HIDDEN, FFN))
        if spec.get("bias"):
            for t, d in [("attn_q", q_dim), ("attn_k", kv_dim), ("attn_v", kv_dim)]:
                w.add_tensor(n(f"{t}.bias"), (0.1 * rng.standard_normal(d)).astype(np.float32))
        if spec.get("qk_norm"):
            w.add_tensor(n("attn_q_norm.weight"), norm(hd))
            w.add_tensor(n("attn_k_norm.weight"), norm(hd))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def main() -> None:
    reference = {"reference": VERSION, "sequence": SEQUENCE, "models": {}}
    for seed, (arch, spec) in enumerate(ARCHS.items()):
        path = write(arch, spec, np.random.default_rng(seed))
        llm = Llama(model_path=str(path), n_ctx=CONTEXT, n_threads=2, logits_all=True, verbose=False)
        llm.eval(SEQUENCE)
        logits = [[round(float(x), 5) for x in llm.scores[i]] for i in range(len(SEQUENCE))]
        texts = [{"text": t, "token_ids": llm.tokenize(t.encode(), add_bos=False, special=False)} for t in TEXTS]
        reference["models"][arch] = {"file": path.name, "logits": logits, "tokenizations": texts}
        print(arch, path.stat().st_size, "bytes; argmax", [int(np.argmax(r)) for r in logits][:8])
    (HERE / "tiny-logits.json").write_text(json.dumps(reference))


if __name__ == "__main__":
    main()
