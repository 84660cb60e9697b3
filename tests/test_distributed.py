"""Several processes on the CPU: torchrun with the gloo backend, two processes, a tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY_OVERRIDES

from ila.config import load_config
from ila.pipeline import prepare_run_dir, stage1, stage2
from ila.ranking import Ranking


def _torchrun(args: list[str], overrides: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           "-m", "ila.cli", *args]
    for o in overrides:
        cmd += ["--set", o]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


@pytest.fixture(scope="module")
def stage1_dir(tmp_path_factory, tiny_model_dir, tiny_data_file):
    overrides = TINY_OVERRIDES(tiny_model_dir, tiny_data_file)
    run_dir = tmp_path_factory.mktemp("one-process")
    cfg = load_config(None, overrides)
    prepare_run_dir(cfg, run_dir)
    stage1(cfg, run_dir)
    return overrides, run_dir


def test_two_processes_rank_like_one_with_the_same_global_batch(stage1_dir, tmp_path):
    overrides, one = stage1_dir
    common = ["stage2.steps=8", "stage2.learning_rate=0.05"]
    # One process, batch 4.
    cfg = load_config(None, overrides + common + ["stage2.batch_size=4"])
    single = stage2(cfg, tmp_path / "single", adapter=one / "stage1" / "final")
    # Two processes, batch 2 each: the same 4 examples per step, the gradients averaged by DDP.
    _torchrun(["score", "--run-dir", str(tmp_path / "ddp"), "--adapter", str(one / "stage1" / "final")],
              overrides + common + ["stage2.batch_size=2"])
    double = Ranking.load(tmp_path / "ddp" / "stage2" / "ranking.json")
    # Stated tolerance: scores within 1e-4 absolute (summation order differs between the two set-ups).
    for name, s in single.scores.items():
        assert double.scores[name] == pytest.approx(s, abs=1e-4)
    assert double.order[:10] == single.order[:10]


def test_every_stage_runs_under_torchrun_and_only_rank_0_writes(stage1_dir, tmp_path):
    overrides, _ = stage1_dir
    run_dir = tmp_path / "run"
    done = _torchrun(["run", "--run-dir", str(run_dir)], overrides + ["stage1.train.batch_size=2"])
    assert done.stdout.count("ILA run complete") == 2  # each rank prints; only one wrote the files
    for stage in ("stage1", "stage2", "stage3"):
        assert (run_dir / stage / "summary.json").is_file()
        lines = (run_dir / stage / "metrics.jsonl").read_text().splitlines()
        steps = [json.loads(line)["step"] for line in lines if "loss" in json.loads(line)]
        assert len(steps) == len(set(steps)), "metrics written once, by rank 0"
    assert not list(Path(run_dir).rglob(".*.tmp"))
    assert Ranking.load(run_dir / "stage2" / "ranking.json").num_layers == 28


CONFIGS = Path(__file__).parent.parent / "configs" / "accelerate"


def _launch(config: Path, args: list[str], overrides: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--main_process_port",
           "29544", "-m", "ila.cli", *args]
    for o in overrides:
        cmd += ["--set", o]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def test_fsdp_config_trains_stage1_on_two_cpu_processes(stage1_dir, tmp_path):
    """The shipped FSDP config, with two CPU processes instead of eight GPUs."""
    import yaml

    overrides, one = stage1_dir
    cfg = yaml.safe_load((CONFIGS / "fsdp.yaml").read_text())
    cfg.update(num_processes=2, use_cpu=True, mixed_precision="no")
    local = tmp_path / "fsdp-cpu.yaml"
    local.write_text(yaml.safe_dump(cfg))
    run_dir = tmp_path / "fsdp"
    _launch(local, ["train", "--run-dir", str(run_dir)], overrides)
    from safetensors.torch import load_file

    sharded = load_file(run_dir / "stage1" / "final" / "adapter_model.safetensors")
    single = load_file(one / "stage1" / "final" / "adapter_model.safetensors")
    assert sharded.keys() == single.keys()
    assert all(sharded[k].shape == single[k].shape for k in single)  # whole tensors, not shards


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="DeepSpeed ZeRO needs CUDA")
def test_deepspeed_zero2_config(stage1_dir, tmp_path):
    import torch
    import yaml

    pytest.importorskip("deepspeed")
    overrides, _ = stage1_dir
    overrides = [o for o in overrides if not o.startswith("model.device")] + ["model.device=cuda"]
    cfg = yaml.safe_load((CONFIGS / "deepspeed_zero2.yaml").read_text())
    cfg.update(num_processes=torch.cuda.device_count())
    local = tmp_path / "ds.yaml"
    local.write_text(yaml.safe_dump(cfg))
    _launch(local, ["train", "--run-dir", str(tmp_path / "ds")], overrides)
    assert (tmp_path / "ds" / "stage1" / "summary.json").is_file()
