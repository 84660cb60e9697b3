"""Stage 2 scores exactly the update it is given, on a deterministic model: the adapter asked for (not the
one an interrupted run left checkpoints of), under any adapter name, and without the base model's dropout."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import TINY_OVERRIDES, Interrupted, interrupted_train

from ila.config import load_config
from ila.errors import ConfigError
from ila.pipeline import prepare_run_dir, stage1, stage2


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_model_dir, tiny_data_file):
    """A trained stage-1 adapter A, and B: the same folder with every LoRA B zero (an all-zero update)."""
    from safetensors.torch import load_file, save_file

    overrides = TINY_OVERRIDES(tiny_model_dir, tiny_data_file)
    run_dir = tmp_path_factory.mktemp("stage1")
    cfg = load_config(None, overrides)
    prepare_run_dir(cfg, run_dir)
    stage1(cfg, run_dir)
    a = run_dir / "stage1" / "final"
    b = run_dir / "zero-update"
    shutil.copytree(a, b)
    weights = load_file(b / "adapter_model.safetensors")
    save_file(
        {k: torch.zeros_like(v) if "lora_B" in k else v for k, v in weights.items()},
        str(b / "adapter_model.safetensors"),
    )
    return overrides, a, b


def test_an_interrupted_stage2_is_not_resumed_for_another_adapter(adapters, tmp_path, monkeypatch):
    overrides, a, b = adapters
    cfg = load_config(None, overrides + ["stage2.steps=8"])  # checkpoints every 2 steps
    prepare_run_dir(cfg, tmp_path)
    with monkeypatch.context() as m:
        m.setattr("ila.scoring.train", interrupted_train(5))
        with pytest.raises(Interrupted):
            stage2(cfg, tmp_path, adapter=a)
    assert any((tmp_path / "stage2" / "checkpoints").glob("checkpoint-*"))
    with pytest.raises(ConfigError, match="adapter"):
        stage2(cfg, tmp_path, adapter=b)
    assert not (tmp_path / "stage2" / "ranking.json").exists()  # nothing labelled as B's scores
    # Once A's checkpoints are gone, B's all-zero update scores as it must: every score where it started.
    shutil.rmtree(tmp_path / "stage2" / "checkpoints")
    ranking = stage2(cfg, tmp_path, adapter=b)
    from ila.gates import LayerGates

    start = LayerGates(list(ranking.scores), init_std=cfg.stage2.init_std, seed=cfg.seed).as_dict()
    assert ranking.scores == pytest.approx(start, abs=1e-7)
    assert ranking.meta["stage1_adapter"] == str(b)


def test_the_same_adapter_resumes(adapters, tmp_path, monkeypatch):
    overrides, a, _ = adapters
    cfg = load_config(None, overrides + ["stage2.steps=8"])
    whole = stage2(cfg, tmp_path / "whole", adapter=a)
    with monkeypatch.context() as m:
        m.setattr("ila.scoring.train", interrupted_train(5))
        with pytest.raises(Interrupted):
            stage2(cfg, tmp_path / "cut", adapter=a)
    resumed = stage2(cfg, tmp_path / "cut", adapter=a)
    assert resumed.scores == pytest.approx(whole.scores, rel=1e-4, abs=1e-7)


def _peft_model(adapter_name: str = "default", dropout: float = 0.0):
    import peft
    from conftest import make_model

    from ila.layers import adaptable_layers

    base = make_model()
    names = [layer.name for layer in adaptable_layers(base)]
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=names)
    model = peft.get_peft_model(base, cfg, adapter_name=adapter_name)
    g = torch.Generator().manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.2
    return model, cfg


def _dataset():
    from datasets import Dataset

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (8, 16), generator=g).tolist()
    return Dataset.from_list([{"input_ids": x, "attention_mask": [1] * 16, "labels": x} for x in ids])


def _rank(model, scorer="ila"):
    from tiny import make_tokenizer

    from ila.config import Stage2Config
    from ila.integration import rank_layers

    return rank_layers(
        model,
        scorer=scorer,
        tokenizer=make_tokenizer(),
        dataset=_dataset(),
        device="cpu",
        stage2=Stage2Config(steps=4, batch_size=4, learning_rate=1.0),
    )


@pytest.mark.parametrize("scorer", ["ila", "taylor", "update-norm"])
def test_an_adapter_of_any_name_scores_like_default(scorer):
    default, _ = _peft_model("default")
    named, _ = _peft_model("sft")
    a, b = _rank(default, scorer), _rank(named, scorer)
    assert b.scores == pytest.approx(a.scores, rel=1e-5, abs=1e-8)
    assert len(set(a.scores.values())) > 1


@pytest.mark.parametrize("scorer", ["ila", "taylor", "update-norm"])
def test_two_active_adapters_or_a_merged_one_are_refused(scorer):
    from ila.errors import ModelError

    model, cfg = _peft_model("default")
    model.add_adapter("second", cfg)
    model.base_model.set_adapter(["default", "second"])
    with pytest.raises(ModelError, match="2 LoRA adapters are active"):
        _rank(model, scorer)
    model.base_model.set_adapter("second")  # one active adapter again: fine
    _rank(model, scorer)

    merged, _ = _peft_model("default")
    merged.merge_adapter()
    with pytest.raises(ModelError, match="merged"):
        _rank(merged, scorer)


@pytest.mark.parametrize("scorer", ["ila", "taylor"])
def test_the_base_models_own_dropout_is_off_while_scoring(scorer):
    """Attention dropout 0.3 in the base model: stage 2 must score the model itself, so the scores equal those
    of the same weights without dropout."""
    plain, _ = _peft_model()
    dropped, _ = _peft_model()
    hits = 0
    for module in dropped.modules():
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = 0.3
            hits += 1
    assert hits == 4
    a, b = _rank(plain, scorer), _rank(dropped, scorer)
    assert b.scores == pytest.approx(a.scores, rel=1e-5, abs=1e-7)
