"""``ila compare-strategies``: run every strategy (:mod:`ila.strategies`), then write ``strategies.json``,
``strategies.md`` (per strategy: held-out loss and forgetting with their intervals, the paired difference
with ``all``, cost) and the plots."""

from __future__ import annotations

import logging
import statistics
from pathlib import Path
from typing import Any

from .artifacts import write_json_atomic, write_text_atomic
from .config import RunConfig
from .errors import IlaError
from .ifeval import DEFAULT_MAX_GEN_TOKS, PLAIN
from .machine import machine_label
from .pipeline import stage2
from .plots import new_figure, save_figure
from .ranking import Ranking
from .rundir import RunDir
from .strategies import run_strategies
from .strategy_plan import TIMING_STEPS, step_seconds
from .strategy_summary import summarise_strategies

log = logging.getLogger(__name__)


def _interval(ci: list[float] | None) -> str:
    return f" [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else ""


def render_markdown(report: dict[str, Any], command: str) -> str:
    rows = report["results"]
    summary = report.get("strategies") or summarise_strategies(rows)
    ref = summary.get("all")  # absent where --only left `all` out: nothing is paired then
    lines = [f"Command: `{command}`", ""]
    base = report.get("base_heldout_loss")
    if base is not None:
        gain = ""
        if ref:
            gain = f"; `all` brings it to {ref['heldout_loss']:.4f} ({ref['heldout_loss'] - base:+.4f})"
        lines += [
            f"Held-out loss of the base model, untuned: {base:.4f}"
            f"{_interval(report.get('base_heldout_ci95'))}{gain}.",
            "",
        ]
    forgot = report.get("base_forgetting_loss")
    if forgot is not None:
        source = report.get("forgetting_text") or {}
        lines += [
            f"Forgetting: the loss on general text outside the alignment data ({source.get('text', '-')}, "
            f"Python {source.get('python', '-')}); the base model's is {forgot:.4f}"
            f"{_interval(report.get('base_forgetting_ci95'))}, and a higher loss after tuning is what "
            "tuning forgot.",
            "",
        ]
    lines += [
        "Held-out loss: mean over a strategy's runs, with the 95 % t-interval over seeds (one run: the "
        "bootstrap interval over held-out examples). vs all: the paired difference with `all` on the same "
        "examples and seed, with its 95 % interval (over seeds, or over examples for one run); negative is "
        "better. Forgetting vs all: the same for the general-text loss.",
        "",
        "| strategy | runs | layers | trainable params | held-out loss | vs all (paired) | forgetting | "
        "forgetting vs all | steps | step (s) | training (min) | peak memory (MB) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    by_name: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_name.setdefault(r["name"], []).append(r)
    walls = mixed = False
    for name, rs in by_name.items():
        entry = summary[name]
        loss = f"{entry['heldout_loss']:.4f}{_interval(entry['heldout_ci95'])}"
        if entry["runs"] > 1:
            loss += f" (sd {entry['heldout_sd']:.4f})"
        vs = entry.get("vs_all")
        paired = "-" if vs is None else f"{vs['difference']:+.4f}{_interval(vs['ci95'])}"
        forgetting = "-"
        if entry.get("forgetting_loss") is not None:
            forgetting = f"{entry['forgetting_loss']:.4f}{_interval(entry.get('forgetting_ci95'))}"
        fvs = entry.get("forgetting_vs_all")
        f_paired = "-" if fvs is None else f"{fvs['difference']:+.4f}{_interval(fvs['ci95'])}"
        medians = [step_seconds(r) for r in rs]
        if all(m is not None for m in medians):
            seconds = [m * r["steps"] for m, r in zip(medians, rs, strict=True)]
            step = f"{statistics.mean(medians):.2f}"
        else:  # a run from before the median step time: its wall time over its steps
            seconds = [r["seconds_per_step"] * r["steps"] for r in rs]
            step = f"{statistics.mean(r['seconds_per_step'] for r in rs):.2f} †"
            walls = True
        minutes = f"{statistics.mean(seconds) / 60:.1f}" + (" †" if step.endswith("†") else "")
        if len({machine_label(r.get("machine")) for r in rs}) > 1:  # step times are the machine's
            step, minutes, mixed = f"{step} ‡", f"{minutes} ‡", True
        steps = "/".join(str(n) for n in dict.fromkeys(r["steps"] for r in rs))
        peaks = [r["peak_memory_mb"] for r in rs if r.get("peak_memory_mb") is not None]
        peak = f"{statistics.mean(peaks):.0f}" if peaks else "-"
        lines.append(
            f"| {name} | {entry['runs']} | {rs[0]['num_layers']} | {rs[0]['trainable_parameters']:,} | "
            f"{loss} | {paired} | {forgetting} | {f_paired} | {steps} | {step} | {minutes} | {peak} |"
        )
    lines += [
        "",
        "step: the median wall time of a training step over a strategy's runs; training: steps x step"
        + (
            "; † the run's whole training time over its steps instead, held-out evaluations included (runs "
            "that predate the median)."
            if walls
            else "."
        )
        + (
            " ‡ the strategy's runs come from more than one machine (below): the mean mixes their step times."
            if mixed
            else ""
        ),
    ]
    lines += _equal_time_lines(rows)
    lines += _machine_lines(rows)
    lines += _benchmark_lines(report, summary, list(by_name))
    return "\n".join(lines) + "\n"


def _machine_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Which runs ran on which machine, where they ran on more than one (:mod:`ila.machine`)."""
    by_machine: dict[str, list[str]] = {}
    for r in rows:
        by_machine.setdefault(machine_label(r.get("machine")), []).append(r["run"])
    if len(by_machine) < 2:
        return []
    seeds: dict[int, set[str]] = {}
    for r in rows:  # a run without a record can be checked against nothing
        if r.get("machine"):
            seeds.setdefault(r["seed"], set()).add(machine_label(r["machine"]))
    split = sorted(s for s, labels in seeds.items() if len(labels) > 1)
    mix = "paired differences mix the machine's effect with the strategy's."
    if len(split) == 1:
        pairing = f"Seed {split[0]} spans machines: its {mix}"
    elif split:
        pairing = f"Seeds {', '.join(map(str, split))} span machines: their {mix}"
    else:
        where = "Where the machine is recorded, each" if machine_label(None) in by_machine else "Each"
        pairing = f"{where} seed's runs share one, so the differences paired by seed compare like with like."
    return [
        "",
        "Machines: the runs come from more than one; step times differ between machines, and losses "
        "can. "
        + "; ".join(f"{lab[:1].upper()}{lab[1:]}: {', '.join(runs)}" for lab, runs in by_machine.items())
        + ". "
        + pairing,
    ]


def _equal_time_lines(rows: list[dict[str, Any]]) -> list[str]:
    """What each equal-time run was given: the steps that fill `all`'s training time at its seed."""
    timed = [r for r in rows if r.get("reference_seconds")]
    if not timed:
        return []
    return [
        "",
        "Equal time: a strategy again with the steps that fill `all`'s training time at the same seed "
        "(`all`'s steps x its step time, over the strategy's own; both step times timed back to back, "
        f"{TIMING_STEPS} steps each, on the machine that ran it); its vs all is quality at equal wall-clock "
        "time. "
        + "; ".join(
            f"{r['run']}: {r['steps']} steps for {r['reference_seconds'] / 60:.1f} min"
            + (f" ({t[0]:.2f} s a step, all's {t[1]:.2f} s)" if (t := r.get("timed_step_seconds")) else "")
            for r in timed
        )
        + ".",
    ]


def _setting(key: str, value: Any) -> str:
    if key == "limit":
        return "every document" if value is None else f"the first {value} documents"
    if key == "max_gen_toks":
        return f"answers of at most {value} tokens"
    if key == "chat_template":
        if value == PLAIN:
            return "prompts in ila's plain template (### User: / ### Assistant:)"
        return "prompts in the chat template" if value else "bare prompts"
    return f"{key} {value}"


def _benchmark_lines(report: dict[str, Any], summary: dict[str, Any], names: list[str]) -> list[str]:
    """The benchmarks table: per strategy and metric the mean over runs and the paired difference with
    ``all`` on the same documents; the untuned base model first."""
    keys = list(dict.fromkeys(k for n in names for k in summary[n].get("benchmarks", {})))
    if not keys:
        return []
    settings = {k.split(":", 1)[0]: summary[n]["benchmarks"][k]["settings"] for n in names
                for k in summary[n].get("benchmarks", {})}  # fmt: skip
    described = "; ".join(
        f"`{task}` " + ", ".join(_setting(k, v) for k, v in (s or {}).items()) for task, s in settings.items()
    )
    lines = [
        "",
        f"Benchmarks (lm-eval; {described}): the mean over a strategy's runs with its 95 % t-interval over "
        "seeds (one run: ± lm-eval's standard error), and vs all: the paired difference with `all` on the "
        "same documents and seed, with its 95 % interval (over seeds, or a bootstrap over documents for one "
        "run); positive is better.",
        "",
        "| strategy | runs | " + " | ".join(f"{k} | vs all" for k in keys) + " |",
        "| --- | --- |" + " --- | --- |" * len(keys),
    ]
    base = report.get("base_benchmarks") or {}
    if base.get("benchmarks"):
        cells = []
        for k in keys:
            task, metric = k.split(":", 1)
            same = (base.get("benchmark_settings") or {}).get(task) == settings.get(task)
            value = base["benchmarks"].get(task, {}).get(metric)
            cells.append(f"{value:.3f} | -" if same and value is not None else "- | -")
        lines.append("| base (untuned) | - | " + " | ".join(cells) + " |")
    for name in names:
        cells = []
        for k in keys:
            b = summary[name].get("benchmarks", {}).get(k)
            if b is None:
                cells.append("- | -")
                continue
            value = f"{b['mean']:.3f}" + (
                _interval(b["ci95"]) if b["ci95"] else (f" ± {b['stderr']:.3f}" if b.get("stderr") else "")
            )
            vs = b.get("vs_all")
            cells.append(
                value + " | " + ("-" if vs is None else f"{vs['difference']:+.3f}{_interval(vs['ci95'])}")
            )
        lines.append(f"| {name} | {summary[name]['runs']} | " + " | ".join(cells) + " |")
    return lines


def quality_points(summary: dict[str, Any]) -> tuple[bool, dict[str, tuple[float, tuple[float, float]]]]:
    """Each strategy's point on the quality plots and its error bar (below, above): with ``all`` to pair with,
    ``(True, ...)`` and the paired difference with ``all`` (``all`` at 0; a strategy that cannot be paired
    left out); else ``(False, ...)`` and the held-out loss (mean over runs, 95 % interval)."""
    paired = "all" in summary and any(e.get("vs_all") for e in summary.values())
    points = {}
    for name, e in summary.items():
        if not paired:
            value, ci = e["heldout_loss"], e.get("heldout_ci95")
        elif name == "all":
            value, ci = 0.0, None
        elif e.get("vs_all") is None:
            continue
        else:
            value, ci = e["vs_all"]["difference"], e["vs_all"]["ci95"]
        points[name] = (value, (value - ci[0], ci[1] - value) if ci else (0.0, 0.0))
    return paired, points


def plot_strategies(report: dict[str, Any], out: Path) -> list[Path]:
    """The quality of each strategy against the fraction of layers it tunes and against its trainable
    parameters, and the paired difference of every strategy with ``all``. Quality is the held-out loss minus
    ``all``'s on the same examples and seeds, with the interval of that paired difference: the loss of one
    run has an interval over examples far wider than the differences between selections, which pairing
    cancels. Without ``all`` to pair with, the held-out loss itself (mean over runs, 95 % interval)."""
    rows = report["results"]
    summary = report.get("strategies") or summarise_strategies(rows)
    paired_axis, points = quality_points(summary)
    first_run = {}
    for r in rows:
        first_run.setdefault(r["name"], r)
    paths = []
    for xkey, name, xlabel in (
        ("fraction", "quality-vs-fraction.png", "fraction of layers tuned"),
        ("trainable_parameters", "quality-vs-cost.png", "trainable parameters"),
    ):
        fig = new_figure(6.4, 4.2)
        ax = fig.add_subplot(1, 1, 1)
        for family, style, label in (
            ("ila-top", "o-", "ila-top"),
            ("first", "s--", "first"),
            ("last", "^--", "last"),
            ("random", "x:", "random (draws pooled)"),
        ):
            names = [
                n for n in points if summary[n]["family"] == family or (family == "ila-top" and n == "all")
            ]
            pts = sorted((first_run[n][xkey], points[n]) for n in names)
            if pts:
                ax.errorbar(
                    [x for x, _ in pts],
                    [y for _, (y, _) in pts],
                    yerr=list(zip(*(err for _, (_, err) in pts), strict=True)),
                    fmt=style,
                    capsize=3,
                    label=label,
                )
        for n, (y, err) in points.items():
            family = summary[n]["family"]
            if family not in ("all", "ila-top", "first", "last", "random"):  # drop-bottom, other scorers
                ax.errorbar(
                    [first_run[n][xkey]],
                    [y],
                    yerr=[[v] for v in err],
                    fmt="D" if family == "ila-drop-bottom" else "*",
                    markersize=8,
                    capsize=3,
                    label=n,
                )
        ax.set_xlabel(xlabel)
        base = report.get("base_heldout_loss")
        if paired_axis:
            ax.axhline(0.0, ls=":", color="grey")
            all_loss = summary["all"]["heldout_loss"]
            gain = "" if base is None else f" (`all` gains {base - all_loss:.4f} on the base model)"
            ax.set_ylabel("held-out loss minus `all`\n(paired, 95 % interval; below 0 is better)")
            ax.set_title(f"quality against {xlabel}{gain}", fontsize=9)
        else:
            if base is not None:
                ax.axhline(base, ls=":", color="grey", label="base model, untuned")
            ax.set_ylabel("held-out loss (response tokens)")
        ax.legend(fontsize=7, loc="best")
        ax.grid(alpha=0.3)
        paths.append(save_figure(fig, out / name))
    paired = {n: p for n, p in points.items() if n != "all"} if paired_axis else {}
    if paired:  # the same points, one row a strategy
        fig = new_figure(6.4, 1.2 + 0.28 * len(paired))
        ax = fig.add_subplot(1, 1, 1)
        ys = list(range(len(paired)))
        errs = list(zip(*(err for _, err in paired.values()), strict=True))
        ax.errorbar([d for d, _ in paired.values()], ys, xerr=errs, fmt="o", capsize=3, color="#1f4e79")
        ax.axvline(0.0, color="grey", ls=":")
        ax.set_yticks(ys)
        ax.set_yticklabels(list(paired), fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("held-out loss minus `all` (paired, 95 % interval); left of 0 is better")
        ax.grid(alpha=0.3, axis="x")
        paths.append(save_figure(fig, out / "paired-vs-all.png"))
    curves = [r for r in rows if r.get("heldout_curve") and r["seed"] == 0]
    if curves:
        paths.append(plot_heldout_curves(curves, out / "heldout-curves.png", report.get("base_heldout_loss")))
    return paths


def plot_heldout_curves(runs: list[dict[str, Any]], path: Path, base: float | None = None) -> Path:
    """Each run's held-out loss during training against its training time (step x median step time): where
    every strategy levels off, and which is ahead at equal wall-clock time. The points of one run share
    its schedule, so a point at half the time is not what a run half as long would reach."""
    fig = new_figure(6.4, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    for r in runs:
        curve = r["heldout_curve"]
        step = step_seconds(r)
        # a run from before the median was recorded: its whole time over its steps, and said so
        label = r["name"] if step else f"{r['name']} (mean step)"
        minutes = [c["step"] * (step or r["seconds_per_step"]) / 60 for c in curve]
        style = "o-" if r["family"] == "all" else "s-" if r["family"].startswith("ila") else "x--"
        ax.plot(minutes, [c["loss"] for c in curve], style, markersize=4, label=label)
    if base is not None:
        ax.axhline(base, ls=":", color="grey", label="base model, untuned")
    ax.set_xlabel("training time (minutes: step x median step time)")
    ax.set_ylabel("held-out loss during training")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def compare_strategies(
    cfg: RunConfig,
    run_dir: Path,
    out: Path,
    *,
    tasks: tuple[str, ...] = (),
    limit: int | None = None,
    max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
    command: str = "ila compare-strategies",
    isolate: bool | None = None,
    scorers: tuple[str, ...] = (),
    generate: int = 0,
    seeds: int = 1,
    only: list[str] | None = None,
    equal_time: list[str] | None = None,
) -> Path:
    """Every strategy of :func:`plan_strategies` on the run's stage-3 budget; ``scorers`` adds the top 30 % of
    other scorers' rankings (``stage2/ranking-<scorer>.json``, computed first where missing)."""
    ranking_path = Path(cfg.stage3.ranking) if cfg.stage3.ranking else RunDir(run_dir).ranking()
    if not ranking_path.is_file():
        raise IlaError(f"no ranking at {ranking_path}; run stages 1 and 2 first (ila train; ila score)")
    others: dict[str, Ranking] = {}
    for scorer in scorers:
        if scorer == "ila":
            continue
        path = RunDir(run_dir).ranking(scorer)
        if not path.is_file():
            log.info("scoring the layers with %s for the comparison", scorer)
            stage2(cfg, run_dir, scorer=scorer)
        others[scorer] = Ranking.load(path)
    report = run_strategies(
        cfg,
        ranking_path,
        out,
        data=RunDir(run_dir).data,
        tasks=tasks,
        limit=limit,
        max_gen_toks=max_gen_toks,
        isolate=isolate,
        others=others,
        generate=generate,
        seeds=seeds,
        only=only,
        equal_time=equal_time,
    )
    report["command"] = command
    write_json_atomic(out / "strategies.json", report)
    md = render_markdown(report, command)
    write_text_atomic(out / "strategies.md", md)
    try:
        plot_strategies(report, out)
    except IlaError as e:
        log.warning("no plots: %s", e)
    return out / "strategies.md"
