"""Chat-template quirks per model family, one small module each, all the same shape.

Each module defines `ADAPTER`. Families without a module (phi, deepseek, ...) use llama's:
the model's own chat template as is, Llama 3's end-of-turn tokens as stops where the
tokenizer has them, a BOS where the template writes none, and Meta's sampling defaults.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class FamilyAdapter:
    name: str
    system_role: bool  # does the family's template accept a "system" message?
    alternating_roles: bool  # must user and assistant turns strictly alternate?
    stop_tokens: tuple[str, ...]  # end-of-turn tokens that end a reply
    add_bos: bool  # does the model expect a BOS token its template may not write?
    temperature: float  # sampling defaults when a request leaves them out
    top_p: float


# End-of-turn markers that chat templates write: whichever a model's template uses ends its
# replies, whatever its family (SmolLM2 is a Llama that speaks ChatML).
END_OF_TURN_MARKERS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")


def stop_tokens(adapter: FamilyAdapter, chat_template: str | None) -> tuple[str, ...]:
    """Tokens that end a reply: the family's, and the end-of-turn markers of the template."""
    in_template = tuple(m for m in END_OF_TURN_MARKERS if chat_template and m in chat_template)
    return tuple(dict.fromkeys(adapter.stop_tokens + in_template))


def adapter_for(family: str) -> FamilyAdapter:
    from policies.families import gemma, llama, mistral, qwen

    adapters = {module.ADAPTER.name: module.ADAPTER for module in (llama, qwen, mistral, gemma)}
    return adapters.get(family, llama.ADAPTER)


def prepare_messages(adapter: FamilyAdapter, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Reshape messages so the family's template accepts them instead of raising.

    Without a system role the system text opens the first user turn (what Gemma's and
    Mistral's own guides recommend); with strict alternation, consecutive turns of one role
    are joined.
    """
    messages = [dict(m) for m in messages]
    if not adapter.system_role:
        system = "\n\n".join(m["content"] for m in messages if m["role"] == "system" and m["content"])
        messages = [m for m in messages if m["role"] != "system"]
        if system:
            first_user = next((m for m in messages if m["role"] == "user"), None)
            if first_user is None:
                messages.insert(0, {"role": "user", "content": system})
            else:
                first_user["content"] = f"{system}\n\n{first_user['content']}"
    if adapter.alternating_roles:
        merged: list[dict[str, Any]] = []
        for message in messages:
            if merged and _plain_turn(merged[-1]) and _plain_turn(message) and merged[-1]["role"] == message["role"]:
                merged[-1]["content"] = f"{merged[-1]['content']}\n\n{message['content']}"
            else:
                merged.append(message)
        messages = merged
    return messages


def _plain_turn(message: dict[str, Any]) -> bool:
    """A user or assistant turn of text only; tool calls and results are never merged."""
    return message["role"] in ("user", "assistant") and not message.get("tool_calls")


def render_chat(
    adapter: FamilyAdapter,
    tokenizer: Any,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None = None,
    template_kwargs: dict[str, Any] | None = None,
) -> str:
    """The prompt text for a chat, through the model's own template (which also renders the
    tools and any extra variables such as `enable_thinking`), adapted to its family."""
    rendered = tokenizer.apply_chat_template(
        prepare_messages(adapter, messages),
        tools=tools or None,
        add_generation_prompt=True,
        tokenize=False,
        **(template_kwargs or {}),
    )
    bos = getattr(tokenizer, "bos_token", None)
    if adapter.add_bos and bos and not rendered.startswith(bos):
        rendered = bos + rendered
    return rendered
