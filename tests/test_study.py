"""The study command end to end on tiny models and files."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from conftest import write_model_dir

from ila.cli import main


def test_study_on_tiny_models(tmp_path, tiny_model_dir, tiny_data_file, capsys):
    deeper = write_model_dir(tmp_path / "deeper", num_blocks=6, seed=1)
    other = tmp_path / "other.jsonl"
    with other.open("w") as f:
        for i in range(40):
            f.write(
                json.dumps(
                    {"prompt": f"Count to {i % 7}.", "completion": " ".join(map(str, range(i % 7 + 1)))}
                )
                + "\n"
            )
    code = tmp_path / "code.jsonl"
    with code.open("w") as f:
        for i in range(40):
            f.write(json.dumps({"prompt": f"def add_{i}(x):", "completion": f"    return x + {i}"}) + "\n")
    base = tmp_path / "base.yaml"
    base.write_text(
        yaml.safe_dump(
            {
                "model": {"device": "cpu"},
                "data": {"max_length": 64, "heldout_fraction": 0.0},
                "stage1": {
                    "train": {"max_steps": 4, "batch_size": 4, "eval_heldout": False},
                    "stability_window": 2,
                },
                "stage2": {"steps": 3, "batch_size": 4},
            }
        )
    )
    study = tmp_path / "study.yaml"
    study.write_text(
        yaml.safe_dump(
            {
                "base": str(base),
                "models": {str(tiny_model_dir): [], str(deeper): []},
                "alignment": [str(tiny_data_file), str(other)],
                "reasoning": [],
                "code": [str(code)],
                "seeds": [0, 1],
                "seed_dataset": str(tiny_data_file),
                "milestones": [0.5, 1.0],
                "cross_model_datasets": [str(tiny_data_file)],
                "fractions": [0.25, 0.5],
                "scorers": ["update-norm", "snr"],
            },
            sort_keys=False,
        )
    )
    out = tmp_path / "out"
    assert main(["study", "--config", str(study), "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    for group in (
        "alignment datasets",
        "seeds",
        "milestone 050% vs 100%",
        "vs deeper",
        "update-norm: seeds",
        "snr: alignment datasets",
        "ila vs update-norm on",
        "alignment vs code (code)",
    ):
        assert group in report
    # the paper's figure stands beside the comparisons it is about, and only those
    rows = [line for line in report.splitlines() if line.startswith("| ")]
    assert any("vs deeper" in row and "weaker across models" in row for row in rows)
    assert not any("ila vs update-norm" in row and "weaker across models" in row for row in rows)
    assert any("alignment vs code" in row and "not in the paper" in row for row in rows)
    assert not any("seeds" in row and "update-norm" in row and "stable across seeds" in row for row in rows)
    data = json.loads((out / "study.json").read_text())
    assert data["kind"] == "ila.study" and len(data["runs"]) == 5
    norm = data["groups"]["update-norm: seeds"]
    assert all(r["scorer"] == "update-norm" for r in norm["rankings"])
    assert list((out / "plots").glob("*.png"))
    # A second call reuses every ranking, without the runs' stage 1 (what a fresh checkout restores)
    from ila import study as study_module

    stage1s = [d for d in (out / "runs").rglob("stage1") if d.is_dir()]
    assert len(stage1s) == 5
    for folder in stage1s:
        shutil.rmtree(folder)
    with pytest.MonkeyPatch.context() as mp:
        for stage in ("stage1", "stage2"):
            mp.setattr(study_module, stage, lambda *a, **k: pytest.fail("a finished run ran again"))
        assert main(["study", "--config", str(study), "--out", str(out)]) == 0
    # a kept ranking from other settings (the study config changed since): refused, not reused
    kept = next((out / "runs").rglob("ranking.json"))
    saved = kept.read_text()
    kept.write_text(json.dumps({**json.loads(saved), "config_sha256": "0" * 64}))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(study_module, "stage1", lambda *a, **k: pytest.fail("trained instead of refusing"))
        assert main(["study", "--config", str(study), "--out", str(out)]) != 0
    assert "was made with other settings" in capsys.readouterr().err
    kept.write_text(saved)
    assert data["runs_reused"] == 0
    second = json.loads((out / "study.json").read_text())
    assert second["runs_reused"] == 5  # its wall time is this call's, and says so
    assert "which reused 5 of the 5 runs from earlier calls" in (out / "report.md").read_text()
    again = second["groups"]
    assert again.keys() == data["groups"].keys()
    for name, group in again.items():
        assert {**group, "created": None} == {**data["groups"][name], "created": None}


def test_the_study_figures_are_skipped_without_matplotlib(tmp_path, monkeypatch):
    """The study's numbers stand without matplotlib: its figures are left out, nothing is raised."""
    import sys

    from ila import study

    for mod in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    cfg = study.StudyConfig(milestones=[1.0])
    study._plots(cfg, {}, {"groups": {}}, tmp_path)
    assert not (tmp_path / "plots").exists()
