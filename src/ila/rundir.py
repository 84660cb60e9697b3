"""The one place that knows the run directory's layout.

    run_dir/
      config.yaml                 resolved config (written first)
      stage1/milestones/025/ ...  the update at 25/50/75/100 % of the planned steps (+ ila_adapter.json)
      stage1/final/               the update where stage 1 ended
      stage1/metrics.jsonl        Trainer logs;  stage1/stability.jsonl  epsilon-stability figure
      stage1/summary.json         written last: marks stage 1 complete
      stage2/ranking.json         the ILA ranking; stage2/ranking-<scorer>.json for the other scorers
      stage2/scores.jsonl         score trajectories;  stage2/summary.json
      stage3/adapter/             PEFT adapter on the selected layers (stage3.method: lora)
      stage3/model/               transformers model folder (stage3.method: full)
      stage3/selection.json       the selected layers;  stage3/summary.json
      eval/                       ila evaluate's results
      data/<key>/                 the tokenized train and held-out examples, shared by the stages

Each stage reads only files written by earlier stages, so any stage can be re-run alone or fed a ranking or
an adapter from another run.

Besides the paths (:class:`RunDir`), the state of a run lives here: the resolved config written first, a
stage's start marker (which guards resuming) and its summary (which marks it complete).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from ._version import __version__
from .artifacts import is_main_process, read_json, sync_processes, write_json_atomic, write_text_atomic
from .config import RunConfig, load_config
from .errors import ConfigError

STAGES = ("stage1", "stage2", "stage3")


def milestone_name(fraction: float) -> str:
    """The folder name of the milestone at ``fraction`` of the planned steps (0.25 -> ``025``)."""
    return f"{round(fraction * 100):03d}"


class RunDir:
    """Paths inside one run directory (nothing is created or read here)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    def stage(self, stage: str) -> Path:
        return self.root / stage

    def summary(self, stage: str) -> Path:
        """Written last by a stage: its presence marks the stage complete."""
        return self.root / stage / "summary.json"

    @property
    def milestones(self) -> Path:
        return self.root / "stage1" / "milestones"

    def milestone(self, fraction: float) -> Path:
        return self.milestones / milestone_name(fraction)

    @property
    def stage1_final(self) -> Path:
        return self.root / "stage1" / "final"

    def ranking(self, scorer: str = "ila") -> Path:
        """``ranking.json`` for ILA, ``ranking-<scorer>.json`` for the other scorers."""
        return self.root / "stage2" / ("ranking.json" if scorer == "ila" else f"ranking-{scorer}.json")

    @property
    def selection(self) -> Path:
        return self.root / "stage3" / "selection.json"

    def stage3_output(self, method: str) -> Path:
        """Where stage 3 writes its result: a PEFT adapter (``lora``) or a model folder (``full``)."""
        return self.root / "stage3" / ("adapter" if method == "lora" else "model")

    def stage3_result(self) -> Path | None:
        """The result of a completed stage 3, whichever form it took; None when there is none."""
        for method in ("lora", "full"):
            path = self.stage3_output(method)
            if path.is_dir():
                return path
        return None

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def data(self) -> Path:
        """The tokenized examples, one folder per data config and tokenizer (:mod:`ila.tokenized`)."""
        return self.root / "data"


def now() -> str:
    """The time results record (UTC, to the second)."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def prepare_run_dir(cfg: RunConfig, run_dir: str | Path) -> Path:
    """Create ``run_dir`` and write the resolved config into it (first, before any stage output)."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run directory {run_dir} exists and is not a folder")
    run_dir.mkdir(parents=True, exist_ok=True)
    header = f"# ila {__version__} resolved config, {now()}\n"
    write_text_atomic(RunDir(run_dir).config, header + cfg.to_yaml())
    return run_dir


def run_config(run_dir: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """The config a run directory was made with, plus ``overrides``."""
    path = RunDir(run_dir).config
    if not path.is_file():
        raise ConfigError(f"{run_dir} has no config.yaml: is it an ila run directory?")
    return load_config(path, overrides)


def stage_done(run_dir: Path, stage: str, cfg: RunConfig | None = None) -> bool:
    """Whether ``stage`` is complete in ``run_dir``; with ``cfg``, refuse a result of another config."""
    path = RunDir(run_dir).summary(stage)
    if not path.is_file():
        return False
    if cfg is not None:
        recorded = read_json(path, f"{stage} summary").get("stage_sha256")
        if recorded is not None and recorded != cfg.stage_sha256(stage):
            raise ConfigError(
                f"{run_dir} holds a completed {stage} made with a different config (model, data, lora, "
                f"seed or {stage} settings changed) and `run` does not overwrite it: use another --run-dir, "
                f"--redo to run every stage again, or run one stage alone (ila train / ila score / "
                f"ila finetune)"
            )
    return True


def start_stage(cfg: RunConfig, folder: Path, stage: str, inputs: dict[str, Any] | None = None) -> None:
    """Record which config (and which ``inputs`` from outside the config, such as the adapter that stage 2
    scores) a stage runs with; refuse to resume an interrupted stage under others (its checkpoints would mix
    two runs, and the result would carry the wrong label)."""
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / "started.json"
    sha = cfg.stage_sha256(stage)
    if inputs:
        blob = json.dumps({"config": sha, **inputs}, sort_keys=True)
        sha = hashlib.sha256(blob.encode()).hexdigest()
    checkpoints = folder / "checkpoints"
    if checkpoints.is_dir() and any(checkpoints.iterdir()) and marker.is_file():
        if read_json(marker, f"{stage} start marker").get("stage_sha256") != sha:
            what = "config" + (" or " + " / ".join(sorted(inputs)) if inputs else "")
            raise ConfigError(
                f"{folder} holds checkpoints of an interrupted {stage} made with a different {what}; run "
                f"the same command again to resume it, or delete {checkpoints} to start {stage} afresh"
            )
    write_json_atomic(marker, {"stage": stage, "started": now(), "stage_sha256": sha, "inputs": inputs or {}})


def finish_stage(folder: Path) -> None:
    """Drop the Trainer checkpoints (they exist for resuming an interrupted stage) and let every process
    catch up with the files the main process wrote."""
    if is_main_process():
        shutil.rmtree(folder / "checkpoints", ignore_errors=True)
    sync_processes()
