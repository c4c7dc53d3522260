"""The Responses API through the router with the official `openai` package.

The router runs over a mock decode worker whose answer is a fixed Hermes tool
call, so this checks the router's translation and output items and the SDK
reading them (its `Response` model and its typed stream events), not a model.

Usage: openai_responses.py BASE_URL MODEL
Exits non-zero with a message when anything is off.
"""

import json
import sys

import openai

TOOLS = [{
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}]

CITY = {
    "type": "json_schema",
    "name": "city",
    "schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    "strict": True,
}


def main() -> None:
    base_url, model = sys.argv[1], sys.argv[2]
    client = openai.OpenAI(base_url=base_url, api_key="unused")
    question = "What is the weather in Paris?"

    # Without tools the mock's call is plain text: one message item.
    plain = client.responses.create(model=model, input=question, instructions="Be brief.", max_output_tokens=64,
                                    metadata={"run": "sdk"})
    assert plain.object == "response" and plain.id.startswith("resp_"), plain
    assert plain.status == "completed", plain
    assert [item.type for item in plain.output] == ["message"], plain.output
    assert "get_weather" in plain.output_text, plain.output_text
    assert plain.instructions == "Be brief." and plain.metadata == {"run": "sdk"}, plain
    assert plain.usage.input_tokens > 0 and plain.usage.output_tokens > 0, plain.usage
    assert plain.usage.total_tokens == plain.usage.input_tokens + plain.usage.output_tokens, plain.usage

    called = client.responses.create(model=model, input=question, tools=TOOLS, max_output_tokens=64)
    calls = [item for item in called.output if item.type == "function_call"]
    assert len(calls) == 1, called.output
    assert calls[0].name == "get_weather" and calls[0].call_id, calls[0]
    assert json.loads(calls[0].arguments) == {"city": "Paris"}, calls[0].arguments

    # The agent loop: the call and its output go back as input, with nothing stored.
    history = [{"role": "user", "content": question}, calls[0].model_dump(exclude_none=True),
               {"type": "function_call_output", "call_id": calls[0].call_id, "output": "Sunny, 21 C"}]
    again = client.responses.create(model=model, input=history, tools=TOOLS, max_output_tokens=64)
    assert again.status == "completed", again

    structured = client.responses.create(model=model, input=question, text={"format": CITY}, max_output_tokens=64)
    assert structured.text.format.type == "json_schema", structured.text
    assert structured.status == "completed", structured

    try:
        client.responses.create(model=model, input=question, previous_response_id="resp_earlier")
        raise AssertionError("previous_response_id was accepted")
    except openai.BadRequestError as e:
        assert e.body["param"] == "previous_response_id", e.body

    stream = client.responses.create(model=model, input=question, tools=TOOLS, max_output_tokens=64, stream=True)
    kinds, sequence, completed = [], [], None
    for event in stream:
        kinds.append(event.type)
        sequence.append(event.sequence_number)
        if event.type == "response.completed":
            completed = event.response
    assert kinds[:2] == ["response.created", "response.in_progress"], kinds
    assert kinds[-1] == "response.completed" and completed is not None, kinds
    assert sequence == list(range(len(sequence))), sequence
    assert "response.function_call_arguments.done" in kinds, kinds
    streamed = [item for item in completed.output if item.type == "function_call"]
    assert len(streamed) == 1 and json.loads(streamed[0].arguments) == {"city": "Paris"}, completed.output
    assert completed.usage.output_tokens == called.usage.output_tokens, (completed.usage, called.usage)

    text = ""
    for event in client.responses.create(model=model, input=question, max_output_tokens=64, stream=True):
        if event.type == "response.output_text.delta":
            text += event.delta
    assert text == plain.output_text, (text, plain.output_text)
    print("openai responses ok")


if __name__ == "__main__":
    main()
