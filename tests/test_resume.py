"""Interrupted runs resume: a real subprocess is killed mid-stage (SIGKILL, SIGTERM, Ctrl-C) and the same
command run again finishes with the result of an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY_OVERRIDES
from safetensors.torch import load_file

from ila.config import load_config
from ila.pipeline import run_all
from ila.ranking import Ranking

LONG = [
    "stage1.train.max_steps=60",
    "stage1.train.save_steps=10",
    "stage1.stability_window=10",
    "stage2.steps=60",
    "stage3.train.max_steps=60",
    "stage3.train.save_steps=10",
]


def _command(run_dir: Path, overrides: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "ila.cli", "run", "--run-dir", str(run_dir)]
    for o in overrides:
        cmd += ["--set", o]
    return cmd


def _interrupt_when(cmd: list[str], marker: Path, sig: int, timeout: float = 120) -> int:
    """Start ``cmd``, send ``sig`` as soon as ``marker`` exists, return the exit code."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    # A process started with SIGINT ignored keeps ignoring it (Python installs its Ctrl-C handler only when
    # SIGINT is not ignored), and the test process may have inherited that: give the command a terminal's
    # default disposition, as a user's shell does.
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    start = time.time()
    while not marker.exists():
        if proc.poll() is not None:
            raise AssertionError(
                f"finished before the interruption point: {proc.stderr.read().decode()[-2000:]}"
            )
        if time.time() - start > timeout:
            proc.kill()
            raise AssertionError("interruption point never reached")
        time.sleep(0.02)
    proc.send_signal(sig)
    proc.wait(timeout=60)
    return proc.returncode


def _finish(cmd: list[str]) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir, tiny_data_file):
    overrides = TINY_OVERRIDES(tiny_model_dir, tiny_data_file) + LONG
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    run_all(load_config(None, overrides), run_dir)
    return overrides, run_dir


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter_model.safetensors")


def _assert_close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "stage, marker, sig",
    [
        ("stage1", "stage1/checkpoints/checkpoint-20/trainer_state.json", signal.SIGKILL),
        ("stage2", "stage2/checkpoints/checkpoint-30/trainer_state.json", signal.SIGTERM),
        ("stage3", "stage3/checkpoints/checkpoint-20/trainer_state.json", signal.SIGINT),
    ],
)
def test_interrupted_stage_resumes_to_the_same_result(reference, tmp_path, stage, marker, sig):
    overrides, ref_dir = reference
    run_dir = tmp_path / "run"
    cmd = _command(run_dir, overrides)
    code = _interrupt_when(cmd, run_dir / marker, sig)
    # SIGKILL cannot be handled; SIGTERM and Ctrl-C end the command like Ctrl-C, with exit code 130.
    assert code == (-signal.SIGKILL if sig == signal.SIGKILL else 130)
    assert not (run_dir / stage / "summary.json").exists()
    log = _finish(cmd)
    assert "resuming from" in log
    for earlier in ("stage1", "stage2")[: int(stage[-1]) - 1]:
        assert f"{earlier.replace('stage', 'stage ')} already complete" in log  # completed stages not redone

    _assert_close(_weights(run_dir / "stage1" / "final"), _weights(ref_dir / "stage1" / "final"))
    ranked, ref_ranked = (
        Ranking.load(run_dir / "stage2" / "ranking.json"),
        Ranking.load(ref_dir / "stage2" / "ranking.json"),
    )
    for name, score in ref_ranked.scores.items():
        assert ranked.scores[name] == pytest.approx(score, rel=1e-3, abs=1e-5)
    _assert_close(_weights(run_dir / "stage3" / "adapter"), _weights(ref_dir / "stage3" / "adapter"))
    assert not (run_dir / stage / "checkpoints").exists()
