"""Malformed suites: each gives one line naming file and key, exit 2, no traceback."""
import pytest

from harness.cli import main
from harness.suite import load_suite

GOOD = """
suite: s
seeds: [0]
dataset: {name: synthetic, params: {classes: 8, superclasses: 2, train_size: 64, val_size: 32, test_size: 32}}
model: {name: mlp, params: {hidden: 8}}
train: {epochs: 1, batch_size: 32}
eval: {k: [1, 2]}
losses: [softmax]
"""

CASES = {
    "unknown top-level key": (GOOD + "epochz: 3\n", ["epochz", "unknown key"]),
    "unknown nested key (did you mean)": (
        GOOD.replace("batch_size: 32", "batch_sise: 32"), ["train.batch_sise", "did you mean 'batch_size'"]),
    "unknown loss near miss": (GOOD.replace("losses: [softmax]", "losses: [softmx]"),
                               ["losses[0].name", "did you mean 'softmax'"]),
    "unknown dataset": (GOOD.replace("name: synthetic", "name: synthetc"), ["dataset.name", "'synthetic'"]),
    "unknown loss parameter": (GOOD.replace("losses: [softmax]", "losses: [{name: softmax, params: {label_smoting: 0.1}}]"),
                               ["losses[0].params.label_smoting", "did you mean 'label_smoothing'"]),
    "bad type": (GOOD.replace("epochs: 1", "epochs: three"), ["train.epochs"]),
    "value out of range": (GOOD.replace("losses: [softmax]", "losses: [{name: softmax, params: {label_smoothing: 1.5}}]"),
                           ["label_smoothing", "out of range"]),
    "negative lr": (GOOD.replace("batch_size: 32}", "batch_size: 32, optimizer: {lr: -1}}"), ["train.optimizer.lr"]),
    "empty grid axis": (GOOD.replace("hidden: 8", "hidden: []"), ["model.params.hidden", "empty grid"]),
    "empty seeds": (GOOD.replace("seeds: [0]", "seeds: []"), ["seeds"]),
    "empty losses": (GOOD.replace("losses: [softmax]", "losses: []"), ["losses"]),
    "bad YAML": (GOOD + "  - : [\n", ["invalid YAML"]),
    "not a mapping": ("- just\n- a list\n", ["expected a mapping"]),
    "missing required key": (GOOD.replace("train: {epochs: 1, batch_size: 32}\n", ""), ["train", "missing"]),
    "bad choice": (GOOD.replace("batch_size: 32}", "batch_size: 32, optimizer: {name: adamm}}"),
                   ["train.optimizer.name"]),
    "k larger than classes": (GOOD.replace("k: [1, 2]", "k: [1, 20]"), ["eval.k", "exceeds"]),
    "primary not evaluated": (GOOD.replace("k: [1, 2]}", "k: [1, 2], primary: top5}"), ["eval.primary"]),
    "duplicate runs": (GOOD.replace("losses: [softmax]", "losses: [softmax, softmax]"), ["twice"]),
    "bad suite name": (GOOD.replace("suite: s", "suite: 'a/b'"), ["suite"]),
    "long tail empties a class": (GOOD.replace("test_size: 32}", "test_size: 32, long_tail: 100}"),
                                  ["dataset.params", "long_tail=100", "4 of 8 classes empty"]),
    "superclass sizes do not add up": (GOOD.replace("superclasses: 2,", "superclass_sizes: [3, 3],"),
                                       ["dataset.params", "superclass_sizes", "classes=8"]),
    "homoglyphs: too few samples per glyph": (
        GOOD.replace("name: synthetic, params: {classes: 8, superclasses: 2, train_size: 64, val_size: 32, test_size: 32}",
                     "name: homoglyphs, params: {charset: AB, samples_per_glyph: 2, hold_out_fonts: false}"),
        ["dataset.params", "samples_per_glyph=2", "no training sample"]),
    "homoglyphs: unknown charset preset": (
        GOOD.replace("name: synthetic, params: {classes: 8, superclasses: 2, train_size: 64, val_size: 32, test_size: 32}",
                     "name: homoglyphs, params: {charset: digits_leters}"), ["did you mean 'digits_letters'"]),
    "unknown baseline": (GOOD.replace("k: [1, 2]}", "k: [1, 2], baseline: sofmax}"),
                         ["eval.baseline", "did you mean 'softmax'"]),
    "ambiguous baseline": (GOOD.replace("k: [1, 2]}", "k: [1, 2], baseline: softmax}").replace(
        "losses: [softmax]", "losses: [{name: softmax, params: {label_smoothing: [0.1, 0.2]}}]"),
        ["eval.baseline", "2 variants", "softmax[label_smoothing=0.1]"]),
    # tune blocks
    "tune budget 0": (GOOD + "tune: {budget: 0}\n", ["tune.budget", "greater than or equal to 1"]),
    "tune empty range": (GOOD + "tune: {budget: 2, space: {lr: {log: [0.01, 0.01]}}}\n", ["tune.space.lr", "empty range"]),
    "tune inverted range": (GOOD + "tune: {budget: 2, space: {lr: {linear: [0.1, 0.01]}}}\n",
                            ["tune.space.lr", "inverted range"]),
    "tune log range through 0": (GOOD + "tune: {budget: 2, space: {weight_decay: {log: [0, 0.1]}}}\n",
                                 ["tune.space.weight_decay", "must not reach 0"]),
    "tune empty choice": (GOOD + "tune: {budget: 2, space: {lr: {choice: []}}}\n", ["tune.space.lr", "empty choice"]),
    "tune unknown kind": (GOOD + "tune: {budget: 2, space: {lr: {logg: [0.1, 1]}}}\n", ["tune.space.lr", "logg"]),
    "tune unknown parameter": (GOOD + "tune: {budget: 2, space: {lrr: {log: [0.01, 0.1]}}}\n",
                               ["tune.space.lrr", "unknown parameter", "did you mean 'lr'"]),
    "tune unknown loss parameter": (
        GOOD.replace("losses: [softmax]", "losses: [{name: softmax, tune: {space: {smoothing: {linear: [0, 0.2]}}}}]")
        + "tune: {budget: 2}\n", ["losses[0].tune.space.smoothing", "unknown parameter of 'softmax'"]),
    "tune space for a loss not in the suite": (
        GOOD + "tune: {budget: 2, space: {berrada_smooth: {tau: {log: [0.01, 1]}}}}\n",
        ["tune.space.berrada_smooth", "not in this suite"]),
    "tune range outside the parameter": (
        GOOD + "tune: {budget: 2, space: {softmax: {label_smoothing: {linear: [0, 1]}}}}\n",
        ["tune.space.softmax.label_smoothing", "out of range"]),
    "tune space of a fixed parameter": (
        GOOD.replace("losses: [softmax]", "losses: [{name: softmax, params: {label_smoothing: 0.1}, "
                     "tune: {space: {label_smoothing: {linear: [0, 0.2]}}}}]") + "tune: {budget: 2}\n",
        ["losses[0].tune.space.label_smoothing", "also fixed"]),
    "tune metric": (GOOD + "tune: {budget: 2, metric: top5}\n", ["tune.metric", "top5"]),
    "tune grid too small": (GOOD + "tune: {budget: 4, sampler: grid, space: {lr: {choice: [0.1, 0.01]}, softmax: {label_smoothing: null}}}\n",
                            ["tune.budget", "only 2 points"]),
    "tune per loss without tune block": (
        GOOD.replace("losses: [softmax]", "losses: [{name: softmax, tune: {space: {lr: {log: [0.01, 0.1]}}}}]"),
        ["losses[0].tune", "top-level"]),
    "tune unknown key": (GOOD + "tune: {budgett: 2}\n", ["tune.budgett", "did you mean 'budget'"]),
    "min_seeds zero": (GOOD.replace("k: [1, 2]}", "k: [1, 2], min_seeds: 0}"), ["eval.min_seeds"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_suite_one_line_exit_2(case, write_suite, capsys):
    text, expected = CASES[case]
    path = write_suite(text)
    assert main(["run", str(path), "--results-dir", str(path.parent / "results")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err, err
    assert "Traceback" not in err
    assert err.startswith(f"topk-bench: error: {path}"), err
    for fragment in expected:
        assert fragment in err, (fragment, err)
    assert not (path.parent / "results").exists()  # nothing written for a rejected suite


def test_missing_file(tmp_path, capsys):
    assert main(["run", str(tmp_path / "nope.yaml")]) == 2
    assert "no such suite file" in capsys.readouterr().err


def test_toml_suite_equivalent(write_suite):
    yaml_suite = load_suite(write_suite(GOOD))
    toml = write_suite("""
suite = "s"
seeds = [0]
losses = ["softmax"]
[dataset]
name = "synthetic"
params = {classes = 8, superclasses = 2, train_size = 64, val_size = 32, test_size = 32}
[model]
name = "mlp"
params = {hidden = 8}
[train]
epochs = 1
batch_size = 32
[eval]
k = [1, 2]
""", name="suite.toml")
    assert [r.run_id for r in load_suite(toml).runs] == [r.run_id for r in yaml_suite.runs]


def test_grid_expansion_and_defaults(write_suite):
    suite = load_suite(write_suite(GOOD.replace("seeds: [0]", "seeds: [0, 1]").replace(
        "losses: [softmax]", "losses: [softmax, {name: softmax, params: {label_smoothing: [0.1, 0.2]}}]")))
    assert len(suite.runs) == 2 * 3
    # a loss given by name and with its default written out is the same run
    explicit = load_suite(write_suite(GOOD.replace(
        "losses: [softmax]", "losses: [{name: softmax, params: {label_smoothing: 0.0}}]"), name="b.yaml"))
    assert explicit.runs[0].run_id == load_suite(write_suite(GOOD, name="c.yaml")).runs[0].run_id


def test_comparison_settings_do_not_change_run_ids(write_suite):
    plain = load_suite(write_suite(GOOD.replace("losses: [softmax]", "losses: [softmax, lapin_entropy]")))
    other = load_suite(write_suite(GOOD.replace("losses: [softmax]", "losses: [softmax, lapin_entropy]").replace(
        "k: [1, 2]}", "k: [1, 2], baseline: lapin_entropy, min_seeds: 5}"), name="b.yaml"))
    assert [r.run_id for r in plain.runs] == [r.run_id for r in other.runs]
    assert other.model.eval.baseline == "lapin_entropy" and "baseline" not in other.runs[0].eval
    labelled = load_suite(write_suite(GOOD.replace(
        "losses: [softmax]", "losses: [{name: softmax, params: {label_smoothing: [0.0, 0.1]}}]").replace(
        "k: [1, 2]}", "k: [1, 2], baseline: 'softmax[label_smoothing=0.1]'}"), name="c.yaml"))
    assert labelled.model.eval.baseline == "softmax[label_smoothing=0.1]"
