"""LoRA adapters as models: what an adapter directory must hold, read the same way when the
catalog is built and when a replica loads the adapter."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapters.safetensors"


def read_adapter_config(directory: Path) -> dict[str, Any]:
    """The adapter's `adapter_config.json`, checked to describe a LoRA adapter; ValueError
    saying what is missing or which other kind it is."""
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (directory / name).is_file():
            raise ValueError(f"{directory} has no {name}: an adapter is a directory as `mlx_lm.lora` writes it")
    try:
        config = json.loads((directory / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{directory / ADAPTER_CONFIG} is not readable JSON: {error}") from None
    kind = config.get("fine_tune_type", "lora")
    if kind != "lora":
        raise ValueError(
            f"{directory} holds a {kind!r} fine-tune; only LoRA adapters are served on a base. "
            "Fuse it into the base (`mlx_lm.fuse`) and serve the result as a model of its own"
        )
    parameters = config.get("lora_parameters")
    if not isinstance(parameters, dict) or not isinstance(parameters.get("scale"), (int, float)):
        raise ValueError(f"{directory / ADAPTER_CONFIG} has no lora_parameters.scale")
    return config


def adapter_bytes(directory: Path) -> int:
    """What the adapter's matrices take in memory: about their file's size."""
    return (directory / ADAPTER_WEIGHTS).stat().st_size
