"""Healing by distillation: the data it trains on (training itself: tests/test_tune.py, test_tune_heal.py)."""

from __future__ import annotations

from pipeline.tuning.distill import OWN, distill_dataset


def test_both_teachers_weigh_the_same():
    rows = [{"prompt": f"p{i}", "chosen": f"a{i}", "rejected": f"r{i}"} for i in range(7)]
    data = distill_dataset(rows, own=2)  # 2 refusal pairs, 5 harmless ones
    assert len(data) == 10 and sum(data[OWN]) == 5
    kept = [ex["messages"][0]["content"] for ex in data if ex[OWN]]
    assert sorted(set(kept)) == ["p0", "p1"]  # the refusal pairs, repeated
    assert [ex["messages"][0]["content"] for ex in data if not ex[OWN]] == ["p2", "p3", "p4", "p5", "p6"]
    first = data[0]["messages"]
    assert [m["role"] for m in first] == ["user", "assistant"] and first[1]["content"] == "a0"
    # Without refusal pairs only the base teaches.
    assert sum(distill_dataset(rows, own=0)[OWN]) == 0 and len(distill_dataset(rows, own=0)) == 7
