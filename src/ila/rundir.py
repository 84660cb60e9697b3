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

Each stage reads only files written by earlier stages, so any stage can be re-run alone or fed a ranking or
an adapter from another run.
"""

from __future__ import annotations

from pathlib import Path

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
