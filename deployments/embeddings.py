"""Text embeddings with mlx-embeddings: pooled, L2-normalized, dynamically batched.

Concurrent requests are gathered by `@serve.batch` and embedded together, a few dozen
texts per forward pass, sorted by length so that padding stays small.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ray import serve

from deployments.model_server import ModelServer
from policies.config import AppConfig, ModelEntry
from policies.errors import ApiError

# Texts per forward pass: bounds the activations of one pass (batch x length x hidden).
FORWARD_BATCH = 64


@dataclass
class Embedded:
    vectors: np.ndarray  # float32, (len(texts), dimensions), unit L2 norm
    prompt_tokens: int


def max_sequence_length(path: str, config: dict) -> int:
    """Tokens per input the model was trained for: sentence-transformers' setting first."""
    try:
        return int(json.loads((Path(path) / "sentence_bert_config.json").read_text())["max_seq_length"])
    except (OSError, ValueError, KeyError):
        return int(config.get("max_position_embeddings") or 512)


@serve.deployment(ray_actor_options={"num_cpus": 0})
class EmbeddingsModel(ModelServer):
    def __init__(self, entry: ModelEntry, config: AppConfig):
        super().__init__(entry, config)
        self.model = None
        self.tokenizer = None
        self.max_length = 512

    async def embed(self, inputs: list[str] | list[list[int]], lease_id: str) -> Embedded:
        """Texts, or token arrays in this model's own vocabulary (as OpenAI reads them),
        which are decoded to the text they stand for and embedded as such."""
        async with self.serving(lease_id):
            texts = [item if isinstance(item, str) else self._decoded(item, i) for i, item in enumerate(inputs)]
            result = await self._embed_batched(texts)
        if isinstance(result, Exception):
            raise result
        return result

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _embed_batched(self, requests: list[list[str]]) -> list[Embedded | Exception]:
        texts = [text for request in requests for text in request]
        try:
            vectors, tokens = await self.run_mlx(self._embed_all, texts)
        except Exception:
            if len(requests) == 1:
                raise
            # One request's input broke the batch: embed each alone, so it fails alone.
            return [await self._embed_alone(request) for request in requests]
        results, start = [], 0
        for request in requests:
            end = start + len(request)
            results.append(Embedded(vectors[start:end], int(tokens[start:end].sum())))
            start = end
        return results

    async def _embed_alone(self, texts: list[str]) -> Embedded | Exception:
        try:
            vectors, tokens = await self.run_mlx(self._embed_all, texts)
        except Exception as error:  # returned, not raised: it belongs to this request only
            return error
        return Embedded(vectors, int(tokens.sum()))

    def _decoded(self, ids: list[int], index: int) -> str:
        vocabulary = self.tokenizer.vocab_size
        outside = next((i for i in ids if not 0 <= i < vocabulary), None)
        if outside is not None:
            raise ApiError(
                400,
                f"input.{index}: token {outside} is outside model {self.entry.id}'s vocabulary (0-{vocabulary - 1}). "
                "Token arrays are read with the model's own tokenizer; a client that counts tokens with "
                "another one (langchain's tiktoken) should send text (check_embedding_ctx_length=False).",
                param=f"input.{index}",
            )
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # -- MLX thread -----------------------------------------------------------------------

    def _load(self) -> None:
        from mlx_embeddings import load

        self.model, self.tokenizer = load(self.entry.path)
        config = json.loads((Path(self.entry.path) / "config.json").read_text())
        self.max_length = max_sequence_length(self.entry.path, config)

    def _embed_all(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Vectors and token counts for `texts`, in their order. Inputs longer than the
        model's maximum sequence length are truncated to it, as sentence-transformers does."""
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        vectors: list[np.ndarray] = [None] * len(texts)  # type: ignore[list-item]
        tokens = np.zeros(len(texts), dtype=np.int64)
        for start in range(0, len(order), FORWARD_BATCH):
            chunk = order[start : start + FORWARD_BATCH]
            chunk_vectors, chunk_tokens = self._forward([texts[i] for i in chunk])
            for row, index in enumerate(chunk):
                vectors[index] = chunk_vectors[row]
                tokens[index] = chunk_tokens[row]
        return np.stack(vectors), tokens

    def _forward(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        import mlx.core as mx

        inputs = self.tokenizer.batch_encode_plus(
            texts, return_tensors="mlx", padding=True, truncation=True, max_length=self.max_length
        )
        mask = inputs["attention_mask"]
        outputs = self.model(inputs["input_ids"], attention_mask=mask)
        pooled = getattr(outputs, "text_embeds", None)
        if pooled is None:  # models without their own pooling: mean over real tokens
            weights = mask[..., None].astype(outputs.last_hidden_state.dtype)
            pooled = (outputs.last_hidden_state * weights).sum(axis=1) / weights.sum(axis=1)
        vectors = np.array(pooled.astype(mx.float32))
        vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        return vectors, np.array(mask.sum(axis=1))
