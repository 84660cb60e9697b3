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

    # Stages one at a time, on the same run directory (its config.yaml is reused).
    assert main(["score", "--run-dir", str(run_dir), "--set", "stage2.milestone=50", "--set", "stage2.steps=2"]) == 0
    ranking = json.loads((run_dir / "stage2" / "ranking.json").read_text())
    assert ranking["milestone"] == "50%"
    assert main(["finetune", "--run-dir", str(run_dir), "--drop-bottom", "0.25"]) == 0
    selection = json.loads((run_dir / "stage3" / "selection.json").read_text())
    assert selection["mode"] == "drop_bottom" and selection["num_selected"] == 21
    layers = ranking["order"][:2]
    assert main(["finetune", "--run-dir", str(run_dir), "--layers", *layers]) == 0
    selection = json.loads((run_dir / "stage3" / "selection.json").read_text())
    assert selection["layers"] == layers

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


@pytest.mark.parametrize("args, needle", [
    (["run", "--set", "stage2.lerning_rate=0.1"], "stage2.lerning_rate"),
    (["train", "--set", "stage1.train.batch_size=0"], "stage1.train.batch_size"),
    (["finetune", "--run-dir", "x", "--top", "1.5"], "stage3.selection.fraction"),
    (["run", "--set", "novalue"], "key=value"),
])
def test_bad_config_exits_nonzero_naming_the_key(args, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # nothing written for an invalid config


def test_missing_model_is_a_clear_error(tmp_path, tiny_data_file, capsys):
    code = main(["train", "--run-dir", str(tmp_path / "r"), "--set", f"model.name={tmp_path / 'nope'}",
                 "--set", f"data.name={tiny_data_file}"])
    assert code == 2
    assert "does not exist" in capsys.readouterr().err


def test_console_script_help_and_config():
    out = subprocess.run([sys.executable, "-m", "ila.cli", "--help"], capture_output=True, text=True, check=True).stdout
    for cmd in ("run", "train", "score", "finetune"):
        assert cmd in out
    out = subprocess.run([sys.executable, "-m", "ila.cli", "config", "--set", "stage2.steps=9"],
                         capture_output=True, text=True, check=True).stdout
    assert "steps: 9" in out
    bad = subprocess.run([sys.executable, "-m", "ila.cli", "config", "--set", "lora.rank=4"], capture_output=True, text=True)
    assert bad.returncode == 2 and "lora.rank" in bad.stderr


def test_full_disk_is_a_clear_error(tmp_path, tiny_config, capsys, monkeypatch):
    import ila.artifacts as artifacts

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(artifacts.os, "fsync", full)
    assert main(["train", "--run-dir", str(tmp_path / "r"), *_sets(tiny_config)]) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "run the same command again" in err
    assert not (tmp_path / "r" / "config.yaml").exists()
