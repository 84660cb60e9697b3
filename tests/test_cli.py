"""The command line: every stage on a tiny config, strict errors with the key named."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ila.cli import main


def _sets(overrides):
    out = []
    for o in overrides:
        out += ["--set", o]
    return out


def test_run_train_score_finetune(tmp_path, tiny_config, capsys):
    run_dir = tmp_path / "run"
    assert main(["run", "--run-dir", str(run_dir), *_sets(tiny_config)]) == 0
    out = capsys.readouterr().out
    assert "ILA run complete" in out and str(run_dir / "stage2" / "ranking.json") in out
    s3 = json.loads((run_dir / "stage3" / "summary.json").read_text())
    lo, hi = s3["heldout"]["ci95"]
    assert f"held-out loss {s3['heldout_loss']:.4f} (95 % interval {lo:.4f}-{hi:.4f})" in out
    assert out.count("95 % interval") == 3  # base, stage 1, stage 3

    # Stages one at a time, on the same run directory (its config.yaml is reused).
    assert (
        main(["score", "--run-dir", str(run_dir), "--set", "stage2.milestone=50", "--set", "stage2.steps=2"])
        == 0
    )
    ranking = json.loads((run_dir / "stage2" / "ranking.json").read_text())
    assert ranking["milestone"] == "50%"
    assert main(["finetune", "--run-dir", str(run_dir), "--drop-bottom", "0.25"]) == 0
    selection = json.loads((run_dir / "stage3" / "selection.json").read_text())
    assert selection["mode"] == "drop_bottom" and selection["num_selected"] == 21
    layers = ranking["order"][:2]
    assert main(["finetune", "--run-dir", str(run_dir), "--layers", *layers]) == 0
    selection = json.loads((run_dir / "stage3" / "selection.json").read_text())
    assert selection["layers"] == layers

    # A misspelt layer: every command that selects names the closest real layers.
    typo = layers[0].replace("proj", "prj")
    capsys.readouterr()
    assert main(["finetune", "--run-dir", str(run_dir), "--layers", typo]) == 2
    assert f"did you mean '{layers[0]}'" in capsys.readouterr().err
    assert main(["select", str(run_dir / "stage2" / "ranking.json"), "--layers", typo]) == 2
    assert f"did you mean '{layers[0]}'" in capsys.readouterr().err

    # One selection.json layout: stage 3 and ila export write the same fields for the same selection.
    assert (
        main(
            [
                "export",
                str(run_dir / "stage2" / "ranking.json"),
                "--layers",
                *layers,
                "--out",
                str(tmp_path / "export"),
            ]
        )
        == 0
    )
    exported = json.loads((tmp_path / "export" / "selection.json").read_text())
    common = (
        "schema_version",
        "kind",
        "mode",
        "fraction",
        "base_model",
        "include_lm_head",
        "num_selected",
        "num_layers",
        "layers",
    )
    assert {k: selection[k] for k in common} == {k: exported[k] for k in common}
    assert {"ila_version", "created", "ranking"} <= selection.keys() & exported.keys()

    fresh = tmp_path / "train-only"
    assert main(["train", "--run-dir", str(fresh), *_sets(tiny_config)]) == 0
    assert (fresh / "stage1" / "final" / "adapter_model.safetensors").is_file()
    assert not (fresh / "stage2").exists()


def test_run_skips_completed_stages(tmp_path, tiny_config, caplog, capsys):
    run_dir = tmp_path / "run"
    assert main(["run", "--run-dir", str(run_dir), *_sets(tiny_config)]) == 0
    before = (run_dir / "stage2" / "ranking.json").read_text()
    assert main(["run", "--run-dir", str(run_dir)]) == 0
    assert "already complete" in caplog.text
    assert (run_dir / "stage2" / "ranking.json").read_text() == before

    # A changed stage-3 setting: `run` refuses to overwrite the old result; `finetune` redoes stage 3 alone.
    assert main(["run", "--run-dir", str(run_dir), "--set", "stage3.selection.fraction=0.5"]) == 2
    assert "ila finetune" in capsys.readouterr().err
    assert main(["finetune", "--run-dir", str(run_dir), "--set", "stage3.selection.fraction=0.5"]) == 0
    assert (run_dir / "stage2" / "ranking.json").read_text() == before
    assert json.loads((run_dir / "stage3" / "selection.json").read_text())["num_selected"] == 14
    caplog.clear()
    assert main(["run", "--run-dir", str(run_dir)]) == 0  # the run dir's config now has fraction 0.5
    assert caplog.text.count("already complete") == 3

    # A changed data setting would make stage 1 stale: refused, nothing rewritten.
    config_before = (run_dir / "config.yaml").read_text()
    assert main(["run", "--run-dir", str(run_dir), "--set", "data.max_length=48"]) == 2
    assert (run_dir / "config.yaml").read_text() == config_before


@pytest.mark.parametrize(
    "args, needle",
    [
        (["run", "--set", "stage2.lerning_rate=0.1"], "stage2.lerning_rate"),
        (["train", "--set", "stage1.train.batch_size=0"], "stage1.train.batch_size"),
        (["finetune", "--run-dir", "x", "--top", "1.5"], "stage3.selection.fraction"),
        (["run", "--set", "novalue"], "key=value"),
    ],
)
def test_bad_config_exits_nonzero_naming_the_key(args, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # nothing written for an invalid config


def test_missing_model_is_a_clear_error(tmp_path, tiny_data_file, capsys):
    code = main(
        [
            "train",
            "--run-dir",
            str(tmp_path / "r"),
            "--set",
            f"model.name={tmp_path / 'nope'}",
            "--set",
            f"data.name={tiny_data_file}",
        ]
    )
    assert code == 2
    assert "does not exist" in capsys.readouterr().err


def test_console_script_help_and_config():
    out = subprocess.run(
        [sys.executable, "-m", "ila.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for cmd in ("run", "train", "score", "finetune"):
        assert cmd in out
    out = subprocess.run(
        [sys.executable, "-m", "ila.cli", "config", "--set", "stage2.steps=9"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "steps: 9" in out
    bad = subprocess.run(
        [sys.executable, "-m", "ila.cli", "config", "--set", "lora.rank=4"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "lora.rank" in bad.stderr


def test_full_disk_while_writing_a_checkpoint_is_a_clear_error_and_resumes(
    tmp_path, tiny_config, capsys, caplog, monkeypatch
):
    """`ila train` saves a Trainer checkpoint every 2 of 8 steps; the disk fills up while checkpoint-4 is
    written. The error is clear (exit 1), the completed checkpoint-2 and the files before it are intact, the
    cut-off checkpoint-4 is never marked complete, and the same command again resumes from checkpoint-2."""
    import logging

    from test_artifacts import full_disk_in_safetensors, full_disk_on

    def in_checkpoint_4(path):
        return path.parent.name == "checkpoint-4"

    failed = full_disk_on(monkeypatch, in_checkpoint_4)
    failed_weights = full_disk_in_safetensors(monkeypatch, in_checkpoint_4)
    run_dir = tmp_path / "r"
    command = ["train", "--run-dir", str(run_dir), *_sets(tiny_config)]
    assert main(command) == 1
    err = capsys.readouterr().err
    assert "ila: error: could not read or write a file" in err and "No space left on device" in err
    assert "run the same command again" in err
    assert len(failed) + len(failed_weights) == 1, "the checkpoint write was never attempted"

    stage1 = run_dir / "stage1"
    checkpoints = stage1 / "checkpoints"
    assert json.loads((checkpoints / "checkpoint-2" / "trainer_state.json").read_text())["global_step"] == 2
    assert not (checkpoints / "checkpoint-4" / "trainer_state.json").exists()  # cut off: not complete
    assert not (stage1 / "summary.json").exists() and not (stage1 / "final").exists()
    assert (run_dir / "config.yaml").read_text().startswith("# ila")
    assert json.loads((stage1 / "started.json").read_text())["stage"] == "stage1"
    assert not list(run_dir.rglob(".*.tmp")), "a temporary file was left behind"

    monkeypatch.undo()  # space again
    caplog.clear()
    caplog.set_level(logging.INFO)
    assert main(command) == 0
    assert "removing incomplete checkpoint" in caplog.text and "checkpoint-4" in caplog.text
    assert f"resuming from {checkpoints / 'checkpoint-2'}" in caplog.text
    assert json.loads((stage1 / "summary.json").read_text())["steps"] == 8
    assert (stage1 / "final" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("how", ["SIGTERM", "Ctrl-C"])
def test_sigterm_and_ctrl_c_exit_130_with_a_resume_hint(tmp_path, tiny_config, capsys, monkeypatch, how):
    """A scheduler's SIGTERM ends the command like Ctrl-C: no traceback, exit code 130, a hint to resume."""
    import os
    import signal
    import time

    import ila.pipeline as pipeline

    def interrupted_stage1(cfg, run_dir):
        if how == "Ctrl-C":
            raise KeyboardInterrupt
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler interrupts this
        raise AssertionError("SIGTERM did not stop the command")

    def unhandled(signum, frame):  # noqa: ANN001
        raise AssertionError("ila did not install its own SIGTERM handler")

    monkeypatch.setattr(pipeline, "stage1", interrupted_stage1)
    previous = signal.signal(signal.SIGTERM, unhandled)
    try:
        code = main(["train", "--run-dir", str(tmp_path / "r"), *_sets(tiny_config)])
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert code == 130
    err = capsys.readouterr().err
    assert "ila: interrupted; run the same command again to resume" in err and "Traceback" not in err


def test_compare_strategies_hands_on_which_runs_to_fit(tmp_path, tiny_config, monkeypatch, capsys):
    from ila import strategy_report

    seen = {}

    def compare(cfg, run_dir, out, **options):  # noqa: ANN001, ANN003
        seen.update(options)
        out.mkdir(parents=True)
        (out / "strategies.md").write_text("the report\n")
        return out / "strategies.md"

    monkeypatch.setattr(strategy_report, "compare_strategies", compare)
    args = ["compare-strategies", "--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "s"),
            "--seeds", "3", "--only", "all", "ila-top-30", "--equal-time", "ila-top-30",
            *_sets(tiny_config)]  # fmt: skip
    assert main(args) == 0
    assert (
        seen["seeds"] == 3 and seen["only"] == ["all", "ila-top-30"] and seen["equal_time"] == ["ila-top-30"]
    )
    assert "the report" in capsys.readouterr().out
