"""The restart-adoption table: what a restarting controller takes a running deployment for."""

from __future__ import annotations

import pytest

from policies.adoption import Found, found


@pytest.mark.parametrize(
    ("running", "starting", "weights", "expected"),
    [
        (0, 0, None, Found.ABSENT),  # nothing runs: set to zero
        (1, 0, "loaded", Found.LOADED),  # weights in memory: adopted with its leases
        (1, 0, "loading", Found.LOADING),  # reading weights: its load finishes
        (1, 0, "none", Found.STARTING),  # up without weights, for a request: loaded now
        (0, 1, None, Found.STARTING),  # still starting: the old controller's load goes on
        (1, 0, None, Found.STARTING),  # running but did not answer: treated as without weights
        (1, 1, "loaded", Found.LOADED),  # a second one starting beside it changes nothing
    ],
)
def test_what_a_restart_finds(running, starting, weights, expected):
    assert found(running, starting, weights) == expected
