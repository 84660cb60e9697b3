"""The verdict rows: computed from a strategy comparison and a study, in the direction each claim states."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ila.cli import main
from ila.errors import IlaError
from ila.verdict import CLOSE, render_verdicts, strategy_verdicts, study_verdicts, verdicts

BASE = 2.0
COUNTS = np.full(60, 20.0)


def _run(name: str, loss: float, seed: int = 0, noise: float = 0.01) -> dict:
    """A run whose held-out loss is ``loss`` on average, per example ``loss`` plus seeded noise."""
    rng = np.random.default_rng(seed)
    difficulty = np.random.default_rng(99).normal(0, 0.3, COUNTS.size)  # shared by every run: pairs cancel it
    per = loss + difficulty + rng.normal(0, noise, COUNTS.size)
    per += loss - float((per * COUNTS).sum() / COUNTS.sum())  # exactly ``loss``, token-weighted
    return {
        "name": name,
        "seed": seed,
        "heldout_loss": loss,
        "heldout_examples": {"sums": (per * COUNTS).tolist(), "counts": COUNTS.tolist()},
    }


def _report(losses: dict[str, list[float]]) -> dict:
    rows = [_run(name, loss, seed) for name, per_seed in losses.items() for seed, loss in enumerate(per_seed)]
    return {"kind": "ila.strategies", "base_heldout_loss": BASE, "results": rows}


def _rows(report: dict) -> dict[str, object]:
    return {v.claim: v for v in strategy_verdicts(report, "converged")}


def test_freezing_the_bottom_agrees_only_when_it_is_better_than_all():
    better = _rows(_report({"all": [1.80, 1.81, 1.79], "ila-drop-bottom-25": [1.78, 1.79, 1.77]}))
    # its equal-time run (listed first, and better) is another strategy: not the one the claim is about
    worse = _rows(_report({"all": [1.80, 1.81, 1.79], "ila-drop-bottom-25-equal-time": [1.70, 1.71, 1.69],
                           "ila-drop-bottom-25": [1.82, 1.83, 1.81]}))  # fmt: skip
    mixed = _rows(_report({"all": [1.80, 1.81, 1.79], "ila-drop-bottom-25": [1.79, 1.82, 1.79]}))
    claim = "freezing the bottom 25 % beats tuning every layer"
    assert better[claim].verdict == "agrees"
    assert worse[claim].verdict == "does not"
    assert mixed[claim].verdict == "cannot tell at this scale"
    assert "seeds, n=3" in better[claim].measured


def test_close_to_all_is_read_as_the_share_of_the_gain():
    # all gains 0.20 over the base model; the top 30 % gains 0.19 (95 %) or 0.10 (50 %)
    close = _rows(_report({"all": [1.80, 1.80], "ila-top-30": [1.81, 1.81]}))
    far = _rows(_report({"all": [1.80, 1.80], "ila-top-30": [1.90, 1.90]}))
    claim = "the top 30 % come close to all layers"
    assert close[claim].verdict == "agrees" and close[claim].measured.startswith("95%")
    assert far[claim].verdict == "does not" and far[claim].measured.startswith("50%")
    assert f"{CLOSE:.0%}" in far[claim].paper


def test_the_sceptics_baselines_compare_ila_with_random_and_the_matched_rank():
    rows = _rows(_report({"all": [1.8], "ila-top-30": [1.85], "random-30": [1.9],
                          "all-rank-2-equal-time": [1.9], "all-rank-2": [1.82]}))  # fmt: skip
    assert rows["ILA's top 30 % beats a random 30 %"].verdict == "agrees"
    matched = rows["ILA's top 30 % beats every layer at the same parameter count (all-rank-2)"]
    assert matched.verdict == "does not"
    assert "held-out examples, n=1" in matched.measured
    assert not any("same training time" in claim for claim in rows)  # no equal-time run, no row


def test_equal_time_holds_the_longer_top_30_against_all():
    # the equal-time run beats its own 400-step run, but the claim is about all: still behind it
    behind = _rows(_report({"all": [1.80, 1.81, 1.79], "ila-top-30": [1.84, 1.85, 1.83],
                            "ila-top-30-equal-time": [1.82, 1.83, 1.81]}))  # fmt: skip
    ahead = _rows(_report({"all": [1.80, 1.81, 1.79], "ila-top-30": [1.84, 1.85, 1.83],
                           "ila-top-30-equal-time": [1.78, 1.79, 1.77]}))  # fmt: skip
    claim = "ILA's top 30 % beats every layer in the same training time"
    assert behind[claim].verdict == "does not" and "vs all +0.0200" in behind[claim].measured
    assert ahead[claim].verdict == "agrees"


def test_a_baseline_with_fewer_seeds_is_paired_on_the_seeds_both_have():
    from ila.strategy_summary import paired_difference

    rows = _rows(_report({"all": [1.8] * 3, "ila-top-30": [1.85, 1.84, 1.86], "random-30": [1.9, 1.91]}))
    assert "(seeds, n=2)" in rows["ILA's top 30 % beats a random 30 %"].measured  # not random's seed 0 twice
    runs = [_run("ila-top-30", 1.85, seed) for seed in (1, 2)]
    lone = paired_difference(runs, {0: _run("all", 1.8, 0)})  # no seed in common: each against the one ref
    assert lone["per_seed"] == pytest.approx([0.05, 0.05]) and lone["interval_over"] == "seeds"


def test_ila_is_held_against_the_random_draws_of_every_size_it_was_trained_at():
    from ila.strategy_summary import draws_difference

    losses = {"all": [1.8], "ila-top-10": [1.85], "random-10": [1.90, 1.92, 1.91], "ila-top-20": [1.83],
              "ila-top-50": [1.82], "random-50": [1.80, 1.86, 1.83]}  # fmt: skip
    rows = _rows(_report(losses))
    ten = rows["ILA's top 10 % beats a random 10 %"]
    # one ILA seed against three draws: each draw against it, the interval over the draws
    assert ten.verdict == "agrees" and "(random draws, each against seed 0, n=3)" in ten.measured
    assert "vs random-10 -0.0600" in ten.measured
    assert (
        rows["ILA's top 50 % beats a random 50 %"].verdict == "cannot tell at this scale"
    )  # draws on both sides
    assert not any("random 20 %" in claim for claim in rows)  # no draws of that size, no row
    # as many ILA seeds as draws: paired by seed, as every other baseline
    ila = [_run("ila-top-10", loss, seed) for seed, loss in enumerate([1.85, 1.86, 1.84])]
    draws = [_run("random-10", loss, seed) for seed, loss in enumerate([1.90, 1.92, 1.91])]
    by_seed = draws_difference(ila, draws)
    assert by_seed["interval_over"] == "seeds" and "against_seeds" not in by_seed
    assert by_seed["per_seed"] == pytest.approx([-0.05, -0.06, -0.07])
    # one seed in common: that draw against ILA's run of its seed, the others against ILA's first run
    ila = [_run("ila-top-10", 1.85, 0), _run("ila-top-10", 1.87, 2)]
    draws = [_run("random-10", loss, seed) for seed, loss in ((2, 1.90), (5, 1.92), (6, 1.91))]
    lone = draws_difference(ila, draws)
    assert lone["against_seeds"] == [0, 2] and lone["per_seed"] == pytest.approx([-0.03, -0.07, -0.06])


def test_ila_is_held_against_the_top_30_of_each_cheaper_ranking():
    families = {"all": "all", "ila-top-30": "ila-top", "random-30": "random", "first-30": "first",
                "taylor-top-30": "taylor", "snr-top-30": "snr",
                "ila-top-30-equal-time": "equal-time"}  # fmt: skip
    losses = [1.8, 1.85, 1.9, 1.95, 1.85, 1.95, 1.83]
    report = _report({name: [loss] for name, loss in zip(families, losses, strict=True)})
    for r in report["results"]:
        r["family"] = families[r["name"]]
    rows = _rows(report)
    scorers = [claim for claim in rows if "needs no stage 2" in claim]
    assert scorers == [
        "ILA's top 30 % beats the snr top 30 % (a ranking that needs no stage 2)",
        "ILA's top 30 % beats the taylor top 30 % (a ranking that needs no stage 2)",
    ]  # neither random draws, first blocks nor an equal-time run counts as a ranking
    assert rows[scorers[0]].verdict == "agrees" and "vs snr-top-30 -0.1000" in rows[scorers[0]].measured
    assert rows[scorers[1]].verdict == "cannot tell at this scale"  # the same loss


def test_a_comparison_without_all_or_a_base_is_refused_or_skipped():
    with pytest.raises(IlaError, match="no `all` runs"):
        strategy_verdicts(_report({"ila-top-30": [1.8]}), "x")
    old = _report({"all": [1.8], "ila-top-30": [1.85]})
    del old["results"][1]["heldout_examples"]  # a comparison from before the per-example losses
    with pytest.raises(IlaError, match="no per-example held-out losses"):
        strategy_verdicts(old, "20 steps")
    no_base = _report({"all": [1.8], "ila-top-30": [1.85]})
    del no_base["base_heldout_loss"]
    assert not [v for v in strategy_verdicts(no_base, "x") if "close" in v.claim]


def _group(jaccard: float, p: float, spearman: float, models: tuple[str, ...] = ("m", "m")) -> dict:
    return {
        "rankings": [{"base_model": {"name": m}} for m in models],
        "pairs": [
            {
                "spearman": spearman,
                "fractions": [{"fraction": 0.3, "jaccard": jaccard, "expected_random": 0.18, "p_value": p}],
            }
        ],
    }


def _study(datasets: float, seeds: float, across: float, seeds_p: float = 1e-9, *more: float) -> dict:
    """``more``: the cross-model Jaccards on further datasets."""
    groups = {
        "alignment datasets": _group(datasets, 1e-9, 0.9),
        "seeds": _group(seeds, seeds_p, 0.95),
        "milestone 025% vs 100%": _group(0.8, 1e-9, 0.8),
        "a vs b on sharegpt": _group(across, 0.04, 0.5, ("a", "b")),
        "b: sharegpt vs gsm8k": _group(0.9, 1e-9, 0.9, ("b", "b")),  # one model: not a cross-model pair
    }
    groups.update({f"a vs b on set{i}": _group(j, 0.04, 0.5, ("a", "b")) for i, j in enumerate(more)})
    return {"kind": "ila.study", "groups": groups}


def test_the_dataset_overlap_is_held_against_the_paper_and_the_seed_noise():
    def verdict(study: dict) -> str:
        rows = {v.claim: v.verdict for v in study_verdicts(study, "converged")}
        return rows["~90 % of the important layers are shared across alignment datasets"]

    assert verdict(_study(datasets=0.9, seeds=0.95, across=0.3)) == "agrees"
    assert verdict(_study(datasets=0.58, seeds=0.95, across=0.3)) == "does not"
    assert verdict(_study(datasets=0.58, seeds=0.60, across=0.3)) == "cannot tell at this scale"
    assert verdict(_study(datasets=0.50, seeds=0.69, across=0.3)) == "does not"


def test_stability_needs_overlap_beyond_chance_and_rank_agreement():
    rows = {v.claim: v.verdict for v in study_verdicts(_study(0.6, 0.7, 0.3), "x")}
    assert rows["the ranking is stable across seeds"] == "agrees"
    assert rows["the ranking at 25 % of training already agrees"] == "cannot tell at this scale"  # rho 0.8
    at_chance = {v.claim: v.verdict for v in study_verdicts(_study(0.6, 0.2, 0.3, seeds_p=0.4), "x")}
    assert at_chance["the ranking is stable across seeds"] == "does not"


def test_weaker_across_models_compares_with_the_within_model_overlap():
    weaker = {v.claim: v.verdict for v in study_verdicts(_study(0.6, 0.7, across=0.3), "x")}
    stronger = {v.claim: v.verdict for v in study_verdicts(_study(0.6, 0.7, across=0.7), "x")}
    claim = "the important layers agree less across models"
    assert weaker[claim] == "agrees" and stronger[claim] == "does not"
    # pairs on both sides: their mean (0.5 here, above 0.44) would only say which datasets were compared
    split = {v.claim: v for v in study_verdicts(_study(0.44, 0.7, 0.27, 1e-9, 0.73), "x")}[claim]
    assert split.verdict == "cannot tell at this scale"
    assert "0.27 (a vs b on sharegpt)" in split.measured and "mean 0.50" in split.measured
    below = {v.claim: v.verdict for v in study_verdicts(_study(0.6, 0.7, 0.3, 1e-9, 0.5), "x")}
    assert below[claim] == "agrees"


def test_the_command_prints_one_row_per_claim_and_its_regime(tmp_path, capsys):
    strategies = tmp_path / "strategies.json"
    strategies.write_text(json.dumps(_report({"all": [1.8], "ila-drop-bottom-25": [1.79]})))
    study = tmp_path / "study.json"
    study.write_text(json.dumps(_study(0.6, 0.7, 0.3)))
    out = tmp_path / "verdict.md"
    assert main(["verdict", f"{strategies}=converged", f"{study}=40 steps", "--out", str(out)]) == 0
    table = out.read_text()
    assert table == capsys.readouterr().out.split("\n\n", 1)[0] + "\n"
    assert "| converged | **" in table and "| 40 steps | **" in table
    assert table == render_verdicts(verdicts([(json.loads(strategies.read_text()), "converged"),
                                              (json.loads(study.read_text()), "40 steps")]))  # fmt: skip
    # a claim decided in two regimes: its rows together, in the order the reports were given
    both = {"all": [1.8], "ila-drop-bottom-25": [1.81], "ila-top-30": [1.82]}
    rows = verdicts([(_report(both), "converged"), (_report(both), "20")])
    assert [(v.claim[:10], v.regime) for v in rows] == [
        ("freezing t", "converged"),
        ("freezing t", "20"),
        ("the top 30", "converged"),
        ("the top 30", "20"),
    ]
    assert main(["verdict", str(tmp_path / "missing.json")]) == 2
    assert "missing.json" in capsys.readouterr().err
