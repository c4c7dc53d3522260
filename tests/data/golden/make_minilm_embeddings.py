"""Regenerates minilm-embeddings.json: Sentence-Transformers' own embeddings of all-MiniLM-L6-v2.

    python3 -m venv .cache/st-venv && .cache/st-venv/bin/pip install sentence-transformers==6.3.0
    scripts/fetch-model.sh minilm
    .cache/st-venv/bin/python tests/data/golden/make_minilm_embeddings.py [--model DIR] [--out FILE]

For each sentence: its token ids (the folder's tokenizer, with [CLS] and [SEP]) and
`SentenceTransformer(DIR).encode(sentence)`: the model's modules in order (BERT, mean pooling over
the tokens, L2 normalization), in f32 on the CPU. A rerank set (one query, several documents) gets
the cosine similarities of the query's embedding to each document's, which order the documents.
"""

import argparse
import json
from pathlib import Path

import sentence_transformers
import torch
from sentence_transformers import SentenceTransformer

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
VERSION = "6.3.0"

SENTENCES = [
    "The cat sits on the mat.",
    "A cat is sitting on a mat.",
    "Stock markets fell sharply on Monday.",
    "How do I bake sourdough bread?",
    "Rust is a systems programming language focused on safety.",
    "Paris is the capital of France.",
    "Embeddings turn text into vectors; similar texts get nearby vectors, and a retriever ranks documents by them.",
]

QUERY = "How do I make bread at home?"
DOCUMENTS = [
    "Mix flour, water, salt and yeast, knead the dough, let it rise and bake it in a hot oven.",
    "The stock market closed higher after the central bank's announcement.",
    "Sourdough needs a starter: a fermented mix of flour and water kept alive for days.",
    "Paris is the capital and most populous city of France.",
    "A good loaf needs time: let the dough proof slowly overnight in the fridge.",
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=str(ROOT / ".cache/models/all-MiniLM-L6-v2"))
    parser.add_argument("--out", default=str(HERE / "minilm-embeddings.json"))
    args = parser.parse_args()
    assert sentence_transformers.__version__ == VERSION, f"sentence-transformers {sentence_transformers.__version__}, expected {VERSION}"
    torch.manual_seed(0)
    model = SentenceTransformer(args.model, device="cpu")
    tokens = [model.tokenizer(s)["input_ids"] for s in SENTENCES]
    vectors = model.encode(SENTENCES, convert_to_numpy=True)
    query, *documents = model.encode([QUERY] + DOCUMENTS, convert_to_numpy=True)
    scores = [float(query @ d) for d in documents]
    doc = {
        "source": f"sentence-transformers {VERSION} (torch {torch.__version__}), all-MiniLM-L6-v2, "
                  f"SentenceTransformer.encode (mean pooling, L2-normalized)",
        "records": [
            {"text": s, "prompt_token_ids": ids, "embedding": [round(float(v), 7) for v in vec]}
            for s, ids, vec in zip(SENTENCES, tokens, vectors)
        ],
        "rerank": {"query": QUERY, "documents": DOCUMENTS, "scores": [round(s, 7) for s in scores]},
    }
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
