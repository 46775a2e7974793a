"""The client libraries agent and app builders use, against the real server: the OpenAI
Agents SDK (tool round trips over Chat Completions and Responses), instructor
(RESPONSES_TOOLS, JSON_SCHEMA) and langchain-openai (bind_tools, with_structured_output,
embeddings). Random-weight models fill free-form strings until the cap, so the schemas
here are enums: what is tested is each library's plumbing, not the model."""

from __future__ import annotations

import asyncio
from typing import Literal

import pytest
from pydantic import BaseModel, ConfigDict


class Weather(BaseModel):
    model_config = ConfigDict(extra="forbid")  # no other keys for a random model to invent

    city: Literal["Paris", "Rome"]
    celsius: bool


@pytest.mark.parametrize("api", ["chat", "responses"])
def test_agents_sdk_runs_a_tool_round_trip(base_url, api):
    from agents import (Agent, ModelSettings, OpenAIChatCompletionsModel, OpenAIResponsesModel, Runner,
                        function_tool, set_tracing_disabled)
    from openai import AsyncOpenAI

    set_tracing_disabled(True)  # it would post traces to OpenAI
    calls: list[str] = []

    @function_tool
    def get_weather(city: Literal["Paris", "Rome"]) -> str:
        """Current weather in a city."""
        calls.append(city)
        return "sunny"

    async def run() -> str:
        client = AsyncOpenAI(base_url=f"{base_url}/v1", api_key="x")
        kind = OpenAIChatCompletionsModel if api == "chat" else OpenAIResponsesModel
        agent = Agent(name="weather", instructions="Use the tool.", tools=[get_weather], model=kind("tiny-agent", client),
                      model_settings=ModelSettings(tool_choice="required", max_tokens=60))
        result = await Runner.run(agent, "Weather in Paris?", max_turns=4)
        return result.final_output

    final = asyncio.run(run())
    assert calls and calls[0] in ("Paris", "Rome")
    assert isinstance(final, str) and "<tool_call>" not in final


def test_instructor_responses_tools_and_json_schema(base_url):
    import instructor
    from openai import OpenAI

    client = OpenAI(base_url=f"{base_url}/v1", api_key="x")
    # RESPONSES_TOOLS sends text.format together with a named tool_choice.
    tools = instructor.from_openai(client, mode=instructor.Mode.RESPONSES_TOOLS)
    weather = tools.responses.create(model="tiny-qwen2", input="Weather in Paris?", response_model=Weather,
                                     max_output_tokens=100, max_retries=0)
    assert isinstance(weather, Weather)
    schema = instructor.from_openai(client, mode=instructor.Mode.JSON_SCHEMA)
    weather = schema.chat.completions.create(model="tiny-qwen2", messages=[{"role": "user", "content": "Weather?"}],
                                             response_model=Weather, max_tokens=100, max_retries=0)
    assert isinstance(weather, Weather)


def test_langchain_tools_structured_output_and_embeddings(base_url):
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI, OpenAIEmbeddings

    @tool
    def get_weather(city: Literal["Paris", "Rome"]) -> str:
        """Current weather in a city."""
        return "sunny"

    llm = ChatOpenAI(base_url=f"{base_url}/v1", api_key="x", model="tiny-qwen2", max_tokens=100)
    # strict: no properties beyond the schema's, which a random model would invent forever.
    bound = llm.bind_tools([get_weather], tool_choice="required", parallel_tool_calls=False, strict=True)
    (call,) = bound.invoke("Weather?").tool_calls
    assert call["name"] == "get_weather" and call["args"]["city"] in ("Paris", "Rome")
    assert isinstance(llm.with_structured_output(Weather).invoke("Weather in Paris?"), Weather)
    # Its default counts tokens with tiktoken, whose encoding file comes from the internet;
    # the token arrays it then sends are tested in test_embeddings.
    embeddings = OpenAIEmbeddings(base_url=f"{base_url}/v1", api_key="x", model="all-MiniLM-L6-v2",
                                  check_embedding_ctx_length=False)
    assert len(embeddings.embed_documents(["hello world"])[0]) == 384
