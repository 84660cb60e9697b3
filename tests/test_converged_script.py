"""scripts/converged.sh: which comparisons it asks for, in which precision, into which folders. It drives
hours of training, so its plan is checked with a stand-in `ila` that only records its arguments."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _clone(tmp_path: Path) -> Path:
    """The script in a folder of its own, with a kept ranking and a stand-in `ila` in .venv/bin."""
    clone = tmp_path / "clone"
    (clone / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "converged.sh", clone / "scripts")
    kept = clone / "docs" / "results" / "converged" / "smollm2"
    (kept / "stage2").mkdir(parents=True)
    for name in ("ranking", "ranking-taylor", "ranking-update-norm", "ranking-snr"):
        (kept / "stage2" / f"{name}.json").write_text("{}\n")
    (kept / "runs" / "all-seed0").mkdir(parents=True)
    (kept / "runs" / "all-seed0" / "result.json").write_text('{"kept": "bf16"}\n')
    bin_ = clone / ".venv" / "bin"
    bin_.mkdir(parents=True)
    (bin_ / "ila").write_text(
        f'#!/usr/bin/env bash\nprintf "%q " "$@" >> {clone}/calls\necho >> {clone}/calls\n'
    )
    (bin_ / "ila").chmod(0o755)
    # the venv's python, which this test runs under; the check of the CPU says it has bf16 instructions
    python = bin_ / "python"
    python.write_text(
        f'#!/usr/bin/env bash\ncase "$*" in *bf16_is_native*) exit 0;; esac\nexec {sys.executable} "$@"\n'
    )
    python.chmod(0o755)
    (bin_ / "activate").write_text(f'export PATH="{bin_}:$PATH"\n')
    return clone


def _converged(clone: Path, *args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run the script; its exit status and what it wrote to stderr. Into files, not pipes: the copying loop's
    `sleep` outlives the script by up to a minute and would hold a pipe open."""
    with open(clone / "stdout", "w") as out, open(clone / "stderr", "w") as err:
        rc = subprocess.run(
            ["bash", "scripts/converged.sh", *args], cwd=clone, stdout=out, stderr=err,
            env={**os.environ, **(env or {})},
        ).returncode  # fmt: skip
    return rc, (clone / "stderr").read_text()


def _calls(clone: Path) -> list[list[str]]:
    path = clone / "calls"
    return [shlex.split(line) for line in path.read_text().splitlines()] if path.exists() else []


def _option(call: list[str], name: str) -> list[str]:
    """Every value given to ``name`` (``--set`` may come many times)."""
    return [call[i + 1] for i, a in enumerate(call) if a == name]


def test_another_precision_trains_only_stage_3_in_it_into_folders_of_its_own(tmp_path):
    clone = _clone(tmp_path)
    kept = clone / "docs" / "results" / "converged" / "smollm2"
    before = sorted(p.relative_to(kept) for p in kept.rglob("*"))
    rc, stderr = _converged(clone, "smollm2", "grid", "fp32")
    assert rc == 0, stderr
    calls = _calls(clone)
    # the kept ranking is there, so no stage is trained again: comparisons only
    assert [c[0] for c in calls] == ["compare-strategies"] * 4
    for call in calls:
        sets = _option(call, "--set")
        assert "stage3.train.precision=fp32" in sets
        assert {"stage1.train.precision=bf16", "stage2.precision=bf16"} <= set(sets)
        assert _option(call, "--run-dir") == ["runs/converged-smollm2"]  # the one ranking of the model
        (out,) = _option(call, "--out")
        assert out.startswith("runs/converged-smollm2-fp32-"), out
    # the draws first, then the benchmarks the kept runs lack, then the rest of the grid
    assert _option(calls[0], "--seeds") == ["6"] and _option(calls[0], "--only") == ["all"]
    assert "--tasks" in calls[1] and "random-30" in calls[1]
    # ILA's other sizes and the cheap scorers first, with the verdict strategies so that the report keeps
    # them, then every strategy
    assert _option(calls[2], "--seeds") == ["1"] and {"all", "ila-top-*", "*-top-30", "random-30"} <= {
        *calls[2]
    }
    assert _option(calls[3], "--seeds") == ["1"] and "--only" not in calls[3]
    assert (clone / "runs" / "converged-smollm2" / "stage2" / "ranking.json").is_file()
    # the kept bf16 results are neither restored into the fp32 comparison nor touched
    assert not (clone / "runs" / "converged-smollm2-fp32-strategies" / "all-seed0").exists()
    assert sorted(p.relative_to(kept) for p in kept.rglob("*")) == before


def test_the_scope_bounds_another_precision_too(tmp_path):
    clone = _clone(tmp_path)
    rc, stderr = _converged(clone, "smollm2", "draws", "fp32")
    assert rc == 0, stderr
    assert [_option(c, "--seeds") for c in _calls(clone)] == [["6"], ["1"]]  # no grid after the benchmarks


def test_a_precision_it_does_not_know_is_refused_before_anything_runs(tmp_path):
    clone = _clone(tmp_path)
    rc, stderr = _converged(clone, "smollm2", "grid", "fp16")
    assert rc == 2 and "bf16 or fp32" in stderr
    assert _calls(clone) == [] and not (clone / "runs").exists()


def test_without_bf16_instructions_the_kept_precision_trains_nothing_and_says_what_waits(tmp_path):
    clone = _clone(tmp_path)
    python = clone / ".venv" / "bin" / "python"  # the check of the CPU: no bf16 instructions here
    python.write_text("#!/usr/bin/env bash\nexit 1\n")
    python.chmod(0o755)
    rc, stderr = _converged(clone, "smollm2", "grid")
    assert rc == 3  # not a failure: evidence.sh goes on with the fp32 steps
    assert "those not kept in docs/results/converged/smollm2 wait" in stderr and "grid fp32" in stderr
    assert _calls(clone) == [] and not (clone / "runs").exists()


def test_the_benchmarks_train_a_kept_equal_time_run_with_the_steps_it_had(tmp_path):
    """Retrained to be scored, the equal-time run must be the kept one: sized from the step times it was
    sized from, which the script restores into the benchmarks' folder, not timed anew."""
    clone = _clone(tmp_path)
    run = clone / "docs" / "results" / "converged" / "smollm2" / "runs" / "ila-top-30-equal-time-seed0"
    run.mkdir(parents=True)
    result = {"name": "ila-top-30-equal-time", "run": run.name, "family": "equal-time", "seed": 0,
              "steps": 527, "timed_step_seconds": [3.9, 5.15], "settings_sha256": "a"}  # fmt: skip
    (run / "result.json").write_text(json.dumps(result))
    rc, stderr = _converged(clone, "smollm2", "verdicts")
    assert rc == 0, stderr
    (bench,) = [c for c in _calls(clone) if "--tasks" in c]
    assert _option(bench, "--equal-time") == ["ila-top-30"]
    (out,) = _option(bench, "--out")
    timing = json.loads((clone / out / ".timing" / "ila-top-30-seed0.json").read_text())
    assert (timing["seconds"], timing["all_seconds"], timing["settings_sha256"]) == (3.9, 5.15, "a")


def test_the_benchmark_tasks_are_those_asked_for(tmp_path):
    """Three by default; CONVERGED_TASKS names others (an index without HHH's archive: the other two), and a
    run scored on those is kept."""
    two = "ila_mmlu_dev ila_ifeval"
    for sub, env, tasks in (
        ("three", {}, "ila_mmlu_dev ila_hhh ila_ifeval"),
        ("two", {"CONVERGED_TASKS": two}, two),
    ):
        clone = _clone(tmp_path / sub)
        scored = clone / "runs" / "converged-smollm2-benchmarks" / "all-seed0"
        scored.mkdir(parents=True)
        done = {"benchmark_settings": {"ila_mmlu_dev": {}, "ila_ifeval": {}}}
        (scored / "result.json").write_text(json.dumps(done))
        rc, stderr = _converged(clone, "smollm2", "verdicts", env=env)
        assert rc == 0, stderr
        (bench,) = [c for c in _calls(clone) if "--tasks" in c]
        assert bench[bench.index("--tasks") + 1 : bench.index("--limit")] == tasks.split()
        kept = clone / "docs" / "results" / "converged" / "smollm2-benchmarks" / "runs" / "all-seed0"
        assert kept.exists() == (tasks == two)  # kept once scored on every task asked for
