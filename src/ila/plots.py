"""Figures of rankings and of their comparison, as PNG files.

matplotlib is an optional extra (``pip install 'ila[plots]'``); it is imported only when a figure is drawn,
and only its object-oriented API with the Agg canvas is used, so nothing here touches pyplot's global state
or the backend of an interactive session. Every file is written atomically, by the main process only: the
figure is rendered, written to a temporary file in the same folder and renamed into place.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from .artifacts import is_main_process, write_bytes_atomic
from .errors import IlaError
from .ranking import Ranking
from .stats import jaccard_matrix

if TYPE_CHECKING:
    from matplotlib.figure import Figure


class PlotsUnavailable(IlaError):
    """matplotlib is not installed."""


def new_figure(width: float, height: float) -> Any:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotsUnavailable(
            "drawing figures needs matplotlib, which is not installed; install it with "
            "pip install 'ila[plots]' (or pip install matplotlib)"
        ) from None
    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Render as PNG and write it atomically (on the main process only; the others render nothing)."""
    path = Path(path)
    if not is_main_process():
        return path
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return write_bytes_atomic(path, buf.getvalue())


def _block_grid(ranking: Ranking) -> tuple[list[str], list[str], dict[str, tuple[int, int]], list[str]]:
    """(rows: blocks in model order, columns: module types, the (row, column) of every layer, row labels);
    ``lm_head`` gets a row and a column of its own."""
    blocks: list[str] = []
    types: list[str] = []
    index: dict[str, int] = {}
    for layer in ranking.layers:
        if layer.block is None:
            continue
        if layer.block not in index:
            index[layer.block] = layer.block_index if layer.block_index is not None else len(index)
            blocks.append(layer.block)
        if layer.module_type not in types:
            types.append(layer.module_type)
    blocks.sort(key=lambda b: index[b])
    heads = any(layer.block is None for layer in ranking.layers)
    rows = blocks + (["lm_head"] if heads else [])
    cols = types + (["lm_head"] if heads else [])
    r_of = {b: i for i, b in enumerate(rows)}
    c_of = {t: j for j, t in enumerate(cols)}
    cell = {
        layer.name: (r_of[layer.block], c_of[layer.module_type])
        if layer.block is not None
        else (r_of["lm_head"], c_of["lm_head"])
        for layer in ranking.layers
    }
    return rows, cols, cell, [str(index[b]) for b in blocks] + (["lm_head"] if heads else [])


def _grid_axes(ax: Any, cols: list[str], row_labels: list[str]) -> None:
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels(cols, rotation=45, ha="right", fontsize=8)
    step = max(1, math.ceil(len(row_labels) / 40))
    ticks = [i for i in range(len(row_labels)) if i % step == 0 or row_labels[i] == "lm_head"]
    ax.set_yticks(ticks)
    ax.set_yticklabels([row_labels[i] for i in ticks], fontsize=8)
    ax.set_ylabel("block")
    ax.set_xlabel("module type")


def plot_selection(ranking: Ranking, selected: Sequence[str], path: str | Path, *, title: str = "") -> Path:
    """The selected layers on the blocks x module types grid of :func:`plot_ranking_heatmap`: dark cells
    train, light ones stay frozen."""
    rows, cols, cell, row_labels = _block_grid(ranking)
    chosen = set(selected)
    grid = np.full((len(rows), len(cols)), np.nan)
    for layer in ranking.layers:
        grid[cell[layer.name]] = 1.0 if layer.name in chosen else 0.0
    fig = new_figure(1.6 + 0.9 * len(cols), 1.6 + 0.28 * len(rows))
    ax = fig.add_subplot(1, 1, 1)
    import matplotlib
    from matplotlib.colors import ListedColormap

    cmap = ListedColormap(["#dde3ea", "#1f4e79"]).with_extremes(bad="#ffffff")
    ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
    _grid_axes(ax, cols, row_labels)
    if len(rows) <= 64:  # cell borders, where the cells are big enough to see them
        ax.set_xticks(np.arange(-0.5, len(cols)), minor=True)
        ax.set_yticks(np.arange(-0.5, len(rows)), minor=True)
        ax.grid(which="minor", color="white", linewidth=0.8)
        ax.tick_params(which="minor", length=0)
    handles = [
        matplotlib.patches.Patch(color="#1f4e79", label=f"trained ({len(chosen)})"),
        matplotlib.patches.Patch(color="#dde3ea", label=f"frozen ({ranking.num_layers - len(chosen)})"),
    ]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    ax.set_title(title or f"selection: {len(chosen)} of {ranking.num_layers} layers", fontsize=10)
    return save_figure(fig, path)


def plot_ranking_heatmap(
    ranking: Ranking, path: str | Path, *, label: str | None = None, value: Literal["score", "gate"] = "score"
) -> Path:
    """One row per block (in model order), one column per module type; the colour is the layer's score (or
    gate). ``lm_head`` gets a row and a column of its own. Small grids are annotated with each layer's rank
    (1 = most important)."""
    if value not in ("score", "gate"):
        raise IlaError(f"value must be 'score' or 'gate', got {value!r}")

    values = ranking.gates() if value == "gate" else ranking.scores
    if values is None:
        raise IlaError(f"a ranking by {ranking.scorer} has scores, not gates; plot value='score'")
    rank = {name: i + 1 for i, name in enumerate(ranking.order)}
    rows, cols, cell, row_labels = _block_grid(ranking)
    grid = np.full((len(rows), len(cols)), np.nan)
    ranks = np.zeros((len(rows), len(cols)), dtype=int)
    for layer in ranking.layers:
        grid[cell[layer.name]] = values[layer.name]
        ranks[cell[layer.name]] = rank[layer.name]

    fig = new_figure(1.6 + 0.9 * len(cols), 1.6 + 0.28 * len(rows))
    ax = fig.add_subplot(1, 1, 1)
    data = np.ma.masked_invalid(grid)
    import matplotlib

    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#eeeeee")
    im = ax.imshow(data, aspect="auto", cmap=cmap, interpolation="nearest")
    fig.colorbar(im, ax=ax, label=value)
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels(cols, rotation=45, ha="right", fontsize=8)
    _grid_axes(ax, cols, row_labels)
    if grid.size <= 300:
        finite = grid[np.isfinite(grid)]
        mid = (finite.min() + finite.max()) / 2 if finite.size else 0.0
        for i in range(len(rows)):
            for j in range(len(cols)):
                if np.isfinite(grid[i, j]):
                    ax.text(
                        j,
                        i,
                        str(ranks[i, j]),
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="black" if grid[i, j] > mid else "white",
                    )
    parts = [p for p in (label, ranking.scorer, ranking.milestone and f"milestone {ranking.milestone}") if p]
    model = ranking.base_model.get("name")
    ax.set_title(" / ".join(str(p) for p in parts) + (f"\n{model}" if model else ""), fontsize=10)
    return save_figure(fig, path)


def plot_jaccard_matrix(result: Mapping[str, Any], fraction: float, path: str | Path) -> Path:
    """The pairwise Jaccard index of the top ``fraction`` of a :func:`ila.overlap.compare_rankings` result,
    annotated with the values; the title gives the random expectation."""
    labels, m = jaccard_matrix(result, fraction)
    grid = np.array([[np.nan if v is None else v for v in row] for row in m], dtype=float)
    expected = sorted(
        {
            round(o["expected_random"], 3)
            for p in result["pairs"]
            for o in p["fractions"]
            if math.isclose(o["fraction"], fraction)
        }
    )
    n = len(labels)
    fig = new_figure(2.2 + 0.8 * n, 1.8 + 0.7 * n)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(np.ma.masked_invalid(grid), vmin=0.0, vmax=1.0, cmap="magma", interpolation="nearest")
    fig.colorbar(im, ax=ax, label="Jaccard")
    ax.set_xticks(range(n))
    ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n))
    ax.set_yticklabels(labels, fontsize=8)
    for i in range(n):
        for j in range(n):
            v = grid[i, j]
            ax.text(
                j,
                i,
                "n/a" if not np.isfinite(v) else f"{v:.2f}",
                ha="center",
                va="center",
                fontsize=8,
                color="black" if np.isfinite(v) and v > 0.6 else "white",
            )
    if not expected:
        chance = ""
    elif len(expected) == 1:
        chance = f"\nrandom sets: {expected[0]:.3f}"
    else:
        chance = f"\nrandom sets: {expected[0]:.3f} to {expected[-1]:.3f}"
    ax.set_title(
        f"Jaccard of the top {fraction * 100:g} % ({result.get('level', 'layer')} level){chance}", fontsize=10
    )
    return save_figure(fig, path)


Curve = Sequence[Sequence[float]]


def _curves(source: Any) -> dict[str, Curve]:
    if isinstance(source, Mapping) and "pairs" in source:
        out = {}
        for p in source["pairs"]:
            pts = p.get("curve") or [
                [o["fraction"], o["jaccard"], o["expected_random"]] for o in p["fractions"]
            ]
            out[f"{p['a']} vs {p['b']}"] = pts
        return out
    if isinstance(source, Mapping):
        return {str(k): v for k, v in source.items()}
    return {"": source}


def _close(a: tuple[tuple[float, float], ...], b: tuple[tuple[float, float], ...]) -> bool:
    return len(a) == len(b) and all(
        abs(x[0] - y[0]) < 1e-9 and abs(x[1] - y[1]) < 0.01 for x, y in zip(a, b, strict=True)
    )


def plot_overlap_curve(result_or_curves: Any, path: str | Path) -> Path:
    """Jaccard of the top fraction against the fraction, one line per pair, with the random expectation
    dashed. Takes a :func:`ila.overlap.compare_rankings` result, a ``{label: [(fraction, jaccard, expected),
    ...]}`` mapping, or one such list (from :func:`ila.overlap.overlap_curve`)."""
    curves = _curves(result_or_curves)
    if not curves:
        raise IlaError("no pair of rankings to plot an overlap curve for")
    fig = new_figure(7.0, 4.6)
    ax = fig.add_subplot(1, 1, 1)
    baselines: dict[tuple[tuple[float, float], ...], str] = {}
    for i, (label, pts) in enumerate(curves.items()):
        pts = sorted((float(f), float(j), float(e)) for f, j, e in pts)
        colour = f"C{i % 10}"
        ax.plot(
            [p[0] for p in pts],
            [p[1] for p in pts],
            marker="o",
            markersize=3,
            color=colour,
            label=label or None,
        )
        key = tuple((p[0], p[2]) for p in pts)
        # pairs of equally many layers share one baseline
        if not any(_close(key, seen) for seen in baselines):
            baselines[key] = colour
    for j, (key, colour) in enumerate(baselines.items()):
        ax.plot(
            [k[0] for k in key],
            [k[1] for k in key],
            linestyle="--",
            linewidth=1,
            color="grey" if len(baselines) == 1 else colour,
            label="random sets" if j == 0 else None,
        )
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("fraction of layers in the top set")
    ax.set_ylabel("Jaccard of the top sets")
    ax.grid(alpha=0.3)
    ax.set_title("Overlap of the important layers")
    if len(curves) > 1 or next(iter(curves)):
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    else:
        ax.legend(fontsize=7, loc="lower right")
    return save_figure(fig, path)


def _file_slugs(labels: Sequence[str]) -> list[str]:
    """A distinct, file-name-safe form of each label."""
    used: set[str] = set()
    out = []
    for i, label in enumerate(labels):
        s = re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("._") or f"ranking{i + 1}"
        if s in used:
            s = f"{i + 1}-{s}"
        used.add(s)
        out.append(s)
    return out


def plot_comparison(
    rankings: Sequence[Ranking], labels: Sequence[str], result: Mapping[str, Any] | None, out: str | Path
) -> list[str]:
    """The figures of ``ila compare`` in ``out``: a heat map per ranking (``heatmap-<label>.png``) and, given
    the :func:`ila.overlap.compare_rankings` ``result``, a Jaccard matrix per fraction
    (``jaccard-top<percent>.png``) and the overlap curve (``overlap-curve.png``). Returns the file names."""
    out = Path(out)
    files = [
        plot_ranking_heatmap(r, out / f"heatmap-{slug}.png", label=label).name
        for r, label, slug in zip(rankings, labels, _file_slugs(labels), strict=True)
    ]
    if result is not None:
        for f in result["fractions"]:
            files.append(plot_jaccard_matrix(result, f, out / f"jaccard-top{f * 100:g}.png").name)
        files.append(plot_overlap_curve(result, out / "overlap-curve.png").name)
    return files
