"""Embeddings through the router with the official `openai` package, against llama.cpp's.

Usage: openai_embeddings.py BASE_URL MODEL REFERENCE_JSON
REFERENCE_JSON is tests/data/golden/smollm2-embeddings.json (llama.cpp's last-token embeddings of
the default model, L2-normalized). Exits non-zero with a message when anything is off.
"""

import base64
import json
import math
import struct
import sys
import urllib.request

import openai

# llama.cpp sums in another order: float noise, far above two different sentences (about 0.8).
SAME = 0.999


def cosine(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def main() -> None:
    base_url, model, reference = sys.argv[1], sys.argv[2], sys.argv[3]
    records = json.load(open(reference))["records"]
    texts = [r["text"] for r in records]
    client = openai.OpenAI(base_url=base_url, api_key="unused")

    # The SDK asks for base64 unless told otherwise, and decodes it itself.
    got = client.embeddings.create(model=model, input=texts)
    assert got.object == "list" and got.model == model, got
    assert [d.index for d in got.data] == list(range(len(texts))), got.data
    prompt_tokens = sum(len(r["prompt_token_ids"]) for r in records)
    assert got.usage.prompt_tokens == prompt_tokens == got.usage.total_tokens, (got.usage, prompt_tokens)
    for d, r in zip(got.data, records):
        assert len(d.embedding) == len(r["last"]), len(d.embedding)
        assert abs(math.sqrt(sum(x * x for x in d.embedding)) - 1) < 1e-4, "not normalized"
        c = cosine(d.embedding, r["last"])
        assert c >= SAME, f"{r['text']!r}: cosine {c} to llama.cpp's"

    # float, one text; and the same input as token ids gives the same vector.
    one = client.embeddings.create(model=model, input=texts[0], encoding_format="float").data[0].embedding
    ids = client.embeddings.create(model=model, input=records[0]["prompt_token_ids"], encoding_format="float")
    assert cosine(one, ids.data[0].embedding) > 0.99999, "token ids and text differ"
    assert cosine(one, got.data[0].embedding) > 0.99999, "float and base64 differ"

    # base64 on the wire is the little-endian f32 bytes.
    raw = client.embeddings.with_raw_response.create(model=model, input=texts[0], encoding_format="base64")
    encoded = json.loads(raw.text)["data"][0]["embedding"]
    values = struct.unpack(f"<{len(one)}f", base64.b64decode(encoded))
    assert max(abs(a - b) for a, b in zip(values, one)) < 1e-6

    # Retrieval: the paraphrase is nearest to the first sentence.
    vectors = [d.embedding for d in got.data]
    nearest = max(range(1, len(vectors)), key=lambda i: cosine(vectors[0], vectors[i]))
    assert nearest == 1, (texts[0], texts[nearest])

    # /v1/rerank ranks the other sentences by their similarity to the first as llama.cpp's vectors
    # do, wherever those differ clearly, with scores at llama.cpp's cosines.
    body = json.dumps({"model": model, "query": texts[0], "documents": texts[1:]}).encode()
    request = urllib.request.Request(f"{base_url}/rerank", data=body, headers={"content-type": "application/json"})
    results = json.load(urllib.request.urlopen(request))["results"]
    reference = {i: cosine(records[0]["last"], r["last"]) for i, r in enumerate(records[1:])}
    order = [r["index"] for r in results]
    assert sorted(order) == list(range(len(texts) - 1)), order
    for pos, better in enumerate(order):
        for worse in order[pos + 1:]:
            assert reference[worse] - reference[better] < 0.005, (order, reference)
    for r in results:
        assert abs(r["relevance_score"] - reference[r["index"]]) < 0.01, (r, reference)

    # A size the model was not trained for is refused, naming `dimensions`.
    try:
        client.embeddings.create(model=model, input=texts[0], dimensions=8)
        raise AssertionError("dimensions=8 was accepted")
    except openai.BadRequestError as e:
        assert e.body["param"] == "dimensions", e.body
    print("openai embeddings ok")


if __name__ == "__main__":
    main()
