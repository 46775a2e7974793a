"""Prompt-lookup speculation, the decisions: what to propose, and whether a pass pays.

A sequence's next tokens are guessed by finding its last few tokens earlier in its own
history (prompt and answer so far) and proposing what followed them there. Agent traffic
copies a lot (a file rewritten with small edits, a tool result quoted back), and there the
guess is often right; in free chat it rarely is. Each sequence keeps the odds that its
guesses come true, learnt from every token it generates (speculating or not), and each
step the batch proposes as many tokens per row as the odds and the measured cost of a
wider forward pass make worthwhile: none, most of the time, in free chat. The model checks
every guess (`deployments.speculation`): the output is the same with or without this.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# The longest and shortest suffix matched against the history: longer matches are tried
# first (they predict better); a single token matches too often to be worth a pass.
NGRAM_MAX = 4
NGRAM_MIN = 2

# Tokens proposed at most per sequence and step.
DRAFT_MAX = 8

# Tokens a draft model proposes per row and step (mlx-lm's server proposes 3 too).
DRAFT_MODEL_TOKENS = 3

# How fast the odds and costs follow what is observed (weight of the newest observation).
ODDS_RATE = 0.15
COST_RATE = 0.2

# A pass is run only when it is expected to give this much more tokens per second than a
# plain step: the estimates are rough, and a pass that does not pay costs free chat.
GAIN_MIN = 1.15

# Before any pass was measured: what each extra row-token adds to a step (measured on the
# CPU backend, 2 cores: 5-15 %; a GPU is cheaper, which the first passes show).
EXTRA_TOKEN_COST = 0.1


class PromptLookup:
    """One sequence's history indexed by its n-grams: each n-gram maps to where the tokens
    after its latest occurrence start. Fed incrementally as tokens are added."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self._after: list[dict[tuple[int, ...], int]] = [{} for _ in range(NGRAM_MAX + 1)]

    def extend(self, tokens: list[int]) -> None:
        for token in tokens:
            self.tokens.append(token)
            end = len(self.tokens) - 1  # the new token follows every n-gram ending before it
            for n in range(NGRAM_MIN, NGRAM_MAX + 1):
                if end >= n:
                    self._after[n][tuple(self.tokens[end - n : end])] = end

    def propose(self, limit: int, after: int | None = None) -> list[int]:
        """Up to `limit` tokens that may follow the history (and then `after`, a token not
        in it yet): what followed the latest earlier occurrence of its last few tokens."""
        history = self.tokens
        ahead = [] if after is None else [after]  # tokens past the indexed history
        for n in range(NGRAM_MAX, NGRAM_MIN - 1, -1):
            if len(history) + len(ahead) <= n:
                continue
            key = (*history[len(history) - n + len(ahead) :], *ahead)
            start = self._after[n].get(key)
            if start is not None:
                # Where what followed runs into the present, the proposal goes on as the
                # history would if the pattern repeats ("a b a b" -> "a b").
                proposal: list[int] = []
                for i in range(start, start + limit):
                    token = history[i] if i < len(history) else ahead[i - len(history)]
                    proposal.append(token)
                    ahead.append(token)
                return proposal
        return []


@dataclass
class Odds:
    """How often one sequence's guesses come true: the first guessed token, and a guessed
    token after one that came true (copies come in runs)."""

    first: float = 0.3
    run: float = 0.5
    _expected: int | None = None  # the guess for the token that comes next
    _last_matched: bool = False

    def observe(self, lookup: PromptLookup, tokens: list[int]) -> None:
        """Index the tokens a sequence added and score the guesses that preceded each."""
        for token in tokens:
            if self._expected is not None:
                matched = token == self._expected
                if self._last_matched:
                    self.run += ODDS_RATE * (matched - self.run)
                else:
                    self.first += ODDS_RATE * (matched - self.first)
                self._last_matched = matched
            else:
                self._last_matched = False
            lookup.extend([token])
            guess = lookup.propose(1)
            self._expected = guess[0] if guess else None

    @property
    def guessing(self) -> bool:
        """Whether the history's suffix occurred before (else nothing would be proposed)."""
        return self._expected is not None

    def accepted(self, proposed: int) -> float:
        """Tokens expected to be accepted of `proposed` guesses: inside a run of true
        guesses the next one is likelier to come true than after a miss."""
        odds = self.run if self._last_matched else self.first
        return odds * sum(self.run**j for j in range(proposed))


@dataclass
class PassCost:
    """What a decode step costs: a plain one by batch size (seconds), and what each extra
    row-token of a verify pass adds, as a share of a plain step."""

    plain: dict[int, float] = field(default_factory=dict)
    extra: float = EXTRA_TOKEN_COST

    def observe_plain(self, rows: int, seconds: float) -> None:
        known = self.plain.get(rows)
        self.plain[rows] = seconds if known is None else known + COST_RATE * (seconds - known)

    def observe_pass(self, rows: int, proposed_per_row: int, seconds: float) -> None:
        plain = self.plain.get(rows)
        if plain and proposed_per_row:
            extra = max(0.0, seconds / plain - 1) / (rows * proposed_per_row)
            self.extra += COST_RATE * (extra - self.extra)

    def relative(self, rows: int, proposed_per_row: int) -> float:
        """A pass's cost over a plain step's, for `rows` rows each given that many tokens."""
        return 1 + self.extra * rows * proposed_per_row


def pass_share(rows: int) -> int:
    """Tokens each row may propose in one pass over `rows` rows: a pass wider than
    DRAFT_MAX + 1 tokens per row, or 4 x DRAFT_MAX tokens in all, is never run."""
    return max(0, min(DRAFT_MAX, 4 * DRAFT_MAX // max(1, rows) - 1))


def tokens_to_propose(odds: list[Odds | None], cost: PassCost, limit: int) -> int:
    """How many tokens each row proposes in the next pass (0: a plain step): the number
    that maximizes tokens per second, if that beats a plain step by GAIN_MIN. `None`
    odds: a row that cannot propose (a grammar that cannot check proposals)."""
    rows = len(odds)
    if rows not in cost.plain:
        return 0  # the plain step is measured first
    guessing = [o for o in odds if o is not None and o.guessing]
    if not guessing:
        return 0
    best, best_gain = 0, GAIN_MIN
    for proposed in range(1, limit + 1):
        tokens = rows + sum(o.accepted(proposed) for o in guessing)
        gain = tokens / rows / cost.relative(rows, proposed)
        if gain > best_gain:
            best, best_gain = proposed, gain
    return best


@dataclass
class SpeculationCounts:
    """What speculation did for a model: tokens proposed and accepted, verify passes."""

    proposed: int = 0
    accepted: int = 0
    passes: int = 0

    @property
    def acceptance_rate(self) -> float | None:
        return round(self.accepted / self.proposed, 4) if self.proposed else None
