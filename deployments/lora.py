"""LoRA adapters on a loaded base model, several at once, in mlx-lm's adapter format
(`adapter_config.json` + `adapters.safetensors`, as `mlx_lm.lora` writes them).

mlx-lm's own loader (`mlx_lm.load(path, adapter_path=...)`) turns the base's layers into
`LoRALinear`s holding one adapter. Here each adapted layer wraps the base layer once and
keeps every loaded adapter's pair of matrices beside it. A forward pass adds, for each row
of its batch, that row's adapter (`Adapters.rows`), or for the whole batch one adapter
(`Adapters.active`; None: the base alone). The sum is computed as mlx-lm computes it, so an
adapter's greedy output is the same token for token, whatever else shares the batch.

`RowsByCaller` tells each forward pass which row is whose, for mlx-lm's `BatchGenerator`.
MLX thread only.
"""

from __future__ import annotations

import sys
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
    # Every adapter's matrices stacked by slot (zeros where one does not adapt this layer),
    # as of `Adapters.version`; None when their ranks differ.
    stacked: tuple[mx.array, mx.array, mx.array] | None = None
    version: int = -1


@dataclass(frozen=True)
class Rows:
    """Whose a mixed batch's rows are: each row's adapter slot (0: the base alone), and the
    rows of each adapter."""

    slots: mx.array
    by_adapter: dict[str, mx.array]


class AdapterLinear(nn.Module):
    """A base Linear (or QuantizedLinear) plus each row's adapter's low-rank update."""

    def __init__(self, base: nn.Module, adapters: "Adapters"):
        super().__init__()
        self.base = base
        self._adapters = adapters
        self._pairs = _Pairs()

    def __call__(self, x: mx.array) -> mx.array:
        y = self.base(x)
        rows = self._adapters.rows
        if rows is None:
            pair = self._pairs.by_adapter.get(self._adapters.active)
            return y if pair is None else y + _update(x, pair)
        stacked = self._stacked()
        if stacked is not None:  # one gathered product for every row
            lora_a, lora_b, scale = (part[rows.slots] for part in stacked)
            return y + (scale[:, None, None] * ((x @ lora_a) @ lora_b)).astype(x.dtype)
        for adapter_id, index in rows.by_adapter.items():  # ranks differ: a product per adapter
            pair = self._pairs.by_adapter.get(adapter_id)
            if pair is not None:
                y[index] = y[index] + _update(x[index], pair)
        return y

    def _stacked(self) -> tuple[mx.array, mx.array, mx.array] | None:
        pairs = self._pairs
        if pairs.version != self._adapters.version:
            pairs.stacked, pairs.version = self._stack(), self._adapters.version
        return pairs.stacked

    def _stack(self) -> tuple[mx.array, mx.array, mx.array] | None:
        ranks = {a.shape[1] for a, _, _ in self._pairs.by_adapter.values()}
        if len(ranks) != 1:
            return None
        (rank,) = ranks
        some_a, some_b, _ = next(iter(self._pairs.by_adapter.values()))
        zero_a = mx.zeros((some_a.shape[0], rank), some_a.dtype)
        zero_b = mx.zeros((rank, some_b.shape[1]), some_b.dtype)
        slots = [None] * (max(self._adapters.slot_of.values()) + 1)
        for adapter_id, slot in self._adapters.slot_of.items():
            slots[slot] = self._pairs.by_adapter.get(adapter_id)
        stacked = (
            mx.stack([pair[0] if pair else zero_a for pair in slots]),
            mx.stack([pair[1] if pair else zero_b for pair in slots]),
            mx.array([pair[2] if pair else 0.0 for pair in slots], mx.float32),
        )
        mx.eval(stacked)
        return stacked


def _update(x: mx.array, pair: tuple[mx.array, mx.array, float]) -> mx.array:
    """The adapter's low-rank update of `x`, as mlx-lm's LoRALinear computes it."""
    lora_a, lora_b, scale = pair
    return (scale * ((x @ lora_a) @ lora_b)).astype(x.dtype)


class Adapters:
    """The adapters loaded into one base model."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.active: str | None = None
        self.rows: Rows | None = None  # for a batch that mixes adapters
        self.loaded: dict[str, int] = {}  # {adapter id: bytes of its matrices}
        self.slot_of: dict[str, int] = {}  # {adapter id: its place in every layer's stack, from 1}
        self.version = 0  # changes with the loaded adapters: layers stack theirs again
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
        self.slot_of[adapter_id] = 1 + max(self.slot_of.values(), default=0)
        self.version += 1
        return self.loaded[adapter_id]

    def unload(self, adapter_id: str) -> None:
        for layer in self._layers.values():
            layer._pairs.by_adapter.pop(adapter_id, None)
        self.loaded.pop(adapter_id, None)
        self.slot_of.pop(adapter_id, None)
        self.version += 1
        if self.active == adapter_id:
            self.active = None


def _input_dims(layer: nn.Module) -> int:
    if isinstance(layer, nn.QuantizedLinear):  # packed: 32 // bits values per uint32
        return layer.weight.shape[1] * 32 // layer.bits
    return layer.weight.shape[1]


class RowsByCaller:
    """The model as mlx-lm's BatchGenerator calls it, telling each forward pass which row
    runs which adapter (`adapter_of` maps the generator's uids to adapter ids).

    mlx-lm calls the model from a method of the batch whose rows it passes (the prompt
    batch's `prompt`, the generation batch's `_step`), and each keeps its rows' uids in
    order in `uids` (mlx-lm 0.32). Nothing else says whose a row is, so the caller's frame
    is read; a caller without matching `uids` is an error, never a guess.
    """

    def __init__(self, model: nn.Module, adapters: Adapters, adapter_of: dict[int, str | None]):
        self.model = model
        self.adapters = adapters
        self.adapter_of = adapter_of

    def __getattr__(self, name: str):  # layers, make_cache, ...: the model's own
        return getattr(self.model, name)

    def __call__(self, inputs: mx.array, *args, **kwargs) -> mx.array:
        uids = getattr(sys._getframe(1).f_locals.get("self"), "uids", None)
        if uids is None or len(uids) != inputs.shape[0]:
            raise RuntimeError("mlx-lm called the model from where its rows' uids are not known")
        ids = [self.adapter_of.get(uid) for uid in uids]
        if len(set(ids)) == 1:
            self.adapters.active, self.adapters.rows = ids[0], None
        else:
            by_adapter: dict[str, list[int]] = {}
            for row, adapter_id in enumerate(ids):
                if adapter_id is not None:
                    by_adapter.setdefault(adapter_id, []).append(row)
            slots = mx.array([self.adapters.slot_of.get(adapter_id, 0) for adapter_id in ids])
            self.adapters.rows = Rows(slots, {a: mx.array(index) for a, index in by_adapter.items()})
        try:
            return self.model(inputs, *args, **kwargs)
        finally:
            self.adapters.rows = None
