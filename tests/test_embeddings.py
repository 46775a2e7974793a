"""Embeddings with the real all-MiniLM-L6-v2 through HTTP and the openai client."""

from __future__ import annotations

import base64
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

MODEL = "all-MiniLM-L6-v2"
EMBED = "/v1/embeddings"


def cosine(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_known_similarity_norms_dimension_and_order(client):
    texts = ["A man is eating food.", "A man is eating a piece of bread.", "The sky is blue today."]
    reply = client.embeddings.create(model=MODEL, input=texts, encoding_format="float")
    assert [d.index for d in reply.data] == [0, 1, 2]
    vectors = [d.embedding for d in reply.data]
    assert all(len(v) == 384 for v in vectors)
    assert all(abs(np.linalg.norm(v) - 1) < 1e-3 for v in vectors)
    # sentence-transformers' published behaviour for this model.
    assert cosine(vectors[0], vectors[1]) == pytest.approx(0.755, abs=0.01)
    assert cosine(vectors[0], vectors[2]) < 0.3
    assert reply.model == MODEL
    assert reply.usage.prompt_tokens == reply.usage.total_tokens > 3 * 3


def test_base64_default_of_the_openai_client_matches_float(client, http):
    texts = ["first text", "second, longer text with more words"]
    as_float = [d.embedding for d in client.embeddings.create(model=MODEL, input=texts, encoding_format="float").data]
    # The openai client asks for base64 by default and decodes it itself.
    decoded = [d.embedding for d in client.embeddings.create(model=MODEL, input=texts).data]
    np.testing.assert_allclose(decoded, as_float, rtol=0, atol=1e-7)
    raw = http.post(EMBED, json={"model": MODEL, "input": texts[0], "encoding_format": "base64"}).json()
    vector = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    # Embedded alone, not beside a longer text: an optimized BLAS sums a matmul of another
    # shape in another order, so the last float32 digits may differ (seen: 1.1e-7).
    np.testing.assert_allclose(vector, as_float[0], atol=1e-6)


def test_concurrent_single_requests_equal_one_batched_request(client):
    texts = [f"sentence number {i} about {'cats' if i % 2 else 'ships'} and {i * 7} apples" for i in range(32)]
    batched = np.array([d.embedding for d in client.embeddings.create(model=MODEL, input=texts, encoding_format="float").data])
    with ThreadPoolExecutor(32) as pool:
        singles = list(pool.map(
            lambda t: client.embeddings.create(model=MODEL, input=t, encoding_format="float").data[0].embedding, texts
        ))
    singles = np.array(singles)
    np.testing.assert_allclose(singles, batched, atol=1e-4)
    assert len({tuple(np.round(v, 4)) for v in singles}) == 32  # distinct vectors, none swapped
    assert all(cosine(s, b) > 0.9999 for s, b in zip(singles, batched))


def test_token_arrays_are_read_with_the_models_tokenizer(http, client):
    # What langchain's OpenAIEmbeddings sends by default: the texts as token arrays.
    text = "the cat sat on the mat"
    ids = [[7592, 2088], [1996, 4937, 2938, 2006, 1996, 13523]]  # MiniLM's ids for "hello world" and the text
    by_text = client.embeddings.create(model=MODEL, input=["hello world", text]).data
    response = http.post(EMBED, json={"model": MODEL, "input": ids})
    assert response.status_code == 200, response.text
    by_ids = response.json()["data"]
    for a, b in zip(by_text, by_ids):
        assert max(abs(x - y) for x, y in zip(a.embedding, b["embedding"])) < 1e-5
    one = http.post(EMBED, json={"model": MODEL, "input": ids[0]}).json()["data"]
    assert len(one) == 1 and max(abs(x - y) for x, y in zip(one[0]["embedding"], by_ids[0]["embedding"])) < 1e-5


def test_long_input_is_truncated_not_refused(client):
    reply = client.embeddings.create(model=MODEL, input="word " * 2000, encoding_format="float")
    assert reply.usage.prompt_tokens == 256  # the model's max_seq_length


@pytest.mark.parametrize(
    "body, words",
    [
        ({"model": MODEL, "input": []}, "at least one text"),
        ({"model": MODEL, "input": ""}, "input 0 is empty"),
        ({"model": MODEL, "input": ["ok", ""]}, "input 1 is empty"),
        ({"model": MODEL, "input": ["ok", 3]}, "valid string"),
        ({"model": MODEL, "input": [[1, 2], []]}, "input 1 is empty"),
        ({"model": MODEL, "input": [[101, 10**6]]}, "outside model all-MiniLM-L6-v2's vocabulary"),
        ({"model": MODEL, "input": ["x"] * 2049}, "at most 2048"),
        ({"model": MODEL, "input": "x", "dimensions": 64}, "dimensions is not supported"),
        ({"model": MODEL, "input": "x", "encoding_format": "int8"}, "encoding_format"),
        ({"model": "tiny-llama", "input": "x"}, "does not serve /v1/embeddings"),
    ],
)
def test_bad_embedding_requests(http, body, words):
    response = http.post(EMBED, json=body)
    assert response.status_code == 400, response.text
    assert words in response.json()["error"]["message"]


def test_chat_to_an_embeddings_model_is_400(http):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 400
    assert "does not serve /v1/chat/completions" in response.json()["error"]["message"]
