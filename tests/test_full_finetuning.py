"""ILA over full-weight updates, and selective full fine-tuning."""

from __future__ import annotations

import copy
import json

import pytest
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


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_model_dir, tiny_data_file):
    cfg = load_config(
        None,
        TINY_OVERRIDES(tiny_model_dir, tiny_data_file)
        + [
            "stage1.method=full",
            "stage3.method=full",
            "stage1.train.learning_rate=1e-3",
            "stage3.train.learning_rate=1e-3",
            "stage3.selection.mode=drop_bottom",
            "stage3.selection.fraction=0.25",
        ],
    )
    run_dir = tmp_path_factory.mktemp("full")
    return cfg, run_dir, run_all(cfg, run_dir)


def test_full_fine_tuning_run(full_run, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    cfg, tmp_path, out = full_run
    meta = json.loads((tmp_path / "stage1" / "final" / "ila_adapter.json").read_text())
    assert meta["method"] == "full"
    assert set(load_file(tmp_path / "stage1" / "milestones" / "050" / "layers.safetensors")) == set(
        meta["layers"]
    )
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


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(
        GPT2Config(
            vocab_size=320,
            n_positions=64,
            n_embd=32,
            n_layer=2,
            n_head=4,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
    )


def test_a_full_update_with_biases_is_saved_loaded_and_gated_whole(tmp_path):
    """GPT-2's projections have biases, which full fine-tuning trains: Delta_i must carry them, or the gates
    at 1 are not the fine-tuned model."""
    from ila.adapters import AdapterMeta, load_full_updates, save_adapter
    from ila.selection import apply_selection

    base = _tiny_gpt2()
    names = [layer.name for layer in adaptable_layers(base)]
    assert len(names) == 8 and all(dict(base.named_modules())[n].bias is not None for n in names)
    trained = apply_selection(copy.deepcopy(base), names, method="full")
    opt = torch.optim.SGD([p for p in trained.parameters() if p.requires_grad], lr=0.5)
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        trained(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    moved = [
        n
        for n in names
        if not torch.equal(dict(trained.named_modules())[n].bias, dict(base.named_modules())[n].bias)
    ]
    assert moved == names  # the biases were trained
    save_adapter(
        trained, tmp_path / "milestone", AdapterMeta(kind="ila.stage1_adapter", method="full", layers=names)
    )
    deltas = load_full_updates(tmp_path / "milestone", base, names)

    gated = copy.deepcopy(base)
    gates = LayerGates(names)
    hooks = attach_update_gates(gated, gates, deltas)
    with torch.no_grad():
        want_trained = trained(input_ids=ids).logits
        gates.set_fixed(1.0)
        torch.testing.assert_close(gated(input_ids=ids).logits, want_trained, rtol=1e-4, atol=1e-4)
        gates.set_fixed(0.0)
        assert torch.equal(gated(input_ids=ids).logits, base(input_ids=ids).logits)
    hooks.remove()
    assert not any(hasattr(m, "ila_delta_bias") for m in gated.modules())

    # The update-norm scorer counts the bias update too.
    from ila.scoring import ScoringInputs, score_layers
    from ila.stability import bias_key

    layers = adaptable_layers(base)
    norms, _ = score_layers("update-norm", ScoringInputs(model=base, layers=layers, deltas=deltas))
    for n in names:
        expect = (deltas[n].pow(2).sum() + deltas[bias_key(n)].pow(2).sum()).sqrt()
        assert norms[n] == pytest.approx(float(expect), rel=1e-5)


def test_evaluate_and_compare_strategies_read_a_full_stage3_model(full_run, tmp_path):
    """With stage3.method: full the result is stage3/model, not an adapter: evaluation must score that model
    (not fall back to the stage-1 update), and a strategy comparison must fine-tune and score models too."""
    from ila.evaluation import evaluate_run, heldout_loss
    from ila.models import load_base_model, load_tokenizer
    from ila.strategies import run_strategies
    from ila.strategy_plan import Strategy

    cfg, run_dir, _ = full_run
    out = evaluate_run(cfg, run_dir)
    assert list(out["results"]) == ["base", "stage3"]
    assert out["results"]["stage3"]["adapter"] == str(run_dir / "stage3" / "model")
    # The number is the stage-3 model's own: the same function on the model folder gives it.
    from transformers import AutoModelForCausalLM

    from ila.data import build_datasets

    tokenizer = load_tokenizer(cfg.model)
    heldout = build_datasets(cfg.data, tokenizer)[1]
    tuned = heldout_loss(
        AutoModelForCausalLM.from_pretrained(run_dir / "stage3" / "model"), tokenizer, heldout
    )
    base = heldout_loss(load_base_model(cfg.model), tokenizer, heldout)
    assert out["results"]["stage3"]["heldout"]["loss"] == pytest.approx(tuned["loss"], rel=1e-6)
    assert out["results"]["base"]["heldout"]["loss"] == pytest.approx(base["loss"], rel=1e-6)
    assert tuned["loss"] != base["loss"]

    ranking = Ranking.load(run_dir / "stage2" / "ranking.json")
    report = run_strategies(
        cfg,
        run_dir / "stage2" / "ranking.json",
        tmp_path / "strategies",
        isolate=False,
        strategies=[Strategy("top-25", "ila-top", 0.25, tuple(ranking.order[:7]))],
    )
    (result,) = report["results"]
    assert (tmp_path / "strategies" / "top-25-seed0" / "stage3" / "model" / "config.json").is_file()
    assert result["heldout_loss"] != report["base_heldout_loss"]


def test_the_full_stage3_model_folder_is_readable_by_transformers_4(full_run):
    """The model folder stage 3 writes carries what transformers 4 needs, as the builtin conversion does."""
    _, run_dir, _ = full_run
    folder = run_dir / "stage3" / "model"
    config = json.loads((folder / "config.json").read_text())
    assert "rope_theta" in config and "rope_parameters" in config
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    assert tokenizer_config.get("tokenizer_class") != "TokenizersBackend"
