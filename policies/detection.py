"""What kind of model a directory or name holds: its type first, then its family.

Chain: config.json -> name words -> default (text-generation, llama).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

TEXT = "text-generation"
VISION = "vision"
EMBEDDINGS = "embeddings"
MODEL_TYPES = (TEXT, VISION, EMBEDDINGS)

DEFAULT_FAMILY = "llama"

# model_type prefixes -> family; the longest matching prefix wins.
_FAMILY_BY_MODEL_TYPE = {
    "llama": "llama",
    "mistral": "mistral",
    "mixtral": "mistral",
    "qwen": "qwen",
    "gemma": "gemma",
}


@dataclass(frozen=True)
class Detection:
    type: str
    family: str
    architecture: str | None
    reason: str

    def as_dict(self) -> dict:
        return asdict(self)


def read_config(path: str | Path) -> dict | None:
    """The model's config.json as a dict, or None when there is none to read."""
    path = Path(path)
    config_file = path if path.is_file() else path / "config.json"
    try:
        return json.loads(config_file.read_text())
    except (OSError, ValueError):
        return None


def family_from_model_type(model_type: str | None) -> str | None:
    if not model_type:
        return None
    matches = [prefix for prefix in _FAMILY_BY_MODEL_TYPE if model_type.startswith(prefix)]
    return _FAMILY_BY_MODEL_TYPE[max(matches, key=len)] if matches else None


def family_from_name(name: str) -> str | None:
    words = re.split(r"[^a-z0-9]+", name.lower())
    for word in words:
        family = family_from_model_type(word)
        if family:
            return family
    return None


def detect(path_or_name: str) -> Detection:
    config = read_config(path_or_name)
    if config is not None:
        architecture = (config.get("architectures") or [None])[0]
        model_type = config.get("model_type")
        if "vision_config" in config:
            model_type = (config.get("text_config") or {}).get("model_type", model_type)
            kind = VISION
        else:
            kind = TEXT
        family = family_from_model_type(model_type)
        if family:
            return Detection(kind, family, architecture, f"config.json model_type={model_type!r}")
        return Detection(
            kind,
            DEFAULT_FAMILY,
            architecture,
            f"config.json model_type={model_type!r} has no adapter; default family",
        )
    family = family_from_name(Path(path_or_name).name)
    if family:
        return Detection(TEXT, family, None, f"name contains {family!r}")
    return Detection(TEXT, DEFAULT_FAMILY, None, "no config.json and no family in the name; default")
