"""The restart-adoption table: what a restarting controller takes a running deployment for."""

from __future__ import annotations

import pytest

from policies.adoption import Found, found
from policies.ledger import Measured, Status


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


def test_a_restart_takes_into_the_ledger_what_serve_runs():
    from dataclasses import replace

    from policies.adoption import Deployment, adopt
    from policies.config import LOCAL_NODE
    from policies.kv import Usage
    from tests.test_policies_ledger import GB, entry, ledger

    adapter = replace(entry("served-lora"), base="served")
    book = ledger(entry("served"), adapter, entry("reading"), entry("starting"), entry("gone"), limit=10 * GB)
    measured = Measured(GB, GB // 2, GB // 2, replica="r1")
    adopt(book, [
        Deployment("served", LOCAL_NODE, 1, 0, "loaded", measured, ["lease-1"], Usage(kv_bytes=5), {"served-lora": 7}),
        Deployment("reading", LOCAL_NODE, 1, 0, "loading", None, ["lease-2"]),
        Deployment("starting", LOCAL_NODE, 0, 1, None),
        Deployment("gone", LOCAL_NODE, 0, 0, None),
        Deployment("served", LOCAL_NODE, 1, 0, "none"),  # found again (another node's): the first wins
    ], now=100)
    statuses = {r.id: r.status for r in book.models.values()}
    assert statuses == {"served": Status.LOADED, "served-lora": Status.LOADED, "reading": Status.LOADING,
                        "starting": Status.LOADING, "gone": Status.UNLOADED}
    assert book["served"].measured == measured and book["served"].usage.kv_bytes == 5
    assert book["served"].leases == {"lease-1"}
    assert book["served-lora"].measured == Measured(7, 7, 0, "r1")
    assert len(book["reading"].leases) == 1 and not book["starting"].leases
