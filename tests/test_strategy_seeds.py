"""Seeds for every strategy and the paired comparison with ``all``."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from conftest import TINY_OVERRIDES
from safetensors.torch import load_file

from ila import strategies, strategy_plan
from ila.config import load_config
from ila.errors import IlaError
from ila.heldout import interval, paired_interval
from ila.ranking import Ranking
from ila.strategies import run_strategies
from ila.strategy_plan import (
    Strategy,
    equal_time_strategies,
    matched_rank,
    only_strategies,
    plan_strategies,
)
from ila.strategy_summary import summarise_strategies


def test_every_strategy_gets_every_seed_and_random_at_least_three_draws(
    tmp_path, tiny_model_dir, tiny_data_file
):
    from ila.pipeline import run_all

    cfg = load_config(None, TINY_OVERRIDES(tiny_model_dir, tiny_data_file))
    run_all(cfg, tmp_path / "run")
    ranking = Ranking.load(tmp_path / "run" / "stage2" / "ranking.json")
    one = plan_strategies(ranking)
    assert {s.seed for s in one if s.family != "random"} == {0}
    assert {s.seed for s in one if s.name == "random-10"} == {0, 1, 2}
    # every size ILA's top is tuned at, the sweep's too, has random draws of that size beside it
    tops = {s.name[len("ila-top-") :]: len(s.layers) for s in one if s.family == "ila-top"}
    draws = {s.name[len("random-") :]: len(s.layers) for s in one if s.family == "random"}
    assert tops == draws and {"50", "75"} <= set(tops)
    five = plan_strategies(ranking, seeds=5)
    for name in ("all", "ila-top-30", "first-20", "random-20"):
        assert sorted(s.seed for s in five if s.name == name) == [0, 1, 2, 3, 4]
    fixed = {s.layers for s in five if s.name == "ila-top-30"}
    assert len(fixed) == 1  # the seed changes the training, not the selection
    assert len({s.layers for s in five if s.name == "random-20"}) == 5  # except for random
    assert len({s.run for s in five}) == len(five)
    assert not any(s.rank for s in five)  # without the layers' widths there is no matched-rank baseline
    widths = {name: 10 for name in ranking.order}
    matched = [
        s for s in plan_strategies(ranking, seeds=2, widths=widths, rank=8) if s.family == "all-matched"
    ]
    assert [s.seed for s in matched] == [0, 1]
    rank = round(8 * ranking.count(0.3) / ranking.num_layers)
    assert all(s.layers == tuple(ranking.order) and s.rank == rank for s in matched)


def test_the_matched_rank_spreads_the_chosen_layers_budget_over_every_layer():
    widths = {f"l{i}": w for i, w in enumerate([10] * 8 + [100] * 2)}  # eight narrow layers, two wide
    every = list(widths)
    # rank 8 on the two wide layers is 1,600 parameters per unit: rank 6 on all ten (280 per unit) is nearest
    assert matched_rank(widths, every, ["l8", "l9"], 8) == 6
    assert matched_rank(widths, every, ["l0", "l1"], 8) == 1  # never below rank 1
    assert matched_rank(widths, every, every, 8) == 8
    with pytest.raises(IlaError, match="no linear module"):
        matched_rank(widths, [*every, "elsewhere"], ["l0"], 8)


@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory, tiny_model_dir, tiny_data_file):
    from ila.pipeline import run_all

    tmp = tmp_path_factory.mktemp("seeds")
    cfg = load_config(None, TINY_OVERRIDES(tiny_model_dir, tiny_data_file) + ["stage3.train.max_steps=2"])
    run_all(cfg, tmp / "run")
    cfg.stage3.train.eval_steps = 1  # the strategies' held-out curves
    path = tmp / "run" / "stage2" / "ranking.json"
    ranking = Ranking.load(path)
    top = tuple(ranking.top(0.25))
    runs = [Strategy("all", "all", 1.0, tuple(ranking.order), seed=s) for s in (0, 1)]
    runs += [Strategy("ila-top-25", "ila-top", 0.25, top, seed=s) for s in (0, 1)]
    from ila import tokenized

    builds = []
    real = tokenized.build_datasets
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tokenized, "build_datasets", lambda *a: builds.append(1) or real(*a))
        report = run_strategies(
            cfg, path, tmp / "s", strategies=runs, isolate=False, data=tmp / "run" / "data"
        )
    report["cfg"] = cfg
    report["builds"] = builds
    return tmp, report


def test_the_strategies_reuse_the_runs_tokenized_examples(two_seeds):
    tmp, report = two_seeds
    assert report["builds"] == []
    for run in ("all-seed0", "ila-top-25-seed1"):
        assert json.loads((tmp / "s" / run / "stage3" / "data.json").read_text())["from_cache"]


def test_two_seeds_of_one_strategy_are_two_different_runs(two_seeds):
    tmp, report = two_seeds
    a, b = (load_file(tmp / "s" / f"ila-top-25-seed{s}" / "stage3" / "adapter" / "adapter_model.safetensors")
            for s in (0, 1))  # fmt: skip
    assert a.keys() == b.keys() and any(not np.allclose(a[k], b[k]) for k in a)
    losses = {r["run"]: r["heldout_loss"] for r in report["results"]}
    assert losses["ila-top-25-seed0"] != losses["ila-top-25-seed1"]


def test_the_paired_difference_is_per_seed_and_over_seeds(two_seeds):
    _, report = two_seeds
    loss = {r["run"]: r["heldout_loss"] for r in report["results"]}
    entry = report["strategies"]["ila-top-25"]
    assert entry["runs"] == 2 and entry["seeds"] == [0, 1]
    vs = entry["vs_all"]
    assert vs["per_seed"] == pytest.approx(
        [loss[f"ila-top-25-seed{s}"] - loss[f"all-seed{s}"] for s in (0, 1)]
    )
    assert vs["interval_over"] == "seeds"
    lo, hi = vs["ci95"]
    assert lo <= vs["difference"] <= hi
    assert "vs_all" not in report["strategies"]["all"]


def test_every_run_records_its_heldout_curve_and_its_machine(two_seeds):
    _, report = two_seeds
    for row in report["results"]:
        assert row["machine"]["cpu_count"] and isinstance(row["machine"]["bf16_native"], bool)
        assert [c["step"] for c in row["heldout_curve"]] == [1, 2]
        assert all(c["ci95"][0] <= c["loss"] <= c["ci95"][1] for c in row["heldout_curve"])


def test_the_curves_are_drawn_where_the_runs_recorded_them(two_seeds, tmp_path):
    from ila.strategy_report import plot_strategies

    _, report = two_seeds
    drawn = {p.name for p in plot_strategies(report, tmp_path)}
    assert "heldout-curves.png" in drawn
    assert (tmp_path / "heldout-curves.png").read_bytes()[:4] == b"\x89PNG"
    bare = {**report, "results": [{**r, "heldout_curve": []} for r in report["results"]]}
    assert "heldout-curves.png" not in {p.name for p in plot_strategies(bare, tmp_path / "bare")}


def test_a_later_call_reuses_the_finished_runs_and_reports_their_other_seeds(two_seeds, monkeypatch):
    tmp, report = two_seeds
    ranking = Ranking.load(tmp / "run" / "stage2" / "ranking.json")
    seed0 = [Strategy("all", "all", 1.0, tuple(ranking.order)),
             Strategy("ila-top-25", "ila-top", 0.25, tuple(ranking.top(0.25)))]  # fmt: skip
    monkeypatch.setattr(strategies, "_run_strategy", lambda *a: pytest.fail("a finished run ran again"))
    cfg = report["cfg"]
    again = run_strategies(cfg, tmp / "run" / "stage2" / "ranking.json", tmp / "s", strategies=seed0,
                           isolate=False, data=tmp / "run" / "data")  # fmt: skip
    assert sorted(r["run"] for r in again["results"]) == sorted(r["run"] for r in report["results"])
    assert again["strategies"]["ila-top-25"]["seeds"] == [0, 1]
    other = copy.deepcopy(cfg)
    other.stage3.train.learning_rate *= 2
    with pytest.raises(IlaError, match="other settings"):
        run_strategies(other, tmp / "run" / "stage2" / "ranking.json", tmp / "s", strategies=seed0,
                       isolate=False, data=tmp / "run" / "data")  # fmt: skip


def test_a_comparison_runs_the_first_seed_of_every_strategy_before_any_second(two_seeds, monkeypatch):
    tmp, report = two_seeds
    ranking = Ranking.load(tmp / "run" / "stage2" / "ranking.json")
    planned = [Strategy(name, "x", 1.0, tuple(ranking.order), seed=s)
               for name in ("all", "ila-top-25") for s in (0, 1)]  # fmt: skip
    order = []

    def record(cfg, strat, *args):  # noqa: ANN001, ANN002
        order.append(strat.run)
        if len(order) == 2:
            raise KeyboardInterrupt  # the session is cut off
        return {"run": strat.run}

    monkeypatch.setattr(strategies, "_run_strategy", record)
    with pytest.raises(KeyboardInterrupt):
        run_strategies(report["cfg"], tmp / "run" / "stage2" / "ranking.json", tmp / "fresh",
                       strategies=planned, isolate=False, data=tmp / "run" / "data")  # fmt: skip
    assert order == ["all-seed0", "ila-top-25-seed0"]


def test_only_keeps_the_strategies_it_names_and_refuses_a_pattern_that_matches_none(two_seeds):
    tmp, _ = two_seeds
    ranking = Ranking.load(tmp / "run" / "stage2" / "ranking.json")
    runs = plan_strategies(ranking, seeds=1, widths={n: 16 for n in ranking.order}, rank=8)
    kept = only_strategies(runs, ["all", "random-*", "all-rank-*"])
    matched = next(s.name for s in runs if s.family == "all-matched")
    assert {s.name for s in kept} == {"all", *(f"random-{p}" for p in (10, 20, 30, 50, 75)), matched}
    assert len([s for s in kept if s.name == "random-30"]) == 3
    assert [s.run for s in only_strategies(runs, ["random-30-seed1"])] == ["random-30-seed1"]
    with pytest.raises(IlaError, match="no strategy matches 'ila-top-33'"):
        only_strategies(runs, ["all", "ila-top-33"])


def test_a_paired_interval_is_narrower_than_the_two_intervals_side_by_side():
    """Examples differ in difficulty far more than two models do on one example: pairing cancels it."""
    rng = np.random.default_rng(0)
    counts = rng.integers(5, 50, 300).astype(float)
    difficulty = rng.gamma(2.0, 1.0, 300)
    a = counts * difficulty
    b = counts * (difficulty + 0.05 + 0.01 * rng.standard_normal(300))  # b is worse by about 0.05
    lo, hi = paired_interval((b, counts), (a, counts))
    assert 0.0 < lo < 0.05 < hi  # the difference is found, and it is positive
    width_a = np.diff(interval(a, counts))[0]
    assert hi - lo < width_a / 5
    with pytest.raises(Exception, match="same examples"):
        paired_interval((a[:10], counts[:10]), (a, counts))


def test_one_run_falls_back_to_the_interval_over_examples():
    counts = np.full(50, 10.0)
    sums = counts * np.linspace(1.0, 3.0, 50)
    row = {"family": "all", "num_layers": 4, "heldout_ci95": [1.9, 2.1]}
    ref = {**row, "name": "all", "seed": 0, "heldout_loss": 2.0,
           "heldout_examples": {"sums": sums.tolist(), "counts": counts.tolist()}}  # fmt: skip
    other = {**row, "name": "x", "family": "ila-top", "seed": 0, "heldout_loss": 2.1,
             "heldout_examples": {"sums": (sums + 1.0).tolist(), "counts": counts.tolist()}}  # fmt: skip
    vs = summarise_strategies([ref, other])["x"]["vs_all"]
    assert vs["interval_over"] == "held-out examples"
    assert vs["ci95"] == pytest.approx([0.1, 0.1])  # every example is exactly 0.1 worse: no spread


def test_the_quality_plots_show_the_paired_difference_with_all_where_there_is_all(tmp_path, monkeypatch):
    """One run's loss has an interval over examples far wider than the gap between selections; the
    difference paired on the same examples has not, so the plots draw that wherever `all` is there."""
    from ila import strategy_report
    from ila.strategy_report import quality_points

    counts = np.full(50, 10.0)
    sums = counts * np.linspace(1.0, 3.0, 50)  # examples of very different difficulty

    def run(name: str, family: str, fraction: float, worse: float) -> dict:
        examples = {"sums": (sums + worse * counts).tolist(), "counts": counts.tolist()}
        return {"name": name, "run": f"{name}-seed0", "family": family, "seed": 0, "num_layers": 4,
                "fraction": fraction, "trainable_parameters": 100, "heldout_loss": 2.0 + worse,
                "heldout_ci95": [1.5 + worse, 2.5 + worse], "heldout_examples": examples}  # fmt: skip

    rows = [run("all", "all", 1.0, 0.0), run("ila-top-50", "ila-top", 0.5, 0.01),
            run("random-50", "random", 0.5, 0.03)]  # fmt: skip
    paired, points = quality_points(summarise_strategies(rows))
    assert paired and points["all"] == (0.0, (0.0, 0.0))
    assert points["ila-top-50"][0] == pytest.approx(0.01) and points["random-50"][0] == pytest.approx(0.03)
    assert max(points["random-50"][1]) < 0.01  # every example 0.03 worse: the pair leaves no spread
    alone, loss = quality_points(summarise_strategies(rows[1:]))  # no `all`: the loss itself
    assert not alone and loss["ila-top-50"] == (pytest.approx(2.01), (pytest.approx(0.5), pytest.approx(0.5)))
    figs = []
    monkeypatch.setattr(strategy_report, "save_figure", lambda fig, path: figs.append(fig) or path)
    strategy_report.plot_strategies({"results": rows, "base_heldout_loss": 2.2}, tmp_path)
    lines = {c.get_label(): c.lines[0].get_ydata() for c in figs[0].axes[0].containers}
    assert list(lines["ila-top"]) == pytest.approx([0.01, 0.0])  # ila-top-50, then `all` at fraction 1
    assert "minus `all`" in figs[0].axes[0].get_ylabel()
    bars = figs[2].axes[0]  # paired-vs-all: one row a strategy, `all` itself left out
    assert [t.get_text() for t in bars.get_yticklabels()] == ["ila-top-50", "random-50"]
    assert list(bars.containers[0].lines[0].get_xdata()) == pytest.approx([0.01, 0.03])


def test_every_run_reports_its_forgetting_against_the_base_model_and_all(two_seeds):
    tmp, report = two_seeds
    forgot = {r["run"]: r["forgetting_loss"] for r in report["results"]}
    # The number is the run's model on the general text (not on the alignment held-out split).
    from ila.adapters import load_result
    from ila.forgetting import forgetting_loss, general_text_rows
    from ila.models import load_tokenizer

    cfg = report["cfg"]
    tok = load_tokenizer(cfg.model)
    model = load_result(cfg.model, tmp / "s" / "ila-top-25-seed1" / "stage3" / "adapter")
    rows = general_text_rows(tok, max_length=cfg.data.max_length)
    assert forgetting_loss(model, tok, rows)["loss"] == pytest.approx(forgot["ila-top-25-seed1"], abs=1e-5)
    assert report["base_forgetting_loss"] > 0 and report["forgetting_text"]["sha256"]
    vs = report["strategies"]["ila-top-25"]["forgetting_vs_all"]
    assert vs["per_seed"] == pytest.approx(
        [forgot[f"ila-top-25-seed{s}"] - forgot[f"all-seed{s}"] for s in (0, 1)]
    )
    from ila.strategy_report import render_markdown

    md = render_markdown({k: v for k, v in report.items() if k != "cfg"}, "test")
    assert "forgetting vs all" in md and f"{report['base_forgetting_loss']:.4f}" in md


def _bench_row(name, seed, followed, settings):
    """A strategy result with IFEval scored on four prompts of one instruction each."""
    sums = [float(x) for x in followed]
    score = sum(sums) / len(sums)
    metric = "inst_level_strict_acc/none"
    return {"name": name, "run": f"{name}-seed{seed}", "family": name, "fraction": 1.0, "seed": seed,
            "num_layers": 4, "heldout_loss": 2.0 + seed / 100, "heldout_ci95": [1.9, 2.1],
            "benchmarks": {"ila_ifeval": {metric: score, "inst_level_strict_acc_stderr/none": 0.04}},
            "benchmark_examples": {"ila_ifeval": {metric: {"sums": sums, "counts": [1.0] * len(sums)}}},
            "benchmark_settings": {"ila_ifeval": settings}, "trainable_parameters": 10, "steps": 1,
            "seconds_per_step": 1.0, "peak_memory_mb": 1.0}  # fmt: skip


def test_benchmarks_are_paired_with_all_on_the_same_documents_at_the_same_settings():
    from ila.strategy_report import render_markdown

    key = "ila_ifeval:inst_level_strict_acc/none"
    at = {"limit": 4, "max_gen_toks": 8, "chat_template": True}
    ref = _bench_row("all", 0, [1, 0, 0, 1], at)
    better = _bench_row("ila-top-30", 0, [1, 1, 0, 1], at)  # one more prompt followed, none lost
    entry = summarise_strategies([ref, better])["ila-top-30"]["benchmarks"][key]
    assert entry["mean"] == pytest.approx(0.75) and entry["stderr"] == pytest.approx(0.04)
    assert entry["vs_all"]["difference"] == pytest.approx(0.25)  # positive: better than all
    assert entry["vs_all"]["interval_over"] == "held-out examples"
    assert 0.0 <= entry["vs_all"]["ci95"][0] <= 0.25 <= entry["vs_all"]["ci95"][1]
    # seeds: the interval is over them, and each seed is paired with all's run of that seed
    seeds = summarise_strategies([ref, _bench_row("all", 1, [0, 0, 0, 0], at), better,
                                  _bench_row("ila-top-30", 1, [0, 0, 1, 0], at)])  # fmt: skip
    vs = seeds["ila-top-30"]["benchmarks"][key]["vs_all"]
    assert vs["per_seed"] == pytest.approx([0.25, 0.25]) and vs["interval_over"] == "seeds"
    # all scored on other documents (another limit): the means stand, the pairing does not
    other = summarise_strategies([_bench_row("all", 0, [1, 0, 0, 1], {**at, "limit": 8}), better])
    assert "vs_all" not in other["ila-top-30"]["benchmarks"][key]
    # two seeds of one strategy at different settings are not one quantity: no mean either
    mixed = summarise_strategies([ref, better, _bench_row("ila-top-30", 1, [1, 1, 1, 1], {**at, "limit": 8})])
    assert "benchmarks" not in mixed["ila-top-30"]
    md = render_markdown(
        {"results": [ref, better], "base_benchmarks": {"benchmarks": {"ila_ifeval": {key.split(":")[1]: 0.1}},
                                                       "benchmark_settings": {"ila_ifeval": at}}},
        "x",
    ).splitlines()  # fmt: skip
    rows = {line.split(" | ")[0]: line for line in md if line.startswith("| ") and "|" in line[2:]}
    assert rows["| base (untuned)"] == "| base (untuned) | - | 0.100 | - |"
    assert rows["| ila-top-30"].endswith("| 0.750 ± 0.040 | +0.250 [" + rows["| ila-top-30"].split("[")[-1])
    held = [x for x in md if x.startswith("| all | 1 | 4 |") or x.startswith("| ila-top-30 | 1 | 4 |")]
    assert "| 1.00 † |" in held[0] and "| 1.00 † |" in held[1] and any("† the run's whole" in x for x in md)
    timed = render_markdown({"results": [{**ref, "median_step_seconds": 0.5}]}, "x")
    assert "| 0.50 |" in timed and "†" not in timed  # the median step, where the run measured it
    assert (
        "the first 4 documents" in "\n".join(md) and sum(x.startswith("| ila-top-30 |") for x in md) == 2
    )  # held-out and benchmark tables


def test_a_report_without_all_and_a_curve_without_a_median_say_so(tmp_path, monkeypatch):
    from ila import strategy_report

    row = _bench_row("ila-top-30", 0, [1, 0, 1, 1], {"limit": 4})
    md = strategy_report.render_markdown({"results": [row], "base_heldout_loss": 2.5}, "x")  # no `all`
    assert "untuned: 2.5000." in md and "brings it to" not in md
    figs = []
    monkeypatch.setattr(strategy_report, "save_figure", lambda fig, path: figs.append(fig) or path)
    curve = [{"step": 1, "loss": 2.1}, {"step": 2, "loss": 2.0}]
    timed = {**row, "name": "all", "family": "all", "median_step_seconds": 0.5, "heldout_curve": curve}
    strategy_report.plot_heldout_curves([{**row, "heldout_curve": curve}, timed], tmp_path / "c.png")
    legend = [t.get_text() for t in figs[0].axes[0].get_legend().get_texts()]
    assert legend == ["ila-top-30 (mean step)", "all"]  # a run without a median: not timed like the rest


def test_a_per_document_value_is_kept_only_where_its_ratio_is_the_score():
    from ila.evaluation import per_document

    samples = [
        {"doc_id": 1, "filter": "none", "acc": 0.0, "inst": [True, False, True], "bleu": ("a", "b")},
        {"doc_id": 0, "filter": "none", "acc": 1.0, "inst": [True], "bleu": ("c", "d")},
        {"doc_id": 0, "filter": "strict", "acc": 0.0, "inst": [False], "bleu": ("c", "d")},
    ]
    got = per_document(samples, {"acc/none": 0.5, "inst/none": 0.75, "bleu/none": 0.3, "acc/strict": 0.0})
    assert got["acc/none"] == {"sums": [1.0, 0.0], "counts": [1.0, 1.0]}  # document order, this filter only
    assert got["inst/none"] == {"sums": [1.0, 2.0], "counts": [1.0, 3.0]}  # instructions followed / given
    assert got["acc/strict"] == {"sums": [0.0], "counts": [1.0]}
    assert "bleu/none" not in got  # not a per-document value
    assert per_document(samples, {"acc/none": 0.4}) == {}  # an aggregate that is not the mean: not kept


def test_finished_runs_gain_benchmarks_on_their_saved_models_without_training_again(
    two_seeds, tmp_path, monkeypatch, caplog
):
    import shutil

    from ila import evaluation
    from ila.strategy_report import render_markdown

    tmp, report = two_seeds
    monkeypatch.setenv("ILA_CACHE", str(tmp_path / "cache"))
    shutil.copytree(tmp / "s", tmp_path / "s")
    path = tmp / "run" / "stage2" / "ranking.json"
    ranking = Ranking.load(path)
    runs = [Strategy("all", "all", 1.0, tuple(ranking.order)),
            Strategy("ila-top-25", "ila-top", 0.25, tuple(ranking.top(0.25)))]  # fmt: skip
    monkeypatch.setattr(strategies, "_run_strategy", lambda *a: pytest.fail("a finished run ran again"))
    scored = []
    real = evaluation.benchmark_model
    monkeypatch.setattr(
        evaluation, "benchmark_model", lambda cfg, m, *a, **k: scored.append(m) or real(cfg, m, *a, **k)
    )
    call = dict(strategies=runs, isolate=False, data=tmp / "run" / "data", tasks=("ila_mmlu_dev",))
    out = run_strategies(report["cfg"], path, tmp_path / "s", limit=4, **call)
    assert len(scored) == 5 and scored.count(None) == 1  # the four runs (both seeds) and the base model
    key = "ila_mmlu_dev:acc/none"
    for row in out["results"]:
        saved = json.loads((tmp_path / "s" / row["run"] / "result.json").read_text())
        assert saved["benchmark_settings"]["ila_mmlu_dev"] == {"limit": 4}
        assert 0 < saved["benchmarks"]["ila_mmlu_dev"]["acc_stderr/none"] < 1  # lm-eval's standard error
        ex = saved["benchmark_examples"]["ila_mmlu_dev"]["acc/none"]
        assert len(ex["sums"]) == 4 and sum(ex["sums"]) / 4 == saved["benchmarks"]["ila_mmlu_dev"]["acc/none"]
    assert (tmp_path / "s" / "base" / "benchmarks.json").is_file()
    vs = out["strategies"]["ila-top-25"]["benchmarks"][key]["vs_all"]
    assert vs["interval_over"] == "seeds" and len(vs["per_seed"]) == 2
    md = render_markdown(out, "x")
    assert "| base (untuned) |" in md and key in md
    scored.clear()  # the same settings again: nothing to score
    run_strategies(report["cfg"], path, tmp_path / "s", limit=4, **call)
    assert scored == []
    # a result restored without its model (results are kept, adapters are not): left unscored, and said so
    shutil.rmtree(tmp_path / "s" / "ila-top-25-seed1" / "stage3" / "adapter")
    scored.clear()
    out = run_strategies(report["cfg"], path, tmp_path / "s", limit=2, **{**call, "strategies": runs[1:]})
    assert len(scored) == 2 and None in scored  # ila-top-25 seed 0 and the base model, at the new limit
    settings = {r["run"]: r["benchmark_settings"]["ila_mmlu_dev"] for r in out["results"]}
    assert settings == {"ila-top-25-seed0": {"limit": 2}, "ila-top-25-seed1": {"limit": 4}}
    assert "benchmarks" not in out["strategies"]["ila-top-25"]  # two limits: not averaged together
    assert "not benchmarked" in caplog.text


def test_a_task_whose_data_cannot_be_had_fails_before_any_training(two_seeds, tmp_path, monkeypatch):
    from ila import lm_eval_tasks

    tmp, report = two_seeds
    monkeypatch.setenv("ILA_CACHE", str(tmp_path / "cache"))  # no bigbench archive there

    def unreachable(name, version, folder):
        raise IlaError(f"could not download {name}-{version}.tar.gz")

    monkeypatch.setattr(lm_eval_tasks, "download_sdist", unreachable)
    monkeypatch.setattr(strategies, "_run_strategy", lambda *a: pytest.fail("trained before the tasks"))
    with pytest.raises(IlaError, match="bigbench-1.0.0"):
        run_strategies(report["cfg"], tmp / "run" / "stage2" / "ranking.json", tmp_path / "s", isolate=False,
                       data=tmp / "run" / "data", tasks=("ila_mmlu_dev", "ila_hhh"), limit=2)  # fmt: skip
    assert not any((tmp_path / "s").glob("*-seed*"))


def test_a_run_trained_with_benchmarks_asked_for_is_scored_before_the_next_one_trains(
    two_seeds, tmp_path, monkeypatch
):
    # adapters do not outlive a machine: a comparison cut off after its first run must keep that run's scores
    import shutil

    tmp, report = two_seeds
    path = tmp / "run" / "stage2" / "ranking.json"
    ranking = Ranking.load(path)
    runs = [Strategy("all", "all", 1.0, tuple(ranking.order)),
            Strategy("ila-top-25", "ila-top", 0.25, tuple(ranking.top(0.25)))]  # fmt: skip
    events = []

    def trained(cfg, strat, ranking_path, folder, *rest):  # the fixture's finished run, copied in
        events.append(("train", strat.run))
        if strat.run != "all-seed0":  # the first run's score is on disk before the next run trains
            first = json.loads((folder.parent / "all-seed0" / "result.json").read_text())
            assert first["benchmarks"] == {"ila_mmlu_dev": {"acc/none": 0.5}}
        shutil.copytree(tmp / "s" / strat.run, folder)
        return json.loads((folder / "result.json").read_text())

    def scored(cfg, record, model, settings, samples):
        events.append(("score", record.get("run", "base")))
        assert model is None or model.is_dir()
        if record.get("benchmarks"):
            return False  # scored already
        record["benchmarks"] = {"ila_mmlu_dev": {"acc/none": 0.5}}
        return True

    monkeypatch.setattr(strategies, "_run_strategy", trained)
    monkeypatch.setattr(strategies, "fill_benchmarks", scored)
    run_strategies(report["cfg"], path, tmp_path / "s", strategies=runs, isolate=False,
                   data=tmp / "run" / "data", tasks=("ila_mmlu_dev",), limit=2)  # fmt: skip
    assert events[:4] == [("train", "all-seed0"), ("score", "all-seed0"),
                          ("train", "ila-top-25-seed0"), ("score", "ila-top-25-seed0")]  # fmt: skip
    assert ("score", "base") in events[4:] and all(e[0] == "score" for e in events[4:])
    # a run that finished in an earlier call, unscored, is scored before anything else trains
    again = tmp_path / "again"
    shutil.copytree(tmp / "s" / "all-seed0", again / "all-seed0")
    events.clear()
    run_strategies(report["cfg"], path, again, strategies=runs, isolate=False,
                   data=tmp / "run" / "data", tasks=("ila_mmlu_dev",), limit=2)  # fmt: skip
    assert events[:2] == [("score", "all-seed0"), ("train", "ila-top-25-seed0")]
    assert json.loads((again / "all-seed0" / "result.json").read_text())["benchmarks"]


def test_an_equal_time_run_gets_the_steps_that_fill_alls_training_time(caplog):
    layers = ("a", "b", "c", "d")
    runs = [Strategy("all", "all", 1.0, layers, seed=s) for s in (0, 1)]
    runs += [Strategy("ila-top-25", "ila-top", 0.25, layers[:1], seed=s) for s in (0, 1)]
    runs += [Strategy("first-25", "first", 0.25, layers[:1]), Strategy("last-25", "last", 0.25, layers[-1:])]

    # kept step times that say the opposite: only the times measured back to back count
    results = [{"run": r, "steps": 400, "median_step_seconds": 1.0} for r in
               ("all-seed0", "ila-top-25-seed0", "ila-top-25-seed1", "first-25-seed0")]  # fmt: skip
    timed = {"ila-top-25-seed0": (4.02, 4.26), "first-25-seed0": (4.5, 4.26)}
    asked = []
    step_times = lambda s: asked.append(s.run) or timed[s.run]  # noqa: E731
    longer = equal_time_strategies(runs, results, ["ila-top-25", "first-25", "last-25", "all"], step_times)
    assert [(s.run, s.steps) for s in longer] == [("ila-top-25-equal-time-seed0", 423)]  # 400 x 4.26 / 4.02
    (only,) = longer
    assert only.family == "equal-time" and only.layers == layers[:1]
    assert only.reference_seconds == pytest.approx(400 * 4.26)
    assert "ila-top-25-seed1: it or all-seed1 has not finished" in caplog.text  # nothing to time against
    assert "last-25-seed0: it or all-seed0 has not finished" in caplog.text
    assert "a step takes 4.50 s" in caplog.text  # slower than all: no longer run
    assert asked == ["ila-top-25-seed0", "first-25-seed0"]  # nothing timed for a run that is left out
    with pytest.raises(IlaError, match="no strategy matches"):
        equal_time_strategies(runs, results, ["ila-top-33"], step_times)
    assert only.timed_step_seconds == (4.02, 4.26)
    # a finished equal-time run keeps the steps it ran, and nothing is timed for it again
    ran = {"run": "ila-top-25-equal-time-seed0", "steps": 423, "reference_seconds": 1704.0,
           "timed_step_seconds": [4.02, 4.26]}  # fmt: skip
    again = equal_time_strategies(runs, [*results, ran], ["ila-top-25"], lambda s: pytest.fail("timed again"))
    assert [(s.run, s.steps, s.reference_seconds, s.timed_step_seconds) for s in again] == [
        ("ila-top-25-equal-time-seed0", 423, 1704.0, (4.02, 4.26))
    ]


def test_kept_step_times_are_measured_once_per_settings(tmp_path, monkeypatch):
    from ila.strategy_plan import kept_step_times

    path = tmp_path / ".timing" / "ila-top-25-seed0.json"
    measured = []
    measure = lambda: measured.append(1) or (len(measured) * 1.0, 2.0)  # noqa: E731
    assert kept_step_times(path, "a", measure) == (1.0, 2.0)
    assert kept_step_times(path, "a", measure) == (1.0, 2.0) and len(measured) == 1  # kept: not timed again
    assert kept_step_times(path, "b", measure) == (2.0, 2.0)  # other settings: timed again
    monkeypatch.setattr(strategy_plan, "TIMING_STEPS", strategy_plan.TIMING_STEPS + 1)
    assert kept_step_times(path, "b", measure) == (3.0, 2.0)  # timed over other steps: again


def test_an_equal_time_run_trained_again_elsewhere_gets_the_steps_it_had(tmp_path):
    """Retrained in another folder (to score its benchmarks), an equal-time run is sized from the step times
    it was sized from, not timed anew into a run of other length."""
    from ila.strategy_plan import kept_step_times, restore_step_timings, step_timing_path

    kept = tmp_path / "kept"
    for run, family, timed in (("ila-top-25-equal-time-seed0", "equal-time", [3.9, 5.15]),
                               ("ila-top-25-equal-time-seed1", "equal-time", None),  # sized untimed
                               ("ila-top-25-seed0", "ila-top", [1.0, 1.0])):  # fmt: skip
        (kept / run).mkdir(parents=True)
        name, seed = run.rsplit("-seed", 1)
        result = {"name": name, "run": run, "family": family, "seed": int(seed), "settings_sha256": "a"}
        (kept / run / "result.json").write_text(json.dumps({**result, "timed_step_seconds": timed}))
    out = tmp_path / "benchmarks"
    assert restore_step_timings(kept, out) == [step_timing_path(out, "ila-top-25-seed0")]
    never = lambda: pytest.fail("timed again")  # noqa: E731
    times = kept_step_times(step_timing_path(out, "ila-top-25-seed0"), "a", never)
    assert times == (3.9, 5.15)
    layers = ("a", "b", "c", "d")
    runs = [Strategy("all", "all", 1.0, layers), Strategy("ila-top-25", "ila-top", 0.25, layers[:1])]
    results = [{"run": r, "steps": 400} for r in ("all-seed0", "ila-top-25-seed0")]
    (longer,) = equal_time_strategies(runs, results, ["ila-top-25"], lambda s: times)
    assert longer.steps == 528  # 400 x 5.15 / 3.9, as the kept run
    # what the folder already holds is its own: kept, not replaced
    assert restore_step_timings(kept, out) == []


def test_equal_time_runs_train_their_longer_schedule_beside_the_others(two_seeds, tmp_path, monkeypatch):
    import shutil

    from ila.strategy_report import render_markdown

    tmp, report = two_seeds
    shutil.copytree(tmp / "s", tmp_path / "s", ignore=shutil.ignore_patterns("stage3"))
    path = tmp / "run" / "stage2" / "ranking.json"
    ranking = Ranking.load(path)
    runs = [Strategy("all", "all", 1.0, tuple(ranking.order)),
            Strategy("ila-top-25", "ila-top", 0.25, tuple(ranking.top(0.25)))]  # fmt: skip
    timed = []
    real = strategies._time_steps

    def time_steps(cfg, strat, ranking_path, folder, *rest):  # really timed, then fixed for the sizing
        seconds = real(cfg, strat, ranking_path, folder, *rest)
        timed.append((strat.run, len(strat.layers), seconds > 0, folder.exists()))
        return 2.0 if strat.name == "all" else 1.0

    monkeypatch.setattr(strategy_plan, "TIMING_STEPS", 2)
    monkeypatch.setattr(strategies, "_time_steps", time_steps)
    with monkeypatch.context() as mp, pytest.raises(IlaError, match="no strategy matches"):
        mp.setattr(strategies, "_run_strategy", lambda *a: pytest.fail("trained before the typo was seen"))
        run_strategies(report["cfg"], path, tmp_path / "typo", strategies=runs, isolate=False,
                       data=tmp / "run" / "data", equal_time=["ila-tpo-*"])  # fmt: skip
    out = run_strategies(report["cfg"], path, tmp_path / "s", strategies=runs, isolate=False,
                         data=tmp / "run" / "data", equal_time=["ila-top-*"])  # fmt: skip
    n = len(ranking.order)
    assert timed == [("ila-top-25-seed0", len(runs[1].layers), True, False), ("all-seed0", n, True, False)]
    longer = [r for r in out["results"] if r["name"] == "ila-top-25-equal-time"]
    assert [(r["run"], r["steps"]) for r in longer] == [("ila-top-25-equal-time-seed0", 4)]  # 2 x 2.0 / 1.0
    assert longer[0]["reference_seconds"] == 4.0
    assert [c["step"] for c in longer[0]["heldout_curve"]] == [1, 2, 3, 4]
    summary = out["strategies"]["ila-top-25-equal-time"]
    assert summary["vs_all"]["per_seed"] == pytest.approx([longer[0]["heldout_loss"] - next(
        r["heldout_loss"] for r in out["results"] if r["run"] == "all-seed0")])  # fmt: skip
    md = render_markdown(out, "x")
    assert "| ila-top-25-equal-time | 1 |" in md and "ila-top-25-equal-time-seed0: 4 steps" in md
    # a later call without --equal-time still reports the finished equal-time run beside its strategy
    monkeypatch.setattr(strategies, "_run_strategy", lambda *a: pytest.fail("a finished run ran again"))
    again = run_strategies(report["cfg"], path, tmp_path / "s", strategies=runs, isolate=False,
                           data=tmp / "run" / "data")  # fmt: skip
    assert again["strategies"]["ila-top-25-equal-time"]["vs_all"] == summary["vs_all"]
    assert longer[0]["timed_step_seconds"] == [1.0, 2.0] and "(1.00 s a step, all's 2.00 s)" in md
    # --equal-time again: the finished run is reported as it ran, with nothing timed or trained
    monkeypatch.setattr(strategies, "_time_steps", lambda *a: pytest.fail("timed again"))
    (tmp_path / "s" / ".timing" / "ila-top-25-seed0.json").unlink()  # kept times aside: the result suffices
    third = run_strategies(report["cfg"], path, tmp_path / "s", strategies=runs, isolate=False,
                           data=tmp / "run" / "data", equal_time=["ila-top-*"])  # fmt: skip
    assert third["strategies"]["ila-top-25-equal-time"]["vs_all"] == summary["vs_all"]


def test_a_stop_ends_the_isolated_fine_tune_too():
    """Ctrl-C or a SIGTERM sent to ``ila compare-strategies`` alone stops the process that fine-tunes: the
    stop takes effect at once instead of after the whole fine-tune, and nothing writes on afterwards."""
    import multiprocessing
    import os
    import signal
    import threading
    import time

    # a real signal, as the user's: it wakes the main thread from its wait on the result
    threading.Timer(2.0, os.kill, (os.getpid(), signal.SIGINT)).start()
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        strategies._in_own_process(time.sleep, 30)
    assert time.monotonic() - started < 20
    assert not multiprocessing.active_children()
    assert strategies._in_own_process(divmod, 7, 2) == (3, 1)  # and a finished call returns its result
