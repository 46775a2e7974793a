"""What a text model can do beyond plain chat, read from its files once at start: the
tool-call format its chat template renders, whether it thinks aloud between markers, and its
context length. `/v1/models` lists these, and requests asking for more get a 400."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from policies.detection import gguf_file, read_config, read_gguf_metadata
from policies.tool_calls import FORMATS, format_for

THINK_MARKERS = ("<think>", "</think>")


@dataclass(frozen=True)
class TextFeatures:
    tool_format: str | None = None  # a policies.tool_calls format name
    think: tuple[str, str] | None = None  # reasoning markers the model writes
    context_length: int | None = None


def text_features(path: str | Path) -> TextFeatures:
    """Features of the model at `path` (a folder or a GGUF file); none for what is not on disk."""
    gguf = gguf_file(path)
    if gguf is not None:
        metadata = read_gguf_metadata(gguf)
        architecture = metadata.get("general.architecture")
        template = metadata.get("tokenizer.chat_template")
        context = metadata.get(f"{architecture}.context_length")
    else:
        template = chat_template(Path(path))
        context = config_context_length(read_config(path) or {})
    tool_format = format_for(template) or (FORMATS["generic"] if template else None)
    return TextFeatures(
        tool_format=tool_format.name if tool_format else None,
        think=THINK_MARKERS if template and THINK_MARKERS[0] in template else None,
        context_length=int(context) if context else None,
    )


def config_context_length(config: dict) -> int | None:
    """A model's own context from its config.json (a vision-language model's text part keeps
    it in `text_config`)."""
    context = config.get("max_position_embeddings") or (config.get("text_config") or {}).get("max_position_embeddings")
    return int(context) if context else None


def served_context(own: int | None, max_context: int | None) -> int | None:
    """The context a model is served with: its own, capped by the config's `max_context`
    (shown in /v1/models and enforced by its replica: one value)."""
    return min((n for n in (own, max_context) if n), default=None)


def chat_template(folder: Path) -> str | None:
    """The default chat template of a model folder, wherever Hugging Face keeps it."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    for name in ("tokenizer_config.json", "chat_template.json"):
        try:
            template = json.loads((folder / name).read_text()).get("chat_template")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(template, list):  # named templates: the default one
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        if isinstance(template, str):
            return template
    return None


def same_vocabulary(a: str | Path, b: str | Path) -> bool | None:
    """Whether two model folders' tokenizers map the same strings to the same ids; None
    when one has no tokenizer.json to read (a GGUF file: its replica checks at load)."""
    vocabularies = []
    for path in (Path(a), Path(b)):
        file = path / "tokenizer.json"
        if not file.is_file():
            return None
        tokenizer = json.loads(file.read_text())
        added = {token["content"]: token["id"] for token in tokenizer.get("added_tokens", [])}
        vocabularies.append({**tokenizer.get("model", {}).get("vocab", {}), **added})
    return vocabularies[0] == vocabularies[1]
