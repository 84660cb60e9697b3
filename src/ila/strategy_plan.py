"""Which runs a strategy comparison is made of: each strategy's selection from a ranking, its seeds, its
LoRA rank and, for an equal-time run, the steps that fill the training time of ``all``
(:mod:`ila.strategies` fine-tunes and measures them).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import random as _random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .artifacts import envelope, read_json, write_json_atomic
from .errors import IlaError
from .ranking import Ranking

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
        fixed.append((f"first-{pct}", "first", tuple(model_order[:k])))
        fixed.append((f"last-{pct}", "last", tuple(model_order[-k:])))
    for f in sweep:
        fixed.append((f"ila-top-{round(f * 100)}", "ila-top", tuple(order[: ranking.count(f)])))
    # random draws of every size ILA's top is tuned at, sweep included: each point of the quality-vs-fraction
    # curve has the baseline a selection must beat
    for f in (*fractions, *sweep):
        k = ranking.count(f)
        for s in range(max(seeds, random_runs)):
            chosen = _random.Random(s).sample(order, k)
            out.append(Strategy(f"random-{round(f * 100)}", "random", k / n, tuple(chosen), seed=s))
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


def step_timing_path(out: Path, run: str) -> Path:
    """Where a comparison in ``out`` keeps the step times that size the equal-time run of ``run``
    (``ila-top-30-seed0``: the strategy's run, not its equal-time one)."""
    return out / ".timing" / f"{run}.json"


def _keep_step_times(path: Path, own: float, theirs: float, settings: str) -> None:
    write_json_atomic(
        path,
        {**envelope("ila.step_timing"), "seconds": own, "all_seconds": theirs, "timing_steps": TIMING_STEPS,
         "settings_sha256": settings},
    )  # fmt: skip


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
    _keep_step_times(path, own, theirs, settings)
    return own, theirs


def restore_step_timings(runs: Path, out: Path) -> list[Path]:
    """Keep in the comparison folder ``out`` the step times that sized each finished equal-time run in
    ``runs`` (``<run>/result.json``, its ``timed_step_seconds``), where ``out`` has none for it: a comparison
    that trains that run again (to score its benchmarks, where its adapter was not kept) gives it the steps
    it had, instead of timing it anew, under other load, into another run. Returns the files written."""
    written = []
    for done in sorted(runs.glob("*-equal-time-seed*/result.json")):
        r = read_json(done, "strategy result")
        timed = r.get("timed_step_seconds")
        if not timed:  # sized before the times were kept
            continue
        path = step_timing_path(out, f"{r['name'].removesuffix('-equal-time')}-seed{r['seed']}")
        if not path.exists():
            _keep_step_times(path, *timed, r["settings_sha256"])
            written.append(path)
    return written
