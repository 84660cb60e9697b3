"""ILA over full-weight updates, and selective full fine-tuning."""

from __future__ import annotations

import copy
import json

import torch
from conftest import TINY_OVERRIDES, make_model
from safetensors.torch import load_file

from ila.config import load_config
from ila.gates import LayerGates, attach_update_gates
from ila.layers import adaptable_layers
from ila.pipeline import run_all
from ila.ranking import Ranking


def test_full_update_gates_at_one_and_zero():
    base = make_model()
    # lm_head is tied to the input embeddings here, so its full update would change the inputs too.
    names = [layer.name for layer in adaptable_layers(base)]
    trained = copy.deepcopy(base)
    torch.manual_seed(2)
    modules = dict(trained.named_modules())
    for n in names:
        modules[n].weight.data += 0.05 * torch.randn_like(modules[n].weight)
    base_modules = dict(base.named_modules())
    deltas = {n: modules[n].weight.detach() - base_modules[n].weight.detach() for n in names}
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        want_trained = trained(input_ids=ids).logits
        want_base = base(input_ids=ids).logits
    gated = copy.deepcopy(base)
    gates = LayerGates(names)
    hooks = attach_update_gates(gated, gates, deltas)
    with torch.no_grad():
        gates.set_fixed(0.0)
        assert torch.equal(gated(input_ids=ids).logits, want_base)
        gates.set_fixed(1.0)
        # W_0 x + Delta x equals W_T x up to float rounding of the split product.
        torch.testing.assert_close(gated(input_ids=ids).logits, want_trained, rtol=1e-4, atol=1e-4)
    hooks.remove()
    assert not any(hasattr(m, "ila_delta") for m in gated.modules())


def test_full_fine_tuning_run(tmp_path, tiny_model_dir, tiny_data_file):
    from transformers import AutoModelForCausalLM

    cfg = load_config(None, TINY_OVERRIDES(tiny_model_dir, tiny_data_file) + [
        "stage1.method=full", "stage3.method=full", "stage1.train.learning_rate=1e-3",
        "stage3.train.learning_rate=1e-3", "stage3.selection.mode=drop_bottom", "stage3.selection.fraction=0.25"])
    out = run_all(cfg, tmp_path)
    meta = json.loads((tmp_path / "stage1" / "final" / "ila_adapter.json").read_text())
    assert meta["method"] == "full"
    assert set(load_file(tmp_path / "stage1" / "milestones" / "050" / "layers.safetensors")) == set(meta["layers"])
    stability = [json.loads(x) for x in (tmp_path / "stage1" / "stability.jsonl").read_text().splitlines()]
    assert stability and all(r["relative_change"] > 0 for r in stability)
    ranking = Ranking.load(tmp_path / "stage2" / "ranking.json")
    assert ranking.num_layers == 28 and ranking.meta["method"] == "full"

    # Selective full fine-tuning changed the selected weights and nothing else.
    selected = set(json.loads((tmp_path / "stage3" / "selection.json").read_text())["layers"])
    assert len(selected) == 21
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tuned = AutoModelForCausalLM.from_pretrained(tmp_path / "stage3" / "model")
    tuned_params = dict(tuned.named_parameters())
    changed = {n.rsplit(".", 1)[0] for n, p in base.named_parameters() if not torch.equal(p, tuned_params[n])}
    assert changed == selected
    assert out["stage3"]["model"].endswith("model")
