"""Metric names a Grafana dashboard queries, and which of them a Prometheus exposition lacks.

``metric_names_in_dashboard(path)`` reads every PromQL ``expr`` of every panel (rows and nested
panels included) and returns the base metric names: functions, aggregation keywords, grouping
label lists, label matchers, range selectors, strings, numbers and Grafana variables are removed,
and histogram series suffixes (``_bucket``, ``_sum``, ``_count``) are stripped.

``missing_from_exposition(names, metrics_text)`` parses Prometheus text exposition (what
``GET /metrics`` returns) and returns the names it does not provide. A name is provided by a
sample of that name, by a ``# TYPE`` declaration (prometheus_client declares labelled metrics
before their first observation, with no samples), or through its ``_bucket``/``_sum``/``_count``
series (histograms and summaries). Counters are declared without ``_total`` but sampled with it;
both spellings count.

Standard library only, so the tests and CI can use it without the service installed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

__all__ = ["metric_names_in_dashboard", "metric_names_in_expr", "missing_from_exposition", "exposed_names"]

HISTOGRAM_SUFFIXES: tuple[str, ...] = ("_bucket", "_sum", "_count")

# PromQL words that look like identifiers but are not metric names.
_KEYWORDS = frozenset({
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
    "offset", "inf", "nan", "atan2",
})

_STRING_RE = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GRAFANA_VAR_RE = re.compile(r"\$\{[^}]*\}|\$\w+|\[\[[^\]]*\]\]")
_NAME_MATCHER_RE = re.compile(r'__name__\s*=\s*"([a-zA-Z_:][a-zA-Z0-9_:]*)"')
_GROUPING_RE = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT_RE = re.compile(r"(?<![\w.$:])([a-zA-Z_:][a-zA-Z0-9_:]*)(?![\w:])(\s*\()?")


def _strip_suffix(name: str) -> str:
    for suffix in HISTOGRAM_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def _remove_braces(expr: str, open_ch: str, close_ch: str) -> str:
    """Drop every (non-nested) ``{...}`` or ``[...]`` block."""
    out: list[str] = []
    depth = 0
    for ch in expr:
        if ch == open_ch:
            depth += 1
            out.append(" ")
        elif ch == close_ch and depth:
            depth -= 1
            out.append(" ")
        elif not depth:
            out.append(ch)
    return "".join(out)


def metric_names_in_expr(expr: str) -> set[str]:
    """Base metric names one PromQL expression selects (suffixes ``_bucket/_sum/_count`` stripped)."""
    names = set(_NAME_MATCHER_RE.findall(expr))
    text = _GRAFANA_VAR_RE.sub(" ", expr)
    text = _STRING_RE.sub('""', text)
    text = _remove_braces(text, "{", "}")
    text = _remove_braces(text, "[", "]")
    text = _GROUPING_RE.sub(" ", text)
    for match in _IDENT_RE.finditer(text):
        ident, call = match.group(1), match.group(2)
        if call or ident.lower() in _KEYWORDS:
            continue
        names.add(ident)
    return {_strip_suffix(name) for name in names}


def _exprs(node: Any) -> Iterator[str]:
    """Every string under an ``expr`` key, anywhere in the dashboard (rows, nested panels, targets)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "expr" and isinstance(value, str):
                yield value
            else:
                yield from _exprs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _exprs(item)


def metric_names_in_dashboard(path: str | Path) -> set[str]:
    """Base metric names queried by the panels of the Grafana dashboard JSON at ``path``."""
    dashboard = json.loads(Path(path).read_text(encoding="utf-8"))
    panels = {"panels": dashboard.get("panels", []), "rows": dashboard.get("rows", [])}
    names: set[str] = set()
    for expr in _exprs(panels):
        names |= metric_names_in_expr(expr)
    return names


_SAMPLE_RE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(?:\{|\s)")
_TYPE_RE = re.compile(r"^#\s*TYPE\s+([a-zA-Z_:][a-zA-Z0-9_:]*)\s+(\w+)")


def exposed_names(metrics_text: str) -> set[str]:
    """Every series name and declared family name in a Prometheus text exposition."""
    names: set[str] = set()
    for raw in metrics_text.splitlines():
        line = raw.strip()
        if not line:
            continue
        type_match = _TYPE_RE.match(line)
        if type_match:
            family, kind = type_match.groups()
            names.add(family)
            if kind == "counter":
                names.update({family + "_total", family + "_created"})
            elif kind in ("histogram", "summary", "gaugehistogram"):
                names.update(family + suffix for suffix in HISTOGRAM_SUFFIXES)
            elif kind == "info":
                names.add(family + "_info")
            continue
        if line.startswith("#"):
            continue
        sample_match = _SAMPLE_RE.match(line + " ")
        if sample_match:
            names.add(sample_match.group(1))
    return names


def missing_from_exposition(names: Iterable[str], metrics_text: str) -> set[str]:
    """The names (base names, as ``metric_names_in_dashboard`` returns) the exposition does not provide."""
    present = exposed_names(metrics_text)
    missing: set[str] = set()
    for name in names:
        if name in present:
            continue
        if any(name + suffix in present for suffix in HISTOGRAM_SUFFIXES):
            continue
        missing.add(name)
    return missing
