"""Tables as markdown and as sortable HTML; the self-contained compare.html page.

The page has no external resources: CSS and a small sorting script are inline and figures are
embedded as base64 PNG, so it opens from disk with no server and no network. Click a header to sort
by that column (again to reverse); `compare.html#sort=TABLE:COLUMN[:desc]` sorts on load.
"""
from __future__ import annotations

import base64
import hashlib
import html
import math
from dataclasses import dataclass, field
from pathlib import Path

from harness.compare.goals import ALL_ROWS, Finding

MISSING = "—"


@dataclass
class Table:
    """A table whose cells are {text, value (number or None), best (bold)}; the first column names the row."""

    id: str
    title: str
    header: list[str]
    rows: list[list[dict]]
    note: str = ""
    notes: list[str] = field(default_factory=list)


def cell(text: str, value: float | None = None, best: bool = False) -> dict:
    ok = value is not None and isinstance(value, (int, float)) and math.isfinite(value)
    return {"text": text, "value": float(value) if ok else None, "best": best}


def cell_id(table: str, row: str, column: str) -> str:
    digest = hashlib.sha1("\x00".join((row, column)).encode()).hexdigest()[:10]
    return f"c-{table}-{digest}"


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def to_markdown(t: Table) -> list[str]:
    out = [f"| {' | '.join(_md_escape(h) for h in t.header)} |", "|" + "---|" * len(t.header)]
    for row in t.rows:
        texts = [f"**{_md_escape(c['text'])}**" if c["best"] else _md_escape(c["text"]) for c in row]
        out.append(f"| {' | '.join(texts)} |")
    return out


def cite_md(f: Finding, titles: dict[str, str]) -> str:
    refs = "; ".join(f"{titles[c.table]}, row `{c.row}`, column “{c.column}”: {c.value}" for c in f.cites)
    return f"- {f.text}" + (f" [{refs}]" if refs else "")


def _td(t: Table, row_key: str, col: str, c: dict, first: bool) -> str:
    tag = "th" if first else "td"
    attrs = f' id="{cell_id(t.id, row_key, col)}"'
    if c["value"] is not None:
        attrs += f' data-v="{c["value"]!r}"'
    if c["best"]:
        attrs += ' class="best"'
    return f"<{tag}{attrs}>{html.escape(c['text'])}</{tag}>"


def to_html(t: Table) -> str:
    head = "".join(f'<th scope="col" id="{cell_id(t.id, ALL_ROWS, h)}" title="sort by {html.escape(h)}">'
                   f"{html.escape(h)}</th>" for h in t.header)
    body = []
    for row in t.rows:
        key = row[0]["text"]
        body.append("<tr>" + "".join(_td(t, key, h, c, i == 0) for i, (h, c) in enumerate(zip(t.header, row)))
                    + "</tr>")
    note = f"<p class=note>{html.escape(t.note)}</p>" if t.note else ""
    return (f'<h3 id="t-{t.id}">{html.escape(t.title)}</h3>{note}<div class=scroll><table class=sortable '
            f'id="{t.id}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>')


def inline(text: str) -> str:
    """Escaped HTML of a markdown line whose only markup is `code`."""
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def finding_html(f: Finding, titles: dict[str, str]) -> str:
    refs = "; ".join(f'<a href="#{cell_id(c.table, c.row, c.column)}">{html.escape(titles[c.table])}, '
                     f"{html.escape(c.row)}, {html.escape(c.column)}: {html.escape(c.value)}</a>" for c in f.cites)
    return f"<li>{inline(f.text)}" + (f" <span class=cite>[{refs}]</span>" if refs else "") + "</li>"


def image_html(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"></figure>'


CSS = """body{font:14px/1.45 system-ui,sans-serif;margin:1.5em auto;max-width:1400px;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:12px}th,td{border:1px solid #ccc;padding:2px 6px;text-align:right;
white-space:nowrap}tbody th{text-align:left;font-weight:normal}thead th{cursor:pointer;background:#f3f3f3;
position:sticky;top:0}thead th[aria-sort=ascending]::after{content:" ▲"}thead th[aria-sort=descending]::after
{content:" ▼"}td.best,th.best{font-weight:bold}.scroll{overflow:auto;max-height:80vh}img{max-width:100%}
.note{color:#555;font-size:12px}.cite{color:#555;font-size:12px}:target{background:#ffe98a}code{font-size:12px}"""

JS = """(function(){
var errs=[];window.addEventListener('error',function(e){errs.push(String(e.message));
document.body.setAttribute('data-js-errors',errs.join(' | '));});
function num(c){var v=c&&c.getAttribute('data-v');return v===null||v===undefined?null:parseFloat(v);}
function sortTable(t,col,desc){var tb=t.tBodies[0],rows=Array.prototype.slice.call(tb.rows);
var numeric=rows.some(function(r){return num(r.cells[col])!==null;});
rows.sort(function(a,b){var x=a.cells[col],y=b.cells[col];if(numeric){var p=num(x),q=num(y);
if(p===null&&q===null)return 0;if(p===null)return 1;if(q===null)return -1;return desc?q-p:p-q;}
var s=x.textContent,u=y.textContent;return desc?u.localeCompare(s):s.localeCompare(u);});
rows.forEach(function(r){tb.appendChild(r);});var hs=t.tHead.rows[0].cells;
for(var i=0;i<hs.length;i++)hs[i].removeAttribute('aria-sort');
hs[col].setAttribute('aria-sort',desc?'descending':'ascending');t.setAttribute('data-sorted',col+(desc?':desc':':asc'));}
var tables=document.querySelectorAll('table.sortable');
Array.prototype.forEach.call(tables,function(t){var hs=t.tHead.rows[0].cells;
Array.prototype.forEach.call(hs,function(h,i){h.addEventListener('click',function(){
sortTable(t,i,h.getAttribute('aria-sort')==='ascending');});});});
var m=/sort=([A-Za-z0-9_-]+):(\\d+)(:desc)?/.exec(decodeURIComponent(location.hash));
if(m){var t=document.getElementById(m[1]);if(t&&+m[2]<t.tHead.rows[0].cells.length)sortTable(t,+m[2],!!m[3]);}
document.body.setAttribute('data-ready','1');})();"""


def page(title: str, sections: list[str]) -> str:
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f'<meta name="viewport" content="width=device-width,initial-scale=1"><style>{CSS}</style></head>'
            f"<body>{''.join(sections)}<script>{JS}</script></body></html>")
