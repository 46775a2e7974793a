"""Prompt lookup's decisions without a model: what is proposed, how the odds learn, and
when a verify pass is worth running."""

from __future__ import annotations

import random

from policies.speculation import DRAFT_MAX, GAIN_MIN, Odds, PassCost, PromptLookup, tokens_to_propose


def lookup_of(tokens: list[int]) -> PromptLookup:
    lookup = PromptLookup()
    lookup.extend(tokens)
    return lookup


def test_a_proposal_is_what_followed_the_latest_earlier_occurrence():
    lookup = lookup_of([1, 2, 3, 4, 5, 9, 1, 2, 3, 7, 8, 1, 2])
    assert lookup.propose(3) == [3, 7, 8]  # the latest "1 2" was followed by "3 7 8"
    assert lookup.propose(2, after=3) == [7, 8]
    assert lookup.propose(4, after=6) == []  # "2 6" never occurred
    assert lookup.propose(0) == []


def test_longer_matches_win_and_a_single_token_never_matches():
    # "x 2" last occurred before 5; "1 x 2" (longer) before 4.
    lookup = lookup_of([1, 0, 2, 4, 3, 0, 2, 5, 1, 0])
    assert lookup.propose(1, after=2) == [4]
    assert lookup_of([5, 6, 7, 5]).propose(2) == []  # only "5" matches: too short


def test_a_repeating_pattern_is_proposed_past_the_end_of_the_history():
    assert lookup_of([4, 5, 4, 5]).propose(5) == [4, 5, 4, 5, 4]
    assert lookup_of([7, 7, 7]).propose(3, after=7) == [7, 7, 7]


def test_the_odds_rise_on_a_copy_and_fall_in_free_text():
    copy, free = Odds(), Odds()
    text = list(range(100, 160))
    copy.observe(PromptLookup(), text + text)
    assert copy.run > 0.9 and copy.guessing and copy.accepted(4) > 3.5
    rng = random.Random(0)
    free.observe(PromptLookup(), [rng.randrange(50) for _ in range(400)])
    assert free.accepted(4) < copy.accepted(4) / 4


def test_a_pass_runs_only_where_it_is_expected_to_pay():
    cost = PassCost()
    copying = Odds(first=0.9, run=0.95, _expected=1, _last_matched=True)
    rambling = Odds(first=0.05, run=0.2, _expected=1)
    assert tokens_to_propose([copying], cost, DRAFT_MAX) == 0  # no plain step measured yet
    cost.observe_plain(1, 0.010)
    assert tokens_to_propose([copying], cost, DRAFT_MAX) > 2
    assert tokens_to_propose([rambling], cost, DRAFT_MAX) == 0
    assert tokens_to_propose([None, Odds()], cost, DRAFT_MAX) == 0  # nothing to guess from
    # Wider batches pay more per proposed token: fewer are proposed, then none.
    assert tokens_to_propose([copying] * 4 + [rambling] * 4, cost, DRAFT_MAX) < tokens_to_propose([copying], cost, DRAFT_MAX)
    cost.observe_plain(32, 0.05)
    assert tokens_to_propose([rambling] * 31 + [copying], cost, DRAFT_MAX) == 0


def test_pass_costs_are_learnt_from_what_passes_took():
    cost = PassCost()
    cost.observe_plain(1, 0.010)
    for _ in range(30):
        cost.observe_pass(1, 4, 0.030)  # 4 extra tokens tripled the step: 50 % each
    assert abs(cost.extra - 0.5) < 0.02
    odds = Odds(first=0.6, run=0.6, _expected=1)
    assert 1 + odds.accepted(1) < GAIN_MIN * cost.relative(1, 1)
    assert tokens_to_propose([odds], cost, DRAFT_MAX) == 0
