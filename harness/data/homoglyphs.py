"""`homoglyphs`: characters rendered from real fonts, where some classes are inherently ambiguous.

Latin, Greek and Cyrillic share letters that most fonts draw with one outline (A/Α/А, O/Ο/О, …),
so top-1 accuracy has an irreducible error while top-k (k ≥ the size of a look-alike group) does
not. Every class's character is rendered with every font whose Unicode cmap has it (matplotlib's
bundled fonts, plus the `fonts` files/folders), `samples_per_glyph` times with seeded augmentation
(affine jitter, blur, pixel noise; `augment` scales all three, 0 = clean renderings only).

Splits. With `hold_out_fonts` the font *families* (DejaVu Sans with its bold/oblique faces is one)
are split: a seeded `test_fraction` of them (at least one, and never one that would leave a class
without a training font) renders the test split only; validation holds `val_fraction` of each
training glyph's samples. Without it, every glyph's samples are split by those fractions. A
`long_tail` ratio > 1 then cuts the training split to CIFAR-100-LT's exponential profile (class 0 =
head; see `labels.long_tail_counts`); validation and test stay as they are.

Ambiguity (in `info`, see `ambiguity`): per font, classes whose clean renderings are
pixel-identical (at twice the image size, before augmentation) form an exact group; the oracle
bound is then the best top-k accuracy achievable in expectation on the test split.

Rendered once and cached as `<cache_dir>/<key>.npz` (uint8 images, written atomically, read without
pickle); the key hashes the parameters, the fonts' bytes and the matplotlib and torch versions.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from pathlib import Path

import matplotlib
import numpy as np
import torch

from harness.data import glyphs
from harness.data.augment import augment_glyphs
from harness.data.base import DataBundle, Split
from harness.data.glyph_stats import ambiguity
from harness.data.labels import long_tail_counts, long_tail_subset
from harness.errors import DataError
from harness.registry import Param, register_dataset

log = logging.getLogger(__name__)
FORMAT_VERSION = 2

_UPPER = ("ABCDEFGHIJKLMNOPQRSTUVWXYZ"
          + "".join(chr(c) for c in range(0x391, 0x3AA) if c != 0x3A2)  # Α..Ω
          + "".join(chr(c) for c in range(0x410, 0x430)))  # А..Я
_LOWER = ("abcdefghijklmnopqrstuvwxyz" + "".join(chr(c) for c in range(0x3B1, 0x3CA))
          + "".join(chr(c) for c in range(0x430, 0x450)))
DIGITS = "0123456789"
CHARSETS = {
    "latin_greek_cyrillic": _UPPER + DIGITS,  # capitals of the three scripts and the digits (92)
    "latin_greek_cyrillic_full": _UPPER + _LOWER + DIGITS,  # both cases (175)
    "digits_letters": DIGITS + "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz",  # EMNIST-like (62)
    # look-alike clusters only: A/Α/А, B/Β/В, … with lower-case and digit cousins (42)
    "confusables": "AΑАBΒВEΕЕHΗНIΙІl1KΚКMΜМOΟО0oοоPΡРTΤТXΧХCСcсeеpрxхyу",
}

PARAMS = {
    "charset": Param(str, "latin_greek_cyrillic",
                     doc=f"a preset ({', '.join(CHARSETS)}) or the characters themselves, e.g. 'AΑА0O'"),
    "fonts": Param((list, str), None, optional=True,
                   doc="font files or folders added to matplotlib's fonts (e.g. /usr/share/fonts/truetype)"),
    "size": Param(int, 24, ge=8, le=128, doc="image side in pixels"),
    "samples_per_glyph": Param(int, 8, ge=2, doc="augmented samples per (font, character)"),
    "augment": Param(float, 1.0, ge=0.0, le=4.0, doc="augmentation strength (0: clean renderings)"),
    "hold_out_fonts": Param(bool, True, doc="test fonts (families) disjoint from train/val fonts"),
    "test_fraction": Param(float, 0.25, gt=0.0, lt=1.0,
                           doc="share of font families held out for test (or of each glyph's samples)"),
    "val_fraction": Param(float, 0.25, gt=0.0, lt=1.0, doc="share of each training glyph's samples held out"),
    "long_tail": Param(float, 1.0, ge=1.0, doc="imbalance ratio of the training classes (1: no cut)"),
    "ambiguity_tol": Param(float, 0.01, ge=0.0, le=1.0,
                           doc="mean |pixel difference| under which renderings count as near-identical"),
    "data_seed": Param(int, 0, ge=0, doc="seed of the font split and the augmentation"),
    "cache_dir": Param(str, None, optional=True, identity="ignore",
                       doc="where renderings are cached (default $XDG_CACHE_HOME/topk-bench/homoglyphs)"),
}


def characters(charset: str) -> str:
    """The classes' characters: a preset's, or the string's own (duplicates and whitespace dropped)."""
    if charset in CHARSETS:
        return CHARSETS[charset]
    if re.fullmatch(r"[a-z0-9]+(_[a-z0-9]+)+", charset):  # looks like a preset name: a typo, not characters
        import difflib

        match = difflib.get_close_matches(charset, list(CHARSETS), n=1, cutoff=0.5)
        hint = f" (did you mean '{match[0]}'?)" if match else ""
        raise DataError(f"homoglyphs: charset: unknown preset '{charset}'{hint}; presets: {', '.join(CHARSETS)}")
    chars = "".join(dict.fromkeys(c for c in charset if not c.isspace()))
    if len(chars) < 2:
        raise DataError(f"homoglyphs: charset: need at least 2 distinct characters, got {charset!r}")
    return chars


def _font_list(fonts: list | str | None) -> list[str]:
    if fonts is None:
        return []
    items = [fonts] if isinstance(fonts, str) else fonts
    if not all(isinstance(f, str) for f in items):
        raise DataError(f"homoglyphs: fonts: expected paths (strings), got {items!r}")
    return items


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "topk-bench" / "homoglyphs"


def _sample_counts(p: dict) -> tuple[int, int, int]:
    """(train, val, test) samples of one training-font glyph (test is 0 when fonts are held out)."""
    n = p["samples_per_glyph"]
    test = 0 if p["hold_out_fonts"] else max(1, round(n * p["test_fraction"]))
    val = max(1, round(n * p["val_fraction"]))
    train = n - val - test
    if train < 1:
        raise DataError(f"homoglyphs: samples_per_glyph={n} leaves no training sample after val_fraction="
                        f"{p['val_fraction']:g}" + ("" if p["hold_out_fonts"] else f" and test_fraction="
                                                     f"{p['test_fraction']:g}") + "; raise samples_per_glyph")
    return train, val, test


def plan(p: dict) -> dict:
    """Fonts, classes and the font split, without rendering (cheap: reads the fonts' cmaps)."""
    chars = characters(p["charset"])
    fonts = sorted(glyphs.load_fonts(_font_list(p["fonts"])), key=lambda f: (f.family, f.name))
    uncovered = [c for c in chars if not any(f.has(c) for f in fonts)]
    if uncovered:
        raise DataError(f"homoglyphs: no font has {''.join(uncovered)!r} (U+{ord(uncovered[0]):04X}); "
                        "add fonts (param fonts) or drop these characters from charset")
    families = sorted({f.family for f in fonts})
    test_families: set[str] = set()
    if p["hold_out_fonts"]:
        if len(families) < 2:
            raise DataError(f"homoglyphs: hold_out_fonts needs ≥ 2 font families, have {families}")
        want = min(len(families) - 1, max(1, round(p["test_fraction"] * len(families))))
        order = torch.randperm(len(families), generator=torch.Generator().manual_seed(p["data_seed"])).tolist()
        for i in order:  # greedy: a family goes to test only if every class keeps a training font
            trial = test_families | {families[i]}
            if all(any(f.has(c) and f.family not in trial for f in fonts) for c in chars):
                test_families = trial
            if len(test_families) == want:
                break
        if not test_families:
            raise DataError("homoglyphs: hold_out_fonts: every font family is the only one for some character; "
                            "add fonts or set hold_out_fonts: false")
    train_per_glyph = _sample_counts(p)[0]
    train_counts = [train_per_glyph * sum(f.has(c) and f.family not in test_families for f in fonts) for c in chars]
    if p["long_tail"] > 1:
        long_tail_counts(max(train_counts), len(chars), p["long_tail"])  # DataError if a class would be empty
    return {"chars": chars, "fonts": fonts, "test_families": sorted(test_families), "train_counts": train_counts}


def validate(p: dict) -> None:
    """Suite-time check: raises DataError (one line) when the parameters cannot give a dataset."""
    plan(p)


def num_classes(p: dict) -> int:
    return len(characters(p["charset"]))


def cache_key(p: dict, fonts: list[glyphs.Font]) -> str:
    ident = {k: v for k, v in p.items() if k != "cache_dir"}
    ident.update(format=FORMAT_VERSION, fonts=[[f.name, f.sha256] for f in fonts],
                 matplotlib=matplotlib.__version__, torch=torch.__version__.split("+")[0])
    return hashlib.sha256(json.dumps(ident, sort_keys=True, ensure_ascii=True).encode()).hexdigest()[:20]


def build(p: dict, spec: dict) -> dict[str, np.ndarray]:
    """Render, augment and split; returns uint8 images, labels and a JSON info string."""
    chars, fonts, test_families = spec["chars"], spec["fonts"], set(spec["test_families"])
    size, n = p["size"], p["samples_per_glyph"]
    glyph_font, glyph_class, hi = [], [], []
    for fi, font in enumerate(fonts):
        for ci, ch in enumerate(chars):
            if font.has(ch):
                glyph_font.append(fi)
                glyph_class.append(ci)
                hi.append(glyphs.render(font, ch, 2 * size))
    hi_arr = np.stack(hi)
    gfont, gclass = np.array(glyph_font), np.array(glyph_class)
    gen = torch.Generator().manual_seed(p["data_seed"])
    samples, clean = augment_glyphs(torch.from_numpy(hi_arr), n, p["augment"], gen)  # [G*n, S, S], [G, S, S]
    test_font = np.array([f.family in test_families for f in fonts])[gfont]
    _, n_val, n_test = _sample_counts(p)
    j = np.tile(np.arange(n), len(gfont))  # sample index within its glyph
    g = np.repeat(np.arange(len(gfont)), n)
    role = np.where(test_font[g], 2, np.where(j < n_val, 1, np.where(j < n_val + n_test, 2, 0)))
    labels = torch.from_numpy(gclass[g])
    train_idx = np.nonzero(role == 0)[0]
    if p["long_tail"] > 1:
        keep = long_tail_subset(labels[train_idx], len(chars), p["long_tail"],
                                torch.Generator().manual_seed(p["data_seed"] + 1))
        train_idx = train_idx[keep.numpy()]
    test_idx = np.nonzero(role == 2)[0]
    info = ambiguity(chars, fonts, gfont, gclass, hi_arr, clean.numpy(), g[test_idx], p["ambiguity_tol"])
    info.update(
        classes=len(chars), fonts=len(fonts), font_families=sorted({f.family for f in fonts}),
        test_families=sorted(test_families), glyphs=len(gfont), size=size,
        train_size=len(train_idx), val_size=int((role == 1).sum()), test_size=len(test_idx),
        classes_in_test=int(len(np.unique(gclass[g[test_idx]]))),
        fonts_sha256=hashlib.sha256("".join(f.sha256 for f in fonts).encode()).hexdigest()[:16],
    )
    x = samples.numpy()
    out = {"info": np.array(json.dumps(info, ensure_ascii=False))}
    for name, idx in (("train", train_idx), ("val", np.nonzero(role == 1)[0]), ("test", test_idx)):
        out[f"x_{name}"], out[f"y_{name}"] = x[idx], labels.numpy()[idx]
    return out


def _save(path: Path, arrays: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp.npz")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load(path: Path) -> dict[str, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as exc:  # a truncated or foreign file: render again
        log.warning("homoglyphs: ignoring unreadable cache %s (%s)", path, exc)
        return None


def arrays(p: dict) -> dict[str, np.ndarray]:
    """The rendered dataset, from the cache when present (rendered and cached otherwise)."""
    spec = plan(p)
    folder = Path(p["cache_dir"]).expanduser() if p["cache_dir"] else default_cache_dir()
    path = folder / f"{cache_key(p, spec['fonts'])}.npz"
    cached = _load(path) if path.is_file() else None
    if cached is not None:
        return cached
    log.info("homoglyphs: rendering %d classes × %d fonts into %s", len(spec["chars"]), len(spec["fonts"]), path)
    out = build(p, spec)
    _save(path, out)
    return out


@register_dataset("homoglyphs", version=1, params=PARAMS, num_classes=num_classes, validate=validate)
def load(seed: int, **p) -> DataBundle:
    """Rendered characters (see the module docstring); deterministic in the parameters, `seed` unused."""
    data = arrays(p)
    info = json.loads(str(data["info"]))
    train_x = torch.from_numpy(data["x_train"]).float().div_(255.0)
    mean, std = float(train_x.mean()), float(train_x.std().clamp_min(1e-6))

    def split(name: str) -> Split:
        x = torch.from_numpy(data[f"x_{name}"]).float().div_(255.0).sub_(mean).div_(std).unsqueeze(1)
        return Split(x.contiguous(), torch.from_numpy(data[f"y_{name}"]).long())

    c = len(info["classes_chars"])
    counts = torch.bincount(torch.from_numpy(data["y_train"]).long(), minlength=c)
    if int(counts.min()) < 1:
        raise DataError(f"homoglyphs: class {info['classes_chars'][int(counts.argmin())]!r} has no training sample")
    size = int(info["size"])
    return DataBundle(split("train"), split("val"), split("test"), c, (1, size, size), info=info,
                      class_counts=counts.tolist())

