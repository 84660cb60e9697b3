"""The Spectrum export: ILA's scores where axolotl's SpectrumPlugin looks for SNR results, and a status that
says how the plugin's choice compares with the selection.

axolotl itself is not installed (it needs Python >= 3.12 and pulls a CUDA torch). These tests read the
written files the way the plugin's source does, transcribed below from axolotl
``src/axolotl/integrations/spectrum/__init__.py`` (``SpectrumPlugin.pre_model_load`` without the GitHub
download, and ``_generate_unfrozen_params_yaml`` verbatim), and apply axolotl's freeze rule
(``utils/freeze.py``, ``LayerNamePattern``) to the tiny model's real parameters.
"""

from __future__ import annotations

import json
import re

import pytest
import yaml
from conftest import make_model

from ila.export import export_selection, render_export
from ila.layers import adaptable_layers
from ila.models import model_identity
from ila.ranking import Ranking


def _generate_unfrozen_params_yaml(snr_data, top_fraction=0.5):
    """axolotl integrations/spectrum/__init__.py, verbatim."""
    unfrozen_parameters = {}
    for layer_name, info in snr_data.items():
        layer_type = info["type"]
        if layer_type not in unfrozen_parameters:
            unfrozen_parameters[layer_type] = []
        unfrozen_parameters[layer_type].append((layer_name, info["snr"]))
    top_layers_by_type = {}
    for layer_type, layers in unfrozen_parameters.items():
        layers_sorted = sorted(layers, key=lambda x: x[1], reverse=True)
        num_top_layers = int(len(layers) * top_fraction)
        top_layers_by_type[layer_type] = [layer[0] for layer in layers_sorted[:num_top_layers]]
    unfrozen_parameters = [
        "^lm_head.weight$",
        "^model.embed_tokens.weight$",
    ]
    for _, layer_names in top_layers_by_type.items():
        for layer_name in layer_names:
            unfrozen_parameters.append(layer_name)
    return unfrozen_parameters


def _pre_model_load(cfg):
    """SpectrumPlugin.pre_model_load up to cfg["unfrozen_parameters"], reading the local file only (the
    working directory is the export folder)."""
    if cfg.get("spectrum_model_name"):
        model_name = cfg["spectrum_model_name"]
    else:
        model_name = cfg["base_model"]
    top_fraction = cfg.get("spectrum_top_fraction", 50)
    model_slug = model_name.replace("/", "-").replace("_", "-")
    snr_path = "./model_snr_results/" + f"snr_results_{model_slug}.json"
    with open(snr_path, encoding="utf-8") as fin:
        snr_data = json.load(fin)
    return _generate_unfrozen_params_yaml(snr_data, top_fraction=top_fraction)


def _axolotl_trains(patterns, model):
    """utils/freeze.py freeze_layers_except: '.' not followed by '+' escaped, re.match on parameter names."""
    compiled = [re.compile(re.sub(r"\.(?!\+)", "\\.", p)) for p in patterns]
    return {n for n, _ in model.named_parameters() if any(c.match(n) for c in compiled)}


def _untied_model():
    from transformers import LlamaForCausalLM

    config = make_model().config
    config.tie_word_embeddings = False
    return LlamaForCausalLM(config)


def _ranking(model, score, name="tiny", include_lm_head=False):
    layers = adaptable_layers(model, include_lm_head=include_lm_head)
    return Ranking(
        scores={x.name: float(score(i, x)) for i, x in enumerate(layers)},
        layers=layers,
        base_model=model_identity(model, name),
        include_lm_head=include_lm_head,
    )


def _selected_params(model, names):
    """The selected layers' weights as named_parameters() lists them (a tied lm_head under the embedding)."""
    modules = dict(model.named_modules())
    listed = {id(p): n for n, p in model.named_parameters()}
    return {listed[id(modules[n].weight)] for n in names}


def _plugin_on(out, model, monkeypatch):
    cfg = yaml.safe_load((out / "axolotl.spectrum.yaml").read_text())
    monkeypatch.chdir(out)
    return cfg, _axolotl_trains(_pre_model_load(cfg), model)


def test_plugin_finds_ila_scores_in_the_export_folder(tmp_path, monkeypatch):
    model = make_model()
    ranking = _ranking(model, lambda i, x: (i * 7) % 28 - 10.5, name="HuggingFaceTB/SmolLM2_135M-Instruct")
    out = tmp_path / "out"
    summary = export_selection(ranking, ranking.top(0.25), out, mode="top", fraction=0.25)
    cfg = yaml.safe_load((out / "axolotl.spectrum.yaml").read_text())
    assert cfg["plugins"] == ["axolotl.integrations.spectrum.SpectrumPlugin"]
    assert cfg["spectrum_top_fraction"] == 0.25
    assert cfg["base_model"] == "HuggingFaceTB/SmolLM2_135M-Instruct"

    monkeypatch.chdir(out)
    cfg_name = cfg["spectrum_model_name"].replace("/", "-").replace("_", "-")
    with open(f"./model_snr_results/snr_results_{cfg_name}.json", encoding="utf-8") as f:
        snr = json.loads(f.read(), parse_constant=lambda c: pytest.fail(f"non-strict JSON {c}"))
    # every ranked layer, ranked by ILA's score under "snr", grouped by its module type
    assert list(snr) == [x.name for x in ranking.layers]
    assert {n: e["snr"] for n, e in snr.items()} == ranking.scores
    assert {n: e["type"] for n, e in snr.items()} == {x.name: x.module_type for x in ranking.layers}
    assert _pre_model_load(cfg)  # the plugin's own reading of the file works

    entry = summary["formats"]["model_snr_results/snr_results_<model>.json"]
    assert entry["file"] == "model_snr_results/snr_results_HuggingFaceTB-SmolLM2-135M-Instruct.json"
    assert entry["file"] in summary["written"] and "ILA's importance score" in entry["note"]
    assert entry["file"] in render_export(summary)
    assert "ILA's importance score" in summary["formats"]["axolotl.spectrum.yaml"]["note"]


def _aligned(i, x):
    """Each module type's best layer sits in another block: the global top 7 is one layer per type."""
    if x.block_index is None:
        return -100.0  # lm_head, selected (or not) by name
    t = sorted({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}).index(
        x.module_type.rsplit(".", 1)[-1]
    )
    return 10.0 + t if x.block_index == t % 4 else float(t) / 10 - x.block_index


def _concentrated(i, x):
    """down_proj and q_proj above everything: a global top-k takes them only."""
    return {"mlp.down_proj": 100.0, "self_attn.q_proj": 50.0}.get(x.module_type, 0.0) + i / 100


def _case(name, model):
    """(ranking, selection, mode, fraction) of each case."""
    if name == "aligned":
        ranking = _ranking(model, _aligned)
        return ranking, ranking.top(0.25), "top", 0.25
    if name == "concentrated":
        ranking = _ranking(model, _concentrated)
        return ranking, ranking.top(0.25), "top", 0.25
    ranking = _ranking(model, _aligned, include_lm_head=True)  # with the head: per-type top 1 + lm_head
    per_type = [n for n in ranking.top(7 / 29) if n != "lm_head"][:7]
    return ranking, [*per_type, "lm_head"], "list", None


@pytest.mark.parametrize(
    "case, tied, status",
    [
        ("aligned", True, "approximate"),  # the same layers, plus the embeddings the plugin always trains
        ("concentrated", True, "none"),  # the per-type share misses most of a concentrated top-k
        ("with_head", True, "exact"),  # tied: the embedding the plugin always trains is the selected head
        ("with_head", False, "approximate"),  # untied: the embeddings are extra
    ],
)
def test_status_is_what_the_plugin_would_train(tmp_path, monkeypatch, case, tied, status):
    model = make_model() if tied else _untied_model()
    ranking, names, mode, fraction = _case(case, model)
    summary = export_selection(ranking, names, tmp_path / "out", mode=mode, fraction=fraction)
    entry = summary["formats"]["axolotl.spectrum.yaml"]
    assert summary["formats"]["model_snr_results/snr_results_<model>.json"]["status"] == entry["status"]

    _, trained = _plugin_on(tmp_path / "out", model, monkeypatch)
    selected = _selected_params(model, names)
    really = "exact" if trained == selected else "approximate" if trained > selected else "none"
    assert entry["status"] == really == status
    assert entry["extra"] == len(trained - selected)
    if status != "exact":
        for p in sorted(trained - selected)[:1] + sorted(selected - trained)[:1]:
            assert p in entry["reason"]  # the reason names what differs
    if case == "concentrated":
        # the plugin keeps the same share of each type; ILA's global top-k took two types only
        assert (
            "per module type" in entry["reason"] and "1 of 4 in each of its 7 module types" in entry["reason"]
        )
        assert "mlp.down_proj 4" in entry["reason"]


def test_a_later_export_of_another_model_replaces_the_scores_file(tmp_path):
    out = tmp_path / "out"
    for name in ("org/model_a", "org/model_b"):
        model = make_model()
        ranking = _ranking(model, lambda i, x: float(i), name=name)
        export_selection(ranking, ranking.top(0.25), out, mode="top", fraction=0.25)
    assert sorted(p.name for p in (out / "model_snr_results").iterdir()) == ["snr_results_org-model-b.json"]
