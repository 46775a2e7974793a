"""The application's typed configuration: serve_config.yaml `args`, validated once at build."""

from __future__ import annotations

import platform
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Literal

import yaml

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from policies.api_keys import ApiKey, digest
from policies.memory import parse_limit, parse_size

# Names of the application's own deployments; a model id may not take them.
INGRESS_NAME = "fleet-ingress"
CONTROLLER_NAME = "fleet-controller"
# The Ray node label that names a fleet node: `ray start --labels mlx-fleet/node=studio`.
NODE_LABEL = "mlx-fleet/node"
# The one node of a fleet whose config lists no `nodes`: wherever Ray runs the models.
LOCAL_NODE = "local"

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}


def parse_duration(text: str | float) -> float:
    """Seconds in a duration such as "30s", "5m", "1h" or a plain number of seconds."""
    match = None if isinstance(text, bool) else _DURATION.match(str(text))
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"expected a positive duration such as '30s', '5m' or '1h', got {text!r}")
    return float(match.group(1)) * _SECONDS[match.group(2)]


def _checked_by(parse: Callable[[Any], Any]) -> AfterValidator:
    """Keep the value as written once `parse` accepts it (a memory limit in percent can only
    be turned into bytes on the node it applies to)."""

    def check(value: Any) -> Any:
        parse(value)
        return value

    return AfterValidator(check)


# Normalized once, at validation: a size is bytes and a duration seconds from then on.
Size = Annotated[int, BeforeValidator(parse_size)]
Duration = Annotated[float, BeforeValidator(parse_duration)]
Limit = Annotated[str | int, _checked_by(lambda limit: parse_limit(limit, total_bytes=1))]


def metal_backend() -> bool:
    """Whether MLX runs on an Apple GPU here (else on its CPU backend)."""
    return sys.platform == "darwin" and platform.machine() == "arm64"


def deployment_name(model_id: str) -> str:
    """A Serve deployment name for a model id ("org/model" -> "org--model")."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", model_id.replace("/", "--"))


def placement_name(deployment: str, node: str) -> str:
    """The deployment of a model on one node ("org--model@studio"): which model runs where,
    readable in the dashboard. A one-node fleet keeps the model's own name."""
    return deployment if node == LOCAL_NODE else f"{deployment}@{node}"


class NodeSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)

    name: str = Field(
        pattern=r"^[A-Za-z0-9]([A-Za-z0-9_.-]*[A-Za-z0-9])?$",
        description=f"The node's name; Ray nodes started with `--labels {NODE_LABEL}=<name>` are it.",
    )
    memory_limit: Limit | None = Field(
        default=None, description="This node's budget; default: `memory_limit` of its own memory."
    )
    labels: dict[str, str] | None = Field(
        default=None,
        description=f"Ray node labels that select this node, instead of {{{NODE_LABEL}: <name>}} "
        "(e.g. {'ray.io/node-id': '<id>'}).",
    )

    @property
    def selector(self) -> dict[str, str]:
        return self.labels or {NODE_LABEL: self.name}


class ModelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)

    id: str = Field(min_length=1, description="The name clients send as `model`.")
    path: str = Field(min_length=1, description="A local directory or a hub repo id.")
    pinned: bool = False
    memory: Size | None = Field(
        default=None, description="The model's whole cost, e.g. '2GB'; overrides the estimate."
    )
    type: str | None = Field(default=None, description="Override detection: text-generation, ...")
    family: str | None = Field(default=None, description="Override detection: llama, qwen, ...")
    idle_ttl: Duration | None = Field(
        default=None, description="Unload this model after this long unused (overrides idle_ttl)."
    )
    max_context: int | None = Field(
        default=None,
        ge=1,
        description="Tokens of prompt plus completion this model accepts, below its own "
        "context length: bounds the KV memory one request can claim.",
    )
    node: str | None = Field(default=None, description="Load this model only on this node (of `nodes`).")
    base: str | None = Field(
        default=None,
        description="Another model's id: this one is a LoRA adapter of it (`path` is the adapter's "
        "directory), served in the base's replica and charged only its own bytes.",
    )
    draft: str | None = Field(
        default=None,
        description="Text models: another text model's id (the same vocabulary) whose weights run in "
        "this model's replica, charged to it, and propose its next tokens in place of prompt lookup.",
    )
    speculative: Literal[False, "prompt_lookup"] | None = Field(
        default=None,
        description="Text models: `prompt_lookup` (the default) proposes tokens from the prompt and "
        "the answer so far, checked by the model in one pass when that pays; `false`: never.",
    )

    @field_validator("id")
    @classmethod
    def _printable_id(cls, model_id: str) -> str:
        if model_id != model_id.strip() or any(not c.isprintable() for c in model_id):
            raise ValueError(f"model id {model_id!r} must be printable with no surrounding spaces")
        return model_id



class ApiKeySpec(BaseModel):
    """One API key (`api_keys`): the key itself or its SHA-256 (hex), so the config need hold
    no secret."""

    model_config = ConfigDict(extra="forbid", validate_default=True)

    name: str = Field(min_length=1, description="Shown in metrics, /admin and logs; never the key.")
    key: str | None = Field(default=None, min_length=1)
    key_sha256: str | None = Field(default=None, pattern=r"^[0-9a-fA-F]{64}$")
    models: list[str] = Field(default=["*"], min_length=1, description="Model ids or glob patterns it may use.")
    may_load: bool = Field(default=True, description="False: only models loaded already serve it.")
    max_concurrent: int | None = Field(default=None, ge=1, description="Requests at once; more get 429.")

    @model_validator(mode="after")
    def _one_key(self) -> "ApiKeySpec":
        if (self.key is None) == (self.key_sha256 is None):
            raise ValueError(f"api key {self.name!r}: give exactly one of `key` and `key_sha256`")
        return self

    def to_key(self) -> ApiKey:
        sha = bytes.fromhex(self.key_sha256) if self.key_sha256 else digest(self.key.encode())
        return ApiKey(self.name, sha, tuple(self.models), self.may_load, self.max_concurrent)


def _read_key_file(value: Any) -> Any:
    """`api_keys` may name a YAML file holding the list (kept out of the Serve config)."""
    if not isinstance(value, str):
        return value
    path = Path(value).expanduser()
    try:
        return yaml.safe_load(path.read_text())
    except OSError as error:
        raise ValueError(f"api_keys: cannot read {value!r}: {error.strerror}") from None


class AppConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)

    models: list[ModelSpec] = Field(min_length=1)
    memory_limit: Limit = "75%"
    nodes: list[NodeSpec] = Field(
        default_factory=list,
        description="The Ray nodes models may run on, each with its own budget; none: one node.",
    )
    image_max_side: int = Field(default=2048, ge=64, le=16384)
    image_max_bytes: Size = Field(default="20MB", description="Largest image, encoded.")
    image_fetch_timeout: Duration = Field(default="10s", description="Per attempt, per image URL.")
    max_images_per_request: int = Field(default=16, ge=1)
    image_allow_hosts: list[str] = Field(
        default_factory=list,
        description="Hosts, IPs or CIDR networks image URLs may reach although private (LAN).",
    )
    admin_api_key: str | None = None
    api_keys: Annotated[list[ApiKeySpec] | None, BeforeValidator(_read_key_file)] = Field(
        default=None,
        description="Keys for the inference API (a list, or a YAML file with one); none: open to "
        "anyone who reaches the port.",
    )
    allow_download: bool = Field(
        default=False, description="Download hub models missing from the local cache at load."
    )
    hub_cache_dir: str | None = Field(
        default=None,
        description="Where hub ids are looked up; default: Hugging Face's own (HF_HUB_CACHE).",
    )
    gguf_cache_dir: str = Field(
        default="~/.cache/mlx-fleet/gguf",
        description="Where GGUF files are converted to mlx-lm folders, once per file version.",
    )
    gguf_dequantize: bool = Field(
        default_factory=lambda: not metal_backend(),
        description="Convert GGUF weights to float32 instead of keeping Q4_0/Q4_1/Q8_0 "
        "quantized. Default: float32 on MLX's CPU backend (Linux: with OpenBLAS, SmolLM2 "
        "prefills 8.6x and decodes 1.7x faster, for 5x the memory; bench/gguf.py), quantized "
        "on Apple GPUs, where quantized kernels are the fast path.",
    )
    max_request_size: Size = "32MB"
    default_max_tokens: int | None = Field(
        default=None, ge=1,
        description="A cap on the tokens of an answer whose request names no max_tokens; "
        "unset, such an answer may fill the rest of the model's context, as OpenAI and Anthropic allow.",
    )
    max_ongoing_requests: int = Field(
        default=64, ge=1, description="Requests one model replica accepts before callers queue."
    )
    prompt_cache_size: Size | None = Field(
        default="512MB",
        description="KV caches kept per text model for reuse by the next turn; null: none.",
    )
    prompt_cache_dir: str = Field(
        default="~/.cache/mlx-fleet/prompt-cache",
        description="Where a text model's prompt cache is kept while its replica is scaled to "
        "zero, so that the next load starts warm.",
    )
    prompt_cache_disk: Size | None = Field(
        default="2GB",
        description="Disk the saved prompt caches of all models may take together (the least "
        "recently used go first); null: nothing is saved or restored.",
    )
    replica_overhead: Size = Field(
        default="200MB", description="Memory of a model replica's process before any weights."
    )
    warm_workers: bool = Field(
        default=True,
        description="Keep one idle Ray worker per node with MLX and the model servers imported, "
        "for the next model load to start in (about 3 s sooner here, ~170 MB while it waits).",
    )
    idle_ttl: Duration | None = Field(
        default=None, description="Unload unpinned models unused for this long (off by default)."
    )
    load_wait_timeout: Duration = Field(
        default="60s",
        description="How long a load waits for busy models to finish before it answers 503.",
    )
    lease_ttl: Duration = Field(
        default="20s",
        description="A request's hold on its model ends this long after its ingress last "
        "renewed it: how soon a model is free again when an ingress dies.",
    )
    request_body_timeout: Duration = Field(
        default="30s", description="Time a client has to send the whole request body."
    )
    responses_dir: str = Field(
        default="~/.cache/mlx-fleet/responses", description="Where stored Responses API answers are kept."
    )
    responses_ttl: Duration = Field(
        default="1h", description="How long a stored Responses API answer can be continued or fetched."
    )
    responses_max: int = Field(default=1000, ge=1, description="Stored Responses API answers kept at most.")

    @field_validator("admin_api_key")
    @classmethod
    def _usable_key(cls, key: str | None) -> str | None:
        if key is not None and (not key.strip() or not key.isascii() or not key.isprintable()):
            raise ValueError(
                "admin_api_key must be printable ASCII and not empty (leave it out to "
                "keep the admin endpoints open)"
            )
        return key

    @model_validator(mode="after")
    def _unique_names(self) -> "AppConfig":
        seen: dict[str, str] = {}
        for spec in self.models:
            name = deployment_name(spec.id)
            if name in (INGRESS_NAME, CONTROLLER_NAME):
                raise ValueError(f"model id {spec.id!r} is reserved; choose another id")
            if name in seen:
                raise ValueError(
                    f"model ids {seen[name]!r} and {spec.id!r} collide "
                    f"(both become deployment {name!r}); ids must be unique"
                )
            seen[name] = spec.id
        names = [node.name for node in self.nodes]
        if len(set(names)) != len(names):
            raise ValueError(f"node names must be unique, got {names}")
        keys = [spec.to_key() for spec in self.api_keys or []]
        if len({k.name for k in keys}) != len(keys) or len({k.sha256 for k in keys}) != len(keys):
            raise ValueError("api_keys: each key needs a name and a key of its own")
        by_id = {spec.id: spec for spec in self.models}
        for spec in self.models:
            if spec.node is not None and spec.node not in names:
                raise ValueError(
                    f"model {spec.id!r} names node {spec.node!r}, which is not in `nodes` "
                    f"({', '.join(names) or 'none configured'})"
                )
            if spec.draft is not None:
                draft = by_id.get(spec.draft)
                if draft is None:
                    raise ValueError(f"model {spec.id!r}: its draft {spec.draft!r} is not in `models`")
                if draft.base is not None or draft.id == spec.id:
                    raise ValueError(
                        f"model {spec.id!r}: its draft {spec.draft!r} must be another model, not an adapter"
                    )
                if spec.speculative is False:
                    raise ValueError(f"model {spec.id!r}: a draft speculates; drop `speculative: false` or `draft`")
            if spec.base is None:
                continue
            base = by_id.get(spec.base)
            if base is None or base.base is not None:
                raise ValueError(
                    f"model {spec.id!r} is an adapter of {spec.base!r}, which is "
                    + ("an adapter itself" if base is not None else "not in `models`")
                    + ": `base` names a model of the catalog that is not an adapter"
                )
            own = (spec.node, spec.type, spec.max_context, spec.speculative, spec.draft)
            if any(value is not None for value in own):
                raise ValueError(
                    f"model {spec.id!r} is an adapter: it runs where its base runs, as its base "
                    "does (no `node`, `type`, `max_context`, `speculative` or `draft` of its own)"
                )
        return self

    @property
    def node_names(self) -> list[str]:
        return [node.name for node in self.nodes] or [LOCAL_NODE]










@dataclass(frozen=True)
class ModelEntry:
    """One model in the running catalog: the spec resolved to a path, a type and a family."""

    id: str
    deployment: str
    path: str
    type: str
    family: str
    pinned: bool
    memory_bytes: int | None
    idle_ttl: float | None = None
    tool_format: str | None = None  # text models: the tool-call format their template renders
    think: tuple[str, str] | None = None  # text models: the markers around their reasoning
    context_length: int | None = None  # the model's, capped by `max_context`
    max_context: int | None = None
    node: str | None = None  # the only node it may run on
    base: str | None = None  # a LoRA adapter of this model: served in its replica
    speculative: str | None = None  # text models: how decoding speculates ("prompt_lookup"), or None
    draft: str | None = None  # text models: the catalog model whose weights propose tokens
    draft_path: str | None = None  # and where they are

    def placements(self, nodes: list[str]) -> dict[str, str]:
        """{node: the model's deployment there} for the nodes it may run on."""
        return {node: placement_name(self.deployment, node) for node in nodes if self.node in (None, node)}
