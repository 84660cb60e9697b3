"""Epsilon-stability: the factor-based norms equal the dense computation."""

from __future__ import annotations

import pytest
import torch

from ila.stability import LoraFactors, relative_change, update_norms


def _factors(seed, layers=("a", "b", "c"), scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return LoraFactors(
        {n: (scale, torch.randn(4, 12, generator=g), torch.randn(9, 4, generator=g)) for n in layers}
    )


def test_matches_dense_frobenius():
    prev, cur = _factors(0), _factors(1)
    dense = {n: s * b @ a for n, (s, a, b) in cur.factors.items()}
    dense_prev = {n: s * b @ a for n, (s, a, b) in prev.factors.items()}
    norms = update_norms(cur)
    for n in dense:
        assert norms[n] == pytest.approx(torch.linalg.norm(dense[n]).item(), rel=1e-4)
    r, per_layer = relative_change(prev, cur)
    num = sum(torch.linalg.norm(dense[n] - dense_prev[n]) ** 2 for n in dense) ** 0.5
    den = sum(torch.linalg.norm(dense[n]) ** 2 for n in dense) ** 0.5
    assert r == pytest.approx((num / den).item(), rel=1e-4)
    for n in dense:
        expect = torch.linalg.norm(dense[n] - dense_prev[n]) / torch.linalg.norm(dense[n])
        assert per_layer[n] == pytest.approx(expect.item(), rel=1e-4)


def test_identical_snapshots_are_stable_and_zero_update_is_not():
    f = _factors(3)
    assert relative_change(f, f)[0] == pytest.approx(0.0, abs=1e-3)
    zero = LoraFactors({n: (s, a, torch.zeros_like(b)) for n, (s, a, b) in f.factors.items()})
    assert relative_change(zero, f)[0] == pytest.approx(1.0, rel=1e-4)  # everything learned since the start


def test_stage1_stops_when_the_ranking_settles(tmp_path, tiny_model_dir, tiny_data_file):
    import json

    from conftest import TINY_OVERRIDES

    from ila.config import load_config
    from ila.pipeline import prepare_run_dir, stage1

    cfg = load_config(
        None,
        TINY_OVERRIDES(tiny_model_dir, tiny_data_file)
        + [
            "stage1.train.max_steps=40",
            "stage1.stability_window=2",
            "stage1.stop_when_stable=true",
            "stage1.stability_criterion=ranking",
            "stage1.stability_epsilon=0.5",
            "stage1.stability_patience=2",
            "stage1.train.lr_scheduler=constant",
        ],
    )
    prepare_run_dir(cfg, tmp_path)
    out = stage1(cfg, tmp_path)
    records = [json.loads(x) for x in (tmp_path / "stage1" / "stability.jsonl").read_text().splitlines()]
    assert out["stopped_when_stable"] and out["steps"] < 40 and out["steps"] == out["stable_at_step"]
    assert out["steps_saved"] == 40 - out["steps"]
    assert records[-1]["stable"] and records[-1]["top_overlap"] >= 0.5
    assert all(0.0 <= r["top_overlap"] <= 1.0 for r in records)
    assert (tmp_path / "stage1" / "final" / "ila_adapter.json").is_file()


def _records(run_dir):
    import json

    lines = (run_dir / "stage1" / "stability.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k != "time"} for x in lines]


def test_resumed_stage1_tracks_stability_as_an_uninterrupted_run(
    tmp_path, tiny_model_dir, tiny_data_file, monkeypatch
):
    """Window 4, checkpoints every 6 steps, killed at step 7: the resumed run must know the snapshot of step 4
    (its first record is then at step 8 and 12, not a window late) and stop at the same stable step."""
    from conftest import TINY_OVERRIDES, Interrupted, interrupted_train

    from ila import pipeline
    from ila.config import load_config
    from ila.pipeline import prepare_run_dir, stage1

    overrides = TINY_OVERRIDES(tiny_model_dir, tiny_data_file) + [
        "stage1.train.max_steps=40",
        "stage1.stability_window=4",
        "stage1.train.save_steps=6",
        "stage1.stop_when_stable=true",
        "stage1.stability_epsilon=0.3",
        "stage1.train.lr_scheduler=constant",
    ]
    cfg = load_config(None, overrides)
    prepare_run_dir(cfg, tmp_path / "whole")
    whole = stage1(cfg, tmp_path / "whole")
    assert whole["stable_at_step"] is not None and whole["stable_at_step"] > 12, whole["stability"]

    prepare_run_dir(cfg, tmp_path / "cut")
    with monkeypatch.context() as m:
        m.setattr(pipeline, "train", interrupted_train(7))
        with pytest.raises(Interrupted):
            stage1(cfg, tmp_path / "cut")
    resumed = stage1(cfg, tmp_path / "cut")
    assert resumed["resumed_from"] is not None and resumed["resumed_from"].endswith("checkpoint-6")
    assert resumed["stable_at_step"] == whole["stable_at_step"]
    assert resumed["steps"] == whole["steps"]
    a, b = _records(tmp_path / "whole"), _records(tmp_path / "cut")
    assert [r["step"] for r in b] == [r["step"] for r in a]
    for x, y in zip(a, b, strict=True):
        assert y["relative_change"] == pytest.approx(x["relative_change"], rel=1e-3)
        assert y["stable"] == x["stable"]
    assert [r["step"] for r in resumed["stability"]] == [r["step"] for r in a]
