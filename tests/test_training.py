"""The one Trainer set-up: the output head restricted to response positions changes no loss and no
gradient."""

from __future__ import annotations

import pytest
import torch
from conftest import make_model

from ila.config import LoraConfig
from ila.layers import adaptable_layers
from ila.models import attach_lora
from ila.response_logits import response_logits_kwargs, supports_response_logits


def _lora_model():
    base = make_model()
    model = attach_lora(base, [layer.name for layer in adaptable_layers(base)], LoraConfig(r=2, dropout=0.0))
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.1)
    return model


def _batch():
    torch.manual_seed(1)
    ids = torch.randint(0, 256, (3, 20))
    labels = ids.clone()
    labels[0, :12] = -100  # a prompt, then the response
    labels[1, :5] = -100
    labels[1, 17:] = -100  # right padding
    labels[2, :8] = -100
    labels[2, 11:14] = -100  # a second user turn inside the conversation
    mask = torch.ones_like(ids)
    mask[1, 17:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("normalise", ["num_items_in_batch", "mean"])
def test_response_logits_give_the_same_loss_and_gradients(normalise):
    model = _lora_model()
    assert supports_response_logits(model)
    batch = _batch()
    extra = {}
    if normalise == "num_items_in_batch":
        extra["num_items_in_batch"] = torch.tensor(int((batch["labels"][:, 1:] != -100).sum()))

    full = model(**batch, **extra)
    full.loss.backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    kwargs = response_logits_kwargs(batch["labels"])
    trimmed = model(**batch, **extra, **kwargs)
    trimmed.loss.backward()
    kept = int(kwargs["logits_to_keep"].sum())
    assert (
        trimmed.logits.shape[0] == kept < batch["input_ids"].numel()
    )  # only response positions were projected
    assert trimmed.loss.item() == pytest.approx(full.loss.item(), rel=1e-6)
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, reference[name], rtol=1e-5, atol=1e-7)


def test_the_ila_trainer_uses_response_logits_only_where_the_model_can(tmp_path):
    from datasets import Dataset
    from tiny import make_tokenizer

    from ila.training import TrainingPlan, make_trainer

    model = _lora_model()
    rows = [{k: v[i].tolist() for k, v in _batch().items()} for i in range(3)]
    plan = TrainingPlan(
        output_dir=tmp_path / "ck", metrics_path=tmp_path / "m.jsonl", max_steps=1, batch_size=3, device="cpu"
    )
    trainer = make_trainer(model, plan, make_tokenizer(), Dataset.from_list(rows))
    assert trainer.response_logits_only
    model.train()
    batch = _batch()
    ours = trainer.compute_loss(model, dict(batch))
    plain = model(**batch).loss
    assert ours.item() == pytest.approx(plain.item(), rel=1e-6)
    plan.response_logits_only = False
    assert not make_trainer(model, plan, make_tokenizer(), Dataset.from_list(rows)).response_logits_only


@pytest.mark.parametrize("state", ['{"global_step": 20, "log_hist', "", None, '{"global_step": 10}'])
def test_a_checkpoint_with_a_missing_or_cut_off_trainer_state_is_not_resumed(tmp_path, state):
    """A kill while the Trainer writes trainer_state.json leaves it cut off (or empty); a copied folder can
    carry the state of another step. Only a whole state of the folder's own step marks it complete."""
    import json

    from ila.training import last_complete_checkpoint

    good = tmp_path / "checkpoint-10"
    good.mkdir()
    (good / "trainer_state.json").write_text(json.dumps({"global_step": 10, "log_history": []}))
    bad = tmp_path / "checkpoint-20"
    bad.mkdir()
    (bad / "adapter_model.safetensors").write_bytes(b"x")
    if state is not None:
        (bad / "trainer_state.json").write_text(state)
    assert last_complete_checkpoint(tmp_path) == str(good)
    assert not bad.exists()  # removed, so that the next resume does not meet it again


def test_every_stage_plans_its_training_from_one_translation_of_its_config(tmp_path):
    """save_steps 0 means a checkpoint every quarter of the run in the config; the plan must say the same."""
    from ila.config import Stage2Config, TrainConfig
    from ila.training import plan_for

    plan = plan_for(
        TrainConfig(max_steps=40, save_steps=0, learning_rate=1e-3), tmp_path, seed=3, device="cpu"
    )
    assert plan.save_steps == 10 and plan.max_steps == 40 and plan.learning_rate == 1e-3 and plan.seed == 3
    assert plan.output_dir == tmp_path / "checkpoints" and plan.metrics_path == tmp_path / "metrics.jsonl"
    assert plan_for(TrainConfig(max_steps=40, save_steps=7), tmp_path, seed=0, device="cpu").save_steps == 7
    s2 = plan_for(Stage2Config(steps=8, learning_rate=0.1).as_train_config(), tmp_path, seed=0, device="cpu")
    assert (s2.max_steps, s2.learning_rate, s2.lr_scheduler, s2.max_grad_norm, s2.warmup_ratio) == (
        8,
        0.1,
        "constant",
        0.0,
        0.0,
    )


def test_the_step_time_is_the_median_step_which_an_evaluation_or_a_stall_does_not_move(monkeypatch):
    from types import SimpleNamespace

    from ila import callbacks

    clock = iter([0.0, 1.0, 1.0, 2.0, 2.0, 30.0, 30.0, 31.0, 31.0, 32.5])  # the third step stalls 28 s
    monkeypatch.setattr(callbacks.time, "perf_counter", lambda: next(clock))
    timer = callbacks.StepTimer()
    state = SimpleNamespace(global_step=0)
    assert timer.median is None
    for _ in range(5):
        timer.on_step_begin(None, state, None)
        timer.on_step_end(None, state, None)
    assert timer.durations == [1.0, 1.0, 28.0, 1.0, 1.5]
    assert timer.median == 1.0
