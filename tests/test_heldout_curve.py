"""The held-out curve (``eval_steps``) and early stopping on it, on the tiny model: where it stops, which
weights it keeps, and that an interrupted run resumes the same curve."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import TINY_OVERRIDES, Interrupted, interrupted_train

from ila import pipeline
from ila.callbacks import HeldoutCurve
from ila.config import load_config
from ila.errors import ConfigError
from ila.pipeline import prepare_run_dir, stage1

# A high learning rate: the held-out loss soon improves by less than 0.01 a step.
DIVERGING = [  # with improvements of at most 0.01 counted as none
    "stage1.train.max_steps=30",
    "stage1.train.learning_rate=0.5",
    "stage1.train.lr_scheduler=constant",
    "stage1.train.warmup_ratio=0.0",
    "stage1.train.eval_steps=1",
    "stage1.train.early_stopping_patience=2",
    "stage1.train.early_stopping_min_delta=0.01",
    "stage1.stability_window=100",
    "stage1.milestones=[1.0]",
]


def curve(run_dir):
    path = run_dir / "stage1" / "heldout_curve.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def run(tmp_path, tiny_model_dir, tiny_data_file, extra=()):
    cfg = load_config(None, TINY_OVERRIDES(tiny_model_dir, tiny_data_file) + DIVERGING + list(extra))
    prepare_run_dir(cfg, tmp_path)
    return cfg, stage1(cfg, tmp_path)


def test_early_stopping_stops_and_keeps_the_lowest_loss(tmp_path, tiny_model_dir, tiny_data_file):
    _, summary = run(tmp_path, tiny_model_dir, tiny_data_file)
    records = curve(tmp_path)
    assert [r["step"] for r in records] == list(range(1, summary["steps"] + 1))
    assert summary["steps"] < 30, "it never stopped"
    assert all(r["improved"] is False for r in records[-2:])  # two misses in a row, then the stop
    # what is saved and reported is the model at the lowest held-out loss
    assert summary["heldout_loss"] == pytest.approx(min(r["loss"] for r in records), abs=1e-6)


def test_the_best_weights_are_put_back():
    """Scripted losses 3, 2, 2.5, 2.6: step 2 is best, two misses stop at step 4, step 2's weights return."""
    from types import SimpleNamespace

    import torch

    losses = iter([3.0, 2.0, 2.5, 2.6])
    model = torch.nn.Linear(2, 1)
    cb = HeldoutCurve(lambda: {"loss": next(losses), "ci95": [0, 0], "tokens": 1}, 1, Path("/dev/null"),
                      patience=2)  # fmt: skip
    control = SimpleNamespace(should_training_stop=False, should_save=False)
    kept = None
    for step in range(1, 5):
        with torch.no_grad():
            model.weight.fill_(step)
        state = SimpleNamespace(global_step=step, is_world_process_zero=False)
        cb.on_step_end(None, state, control, model=model)
        kept = model.weight.detach().clone() if step == 2 else kept
        assert control.should_training_stop == (step == 4)
    cb.on_train_end(None, state, control, model=model)
    assert cb.restored_step == 2 and torch.equal(model.weight, kept)


def test_the_curve_resumes_after_an_interruption(tmp_path, tiny_model_dir, tiny_data_file):
    _, whole = run(tmp_path / "whole", tiny_model_dir, tiny_data_file, ["stage1.train.save_steps=4"])
    cfg = load_config(
        None,
        TINY_OVERRIDES(tiny_model_dir, tiny_data_file) + DIVERGING + ["stage1.train.save_steps=4"],
    )
    prepare_run_dir(cfg, tmp_path / "cut")
    with pytest.MonkeyPatch.context() as m:
        m.setattr(pipeline, "train", interrupted_train(9))
        with pytest.raises(Interrupted):
            stage1(cfg, tmp_path / "cut")
    resumed = stage1(cfg, tmp_path / "cut")
    assert resumed["resumed_from"].endswith("checkpoint-8")
    a, b = curve(tmp_path / "whole"), curve(tmp_path / "cut")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-4)
    assert resumed["steps"] == whole["steps"] and resumed["best_step"] == whole["best_step"]
    # its step time is its own steps' (9 to the end), not its time over every step of the run
    assert resumed["seconds"] / resumed["seconds_per_step"] == pytest.approx(whole["steps"] - 8)
    assert 0 < resumed["median_step_seconds"] <= resumed["seconds"]


def test_an_attempt_cut_off_before_its_first_checkpoint_starts_its_logs_afresh(
    tmp_path, tiny_model_dir, tiny_data_file
):
    """Killed at step 3 of a run that checkpoints every 4 steps, a stage has nothing to resume from and
    starts again at step 0: each log must then hold every step once, as the uninterrupted run's."""
    extra = ["stage1.train.save_steps=4", "stage1.train.logging_steps=1"]
    run(tmp_path / "whole", tiny_model_dir, tiny_data_file, extra)
    cfg = load_config(None, TINY_OVERRIDES(tiny_model_dir, tiny_data_file) + DIVERGING + extra)
    prepare_run_dir(cfg, tmp_path / "cut")
    with pytest.MonkeyPatch.context() as m:
        m.setattr(pipeline, "train", interrupted_train(3))
        with pytest.raises(Interrupted):
            stage1(cfg, tmp_path / "cut")
    assert curve(tmp_path / "cut"), "the cut-off attempt wrote no curve to start afresh from"
    assert stage1(cfg, tmp_path / "cut")["resumed_from"] is None
    assert [r["step"] for r in curve(tmp_path / "cut")] == [r["step"] for r in curve(tmp_path / "whole")]

    def logged_steps(run_dir):
        lines = (run_dir / "stage1" / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line)["step"] for line in lines]

    assert logged_steps(tmp_path / "cut") == logged_steps(tmp_path / "whole")


def test_early_stopping_needs_the_curve(tiny_model_dir, tiny_data_file):
    with pytest.raises(ConfigError, match="early_stopping_patience"):
        load_config(
            None,
            TINY_OVERRIDES(tiny_model_dir, tiny_data_file) + ["stage1.train.early_stopping_patience=2"],
        )
