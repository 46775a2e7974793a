"""Memory sizes and limits: parse what operators write, estimate what models cost."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")
_PERCENT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%\s*$")


def parse_size(text: str | int) -> int:
    """Bytes in a size such as "2GB", "24 GiB", "512MB" or a plain integer of bytes."""
    if isinstance(text, bool):
        raise ValueError(f"expected a size such as '2GB' or '512 MiB', got {text!r}")
    if isinstance(text, int):
        if text <= 0:
            raise ValueError(f"a size must be positive, got {text}")
        return text
    match = _SIZE.match(str(text))
    unit = match.group(2).lower() if match else None
    if unit not in _UNITS:
        raise ValueError(
            f"expected a size such as '2GB', '24 GiB' or '512MB' "
            f"(units: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), got {text!r}"
        )
    size = int(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise ValueError(f"a size must be positive, got {text!r}")
    return size


def parse_limit(text: str | int, total_bytes: int) -> int:
    """Bytes in a memory limit: a percentage of `total_bytes` ("75%") or an absolute size."""
    match = _PERCENT.match(str(text))
    if match:
        percent = float(match.group(1))
        if not 0 < percent <= 100:
            raise ValueError(f"memory_limit in percent must be in (0, 100], got {text!r}")
        return int(total_bytes * percent / 100)
    try:
        return parse_size(text)
    except ValueError:
        raise ValueError(
            f"memory_limit must be a percentage of physical memory such as '75%' "
            f"or a size such as '24GB' / '24 GiB' / '512MB', got {text!r}"
        ) from None


def format_gb(size: int) -> str:
    """Bytes as "4.2 GB", the form every memory error message uses."""
    return f"{size / 1e9:.1f} GB"


# GGUF weights expanded to float32 take about this many times their file: Q4_0/Q4_1 store
# 4.5-5 bits a weight, Q8_0 8.5 (SmolLM2's Q4_1 file: 98 MB -> 517 MB). The load measures
# the real size; this only keeps the first placement from planning on a fifth of it.
GGUF_FLOAT32_EXPANSION = 6.0


def weight_files_bytes(path: str | Path, gguf_float32: bool = False) -> int | None:
    """Bytes of a model's weight files (a folder's *.safetensors, or a GGUF file, as it will
    be loaded); None when nothing is on disk to measure (a hub model not downloaded yet)."""
    path = Path(path)
    if path.is_file():
        gguf = [path]
        safetensors = 0
    elif path.is_dir():
        gguf = list(path.glob("*.gguf"))
        safetensors = sum(f.stat().st_size for f in path.rglob("*.safetensors"))
    else:
        return None
    expansion = GGUF_FLOAT32_EXPANSION if gguf_float32 else 1.0
    return safetensors + int(sum(f.stat().st_size for f in gguf) * expansion)


def estimate_entry_bytes(entry: Any, replica_overhead: int, gguf_float32: bool = False) -> int | None:
    """What a catalog entry will cost once loaded, its draft model's weights included. An
    adapter (`entry.base`) runs in its base's process: only its matrices, never a
    replica's overhead."""
    if entry.base is None:
        model = estimate_model_bytes(entry.path, replica_overhead, entry.memory_bytes, gguf_float32)
        if model is None or entry.memory_bytes is not None or entry.draft_path is None:
            return model
        draft = weight_files_bytes(entry.draft_path, gguf_float32)  # its draft runs in its replica
        return None if draft is None else model + draft
    if entry.memory_bytes is not None:
        return entry.memory_bytes
    from policies.adapters import adapter_bytes

    return adapter_bytes(Path(entry.path))


def estimate_model_bytes(
    path: str | Path, replica_overhead: int, override: int | None = None, gguf_float32: bool = False
) -> int | None:
    """What a model will cost once loaded: its weights plus its replica process; None when
    its weights are not on disk to measure.

    An operator's override is the whole cost, exactly.
    """
    if override is not None:
        return override
    weights = weight_files_bytes(path, gguf_float32)
    return None if weights is None else weights + replica_overhead
