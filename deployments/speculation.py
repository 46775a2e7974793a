"""Speculative decoding inside mlx-lm's continuous batch: prompt lookup, or a draft model.

A decode step of `SpeculativeBatch` takes each row's pending token, lets the row propose
the tokens that may follow it (`policies.speculation.PromptLookup` over the row's history,
or a draft model's greedy guesses, `DraftRows`), and runs one forward
pass over every row's pending token and proposal: the model's own choice at each position
(its sampler, after the row's logits processors) is compared with the proposal, and the
row takes its pending token, the proposed tokens the model agreed with, and the model's
choice after them as its next pending token. Every emitted token is one the model chose
given exactly the tokens before it, so greedy output equals plain decoding token for token,
and a sampled token is a draw from the same distribution (for a proposal that is one fixed
token, accepting it iff the draw equals it is the standard rejection rule).

Rows whose proposals were cut short have their KV cache rewound by what was not taken. A
step where no row proposes anything is mlx-lm's own (pipelined) step.

Written against mlx-lm 0.32's `GenerationBatch` (its rows' `tokens`, `_next_tokens`,
`_next_logprobs`, `_token_context`, `_num_tokens`, `_matchers`), as `deployments.lora` is.
"""

from __future__ import annotations

import time
from typing import Any

import mlx.core as mx
from mlx_lm.generate import BatchGenerator, GenerationBatch, _merge_caches
from mlx_lm.models.cache import KVCache, dynamic_roll, make_prompt_cache

from policies.speculation import DRAFT_MAX, DRAFT_MODEL_TOKENS, Odds, PassCost, PromptLookup, SpeculationCounts, pass_share, tokens_to_propose


def can_speculate(model: Any) -> bool:
    """Whether every layer's cache can be rewound row by row (plain KV caches; not sliding
    windows, quantized or recurrent state)."""
    return all(type(layer) is KVCache for layer in make_prompt_cache(model))


def rewind_rows(cache: list[Any], counts: list[int]) -> None:
    """Drop the last `counts[i]` positions of row i from each layer of a batch KV cache.

    The rows share one write index: what all rows drop is trimmed, and a row dropping more
    is shifted right by the difference, the dropped positions becoming left padding."""
    least = min(counts)
    extra = [n - least for n in counts]
    shift = mx.array(extra) if any(extra) else None
    for layer in cache:
        if least:
            layer.trim(least)
        if shift is not None:
            layer.keys = dynamic_roll(layer.keys, shift[:, None], axis=2)
            layer.values = dynamic_roll(layer.values, shift[:, None], axis=2)
            layer.offset = layer.offset - shift
            layer.left_padding = layer.left_padding + shift


def checkable(processors: list[Any]) -> bool:
    """Whether a row's logits processors can check a proposal and take back its refused
    tail (a grammar can; a row whose processors cannot does not propose)."""
    return all(hasattr(p, "validate") and hasattr(p, "rollback") for p in processors)


class DraftRows:
    """A draft model's KV cache, row for row beside the target's generation batch: it
    proposes each row's next tokens greedily (a point-mass draft, so keeping a proposed
    token exactly when the target's own choice equals it is the rejection rule)."""

    PREFILL_STEP = 512

    def __init__(self, model: Any):
        self.model = model
        self.cache: list[Any] | None = None
        self.seen: list[int] = []  # tokens of each row's history its draft cache holds

    def join(self, histories: list[list[int]]) -> None:
        """Read the histories of rows that joined the batch (after those already in it)."""
        caches = []
        for tokens in histories:
            cache = make_prompt_cache(self.model)
            for start in range(0, len(tokens), self.PREFILL_STEP):
                self.model(mx.array(tokens[start : start + self.PREFILL_STEP])[None], cache=cache)
                mx.eval([layer.state for layer in cache])
            caches.append(cache)
            self.seen.append(len(tokens))
        joined = _merge_caches(caches)
        if self.cache is None:
            self.cache = joined
        else:
            for layer, new in zip(self.cache, joined):
                layer.extend(new)

    def filter(self, keep: list[int]) -> None:
        self.seen = [self.seen[row] for row in keep]
        if not keep:
            self.cache = None
        elif self.cache is not None:
            for layer in self.cache:
                layer.filter(keep)

    def propose(self, histories: list[list[int]], pending: list[int], count: int) -> list[list[int]]:
        """`count` tokens per row after its history and pending token: one pass that reads
        what each row's draft cache lacks (rows padded at the end, then rewound), then
        `count - 1` one-token passes."""
        feeds = [[*history[seen:], token] for history, seen, token in zip(histories, self.seen, pending)]
        width = max(map(len, feeds))
        inputs = mx.array([[*feed, *[feed[-1]] * (width - len(feed))] for feed in feeds], dtype=mx.uint32)
        logits = self.model(inputs, cache=self.cache)
        rows = mx.arange(len(feeds))
        token = mx.argmax(logits[rows, mx.array([len(feed) - 1 for feed in feeds])], axis=-1)
        rewind_rows(self.cache, [width - len(feed) for feed in feeds])
        proposals = [token]
        for _ in range(count - 1):
            token = mx.argmax(self.model(token[:, None], cache=self.cache)[:, -1], axis=-1)
            proposals.append(token)
        self.seen = [len(history) + count for history in histories]  # pending and count - 1 proposals
        return mx.stack(proposals, axis=1).tolist()

    def settle(self, histories: list[list[int]]) -> None:
        """After a verify pass: each row's cache back to what its history (now holding the
        tokens it kept) has in common with what the draft read."""
        drop = [max(0, seen - len(history)) for seen, history in zip(self.seen, histories)]
        rewind_rows(self.cache, drop)
        self.seen = [seen - d for seen, d in zip(self.seen, drop)]


class SpeculativeBatch(GenerationBatch):
    """mlx-lm's generation batch whose rows propose tokens: from their own history, or
    from a draft model when there is one."""

    counts: SpeculationCounts
    cost: PassCost
    lookups: dict[int, PromptLookup]
    odds: dict[int, Odds]
    draft: DraftRows | None

    @classmethod
    def for_model(
        cls, model: Any, sampler: Any, counts: SpeculationCounts, cost: PassCost, draft: Any = None
    ) -> "SpeculativeBatch":
        batch = cls.empty(model, sampler)
        batch.counts, batch.cost, batch.lookups, batch.odds = counts, cost, {}, {}
        batch.draft = DraftRows(draft) if draft is not None else None
        return batch

    def extend(self, batch: GenerationBatch) -> None:
        super().extend(batch)
        if self.draft is not None:
            self.draft.join(batch.tokens)

    def filter(self, keep: list[int]) -> None:
        super().filter(keep)
        if self.draft is not None:
            self.draft.filter(keep)
        kept = set(self.uids)
        for by_uid in (self.lookups, self.odds):
            for uid in [uid for uid in by_uid if uid not in kept]:
                del by_uid[uid]

    def next(self) -> list[GenerationBatch.Response]:
        if not self.uids:
            return []
        rows = len(self.uids)
        if self.draft is not None:
            return self._next_from_draft(rows)
        proposed = tokens_to_propose(self._observe(), self.cost, DRAFT_MAX)
        if proposed:
            mx.eval(self._next_tokens)  # what the rows propose follows their pending token
            started = time.perf_counter()
            pending = self._next_tokens.tolist()
            drafts = [self._propose(row, pending[row], proposed) for row in range(rows)]
            if any(drafts):
                responses = self._verify(pending, drafts)
                self.cost.observe_pass(rows, max(map(len, drafts)), time.perf_counter() - started)
                return responses
        started = time.perf_counter()
        responses = super().next()
        self.cost.observe_plain(rows, time.perf_counter() - started)
        return responses

    def _observe(self) -> list[Odds | None]:
        """Each row's odds, after scoring its guesses on the tokens it added; None for a row
        whose logits processors cannot check a proposal."""
        odds: list[Odds | None] = []
        for row, uid in enumerate(self.uids):
            lookup = self.lookups.get(uid)
            if lookup is None:  # a new row: its prompt teaches its first odds
                lookup, self.odds[uid] = self.lookups.setdefault(uid, PromptLookup()), Odds()
            self.odds[uid].observe(lookup, self.tokens[row][len(lookup.tokens) :])
            odds.append(self.odds[uid] if checkable(self.logits_processors[row]) else None)
        return odds

    def _next_from_draft(self, rows: int) -> list[GenerationBatch.Response]:
        count = min(DRAFT_MODEL_TOKENS, pass_share(rows))
        if not count:
            return super().next()
        mx.eval(self._next_tokens)
        pending = self._next_tokens.tolist()
        proposals = self.draft.propose(self.tokens, pending, count)
        return self._verify(pending, [self._cut(row, pending[row], p) for row, p in enumerate(proposals)])

    def _propose(self, row: int, pending: int, limit: int) -> list[int]:
        return self._cut(row, pending, self.lookups[self.uids[row]].propose(limit, after=pending))

    def _cut(self, row: int, pending: int, proposal: list[int]) -> list[int]:
        """A row's proposal as far as it may go: within max_tokens (the pending token counts
        too) and what its logits processors allow (none, if they cannot check it)."""
        processors = self.logits_processors[row]
        if not checkable(processors):
            return []
        proposal = proposal[: max(0, self.max_tokens[row] - self._num_tokens[row] - 1)]
        for processor in processors:
            proposal = proposal[: max(0, processor.validate([pending, *proposal]) - 1)]
        return proposal

    def _verify(self, pending: list[int], drafts: list[list[int]]) -> list[GenerationBatch.Response]:
        width = max(len(d) for d in drafts) + 1
        # Short rows are padded with their pending token: those positions are never taken.
        inputs = mx.array(
            [[p, *d, *[p] * (width - 1 - len(d))] for p, d in zip(pending, drafts)], dtype=mx.uint32
        )
        logits = self.model(inputs, cache=self.prompt_cache)
        logits, contexts = self._process(inputs, logits, drafts)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        samplers = [self.fallback_sampler if s is None else s for s in self.samplers]
        if all(s is samplers[0] for s in samplers):
            chosen = samplers[0](logprobs.reshape(-1, logprobs.shape[-1])).reshape(len(pending), width)
        else:
            chosen = mx.stack([s(logprobs[row]) for row, s in enumerate(samplers)])
        mx.eval(chosen)
        chosen = chosen.tolist()

        responses: list[GenerationBatch.Response] = []
        rewind, keep, next_tokens, next_logprobs = [], [], [], []
        for row, (uid, draft) in enumerate(zip(self.uids, drafts)):
            agreed = 0
            while agreed < len(draft) and chosen[row][agreed] == draft[agreed]:
                agreed += 1
            emitted = [pending[row], *draft[:agreed]]
            emitted_logprobs = [self._next_logprobs[row], *(logprobs[row, j] for j in range(agreed))]
            finish = None
            for taken, token in enumerate(emitted, 1):
                self._num_tokens[row] += 1
                if self._num_tokens[row] >= self.max_tokens[row]:
                    finish = "length"
                if self._matchers[row].advance(token):
                    finish = "stop"
                if finish:
                    break
            kept = taken - 1  # proposed tokens that stay in the cache
            rewind.append(width - 1 - kept)
            self.tokens[row].extend(emitted[:taken])
            if self.logits_processors[row]:
                if len(draft) > kept:
                    for processor in self.logits_processors[row]:
                        processor.rollback(len(draft) - kept)
                # The row's context holds what it holds in the cache (mlx-lm's TokenBuffer).
                self._token_context[row]._size = contexts[row] + 1 + kept
            self.counts.proposed += len(draft)
            self.counts.accepted += kept
            next_tokens.append(chosen[row][kept])
            next_logprobs.append(logprobs[row, kept])
            for j in range(taken):
                last = j == taken - 1
                responses.append(
                    self.Response(
                        uid=uid,
                        token=emitted[j],
                        logprobs=emitted_logprobs[j],
                        finish_reason=finish if last else None,
                        prompt_cache=None,
                        all_tokens=None,
                    )
                )
            if finish is None:
                keep.append(row)
        self.counts.passes += 1
        rewind_rows(self.prompt_cache, rewind)
        if self.draft is not None:
            self.draft.settle(self.tokens)
        self._next_tokens = mx.array(next_tokens, dtype=mx.uint32)
        self._next_logprobs = next_logprobs
        for response in responses:
            if response.finish_reason:
                row = self.uids.index(response.uid)
                response.prompt_cache = self.extract_cache(row)
                response.all_tokens = self.tokens[row]
        if len(keep) < len(self.uids):
            self.filter(keep)
        return responses

    def _process(self, inputs: mx.array, logits: mx.array, drafts: list[list[int]]) -> tuple[mx.array, dict[int, int]]:
        """The rows' logits processors over their pending token and proposal, position by
        position (each sees the tokens before it); and each such row's context length
        before this step."""
        contexts: dict[int, int] = {}
        if not any(self.logits_processors):
            return logits, contexts
        rows = []
        for row, processors in enumerate(self.logits_processors):
            if not processors:
                rows.append(logits[row])
                continue
            n = len(drafts[row]) + 1
            context = self._token_context[row].update_and_fetch(inputs[row, :n])
            contexts[row] = context.size - n
            positions = []
            for j in range(n):
                position = logits[row, j : j + 1]
                for processor in processors:
                    position = processor(context[: contexts[row] + j + 1], position)
                positions.append(position)
            rows.append(mx.concatenate([*positions, logits[row, n:]], axis=0))
        return mx.stack(rows), contexts


class SpeculativeGenerator(BatchGenerator):
    """mlx-lm's BatchGenerator whose decode steps speculate (`SpeculativeBatch`)."""

    def __init__(self, model: Any, counts: SpeculationCounts, cost: PassCost, draft: Any = None, **kwargs: Any):
        super().__init__(model, **kwargs)
        self._generation_batch = SpeculativeBatch.for_model(self.model, self.sampler, counts, cost, draft)
