"""scripts/evidence.sh: the order of the converged measurements, on a CPU with bf16 instructions and on one
without. Each step drives hours of training, so the steps are stand-ins that only record their arguments and
answer as the real ones do (exit 3 for a SmolLM2 step in bf16 where the CPU has no bf16 instructions)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

STAND_IN = """#!/usr/bin/env bash
echo "$(basename "$0") $*" >> calls
[[ " $(basename "$0") $* " == *" $FAIL "* ]] && exit 1
# a SmolLM2 step in its kept precision (bf16) needs bf16 instructions
[[ $(basename "$0") == converged.sh && $1 == smollm2 && ${3:-bf16} == bf16 && -z $BF16 ]] && exit 3
exit 0
"""


def _evidence(tmp_path: Path, bf16: bool, fail: str = "none") -> tuple[int, list[str], str]:
    clone = tmp_path / "clone"
    (clone / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "evidence.sh", clone / "scripts")
    for name in ("converged.sh", "study-converged.sh"):
        (clone / "scripts" / name).write_text(STAND_IN)
    env = {"PATH": "/usr/bin:/bin", "BF16": "1" if bf16 else "", "FAIL": fail}
    done = subprocess.run(["bash", "scripts/evidence.sh"], cwd=clone, env=env, capture_output=True, text=True)
    return done.returncode, (clone / "calls").read_text().splitlines(), done.stderr


def test_a_bf16_machine_runs_smollm2s_grid_before_the_steps_any_machine_can_run(tmp_path):
    rc, calls, _ = _evidence(tmp_path, bf16=True)
    assert rc == 0
    assert calls == [
        "converged.sh smollm2 draws",
        "converged.sh smollm2",
        "study-converged.sh ",
        "converged.sh gemma3-270m verdicts",
    ]


def test_without_bf16_the_smollm2_steps_stand_down_and_the_fp32_steps_go_on(tmp_path):
    rc, calls, _ = _evidence(tmp_path, bf16=False)
    assert rc == 0  # a SmolLM2 step that cannot run here is not a failure
    assert calls == [
        "converged.sh smollm2 draws",
        "converged.sh smollm2",
        "study-converged.sh ",
        "converged.sh gemma3-270m verdicts",
    ]  # and no SmolLM2 comparison in fp32 of its own: the kept bf16 one is complete


@pytest.mark.parametrize("bf16", [True, False])
def test_a_failed_step_does_not_stop_the_others_and_is_named(tmp_path, bf16):
    rc, calls, stderr = _evidence(tmp_path, bf16=bf16, fail="study-converged.sh")  # the study fails
    assert rc == 1 and "failed: bash scripts/study-converged.sh" in stderr
    assert calls[-1] == "converged.sh gemma3-270m verdicts"
