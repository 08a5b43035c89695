"""homoglyphs: look-alike groups from real outlines, determinism and cache, oracle bound, errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from harness.data import glyph_stats, glyphs, homoglyphs
from harness.errors import DataError
from harness.registry import DATASETS

SMALL = {"charset": "AΑАBΒВ0OΟО", "size": 12, "samples_per_glyph": 3, "augment": 1.0}


def params(tmp_path, **kw) -> dict:
    return DATASETS.get("homoglyphs").validate_params({"cache_dir": str(tmp_path / "cache"), **SMALL, **kw})


def tiny_font(path, alpha_like_a: bool = True):
    """A TrueType font with glyphs for A, B and Greek Alpha; Alpha shares A's glyph when asked."""
    from fontTools.fontBuilder import FontBuilder
    from fontTools.pens.ttGlyphPen import TTGlyphPen

    def box(x0, y0, x1, y1):
        pen = TTGlyphPen(None)
        pen.moveTo((x0, y0)), pen.lineTo((x0, y1)), pen.lineTo((x1, y1)), pen.lineTo((x1, y0)), pen.closePath()
        return pen.glyph()

    def empty():
        return TTGlyphPen(None).glyph()

    fb = FontBuilder(1000, isTTF=True)
    order = [".notdef", "A", "B", "Alpha"]
    fb.setupGlyphOrder(order)
    fb.setupCharacterMap({0x41: "A", 0x42: "B", 0x391: "A" if alpha_like_a else "Alpha"})
    fb.setupGlyf({".notdef": empty(), "A": box(100, 0, 500, 700), "B": box(100, 0, 600, 400),
                  "Alpha": box(150, 0, 550, 650)})
    fb.setupHorizontalMetrics({g: (700, 100) for g in order})
    fb.setupHorizontalHeader(ascent=800, descent=-200)
    fb.setupNameTable({"familyName": "Tiny Test", "styleName": "Regular"})
    fb.setupOS2(sTypoAscender=800, sTypoDescender=-200, usWinAscent=800, usWinDescent=200)
    fb.setupPost()
    fb.save(str(path))
    return path


def test_dejavu_draws_latin_greek_cyrillic_a_with_one_outline():
    font = next(f for f in glyphs.load_fonts([]) if f.name == "DejaVuSans")
    a, alpha, cyr_a, b = (glyphs.render(font, ch, 48) for ch in "AΑАB")
    assert a.max() == 255 and a.sum() > 0  # something was drawn
    assert np.array_equal(a, alpha) and np.array_equal(a, cyr_a)
    assert not np.array_equal(a, b)
    ids = glyphs.identical_groups(np.stack([a, alpha, cyr_a, b]))
    assert ids[0] == ids[1] == ids[2] != ids[3]


@pytest.mark.parametrize("shared", [True, False])
def test_a_font_mapping_a_and_alpha_to_one_glyph_yields_a_group(tmp_path, shared):
    (font,) = [f for f in glyphs.load_fonts([str(tiny_font(tmp_path / "tiny.ttf", shared))]) if f.family == "Tiny Test"]
    chars = "AΑB"
    hi = np.stack([glyphs.render(font, c, 24) for c in chars])
    clean = hi.reshape(3, 12, 2, 12, 2).mean((2, 4)).round().astype(np.uint8)
    gfont, gclass = np.zeros(3, dtype=int), np.arange(3)
    info = glyph_stats.ambiguity(chars, [font], gfont, gclass, hi, clean, np.arange(3), tol=0.0)
    groups = [g["chars"] for g in info["ambiguity"]["identical_groups"]]
    assert groups == (["AΑ"] if shared else [])
    # one test sample per glyph: A and Α are a coin flip at top-1 when they share the outline
    assert info["oracle_topk"]["1"] == pytest.approx((0.5 + 0.5 + 1) / 3 if shared else 1.0)
    assert info["reference"]["curve"][1] == 1.0


def test_oracle_bound_is_min_k_g_over_g_and_matches_a_simulation():
    sizes = np.array([1, 2, 2, 3, 3, 3])  # a singleton, a pair, a triple (one sample per glyph)
    bound = glyph_stats._bound(sizes, np.arange(6), 6)["micro"]
    assert bound == {"1": pytest.approx(0.5), "2": pytest.approx((1 + 1 + 1 + 3 * 2 / 3) / 6), "3": 1.0}
    # the oracle ranks the members of the sample's group in a random order: simulate it
    rng = np.random.default_rng(0)
    trials = 20000
    pos = np.concatenate([rng.integers(0, g, trials) for g in sizes])  # rank of the true class in its group
    for k in (1, 2):
        assert (pos < k).mean() == pytest.approx(bound[str(k)], abs=4 * 0.5 / np.sqrt(len(pos)))


def test_rendering_is_deterministic_and_the_cache_returns_the_same_arrays(tmp_path):
    p = params(tmp_path)
    first = homoglyphs.arrays(p)
    files = list((tmp_path / "cache").glob("*.npz"))
    assert len(files) == 1
    again = homoglyphs.arrays(p)  # cache hit
    fresh = homoglyphs.arrays({**p, "cache_dir": str(tmp_path / "other")})  # rendered again
    for key in first:
        assert np.array_equal(first[key], again[key]) and np.array_equal(first[key], fresh[key]), key
    other_seed = homoglyphs.arrays({**p, "data_seed": 1})
    assert not np.array_equal(first["x_train"], other_seed["x_train"])
    bundle = DATASETS.get("homoglyphs").obj(seed=0, **p)
    assert bundle.input_shape == (1, 12, 12) and bundle.num_classes == 10
    assert sum(bundle.class_counts) == len(bundle.train)


def test_held_out_font_families_are_disjoint_and_every_class_trains(tmp_path):
    p = params(tmp_path)
    spec = homoglyphs.plan(p)
    test_fams = set(spec["test_families"])
    assert test_fams and test_fams < {f.family for f in spec["fonts"]}
    assert min(spec["train_counts"]) > 0
    info = DATASETS.get("homoglyphs").obj(seed=0, **p).info
    assert info["test_families"] == sorted(test_fams)
    assert 0 < info["oracle_topk"]["1"] < 1  # A/Α/А and O/Ο/О coincide in the bundled fonts


def test_long_tail_profile_on_homoglyphs(tmp_path):
    p = params(tmp_path, samples_per_glyph=8, long_tail=4.0, charset="ABCDEFGH")
    bundle = DATASETS.get("homoglyphs").obj(seed=0, **p)
    counts = np.bincount(bundle.train.y.numpy(), minlength=8)
    full = homoglyphs.plan({**p, "long_tail": 1.0})["train_counts"]
    assert counts[0] == full[0] and counts[0] / counts[-1] == pytest.approx(4.0, rel=0.15)
    assert list(counts) == sorted(counts, reverse=True)


@pytest.mark.parametrize("kw, words", [
    ({"charset": "latin_greek"}, ["unknown preset", "latin_greek_cyrillic"]),
    ({"charset": "A\ue000"}, ["no font has", "U+E000"]),
    ({"samples_per_glyph": 2, "hold_out_fonts": False}, ["no training sample", "samples_per_glyph"]),
    ({"long_tail": 1000.0}, ["long_tail", "empty"]),
    ({"fonts": ["/nonexistent/fonts"]}, ["no such file"]),
])
def test_bad_parameters_give_one_line_data_errors(tmp_path, kw, words):
    with pytest.raises(DataError) as err:
        homoglyphs.validate(params(tmp_path, **kw))
    message = str(err.value)
    assert "\n" not in message and all(w in message for w in words), message


def test_augmentation_is_seeded_and_zero_strength_is_clean():
    from harness.data.augment import augment_glyphs

    hi = torch.zeros(2, 16, 16, dtype=torch.uint8)
    hi[0, 4:12, 6:10] = 255
    hi[1, 2:6, 2:14] = 255
    a, clean = augment_glyphs(hi, 3, 1.0, torch.Generator().manual_seed(0))
    b, _ = augment_glyphs(hi, 3, 1.0, torch.Generator().manual_seed(0))
    assert a.shape == (6, 8, 8) and torch.equal(a, b)
    assert not torch.equal(a[0], a[1])  # samples of one glyph differ
    z, clean0 = augment_glyphs(hi, 3, 0.0, torch.Generator().manual_seed(0))
    assert torch.equal(z, clean0.repeat_interleave(3, 0))
    assert torch.equal(clean0[0], (hi[0].float().view(8, 2, 8, 2).mean((1, 3))).round().to(torch.uint8))
