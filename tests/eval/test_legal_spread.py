"""``spread``: a capped LegalBench evaluation samples evenly over the (label-sorted) test file."""

from __future__ import annotations

from taskmoe.eval.legal import spread


def test_spread_is_evenly_spaced_and_keeps_both_classes_of_a_sorted_file() -> None:
    """items[floor(i * N / n)]: N = 10, n = 4 -> indices 0, 2, 5, 7; n >= N or None keeps everything."""
    assert spread(list(range(10)), 4) == [0, 2, 5, 7]
    assert spread(list(range(3)), 5) == [0, 1, 2] and spread(list(range(3)), None) == [0, 1, 2]
    labels = ["No"] * 50 + ["Yes"] * 44  # hearsay's test.tsv order
    assert set(spread(labels, 8)) == {"No", "Yes"}
