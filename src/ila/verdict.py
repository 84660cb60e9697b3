"""The paper's claims held against measured numbers: one row per claim, with our number, its interval or
p-value, and "agrees", "does not" or "cannot tell at this scale".

    ila verdict docs/results/converged/smollm2/strategies.json=converged docs/results/study/study.json

The claims (Shi et al., arXiv 2410.17875, as summarised in ``shared/ila-method.md``) and the rules that
decide each row, so that a verdict is computed, never written by hand:

- *Freezing the bottom 25 % beats tuning every layer*: the paired held-out difference of
  ``ila-drop-bottom-25`` with ``all``; agrees when its 95 % interval lies below 0, does not when above,
  cannot tell when it straddles 0.
- *The top 10-30 % come close to tuning every layer*: the share of ``all``'s gain over the base model that
  ``ila-top-F`` recovers, (base - F) / (base - all), with the interval the paired difference gives it;
  "close" is :data:`CLOSE` or more: agrees when the interval is above it, does not when below.
- The checks a sceptic asks for, which the paper does not state: ILA's top F % against a random F % at
  every size both were trained at (:func:`ila.strategy_summary.draws_difference`: by seed, or each draw
  against ILA's run where ILA has one seed), its top 30 % against every layer at the equal-parameter rank
  (``all-rank-R``) and against the top 30 % of each cheaper ranking in the comparison (Taylor, update norm,
  SNR: no stage 2); agrees when ILA is better with an interval below 0. And ILA's top 30 % trained for as
  long as ``all`` takes (``ila-top-30-equal-time``, more steps since each is cheaper) against ``all``;
  agrees when it is better.
- *~90 % of the important layers are shared across alignment datasets*: the mean Jaccard of the top 30 %;
  agrees at :data:`HIGH_OVERLAP` or more. Below it, the seed-to-seed overlap on one dataset is the ceiling
  that noise leaves: when that is below :data:`HIGH_OVERLAP` too and the datasets reach it within
  :data:`NOISE_MARGIN`, the run cannot tell a dataset effect from noise; otherwise the claim does not hold.
- *Stable across seeds* and *at 25 % of training*: agrees when the top-30 % overlap is beyond chance
  (the largest p-value of the pairs under :data:`ALPHA`) and the Spearman correlation of all scores is
  :data:`STABLE_SPEARMAN` or more; does not when the overlap is at chance.
- *Weaker across models*: each cross-model comparison (one model against another on the same dataset) held
  against the within-model cross-dataset Jaccard: agrees when every one is below it, does not when every
  one is at or above it, cannot tell when they fall on both sides (then their mean would decide by which
  datasets happened to be compared).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from .errors import IlaError
from .strategy_summary import draws_difference, paired_difference

CLOSE = 0.9
"""The share of ``all``'s gain that counts as "close to all"."""
HIGH_OVERLAP = 0.85
"""The top-30 % Jaccard that counts as the paper's "~90 %"."""
NOISE_MARGIN = 0.05
"""How far below the seed-to-seed overlap the cross-dataset overlap may fall and still be noise."""
STABLE_SPEARMAN = 0.9
"""The rank correlation of all scores that counts as "stable"."""
ALPHA = 0.01
FRACTION = 0.3
"""The top fraction the overlap claims are read at."""

Outcome = Literal["agrees", "does not", "cannot tell at this scale"]


@dataclass(frozen=True)
class Verdict:
    """One claim against one measurement."""

    claim: str
    paper: str
    measured: str
    verdict: Outcome
    regime: str
    """Which results: the label given with the report (e.g. ``20 steps``, ``converged``)."""


def _interval(ci: Sequence[float] | None) -> str:
    return "" if ci is None else f" [{ci[0]:+.4f}, {ci[1]:+.4f}]"


def _sign(ci: Sequence[float], better_below: bool = True) -> Outcome:
    """agrees when the interval lies on the claimed side of 0, does not when on the other."""
    lo, hi = ci
    if hi < 0:
        return "agrees" if better_below else "does not"
    if lo > 0:
        return "does not" if better_below else "agrees"
    return "cannot tell at this scale"


def _over(diff: Mapping[str, Any]) -> str:
    against = diff.get("against_seeds")
    seeds = "" if against is None else f", each against seed {', '.join(str(s) for s in against)}"
    return f"{diff['interval_over']}{seeds}, n={len(diff['per_seed'])}"


def _is_size(name: str, prefix: str) -> bool:
    """Whether ``name`` is ``<prefix><percent>``, e.g. ``ila-top-30`` (not its equal-time run)."""
    return name.startswith(prefix) and name[len(prefix) :].isdigit()


def strategy_verdicts(report: Mapping[str, Any], regime: str) -> list[Verdict]:
    """The rows that a strategy comparison (``strategies.json``) decides."""
    by_name: dict[str, list[dict[str, Any]]] = {}
    for r in report["results"]:
        by_name.setdefault(r["name"], []).append(r)
    if "all" not in by_name:
        raise IlaError("the strategy comparison has no `all` runs: nothing to hold the claims against")
    unpaired = [r.get("run", r["name"]) for r in report["results"] if "heldout_examples" not in r]
    if unpaired:
        raise IlaError(
            f"the strategy comparison ({regime}) has no per-example held-out losses ({unpaired[0]}, schema "
            f"{report.get('schema_version')}): it predates the paired comparison the verdicts rest on; run "
            "ila compare-strategies again into a new --out"
        )
    base = report.get("base_heldout_loss")
    all_loss = float(np.mean([r["heldout_loss"] for r in by_name["all"]]))
    rows = []

    def versus(name: str, other: str = "all") -> dict[str, Any] | None:
        if name not in by_name or other not in by_name:
            return None
        return paired_difference(by_name[name], {r["seed"]: r for r in by_name[other]})

    def named(prefix: str) -> str | None:  # the strategy, not its equal-time run
        return next((n for n in by_name if n.startswith(prefix) and not n.endswith("-equal-time")), None)

    drop = named("ila-drop-bottom-")
    if drop:
        d = versus(drop)
        rows.append(
            Verdict(
                f"freezing the bottom {drop.rsplit('-', 1)[1]} % beats tuning every layer",
                "better than all layers",
                f"held-out loss vs all {d['difference']:+.4f}{_interval(d['ci95'])} ({_over(d)})",
                _sign(d["ci95"]),
                regime,
            )
        )
    gain = None if base is None else base - all_loss
    for pct in (10, 20, 30):
        name = f"ila-top-{pct}"
        d = versus(name)
        if d is None or gain is None:
            continue
        if gain <= 0:
            rows.append(
                Verdict(
                    f"the top {pct} % come close to all layers",
                    "close to all layers",
                    f"all layers did not improve on the base model ({all_loss:.4f} vs {base:.4f})",
                    "cannot tell at this scale",
                    regime,
                )
            )
            continue
        share = 1 - d["difference"] / gain
        lo, hi = 1 - d["ci95"][1] / gain, 1 - d["ci95"][0] / gain
        outcome: Outcome = (
            "agrees" if lo >= CLOSE else "does not" if hi < CLOSE else "cannot tell at this scale"
        )
        rows.append(
            Verdict(
                f"the top {pct} % come close to all layers",
                f"close to all layers (here: at least {CLOSE:.0%} of its gain)",
                f"{share:.0%} of the gain [{lo:.0%}, {hi:.0%}] ({_over(d)})",
                outcome,
                regime,
            )
        )
    baselines = []  # (the baseline, the claim, ILA's difference with it)
    for pct in sorted(int(n.rsplit("-", 1)[1]) for n in by_name if _is_size(n, "ila-top-")):
        name, draws = f"ila-top-{pct}", f"random-{pct}"
        if draws in by_name:
            d = draws_difference(by_name[name], by_name[draws])
            baselines.append((draws, f"ILA's top {pct} % beats a random {pct} %", d))
    matched = named("all-rank-")
    if matched and "ila-top-30" in by_name:
        claim = f"ILA's top 30 % beats every layer at the same parameter count ({matched})"
        baselines.append((matched, claim, versus("ila-top-30", matched)))
    # another scorer's selection is named by its family, the scorer (ila.strategy_plan.plan_strategies)
    for scorer in sorted({str(r.get("family")) for r in report["results"]}):
        other = f"{scorer}-top-30"
        if other in by_name and "ila-top-30" in by_name:
            claim = f"ILA's top 30 % beats the {scorer} top 30 % (a ranking that needs no stage 2)"
            baselines.append((other, claim, versus("ila-top-30", other)))
    for other, claim, d in baselines:
        rows.append(
            Verdict(
                claim,
                "not stated (a sceptic's baseline)",
                f"held-out loss vs {other} {d['difference']:+.4f}{_interval(d['ci95'])} ({_over(d)})",
                _sign(d["ci95"]),
                regime,
            )
        )
    d = versus("ila-top-30-equal-time")
    if d is not None:
        rows.append(
            Verdict(
                "ILA's top 30 % beats every layer in the same training time",
                "not stated (a sceptic's baseline: a cheaper step buys more steps)",
                f"held-out loss vs all {d['difference']:+.4f}{_interval(d['ci95'])} ({_over(d)})",
                _sign(d["ci95"]),
                regime,
            )
        )
    return rows


def _overlap(group: Mapping[str, Any], fraction: float = FRACTION) -> dict[str, float]:
    """Mean Jaccard, its random expectation, the largest p-value and the mean Spearman over a group's
    pairs, at ``fraction``."""
    cells = []
    for pair in group["pairs"]:
        at = [f for f in pair["fractions"] if abs(f["fraction"] - fraction) < 1e-9]
        if not at:
            raise IlaError(f"the comparison has no top-{fraction:.0%} overlap")
        cells.append((at[0], pair.get("spearman")))
    if not cells:
        raise IlaError("the comparison has no pairs")
    rhos = [rho for _, rho in cells if rho is not None]
    return {
        "jaccard": float(np.mean([c["jaccard"] for c, _ in cells])),
        "random": float(np.mean([c["expected_random"] for c, _ in cells])),
        "p": max(c["p_value"] for c, _ in cells),
        "spearman": float(np.mean(rhos)) if rhos else float("nan"),
        "pairs": len(cells),
    }


def _models(group: Mapping[str, Any]) -> int:
    """How many base models a comparison's rankings come from."""
    return len({r["base_model"].get("name") for r in group["rankings"]})


def _describe(o: Mapping[str, float]) -> str:
    return (
        f"Jaccard {o['jaccard']:.2f} (random {o['random']:.2f}, max p {o['p']:.2g}), "
        f"Spearman {o['spearman']:.2f}, {o['pairs']} pair{'s' if o['pairs'] != 1 else ''}"
    )


def study_verdicts(study: Mapping[str, Any], regime: str) -> list[Verdict]:
    """The rows that a study (``study.json``) decides, from the groups it compared."""
    groups = study["groups"]
    rows = []
    seeds = _overlap(groups["seeds"]) if "seeds" in groups else None
    datasets = _overlap(groups["alignment datasets"]) if "alignment datasets" in groups else None
    if datasets:
        j = datasets["jaccard"]
        if j >= HIGH_OVERLAP:
            outcome: Outcome = "agrees"
        elif seeds and seeds["jaccard"] < HIGH_OVERLAP and j >= seeds["jaccard"] - NOISE_MARGIN:
            outcome = "cannot tell at this scale"
        else:
            outcome = "does not"
        ceiling = f"; seeds on one dataset: {seeds['jaccard']:.2f}" if seeds else ""
        rows.append(
            Verdict(
                "~90 % of the important layers are shared across alignment datasets",
                "~0.90 (LLaMA-2-7B; Alpaca-GPT4, LIMA, No Robots)",
                _describe(datasets) + ceiling,
                outcome,
                regime,
            )
        )
    stable = [("seeds", "the ranking is stable across seeds", "stable across seeds")]
    stable += [
        (name, "the ranking at 25 % of training already agrees", "25-50 % of training gives the ranking")
        for name in groups
        if name.startswith("milestone 025")
    ]
    for name, claim, paper in stable:
        if name not in groups:
            continue
        o = _overlap(groups[name])
        if o["p"] < ALPHA and o["spearman"] >= STABLE_SPEARMAN:
            outcome = "agrees"
        elif o["p"] >= ALPHA:
            outcome = "does not"
        else:
            outcome = "cannot tell at this scale"
        rows.append(Verdict(claim, paper, _describe(o), outcome, regime))
    across = [name for name, g in groups.items() if _models(g) > 1]
    if datasets and across:
        models = {name: _overlap(groups[name])["jaccard"] for name in across}
        below = [j < datasets["jaccard"] for j in models.values()]
        outcome = "agrees" if all(below) else "does not" if not any(below) else "cannot tell at this scale"
        each = ", ".join(f"{j:.2f} ({name})" for name, j in models.items())
        mean = f", mean {np.mean(list(models.values())):.2f}," if len(models) > 1 else ""
        rows.append(
            Verdict(
                "the important layers agree less across models",
                "weaker across models",
                f"across models Jaccard {each}{mean} vs across datasets {datasets['jaccard']:.2f}",
                outcome,
                regime,
            )
        )
    return rows


def verdicts(reports: Sequence[tuple[Mapping[str, Any], str]]) -> list[Verdict]:
    """Every row that the given reports (strategy comparisons and studies, each with its regime label)
    decide: a claim's rows together, one per regime in the order the reports are given, the claims in the
    order they first appear (so that a claim decided in two regimes reads as one pair of rows)."""
    rows: list[Verdict] = []
    for report, regime in reports:
        kind = report.get("kind")
        if kind == "ila.strategies":
            rows += strategy_verdicts(report, regime)
        elif kind == "ila.study" or "groups" in report:
            rows += study_verdicts(report, regime)
        else:
            raise IlaError(f"not a strategy comparison or a study (kind {kind!r})")
    first = {v.claim: i for i, v in reversed(list(enumerate(rows)))}
    return sorted(rows, key=lambda v: first[v.claim])  # stable: within a claim, the reports' order


def render_verdicts(rows: Sequence[Verdict]) -> str:
    """The rows as a Markdown table, claims in the order given."""
    lines = [
        "| the paper's claim | the paper | measured (95 % interval) | regime | verdict |",
        "| --- | --- | --- | --- | --- |",
    ]
    for v in rows:
        lines.append(f"| {v.claim} | {v.paper} | {v.measured} | {v.regime} | **{v.verdict}** |")
    return "\n".join(lines) + "\n"


def to_json(rows: Sequence[Verdict]) -> list[dict[str, Any]]:
    return [asdict(v) for v in rows]
