"""bench-overhead runs end to end on a small file (the figures themselves come from the CLI, not tests)."""
from __future__ import annotations

from harness.cli import main
from harness.overhead import measure_overhead, to_markdown


def test_overhead_benchmark_produces_paired_ratios():
    result = measure_overhead(train=12_000, test=500, dim=8, classes=5, epochs=1, pairs=2)
    assert len(result["bare_wall_s"]) == len(result["harness_wall_s"]) == 2
    assert result["wall_ratio"] > 0 and result["step_ratio"] > 0
    text = to_markdown(result, "cpu")
    assert "end to end" in text and text.count("\n| ") == 3


def test_overhead_refuses_bad_flags(capsys):
    assert main(["bench-overhead", "--pairs", "0"]) == 2
    assert "--pairs" in capsys.readouterr().err
