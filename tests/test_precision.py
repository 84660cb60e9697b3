"""`precision: auto`: bf16 only where the device computes it natively, decided once when the config loads."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

import ila.precision
from ila.config import load_config
from ila.precision import bf16_is_native, resolve_precision
from ila.training import TrainingPlan, training_arguments

AUTO = ["stage1.train.precision=auto", "stage2.precision=auto", "stage3.train.precision=auto"]


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_resolves_to_what_the_device_computes_natively(monkeypatch, native, expected):
    monkeypatch.setattr(ila.precision, "bf16_is_native", lambda device="auto": native)
    cfg = load_config(None, ["model.device=cpu", *AUTO])
    assert (cfg.stage1.train.precision, cfg.stage2.precision, cfg.stage3.train.precision) == (expected,) * 3
    # an explicit choice is never second-guessed
    assert resolve_precision("bf16", "cpu") == "bf16" and resolve_precision("fp32", "cpu") == "fp32"


def test_the_resolved_precision_is_in_the_stage_hashes(monkeypatch):
    """A result trained in bf16 on one machine is not reused as the fp32 result of the same config."""
    hashes = {}
    for native in (True, False):
        monkeypatch.setattr(ila.precision, "bf16_is_native", lambda device="auto", n=native: n)
        cfg = load_config(None, ["model.device=cpu", *AUTO])
        hashes[native] = (cfg.stage_sha256("stage1"), cfg.stage_sha256("stage3"))
    assert hashes[True][0] != hashes[False][0] and hashes[True][1] != hashes[False][1]


def test_the_demo_config_trains_in_the_native_precision():
    cfg = load_config("smollm2")
    native = "bf16" if bf16_is_native("auto") else "fp32"
    assert (cfg.stage1.train.precision, cfg.stage2.precision, cfg.stage3.train.precision) == (native,) * 3


def test_a_device_without_cuda_has_no_native_cuda_bf16(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not bf16_is_native("cuda:0")
    assert bf16_is_native("auto") == bf16_is_native("cpu")


@pytest.mark.parametrize("native", [True, False])
def test_bf16_on_a_cpu_that_emulates_it_is_said(monkeypatch, caplog, tmp_path: Path, native):
    monkeypatch.setattr(ila.precision, "bf16_is_native", lambda device="auto": native)
    plan = TrainingPlan(output_dir=tmp_path, metrics_path=tmp_path / "m.jsonl", max_steps=1, batch_size=1,
                        precision="bf16", device="cpu")  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="ila.precision"):
        args = training_arguments(plan)
    assert args.bf16  # still what was asked for: only said, not changed
    assert ("emulated" in caplog.text) == (not native)
