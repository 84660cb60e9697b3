"""Stage 2 scores exactly the update it is given, on a deterministic model: the adapter asked for (not the
one an interrupted run left checkpoints of), under any adapter name, and without the base model's dropout."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import TINY_OVERRIDES

from ila.config import load_config
from ila.errors import ConfigError
from ila.pipeline import prepare_run_dir, stage1, stage2


class _Interrupt(Exception):
    pass


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
    save_file({k: torch.zeros_like(v) if "lora_B" in k else v for k, v in weights.items()},
              str(b / "adapter_model.safetensors"))
    return overrides, a, b


def _interrupted_train(step: int):
    from transformers import TrainerCallback

    from ila import training

    original = training.train

    class Stop(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == step:
                raise _Interrupt

    def train(model, plan, *args, **kwargs):
        plan.callbacks = [*plan.callbacks, Stop()]
        return original(model, plan, *args, **kwargs)

    return train


def test_an_interrupted_stage2_is_not_resumed_for_another_adapter(adapters, tmp_path, monkeypatch):
    overrides, a, b = adapters
    cfg = load_config(None, overrides + ["stage2.steps=8"])  # checkpoints every 2 steps
    prepare_run_dir(cfg, tmp_path)
    with monkeypatch.context() as m:
        m.setattr("ila.training.train", _interrupted_train(5))
        with pytest.raises(_Interrupt):
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
        m.setattr("ila.training.train", _interrupted_train(5))
        with pytest.raises(_Interrupt):
            stage2(cfg, tmp_path / "cut", adapter=a)
    resumed = stage2(cfg, tmp_path / "cut", adapter=a)
    assert resumed.scores == pytest.approx(whole.scores, rel=1e-4, abs=1e-7)
