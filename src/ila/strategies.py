"""Does tuning only the important layers hold up? Fine-tune with several layer selections on the same budget
and compare quality and cost.

    ila compare-strategies --run-dir runs/demo --out runs/strategies

For one base model, dataset and training budget (the run's ``stage3`` settings: same steps, data, seed and
LoRA rank), each strategy is a stage-3 run from theta_0 on a different selection:

- ``all``: every layer (plain LoRA), the reference;
- ``ila-drop-bottom-25``: ILA, the 25 % least important layers frozen (the paper: better than ``all``);
- ``ila-top-10/20/30``: ILA, only the top 10 / 20 / 30 % tuned (the paper: close to ``all`` at a fraction
  of the cost);
- ``random-top-F-seedS``: random selections of the same sizes, several seeds (reported as mean and spread);
- ``first-F`` / ``last-F``: the first or last blocks, the same number of layers;
- ``ila-top-F`` for the sweep fractions (e.g. 50 %, 75 %), for the quality-vs-fraction curve;
- ``<scorer>-top-30`` for other scorers (``taylor``, ``update-norm``, ``snr``, ``block-influence``...): is the
  learnt ranking better than a cheap one on the same budget?

Each is evaluated on the held-out split (token-weighted response loss) and, optionally, lm-eval tasks.
On the CPU each fine-tune runs in a fresh process (``isolate``) so that its peak resident memory is its own;
on a GPU the CUDA peak-memory counters are reset per run instead.
Results: ``strategies.json``, ``strategies.md`` and plots (quality vs fraction, quality vs cost).
"""

from __future__ import annotations

import concurrent.futures
import copy
import logging
import multiprocessing
import random as _random
import resource
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .adapters import lm_eval_source, load_result
from .artifacts import envelope, read_json, write_json_atomic, write_text_atomic
from .config import RunConfig
from .errors import IlaError
from .evaluation import lm_eval_scores, write_generations
from .heldout import heldout_loss
from .models import load_base_model, load_tokenizer, resolve_model_source
from .pipeline import load_datasets, prepare_run_dir, stage2, stage3
from .plots import new_figure, save_figure
from .progress import progress
from .ranking import Ranking
from .rundir import RunDir

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Strategy:
    name: str
    family: str
    """all | ila-drop-bottom | ila-top | random | first | last | the name of another scorer"""
    fraction: float
    """Fraction of the layers tuned."""
    layers: tuple[str, ...]
    seed: int | None = None


def plan_strategies(
    ranking: Ranking,
    *,
    fractions: tuple[float, ...] = (0.1, 0.2, 0.3),
    drop_bottom: float = 0.25,
    random_seeds: tuple[int, ...] = (0, 1, 2),
    sweep: tuple[float, ...] = (0.5, 0.75),
    others: dict[str, Ranking] | None = None,
    other_fractions: tuple[float, ...] = (0.3,),
) -> list[Strategy]:
    """The selections to fine-tune. ``others`` maps a scorer name to its ranking (``taylor``, ``update-norm``
    ...): each adds ``<scorer>-top-F`` for the ``other_fractions``, so cheap rankings face the learnt one on
    the same budget."""
    order = ranking.order
    n = ranking.num_layers
    model_order = [layer.name for layer in ranking.layers if layer.block is not None]
    out = [Strategy("all", "all", 1.0, tuple(order))]
    kept = ranking.drop_bottom(drop_bottom)
    out.append(
        Strategy(f"ila-drop-bottom-{round(drop_bottom * 100)}", "ila-drop-bottom", len(kept) / n, tuple(kept))
    )
    for f in fractions:
        k = ranking.count(f)
        pct = round(f * 100)
        out.append(Strategy(f"ila-top-{pct}", "ila-top", k / n, tuple(order[:k])))
        for s in random_seeds:
            chosen = _random.Random(s).sample(order, k)
            out.append(Strategy(f"random-{pct}-seed{s}", "random", k / n, tuple(chosen), seed=s))
        out.append(Strategy(f"first-{pct}", "first", k / n, tuple(model_order[:k])))
        out.append(Strategy(f"last-{pct}", "last", k / n, tuple(model_order[-k:])))
    for f in sweep:
        k = ranking.count(f)
        out.append(Strategy(f"ila-top-{round(f * 100)}", "ila-top", k / n, tuple(order[:k])))
    for scorer, other in (others or {}).items():
        other.check_matches(ranking.layers)
        for f in other_fractions:
            k = other.count(f)
            out.append(Strategy(f"{scorer}-top-{round(f * 100)}", scorer, k / n, tuple(other.order[:k])))
    return out


def _finetune(rc: RunConfig, folder: Path, isolated: bool = True) -> dict[str, Any]:
    """Stage 3 for one strategy; without a CUDA peak, the process's peak resident set size stands in."""
    summary = stage3(rc, folder)
    if summary.get("peak_memory_mb") is None:
        summary["peak_memory_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        summary["peak_memory_kind"] = (
            "process resident set size"
            if isolated
            else "resident set size of the process so far (not isolated)"
        )
    return summary


def _finetune_isolated(rc: RunConfig, folder: Path) -> dict[str, Any]:
    # spawn, not fork: a forked child inherits the parent's resident pages and its peak RSS with them.
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(_finetune, rc, folder).result()


def _run_strategy(
    cfg: RunConfig,
    strat: Strategy,
    ranking_path: Path,
    folder: Path,
    tokenizer: PreTrainedTokenizerBase,
    heldout: datasets.Dataset,
    isolate: bool,
    tasks: tuple[str, ...],
    limit: int | None,
) -> dict[str, Any]:
    """Fine-tune one strategy in ``folder`` (stage 3 with its selection) and measure it."""
    log.info("strategy %s: %d layers", strat.name, len(strat.layers))
    rc = copy.deepcopy(cfg)  # the run's settings, with this strategy's selection
    rc.stage3.ranking = str(ranking_path)
    rc.stage3.selection.mode = "list"
    rc.stage3.selection.layers = list(strat.layers)
    rc.stage3.train.eval_heldout = False
    prepare_run_dir(rc, folder)
    start = time.perf_counter()
    summary = _finetune_isolated(rc, folder) if isolate else _finetune(rc, folder, isolated=False)
    seconds = time.perf_counter() - start
    result_dir = RunDir(folder).stage3_output(rc.stage3.method)
    model = load_result(rc.model, result_dir)
    quality = heldout_loss(model, tokenizer, heldout, batch_size=rc.stage3.train.batch_size)
    bench = {}
    if tasks:
        pretrained, peft = lm_eval_source(resolve_model_source(rc.model), result_dir)
        bench = lm_eval_scores(
            pretrained,
            tasks,
            adapter=peft,
            limit=limit,
            batch_size=8,
            device="cpu" if rc.model.device in ("cpu", "auto") else rc.model.device,
        )
    result = {
        "name": strat.name,
        "family": strat.family,
        "fraction": strat.fraction,
        "seed": strat.seed,
        "num_layers": len(strat.layers),
        "heldout_loss": quality["loss"],
        "heldout_perplexity": quality["perplexity"],
        "benchmarks": bench,
        "trainable_parameters": summary["trainable_parameters"],
        "steps": summary["steps"],
        "seconds_per_step": summary["seconds_per_step"],
        "peak_memory_mb": summary["peak_memory_mb"],
        "peak_memory_kind": summary.get("peak_memory_kind", "CUDA max allocated"),
        "train_seconds": seconds,
    }
    return result


def run_strategies(
    cfg: RunConfig,
    ranking_path: Path,
    out: Path,
    *,
    tasks: tuple[str, ...] = (),
    limit: int | None = None,
    strategies: list[Strategy] | None = None,
    isolate: bool | None = None,
    others: dict[str, Ranking] | None = None,
    generate: int = 0,
) -> dict[str, Any]:
    """Fine-tune and evaluate every strategy; completed ones (their ``result.json``) are reused.

    ``isolate`` (default: on unless the model runs on CUDA) fine-tunes each strategy in its own process so
    that peak memory is measured per strategy. ``generate`` > 0 also answers the first ``generate`` MT-Bench
    questions with the base model, ``all`` and the ILA selections (``generations.md``)."""
    if isolate is None:
        isolate = not (
            cfg.model.device.startswith("cuda") or (cfg.model.device == "auto" and torch.cuda.is_available())
        )
    ranking = Ranking.load(ranking_path)
    strategies = strategies or plan_strategies(ranking, others=others)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    heldout = None
    tokenizer = load_tokenizer(cfg.model)
    for strat in progress(strategies, "strategies", total=len(strategies), unit="strategy"):
        folder = out / strat.name
        done = folder / "result.json"
        if done.is_file():
            results.append(read_json(done))
            continue
        if heldout is None:
            heldout = load_datasets(cfg, tokenizer, out / ".data")[1]
        result = _run_strategy(cfg, strat, ranking_path, folder, tokenizer, heldout, isolate, tasks, limit)
        write_json_atomic(done, result)
        results.append(result)
    if generate > 0:
        # The base model, plain LoRA and the ILA selections: enough for a person to read the difference.
        adapters = {
            s.name: RunDir(out / s.name).stage3_output(cfg.stage3.method)
            for s in strategies
            if s.family in ("all", "ila-drop-bottom", "ila-top")
        }
        write_generations(cfg, adapters, generate, out / "generations.md")
    if heldout is None:
        heldout = load_datasets(cfg, tokenizer, out / ".data")[1]
    # The untuned base model on the same held-out split: how much each strategy's training bought.
    base = heldout_loss(
        load_base_model(cfg.model), tokenizer, heldout, batch_size=cfg.stage3.train.batch_size
    )
    return {
        **envelope("ila.strategies"),
        "ranking": str(ranking_path),
        "base_heldout_loss": base["loss"],
        "results": results,
    }


def _spread(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def render_markdown(report: dict[str, Any], command: str) -> str:
    rows = report["results"]
    ref = next(r for r in rows if r["name"] == "all")
    bench_names = sorted({f"{t}:{k}" for r in rows for t, m in r["benchmarks"].items() for k in m})
    lines = [f"Command: `{command}`", ""]
    base = report.get("base_heldout_loss")
    if base is not None:
        lines += [
            f"Held-out loss of the base model, untuned: {base:.4f}; "
            f"`all` brings it to {ref['heldout_loss']:.4f} ({ref['heldout_loss'] - base:+.4f}).",
            "",
        ]
    lines += [
        "| strategy | layers | trainable params | held-out loss | vs all | step (s) | peak memory (MB) | "
        + " | ".join(bench_names)
        + (" |" if bench_names else "|"),
        "| --- | --- | --- | --- | --- | --- | --- |" + " --- |" * len(bench_names),
    ]
    grouped: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        key = r["name"].rsplit("-seed", 1)[0] if r["family"] == "random" else r["name"]
        grouped.setdefault(key, []).append(r)
    for key, rs in grouped.items():
        loss_m, loss_s = _spread([r["heldout_loss"] for r in rs])
        step_m, _ = _spread([r["seconds_per_step"] for r in rs])
        peaks = [r["peak_memory_mb"] for r in rs if r.get("peak_memory_mb") is not None]
        peak = f"{statistics.mean(peaks):.0f}" if peaks else "-"
        loss = f"{loss_m:.4f}" + (f" ± {loss_s:.4f} (n={len(rs)})" if len(rs) > 1 else "")
        cells = []
        for b in bench_names:
            task, metric = b.split(":", 1)
            vals = [r["benchmarks"].get(task, {}).get(metric) for r in rs]
            vals = [v for v in vals if v is not None]
            if len(vals) > 1:
                cells.append(f"{statistics.mean(vals):.3f} ± {statistics.stdev(vals):.3f}")
            else:
                cells.append(f"{vals[0]:.3f}" if vals else "-")
        lines.append(
            f"| {key} | {rs[0]['num_layers']} | {rs[0]['trainable_parameters']:,} | {loss} | "
            f"{loss_m - ref['heldout_loss']:+.4f} | {step_m:.2f} | {peak} | "
            + " | ".join(cells)
            + (" |" if cells else "|")
        )
    return "\n".join(lines) + "\n"


def plot_strategies(report: dict[str, Any], out: Path) -> list[Path]:
    """Held-out loss vs fraction tuned (ILA top-k curve, random mean, first/last), and vs trainable params."""
    rows = report["results"]
    paths = []
    for xkey, name, xlabel in (
        ("fraction", "quality-vs-fraction.png", "fraction of layers tuned"),
        ("trainable_parameters", "quality-vs-cost.png", "trainable parameters"),
    ):
        fig = new_figure(6.4, 4.2)
        ax = fig.add_subplot(1, 1, 1)
        for family, style in (("ila-top", "o-"), ("first", "s--"), ("last", "^--")):
            pts = sorted((r[xkey], r["heldout_loss"]) for r in rows if r["family"] == family)
            pts += [
                (r[xkey], r["heldout_loss"]) for r in rows if r["family"] == "all" and family == "ila-top"
            ]
            if pts:
                pts.sort()
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=family)
        by_size: dict[float, list[dict[str, Any]]] = {}
        for r in rows:
            if r["family"] == "random":
                by_size.setdefault(r[xkey], []).append(r)
        if by_size:
            xs = sorted(by_size)
            means = [statistics.mean(r["heldout_loss"] for r in by_size[x]) for x in xs]
            errs = [
                statistics.stdev([r["heldout_loss"] for r in by_size[x]]) if len(by_size[x]) > 1 else 0
                for x in xs
            ]
            ax.errorbar(xs, means, yerr=errs, fmt="x:", capsize=3, label="random (mean ± sd)")
        for r in rows:
            if r["family"] not in ("all", "ila-top", "first", "last", "random"):  # drop-bottom, other scorers
                ax.plot(
                    [r[xkey]],
                    [r["heldout_loss"]],
                    "D" if r["family"] == "ila-drop-bottom" else "*",
                    markersize=8,
                    label=r["name"],
                )
        ax.set_xlabel(xlabel)
        if report.get("base_heldout_loss") is not None:
            ax.axhline(report["base_heldout_loss"], ls=":", color="grey", label="base model, untuned")
        ax.set_ylabel("held-out loss (response tokens)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        paths.append(save_figure(fig, out / name))
    return paths


def compare_strategies(
    cfg: RunConfig,
    run_dir: Path,
    out: Path,
    *,
    tasks: tuple[str, ...] = (),
    limit: int | None = None,
    command: str = "ila compare-strategies",
    isolate: bool | None = None,
    scorers: tuple[str, ...] = (),
    generate: int = 0,
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
        cfg, ranking_path, out, tasks=tasks, limit=limit, isolate=isolate, others=others, generate=generate
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
