"""Gradient checkpointing and mixed precision with partly frozen models (CPU equivalents of GPU paths)."""

from __future__ import annotations

import pytest
from conftest import TINY_OVERRIDES

from ila.config import load_config
from ila.pipeline import prepare_run_dir, stage2, stage3


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_checkpointing_sends_no_gradient_into_frozen_early_layers(tmp_path, tiny_model_dir, tiny_data_file,
                                                                  monkeypatch, precision):
    """Only the last block is tuned: with (non-reentrant) gradient checkpointing the embeddings' output must
    not require a gradient, so backward stops at the lowest tuned layer."""
    import ila.pipeline as pipeline

    last_block = [f"model.layers.3.{t}" for t in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")]
    cfg = load_config(None, TINY_OVERRIDES(tiny_model_dir, tiny_data_file) + [
        "stage2.scorer=random", "stage3.train.gradient_checkpointing=true", f"stage3.train.precision={precision}",
        "stage3.selection.mode=list", "stage3.selection.layers=[" + ",".join(last_block) + "]",
        "stage3.train.eval_heldout=false"])
    prepare_run_dir(cfg, tmp_path)
    stage2(cfg, tmp_path)  # a random ranking: no stage 1 needed

    seen: list[bool] = []
    real_train = pipeline.train

    def spy(model, plan, *args, **kwargs):
        assert plan.gradient_checkpointing
        model.get_input_embeddings().register_forward_hook(lambda m, i, o: seen.append(o.requires_grad))
        return real_train(model, plan, *args, **kwargs)

    monkeypatch.setattr(pipeline, "train", spy)
    out = stage3(cfg, tmp_path)
    assert out["num_selected"] == 3 and out["steps"] == 4
    assert seen and not any(seen), "gradients were forced down to the embeddings"
