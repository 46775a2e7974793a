"""The application's typed configuration: serve_config.yaml `args`, validated once at build."""

from __future__ import annotations

import re
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from policies.detection import MODEL_TYPES
from policies.memory import parse_limit, parse_size

# Names of the application's own deployments; a model id may not take them.
INGRESS_NAME = "fleet-ingress"
CONTROLLER_NAME = "fleet-controller"


def deployment_name(model_id: str) -> str:
    """A Serve deployment name for a model id ("org/model" -> "org--model")."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", model_id.replace("/", "--"))


class ModelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, description="The name clients send as `model`.")
    path: str = Field(min_length=1, description="A local directory or a hub repo id.")
    pinned: bool = False
    memory: str | int | None = Field(
        default=None, description="The model's whole cost, e.g. '2GB'; overrides the estimate."
    )
    type: str | None = None
    family: str | None = None

    @field_validator("id")
    @classmethod
    def _printable_id(cls, model_id: str) -> str:
        if model_id != model_id.strip() or any(not c.isprintable() for c in model_id):
            raise ValueError(f"model id {model_id!r} must be printable with no surrounding spaces")
        return model_id

    @field_validator("memory")
    @classmethod
    def _memory_is_a_size(cls, memory: str | int | None) -> str | int | None:
        if memory is not None:
            parse_size(memory)
        return memory

    @field_validator("type")
    @classmethod
    def _known_type(cls, model_type: str | None) -> str | None:
        if model_type is not None and model_type not in MODEL_TYPES:
            raise ValueError(f"type must be one of {', '.join(MODEL_TYPES)}; got {model_type!r}")
        return model_type

    @property
    def memory_bytes(self) -> int | None:
        return None if self.memory is None else parse_size(self.memory)


class AppConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    models: list[ModelSpec] = Field(min_length=1)
    memory_limit: str | int = "75%"
    image_max_side: int = Field(default=2048, ge=64, le=16384)
    admin_api_key: str | None = None
    allow_download: bool = Field(
        default=False, description="Download hub models missing from the local cache at load."
    )
    max_request_size: str | int = "32MB"
    default_max_tokens: int = Field(default=512, ge=1)
    max_ongoing_requests: int = Field(
        default=64, ge=1, description="Requests one model replica accepts before callers queue."
    )

    @field_validator("memory_limit")
    @classmethod
    def _limit_parses(cls, limit: str | int) -> str | int:
        parse_limit(limit, total_bytes=1)
        return limit

    @field_validator("max_request_size")
    @classmethod
    def _request_size_parses(cls, size: str | int) -> str | int:
        parse_size(size)
        return size

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
        return self

    @property
    def max_request_bytes(self) -> int:
        return parse_size(self.max_request_size)


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
    architecture: str | None
    reason: str
