"""Writes tiny random-weight GGUFs of the architectures no small real checkpoint covers here
(qwen2, qwen3, phi3, and gemma3 with a window short enough to cross), llama.cpp's logits on them,
and the same weights as Hugging Face folders: the reference `engine/tests/tiny_architectures.rs`
holds the engine to.

    python3 -m venv .cache/golden-venv
    .cache/golden-venv/bin/pip install llama-cpp-python==0.3.36 gguf==0.19.0 numpy
    .cache/golden-venv/bin/python tests/data/tiny/make_tiny.py

The qwen3 model also carries Qwen3's own chat template (Qwen3-0.6B's, as llama.cpp's sources keep
it; `<think>`, `</think>`, `<tool_call>` and `</tool_call>` are user-defined tokens of its vocabulary),
and `qwen3-chat.json` records how Hugging Face `transformers` renders conversations with it (reasoning
on and off through `enable_thinking`, history with reasoning, tools, a tool round) and llama.cpp's
token ids for each rendering: the reference `tests/tests/qwen3.rs` holds the router to.
`transformers` renders only (no weights; pip install transformers==4.57.1 into the same venv).

Each model has 2 layers (gemma3: 6, the last one global), a width of 64 and a 400-token byte-level
BPE vocabulary with the `qwen2` pre-tokenizer (Qwen's digit and punctuation splitting); its
projections are Q8_0, its norms and embeddings f32. The weights come from a fixed-seed generator,
written once and committed beside the logits (`<arch>.gguf`, `tiny-logits.json`), so the test
needs neither Python nor llama.cpp. `<arch>-hf/` holds the GGUF's values under Hugging Face's
names and config (f32 safetensors, Gemma's norms without the +1 its GGUF bakes in).
"""

import copy
import json
from pathlib import Path

import gguf
import numpy as np
from llama_cpp import Llama

HERE = Path(__file__).resolve().parent
VERSION = "llama-cpp-python 0.3.36, gguf 0.19.0"
TEMPLATE_VERSION = "transformers 4.57.1, llama-cpp-python 0.3.36"
# Qwen3's chat template, from the llama.cpp sources `scripts/setup-llama-cpp.sh` unpacks.
QWEN3_TEMPLATE = HERE.parents[2] / ".cache/llama.cpp/src/vendor/llama.cpp/models/templates/Qwen-Qwen3-0.6B.jinja"
# Qwen3's tags, as user-defined tokens in the last slots of its vocabulary.
QWEN3_TAGS = ["<tool_call>", "</tool_call>", "<think>", "</think>"]

HIDDEN, LAYERS, HEADS, KV_HEADS, FFN, CONTEXT = 64, 2, 4, 2, 128, 256
# Per architecture: the head size, and which optional parts it has.
ARCHS = {
    "qwen2": {"head_dim": 16, "bias": True},
    # Qwen3's head size is its own: 4 heads of 32 are 128 wide on a 64-wide residual.
    "qwen3": {"head_dim": 32, "qk_norm": True},
    "phi3": {"head_dim": 16, "fused": True},
    # Sliding-window layers of 8 positions, five of them before the global sixth.
    "gemma3": {"head_dim": 16, "qk_norm": True, "post_norms": True, "layers": 6, "window": 8, "tied": True},
}

HF_ARCH = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "phi3": "Phi3ForCausalLM",
           "gemma3": "Gemma3ForCausalLM"}

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


def vocabulary(arch: str) -> tuple:
    """Three special tokens, the 256 bytes, then merged pieces up to 400 tokens (Qwen3's tags last)."""
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
    tags = QWEN3_TAGS if arch == "qwen3" else []
    while len(tokens) < 400 - len(tags):
        tokens.append(f"<unused{len(tokens)}>")
        types.append(3)
    return tokens + tags, types + [4] * len(tags), merges


def write(arch: str, spec: dict, rng: np.random.Generator) -> tuple:
    """The GGUF, and its tensors' values by GGUF name (dequantized where quantized)."""
    hd, layers = spec["head_dim"], spec.get("layers", LAYERS)
    values = {}
    q_dim, kv_dim = HEADS * hd, KV_HEADS * hd
    tokens, types, merges = vocabulary(arch)
    path = HERE / f"{arch}.gguf"
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(CONTEXT)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(layers)
    if spec.get("window"):
        w.add_sliding_window(spec["window"])
        w.add_rope_freq_base(1000000.0)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-6)
    if not spec.get("window"):
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
    if arch == "qwen3":
        w.add_chat_template(QWEN3_TEMPLATE.read_text())

    def mat(rows, cols, scale=None):
        scale = scale or 1.0 / np.sqrt(cols)
        return (rng.standard_normal((rows, cols)) * scale).astype(np.float32)

    def norm(n):
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    def q8(name, data):
        q8_0 = gguf.GGMLQuantizationType.Q8_0
        quantized = gguf.quants.quantize(data, q8_0)
        w.add_tensor(name, quantized, raw_dtype=q8_0)
        values[name] = gguf.quants.dequantize(quantized, q8_0).reshape(data.shape)

    def f32(name, data):
        w.add_tensor(name, data)
        values[name] = data

    # A tied head (Gemma) is the embedding: large enough for clear greedy choices.
    f32("token_embd.weight", mat(len(tokens), HIDDEN, 0.25 if spec.get("tied") else 1.0))
    f32("output_norm.weight", norm(HIDDEN))
    if not spec.get("tied"):
        # A sharper head than the layers', so that many positions have a clear greedy choice.
        f32("output.weight", mat(len(tokens), HIDDEN, 4.0 / np.sqrt(HIDDEN)))
    for i in range(layers):
        n = lambda t: f"blk.{i}.{t}"
        f32(n("attn_norm.weight"), norm(HIDDEN))
        f32(n("ffn_norm.weight"), norm(HIDDEN))
        if spec.get("post_norms"):
            f32(n("post_attention_norm.weight"), norm(HIDDEN))
            f32(n("post_ffw_norm.weight"), norm(HIDDEN))
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
                f32(n(f"{t}.bias"), (0.1 * rng.standard_normal(d)).astype(np.float32))
        if spec.get("qk_norm"):
            f32(n("attn_q_norm.weight"), norm(hd))
            f32(n("attn_k_norm.weight"), norm(hd))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path, values


def hf_name(arch: str, name: str) -> str:
    """A GGUF tensor name as Hugging Face's checkpoints name it."""
    top = {"token_embd.weight": "model.embed_tokens.weight", "output.weight": "lm_head.weight",
           "output_norm.weight": "model.norm.weight"}
    if name in top:
        return top[name]
    _, layer, rest = name.split(".", 2)
    tensor, kind = rest.rsplit(".", 1)
    ffn_norm = "pre_feedforward_layernorm" if arch == "gemma3" else "post_attention_layernorm"
    parts = {
        "attn_norm": "input_layernorm", "ffn_norm": ffn_norm, "post_attention_norm": "post_attention_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "attn_qkv": "self_attn.qkv_proj",
        "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm", "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.gate_up_proj" if arch == "phi3" else "mlp.up_proj", "ffn_down": "mlp.down_proj",
    }
    return f"model.layers.{layer}.{parts[tensor]}.{kind}"


def write_safetensors(path: Path, tensors: dict) -> None:
    """The safetensors format by hand: a JSON header of offsets, then the f32 data."""
    header, data, offset = {}, [], 0
    for name in sorted(tensors):
        raw = np.ascontiguousarray(tensors[name], dtype="<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(tensors[name].shape), "data_offsets": [offset, offset + len(raw)]}
        data.append(raw)
        offset += len(raw)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + b"".join(data))


def write_hf(arch: str, spec: dict, values: dict) -> Path:
    """The GGUF's values as a Hugging Face folder: config, safetensors, tokenizer."""
    folder = HERE / f"{arch}-hf"
    folder.mkdir(exist_ok=True)
    tensors = {}
    for name, v in values.items():
        # Gemma's RMSNorm multiplies by 1 + w; its GGUF stores 1 + w.
        if arch == "gemma3" and name.endswith("norm.weight"):
            v = v - 1.0
        tensors[hf_name(arch, name)] = v
    write_safetensors(folder / "model.safetensors", tensors)
    hd, layers = spec["head_dim"], spec.get("layers", LAYERS)
    config = {
        "architectures": [HF_ARCH[arch]], "model_type": arch, "hidden_size": HIDDEN, "intermediate_size": FFN,
        "num_hidden_layers": layers, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
        "head_dim": hd, "max_position_embeddings": CONTEXT, "rms_norm_eps": 1e-6, "vocab_size": 400,
        "rope_theta": 10000.0, "tie_word_embeddings": bool(spec.get("tied")), "bos_token_id": 1, "eos_token_id": 2,
    }
    if arch == "gemma3":
        config.update(hidden_activation="gelu_pytorch_tanh", rope_theta=1000000.0, rope_local_base_freq=10000.0,
                      sliding_window=spec["window"], sliding_window_pattern=6, query_pre_attn_scalar=hd,
                      final_logit_softcapping=None, attn_logit_softcapping=None)
    else:
        config["hidden_act"] = "silu"
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    tokens, types, merges = vocabulary(arch)
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None, "normalizer": None, "post_processor": None,
        "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": types[i] == 3}
                         for i, t in enumerate(tokens) if types[i] in (3, 4)],
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "vocab": {t: i for i, t in enumerate(tokens)}, "merges": merges},
    }
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    tokenizer_config = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}
    if arch == "qwen3":
        tokenizer_config["chat_template"] = QWEN3_TEMPLATE.read_text()
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return folder


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Température à Paris, in °C (<100 & >-50)",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}

# Conversations as a client sends them (OpenAI's shape: tool-call arguments as JSON text).
CHATS = [
    {"name": "plain", "messages": [{"role": "user", "content": "What is 2+2?"}]},
    {"name": "thinking off", "messages": [{"role": "user", "content": "What is 2+2?"}],
     "chat_template_kwargs": {"enable_thinking": False}},
    {"name": "thinking on", "messages": [{"role": "user", "content": "What is 2+2?"}],
     "chat_template_kwargs": {"enable_thinking": True}},
    {"name": "history drops old reasoning", "messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "<think>\nTwo and two.\n</think>\n\n4"},
        {"role": "user", "content": "And 3+3?"}], "chat_template_kwargs": {"enable_thinking": False}},
    {"name": "reasoning_content of the last turn", "messages": [
        {"role": "user", "content": "What is 3+3?"},
        {"role": "assistant", "content": "6", "reasoning_content": "Three and three."}],
     "add_generation_prompt": False},
    {"name": "tools", "messages": [{"role": "system", "content": "You help."},
                                   {"role": "user", "content": "Weather in Paris?"}], "tools": [WEATHER]},
    {"name": "a tool round", "tools": [WEATHER], "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": "{\"city\": \"Paris\", \"days\": 2}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp\": 21}"},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]},
]


def qwen3_chats(folder: Path, llm: Llama) -> list:
    """Each conversation as transformers renders it with Qwen3's template, and llama.cpp's ids for it."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"),
                                  chat_template=QWEN3_TEMPLATE.read_text())
    out = []
    for chat in CHATS:
        messages = copy.deepcopy(chat["messages"])
        # As vLLM passes them: tool-call arguments parsed into objects.
        for m in messages:
            for call in m.get("tool_calls", []):
                call["function"]["arguments"] = json.loads(call["function"]["arguments"])
        text = tok.apply_chat_template(messages, tools=chat.get("tools"), tokenize=False,
                                       add_generation_prompt=chat.get("add_generation_prompt", True),
                                       **chat.get("chat_template_kwargs", {}))
        ids = llm.tokenize(text.encode(), add_bos=False, special=True)
        out.append({**chat, "text": text, "token_ids": ids})
    return out


def main() -> None:
    reference = {"reference": VERSION, "sequence": SEQUENCE, "models": {}}
    for seed, (arch, spec) in enumerate(ARCHS.items()):
        path, values = write(arch, spec, np.random.default_rng(seed))
        write_hf(arch, spec, values)
        llm = Llama(model_path=str(path), n_ctx=CONTEXT, n_threads=2, logits_all=True, verbose=False)
        llm.eval(SEQUENCE)
        logits = [[round(float(x), 5) for x in llm.scores[i]] for i in range(len(SEQUENCE))]
        texts = [{"text": t, "token_ids": llm.tokenize(t.encode(), add_bos=False, special=False)} for t in TEXTS]
        reference["models"][arch] = {"file": path.name, "logits": logits, "tokenizations": texts}
        print(arch, path.stat().st_size, "bytes; argmax", [int(np.argmax(r)) for r in logits][:8])
        if arch == "qwen3":
            chats = {"reference": TEMPLATE_VERSION, "model": path.name, "chats": qwen3_chats(HERE / "qwen3-hf", llm)}
            (HERE / "qwen3-chat.json").write_text(json.dumps(chats, indent=1, ensure_ascii=False) + "\n")
    (HERE / "tiny-logits.json").write_text(json.dumps(reference))


if __name__ == "__main__":
    main()
