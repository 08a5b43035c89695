"""Fonts and glyph rendering for the `homoglyphs` dataset: discovery, coverage, rasterising, ambiguity.

Coverage comes from each font's Unicode character map (fontTools, a matplotlib dependency); a
character is rendered only with fonts whose cmap has it, so no fallback glyph or "tofu" box ever
enters the data. Outlines come from `matplotlib.textpath.TextPath` (unhinted, in font units) and
are filled by matplotlib's Agg rasteriser with anti-aliasing: the same outline always gives the
same pixels, so two code points that a font maps to one outline render identically.

Placement (the same for every font, so sizes and baselines stay comparable, as in a line of text):
the em square spans 75 % of the image height, the baseline sits 22 % above the bottom edge, and
the glyph's outline box is centred horizontally.
"""
from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
from fontTools.ttLib import TTFont, TTLibError

from harness.errors import DataError

log = logging.getLogger(__name__)

FONT_SUFFIXES = (".ttf", ".otf")
EM_FRACTION, BASELINE_FRACTION = 0.75, 0.22
# matplotlib fonts that are no alphabet: a last-resort placeholder font, TeX math symbol and
# extension fonts (their cmaps put symbols at letters' code points), sized variants, private use.
BUNDLED_EXCLUDED = re.compile(r"^(LastResort.*|cmex10|cmsy10|STIXSiz.*|STIXNonUni.*|DejaVu(Sans|Serif)Display)\.ttf$")
_STYLE_WORDS = re.compile(r"\s+(Condensed|SemiCondensed|ExtraCondensed|Narrow|Light|ExtraLight|Thin|Medium|"
                          r"SemiBold|DemiBold|ExtraBold|Black|Heavy|Book)$", re.IGNORECASE)


@dataclass(frozen=True)
class Font:
    """A font file, its family (the hold-out unit) and the code points its Unicode cmap covers."""

    path: Path
    name: str  # file stem, unique within a font set (see load_fonts)
    family: str
    codepoints: frozenset[int]
    sha256: str

    def has(self, char: str) -> bool:
        return ord(char) in self.codepoints


def bundled_font_files() -> list[Path]:
    """matplotlib's own fonts (always installed), minus those that are not an alphabet."""
    folder = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    return sorted(p for p in folder.glob("*.ttf") if not BUNDLED_EXCLUDED.match(p.name))


def _expand(paths: list[str]) -> list[Path]:
    """Font files named by `paths` (files, or folders searched recursively); one-line error if absent."""
    out: list[Path] = []
    for raw in paths:
        p = Path(raw).expanduser()
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.suffix.lower() in FONT_SUFFIXES and f.is_file())
        elif p.is_file():
            if p.suffix.lower() not in FONT_SUFFIXES:
                raise DataError(f"homoglyphs: fonts: {p}: not a .ttf or .otf font file")
            out.append(p)
        else:
            raise DataError(f"homoglyphs: fonts: {p}: no such file or directory")
    return out


def family_of(font: TTFont, stem: str) -> str:
    """The design a font belongs to: typographic family (name 16) or family (name 1), style words dropped.

    Computer Modern's TeX fonts (cmr10, cmb10, cmti10, …) carry one family name each; they count as
    one design, "Computer Modern".
    """
    if re.fullmatch(r"cm[a-z]+\d+", stem):
        return "Computer Modern"
    name = font["name"].getDebugName(16) or font["name"].getDebugName(1) or stem
    while True:
        shorter = _STYLE_WORDS.sub("", name)
        if shorter == name:
            return name
        name = shorter


def load_fonts(extra: list[str]) -> list[Font]:
    """matplotlib's fonts plus `extra` files/folders, in that order.

    A file whose bytes or whose name (e.g. a system copy of a bundled DejaVu font, of another
    version) was already seen is skipped, so one font never appears twice.
    """
    fonts: list[Font] = []
    seen_hash: set[str] = set()
    seen_name: set[str] = set()
    for path in bundled_font_files() + _expand(extra):
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if digest in seen_hash or path.stem in seen_name:
            continue
        try:
            tt = TTFont(path, lazy=True, fontNumber=0)
            cmap = tt.getBestCmap() or {}
            family = family_of(tt, path.stem)
        except (TTLibError, KeyError, AssertionError, ValueError, OSError) as exc:
            log.warning("homoglyphs: skipping %s (not a readable font: %s)", path, exc)
            continue
        seen_hash.add(digest)
        seen_name.add(path.stem)
        fonts.append(Font(path, path.stem, family, frozenset(cmap), digest))
    return fonts


def render(font: Font, char: str, size: int) -> np.ndarray:
    """Anti-aliased coverage [size, size] uint8 (0 = background, 255 = ink) of `char` in `font`."""
    from matplotlib.backends.backend_agg import RendererAgg
    from matplotlib.font_manager import FontProperties
    from matplotlib.textpath import TextPath
    from matplotlib.transforms import Affine2D

    path = TextPath((0, 0), char, size=1.0, prop=FontProperties(fname=str(font.path)))
    ext = path.get_extents()
    centre = (ext.x0 + ext.x1) / 2 if len(path.vertices) else 0.0
    transform = Affine2D().translate(-centre, 0).scale(EM_FRACTION * size).translate(size / 2, BASELINE_FRACTION * size)
    renderer = RendererAgg(size, size, 72)
    gc = renderer.new_gc()
    gc.set_linewidth(0)
    gc.set_antialiased(True)
    renderer.draw_path(gc, path, transform, rgbFace=(0, 0, 0))
    gc.restore()
    return np.asarray(renderer.buffer_rgba())[..., 3].copy()


def identical_groups(images: np.ndarray) -> np.ndarray:
    """Group id of each image [G, ...]: images with the same pixels share an id (ids 0..)."""
    flat = images.reshape(len(images), -1)
    _, inverse = np.unique(flat, axis=0, return_inverse=True)
    return inverse.reshape(-1)


def near_groups(images: np.ndarray, tol: float) -> np.ndarray:
    """Group id of each image: connected components of "mean |difference| ≤ tol" (pixels in [0, 1])."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import connected_components
    from scipy.spatial.distance import cdist

    flat = images.reshape(len(images), -1).astype(np.float64) / 255.0
    dist = cdist(flat, flat, "cityblock") / flat.shape[1]
    _, labels = connected_components(csr_matrix(dist <= tol), directed=False)
    return labels
