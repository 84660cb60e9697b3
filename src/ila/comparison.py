"""The comparison folder behind ``ila compare``: ``compare.json`` (strict, versioned), ``compare.md`` and the
figures (a heat map per ranking, a Jaccard matrix per fraction, the overlap curve). The numbers come from
:func:`ila.overlap.compare_rankings`."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from . import plots as _plots  # cheap: matplotlib is imported only when a figure is drawn
from .artifacts import is_main_process, read_json, write_json_atomic, write_text_atomic
from .errors import IlaError, RankingError
from .overlap import (
    DEFAULT_FRACTIONS,
    KIND,
    Level,
    MappingMode,
    _labels,
    compare_rankings,
)
from .ranking import Ranking

log = logging.getLogger(__name__)


def _num(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _p(p: float) -> str:
    if p == 0.0:
        return "< 1e-300"
    return f"{p:.2g}" if p < 0.01 else f"{p:.2f}"


def render_markdown(result: Mapping[str, Any]) -> str:
    """The comparison as Markdown: the rankings, then one row per pair with, per fraction, the Jaccard of the
    top sets, (the random expectation) and the p-value, then Spearman and Kendall."""
    lines = [
        f"# Ranking comparison ({result['level']} level)",
        "",
        "| label | model | scorer | milestone | layers | blocks |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["rankings"]:
        lines.append(
            f"| {r['label']} | {r['base_model'].get('name')} | {r['scorer']} "
            f"| {r['milestone'] or '-'} "
            f"| {r['num_layers']} | {r['num_blocks']} |"
        )
    if not result["pairs"]:
        return "\n".join(lines) + "\n"
    fr = result["fractions"]
    head = (
        ["pair", "mapping", "n"] + [f"top {f * 100:g} %: J (random), p" for f in fr] + ["Spearman", "Kendall"]
    )
    lines += ["", "| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
    for p in result["pairs"]:
        by_f = {o["fraction"]: o for o in p["fractions"]}
        cells = [f"{p['a']} vs {p['b']}", p["mapping"], str(p["num_keys"])]
        for f in fr:
            o = by_f[f]
            cells.append(f"{o['jaccard']:.3f} ({o['expected_random']:.3f}), p {_p(o['p_value'])}")
        cells += [_num(p["spearman"]), _num(p["kendall_tau"])]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "J: Jaccard index of the two top-k sets (k = round(fraction x n), n compared "
        f"{'blocks' if result['level'] == 'block' else 'layers'} or depth keys); "
        "random: its expectation "
        "for random sets of the same size; p: chance of a random pair overlapping at least as much "
        "(hypergeometric tail). Spearman / Kendall tau-b: of the full scores.",
    ]
    depth_pairs = [p for p in result["pairs"] if p["mapping"] == "depth"]
    if depth_pairs:
        p = depth_pairs[0]
        lines.append(
            f"Depth mapping (pairs marked depth): layers matched by relative depth ({p['buckets']} "
            f"buckets) and module type ({p['type_key']} of the name); module types compared: "
            f"{', '.join(p['module_types'])}; a key's score is the mean of its layers'."
        )
    if result.get("consensus"):
        lines += ["", "In the top fraction of every ranking:", ""]
        for f, keys in result["consensus"].items():
            more = f", ... ({len(keys) - 20} more, in compare.json)" if len(keys) > 20 else ""
            shown = ", ".join(keys[:20]) + more
            lines.append(f"- top {float(f) * 100:g} %: {len(keys)}" + (f": {shown}" if keys else ""))
    return "\n".join(lines) + "\n"


# -- writing a comparison folder (``ila compare``) -----------------------------------------------------------


@dataclass
class WrittenComparison:
    """What :func:`write_comparison` wrote: the names of the ``files`` in the folder ``out``, the content of
    compare.json (``result``) and of compare.md (``markdown``); a single ranking gets only its heat map."""

    out: Path
    files: list[str]
    result: dict[str, Any] | None = None
    markdown: str = ""


def path_labels(paths: Sequence[str | Path]) -> list[str]:
    """The part of each path that differs from the others (runs/a/stage2/ranking.json, runs/b/... -> a, b)."""
    paths = [str(p) for p in paths]
    parts = [
        list(Path(p).with_suffix("").parts) if p.endswith(".json") else list(Path(p).parts) for p in paths
    ]
    shortest = min(len(x) for x in parts)
    pre = 0
    while pre < shortest - 1 and all(x[pre] == parts[0][pre] for x in parts):
        pre += 1
    suf = 0
    while suf < shortest - pre - 1 and all(x[-1 - suf] == parts[0][-1 - suf] for x in parts):
        suf += 1
    labels = ["/".join(x[pre : len(x) - suf]) for x in parts]
    if len(set(labels)) < len(labels) or not all(labels):
        labels = [f"{i + 1}:{Path(p).stem}" for i, p in enumerate(paths)]
    return labels


def _plots_or_none(warn: Callable[[str], None]) -> ModuleType | None:
    """:mod:`ila.plots` when matplotlib is there; else None, after a warning."""
    try:
        _plots.new_figure(1, 1)  # fails early and clearly without matplotlib
    except IlaError as e:
        warn(f"{e}; writing the statistics without figures")
        return None
    return _plots


def _stale_figures(out: Path, files: Sequence[str]) -> list[str]:
    """PNGs that the compare.json already in ``out`` names and that ``files`` does not."""
    old = out / "compare.json"
    if not old.is_file():
        return []
    try:
        previous = read_json(old, "comparison")
    except IlaError:
        return []
    if not isinstance(previous, dict) or previous.get("kind") != KIND:
        return []  # not a comparison: its files are not ours to remove
    return [
        f
        for f in previous.get("files", [])
        if isinstance(f, str) and f not in files and f == Path(f).name and f.endswith(".png")
    ]


def write_comparison(
    paths: Sequence[str | Path],
    out: str | Path | None = None,
    labels: Sequence[str] | None = None,
    fractions: Iterable[float] = DEFAULT_FRACTIONS,
    *,
    level: Level = "layer",
    mapping: MappingMode = "auto",
    buckets: int | None = None,
    plots: bool = True,
    warn: Callable[[str], None] | None = None,
) -> WrittenComparison:
    """Compare the ranking files ``paths`` (:func:`compare_rankings`) and write compare.json, compare.md and,
    with matplotlib and ``plots``, a heat map per ranking, a Jaccard matrix per fraction and the overlap
    curve into ``out`` (default: ``compare`` beside the first ranking). Figures that an earlier comparison
    left in ``out`` and this one does not redraw are removed. Without matplotlib the figures are skipped with
    a warning, passed to ``warn`` (default: the log).

    ``labels`` default to the part of the paths that differs (:func:`path_labels`). A single ranking gets
    only its heat map (which needs matplotlib).
    """
    warn = warn or logging.getLogger(__name__).warning
    paths = [str(p) for p in paths]
    if not paths:
        raise RankingError("no ranking to compare")
    rankings = [Ranking.load(p) for p in paths]
    labels = _labels(rankings, labels or path_labels(paths))
    folder = Path(out) if out else Path(paths[0]).parent / "compare"
    figures = _plots_or_none(warn) if plots else None

    if len(rankings) == 1:
        if figures is None:
            raise IlaError(
                "one ranking gives only its heat map, which needs matplotlib; pass two or more "
                "rankings to compare them"
            )
        return WrittenComparison(folder, figures.plot_comparison(rankings, labels, None, folder))

    result = compare_rankings(rankings, labels, fractions, level=level, mapping=mapping, buckets=buckets)
    for entry, p in zip(result["rankings"], paths, strict=True):
        entry["path"] = p
    drawn = figures.plot_comparison(rankings, labels, result, folder) if figures is not None else []
    table = render_markdown(result)
    write_text_atomic(folder / "compare.md", table)
    files = ["compare.json", "compare.md", *drawn]
    result["files"] = files
    stale = _stale_figures(folder, files)
    write_json_atomic(folder / "compare.json", result)
    if is_main_process():
        for f in stale:
            if (folder / f).is_file():
                (folder / f).unlink()
    return WrittenComparison(folder, files, result, table)
