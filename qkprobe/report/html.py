"""The HTML of the report: one self-contained page (inline CSS, no scripts to run, no fonts or
files from the network), figures as PNG files beside it, figure data as JSON blocks."""

from __future__ import annotations

import html
import json
import math
from typing import Any, Iterable, Optional, Sequence

#: Marks a page qkprobe wrote (``qkprobe report`` replaces only pages that carry it).
GENERATOR = '<meta name="generator" content="qkprobe report">'

CSS = """
:root { --fg: #1d1f21; --muted: #5f6670; --line: #dde1e6; --warn-bg: #fff6e0; --warn: #8a5a00; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--fg); background: #fff;
       font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; }
header { padding: 18px 28px 10px; border-bottom: 1px solid var(--line); background: #f7f8fa; }
header h1 { margin: 0 0 4px; font-size: 22px; }
header p { margin: 2px 0; color: var(--muted); }
nav { padding: 6px 28px; border-bottom: 1px solid var(--line); font-size: 13px; }
nav a { margin-right: 14px; color: #1a5fb4; text-decoration: none; }
main { padding: 8px 28px 40px; max-width: 1500px; }
h2 { margin: 26px 0 6px; font-size: 19px; border-bottom: 1px solid var(--line); padding-bottom: 4px; }
h3 { margin: 20px 0 6px; font-size: 16px; }
h4 { margin: 14px 0 4px; font-size: 14px; }
p.note, .muted { color: var(--muted); }
figure { margin: 8px 0 14px; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); }
figcaption { color: var(--muted); font-size: 12.5px; max-width: 1100px; }
table { border-collapse: collapse; margin: 6px 0 12px; font-size: 13px; }
th, td { border: 1px solid var(--line); padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f3f4f6; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
code { font-size: 12.5px; background: #f3f4f6; padding: 0 3px; border-radius: 3px; }
.warn { background: var(--warn-bg); color: var(--warn); border: 1px solid #f0d9a8; border-radius: 4px;
        padding: 8px 12px; margin: 10px 0; }
.warn ul { margin: 4px 0 0 18px; padding: 0; }
details.section > summary { cursor: pointer; }
details.section > summary > h3 { display: inline-block; margin: 20px 0 6px; }
.grid { display: flex; flex-wrap: wrap; gap: 10px 18px; }
.grid figure { flex: 0 1 auto; }
"""


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _finite(obj: Any) -> Any:
    """JSON-safe copy: non-finite floats become null (JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if hasattr(obj, "tolist"):
        return _finite(obj.tolist())
    if hasattr(obj, "item"):
        return _finite(obj.item())
    return obj


def json_block(element_id: str, obj: Any) -> str:
    """``<script type="application/json" id=...>`` (data only: browsers do not run it)."""
    # No "<" at all inside the block: neither "</script" nor "<!--" can end or change it.
    text = (json.dumps(_finite(obj), sort_keys=True, allow_nan=False)
            .replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026"))
    return f'<script type="application/json" id="{esc(element_id)}">{text}</script>'


def figure(src: str, alt: str, caption: str = "", width: Optional[int] = None) -> str:
    style = f' style="width:{int(width)}px"' if width else ""
    cap = f"<figcaption>{caption}</figcaption>" if caption else ""
    return f'<figure><img src="{esc(src)}" alt="{esc(alt)}"{style}>{cap}</figure>'


def table(header: Sequence[str], rows: Iterable[Sequence[Any]], numeric: Sequence[int] = ()) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = []
    for row in rows:
        cells = []
        for i, v in enumerate(row):
            cls = ' class="num"' if i in numeric else ""
            cells.append(f"<td{cls}>{v}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def collapsible(section: str, open_: bool = True) -> str:
    """A section (HTML starting with its ``<h3>`` heading) as ``<details>``: the heading stays
    visible as the summary, a click folds the rest away; closed unless ``open_``."""
    if not section.strip():
        return section
    head, rest = "", section
    if section.startswith("<h3"):
        end = section.index("</h3>") + len("</h3>")
        head, rest = section[:end], section[end:]
    return (f'<details class="section"{" open" if open_ else ""}><summary>{head or "details"}</summary>'
            f"{rest}</details>")


def warning(title: str, items: Sequence[str] = ()) -> str:
    lis = "".join(f"<li>{esc(i)}</li>" for i in items)
    return f'<div class="warn"><strong>{esc(title)}</strong>{f"<ul>{lis}</ul>" if lis else ""}</div>'


def page(title: str, subtitle: Sequence[str], nav: Sequence[tuple], body: str) -> str:
    links = "".join(f'<a href="#{esc(anchor)}">{esc(text)}</a>' for anchor, text in nav)
    sub = "".join(f"<p>{s}</p>" for s in subtitle)
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            "<link rel=\"icon\" href=\"data:,\">\n" + GENERATOR + "\n"
            f"<title>{esc(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
            f"<header><h1>{esc(title)}</h1>{sub}</header>\n<nav>{links}</nav>\n<main>\n{body}\n</main>\n"
            "</body>\n</html>\n")
