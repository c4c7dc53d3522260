"""Regenerates smollm2-embeddings.json: llama.cpp's sentence embeddings of the default model.

    .cache/golden-venv/bin/python tests/data/golden/make_embeddings.py [--model GGUF] [--out FILE]

(the venv as in make_golden.py). For each sentence: its token ids (llama.cpp's tokenizer, with the
BOS the model asks for), and its embedding pooled over the final hidden states (after the output
norm) by the last token and by the mean, each L2-normalized as `llama-embedding --pooling last`
(and `mean`) print them with their default `--embd-normalize 2`.
"""

import argparse
import json
from pathlib import Path

import llama_cpp
from llama_cpp import Llama

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
THREADS = 2
VERSION = "0.3.36"

SENTENCES = [
    "The cat sits on the mat.",
    "A cat is sitting on a mat.",
    "Stock markets fell sharply on Monday.",
    "How do I bake sourdough bread?",
    "Rust is a systems programming language focused on safety.",
    "Paris is the capital of France.",
]


def embed(model: str, pooling: int) -> list[list[float]]:
    llm = Llama(model_path=model, embedding=True, pooling_type=pooling, n_ctx=512, n_batch=512, n_threads=THREADS,
                verbose=False)
    # Each sentence alone, tokenized as `tokenize(text, add_bos=True, special=False)` does.
    return [llm.embed(s, normalize=True) for s in SENTENCES]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=str(ROOT / ".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    parser.add_argument("--out", default=str(HERE / "smollm2-embeddings.json"))
    args = parser.parse_args()
    assert llama_cpp.__version__ == VERSION, f"llama-cpp-python {llama_cpp.__version__}, expected {VERSION}"
    vocab = Llama(model_path=args.model, vocab_only=True, verbose=False)
    tokens = [vocab.tokenize(s.encode(), add_bos=True, special=False) for s in SENTENCES]
    last = embed(args.model, llama_cpp.LLAMA_POOLING_TYPE_LAST)
    mean = embed(args.model, llama_cpp.LLAMA_POOLING_TYPE_MEAN)
    records = [
        {"text": s, "prompt_token_ids": ids, "last": [round(v, 7) for v in l], "mean": [round(v, 7) for v in m]}
        for s, ids, l, m in zip(SENTENCES, tokens, last, mean)
    ]
    doc = {
        "source": f"llama-cpp-python {VERSION} (llama.cpp), {Path(args.model).name}, L2-normalized",
        "records": records,
    }
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
