"""The agent clients `mlx-fleet launch` starts against this server: what each needs to be
pointed here, and how long its prompt is. Pure: the command line runs what this decides.

Prompt sizes were measured on each client's first request (Claude Code 2.1.197 with its
default 24 tools: 77 k characters, 21 k SmolLM2 tokens; Codex 0.171.0: 40 k characters,
about 11 k tokens), with room for an answer on top.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Client:
    name: str
    binary: str
    package: str  # npm package that installs it
    prompt_tokens: int  # its default first prompt, with room for an answer

    def prompt_needs(self, client_args: list[str]) -> int:
        """Tokens its first prompt takes when run with `client_args`."""
        return self.prompt_tokens

    def environment(self, base_url: str, api_key: str, model: str) -> dict[str, str]:
        raise NotImplementedError

    def arguments(self, base_url: str, model: str) -> list[str]:
        raise NotImplementedError


class ClaudeCode(Client):
    # `--tools ""`: no tool definitions, ~1.7 k tokens of system prompt.
    WITHOUT_TOOLS = 3_000

    def prompt_needs(self, client_args: list[str]) -> int:
        after = client_args[client_args.index("--tools") + 1 :] if "--tools" in client_args else None
        return self.WITHOUT_TOOLS if after and after[0] == "" else self.prompt_tokens

    def environment(self, base_url: str, api_key: str, model: str) -> dict[str, str]:
        # Every model role Claude Code uses (its background tasks take the "haiku" one) is
        # this model; nothing reaches Anthropic's servers.
        return {
            "ANTHROPIC_BASE_URL": base_url,
            "ANTHROPIC_API_KEY": api_key,
            "ANTHROPIC_MODEL": model,
            "ANTHROPIC_SMALL_FAST_MODEL": model,
            "ANTHROPIC_DEFAULT_HAIKU_MODEL": model,
            "ANTHROPIC_DEFAULT_SONNET_MODEL": model,
            "ANTHROPIC_DEFAULT_OPUS_MODEL": model,
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
            "DISABLE_TELEMETRY": "1",
            "DISABLE_ERROR_REPORTING": "1",
            "DISABLE_AUTOUPDATER": "1",
        }

    def arguments(self, base_url: str, model: str) -> list[str]:
        return ["--model", model]


class Codex(Client):
    PROVIDER = "mlx-fleet"

    def environment(self, base_url: str, api_key: str, model: str) -> dict[str, str]:
        return {"MLX_FLEET_API_KEY": api_key}

    def arguments(self, base_url: str, model: str) -> list[str]:
        # A model provider given on the command line (Codex reads `-c` values as TOML):
        # the user's own config.toml is left as it is. Responses is Codex's only wire API.
        settings = {
            "model_provider": f'"{self.PROVIDER}"',
            f'model_providers.{self.PROVIDER}.name': '"mlx-fleet"',
            f'model_providers.{self.PROVIDER}.base_url': f'"{base_url}/v1"',
            f'model_providers.{self.PROVIDER}.env_key': '"MLX_FLEET_API_KEY"',
            f'model_providers.{self.PROVIDER}.wire_api': '"responses"',
        }
        return [arg for key, value in settings.items() for arg in ("-c", f"{key}={value}")] + ["-m", model]


CLIENTS: dict[str, Client] = {
    "claude": ClaudeCode("claude", "claude", "@anthropic-ai/claude-code", prompt_tokens=24_000),
    "codex": Codex("codex", "codex", "@openai/codex", prompt_tokens=14_000),
}


class NoModelFits(ValueError):
    """No model (or not the one asked for) can take the client's prompt; says which can."""


def choose_model(client: Client, catalog: list[dict[str, Any]], wanted: str | None, needs: int) -> str:
    """The model to run `client` on: `wanted` if it can chat with tools and hold the
    client's prompt of `needs` tokens; else, when none was named, the first such model."""
    def usable(card: dict[str, Any]) -> bool:
        capabilities = card.get("capabilities", {})
        return bool(capabilities.get("chat") and capabilities.get("tools"))

    def fits(card: dict[str, Any]) -> bool:
        return usable(card) and (card.get("context_length") or 0) >= needs

    fitting = [card["id"] for card in catalog if fits(card)]
    suggestion = f"models that fit: {', '.join(fitting)}" if fitting else "no model in this catalog fits"
    if wanted is None:
        if not fitting:
            raise NoModelFits(f"{client.name} needs a chat model with tools and a context of at least "
                              f"{needs} tokens; {suggestion}")
        return fitting[0]
    card = next((c for c in catalog if c["id"] == wanted), None)
    if card is None:
        raise NoModelFits(f"the server has no model {wanted!r}; {suggestion}")
    if not usable(card):
        raise NoModelFits(f"model {wanted} cannot chat with tools, which {client.name} needs; {suggestion}")
    if not fits(card):
        raise NoModelFits(
            f"model {wanted} has a context of {card.get('context_length')} tokens; {client.name}'s prompt needs "
            f"about {needs}; {suggestion} (or --no-check to try anyway)"
        )
    return wanted
