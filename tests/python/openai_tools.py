"""Tool calls through the router with the official `openai` package.

The router runs over a mock decode worker whose answer is a fixed Hermes tool
call, so this checks the router's parsing and the SDK reading it, not a model.

Usage: openai_tools.py BASE_URL MODEL
Exits non-zero with a message when anything is off.
"""

import json
import sys

import openai

TOOLS = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}]


def main() -> None:
    base_url, model = sys.argv[1], sys.argv[2]
    client = openai.OpenAI(base_url=base_url, api_key="unused")
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]

    full = client.chat.completions.create(model=model, messages=messages, tools=TOOLS, max_tokens=64)
    choice = full.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    calls = choice.message.tool_calls
    assert calls and len(calls) == 1, choice.message
    assert calls[0].type == "function" and calls[0].id, calls[0]
    assert calls[0].function.name == "get_weather", calls[0]
    assert json.loads(calls[0].function.arguments) == {"city": "Paris"}, calls[0].function.arguments

    # The call goes back as history with its result, as an agent loop sends it.
    history = messages + [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": calls[0].id, "content": "Sunny, 21 C"},
    ]
    again = client.chat.completions.create(model=model, messages=history, tools=TOOLS, max_tokens=64)
    assert again.choices[0].message.tool_calls, again

    stream = client.chat.completions.create(
        model=model, messages=messages, tools=TOOLS, max_tokens=64, stream=True,
        stream_options={"include_usage": True},
    )
    names, arguments, finish, usage = [], "", None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            for call in c.delta.tool_calls or []:
                if call.function and call.function.name:
                    names.append(call.function.name)
                if call.function and call.function.arguments:
                    arguments += call.function.arguments
            finish = c.finish_reason or finish
    assert names == ["get_weather"], names
    assert json.loads(arguments) == {"city": "Paris"}, arguments
    assert finish == "tool_calls", finish
    assert usage is not None and usage.completion_tokens == full.usage.completion_tokens, (usage, full.usage)
    print("openai tools ok")


if __name__ == "__main__":
    main()
