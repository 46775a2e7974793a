"""What a model is: its type first (text-generation, vision, embeddings), then its family.

Chain: explicit config -> config.json (and files beside it), or a GGUF file's metadata ->
name words -> default (text-generation, llama). Every answer says which signal decided, in
`reason`; `mlx-fleet detect PATH_OR_NAME` prints it.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

TEXT = "text-generation"
VISION = "vision"
EMBEDDINGS = "embeddings"

DEFAULT_FAMILY = "llama"

# model_type or name-word prefixes of the chat families; the longest match wins. Anything
# else keeps its own model_type as family (bert, llava, florence2, ...).
_FAMILY_PREFIXES = {
    "llama": "llama",
    "smollm": "llama",  # SmolLM is a Llama architecture
    "mistral": "mistral",
    "mixtral": "mistral",
    "ministral": "mistral",
    "codestral": "mistral",
    "devstral": "mistral",
    "magistral": "mistral",
    "qwen": "qwen",
    "gemma": "gemma",
    "phi": "phi",
    "deepseek": "deepseek",
}
_ENCODER_MODEL_TYPES = {
    "bert", "roberta", "xlm-roberta", "distilbert", "mpnet", "modernbert", "nomic_bert", "electra",
}
_ENCODER_ARCHITECTURES = {
    "BertModel", "RobertaModel", "XLMRobertaModel", "DistilBertModel", "MPNetModel",
    "ModernBertModel", "NomicBertModel", "ElectraModel",
}
_VISION_MODEL_TYPES = {
    "llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "paligemma", "florence2", "idefics2",
    "idefics3", "pixtral", "mllama", "phi3_v", "smolvlm", "gemma3", "mistral3",
}
_VISION_KEYS = ("vision_config", "vision_tower", "img_processor", "mm_vision_tower")
_EMBEDDING_WORDS = ("embed", "bge", "e5", "minilm", "gte", "mpnet", "sentence")
_VISION_WORDS = ("vl", "vlm", "vision", "llava", "pixtral", "paligemma", "florence", "idefics")
_VISION_FAMILY_WORDS = ("llava", "paligemma", "florence2", "pixtral", "idefics")


@dataclass(frozen=True)
class Detection:
    type: str
    family: str
    architecture: str | None
    reason: str

    def as_dict(self) -> dict:
        return asdict(self)


def read_config(path: str | Path) -> dict | None:
    """The model's config.json as a dict, or None when there is none to read."""
    path = Path(path)
    config_file = path if path.is_file() else path / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def chat_family(word: str) -> str | None:
    """The chat family a model_type or name word starts with ("qwen2_5_vl" -> "qwen"), if any."""
    word = word.lower()
    matches = [prefix for prefix in _FAMILY_PREFIXES if word.startswith(prefix)]
    return _FAMILY_PREFIXES[max(matches, key=len)] if matches else None


def family_of(model_type: str) -> str:
    """A model_type's family: a chat family, else the model_type itself ("bert", "llava")."""
    return chat_family(model_type) or model_type.lower()


def _words(name: str) -> list[str]:
    """A name's words, lower case, and the parts of CamelCase words ("SmolVLM" adds "smol",
    "vlm"), so that words inside a brand name count too."""
    words = [w for w in re.split(r"[^A-Za-z0-9]+", name) if w]
    parts = [p for w in words for p in re.findall(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|[0-9]+", w)]
    return [w.lower() for w in words] + [p.lower() for p in parts if p.lower() not in map(str.lower, words)]


def _has_word(words: list[str], wanted: tuple[str, ...]) -> str | None:
    """The first wanted word that a name word is, or starts with (for "embed" in "embedding")."""
    for want in wanted:
        for word in words:
            if word == want or (len(want) > 3 and word.startswith(want)):
                return want
    return None


def _family_from_name(words: list[str]) -> tuple[str, str] | None:
    """(family, the word that told) from a name's words, if any word names a chat family."""
    # "DeepSeek-R1-Distill-Qwen-7B" is a Qwen model distilled by DeepSeek: the base decides.
    if "distill" in words:
        words = words[words.index("distill") + 1 :] + words
    return next(((chat_family(w), w) for w in words if chat_family(w)), None)


def detect_from_config(config: dict, files: set[str], name: str) -> Detection:
    """Type and family from a config.json, the names of files beside it, and the model's name."""
    architectures = config.get("architectures") or []
    architecture_class = architectures[0] if architectures else None
    model_type = str(config.get("model_type") or "").lower() or None
    architecture = model_type or architecture_class
    family = family_of(model_type) if model_type else DEFAULT_FAMILY
    words = _words(name)

    def found(kind: str, reason: str) -> Detection:
        return Detection(kind, family, architecture, reason)

    if "modules.json" in files or "1_Pooling" in files:
        return found(EMBEDDINGS, "sentence-transformers files (modules.json / 1_Pooling) beside config.json")
    if architecture_class in _ENCODER_ARCHITECTURES or model_type in _ENCODER_MODEL_TYPES:
        return found(
            EMBEDDINGS, f"config.json: encoder-only {architecture_class or model_type} (no text generation)"
        )
    # Qwen3-Embedding is a Qwen3ForCausalLM: only its name tells.
    embed_word = _has_word(words, ("embed", "embedding"))
    if embed_word:
        return found(EMBEDDINGS, f"name contains {embed_word!r} (config.json says {architecture_class})")
    vision_key = next((key for key in _VISION_KEYS if key in config), None)
    if vision_key:
        return found(VISION, f"config.json has {vision_key!r}")
    if model_type in _VISION_MODEL_TYPES:
        return found(VISION, f"config.json: vision model_type {model_type!r}")
    if "preprocessor_config.json" in files and architecture_class and "Conditional" in architecture_class:
        return found(VISION, f"image preprocessor beside config.json, {architecture_class}")
    if model_type:
        return found(TEXT, f"config.json: model_type {model_type!r}")
    return found(TEXT, "config.json without model_type; default family")


def detect_from_name(name: str) -> Detection:
    words = _words(name)
    embed = _has_word(words, _EMBEDDING_WORDS)
    if embed:
        encoder = _has_word(words, ("modernbert", "xlmr", "xlm"))
        chat = _family_from_name(words)  # Qwen3-Embedding is a Qwen model
        family = {"xlmr": "xlm-roberta", "xlm": "xlm-roberta"}.get(encoder, encoder)
        return Detection(EMBEDDINGS, family or (chat and chat[0]) or "bert", None, f"name contains {embed!r}")
    vision = _has_word(words, _VISION_WORDS)
    if vision:
        chat = _family_from_name(words)
        family = _has_word(words, _VISION_FAMILY_WORDS) or (chat and chat[0]) or DEFAULT_FAMILY
        return Detection(VISION, family, None, f"name contains {vision!r}")
    chat = _family_from_name(words)
    if chat:
        return Detection(TEXT, chat[0], None, f"name word {chat[1]!r} is a {chat[0]} model")
    return Detection(TEXT, DEFAULT_FAMILY, None, "no config.json and no known word in the name; default")


def gguf_file(path: str | Path) -> Path | None:
    """The GGUF file a model path names: the file itself, or the only .gguf in a folder
    without a config.json."""
    path = Path(path).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return path
    if path.is_dir() and not (path / "config.json").exists():
        found = sorted(path.glob("*.gguf"))
        if len(found) > 1:
            raise ValueError(f"{path} holds several GGUF files ({', '.join(f.name for f in found)}); name one")
        return found[0] if found else None
    return None


# GGUF value types: struct formats of the scalars; 8 is a string, 9 an array.
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def read_gguf_metadata(path: str | Path, arrays: bool = False) -> dict:
    """A GGUF file's metadata from its header (not its tensors): scalars and strings, and,
    with `arrays`, the arrays too (a tokenizer's 50k tokens take seconds to decode; what
    the server decides at start needs none of them, so they are skipped unread)."""
    import struct

    with open(path, "rb") as file:

        def take(fmt: str):
            size = struct.calcsize("<" + fmt)
            chunk = file.read(size)
            if len(chunk) < size:
                raise ValueError(f"{path}: the GGUF header ends early (truncated file?)")
            return struct.unpack("<" + fmt, chunk)[0]

        def text() -> str:
            return file.read(take("Q")).decode("utf-8", "replace")

        def value(kind: int):
            if kind in _GGUF_SCALARS:
                return take(_GGUF_SCALARS[kind])
            if kind == _GGUF_STRING:
                return text()
            if kind != _GGUF_ARRAY:
                raise ValueError(f"{path}: unknown GGUF value type {kind}")
            item, count = take("I"), take("Q")
            if arrays:
                return [value(item) for _ in range(count)]
            if item == _GGUF_STRING:
                for _ in range(count):
                    file.seek(take("Q"), 1)
            else:
                file.seek(struct.calcsize("<" + _GGUF_SCALARS[item]) * count, 1)
            return None

        if file.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        take("I")  # version
        take("Q")  # tensors
        metadata = {}
        for _ in range(take("Q")):
            key = text()
            found = value(take("I"))
            if found is not None:
                metadata[key] = found
        return metadata


def detect_from_gguf(path: Path) -> Detection:
    """GGUF files hold text-generation models (vision ones keep their projector apart)."""
    metadata = read_gguf_metadata(path)
    architecture = str(metadata.get("general.architecture") or "") or None
    reason = f"GGUF metadata: general.architecture {architecture!r}"
    named = _family_from_name(_words(f"{path.stem} {metadata.get('general.name', '')}"))
    if named:
        return Detection(TEXT, named[0], architecture, f"{reason}; name word {named[1]!r}")
    family = chat_family(architecture or "") or DEFAULT_FAMILY
    return Detection(TEXT, family, architecture, reason)


def detect(path_or_name: str) -> Detection:
    """Detect from a model directory, a config.json file, a GGUF file, or a name / hub id."""
    path = Path(path_or_name)
    gguf = gguf_file(path)
    if gguf is not None:
        return detect_from_gguf(gguf)
    config = read_config(path)
    if config is None:
        return detect_from_name(path_or_name)
    directory = path.parent if path.is_file() else path
    files = {child.name for child in directory.iterdir()}
    # A hub cache snapshot dir is named by its commit hash: the repo's name is two levels up.
    name = directory.parent.parent.name if re.fullmatch(r"[0-9a-f]{40}", directory.name) else directory.name
    return detect_from_config(config, files, name)

