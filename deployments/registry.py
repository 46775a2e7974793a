"""Model types: which deployment serves a type and which endpoints it answers.

A new type (audio, image generation) is a new entry here; the ingress and the controller
only read this table (the builder hands each of them what it needs from it).
"""

from __future__ import annotations

from dataclasses import dataclass

from ray.serve import Deployment

from deployments.embeddings import EmbeddingsModel
from deployments.text import TextModel
from deployments.vision import VisionModel
from policies.capabilities import CHAT, COMPLETIONS, EMBEDDINGS, Capabilities
from policies.detection import EMBEDDINGS as EMBEDDINGS_TYPE
from policies.detection import TEXT, VISION

@dataclass(frozen=True)
class ModelKind:
    # A class with load(), state() and the endpoints' methods, which take the request's lease id.
    deployment: Deployment
    capabilities: Capabilities


MODEL_KINDS: dict[str, ModelKind] = {
    TEXT: ModelKind(
        TextModel,
        Capabilities(frozenset({CHAT, COMPLETIONS}), tools=True, structured_output=True, logprobs=True),
    ),
    VISION: ModelKind(VisionModel, Capabilities(frozenset({CHAT}), accepts_images=True)),
    EMBEDDINGS_TYPE: ModelKind(EmbeddingsModel, Capabilities(frozenset({EMBEDDINGS}))),
}
