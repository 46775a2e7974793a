"""Constrained decoding: an llguidance grammar masks a sequence's logits, token by token.

Each constrained sequence gets its own `GrammarMask`, an mlx-lm logits processor, so
sequences with different schemas (or none) share one continuous batch. The grammar engine
is llguidance (Rust, wheels for macOS arm64 and Linux x86_64): it computes the set of
allowed next tokens in tens of microseconds, which `bench/structured.py` measures against
unconstrained decoding.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from policies.constraints import Constraint
from policies.tool_calls import ToolFormat
from policies.logs import module_logger

logger = module_logger(__name__)


class GrammarTokenizer:
    """The model's tokenizer as llguidance sees it; built once per model (about a second)."""

    def __init__(self, tokenizer: Any):
        from llguidance.hf import from_tokenizer

        # mlx-lm wraps the Hugging Face tokenizer; llguidance reads the fast one beneath.
        hf = getattr(tokenizer, "_tokenizer", tokenizer)
        self.eos = tokenizer.eos_token_id
        self.tokenizer = from_tokenizer(hf, eos_token=self.eos)

    def mask(self, constraint: Constraint, tool_format: ToolFormat | None) -> "GrammarMask":
        return GrammarMask(self, constraint.grammar(tool_format, self.tokenizer))


class GrammarMask:
    """A logits processor: after the first call, each call first takes the token sampled
    since the last one, then leaves only the tokens the grammar allows next. Once the
    grammar is complete (or broken) only end-of-sequence remains, so generation stops."""

    def __init__(self, tokenizer: GrammarTokenizer, grammar: str):
        from llguidance import LLMatcher
        from llguidance.numpy import allocate_token_bitmask

        self.eos = tokenizer.eos
        self.matcher = LLMatcher(tokenizer.tokenizer, grammar, log_level=0)
        self.bitmask = allocate_token_bitmask(1, tokenizer.tokenizer.vocab_size)
        self.started = False
        self.error: str | None = None  # set on the MLX thread when the matcher fails

    def validate(self, tokens: list[int]) -> int:
        """How many of `tokens`, the next one first, the grammar allows in a row (consumes
        none): a speculative proposal is cut to those."""
        if not self.started or self.matcher.is_error():
            return 0
        return self.matcher.validate_tokens(tokens)

    def rollback(self, n: int) -> None:
        """Take back the last `n` tokens consumed (a proposal's tail the model did not take)."""
        if n and not self.matcher.rollback(n):
            self.error = self.error or f"the grammar could not take back {n} tokens"

    def __call__(self, tokens: Any, logits: Any) -> Any:
        """Runs on the MLX thread only: the matcher is not to be touched from elsewhere."""
        import mlx.core as mx
        from llguidance.numpy import fill_next_token_bitmask

        if self.started:
            self.matcher.consume_token(int(tokens[-1].item()))
        self.started = True
        vocab = logits.shape[-1]
        allowed = np.zeros(vocab, dtype=bool)
        if self.matcher.is_error() or self.matcher.is_stopped():
            self.error = self.error or (self.matcher.get_error() if self.matcher.is_error() else None)
            allowed[self.eos] = True
        else:
            fill_next_token_bitmask(self.matcher, self.bitmask)
            bits = np.unpackbits(self.bitmask.view(np.uint8), bitorder="little")
            size = min(vocab, bits.size)
            allowed[:size] = bits[:size].astype(bool)
        return mx.where(mx.array(allowed), logits, mx.array(-float("inf"), dtype=logits.dtype))
