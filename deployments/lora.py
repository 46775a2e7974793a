"""LoRA adapters on a loaded base model, several at once, in mlx-lm's adapter format
(`adapter_config.json` + `adapters.safetensors`, as `mlx_lm.lora` writes them).

mlx-lm's own loader (`mlx_lm.load(path, adapter_path=...)`) turns the base's layers into
`LoRALinear`s holding one adapter. Here each adapted layer wraps the base layer once and
keeps every loaded adapter's pair of matrices beside it; `Adapters.active` says which one
the next forward pass adds (None: the base alone). The sum is computed as mlx-lm computes
it, so an adapter's greedy output is the same token for token.

MLX thread only: `active` changes between batches, never during one (`BatchEngine`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from policies.adapters import ADAPTER_WEIGHTS, read_adapter_config


class AdapterError(ValueError):
    """The adapter does not fit its base model (layers, shapes): said at its first load."""


@dataclass
class _Pairs:
    # {adapter id: (lora_a, lora_b, scale)}; kept off the module tree, so that the base's
    # parameters stay what they were.
    by_adapter: dict[str, tuple[mx.array, mx.array, float]] = field(default_factory=dict)


class AdapterLinear(nn.Module):
    """A base Linear (or QuantizedLinear) plus the active adapter's low-rank update."""

    def __init__(self, base: nn.Module, adapters: "Adapters"):
        super().__init__()
        self.base = base
        self._adapters = adapters
        self._pairs = _Pairs()

    def __call__(self, x: mx.array) -> mx.array:
        y = self.base(x)
        pair = self._pairs.by_adapter.get(self._adapters.active)
        if pair is None:
            return y
        lora_a, lora_b, scale = pair
        return y + (scale * ((x @ lora_a) @ lora_b)).astype(x.dtype)


class Adapters:
    """The adapters loaded into one base model."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.active: str | None = None
        self.loaded: dict[str, int] = {}  # {adapter id: bytes of its matrices}
        self._layers: dict[str, AdapterLinear] = {}  # by module path

    def load(self, adapter_id: str, path: str) -> int:
        """Read an adapter and put it beside the layers it adapts; its bytes."""
        scale = float(read_adapter_config(Path(path))["lora_parameters"]["scale"])
        weights = mx.load(str(Path(path) / ADAPTER_WEIGHTS))
        pairs: dict[str, dict[str, mx.array]] = {}
        for name, array in weights.items():
            module_path, leaf = name.rsplit(".", 1)
            if leaf not in ("lora_a", "lora_b"):
                raise AdapterError(f"{ADAPTER_WEIGHTS} holds {name}: only LoRA matrices (lora_a, lora_b) are served")
            pairs.setdefault(module_path, {})[leaf] = array
        modules = dict(self.model.named_modules())
        wrapped = []
        for module_path, pair in pairs.items():
            layer = self._layers.get(module_path)
            base = layer.base if layer is not None else modules.get(module_path)
            if not isinstance(base, (nn.Linear, nn.QuantizedLinear)):
                raise AdapterError(f"the base model has no linear layer {module_path} for this adapter to adapt")
            if set(pair) != {"lora_a", "lora_b"}:
                raise AdapterError(f"{module_path} has {sorted(pair)}, not both lora_a and lora_b")
            out_dims, in_dims = base.weight.shape[0], _input_dims(base)
            a, b = pair["lora_a"], pair["lora_b"]
            if a.shape[0] != in_dims or b.shape[1] != out_dims or a.shape[1] != b.shape[0]:
                raise AdapterError(
                    f"{module_path}: lora_a {tuple(a.shape)} and lora_b {tuple(b.shape)} do not fit a "
                    f"{in_dims}->{out_dims} layer"
                )
            if layer is None:
                layer = AdapterLinear(base, self)
                wrapped.append((module_path, layer))
            layer._pairs.by_adapter[adapter_id] = (a, b, scale)
        mx.eval(list(weights.values()))
        if wrapped:
            self.model.update_modules(tree_unflatten(wrapped))
            self._layers.update(wrapped)
        self.loaded[adapter_id] = sum(array.nbytes for array in weights.values())
        return self.loaded[adapter_id]

    def unload(self, adapter_id: str) -> None:
        for layer in self._layers.values():
            layer._pairs.by_adapter.pop(adapter_id, None)
        self.loaded.pop(adapter_id, None)
        if self.active == adapter_id:
            self.active = None


def _input_dims(layer: nn.Module) -> int:
    if isinstance(layer, nn.QuantizedLinear):  # packed: 32 // bits values per uint32
        return layer.weight.shape[1] * 32 // layer.bits
    return layer.weight.shape[1]
