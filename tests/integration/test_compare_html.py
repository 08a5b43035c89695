"""compare.html in a real headless browser (Debian's `chromium`): it renders from disk, sorting works,
no console errors, and a screenshot is a real image. Skipped when chromium is not installed."""
from __future__ import annotations

import re
import shutil
import struct
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from harness.cli import main

GRID = Path(__file__).parents[2] / "tests" / "fixtures" / "compare" / "grid"
BROWSER = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
pytestmark = pytest.mark.skipif(BROWSER is None, reason="needs a headless chromium (Debian: apt-get install chromium)")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
         "--enable-logging=stderr", "--v=0"]


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cmp")
    assert main(["compare", str(GRID), "--out", str(out)]) == 0
    return out / "compare.html"


def browse(url: str, *extra: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([BROWSER, *FLAGS, f"--user-data-dir={cwd / 'profile'}", *extra, url], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


class _Rows(HTMLParser):
    """Cells (text, data-v) of one table's body rows, plus the attributes of <body> and of the table."""

    def __init__(self, table_id: str) -> None:
        super().__init__()
        self.table_id, self.inside, self.rows, self.cell, self.attrs, self.body = table_id, False, [], None, {}, {}
        self.in_body = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "body":
            self.body = a
        if tag == "table" and a.get("id") == self.table_id:
            self.inside, self.attrs = True, a
        if self.inside and tag == "tbody":
            self.in_body = True
        if self.in_body and tag == "tr":
            self.rows.append([])
        if self.in_body and tag in ("td", "th"):
            self.cell = [a.get("data-v"), ""]

    def handle_data(self, data):
        if self.cell is not None:
            self.cell[1] += data

    def handle_endtag(self, tag):
        if self.in_body and tag in ("td", "th") and self.cell is not None:
            self.rows[-1].append(tuple(self.cell))
            self.cell = None
        if tag == "table" and self.inside:
            self.inside = self.in_body = False


def dom(page: Path, fragment: str, table: str) -> tuple[_Rows, str]:
    done = browse(f"{page.as_uri()}#{fragment}", "--dump-dom", cwd=page.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    parsed = _Rows(table)
    parsed.feed(done.stdout)
    return parsed, done.stderr


def console_messages(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


@pytest.mark.parametrize("column,desc", [(1, False), (1, True), (8, True)])
def test_sorting_a_numeric_column_orders_the_rows(page, column, desc):
    parsed, stderr = dom(page, f"sort=summary:{column}" + (":desc" if desc else ""), "summary")
    assert parsed.body.get("data-ready") == "1" and "data-js-errors" not in parsed.body
    assert console_messages(stderr) == []
    assert parsed.attrs.get("data-sorted") == f"{column}:{'desc' if desc else 'asc'}"
    values = [row[column][0] for row in parsed.rows]
    numbers = [float(v) for v in values if v is not None]
    assert len(numbers) >= 4 and numbers == sorted(numbers, reverse=desc)
    assert values[len(numbers):] == [None] * (len(values) - len(numbers))  # missing cells last, either way


def test_sorting_the_loss_column_orders_by_name(page):
    parsed, _ = dom(page, "sort=summary:0", "summary")
    names = [row[0][1] for row in parsed.rows]
    assert names == sorted(names) and len(names) == 7


def test_without_a_fragment_the_page_keeps_its_order_and_logs_nothing(page):
    parsed, stderr = dom(page, "", "ranks")
    assert "data-sorted" not in parsed.attrs and parsed.body.get("data-ready") == "1"
    assert [row[0][1] for row in parsed.rows][:2] == ["lapin_svm_beta", "berrada_smooth"]
    assert console_messages(stderr) == []


def test_screenshot_is_a_real_image(page):
    shot = page.parent / "shot.png"
    done = browse(page.as_uri(), f"--screenshot={shot}", "--window-size=1280,2400", "--hide-scrollbars",
                  cwd=page.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (1280, 2400)
    assert len(data) > 50_000  # tables and figures, not a blank page
    assert not re.search(r"<img[^>]+src=\"(?!data:)", page.read_text())
