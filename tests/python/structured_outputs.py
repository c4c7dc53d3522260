"""Structured outputs through the router with the official `openai` package, checked by an
independent validator (the `jsonschema` package).

Usage: structured_outputs.py BASE_URL MODEL SCHEMAS_JSON
  (BASE_URL like http://127.0.0.1:8000/v1; SCHEMAS_JSON a list of {name, prompt, schema})
Every schema is asked at temperature 0 and at temperature 1 with two seeds; every answer must
finish with "stop" and validate. Then `parse()` with a Pydantic model returns a parsed object,
and `json_object` returns a JSON object. Exits non-zero with a message when anything is off.
"""

import json
import sys
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pydantic

RUNS = [{"temperature": 0}, {"temperature": 1, "seed": 11}, {"temperature": 1, "seed": 12}]


def ask(client, model, case, run):
    response = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": case["prompt"] + " Answer in JSON."}],
        max_tokens=512,
        response_format={"type": "json_schema", "json_schema": {"name": case["name"], "schema": case["schema"], "strict": True}},
        **run,
    )
    choice = response.choices[0]
    text = choice.message.content
    where = f"{case['name']} {run}: {text!r}"
    if choice.finish_reason != "stop":
        return f"{where}: finish_reason {choice.finish_reason}"
    try:
        jsonschema.validate(json.loads(text), case["schema"], cls=jsonschema.Draft202012Validator,
                            format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    except (ValueError, jsonschema.ValidationError) as e:
        return f"{where}: {e}"
    return None


class City(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=30)
    country: str = pydantic.Field(max_length=30)
    population_millions: int = pydantic.Field(ge=0, le=50)


def main() -> None:
    base_url, model, schemas = sys.argv[1], sys.argv[2], sys.argv[3]
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600)
    cases = json.load(open(schemas))
    assert len(cases) >= 30, len(cases)
    jobs = [(case, run) for case in cases for run in RUNS]
    # Concurrent, so the engine batches them as it batches any clients.
    with ThreadPoolExecutor(8) as pool:
        failures = [f for f in pool.map(lambda job: ask(client, model, *job), jobs) if f]
    if failures:
        sys.exit(f"{len(failures)} of {len(jobs)} answers failed:\n" + "\n".join(failures))
    print(f"{len(jobs)} answers over {len(cases)} schemas validate")

    parsed = client.chat.completions.parse(
        model=model,
        messages=[{"role": "user", "content": "Tell me about a big city."}],
        response_format=City,
        temperature=0,
        max_tokens=200,
    )
    city = parsed.choices[0].message.parsed
    assert isinstance(city, City), parsed
    print("parse() gave", city)

    any_object = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Reply with a JSON object holding one key, \"greeting\"."}],
        response_format={"type": "json_object"},
        temperature=0,
        max_tokens=100,
    )
    assert isinstance(json.loads(any_object.choices[0].message.content), dict), any_object
    print("structured outputs ok")


if __name__ == "__main__":
    main()
