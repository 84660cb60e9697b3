"""Comparing rankings: Jaccard of the top-k against chance, rank correlations, the cross-depth mapping, the
figures and `ila compare`."""

from __future__ import annotations

import json
import math
import re
import sys

import numpy as np
import pytest

from ila.cli import main
from ila.errors import RankingError
from ila.layers import Layer
from ila.overlap import (
    compare_pair,
    compare_rankings,
    depth_bucket,
    expected_random_jaccard,
    jaccard,
    kendall_tau,
    overlap_curve,
    permutation_p_value,
    spearman,
    type_key_depth,
)
from ila.ranking import Ranking

PNG = b"\x89PNG\r\n\x1a\n"
TYPES = ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"]


def _ranking(n_blocks=4, score=None, types=TYPES, lm_head=False, name="tiny", scorer="ila", seed=None):
    """A hand-made ranking; ``score(relative_depth, type_index)`` gives each layer's score."""
    layers = [
        Layer(f"model.layers.{b}.{t}", f"model.layers.{b}", b, t) for b in range(n_blocks) for t in types
    ]
    if lm_head:
        layers.append(Layer("lm_head", None, None, "lm_head"))
    rng = np.random.default_rng(seed)
    scores = {}
    for layer in layers:
        if seed is not None:
            scores[layer.name] = float(rng.normal())
        elif layer.block is None:
            scores[layer.name] = 0.25
        else:
            d = layer.block_index / max(1, n_blocks - 1)
            scores[layer.name] = float(score(d, types.index(layer.module_type)))
    base = {"name": name, "model_type": "llama", "num_hidden_layers": n_blocks, "hidden_size": 64}
    return Ranking(scores=scores, layers=layers, base_model=base, include_lm_head=lm_head, scorer=scorer)


def _shape(d, t):  # an importance profile over relative depth, different per module type
    return math.cos(2.5 * d) * (1.0 + 0.3 * t) + 0.5 * t


# -- set statistics ----------------------------------------------------------------------------------------


def test_jaccard_known_values():
    assert jaccard({1, 2, 3}, {1, 2, 3}) == 1.0
    assert jaccard({1, 2}, {3, 4}) == 0.0
    assert jaccard({1, 2, 3}, {2, 3, 4}) == 0.5
    assert jaccard(set(), set()) == 1.0
    assert jaccard({"a"}, set()) == 0.0


def test_identical_and_disjoint_sets():
    a = set(range(10))
    p = permutation_p_value(a, a, 50)
    assert p == pytest.approx(1 / math.comb(50, 10)) and p < 1e-9
    assert permutation_p_value(a, a, 50, exact=False, rounds=999) == pytest.approx(1 / 1000)
    disjoint = set(range(10, 20))
    assert jaccard(a, disjoint) == 0.0
    assert permutation_p_value(a, disjoint, 50) == 1.0
    assert permutation_p_value(a, disjoint, 50, exact=False, rounds=200) == 1.0
    with pytest.raises(RankingError, match="more than n"):
        permutation_p_value(a, disjoint, 15)


def test_expected_random_jaccard_formula_and_monte_carlo():
    assert expected_random_jaccard(10, 10, 10) == 1.0
    assert expected_random_jaccard(10, 0, 0) == 1.0
    assert expected_random_jaccard(10, 0, 3) == 0.0
    assert expected_random_jaccard(2, 1, 1) == pytest.approx(0.5)  # same item with probability 1/2
    rng = np.random.default_rng(0)
    n, k1, k2 = 40, 8, 12
    draws = [
        jaccard(set(rng.choice(n, k1, replace=False)), set(rng.choice(n, k2, replace=False)))
        for _ in range(20000)
    ]
    assert float(np.mean(draws)) == pytest.approx(expected_random_jaccard(n, k1, k2), abs=0.004)
    with pytest.raises(RankingError):
        expected_random_jaccard(5, 6, 1)


@pytest.mark.parametrize(
    "a,b,n",
    [
        (set(range(10)), set(range(5, 15)), 50),
        (set(range(20)), set(range(14, 40)), 60),
        (set(range(3)), {0, 7}, 12),
    ],
)
def test_exact_and_monte_carlo_p_values_agree(a, b, n):
    exact = permutation_p_value(a, b, n)
    mc = permutation_p_value(a, b, n, exact=False, rounds=20000, seed=3)
    assert mc == pytest.approx(exact, abs=max(0.006, 0.1 * exact))


def test_p_values_of_random_sets_are_not_small():
    rng = np.random.default_rng(1)
    n, k = 60, 15
    ps = np.array(
        [
            permutation_p_value(set(rng.choice(n, k, replace=False)), set(rng.choice(n, k, replace=False)), n)
            for _ in range(400)
        ]
    )
    assert 0.3 < ps.mean() < 0.7
    assert (ps <= 0.05).mean() <= 0.08  # a valid p-value: small no more often than its level (plus noise)


def test_rank_correlations():
    r = _ranking(n_blocks=6, seed=0)
    reverse = {n: -s for n, s in r.scores.items()}
    assert spearman(r, r) == pytest.approx(1.0)
    assert spearman(r, reverse) == pytest.approx(-1.0)
    assert kendall_tau(r, r) == pytest.approx(1.0)
    assert kendall_tau(r.scores, reverse) == pytest.approx(-1.0)
    assert spearman(r, {n: 1.0 for n in r.scores}) is None  # undefined, not NaN
    assert kendall_tau(r, {n: 1.0 for n in r.scores}) is None
    with pytest.raises(RankingError, match="no layer"):
        spearman({"a": 1.0}, {"b": 2.0})


def test_rank_correlations_with_ties_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(2)
    x = rng.integers(0, 8, 60).astype(float)  # many ties
    y = x + rng.integers(0, 4, 60)
    a, b = {str(i): v for i, v in enumerate(x)}, {str(i): v for i, v in enumerate(y)}
    assert spearman(a, b) == pytest.approx(stats.spearmanr(x, y)[0])
    assert kendall_tau(a, b) == pytest.approx(stats.kendalltau(x, y)[0])  # tau-b


# -- comparing rankings -------------------------------------------------------------------------------------


def test_same_model_compares_by_name_and_matches_ranking_top():
    a = _ranking(n_blocks=8, seed=0)
    b = _ranking(n_blocks=8, seed=1)
    out = compare_pair(a, a, (0.1, 0.3))
    assert out["mapping"] == "name" and out["num_keys"] == 24
    assert all(o["jaccard"] == 1.0 and o["intersection"] == a.count(o["fraction"]) for o in out["fractions"])
    out = compare_pair(a, b, (0.1, 0.3, 1.0))
    for o in out["fractions"]:
        f = o["fraction"]
        assert o["jaccard"] == pytest.approx(jaccard(a.top(f), b.top(f)))
        assert o["expected_random"] == pytest.approx(expected_random_jaccard(24, a.count(f), a.count(f)))
    assert out["fractions"][-1]["jaccard"] == 1.0 and out["fractions"][-1]["p_value"] == 1.0


def test_compare_rankings_is_strict_json_and_keyed_by_label():
    rankings = [_ranking(seed=s) for s in range(3)]
    constant = _ranking(score=lambda d, t: 0.0)
    result = compare_rankings([*rankings, constant], ["s0", "s1", "s2", "flat"], (0.25, 0.5))
    text = json.dumps(result, allow_nan=False)  # strict: no NaN anywhere
    back = json.loads(text)
    assert back["kind"] == "ila.compare" and back["schema_version"] == 1
    assert [(p["a"], p["b"]) for p in back["pairs"]][:3] == [("s0", "s1"), ("s0", "s2"), ("s0", "flat")]
    flat = [p for p in back["pairs"] if p["b"] == "flat"]
    assert all(p["spearman"] is None and p["kendall_tau"] is None for p in flat)
    assert set(back["consensus"]) == {"0.25", "0.5"}
    with pytest.raises(RankingError, match="labels must differ"):
        compare_rankings(rankings[:2], ["x", "x"])
    with pytest.raises(RankingError, match="at least two"):
        compare_rankings(rankings[:1])
    with pytest.raises(RankingError, match="fractions"):
        compare_rankings(rankings[:2], fractions=(0.0,))


def test_block_level_uses_block_means():
    a = _ranking(n_blocks=10, score=_shape)
    b = _ranking(n_blocks=10, score=lambda d, t: -_shape(d, t))
    out = compare_pair(a, b, (0.2,), level="block")
    assert out["num_keys"] == 10 and out["fractions"][0]["k"] == 2
    assert out["spearman"] == pytest.approx(-1.0) and out["fractions"][0]["jaccard"] == 0.0
    from ila.overlap import map_rankings

    _, (ka, _), _ = map_rankings([a, b], level="block")
    ranks = {block: agg["rank"] for block, agg in a.block_aggregates().items()}
    assert ka.top(2) == sorted(ranks, key=ranks.get)[:2]  # the blocks of rank 1 and 2


def test_depth_buckets():
    # every block of the smaller model has its own bucket
    assert [depth_bucket(i, 4, 4) for i in range(4)] == [0, 1, 2, 3]
    assert [depth_bucket(i, 6, 4) for i in range(6)] == [0, 0, 1, 2, 3, 3]
    assert depth_bucket(0, 1, 4) == 0


def test_cross_depth_mapping_overlaps_a_stretched_copy():
    shallow = _ranking(n_blocks=4, score=_shape, lm_head=True, name="small")
    deep = _ranking(n_blocks=6, score=_shape, lm_head=True, name="large")  # the same profile, stretched
    noise = _ranking(n_blocks=6, lm_head=True, name="large", seed=5)
    out = compare_pair(shallow, deep, (0.2, 0.3, 0.5))
    assert out["mapping"] == "depth" and out["buckets"] == 4 and out["type_key"] == "last component"
    assert out["module_types"] == ["down_proj", "q_proj", "v_proj"] and out["lm_head"] is True
    assert out["num_keys"] == 4 * 3 + 1 and out["layers_compared"] == [13, 19]
    assert all(o["jaccard"] >= 0.75 and o["p_value"] < 0.05 for o in out["fractions"][:2])
    assert out["spearman"] > 0.9
    noisy = compare_pair(shallow, noise, (0.3,))
    assert noisy["fractions"][0]["jaccard"] < out["fractions"][1]["jaccard"]

    from ila.overlap import depth_keys

    (ks, kd), info = depth_keys([shallow, deep])
    assert set(ks.scores) == set(kd.scores)
    for key in ks.scores:
        assert key == "lm_head" or re.fullmatch(r"depth[0-3]/4\.(q_proj|v_proj|down_proj)", key), key
    # the key's score is the mean of its layers': bucket 0 of the deep model holds blocks 0 and 1
    names = [f"model.layers.{b}.mlp.down_proj" for b in (0, 1)]
    assert kd.scores["depth0/4.down_proj"] == pytest.approx(sum(deep.scores[n] for n in names) / 2)
    (ks, kd), _ = depth_keys([shallow, deep], level="block", buckets=2)
    assert set(ks.scores) == {"depth0/2", "depth1/2", "lm_head"}


def test_cross_depth_needs_common_module_types():
    llama = _ranking(n_blocks=4, score=_shape, lm_head=True)
    gpt2 = _ranking(
        n_blocks=6, score=_shape, lm_head=True, types=["attn.c_attn", "attn.c_proj", "mlp.c_proj"]
    )
    assert type_key_depth([gpt2]) == 2  # c_proj is ambiguous: match by the last two components
    with pytest.raises(RankingError, match="no module type in common"):
        compare_pair(llama, gpt2)
    with pytest.raises(RankingError, match="no module type in common"):
        compare_rankings([llama, llama, gpt2], ["a", "b", "c"])


def test_overlap_curve():
    a, b = _ranking(n_blocks=8, seed=0), _ranking(n_blocks=8, seed=1)
    curve = overlap_curve(a, b, (0.25, 0.5, 1.0))
    assert [c[0] for c in curve] == [0.25, 0.5, 1.0]
    assert curve[-1][1:] == (1.0, 1.0)
    assert curve[0][2] == pytest.approx(expected_random_jaccard(24, 6, 6))


# -- figures and the command line ---------------------------------------------------------------------------


def test_plots_write_png(tmp_path):
    pytest.importorskip("matplotlib")
    from ila.plots import plot_jaccard_matrix, plot_overlap_curve, plot_ranking_heatmap

    a, b = _ranking(n_blocks=5, seed=0, lm_head=True), _ranking(n_blocks=5, seed=1, lm_head=True)
    paths = [
        plot_ranking_heatmap(a, tmp_path / "h.png", label="a", value="gate"),
        plot_jaccard_matrix(compare_rankings([a, b], ["a", "b"], (0.2,)), 0.2, tmp_path / "j.png"),
        plot_overlap_curve(overlap_curve(a, b), tmp_path / "c.png"),
    ]
    for p in paths:
        assert p.read_bytes()[:8] == PNG
    assert sorted(x.name for x in tmp_path.iterdir()) == ["c.png", "h.png", "j.png"]  # no temporary left


def _write(tmp_path, name, ranking):
    path = tmp_path / name / "stage2" / "ranking.json"
    ranking.save(path)
    return str(path)


def test_cli_compare(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    a = _write(tmp_path, "alpaca", _ranking(n_blocks=4, score=_shape, lm_head=True))
    b = _write(
        tmp_path, "lima", _ranking(n_blocks=4, score=lambda d, t: _shape(d, t) + 0.05 * t * d, lm_head=True)
    )
    c = _write(tmp_path, "big", _ranking(n_blocks=6, score=_shape, lm_head=True, name="big"))
    out = tmp_path / "cmp"
    assert main(["compare", a, b, c, "--fractions", "0.2", "0.5", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| alpaca vs lima | name | 13 |" in printed and "big" in printed and str(out) in printed
    data = json.loads((out / "compare.json").read_text())
    assert data["kind"] == "ila.compare" and data["schema_version"] == 1
    assert [p["mapping"] for p in data["pairs"]] == ["name", "depth", "depth"]
    assert [r["label"] for r in data["rankings"]] == ["alpaca", "lima", "big"]
    assert "Spearman" in (out / "compare.md").read_text()
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == [
        "heatmap-alpaca.png",
        "heatmap-big.png",
        "heatmap-lima.png",
        "jaccard-top20.png",
        "jaccard-top50.png",
        "overlap-curve.png",
    ]
    assert all((out / p).read_bytes()[:8] == PNG for p in pngs)
    assert set(data["files"]) == set(pngs) | {"compare.json", "compare.md"}

    # again, at block level and with other fractions: the figures of the first comparison are removed
    assert (
        main(
            [
                "compare",
                a,
                b,
                "--level",
                "block",
                "--fractions",
                "0.25",
                "--labels",
                "x",
                "y",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    data = json.loads((out / "compare.json").read_text())
    assert data["level"] == "block" and data["pairs"][0]["num_keys"] == 5  # 4 blocks + lm_head
    assert sorted(p.name for p in out.glob("*.png")) == [
        "heatmap-x.png",
        "heatmap-y.png",
        "jaccard-top25.png",
        "overlap-curve.png",
    ]

    # default folder: beside the first ranking
    assert main(["compare", a, b, "--no-plots"]) == 0
    assert sorted(p.name for p in (tmp_path / "alpaca" / "stage2" / "compare").iterdir()) == [
        "compare.json",
        "compare.md",
    ]


def test_cli_compare_one_ranking_and_errors(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    a = _write(tmp_path, "a", _ranking(seed=0))
    assert main(["compare", a, "--out", str(tmp_path / "one")]) == 0
    assert [p.name for p in (tmp_path / "one").iterdir()] == ["heatmap-ranking.png"]
    capsys.readouterr()
    assert main(["compare", a, a, "--labels", "only-one"]) == 2
    assert "labels" in capsys.readouterr().err
    gpt2 = _write(tmp_path, "g", _ranking(n_blocks=6, score=_shape, types=["attn.c_attn", "mlp.c_fc"]))
    assert main(["compare", a, gpt2, "--out", str(tmp_path / "x")]) == 2
    assert "no module type in common" in capsys.readouterr().err


def test_cli_compare_without_matplotlib(tmp_path, capsys, monkeypatch):
    a = _write(tmp_path, "a", _ranking(seed=0))
    b = _write(tmp_path, "b", _ranking(seed=1))
    for mod in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    assert main(["compare", a, b, "--out", str(tmp_path / "c")]) == 0
    assert "pip install 'ila[plots]'" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["compare.json", "compare.md"]
