"""bench-loss: config parsing, bench files, the table's rows, and memory-capped failures."""
import math
import subprocess
import sys

from pathlib import Path

import pytest

from harness.cli import main
from harness.lossbench import COLUMNS, BenchError, bench_losses, load_bench_file, parse_config


def test_parse_config():
    assert parse_config("softmax") == ("softmax", {})
    assert parse_config("difftopk:sorter=bitonic,m=16,p_k=[0.5,0,0,0,0.5]") == (
        "difftopk", {"sorter": "bitonic", "m": 16, "p_k": [0.5, 0, 0, 0, 0.5]})
    with pytest.raises(BenchError, match="expected key=value"):
        parse_config("difftopk:bitonic")


def test_tiny_bench_rows_ratios_and_reference():
    df = bench_losses([("difftopk", {"sorter": "odd_even"}), ("softmax", {})], [20], 8, "cpu", 1,
                      repeats=2, warmup=1, reference=True, memory=True)
    assert list(df.columns) == COLUMNS
    assert df.loss.tolist()[0] == "cross_entropy" and df.ratio_vs_ce.iloc[0] == 1.0
    assert "softmax" in df.loss.tolist() and "difftopk" in df.loss.tolist()
    assert "ref:TopKCrossEntropyLoss[odd_even]" in df.loss.tolist()
    ok = df[df.status == "ok"]
    assert len(ok) == 4
    assert (ok.median_ms > 0).all() and (ok.ratio_vs_ce > 0).all()
    assert all(not math.isnan(v) and v >= 0 for v in ok.peak_mem_mb)
    bad = bench_losses([("difftopk", {"m": 100})], [20], 4, "cpu", 1, repeats=1, warmup=0, memory=False)
    assert bad.status.iloc[1].startswith("error") and "m=100" in bad.status.iloc[1]


def test_bench_file_expands_grid(tmp_path):
    path = tmp_path / "b.yaml"
    path.write_text("bench: b\nclasses: [20]\nlosses:\n  - softmax\n"
                    "  - {name: difftopk, params: {sorter: [odd_even, bitonic], m: 16}}\n")
    bench, configs = load_bench_file(path)
    assert bench.classes == [20] and bench.threads == 1
    assert configs == [("softmax", {}), ("difftopk", {"sorter": "odd_even", "m": 16}),
                       ("difftopk", {"sorter": "bitonic", "m": 16})]


@pytest.mark.parametrize("text,fragment", [
    ("bench: b\nlosses: [softmx]\n", "losses[0].name: unknown loss 'softmx' (did you mean 'softmax'?)"),
    ("bench: b\nlosses: [{name: difftopk, params: {sortr: bitonic}}]\n", "losses[0].params.sortr"),
    ("bench: b\nlosses: [{name: difftopk, params: {sorter: quicksort}}]\n", "losses[0].params.sorter"),
    ("bench: b\nclases: [10]\nlosses: [softmax]\n", "clases"),
    ("bench: b\nbatch_size: 0\nlosses: [softmax]\n", "batch_size"),
    ("bench: b\nlosses: [softmax\n", "invalid YAML"),
])
def test_bad_bench_file_is_one_line_exit_2(tmp_path, capsys, text, fragment):
    path = tmp_path / "b.yaml"
    path.write_text(text)
    assert main(["bench-loss", "--suite", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and fragment in err, err


def test_config_over_the_memory_cap_is_oom_not_a_crash(tmp_path):
    """The reference's NeuralSort materialises [B, n, n]: 1 GiB here, over a 0.4 GiB cap."""
    out = tmp_path / "t.md"
    proc = subprocess.run(
        [sys.executable, "-m", "harness.cli", "bench-loss", "--loss", "difftopk:sorter=neuralsort", "--classes", "1000",
         "--batch-size", "256", "--repeats", "1", "--warmup", "0", "--no-memory", "--memory-limit-gb", "0.4",
         "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    table = out.with_suffix(".csv").read_text()
    assert "ref:TopKCrossEntropyLoss[neuralsort],difftopk:sorter=neuralsort,1000,1.0,256,cpu,,,,oom" in table
    assert "\ndifftopk,difftopk:sorter=neuralsort,1000,1.0,256,cpu," in table and ",ok\n" in table


@pytest.mark.parametrize("args,fragment", [
    (["--loss", "sofmax"], "unknown loss 'sofmax' (did you mean 'softmax'?)"),
    (["--loss", "softmax:label_smoothing=3"], "label_smoothing: 3.0 out of range"),
    (["--loss", "softmax:smoothing=0.1"], "unknown parameter of 'softmax'"),
    (["--loss", "berrada_smooth:k=200", "--classes", "100"], "with 100 classes: k=200"),
    (["--loss", "softmax", "--classes", "1"], "classes must be at least 2"),
    (["--loss", "softmax", "--repeats", "0"], "--repeats must be at least 1"),
])
def test_bad_loss_or_parameter_is_one_line_exit_2_and_no_table(capsys, args, fragment):
    assert main(["bench-loss", *args, "--no-memory"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "\n" not in err.strip() and fragment in err, (out, err)


def test_reference_rows_come_from_the_loss_registration():
    """The engine names no loss: bench-loss asks each loss's `reference=` hook for its equivalents."""
    from harness.lossbench import reference_impls
    from harness.registry import LOSSES

    assert reference_impls("softmax", {}, 10, {}) == []
    assert [r.label for r in reference_impls("berrada_smooth", {"k": 2}, 10, {})] == [
        "ref:SmoothTopKLoss", "ref:SmoothHardTopKLoss"]
    assert reference_impls("berrada_smooth", {"k": 2, "alpha": 0.5}, 10, {}) == []  # the port fixes alpha = 1
    assert LOSSES.get("difftopk").extra["reference"].__module__ == "losses.reference_difftopk"
    engine = Path(__file__).resolve().parents[2] / "harness"
    assert not (engine / "reference.py").exists()
    for source in engine.glob("*.py"):
        text = source.read_text()
        for word in ("TopKCrossEntropyLoss", "SmoothTopKLoss", "diffsort_method", "import difftopk"):
            assert word not in text, (source.name, word)


def test_scale_axis_rows_inputs_and_tables(tmp_path):
    from harness.lossbench import _inputs, to_markdown

    scores, _ = _inputs(2000, 64, __import__("torch").device("cpu"), scale=30.0)
    assert 29 < scores.std().item() < 31
    df = bench_losses([("lapsum", {"m": 8})], [20], 8, "cpu", 1, repeats=1, warmup=0, memory=False, scales=[1.0, 30.0])
    assert df.scale.tolist() == [1.0, 1.0, 30.0, 30.0] and (df.status == "ok").all()
    assert df[df.loss == "cross_entropy"].ratio_vs_ce.tolist() == [1.0, 1.0]  # CE of the same scale
    text = to_markdown(df)
    assert "### scores ~ N(0, 1²)" in text and "### scores ~ N(0, 30²)" in text
    path = tmp_path / "b.yaml"
    path.write_text("bench: b\nclasses: [20]\nscale: [1, 3]\nlosses:\n  - softmax\n")
    assert load_bench_file(path)[0].scale == [1.0, 3.0]
    path.write_text("bench: b\nclasses: [20]\nscale: [1, 0]\nlosses:\n  - softmax\n")
    with pytest.raises(BenchError, match="scale"):
        load_bench_file(path)


def _table(slopes: dict[str, float], classes=(10, 100, 1000, 3000, 10000, 20000), scale=3.0):
    import pandas as pd

    rows = []
    for config, slope in slopes.items():
        for n in classes:
            rows.append({"loss": config, "config": config, "classes": n, "scale": scale, "batch": 8,
                         "device": "cpu", "median_ms": 0.01 * n ** slope + 0.5, "ratio_vs_ce": 1.0,
                         "peak_mem_mb": 0.001 * n ** (slope / 2), "status": "ok"})
    return pd.DataFrame(rows)


def test_scaling_exponents_recover_known_slopes_and_report_failures():
    from harness import lossbench_scaling as scaling

    df = _table({"cross_entropy": 1.0, "quadratic": 2.0})
    df.loc[(df.config == "quadratic") & (df.classes == 20000), "status"] = "oom"
    got = scaling.exponents(df).set_index("config")
    assert abs(got.loc["cross_entropy", "time exponent"] - 1.0) < 0.05  # fixed cost 0.5 ms is small at n ≥ 1000
    assert abs(got.loc["quadratic", "time exponent"] - 2.0) < 0.02
    assert abs(got.loc["quadratic", "memory exponent"] - 1.0) < 0.02
    assert got.loc["quadratic", "largest n"] == 10000 and got.loc["quadratic", "failed at"] == "20000 (oom)"
    assert got.loc["quadratic", "fit points"] == 3  # 1000, 3000, 10000
    assert not scaling.has_scaling(_table({"cross_entropy": 1.0}, classes=(100, 1000)))


def test_bench_with_three_class_counts_writes_the_scaling_figure(tmp_path, capsys):
    from harness.cli import main

    path = tmp_path / "s.yaml"
    path.write_text("bench: s\nclasses: [10, 40, 1000, 2000]\nbatch_size: 4\nrepeats: 1\nwarmup: 0\n"
                    "losses:\n  - softmax\n")
    assert main(["bench-loss", "--suite", str(path), "--no-memory", "--out", str(tmp_path / "s.md")]) == 0
    figure = tmp_path / "s-scaling.png"
    assert figure.stat().st_size > 10_000 and figure.read_bytes()[:4] == b"\x89PNG"
    text = (tmp_path / "s.md").read_text()
    assert "![time and memory against n](s-scaling.png)" in text and "time exponent" in text


def test_skip_unfit_marks_rows_na_and_still_refuses_a_config_that_fits_nothing(tmp_path, capsys):
    import pandas as pd

    from harness.cli import main

    path = tmp_path / "s.yaml"
    path.write_text("bench: s\nclasses: [10, 40]\nbatch_size: 4\nrepeats: 1\nwarmup: 0\nskip_unfit: true\n"
                    "losses:\n  - {name: lapsum, params: {m: 16}}\n")
    assert main(["bench-loss", "--suite", str(path), "--no-memory", "--out", str(tmp_path / "s.md")]) == 0
    df = pd.read_csv(tmp_path / "s.csv")
    row = df[(df.loss == "lapsum")].set_index("classes")["status"]
    assert row[40] == "ok" and row[10].startswith("n/a: m=16")
    path.write_text(path.read_text().replace("[10, 40]", "[10, 12]"))
    assert main(["bench-loss", "--suite", str(path), "--no-memory"]) == 2
    assert "fits none of the class counts" in capsys.readouterr().err
    path.write_text(path.read_text().replace("skip_unfit: true", "skip_unfit: false").replace("[10, 12]", "[10, 40]"))
    assert main(["bench-loss", "--suite", str(path), "--no-memory"]) == 2  # the default stays strict
