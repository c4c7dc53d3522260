"""Chat through the router with the official `openai` package, streamed and not.

Usage: openai_chat.py BASE_URL MODEL  (BASE_URL like http://127.0.0.1:8000/v1)
Exits non-zero with a message when anything is off.
"""

import sys

import openai


def main() -> None:
    base_url, model = sys.argv[1], sys.argv[2]
    client = openai.OpenAI(base_url=base_url, api_key="unused")
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]

    full = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=32)
    text = full.choices[0].message.content
    assert full.object == "chat.completion", full
    assert full.choices[0].finish_reason == "stop", full
    assert "Paris" in text, text
    assert full.usage.prompt_tokens == 42 and full.usage.completion_tokens > 0, full.usage

    stream = client.chat.completions.create(
        model=model, messages=messages, temperature=0, max_tokens=32, stream=True,
        stream_options={"include_usage": True},
    )
    pieces, finish, usage = [], None, None
    for chunk in stream:
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            finish = choice.finish_reason or finish
        if chunk.usage is not None:
            assert not chunk.choices, ("usage rides on its own chunk", chunk)
            usage = chunk.usage
    assert "".join(pieces) == text, ("".join(pieces), text)
    assert finish == "stop", finish
    assert usage is not None, "include_usage asked for a usage chunk"
    assert (usage.prompt_tokens, usage.completion_tokens) == (
        full.usage.prompt_tokens, full.usage.completion_tokens), (usage, full.usage)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens, usage

    models = client.models.list()
    assert [m.id for m in models.data] == [model], models
    print("openai client ok:", text)


if __name__ == "__main__":
    main()
