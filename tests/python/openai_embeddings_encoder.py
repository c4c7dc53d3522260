"""Embeddings from a BERT encoder through the router, against Sentence-Transformers' own.

Usage: openai_embeddings_encoder.py BASE_URL MODEL REFERENCE_JSON
REFERENCE_JSON is tests/data/golden/minilm-embeddings.json (all-MiniLM-L6-v2's embeddings as
`SentenceTransformer.encode` makes them: mean pooling, L2-normalized). The router must serve the
model's own pooling when a request names none, rank as the reference similarities do, and refuse
generation. Exits non-zero with a message when anything is off.
"""

import json
import math
import sys
import urllib.error
import urllib.request

import openai

# The same model in f32: float noise only.
SAME = 0.9999


def cosine(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def post(url, body):
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request) as answer:
            return answer.status, json.load(answer)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def main() -> None:
    base_url, model, reference = sys.argv[1], sys.argv[2], sys.argv[3]
    doc = json.load(open(reference))
    records = doc["records"]
    texts = [r["text"] for r in records]
    client = openai.OpenAI(base_url=base_url, api_key="unused")

    # base64 (what the SDK asks for, and decodes, unless told otherwise) and float: [CLS] ... [SEP]
    # token counts, Sentence-Transformers' vectors.
    for encoding in ["base64", "float"]:
        extra = {"encoding_format": "float"} if encoding == "float" else {}
        got = client.embeddings.create(model=model, input=texts, **extra)
        prompt_tokens = sum(len(r["prompt_token_ids"]) for r in records)
        assert got.usage.prompt_tokens == prompt_tokens, (got.usage, prompt_tokens)
        for d, r in zip(got.data, records):
            assert len(d.embedding) == 384, len(d.embedding)
            c = cosine(d.embedding, r["embedding"])
            assert c >= SAME, f"{encoding} {r['text']!r}: cosine {c} to Sentence-Transformers'"

    # Token ids (with [CLS] and [SEP], as the reference tokenized them) give the same vector.
    ids = client.embeddings.create(model=model, input=records[0]["prompt_token_ids"], encoding_format="float")
    assert cosine(ids.data[0].embedding, records[0]["embedding"]) >= SAME

    # Asking for the last token's pooling is honoured: another vector.
    status, last = post(f"{base_url}/embeddings", {"model": model, "input": texts[0], "pooling": "last"})
    assert status == 200, last
    assert cosine(last["data"][0]["embedding"], records[0]["embedding"]) < 0.99, "pooling: last was ignored"

    # /pooling answers the same vectors as `pooling` objects.
    root = base_url.removesuffix("/v1")
    status, pooled = post(f"{root}/pooling", {"model": model, "input": texts[:2]})
    assert status == 200 and pooled["object"] == "list", pooled
    assert [d["object"] for d in pooled["data"]] == ["pooling", "pooling"], pooled["data"]
    assert cosine(pooled["data"][1]["data"], records[1]["embedding"]) >= SAME

    # /v1/rerank orders the documents as the reference similarities do.
    rerank = doc["rerank"]
    status, ranked = post(f"{base_url}/rerank", {"model": model, "query": rerank["query"], "documents": rerank["documents"]})
    assert status == 200, ranked
    want = sorted(range(len(rerank["scores"])), key=lambda i: -rerank["scores"][i])
    assert [r["index"] for r in ranked["results"]] == want, (ranked["results"], rerank["scores"])
    for r in ranked["results"]:
        assert abs(r["relevance_score"] - rerank["scores"][r["index"]]) < 1e-3, r

    # The card says the model's size: another `dimensions` is refused, naming it.
    try:
        client.embeddings.create(model=model, input=texts[0], dimensions=128)
        raise AssertionError("dimensions=128 was accepted")
    except openai.BadRequestError as e:
        assert e.body["param"] == "dimensions", e.body
    assert len(client.embeddings.create(model=model, input=texts[0], dimensions=384).data[0].embedding) == 384

    # An encoder does not generate: a 400 naming `model`, for chat and completions alike.
    for create in [
        lambda: client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}]),
        lambda: client.completions.create(model=model, prompt="Hi", max_tokens=4),
    ]:
        try:
            create()
            raise AssertionError("an encoder generated")
        except openai.BadRequestError as e:
            assert e.body["param"] == "model", e.body
            assert "embedding model" in e.body["message"], e.body
    print("openai encoder embeddings ok")


if __name__ == "__main__":
    main()
