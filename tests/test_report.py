"""The run report: ila run writes report.md whose every figure exists, whose numbers are the run's, and
which shows an unfinished run as far as it got."""

from __future__ import annotations

import json
import re
import shutil
import sys

import pytest
from conftest import TINY_OVERRIDES

from ila.cli import main
from ila.report import write_report

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir, tiny_data_file):
    pytest.importorskip("matplotlib")
    run = tmp_path_factory.mktemp("report") / "run"
    sets = sum((["--set", o] for o in TINY_OVERRIDES(tiny_model_dir, tiny_data_file)), [])
    assert main(["run", "--run-dir", str(run), *sets]) == 0
    return run


def _images(report: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)


def test_ila_run_writes_a_report_with_every_figure(run_dir):
    report = (run_dir / "report.md").read_text()
    images = _images(report)
    assert {p.split("/")[-1] for p in images} == {
        "heldout.png",
        "loss.png",
        "stability.png",
        "scores.png",
        "ranking.png",
        "selection.png",
    }
    for image in images:  # relative links, as GitHub renders them
        assert not image.startswith("/") and (run_dir / image).read_bytes().startswith(PNG)
    for section in ("## Stage 1", "## Stage 2", "## Stage 3", "## Going on"):
        assert section in report
    assert "Not run yet" not in report


def test_the_report_shows_the_runs_numbers(run_dir):
    report = (run_dir / "report.md").read_text()
    s1 = json.loads((run_dir / "stage1" / "summary.json").read_text())
    s3 = json.loads((run_dir / "stage3" / "summary.json").read_text())
    for entry in (s1["base_heldout"], s1["heldout"], s3["heldout"]):
        lo, hi = entry["ci95"]
        assert f"{entry['loss']:.4f} [{lo:.4f}, {hi:.4f}]" in report
    ranking = json.loads((run_dir / "stage2" / "ranking.json").read_text())
    assert f"| 1 | `{ranking['order'][0]}` |" in report
    assert f"{s3['num_selected']} of {s3['num_layers']} layers" in report
    assert f"ila export {run_dir}/stage2/ranking.json --top 0.3" in report


def test_an_unfinished_run_is_reported_as_far_as_it_got(run_dir, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(run_dir, partial, ignore=shutil.ignore_patterns("stage2", "stage3", "report*"))
    report = write_report(partial).read_text()
    assert report.count("Not run yet") == 2 and "## Stage 1" in report
    assert {p.split("/")[-1] for p in _images(report)} == {"heldout.png", "loss.png", "stability.png"}


def test_without_matplotlib_the_report_has_no_figures_and_says_so(run_dir, tmp_path, monkeypatch):
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("report*"))
    for mod in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    assert main(["report", str(copy)]) == 0
    report = (copy / "report.md").read_text()
    assert _images(report) == [] and "pip install 'ila[plots]'" in report
    assert "## Stage 3" in report


def test_report_refuses_a_folder_that_is_no_run(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "is it an ila run directory" in capsys.readouterr().err


def test_the_loss_figure_draws_the_held_out_curve_where_a_stage_wrote_one(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from ila import report

    figures = []
    monkeypatch.setattr(report, "save_figure", lambda fig, path: figures.append(fig) or path)
    training = [{"step": s, "loss": 2.0 - 0.01 * s} for s in range(5, 55, 5)]
    curve = [
        {"step": s, "loss": 2.1 - 0.005 * s, "ci95": [2.0 - 0.005 * s, 2.2 - 0.005 * s]} for s in (20, 40)
    ]
    report.plot_losses({"stage1": training, "stage3": training}, tmp_path / "a.png", {"stage3": curve})
    stage1, stage3 = figures[0].axes
    assert [line.get_label() for line in stage1.lines] == ["training"]
    held = [line for line in stage3.lines if line.get_label() == "held-out"]
    assert len(held) == 1 and list(held[0].get_xdata()) == [20, 40]
    assert list(held[0].get_ydata()) == [r["loss"] for r in curve]
