"""The summary of a strategy comparison's finished runs: per strategy, the held-out loss over its seeds and
the paired differences with ``all`` (held-out, forgetting, benchmarks) on the same examples and seeds."""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import IlaError
from .heldout import paired_interval
from .stats import mean_interval


def _examples(result: dict[str, Any], metric: str) -> tuple[np.ndarray, np.ndarray] | None:
    """The per-example (sums, counts) of ``metric``: ``heldout``, ``forgetting`` or a benchmark's
    ``task:metric`` (:class:`ila.evaluation.Benchmarks`); None where the result has none."""
    if ":" in metric:
        task, name = metric.split(":", 1)
        ex = (result.get("benchmark_examples") or {}).get(task, {}).get(name)
    else:
        ex = result.get(f"{metric}_examples")
    return (
        None if ex is None else (np.asarray(ex["sums"], dtype=float), np.asarray(ex["counts"], dtype=float))
    )


def _paired(run: dict[str, Any], reference: dict[str, Any], metric: str) -> tuple[float, list[float]]:
    """(value(run) - value(reference), its interval over examples) of ``metric`` (:func:`_examples`), on the
    same examples: each value is the ratio of the per-example totals (a token-weighted loss, an accuracy)."""
    a, b = _examples(run, metric), _examples(reference, metric)
    if a is None or b is None:
        raise IlaError(f"{run['run']} or {reference['run']} has no per-example {metric}; it cannot be paired")
    diff = float(a[0].sum() / max(a[1].sum(), 1.0) - b[0].sum() / max(b[1].sum(), 1.0))
    return diff, paired_interval(a, b)


def seed_pairs(
    runs: list[dict[str, Any]], refs: dict[int, dict[str, Any]]
) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Run k with ref k, for the seeds both have; where they share none, every run with the first ref. A ref
    is never paired twice while others go unpaired: that would count one reference run as several seeds."""
    common = [(r, refs[r["seed"]]) for r in runs if r["seed"] in refs]
    return common or [(r, refs[min(refs)]) for r in runs]


def paired_difference(
    runs: list[dict[str, Any]], refs: dict[int, dict[str, Any]], metric: str = "heldout"
) -> dict[str, Any]:
    """The paired difference of ``runs`` (results of one strategy) with ``refs`` (another's, by seed), on the
    same examples: the pairs of :func:`seed_pairs`. With two or more pairs the interval is the t-interval
    over seeds; with one, the bootstrap over examples."""
    pairs = [_paired(r, ref, metric) for r, ref in seed_pairs(runs, refs)]
    diffs = [d for d, _ in pairs]
    diff, diff_ci = mean_interval(diffs)
    return {
        "difference": diff,
        "ci95": diff_ci if diff_ci is not None else pairs[0][1],
        "interval_over": "seeds" if diff_ci is not None else "held-out examples",
        "per_seed": diffs,
    }


def draws_difference(
    runs: list[dict[str, Any]], draws: list[dict[str, Any]], metric: str = "heldout"
) -> dict[str, Any]:
    """The paired difference of ``runs`` (one strategy's results) with ``draws`` (a random selection's,
    each seed its own draw), on the same examples. Where they share two seeds or more, by seed
    (:func:`paired_difference`). Where the strategy has fewer seeds than that and there are two draws or more,
    each draw against the strategy's run of the draw's seed or, lacking it, its first run: the t-interval is
    then over the draws, whose spread is the baseline's, while the strategy's own seed spread is not in it
    (``interval_over`` is then ``random draws``, and ``against_seeds`` lists the strategy's seeds)."""
    by_seed = {r["seed"]: r for r in runs}
    if len(set(by_seed) & {d["seed"] for d in draws}) >= 2 or len(draws) < 2:
        return paired_difference(runs, {d["seed"]: d for d in draws}, metric)
    first = by_seed[min(by_seed)]
    diffs = [_paired(by_seed.get(d["seed"], first), d, metric)[0] for d in draws]
    diff, ci = mean_interval(diffs)
    return {
        "difference": diff,
        "ci95": ci,
        "interval_over": "random draws",
        "per_seed": diffs,
        "against_seeds": sorted(by_seed),
    }


def summarise_strategies(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per strategy: the held-out loss over its runs (mean, sd, 95 % t-interval over seeds) and the paired
    difference with ``all`` (run k against ``all``'s run k, :func:`seed_pairs`). With two or
    more runs the interval of the difference is over seeds, the larger noise; with one run it is the
    bootstrap over held-out examples, which shows evaluation noise only (``interval_over`` says which)."""
    by_name: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        by_name.setdefault(r["name"], []).append(r)
    refs = {r["seed"]: r for r in by_name.get("all", [])}
    out = {}
    for name, runs in by_name.items():
        losses = [r["heldout_loss"] for r in runs]
        mean, ci = mean_interval(losses)
        entry: dict[str, Any] = {
            "family": runs[0]["family"],
            "runs": len(runs),
            "seeds": sorted(r["seed"] for r in runs),
            "num_layers": runs[0]["num_layers"],
            "heldout_loss": mean,
            "heldout_sd": float(np.std(losses, ddof=1)) if len(runs) > 1 else 0.0,
            "heldout_ci95": ci if ci is not None else runs[0].get("heldout_ci95"),
        }
        if all("forgetting_loss" in r for r in runs):
            f_mean, f_ci = mean_interval([r["forgetting_loss"] for r in runs])
            entry["forgetting_loss"] = f_mean
            entry["forgetting_ci95"] = f_ci if f_ci is not None else runs[0].get("forgetting_ci95")
        every = runs + list(refs.values())
        for metric, key in (("heldout", "vs_all"), ("forgetting", "forgetting_vs_all")):
            if refs and name != "all" and all(f"{metric}_examples" in r for r in every):
                entry[key] = paired_difference(runs, refs, metric)
        benchmarks = _benchmarks(runs, refs if name != "all" else {})
        if benchmarks:
            entry["benchmarks"] = benchmarks
        out[name] = entry
    return out


def _benchmarks(runs: list[dict[str, Any]], refs: dict[int, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per benchmark metric (``task:metric``) that every run scored at the same settings: the mean over runs
    with its t-interval over seeds (one run: lm-eval's standard error, where it gives one), and the paired
    difference with the reference runs ``refs`` (``all``, by seed) where those scored it at the same settings
    on the same documents; positive is better for an accuracy."""
    out: dict[str, dict[str, Any]] = {}
    first = runs[0]
    for task, scores in (first.get("benchmarks") or {}).items():
        settings = (first.get("benchmark_settings") or {}).get(task)
        if any((r.get("benchmark_settings") or {}).get(task) != settings for r in runs):
            continue  # scored at other limits or answer caps: not one quantity
        paired_refs = [ref for _, ref in seed_pairs(runs, refs)] if refs else []
        for metric in scores:
            if "stderr" in metric or any(
                metric not in (r.get("benchmarks") or {}).get(task, {}) for r in runs
            ):
                continue
            values = [r["benchmarks"][task][metric] for r in runs]
            mean, ci = mean_interval(values)
            measure, _, flt = metric.partition("/")
            se = first["benchmarks"][task].get(f"{measure}_stderr/{flt}" if flt else f"{measure}_stderr")
            entry: dict[str, Any] = {"mean": mean, "ci95": ci, "runs": len(runs),
                                     "stderr": se if ci is None and isinstance(se, float) else None,
                                     "settings": settings}  # fmt: skip
            key = f"{task}:{metric}"
            if (
                paired_refs
                and all(
                    (ref.get("benchmark_settings") or {}).get(task) == settings
                    and _examples(ref, key) is not None
                    for ref in paired_refs
                )
                and all(_examples(r, key) is not None for r, _ in seed_pairs(runs, refs))
            ):
                entry["vs_all"] = paired_difference(runs, refs, key)
            out[key] = entry
    return out
