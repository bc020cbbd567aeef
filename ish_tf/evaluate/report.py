"""`OUT/report.html`: one self-contained page with the tables and figures of an evaluation.

Everything is inline (CSS in a <style> block, figures as base64 data URIs), so the
file can be mailed or archived on its own and never fetches anything. All text is
HTML-escaped. The page ends with an "Inputs and settings" section listing the
inputs and every section's settings, plus the ish_tf version and the date.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import html
import json
import os
import re
from collections.abc import Mapping

import pandas as pd
from absl import logging

from ish_tf import __version__
from ish_tf.io_utils import atomic_write_text

REPORT_NAME = "report.html"

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 72em; padding: 0 1em; color: #222; line-height: 1.4; }
h1 { border-bottom: 2px solid #444; padding-bottom: .2em; }
h2 { border-bottom: 1px solid #bbb; margin-top: 2em; }
table.data, table.settings { border-collapse: collapse; margin: .5em 0 1.2em; font-size: .9em; }
table.data th, table.data td, table.settings th, table.settings td {
       border: 1px solid #ccc; padding: .25em .6em; text-align: right; }
table.data th, table.settings th { background: #f0f0f0; }
table.settings td, table.settings th { text-align: left; vertical-align: top; }
td.missing { color: #a00; }
figure { margin: 1em 0 2em; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: .9em; color: #444; max-width: 60em; }
p.meta, nav { color: #666; font-size: .9em; }
pre { white-space: pre-wrap; }
div.warning { border-left: 4px solid #c60; background: #fff4e5; padding: .3em .8em; margin: .8em 0; }
dl.columns { font-size: .85em; color: #333; }
dl.columns dt { font-weight: bold; float: left; clear: left; margin-right: .5em; }
dl.columns dd { margin-left: 0; }
"""


@dataclasses.dataclass
class Section:
    """One part of the report (typically one evaluation task).

    Attributes:
      title: section heading.
      text: free text; paragraphs separated by blank lines (escaped, not HTML).
      tables: (name, DataFrame) pairs, drawn in order.
      figures: (caption, path to a PNG) pairs, embedded inline in order.
      settings: the task's settings (shown under "Inputs and settings").
      warnings: degenerate set-ups and other cautions, drawn in a box above the tables.
      glossary: column -> definition, listed under the tables ("Columns").
    """

    title: str
    text: str = ""
    tables: list[tuple[str, pd.DataFrame]] = dataclasses.field(default_factory=list)
    figures: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    settings: dict = dataclasses.field(default_factory=dict)
    warnings: list[str] = dataclasses.field(default_factory=list)
    glossary: dict = dataclasses.field(default_factory=dict)


def _esc(value) -> str:
    return html.escape(str(value), quote=True)


def _format_float(x: float) -> str:
    """Up to 4 significant digits; integers stay integers."""
    if pd.isna(x):
        return "NaN"
    if float(x).is_integer() and abs(x) < 1e15:
        return str(int(x))
    return f"{x:.4g}"


def _paragraphs(text: str) -> str:
    parts = [p.strip() for p in re.split(r"\n\s*\n", text or "") if p.strip()]
    return "\n".join(f"<p>{_esc(p)}</p>" for p in parts)


def _table_html(name: str, df: pd.DataFrame) -> str:
    body = df.to_html(index=False, border=0, classes="data", escape=True, na_rep="NaN",
                      float_format=_format_float, justify="center")
    return f"<h3>{_esc(name)}</h3>\n{body}"


_MAGIC = {b"\x89PNG\r\n\x1a\n": "image/png", b"\xff\xd8\xff": "image/jpeg"}


def _figure_html(caption: str, path: str, section: str) -> str:
    """An inline <figure>, or a visible note when the file is missing or not an image."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        logging.warning("report: figure %s of section %r not readable: %s", path, section, e)
        return (f'<figure><p class="missing">Figure not available: {_esc(path)} '
                f"({_esc(e.strerror or e)})</p><figcaption>{_esc(caption)}</figcaption></figure>")
    mime = next((m for magic, m in _MAGIC.items() if data.startswith(magic)), None)
    if mime is None:
        logging.warning("report: %s of section %r is not a PNG or JPEG", path, section)
        return (f'<figure><p class="missing">Not a PNG/JPEG image: {_esc(path)}</p>'
                f"<figcaption>{_esc(caption)}</figcaption></figure>")
    b64 = base64.b64encode(data).decode("ascii")
    return (f'<figure><img alt="{_esc(caption)}" src="data:{mime};base64,{b64}">'
            f"<figcaption>{_esc(caption)}</figcaption></figure>")


def _value_text(value) -> str:
    if isinstance(value, (dict, list, tuple)):
        try:
            return json.dumps(value, default=str, sort_keys=isinstance(value, dict))
        except (TypeError, ValueError):
            return str(value)
    return str(value)


def _settings_html(settings: Mapping) -> str:
    if not settings:
        return "<p>(none)</p>"
    rows = "\n".join(f"<tr><th>{_esc(k)}</th><td>{_esc(_value_text(v))}</td></tr>"
                     for k, v in settings.items())
    return f'<table class="settings">\n{rows}\n</table>'


def render_report(sections: list[Section], title: str = "ish_tf report",
                  inputs: Mapping | None = None, now: datetime.datetime | None = None) -> str:
    """The report as an HTML string (see `write_report`).

    Args:
      sections: the sections, in order.
      title: page title.
      inputs: the inputs of the run (files, names), shown under "Inputs and settings".
      now: timestamp to print (default: current UTC time).

    Returns:
      A complete HTML document.
    """
    now = now or datetime.datetime.now(datetime.timezone.utc)
    stamp = now.isoformat(timespec="seconds")
    parts = [
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        f"<title>{_esc(title)}</title>", f"<style>{_CSS}</style>", "</head>", "<body>",
        f"<h1>{_esc(title)}</h1>",
        f'<p class="meta">ish_tf {_esc(__version__)} &middot; generated {_esc(stamp)}</p>',
    ]
    toc = [f'<a href="#s{i}">{_esc(s.title)}</a>' for i, s in enumerate(sections, 1)]
    toc.append('<a href="#inputs">Inputs and settings</a>')
    parts.append("<nav>" + " &middot; ".join(toc) + "</nav>")
    for i, s in enumerate(sections, 1):
        parts.append(f'<section id="s{i}"><h2>{_esc(s.title)}</h2>')
        parts.append(_paragraphs(s.text))
        if s.warnings:
            items = "".join(f"<li>{_esc(w)}</li>" for w in s.warnings)
            parts.append(f'<div class="warning"><strong>Degenerate or doubtful set-ups '
                         f"(marked in the flag column; do not read them as results):</strong>"
                         f"<ul>{items}</ul></div>")
        for name, df in s.tables:
            parts.append(_table_html(name, df))
        if s.glossary:
            rows = "".join(f"<dt>{_esc(k)}</dt><dd>{_esc(v)}</dd>" for k, v in s.glossary.items())
            parts.append(f'<h4>Columns</h4><dl class="columns">{rows}</dl>')
        for caption, path in s.figures:
            parts.append(_figure_html(caption, path, s.title))
        parts.append("</section>")
    parts.append('<section id="inputs"><h2>Inputs and settings</h2>')
    parts.append("<h3>Inputs</h3>")
    parts.append(_settings_html(inputs or {}))
    for s in sections:
        parts.append(f"<h3>{_esc(s.title)}</h3>")
        parts.append(_settings_html(s.settings))
    parts.append(f'<p class="meta">ish_tf version {_esc(__version__)}; report written '
                 f"{_esc(stamp)}.</p>")
    parts += ["</section>", "</body>", "</html>"]
    return "\n".join(p for p in parts if p) + "\n"


def write_report(out_dir: str, sections: list[Section], title: str = "ish_tf report",
                 inputs: Mapping | None = None) -> str:
    """Writes `out_dir/report.html`, one self-contained page, atomically.

    Tables are rendered with `DataFrame.to_html` (4 significant digits, escaped),
    figures inlined as base64 data URIs with their captions (a missing or
    unreadable figure becomes a visible note and a logged warning, so one bad
    figure never loses the report), then an "Inputs and settings" section with
    `inputs` and each section's settings, the ish_tf version and the date.

    Args:
      out_dir: output directory (created if missing).
      sections: the sections, in order.
      title: page title.
      inputs: inputs of the run, e.g. {"embeddings": [...], "annotations": path}.

    Returns:
      The path of the report.
    """
    path = os.path.join(out_dir, REPORT_NAME)
    atomic_write_text(path, render_report(list(sections), title, inputs))
    return path
