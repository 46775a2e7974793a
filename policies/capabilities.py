"""What a model type's server answers: its endpoints and what it does with chat requests.

Pure data, so that the ingress reads it without importing any model server.
"""

from __future__ import annotations

from dataclasses import dataclass

CHAT = "chat/completions"
COMPLETIONS = "completions"
EMBEDDINGS = "embeddings"


@dataclass(frozen=True)
class Capabilities:
    endpoints: frozenset[str]  # the /v1/... routes this type answers
    accepts_images: bool = False
    # What this type's server does with chat requests; tools also need a model whose
    # template renders them (ModelEntry.tool_format).
    tools: bool = False
    structured_output: bool = False
    logprobs: bool = False
