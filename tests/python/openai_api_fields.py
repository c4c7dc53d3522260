"""The response fields beyond the basics, read through the official `openai` package: completions
logprobs, `stop_reason`, cached prompt tokens, `system_fingerprint`, response ids from the request
id, and usage in every chunk of a stream.

Usage: openai_api_fields.py BASE_URL MODEL  (BASE_URL like http://127.0.0.1:8000/v1)
Exits non-zero with a message when anything is off.
"""

import math
import sys

import openai

PROMPT = (
    "The history of the city of Paris begins on an island in the river Seine, where a small tribe "
    "settled more than two thousand years ago. Over the centuries the settlement grew into"
)


def completions_logprobs(client: openai.OpenAI, model: str) -> str:
    answer = client.completions.create(
        model=model, prompt=PROMPT, temperature=0, max_tokens=12, logprobs=2,
        extra_headers={"X-Request-Id": "fields-1"},
    )
    assert answer.id == "cmpl-fields-1", answer.id
    assert answer.system_fingerprint and answer.system_fingerprint.startswith("fp_"), answer
    choice = answer.choices[0]
    lp = choice.logprobs
    assert lp is not None, choice
    n = len(lp.tokens)
    assert n == answer.usage.completion_tokens, (n, answer.usage)
    assert len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n, lp
    if choice.finish_reason == "length":
        assert "".join(lp.tokens) == choice.text, (lp.tokens, choice.text)
    offset = 0
    for token, logprob, top, at in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, lp.text_offset):
        assert at == offset, (at, offset, lp)
        offset += len(token)
        assert logprob <= 0 and math.isfinite(logprob), logprob
        # The chosen token and the 2 most likely; greedy chose the most likely.
        assert 2 <= len(top) <= 3 and top[token] == logprob, (token, top)
        assert logprob >= max(top.values()) - 1e-4, (token, top)
    return choice.text


def stop_reason(client: openai.OpenAI, model: str, text: str) -> None:
    stop = text.strip().split()[1]
    answer = client.completions.create(model=model, prompt=PROMPT, temperature=0, max_tokens=12, stop=[stop])
    choice = answer.choices[0]
    assert choice.finish_reason == "stop" and stop not in choice.text, choice
    assert choice.stop_reason == stop, choice
    free = client.completions.create(model=model, prompt=PROMPT, temperature=0, max_tokens=2)
    assert free.choices[0].finish_reason == "length" and free.choices[0].stop_reason is None, free


def cached_tokens(client: openai.OpenAI, model: str) -> None:
    messages = [{"role": "user", "content": PROMPT + " (cache check)"}]
    first = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=4)
    again = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=4)
    assert first.usage.prompt_tokens_details is not None, first.usage
    cached = again.usage.prompt_tokens_details.cached_tokens
    # The prompt's full KV blocks are in the prefix cache the second time.
    assert 0 < cached < again.usage.prompt_tokens, (first.usage, again.usage)
    assert cached > first.usage.prompt_tokens_details.cached_tokens, (first.usage, again.usage)
    stream = client.chat.completions.create(
        model=model, messages=messages, temperature=0, max_tokens=4, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True},
    )
    chunks = list(stream)
    assert all(c.usage is not None for c in chunks), [c.usage for c in chunks]
    counts = [c.usage.completion_tokens for c in chunks]
    assert counts == sorted(counts) and counts[0] == 0 and counts[-1] == 4, counts
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == cached, chunks[-1].usage


def main() -> None:
    base_url, model = sys.argv[1], sys.argv[2]
    client = openai.OpenAI(base_url=base_url, api_key="unused")
    text = completions_logprobs(client, model)
    stop_reason(client, model, text)
    cached_tokens(client, model)
    print("openai api fields ok")


if __name__ == "__main__":
    main()
