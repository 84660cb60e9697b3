"""Does tuning only the important layers hold up? Fine-tune with several layer selections on the same budget
and compare quality and cost.

    ila compare-strategies --run-dir runs/demo --out runs/strategies

For one base model, dataset and training budget (the run's ``stage3`` settings: same steps, data, seed and
LoRA rank), each strategy is a stage-3 run from theta_0 on a different selection:

- ``all``: every layer (plain LoRA), the reference;
- ``ila-drop-bottom-25``: ILA, the 25 % least important layers frozen (the paper: better than ``all``);
- ``ila-top-10/20/30``: ILA, only the top 10 / 20 / 30 % tuned (the paper: close to ``all`` at a fraction
  of the cost);
- ``random-F``: random selections of the same sizes, one draw per seed (at least three);
- ``first-F`` / ``last-F``: the first or last blocks, the same number of layers;
- ``ila-top-F`` for the sweep fractions (e.g. 50 %, 75 %), for the quality-vs-fraction curve;
- ``all-rank-R``: every layer at the LoRA rank R whose trainable parameter count is nearest ILA's top 30 %
  at the run's rank (the scale alpha / r kept): does choosing layers beat spreading the same budget over
  every layer?
- ``<scorer>-top-30`` for other scorers (``taylor``, ``update-norm``, ``snr``, ``block-influence``...): is the
  learnt ranking better than a cheap one on the same budget?
- ``<strategy>-equal-time`` (``equal_time``): a strategy again with the steps that fill ``all``'s training
  time, measured at the same seed: is a cheaper selection better at equal wall-clock time?

Every strategy runs with ``seeds`` seeds (``--seeds N``: LoRA initialisation and data order change; the
selection does not, except for ``random``). Each run is evaluated on the held-out split (the token-weighted
response loss of :mod:`ila.heldout`, with its interval) and, optionally, lm-eval tasks; each strategy is
reported as the mean over its runs and as the paired difference with ``all`` (same seed, same examples:
:mod:`ila.strategy_summary`).
On the CPU each fine-tune runs in a fresh process (``isolate``) so that its peak resident memory is its own;
on a GPU the CUDA peak-memory counters are reset per run instead.
Results: ``strategies.json``, ``strategies.md`` and plots (quality vs fraction, quality vs cost).
"""

from __future__ import annotations

import concurrent.futures
import copy
import dataclasses
import fnmatch
import hashlib
import logging
import multiprocessing
import random as _random
import resource
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .adapters import load_result
from .artifacts import envelope, read_json, read_jsonl, write_json_atomic
from .batching import choose_batching
from .config import RunConfig
from .errors import IlaError
from .evaluation import benchmark_settings, fill_benchmarks, write_generations
from .forgetting import forgetting_loss, general_text_rows, text_source
from .heldout import example_losses, heldout_loss, summarise
from .ifeval import DEFAULT_MAX_GEN_TOKS
from .models import layer_widths, load_base_model, load_tokenizer
from .pipeline import load_datasets, prepare_run_dir, stage3
from .progress import progress
from .ranking import Ranking
from .rundir import RunDir
from .strategy_summary import summarise_strategies

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Strategy:
    """One fine-tuning run of a strategy: its selection and its seed."""

    name: str
    family: str
    """all | all-matched | ila-drop-bottom | ila-top | random | first | last | equal-time | another scorer"""
    fraction: float
    """Fraction of the layers tuned."""
    layers: tuple[str, ...]
    seed: int = 0
    """The run's seed, added to the config's: LoRA initialisation and data order (and, for ``random``, the
    draw of the selection)."""
    rank: int | None = None
    """The LoRA rank of this run (None: the config's ``lora.r``)."""
    steps: int | None = None
    """The training steps of this run (None: the config's ``stage3.train.max_steps``)."""
    reference_seconds: float | None = None
    """For an equal-time run: the training time of ``all`` that its steps fill."""
    timed_step_seconds: tuple[float, float] | None = None
    """For an equal-time run: the step times that sized it (the strategy's, then ``all``'s)."""

    @property
    def run(self) -> str:
        """The run's folder name: ``<strategy>-seed<seed>``."""
        return f"{self.name}-seed{self.seed}"


def plan_strategies(
    ranking: Ranking,
    *,
    fractions: tuple[float, ...] = (0.1, 0.2, 0.3),
    drop_bottom: float = 0.25,
    seeds: int = 1,
    random_runs: int = 3,
    sweep: tuple[float, ...] = (0.5, 0.75),
    others: dict[str, Ranking] | None = None,
    other_fractions: tuple[float, ...] = (0.3,),
    widths: dict[str, int] | None = None,
    rank: int = 8,
    matched_fraction: float = 0.3,
) -> list[Strategy]:
    """The runs to fine-tune: every strategy with ``seeds`` seeds (0, 1, ...), and ``random`` with at least
    ``random_runs`` (each seed draws its own selection). ``others`` maps a scorer name to its ranking
    (``taylor``, ``update-norm`` ...): each adds ``<scorer>-top-F`` for the ``other_fractions``, so cheap
    rankings face the learnt one on the same budget. ``widths`` (:func:`ila.models.layer_widths`) adds
    ``all-rank-R``: every layer at the rank whose parameter count is nearest ILA's top ``matched_fraction``
    at ``rank``."""
    if seeds < 1:
        raise IlaError(f"seeds must be at least 1, got {seeds}")
    order = ranking.order
    n = ranking.num_layers
    model_order = [layer.name for layer in ranking.layers if layer.block is not None]
    fixed = [("all", "all", tuple(order))]  # (name, family, layers) of the selections that need no draw
    kept = ranking.drop_bottom(drop_bottom)
    fixed.append((f"ila-drop-bottom-{round(drop_bottom * 100)}", "ila-drop-bottom", tuple(kept)))
    out = []
    for f in fractions:
        k = ranking.count(f)
        pct = round(f * 100)
        fixed.append((f"ila-top-{pct}", "ila-top", tuple(order[:k])))
        for s in range(max(seeds, random_runs)):
            chosen = _random.Random(s).sample(order, k)
            out.append(Strategy(f"random-{pct}", "random", k / n, tuple(chosen), seed=s))
        fixed.append((f"first-{pct}", "first", tuple(model_order[:k])))
        fixed.append((f"last-{pct}", "last", tuple(model_order[-k:])))
    for f in sweep:
        fixed.append((f"ila-top-{round(f * 100)}", "ila-top", tuple(order[: ranking.count(f)])))
    for scorer, other in (others or {}).items():
        other.check_matches(ranking.layers)
        for f in other_fractions:
            fixed.append((f"{scorer}-top-{round(f * 100)}", scorer, tuple(other.order[: other.count(f)])))
    runs = [Strategy(name, family, len(layers) / n, layers, seed=s) for name, family, layers in fixed
            for s in range(seeds)]  # fmt: skip
    if widths is not None:
        matched = matched_rank(widths, order, order[: ranking.count(matched_fraction)], rank)
        runs += [Strategy(f"all-rank-{matched}", "all-matched", 1.0, tuple(order), seed=s, rank=matched)
                 for s in range(seeds)]  # fmt: skip
    return runs + out


def matched_rank(widths: dict[str, int], every: list[str], chosen: list[str], rank: int) -> int:
    """The LoRA rank R >= 1 at which ``every`` layer trains the number of parameters nearest to ``chosen``
    at ``rank``: a rank-r LoRA on a layer of width in + out trains r * (in + out)."""
    missing = [name for name in every if name not in widths]
    if missing:
        raise IlaError(f"the model has no linear module {missing[0]}; the ranking is not of this model")
    budget = rank * sum(widths[name] for name in chosen)
    return max(1, round(budget / sum(widths[name] for name in every)))


def only_strategies(runs: list[Strategy], patterns: list[str]) -> list[Strategy]:
    """The runs whose strategy name (``random-30``) or run name (``random-30-seed0``) matches one of
    ``patterns`` (names or shell patterns such as ``random-*``); a pattern that matches none is an error, so
    that a typo does not silently drop a strategy from the comparison."""
    names = list(dict.fromkeys(r.name for r in runs))
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(r.name, pattern) or fnmatch.fnmatchcase(r.run, pattern) for r in runs):
            raise IlaError(f"no strategy matches {pattern!r}; the strategies are: {', '.join(names)}")
    return [r for r in runs if any(fnmatch.fnmatchcase(r.name, p) or fnmatch.fnmatchcase(r.run, p)
                                   for p in patterns)]  # fmt: skip


def step_seconds(result: dict[str, Any]) -> float | None:
    """The median wall time of one of a run's training steps; None for a run that predates it (its whole
    training time over its steps includes the held-out evaluations, and work beside it inflates it)."""
    return result.get("median_step_seconds")


TIMING_STEPS = 20
"""Optimiser steps of the short runs that time a step of a strategy and of ``all`` for an equal-time run."""


def equal_time_strategies(
    runs: list[Strategy],
    results: list[dict[str, Any]],
    patterns: list[str],
    step_times: Callable[[Strategy], tuple[float, float]],
) -> list[Strategy]:
    """The runs among ``runs`` that match ``patterns`` (:func:`only_strategies`), again with the steps that
    fill the training time of ``all`` at the same seed: ``floor(all's steps x all's step time / its step
    time)``. ``step_times(run)`` gives the two step times (the run's, then ``all``'s), measured back to back
    on this machine: step times kept in results made on other machines, or beside other work, do not
    compare. An equal-time run that finished (its result among ``results``) keeps the steps it ran, untimed.
    A run without a finished result, or whose ``all`` has none, is left out with a warning; one no faster
    than ``all`` is left out too (its equal-time run is the run itself). The schedule stretches over the
    longer run (the same warm-up ratio, the learning rate decayed over every step)."""
    chosen = [s for s in only_strategies(runs, patterns) if s.family not in ("all", "equal-time")]
    by_run = {r["run"]: r for r in results}
    out = []
    for strat in chosen:
        longer = dataclasses.replace(strat, name=f"{strat.name}-equal-time", family="equal-time")
        mine, ref, done = (by_run.get(r) for r in (strat.run, f"all-seed{strat.seed}", longer.run))
        if done is not None:
            timed = done.get("timed_step_seconds")
            out.append(
                dataclasses.replace(
                    longer, steps=done["steps"], reference_seconds=done.get("reference_seconds"),
                    timed_step_seconds=tuple(timed) if timed else None,
                )
            )  # fmt: skip
            continue
        if mine is None or ref is None:
            log.warning("no equal-time run of %s: it or all-seed%d has not finished", strat.run, strat.seed)
            continue
        own, theirs = step_times(strat)
        budget = ref["steps"] * theirs
        steps = int(budget // own)
        if steps <= mine["steps"]:
            log.warning("no equal-time run of %s: a step takes %.2f s, all's %.2f s", strat.run, own, theirs)
            continue
        log.info("%s: %.2f s a step, all's %.2f s: %d steps at equal time", strat.run, own, theirs, steps)
        sized = {"steps": steps, "reference_seconds": budget, "timed_step_seconds": (own, theirs)}
        out.append(dataclasses.replace(longer, **sized))
    return out


def kept_step_times(
    path: Path, settings: str, measure: Callable[[], tuple[float, float]]
) -> tuple[float, float]:
    """The step times of a strategy and of ``all`` kept in ``path`` (made with these ``settings``), else
    ``measure()``-d and kept there: a comparison cut off during an equal-time run sizes it again with the
    same times, so it goes on with the steps it started with."""
    if path.is_file():
        kept = read_json(path, "step timing")
        if kept.get("settings_sha256") == settings and kept.get("timing_steps") == TIMING_STEPS:
            return kept["seconds"], kept["all_seconds"]
    own, theirs = measure()
    write_json_atomic(
        path,
        {**envelope("ila.step_timing"), "seconds": own, "all_seconds": theirs, "timing_steps": TIMING_STEPS,
         "settings_sha256": settings},
    )  # fmt: skip
    return own, theirs


def _settings_sha256(cfg: RunConfig, ranking_path: Path) -> str:
    """What a strategy run depends on besides its selection and seed: the stage-3 settings (model, data,
    LoRA, schedule) and the ranking the selections come from."""
    blob = cfg.stage_sha256("stage3") + hashlib.sha256(ranking_path.read_bytes()).hexdigest()
    return hashlib.sha256(blob.encode()).hexdigest()


def _reuse(done: Path, settings: str) -> dict[str, Any]:
    """A finished run's result, if it was fine-tuned with these settings."""
    result = read_json(done, "strategy result")
    if result.get("settings_sha256") != settings:
        raise IlaError(
            f"{done.parent} was fine-tuned with other settings (config or ranking) than this comparison's; "
            "use another --out, or remove that folder to run it again"
        )
    return result


def _finetune(rc: RunConfig, folder: Path, data: Path, isolated: bool = True) -> dict[str, Any]:
    """Stage 3 for one strategy; without a CUDA peak, the process's peak resident set size stands in."""
    summary = stage3(rc, folder, data=data)
    if summary.get("peak_memory_mb") is None:
        summary["peak_memory_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        summary["peak_memory_kind"] = (
            "process resident set size"
            if isolated
            else "resident set size of the process so far (not isolated)"
        )
    return summary


def _finetune_isolated(rc: RunConfig, folder: Path, data: Path) -> dict[str, Any]:
    # spawn, not fork: a forked child inherits the parent's resident pages and its peak RSS with them.
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(_finetune, rc, folder, data).result()


def _strategy_config(cfg: RunConfig, strat: Strategy, ranking_path: Path) -> RunConfig:
    """The comparison's settings with this strategy's selection, seed, LoRA rank and steps."""
    rc = copy.deepcopy(cfg)
    rc.seed = cfg.seed + strat.seed
    if strat.rank is not None:  # the same scale alpha / r at another rank
        rc.lora.alpha = cfg.lora.alpha * strat.rank / cfg.lora.r
        rc.lora.r = strat.rank
    if strat.steps is not None:
        rc.stage3.train.max_steps = strat.steps
    rc.stage3.ranking = str(ranking_path)
    rc.stage3.selection.mode = "list"
    rc.stage3.selection.layers = list(strat.layers)
    return rc


def _time_steps(
    cfg: RunConfig, strat: Strategy, ranking_path: Path, folder: Path, isolate: bool, data: Path
) -> float:
    """The median seconds of one of ``strat``'s training steps, from :data:`TIMING_STEPS` steps with its
    settings (its first batches, in its order) in ``folder``, which is removed after."""
    rc = _strategy_config(cfg, strat, ranking_path)
    rc.stage3.train.max_steps = TIMING_STEPS
    rc.stage3.train.eval_heldout = False
    shutil.rmtree(folder, ignore_errors=True)  # a timing cut short: never resumed from its checkpoints
    prepare_run_dir(rc, folder)
    summary = _finetune_isolated(rc, folder, data) if isolate else _finetune(rc, folder, data, isolated=False)
    shutil.rmtree(folder)
    return summary["median_step_seconds"]


def _run_strategy(
    cfg: RunConfig,
    strat: Strategy,
    ranking_path: Path,
    folder: Path,
    tokenizer: PreTrainedTokenizerBase,
    heldout: datasets.Dataset,
    general: datasets.Dataset,
    isolate: bool,
    data: Path,
) -> dict[str, Any]:
    """Fine-tune one strategy in ``folder`` (stage 3 with its selection) and measure it."""
    log.info("strategy %s (seed %d): %d layers", strat.name, strat.seed, len(strat.layers))
    rc = _strategy_config(cfg, strat, ranking_path)
    # the final held-out loss is measured below; during training only where a curve is asked for
    rc.stage3.train.eval_heldout = rc.stage3.train.eval_steps > 0
    prepare_run_dir(rc, folder)
    start = time.perf_counter()
    summary = _finetune_isolated(rc, folder, data) if isolate else _finetune(rc, folder, data, isolated=False)
    seconds = time.perf_counter() - start
    run_dir = RunDir(folder)
    result_dir = run_dir.stage3_output(rc.stage3.method)
    curve_path = run_dir.stage("stage3") / "heldout_curve.jsonl"
    curve = [
        {"step": c["step"], "loss": c["loss"], "ci95": c["ci95"]}
        for c in (read_jsonl(curve_path) if curve_path.is_file() else [])
    ]
    model = load_result(rc.model, result_dir)
    batch = rc.stage3.train.batch_size
    batching = choose_batching(model, rc.data.padding_free)
    sums, counts = example_losses(model, tokenizer, heldout, batch_size=batch, batching=batching)
    quality = summarise(sums, counts)
    f_sums, f_counts = example_losses(model, tokenizer, general, batch_size=batch, batching=batching)
    forgetting = summarise(f_sums, f_counts)
    result = {
        "name": strat.name,
        "run": strat.run,
        "family": strat.family,
        "fraction": strat.fraction,
        "seed": strat.seed,
        "num_layers": len(strat.layers),
        "lora_rank": rc.lora.r,
        "heldout_loss": quality["loss"],
        "heldout_ci95": quality["ci95"],
        "heldout_perplexity": quality["perplexity"],
        # per held-out example: what the paired comparison with `all` resamples
        "heldout_examples": {"sums": sums.tolist(), "counts": counts.tolist()},
        "forgetting_loss": forgetting["loss"],
        "forgetting_ci95": forgetting["ci95"],
        "forgetting_examples": {"sums": f_sums.tolist(), "counts": f_counts.tolist()},
        "benchmarks": {},
        "trainable_parameters": summary["trainable_parameters"],
        "steps": summary["steps"],
        "seconds_per_step": summary["seconds_per_step"],
        "median_step_seconds": summary.get("median_step_seconds"),
        "peak_memory_mb": summary["peak_memory_mb"],
        "peak_memory_kind": summary.get("peak_memory_kind", "CUDA max allocated"),
        "train_seconds": seconds,
        # an equal-time run: the training time of `all` its steps were sized to (all's steps x its step
        # time, timed beside this run's)
        "reference_seconds": strat.reference_seconds,
        "timed_step_seconds": list(strat.timed_step_seconds) if strat.timed_step_seconds else None,
        # the held-out loss during training (stage3.train.eval_steps): where each strategy levels off
        "heldout_curve": curve,
    }
    return result


def run_strategies(
    cfg: RunConfig,
    ranking_path: Path,
    out: Path,
    *,
    tasks: tuple[str, ...] = (),
    limit: int | None = None,
    max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
    strategies: list[Strategy] | None = None,
    isolate: bool | None = None,
    others: dict[str, Ranking] | None = None,
    generate: int = 0,
    seeds: int = 1,
    data: Path | None = None,
    only: list[str] | None = None,
    equal_time: list[str] | None = None,
) -> dict[str, Any]:
    """Fine-tune and evaluate every run (:func:`plan_strategies` with ``seeds``); completed ones (their
    ``result.json``) are reused.

    ``tasks`` (lm-eval, with ``limit`` documents each and IFEval answers of at most ``max_gen_toks`` tokens)
    are scored on every reported run's saved model, finished runs included, and on the base model
    (``out/base/benchmarks.json``); a run trained in this call is scored as soon as it finishes, and a score
    is reused while its settings are the same.

    ``isolate`` (default: on unless the model runs on CUDA) fine-tunes each strategy in its own process so
    that peak memory is measured per strategy. ``data`` holds the tokenized examples (default ``out/data``;
    the run directory's ``data`` folder shares the run's). ``only`` keeps the runs whose strategy or run
    name matches one of these patterns (:func:`only_strategies`); ``equal_time`` (patterns too) runs those of
    the kept runs again with the steps that fill ``all``'s training time (:func:`equal_time_strategies`).
    ``generate`` > 0 also answers the first
    ``generate`` MT-Bench questions with the base model, ``all`` and the ILA selections
    (``generations.md``)."""
    if isolate is None:
        isolate = not (
            cfg.model.device.startswith("cuda") or (cfg.model.device == "auto" and torch.cuda.is_available())
        )
    ranking = Ranking.load(ranking_path)
    if strategies is None:
        widths = layer_widths(cfg.model) if cfg.stage3.method == "lora" else None
        strategies = plan_strategies(ranking, others=others, seeds=seeds, widths=widths, rank=cfg.lora.r)
    if only:
        strategies = only_strategies(strategies, only)
    if equal_time:
        only_strategies(strategies, equal_time)  # a pattern that matches no run fails before any training
    # seed by seed: a comparison cut short has the first seed of every strategy before any second one
    strategies = sorted(strategies, key=lambda s: s.seed)
    out.mkdir(parents=True, exist_ok=True)
    data = data or out / "data"
    results = []
    heldout = general = None
    tokenizer = load_tokenizer(cfg.model)
    settings = _settings_sha256(cfg, ranking_path)
    bench_settings = benchmark_settings(tokenizer, cfg, tasks, limit, max_gen_toks) if tasks else None

    def score(result: dict[str, Any]) -> None:
        folder = out / result["run"]
        model = RunDir(folder).stage3_output(cfg.stage3.method)
        if fill_benchmarks(cfg, result, model, bench_settings, folder / "eval" / "ifeval.jsonl"):
            write_json_atomic(folder / "result.json", result)

    def fit(planned: list[Strategy], what: str) -> None:
        nonlocal heldout, general
        for strat in progress(planned, what, total=len(planned), unit="strategy"):
            done = out / strat.run / "result.json"
            if done.is_file():
                results.append(_reuse(done, settings))
                continue
            if heldout is None:
                heldout = load_datasets(cfg, tokenizer, out / ".data", data)[1]
            if general is None:
                general = general_text_rows(tokenizer, max_length=cfg.data.max_length)
            result = _run_strategy(
                cfg, strat, ranking_path, out / strat.run, tokenizer, heldout, general, isolate, data
            )
            result["settings_sha256"] = settings
            write_json_atomic(done, result)
            results.append(result)
            if bench_settings:
                # scored while its adapter is surely there: a comparison cut off later keeps the scores
                score(result)

    fit(strategies, "strategies")
    if equal_time:
        # after the runs they lengthen; `all` may have run in an earlier call
        known = {r["run"]: r for r in results}
        for pattern in ("all-seed*/result.json", "*-equal-time-seed*/result.json"):
            for done in sorted(out.glob(pattern)):
                known.setdefault(done.parent.name, _reuse(done, settings))

        def step_times(strat: Strategy) -> tuple[float, float]:  # the run and `all`, back to back
            ref = Strategy("all", "all", 1.0, tuple(ranking.order), seed=strat.seed)

            def measure() -> tuple[float, float]:
                own, theirs = (_time_steps(cfg, s, ranking_path, out / ".timing" / s.run, isolate, data)
                               for s in (strat, ref))  # fmt: skip
                return own, theirs

            return kept_step_times(out / ".timing" / f"{strat.run}.json", settings, measure)

        longer = equal_time_strategies(strategies, list(known.values()), equal_time, step_times)
        longer.sort(key=lambda s: s.seed)
        fit(longer, "equal-time strategies")
        strategies += longer
    # the other seeds of these strategies that an earlier call ran (--seeds 3 --only ...), and their
    # equal-time runs (--equal-time): reported too
    planned = {s.run for s in strategies}
    names = list(dict.fromkeys(s.name for s in strategies))
    names += [f"{n}-equal-time" for n in names if not n.endswith("-equal-time")]
    for name in dict.fromkeys(names):
        for done in sorted(out.glob(f"{name}-seed*/result.json")):
            if done.parent.name not in planned and done.parent.name[len(name) + 5 :].isdigit():
                results.append(_reuse(done, settings))
    base_bench: dict[str, Any] = {}
    if bench_settings:
        for result in progress(results, "benchmarks", total=len(results), unit="run"):
            score(result)  # the runs that finished before this call
        base_path = out / "base" / "benchmarks.json"
        base_bench = read_json(base_path, "base benchmarks") if base_path.is_file() else {}
        if fill_benchmarks(cfg, base_bench, None, bench_settings, out / "base" / "ifeval.jsonl"):
            write_json_atomic(base_path, base_bench)
    if generate > 0:
        # The base model, plain LoRA and the ILA selections: enough for a person to read the difference.
        adapters = {
            s.name: RunDir(out / s.run).stage3_output(cfg.stage3.method)
            for s in strategies
            if s.family in ("all", "ila-drop-bottom", "ila-top") and s.seed == 0
        }
        write_generations(cfg, adapters, generate, out / "generations.md")
    if heldout is None:
        heldout = load_datasets(cfg, tokenizer, out / ".data", data)[1]
    # The untuned base model on the same texts: what each strategy's training bought, and what it forgot.
    base_model = load_base_model(cfg.model)
    batch = cfg.stage3.train.batch_size
    batching = choose_batching(base_model, cfg.data.padding_free)
    base = heldout_loss(base_model, tokenizer, heldout, batch_size=batch, batching=batching)
    general = general if general is not None else general_text_rows(tokenizer, max_length=cfg.data.max_length)
    base_forgetting = forgetting_loss(base_model, tokenizer, general, batch_size=batch, batching=batching)
    return {
        **envelope("ila.strategies", schema_version=2),
        "ranking": str(ranking_path),
        "base_heldout_loss": base["loss"],
        "base_heldout_ci95": base["ci95"],
        "base_forgetting_loss": base_forgetting["loss"],
        "base_forgetting_ci95": base_forgetting["ci95"],
        "forgetting_text": text_source(),
        "base_benchmarks": base_bench,
        "results": results,
        "strategies": summarise_strategies(results),
    }
