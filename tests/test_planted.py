"""Direction: on a tiny model trained for real, the scorers that read the stage-1 update rank the layers whose
update was kept above the layers whose update was replaced by noise of the same norm, and leave a zero update
where it started. A flipped sign anywhere in stage 2 or in a scorer turns the order round."""

from __future__ import annotations

import json
import random
import statistics

import pytest
import torch
from conftest import TINY_OVERRIDES

from ila.config import Stage2Config, load_config
from ila.gates import LayerGates
from ila.pipeline import prepare_run_dir, stage1

SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir, tiny_data_file):
    """Stage 1 long enough that each layer's update helps (held-out loss 5.73 -> 5.14)."""
    cfg = load_config(
        None,
        TINY_OVERRIDES(tiny_model_dir, tiny_data_file)
        + ["stage1.train.max_steps=40", "stage1.train.learning_rate=2e-3", "lora.dropout=0"],
    )
    run_dir = tmp_path_factory.mktemp("planted")
    prepare_run_dir(cfg, run_dir)
    out = stage1(cfg, run_dir)
    assert out["heldout_loss"] < out["base_heldout_loss"] - 0.3
    from tiny import make_tokenizer

    from ila.data import build_datasets

    tokenizer = make_tokenizer()
    return cfg, run_dir / "stage1" / "final", tokenizer, build_datasets(cfg.data, tokenizer)[0]


def _planted(cfg, adapter, seed: int):
    """The stage-1 adapter with its update kept on 14 of the 28 layers, noise of the same ||scaling B A||_F on
    11, and zero on 3."""
    import peft
    from transformers import AutoModelForCausalLM

    model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(cfg.model.name), adapter)
    names = json.loads((adapter / "ila_adapter.json").read_text())["layers"]
    shuffled = names[:]
    random.Random(seed).shuffle(shuffled)
    kept, zero, noise = shuffled[:14], shuffled[14:17], shuffled[17:]
    modules = dict(model.named_modules())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in zero:
            modules["base_model.model." + name].lora_B["default"].weight.zero_()
        for name in noise:
            module = modules["base_model.model." + name]
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            fresh = torch.randn(b.shape, generator=g)
            b.copy_(fresh * (b @ a).norm() / (fresh @ a).norm())
    return model, kept, noise, zero


def _auc(positive: list[float], negative: list[float]) -> float:
    return sum((p > q) + 0.5 * (p == q) for p in positive for q in negative) / (len(positive) * len(negative))


@pytest.mark.parametrize("scorer, min_mean_auc", [("ila", 0.8), ("taylor", 0.7)])
def test_kept_updates_rank_above_same_norm_noise_and_zero_updates_stay(trained, scorer, min_mean_auc):
    """Measured with the default stage-2 settings (20 steps): AUC 0.91 / 0.92 / 0.94 for ila and
    0.89 / 0.91 / 0.80 for taylor over the three plantings; a flipped sign gives 1 - AUC."""
    from ila.integration import rank_layers

    cfg, adapter, tokenizer, dataset = trained
    aucs = []
    for seed in SEEDS:
        model, kept, noise, zero = _planted(cfg, adapter, seed)
        ranking = rank_layers(
            model,
            scorer=scorer,
            tokenizer=tokenizer,
            dataset=dataset,
            device="cpu",
            seed=seed,
            stage2=Stage2Config(steps=20, batch_size=4),
        )
        scores = ranking.scores
        aucs.append(_auc([scores[n] for n in kept], [scores[n] for n in noise]))
        if scorer == "ila":  # a zero update gets no gradient: its score ends where it started
            start = LayerGates(list(scores), seed=seed).as_dict()
            assert all(scores[n] == start[n] for n in zero)
            assert statistics.median(abs(scores[n] - start[n]) for n in kept + noise) > 0.01
        else:  # removing a zero update changes nothing
            assert all(scores[n] == 0.0 for n in zero)
    assert statistics.mean(aucs) >= min_mean_auc, aucs
    assert min(aucs) >= 0.65, aucs
