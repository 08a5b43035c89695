import math

from harness.lossbench import COLUMNS, bench_losses, parse_config


def test_parse_config():
    assert parse_config("softmax") == ("softmax", {})
    assert parse_config("difftopk:sorter=bitonic,m=16,p_k=[0.5,0,0,0,0.5]") == (
        "difftopk", {"sorter": "bitonic", "m": 16, "p_k": [0.5, 0, 0, 0, 0.5]})


def test_tiny_bench():
    df = bench_losses([("difftopk", {"sorter": "odd_even"}), ("softmax", {})], [20], 8, "cpu", 1,
                      repeats=2, warmup=1, reference=True, memory=True)
    assert list(df.columns) == COLUMNS
    assert df.loss.tolist()[0] == "cross_entropy"
    assert "softmax" in df.loss.tolist() and "difftopk" in df.loss.tolist()
    assert any(x.startswith("ref:") for x in df.loss)
    ok = df[df.status == "ok"]
    assert len(ok) >= 3
    assert (ok.median_ms > 0).all() and (ok.ratio_vs_ce > 0).all()
    assert all(not math.isnan(v) and v >= 0 for v in ok.peak_mem_mb)
    bad = bench_losses([("difftopk", {"m": 100})], [20], 4, "cpu", 1, repeats=1, warmup=0, memory=False)
    assert bad.status.iloc[1].startswith("error")
