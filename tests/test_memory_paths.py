"""Gradient checkpointing and mixed precision with partly frozen models (CPU equivalents of GPU paths)."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_OVERRIDES

from ila.config import load_config
from ila.pipeline import prepare_run_dir, stage2, stage3

LAST_BLOCK = [f"model.layers.3.{t}" for t in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")]


@pytest.fixture(scope="module", params=["fp32", "bf16"])
def checkpointed_stage3(request, tmp_path_factory, tiny_model_dir, tiny_data_file):
    """Stage 3 with gradient checkpointing on, only the last of 4 blocks tuned, watched from inside: how often
    each block's MLP runs in training (a recomputation in backward counts again), whether the hidden states
    entering a frozen block require a gradient, and how the checkpoint function was called."""
    import transformers.modeling_utils as modeling_utils

    import ila.pipeline as pipeline

    run_dir = tmp_path_factory.mktemp(f"checkpointing-{request.param}")
    cfg = load_config(
        None,
        TINY_OVERRIDES(tiny_model_dir, tiny_data_file)
        + [
            "stage2.scorer=random",
            "stage3.train.gradient_checkpointing=true",
            f"stage3.train.precision={request.param}",
            "stage3.selection.mode=list",
            "stage3.selection.layers=[" + ",".join(LAST_BLOCK) + "]",
            "stage3.train.eval_heldout=false",
        ],
    )
    prepare_run_dir(cfg, run_dir)
    stage2(cfg, run_dir)  # a random ranking: no stage 1 needed

    seen = {
        "calls": {"model": 0, "first": 0, "last": 0},
        "frozen_input_needs_grad": [],
        "is_checkpointing": [],
        "use_reentrant": [],
    }
    real_train, real_checkpoint = pipeline.train, modeling_utils.checkpoint

    def counter(key):
        # A pre-hook: the recomputation in backward stops as soon as it has what backward needs, which can be
        # before a module returns.
        def hook(module, args):
            if module.training and torch.is_grad_enabled():  # training forwards and their recomputation
                seen["calls"][key] += 1

        return hook

    def frozen_input(module, args, kwargs):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        seen["frozen_input_needs_grad"].append(hidden.requires_grad)

    def spy_checkpoint(function, *args, **kwargs):
        seen["use_reentrant"].append(kwargs.get("use_reentrant"))
        return real_checkpoint(function, *args, **kwargs)

    def spy_train(model, plan, *args, **kwargs):
        assert plan.gradient_checkpointing
        base = model.get_base_model()
        blocks = base.model.layers
        base.register_forward_pre_hook(counter("model"))  # once per micro-batch: never recomputed
        blocks[0].mlp.register_forward_pre_hook(counter("first"))  # inside the checkpointed blocks
        blocks[3].mlp.register_forward_pre_hook(counter("last"))
        for block in blocks[:3]:
            block.register_forward_pre_hook(frozen_input, with_kwargs=True)
        base.register_forward_pre_hook(  # training forwards only (not the padding-free probe)
            lambda m, a: (
                seen["is_checkpointing"].append(m.is_gradient_checkpointing)
                if m.training and torch.is_grad_enabled()
                else None
            )
        )
        return real_train(model, plan, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        # transformers binds the checkpoint function when checkpointing is switched on (in Trainer.train)
        mp.setattr(modeling_utils, "checkpoint", spy_checkpoint)
        mp.setattr(pipeline, "train", spy_train)
        seen["summary"] = stage3(cfg, run_dir)
    return seen


def test_checkpointing_is_on_and_non_reentrant(checkpointed_stage3):
    seen = checkpointed_stage3
    calls = seen["calls"]
    assert seen["summary"]["num_selected"] == 3 and seen["summary"]["steps"] == 4
    assert calls["model"] >= 4 and seen["is_checkpointing"] and all(seen["is_checkpointing"]), (
        "gradient checkpointing is off"
    )
    # With checkpointing the tuned block runs twice per training forward: forward, then again in backward.
    assert calls["last"] == 2 * calls["model"], f"the tuned block was not recomputed in backward: {calls}"
    # Every checkpointed call is of the non-reentrant kind (4 blocks per training forward).
    assert len(seen["use_reentrant"]) >= 4 * calls["model"]
    assert set(seen["use_reentrant"]) == {False}, f"use_reentrant: {set(seen['use_reentrant'])}"


def test_checkpointing_sends_no_gradient_into_frozen_early_layers(checkpointed_stage3):
    """Non-reentrant checkpointing needs no input gradient: the hidden states entering the frozen blocks must
    not require one, so backward stops at the tuned block and the frozen blocks are not recomputed."""
    seen = checkpointed_stage3
    calls = seen["calls"]
    assert seen["frozen_input_needs_grad"] and not any(seen["frozen_input_needs_grad"]), (
        "gradients were forced down into the frozen blocks"
    )
    assert calls["first"] == calls["model"], f"a frozen block was recomputed in backward: {calls}"
