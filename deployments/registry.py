"""Model types: which deployment serves a type and which endpoints it answers.

A new type (audio, image generation) is a new entry here; the ingress and the controller
only read this table.
"""

from __future__ import annotations

from dataclasses import dataclass

from ray.serve import Deployment

from deployments.text import TextModel
from policies.detection import TEXT

CHAT = "chat.completions"
COMPLETIONS = "completions"
EMBEDDINGS = "embeddings"


@dataclass(frozen=True)
class ModelKind:
    deployment: Deployment
    endpoints: frozenset[str]
    accepts_images: bool = False


MODEL_KINDS: dict[str, ModelKind] = {
    TEXT: ModelKind(TextModel, frozenset({CHAT, COMPLETIONS})),
}
