"""`report.html`: one self-contained page per evaluation (tables and figures embedded as base64 PNG),
so it can be mailed, archived or attached to a submission without the run folder."""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from medens.utils.atomic import atomic_write_text

STYLE = (
    "body{font-family:sans-serif;max-width:72em;margin:1em auto;color:#222}"
    "table{border-collapse:collapse;margin:.6em 0}td,th{padding:3px 9px;border-bottom:1px solid #ccc;"
    "text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}"
    "img{max-width:100%;border:1px solid #ddd;margin:.4em 0}.small{color:#666;font-size:90%}"
)


def embed_png(path: str | Path, alt: str = "", width: str = "") -> str:
    """An <img> whose data is the PNG itself (no link to the run folder)."""
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    w = f" width='{width}'" if width else ""
    return f"<img alt='{html.escape(alt)}'{w} src='data:image/png;base64,{data}'>"


def fmt_num(v: Any, digits: int = 4) -> str:
    """A number with `digits` decimals; "n/a" for None, NaN, infinities and anything not a number."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return "n/a"
    return f"{f:.{digits}f}" if math.isfinite(f) else "n/a"


def fmt_ci(r: Mapping[str, Any] | None, digits: int = 3) -> str:
    """'0.812 [0.751, 0.866]' (n/a where undefined)."""
    if not r or r.get("value") is None:
        return "n/a"
    v = f"{r['value']:.{digits}f}"
    if r.get("ci_low") is None or r.get("ci_high") is None:
        return v
    return f"{v} [{r['ci_low']:.{digits}f}, {r['ci_high']:.{digits}f}]"


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def page(title: str, sections: Sequence[tuple[str, str]], intro: str = "") -> str:
    """The whole document: title, an intro paragraph, then (heading, html) sections."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"]  # fmt: skip
    if intro:
        parts.append(f"<p>{intro}</p>")
    for heading, body in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>{body}")
    parts.append("</body></html>")
    return "".join(parts)


def write_page(path: str | Path, title: str, sections: Sequence[tuple[str, str]], intro: str = "") -> Path:
    return atomic_write_text(path, page(title, sections, intro))
