"""The run report: ``report.md`` with its figures (PNG, in ``report/``), written into the run directory.

``ila run`` writes it at its end and ``ila report RUN_DIR`` (re)writes it at any time: it reads only files
the stages wrote (summaries, ``metrics.jsonl``, ``stability.jsonl``, ``scores.jsonl``, the ranking, the
selection, ``eval/evaluation.json``) and loads no model, so it also shows an interrupted run as far as it got,
naming what is missing. It is plain Markdown with relative image links, so it reads the same on GitHub as
in an editor. Without matplotlib the figures are left out and the report says so.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .artifacts import read_json, read_jsonl, write_text_atomic
from .plots import PlotsUnavailable, new_figure, plot_ranking_heatmap, plot_selection, save_figure
from .ranking import Ranking
from .rundir import RunDir

log = logging.getLogger(__name__)

REPORT = "report.md"
FIGURES = "report"

# the colours of the figures, one per stage
_STAGE1, _STAGE3, _BASE = "#1f77b4", "#d62728", "#7f7f7f"


def _read(path: Path, what: str) -> Any:
    return read_json(path, what) if path.is_file() else None


def _records(path: Path) -> list[dict[str, Any]]:
    return read_jsonl(path) if path.is_file() else []


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


def _with_interval(entry: dict[str, Any] | None, loss: float | None) -> str:
    """``1.8674 [1.80, 1.93]``: the loss and its 95 % interval where one was recorded."""
    if entry and entry.get("ci95"):
        lo, hi = entry["ci95"]
        return f"{entry['loss']:.4f} [{lo:.4f}, {hi:.4f}]"
    return _fmt(loss)


# -------------------------------------------------------------------------------------------------------
# figures


def plot_losses(
    curves: dict[str, list[dict[str, Any]]],
    path: Path,
    heldout: dict[str, list[dict[str, Any]]] | None = None,
) -> Path:
    """Training loss against step, one panel per stage that logged one, with the held-out curve
    (``heldout_curve.jsonl``, its 95 % interval as a band) where the stage wrote one: where the held-out loss
    levels off is where training has converged."""
    heldout = heldout or {}
    stages = [s for s in ("stage1", "stage3") if any("loss" in r for r in curves.get(s, []))]
    fig = new_figure(5.2 * len(stages), 3.4)
    first = None
    for i, stage in enumerate(stages):
        ax = fig.add_subplot(1, len(stages), i + 1, sharey=first)  # one scale: the stages compare
        first = first or ax
        rows = [r for r in curves[stage] if "loss" in r]
        color = _STAGE1 if stage == "stage1" else _STAGE3
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], color=color, label="training")
        points = [r for r in heldout.get(stage, []) if r.get("loss") is not None]
        if points:
            steps = [r["step"] for r in points]
            ax.plot(steps, [r["loss"] for r in points], "o-", color="black", ms=3, label="held-out")
            bands = [r for r in points if r.get("ci95")]
            ax.fill_between(
                [r["step"] for r in bands],
                [r["ci95"][0] for r in bands],
                [r["ci95"][1] for r in bands],
                color="black",
                alpha=0.12,
            )
            ax.legend(fontsize=8)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title(stage.replace("stage", "stage "), fontsize=10)
        ax.grid(alpha=0.3)
    return save_figure(fig, path)


def plot_stability(records: Sequence[dict[str, Any]], stable_at: int | None, path: Path) -> Path:
    """The epsilon-stability figure: the relative change of the update r_t (or the top-k overlap, for the
    ``ranking`` criterion) at every window, against the threshold."""
    fig = new_figure(6.0, 3.4)
    ax = fig.add_subplot(1, 1, 1)
    steps = [r["step"] for r in records]
    criterion = records[-1].get("criterion", "update")
    eps = records[-1]["epsilon"]
    if criterion == "ranking":
        ax.plot(steps, [r["top_overlap"] for r in records], marker="o", color=_STAGE1, label="top-k overlap")
        ax.axhline(1 - eps, color=_BASE, linestyle="--", label=f"1 - epsilon = {1 - eps:g}")
        ax.set_ylabel("Jaccard with the previous window")
    else:
        ax.plot(steps, [r["relative_change"] for r in records], marker="o", color=_STAGE1, label="r_t")
        ax.axhline(eps, color=_BASE, linestyle="--", label=f"epsilon = {eps:g}")
        ax.set_yscale("log")
        ax.set_ylabel("relative change of the update")
    if stable_at is not None:
        ax.axvline(stable_at, color=_STAGE3, alpha=0.6, label=f"stable at step {stable_at}")
    ax.set_xlabel("step")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def plot_score_trajectories(records: Sequence[dict[str, Any]], order: Sequence[str], path: Path) -> Path:
    """Every layer's score s_i against the stage-2 step: the final top five and bottom five in colour, the
    rest in grey."""
    fig = new_figure(7.0, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    steps = [r["step"] for r in records]
    top, bottom = list(order[:5]), list(order[-5:])
    marked = set(top) | set(bottom)
    for name in order:
        if name not in marked:
            ax.plot(steps, [r["scores"][name] for r in records], color="#c8c8c8", linewidth=0.6)
    import matplotlib

    colours = matplotlib.colormaps["tab10"]
    for i, name in enumerate(top + [n for n in bottom if n not in top]):
        style = "-" if name in top else ":"
        label = name.removeprefix("model.").replace("layers.", "")
        ax.plot(steps, [r["scores"][name] for r in records], style, color=colours(i % 10), label=label)
    ax.set_xlabel("stage-2 step")
    ax.set_ylabel("score s_i (gate = sigmoid(s_i))")
    ax.set_title("score trajectories: top 5 (solid), bottom 5 (dotted)", fontsize=10)
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def plot_heldout(rows: Sequence[tuple[str, float, list[float] | None]], path: Path) -> Path:
    """Held-out loss per model with its 95 % interval as an error bar (none where none was recorded)."""
    fig = new_figure(1.8 + 1.1 * len(rows), 3.4)
    ax = fig.add_subplot(1, 1, 1)
    xs = range(len(rows))
    losses = [loss for _, loss, _ in rows]
    lower = [loss - ci[0] if ci else 0.0 for _, loss, ci in rows]
    upper = [ci[1] - loss if ci else 0.0 for _, loss, ci in rows]
    colours = [
        _BASE if "base" in label else _STAGE1 if "stage 1" in label else _STAGE3 for label, _, _ in rows
    ]
    ax.bar(xs, losses, color=colours, alpha=0.8)
    ax.errorbar(xs, losses, yerr=[lower, upper], fmt="none", ecolor="black", capsize=4)
    spread = max(losses) - min(losses) + max(lower + upper + [0.0])
    ax.set_ylim(max(0.0, min(losses) - 3 * max(spread, 1e-3)), max(losses) + 2 * max(spread, 1e-3))
    ax.set_xticks(list(xs))
    ax.set_xticklabels([label for label, _, _ in rows], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("held-out loss (token-weighted)")
    ax.set_title("held-out loss, 95 % intervals", fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    return save_figure(fig, path)


# -------------------------------------------------------------------------------------------------------
# the report


def _heldout_rows(s1: dict | None, s3: dict | None, evaluation: dict | None) -> list[tuple]:
    """(label, loss, ci95 or None) of every held-out loss the run recorded."""
    rows = []
    if s1 and s1.get("base_heldout_loss") is not None:
        rows.append(("base", s1["base_heldout_loss"], (s1.get("base_heldout") or {}).get("ci95")))
    if s1 and s1.get("heldout_loss") is not None:
        rows.append(("stage 1 (all layers)", s1["heldout_loss"], (s1.get("heldout") or {}).get("ci95")))
    if s3 and s3.get("heldout_loss") is not None:
        rows.append(("stage 3 (selected)", s3["heldout_loss"], (s3.get("heldout") or {}).get("ci95")))
    for label, entry in ((evaluation or {}).get("results") or {}).items():
        if entry.get("heldout"):
            rows.append((f"ila evaluate: {label}", entry["heldout"]["loss"], entry["heldout"].get("ci95")))
    return rows


def _figure(draw, *args: Any) -> Path | None:  # noqa: ANN001
    """``draw(*args)``, or None when matplotlib is missing (the report then goes without that figure)."""
    try:
        return draw(*args)
    except PlotsUnavailable:
        return None


def _image(lines: list[str], path: Path | None, alt: str, root: Path) -> None:
    if path is not None:
        lines += [f"![{alt}]({path.relative_to(root).as_posix()})", ""]


def _stage1_section(rd: RunDir, s1: dict | None, figures: Path, lines: list[str]) -> None:
    lines += ["## Stage 1: LoRA on every layer", ""]
    if s1 is None:
        lines += ["Not run yet (`ila train`).", ""]
        return
    stable = s1.get("stable_at_step")
    lines += [
        f"{s1['steps']} of {s1['planned_steps']} planned steps on all {s1['layers']['num_layers']} layers "
        f"({_fmt(s1['trainable_parameters'])} trainable parameters, {s1['method']}), "
        f"{_fmt(s1.get('seconds_per_step'), 2)} s a step. "
        + (
            f"Epsilon-stable at step {stable}."
            if stable is not None
            else "Not epsilon-stable within the planned steps."
        )
        + f" Milestones: {', '.join(s1.get('milestones') or []) or 'none'} (`stage1/milestones`).",
        "",
    ]
    records = _records(rd.stage("stage1") / "stability.jsonl")
    if records:
        _image(
            lines, _figure(plot_stability, records, stable, figures / "stability.png"), "stability", rd.root
        )


def _stage2_section(rd: RunDir, ranking: Ranking | None, figures: Path, lines: list[str]) -> None:
    lines += ["## Stage 2: the layer ranking", ""]
    if ranking is None:
        lines += ["Not run yet (`ila score`).", ""]
        return
    gates = ranking.gates()
    lines += [
        f"Scorer `{ranking.scorer}` on {ranking.num_layers} layers"
        + (f" (milestone {ranking.milestone})" if ranking.milestone else "")
        + f": `{rd.ranking(ranking.scorer).relative_to(rd.root)}`.",
        "",
        "| rank | layer | score" + (" | gate |" if gates else " |"),
        "| --- | --- | ---" + (" | --- |" if gates else " |"),
    ]
    shown = list(ranking.order[:10]) + (["..."] if ranking.num_layers > 15 else []) + list(ranking.order[-5:])
    for name in dict.fromkeys(shown):
        if name == "...":
            lines.append("| ... | | |" + (" |" if gates else ""))
            continue
        rank = ranking.order.index(name) + 1
        row = f"| {rank} | `{name}` | {ranking.scores[name]:.4g}"
        lines.append(row + (f" | {gates[name]:.3f} |" if gates else " |"))
    lines.append("")
    records = _records(rd.stage("stage2") / "scores.jsonl")
    if records and all("scores" in r for r in records):
        path = _figure(plot_score_trajectories, records, ranking.order, figures / "scores.png")
        _image(lines, path, "score trajectories", rd.root)
    path = _figure(plot_ranking_heatmap, ranking, figures / "ranking.png")
    _image(lines, path, "ranking heat map, blocks x module types", rd.root)


def _stage3_section(rd: RunDir, ranking: Ranking | None, figures: Path, lines: list[str]) -> None:
    lines += ["## Stage 3: fine-tuning the selection", ""]
    s3, selection = _read(rd.summary("stage3"), "stage 3 summary"), _read(rd.selection, "selection")
    if s3 is None or selection is None:
        lines += ["Not run yet (`ila finetune`).", ""]
        return
    how = selection["mode"].replace("_", "-") + (
        f" {selection['fraction']:g}" if selection.get("fraction") else ""
    )
    output = s3.get("adapter") or s3.get("model")
    lines += [
        f"{s3['num_selected']} of {s3['num_layers']} layers ({how}), {_fmt(s3['trainable_parameters'])} "
        f"trainable parameters, {s3['steps']} steps, {_fmt(s3.get('seconds_per_step'), 2)} s a step; "
        f"result: `{Path(output).name if output else '-'}` in `stage3/`.",
        "",
    ]
    if ranking is not None and set(selection["layers"]) <= set(ranking.scores):
        path = _figure(plot_selection, ranking, selection["layers"], figures / "selection.png")
        _image(lines, path, "selected layers, blocks x module types", rd.root)


def _next_commands(rd: RunDir, ranking: Ranking | None) -> list[str]:
    root = rd.root.as_posix()
    lines = ["## Going on", "", "```bash"]
    if ranking is not None:
        r = rd.ranking(ranking.scorer).as_posix()
        lines += [
            "# what the top 20 % would train; the files other stacks read; or freeze the bottom 25 % instead",
            f"ila select {r} --top 0.2 --dry-run",
            f"ila export {r} --top 0.3",
            f"ila finetune --run-dir {root} --drop-bottom 0.25",
        ]
    lines += [
        "# benchmarks and generations; the selection against other ways of picking layers; this report again",
        f"ila evaluate --run-dir {root} --tasks ila_mmlu_dev --generate 5",
        f"ila compare-strategies --run-dir {root} --out {root}-strategies",
        f"ila report {root}",
        "```",
        "",
    ]
    return lines


def _summary_table(s1: dict | None, s2: dict | None, s3: dict | None) -> list[str]:
    rows: list[tuple] = []
    if s1:
        rows.append(
            ("base model", None, None, _with_interval(s1.get("base_heldout"), s1.get("base_heldout_loss")))
        )
        loss = _with_interval(s1.get("heldout"), s1["heldout_loss"])
        rows.append(("1: all layers", s1["steps"], s1["seconds"], loss, s1["trainable_parameters"]))
    if s2:
        rows.append(
            (f"2: ranking ({s2['scorer']})", s2.get("steps"), s2["seconds"], None, s2["trainable_parameters"])
        )
    if s3:
        loss = _with_interval(s3.get("heldout"), s3["heldout_loss"])
        rows.append(("3: selected layers", s3["steps"], s3["seconds"], loss, s3["trainable_parameters"]))
    out = ["| stage | steps | seconds | held-out loss [95 % interval] | trainable parameters |"]
    out.append("| --- | --- | --- | --- | --- |")
    for label, steps, seconds, loss, *params in rows:
        cells = [label, _fmt(steps), _fmt(seconds, 0), loss or "-", _fmt(params[0] if params else None)]
        out.append("| " + " | ".join(cells) + " |")
    return out


def write_report(run_dir: str | Path) -> Path:
    """Write ``report.md`` and its figures into ``run_dir``; returns the report's path."""
    rd = RunDir(run_dir)
    figures = rd.root / FIGURES
    s1, s3 = _read(rd.summary("stage1"), "stage 1 summary"), _read(rd.summary("stage3"), "stage 3 summary")
    s2 = _read(rd.summary("stage2"), "stage 2 summary")
    scorer = (s2 or {}).get("scorer", "ila")
    ranking = Ranking.load(rd.ranking(scorer)) if rd.ranking(scorer).is_file() else None
    evaluation = _read(rd.eval / "evaluation.json", "evaluation")
    model = (s1 or {}).get("base_model", {}).get("name") or (
        ranking.base_model.get("name") if ranking else None
    )

    lines = [f"# ILA run `{rd.root.name}`", ""]
    lines += [f"Base model `{model or 'unknown'}`; config: [`config.yaml`](config.yaml).", ""]
    lines += _summary_table(s1, s2, s3)
    lines.append("")
    heldout = _heldout_rows(s1, s3, evaluation)
    if heldout:
        _image(lines, _figure(plot_heldout, heldout, figures / "heldout.png"), "held-out losses", rd.root)
    curves = {s: _records(rd.stage(s) / "metrics.jsonl") for s in ("stage1", "stage3")}
    if any(any("loss" in r for r in c) for c in curves.values()):
        heldout_curves = {s: _records(rd.stage(s) / "heldout_curve.jsonl") for s in ("stage1", "stage3")}
        figure = _figure(plot_losses, curves, figures / "loss.png", heldout_curves)
        _image(lines, figure, "training loss and held-out curve", rd.root)
    _stage1_section(rd, s1, figures, lines)
    _stage2_section(rd, ranking, figures, lines)
    _stage3_section(rd, ranking, figures, lines)
    if evaluation:
        lines += [
            "## Evaluation",
            "",
            "`ila evaluate` results: [`eval/evaluation.json`](eval/evaluation.json).",
            "",
        ]
    lines += _next_commands(rd, ranking)
    if not figures.is_dir() or not any(figures.glob("*.png")):
        lines += ["Figures need matplotlib: `pip install 'ila[plots]'`, then `ila report` again.", ""]
    return write_text_atomic(rd.root / REPORT, "\n".join(lines))


__all__ = [
    "REPORT",
    "write_report",
    "plot_heldout",
    "plot_losses",
    "plot_score_trajectories",
    "plot_stability",
]
