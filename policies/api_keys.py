"""API keys: who may use the fleet, which models each key sees, whether its requests may load
(and so evict) models, and how many it may run at once.

Keys are compared as SHA-256 digests, in constant time and against every key (no early
exit), so neither a key nor its length leaks through timing; the config may hold only the
digest (`key_sha256`). A model outside a key's list does not exist for that key (404).
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from fnmatch import fnmatchcase

from policies.errors import too_many_requests


@dataclass(frozen=True)
class ApiKey:
    name: str  # what metrics, /admin and logs show: never the key
    sha256: bytes
    models: tuple[str, ...] = ("*",)  # model ids or glob patterns ("mlx-community/*")
    may_load: bool = True  # False: served only by models that are loaded already
    max_concurrent: int | None = None  # requests at once; more get 429

    def allows(self, model_id: str) -> bool:
        return any(fnmatchcase(model_id, pattern) for pattern in self.models)


def digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


class KeyRing:
    """The configured keys; `find` tells which one a request presented."""

    def __init__(self, keys: list[ApiKey]):
        self.keys = keys

    def find(self, presented: bytes | None) -> ApiKey | None:
        if not presented:
            return None
        wanted = digest(presented)
        found = None
        for key in self.keys:  # every key is compared: the time does not depend on which matched
            if hmac.compare_digest(wanted, key.sha256):
                found = key
        return found


def bearer_token(authorization: str | None) -> bytes | None:
    """The token of `Authorization: Bearer <token>`, as the bytes the client sent: HTTP
    libraries hand header values over as Latin-1 text, which gives those bytes back."""
    scheme, _, token = (authorization or "").partition(" ")
    return token.strip().encode("latin-1") if scheme.lower() == "bearer" and token.strip() else None


def presented_key(authorization: str | None, x_api_key: str | None) -> bytes | None:
    """The key a request carries: `Authorization: Bearer <key>` (OpenAI's clients) or
    `x-api-key: <key>` (Anthropic's)."""
    if x_api_key:
        return x_api_key.strip().encode("latin-1")
    return bearer_token(authorization)


# Where a request's slot is noted in its ASGI scope, for the middleware that gives it back.
SLOT_SCOPE_KEY = "mlx_fleet.key_slot"


class KeySlots:
    """The requests each key runs now and has run (per ingress replica): a key at its
    `max_concurrent` gets 429 until one of its requests has been answered."""

    def __init__(self) -> None:
        self.active: dict[str, int] = {}
        self.requests: dict[str, int] = {}

    def take(self, key: ApiKey, scope: dict) -> None:
        active = self.active.get(key.name, 0)
        if key.max_concurrent is not None and active >= key.max_concurrent:
            raise too_many_requests(key.name, key.max_concurrent)
        self.active[key.name] = active + 1
        self.requests[key.name] = self.requests.get(key.name, 0) + 1
        scope[SLOT_SCOPE_KEY] = (self, key.name)

    def give_back(self, name: str) -> None:
        self.active[name] -= 1

    def view(self, keys: list[ApiKey]) -> list[dict]:
        return [
            {
                "name": key.name,
                "models": list(key.models),
                "may_load": key.may_load,
                "max_concurrent": key.max_concurrent,
                "active": self.active.get(key.name, 0),
                "requests": self.requests.get(key.name, 0),
            }
            for key in keys
        ]


def give_back_slot(scope: dict) -> None:
    """End the request's slot, if it took one (its answer has been sent, or it failed)."""
    slot = scope.pop(SLOT_SCOPE_KEY, None)
    if slot is not None:
        slots, name = slot
        slots.give_back(name)
