"""Ambiguity structure of rendered glyphs and the oracle bound it implies on the test split.

Definitions (also in the README). In font f, two classes are *identical* when their clean
renderings at twice the image size (before augmentation, the images every sample is made from)
are pixel-identical, and *near-identical* when the clean renderings at the image size differ by at
most `tol` in mean absolute pixel value (connected components, so near groups are transitive).
Let g(f, c) be the size of c's identical group in f. A test sample of class c rendered in f is then
indistinguishable from the g(f, c) − 1 other classes of its group: they produce the very same
image distribution, and in the test split every (font, class) glyph has the same number of
samples, so given the image each group member is equally likely. No classifier can therefore
exceed, in expectation over the test labels, the top-k accuracy

    oracle_topk[k] = mean over test samples of min(k, g) / g,

which an oracle that knows each sample's clean rendering attains. `macro` averages the same
quantity per class first. The near-identical version (`oracle_topk_near`) is a guide, not a bound:
near-identical renderings can still be told apart.
"""
from __future__ import annotations

from collections import Counter
from typing import Sequence

import numpy as np

from harness.data.glyphs import Font, identical_groups, near_groups

MAX_LISTED = 40
MAX_K = 20


def _group_sizes(gfont: np.ndarray, images: np.ndarray, grouping) -> tuple[np.ndarray, list[np.ndarray]]:
    """Size of each glyph's group within its font, and the members (glyph indices) of each group ≥ 2."""
    sizes = np.ones(len(gfont), dtype=np.int64)
    groups: list[np.ndarray] = []
    for f in np.unique(gfont):
        idx = np.nonzero(gfont == f)[0]
        ids = grouping(images[idx])
        count = np.bincount(ids)
        sizes[idx] = count[ids]
        groups += [idx[ids == i] for i in np.nonzero(count > 1)[0]]
    return sizes, groups


def _bound(sizes: np.ndarray, classes: np.ndarray, num_classes: int) -> dict:
    """Micro and macro min(k, g)/g over the samples, k = 1..min(max g, MAX_K) (1.0 beyond)."""
    micro, macro = {}, {}
    for k in range(1, min(int(sizes.max(initial=1)), MAX_K) + 1):
        hit = np.minimum(k, sizes) / sizes
        micro[str(k)] = float(hit.mean()) if len(hit) else float("nan")
        per_class = np.bincount(classes, weights=hit, minlength=num_classes)
        seen = np.bincount(classes, minlength=num_classes)
        macro[str(k)] = float((per_class[seen > 0] / seen[seen > 0]).mean()) if seen.any() else float("nan")
    return {"micro": micro, "macro": macro}


def _curve(values: dict, num_classes: int) -> list[float]:
    """A k -> value dict (k = 1..K, 1.0 beyond K) as a list of length `num_classes`."""
    return [round(values.get(str(k), 1.0), 6) for k in range(1, num_classes + 1)]


def _listing(groups: list[np.ndarray], gclass: np.ndarray, chars: str) -> list[dict]:
    counts = Counter("".join(chars[c] for c in sorted(gclass[m])) for m in groups)
    return [{"chars": s, "fonts": n} for s, n in counts.most_common(MAX_LISTED)]


def ambiguity(chars: str, fonts: Sequence[Font], gfont: np.ndarray, gclass: np.ndarray, hi: np.ndarray,
              clean: np.ndarray, test_glyphs: np.ndarray, tol: float) -> dict:
    """The info entries: look-alike groups (exact and near) and the oracle bound on the test split."""
    exact, exact_groups = _group_sizes(gfont, hi, identical_groups)
    near, near_groups_ = _group_sizes(gfont, clean, lambda im: near_groups(im, tol))
    c = len(chars)
    bound = _bound(exact[test_glyphs], gclass[test_glyphs], c)
    near_bound = _bound(near[test_glyphs], gclass[test_glyphs], c)
    return {
        "classes_chars": chars,
        "ambiguity": {
            "identical_groups": _listing(exact_groups, gclass, chars),
            "near_groups": _listing(near_groups_, gclass, chars),
            "near_tol": tol,
            "glyphs_in_identical_group": float((exact > 1).mean()),
            "test_glyphs_in_identical_group": float((exact[test_glyphs] > 1).mean()) if len(test_glyphs) else 0.0,
        },
        "oracle_topk": bound["micro"],
        "oracle_macro_topk": bound["macro"],
        "oracle_topk_near": near_bound["micro"],
        "reference": {"label": "oracle bound (identical renderings)", "exact": False,
                      "curve": _curve(bound["micro"], c), "macro_curve": _curve(bound["macro"], c),
                      "note": "no classifier beats it in expectation; see harness/data/glyph_stats.py"},
    }
