"""The bench's answer: the most accurate candidate within a budget, and its neighbours."""
from __future__ import annotations

import pytest

from leancnn.errors import ConfigError
from leancnn.report.budget import Budget, default_budget, recommend


def row(label, acc, b1, b64=None, kib=100.0, macs_m=10.0):
    return {"label": label, "test_acc": acc, "latency_b1_ms": b1, "latency_b64_ms": b64 if b64 is not None else 20 * b1,
            "storage_bytes": kib * 1024, "macs_effective": macs_m * 1e6}


ROWS = [row("dense", 0.92, 4.0, kib=1000, macs_m=40), row("PS4_P4", 0.91, 2.5, kib=500, macs_m=20),
        row("dnr", 0.89, 1.5, kib=100, macs_m=5), row("csr", 0.90, 6.0, b64=30, kib=300, macs_m=10),
        row("tie-slow", 0.91, 2.9, kib=500, macs_m=20), {"label": "broken", "error": "no 3x3 convolution"}]


def names(recommendation):
    pick = recommendation
    return [None if r is None else r["label"] for r in (pick.chosen, pick.next_faster, pick.next_more_accurate)]


def test_latency_budget_picks_the_most_accurate_that_fits_and_names_its_neighbours():
    # Within 3 ms: PS4_P4 (91%, 2.5 ms), tie-slow (91%, 2.9 ms: same accuracy, slower), dnr (89%, 1.5 ms).
    assert names(recommend(ROWS, Budget.parse("latency_ms=3"))) == ["PS4_P4", "dnr", "dense"]
    # Batch 64 reorders: csr is 30 ms there (6 ms at batch 1), tied with dnr and more accurate;
    # nothing is faster; of the more accurate, PS4_P4 (50 ms) is cheaper than tie-slow (58) and dense (80).
    assert names(recommend(ROWS, Budget.parse("latency_ms=30", batch=64))) == ["csr", None, "PS4_P4"]
    # A roomy budget: the most accurate; nothing more accurate exists.
    assert names(recommend(ROWS, Budget.parse("latency_ms=100"))) == ["dense", "PS4_P4", None]


def test_storage_and_mac_budgets_and_several_limits_at_once():
    assert names(recommend(ROWS, Budget.parse("storage_kib=400"))) == ["csr", "dnr", "PS4_P4"]
    assert names(recommend(ROWS, Budget.parse("macs_m=20"))) == ["PS4_P4", "csr", "dense"]
    # storage <= 400 KiB and latency <= 5 ms: csr is too slow, so dnr; the main axis is storage.
    assert names(recommend(ROWS, Budget.parse("storage_kib=400,latency_ms=5"))) == ["dnr", None, "csr"]


def test_nothing_fits_names_the_cheapest():
    pick = recommend(ROWS, Budget.parse("latency_ms=1"))
    assert pick.chosen is None and pick.next_more_accurate["label"] == "dnr"
    assert pick.lines() == ["Budget: latency <= 1 ms at batch 1. Nothing of the 5 candidates fits; the cheapest is "
                            "dnr (89.00%, 1.5 ms at batch 1)."]


def test_the_answer_reads_as_a_sentence_with_the_costs():
    assert recommend(ROWS, Budget.parse("latency_ms=3")).lines() == [
        "Budget: latency <= 3 ms at batch 1.",
        "Ship PS4_P4: 91.00% test accuracy, 2.5 ms at batch 1.",
        "Next more accurate: dense, +1.00 points (92.00%) for 4 ms at batch 1 (over the budget).",
        "Next faster: dnr, -2.00 points (89.00%) for 1.5 ms at batch 1.",
    ]


def test_default_budget_is_faster_than_dense_at_batch_1():
    budget = default_budget(ROWS)
    assert budget.limits == {"latency_ms": round(4.0 / 1.01, 4)} and budget.batch == 1 and "default" in budget.describe()
    # Dense (4 ms) does not fit its own budget; of the faster ones PS4_P4 is the most accurate.
    assert names(recommend(ROWS, budget)) == ["PS4_P4", "dnr", "dense"]
    within_noise = [row("dense", 0.92, 4.0), row("noise", 0.93, 3.99)]
    assert names(recommend(within_noise, default_budget(within_noise))) == [None, None, "noise"]
    assert default_budget([r for r in ROWS if r["label"] != "dense"]) is None


@pytest.mark.parametrize("text, batch, message", [
    ("speed=3", 1, "unknown key 'speed'; allowed: latency_ms, storage_kib, macs_m"),
    ("latency_ms=fast", 1, "latency_ms must be a number, got 'fast'"),
    ("latency_ms=0", 1, "latency_ms must be > 0"),
    ("latency_ms=5", 8, "candidates are timed at batch 1 and 64, got 8"),
    ("", 1, "give KEY=VALUE pairs"),
])
def test_bad_budgets_are_one_clear_line(text, batch, message):
    with pytest.raises(ConfigError, match=message):
        Budget.parse(text, batch)
