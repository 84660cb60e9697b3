"""The ranking artefact: strict round trip, refusals, selections."""

from __future__ import annotations

import json

import pytest

from ila.errors import RankingError
from ila.layers import Layer
from ila.ranking import Ranking


def _ranking(n_blocks=4, include_lm_head=False, scores=None, model_type="llama"):
    types = ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"]
    layers = [
        Layer(f"model.layers.{b}.{t}", f"model.layers.{b}", b, t) for b in range(n_blocks) for t in types
    ]
    if include_lm_head:
        layers.append(Layer("lm_head", None, None, "lm_head"))
    if scores is None:
        scores = {layer.name: float((i * 7) % len(layers)) / 3 - 1 for i, layer in enumerate(layers)}
    base = {"name": "tiny", "model_type": model_type, "num_hidden_layers": n_blocks, "hidden_size": 64}
    return Ranking(scores=scores, layers=layers, base_model=base, include_lm_head=include_lm_head)


def test_round_trip(tmp_path):
    r = _ranking(include_lm_head=True)
    path = r.save(tmp_path / "ranking.json")
    back = Ranking.load(path)
    assert back.scores == r.scores and back.order == r.order and back.layers == r.layers
    data = json.loads(path.read_text())
    assert data["schema_version"] == 1 and data["num_layers"] == 13 and data["include_lm_head"] is True
    assert set(data["blocks"]) == {f"model.layers.{b}" for b in range(4)} | {"lm_head"}
    assert sorted(d["rank"] for d in data["layers"].values()) == list(range(1, 14))


def test_order_and_selections():
    r = _ranking()
    order = r.order
    assert [r.scores[n] for n in order] == sorted(r.scores.values(), reverse=True)
    assert r.top(0.25) == order[:3]
    assert r.drop_bottom(0.25) == order[:9]
    assert r.bottom(0.25) == order[-3:]
    assert r.top(0.01) == order[:1]  # at least one layer
    assert r.select("list", layers=[order[5], order[1]]) == [order[1], order[5]]
    with pytest.raises(RankingError, match="match no layer"):
        r.select("list", layers=["model.layers.9.self_attn.q_proj"])


def test_refuses_nan_and_writes_no_nan(tmp_path):
    r = _ranking()
    name = r.layers[0].name
    with pytest.raises(RankingError, match="finite"):
        _ranking(scores={**r.scores, name: float("nan")})
    path = r.save(tmp_path / "r.json")
    text = path.read_text().replace(f'"score": {r.scores[name]}', '"score": NaN', 1)
    (tmp_path / "nan.json").write_text(text)
    with pytest.raises(RankingError, match="NaN"):
        Ranking.load(tmp_path / "nan.json")


def test_refuses_unknown_schema_and_other_kinds(tmp_path):
    data = _ranking().to_dict()
    data["schema_version"] = 99
    (tmp_path / "v99.json").write_text(json.dumps(data))
    with pytest.raises(RankingError, match="schema_version 99"):
        Ranking.load(tmp_path / "v99.json")
    (tmp_path / "other.json").write_text(json.dumps({"kind": "something"}))
    with pytest.raises(RankingError, match="not an ila ranking"):
        Ranking.load(tmp_path / "other.json")
    (tmp_path / "cut.json").write_text(json.dumps(_ranking().to_dict())[:200])
    with pytest.raises(RankingError, match="not valid JSON"):
        Ranking.load(tmp_path / "cut.json")
    data = _ranking().to_dict()
    data["order"] = list(reversed(data["order"]))
    (tmp_path / "edited.json").write_text(json.dumps(data))
    with pytest.raises(RankingError, match="order"):
        Ranking.load(tmp_path / "edited.json")


def test_refuses_rankings_of_another_model():
    r = _ranking(n_blocks=4)
    other = _ranking(n_blocks=6)
    with pytest.raises(RankingError, match="another model"):
        r.check_matches(other.layers, other.base_model)
    with pytest.raises(RankingError, match="differ"):
        r.check_matches(_ranking(include_lm_head=True).layers)
    r.check_matches(_ranking().layers, _ranking().base_model)


def test_block_aggregates():
    r = _ranking()
    agg = r.block_aggregates()
    assert sorted(a["rank"] for a in agg.values()) == [1, 2, 3, 4]
    for block, a in agg.items():
        names = [layer.name for layer in r.layers if layer.block == block]
        assert a["mean_score"] == pytest.approx(sum(r.scores[n] for n in names) / len(names))


def test_only_an_ila_ranking_carries_gates(tmp_path):
    """sigmoid of an SNR or a random number is no gate: ranking.json and the block aggregates hold gates only
    for scores that are gate logits."""
    from ila.layers import Layer

    layers = [Layer(f"b.{i}.q", f"b.{i}", i, "q") for i in range(3)]
    scores = {layer.name: float(i) for i, layer in enumerate(layers)}
    for scorer, has_gates in (("ila", True), ("snr", False)):
        r = Ranking(scores=scores, layers=layers, base_model={}, include_lm_head=False, scorer=scorer)
        d = r.to_dict()
        assert all(("gate" in v) == has_gates for v in d["layers"].values())
        assert all(("mean_gate" in v) == has_gates for v in d["blocks"].values())
        assert (r.gates() is not None) == has_gates
        r.save(tmp_path / f"{scorer}.json")
        assert Ranking.load(tmp_path / f"{scorer}.json").scores == scores
