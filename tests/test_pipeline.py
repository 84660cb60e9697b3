"""The three stages on a tiny model: what each may and may not change, and the files they hand on."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from ila.config import load_config
from ila.errors import IlaError, ModelError, RankingError
from ila.pipeline import prepare_run_dir, run_all, stage2, stage3
from ila.ranking import Ranking


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model_dir, tiny_data_file):
    from conftest import TINY_OVERRIDES

    cfg = load_config(None, TINY_OVERRIDES(tiny_model_dir, tiny_data_file))
    run_dir = tmp_path_factory.mktemp("run")
    out = run_all(cfg, run_dir)
    return cfg, run_dir, out


def test_run_dir_layout(tiny_run):
    cfg, run_dir, out = tiny_run
    assert (run_dir / "config.yaml").is_file()
    assert load_config(run_dir / "config.yaml").sha256() == cfg.sha256()
    milestones = sorted(p.name for p in (run_dir / "stage1" / "milestones").iterdir())
    assert milestones == ["025", "050", "075", "100"]
    for m in milestones:
        meta = json.loads((run_dir / "stage1" / "milestones" / m / "ila_adapter.json").read_text())
        assert meta["step"] == round(int(m) / 100 * 8) and len(meta["layers"]) == 28
    stability = [
        json.loads(line) for line in (run_dir / "stage1" / "stability.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in stability] == [4, 6, 8]
    assert all(r["relative_change"] > 0 for r in stability)
    for stage in ("stage1", "stage2", "stage3"):
        assert (run_dir / stage / "summary.json").is_file()
        assert not (run_dir / stage / "checkpoints").exists()
        lines = (run_dir / stage / "metrics.jsonl").read_text().splitlines()
        assert lines and all(json.loads(line)["step"] >= 0 for line in lines)
    assert not list(run_dir.rglob(".*.tmp"))
    # Every held-out loss a stage reports comes with its interval, which holds it.
    s1, s3 = out["stage1"], out["stage3"]
    for entry, loss in ((s1["heldout"], s1["heldout_loss"]), (s1["base_heldout"], s1["base_heldout_loss"]),
                        (s3["heldout"], s3["heldout_loss"])):  # fmt: skip
        lo, hi = entry["ci95"]
        assert entry["loss"] == loss and lo <= loss <= hi and hi > lo
        assert entry["tokens"] > 0 and entry["examples"] > 0


def test_stage2_ranking(tiny_run):
    cfg, run_dir, _ = tiny_run
    ranking = Ranking.load(run_dir / "stage2" / "ranking.json")
    assert ranking.num_layers == 28 and not ranking.include_lm_head
    assert len(set(ranking.scores.values())) == 28
    # Scores moved away from their N(0, 0.01) start.
    assert max(abs(s) for s in ranking.scores.values()) > 0.05
    data = json.loads((run_dir / "stage2" / "ranking.json").read_text())
    assert data["base_model"]["num_hidden_layers"] == 4 and data["config_sha256"] == cfg.sha256()
    assert data["milestone"] == "100%"


def test_stage2_changes_only_the_scores(tiny_run, monkeypatch, tmp_path):
    cfg, run_dir, _ = tiny_run
    import ila.scoring as scoring

    captured = {}
    real_train = scoring.train

    def spy(model, plan, *args, **kwargs):
        captured["before"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        captured["trainable"] = [n for n, p in model.named_parameters() if p.requires_grad]
        result = real_train(model, plan, *args, **kwargs)
        captured["after"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        return result

    monkeypatch.setattr(scoring, "train", spy)  # where stage 2 looks it up
    stage2(
        load_config(run_dir / "config.yaml", ["stage2.steps=3"]),
        tmp_path,
        adapter=run_dir / "stage1" / "final",
    )
    assert captured["trainable"] == ["ila_gates.scores"]
    changed = [n for n in captured["before"] if not torch.equal(captured["before"][n], captured["after"][n])]
    assert changed == ["ila_gates.scores"]


def test_stage3_adapts_only_the_selection(tiny_run, tiny_model_dir):
    import peft
    from transformers import AutoModelForCausalLM

    cfg, run_dir, out = tiny_run
    selection = json.loads((run_dir / "stage3" / "selection.json").read_text())
    ranking = Ranking.load(run_dir / "stage2" / "ranking.json")
    assert selection["layers"] == ranking.top(0.25) and len(selection["layers"]) == 7
    adapter = run_dir / "stage3" / "adapter"
    weights = load_file(adapter / "adapter_model.safetensors")
    adapted = {k.split(".lora_")[0].removeprefix("base_model.model.") for k in weights}
    assert adapted == set(selection["layers"])
    # A standard PEFT folder: peft loads it on a fresh base model and it changes the output.
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.randint(0, 256, (1, 10))
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
        model = peft.PeftModel.from_pretrained(base, str(adapter))
        lora_modules = {
            n.removeprefix("base_model.model.")
            for n, m in model.named_modules()
            if hasattr(m, "lora_A") and "default" in m.lora_A
        }
        assert lora_modules == set(selection["layers"])
        assert not torch.allclose(model(input_ids=ids).logits, base_logits)


def test_stage3_changes_only_selected_lora_weights(tiny_run, monkeypatch):
    cfg, run_dir, _ = tiny_run
    import ila.pipeline as pipeline

    captured = {}
    real_train = pipeline.train

    def spy(model, plan, *args, **kwargs):
        captured["before"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        result = real_train(model, plan, *args, **kwargs)
        captured["after"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        return result

    monkeypatch.setattr(pipeline, "train", spy)
    cfg2 = load_config(
        run_dir / "config.yaml",
        ["stage3.selection.mode=drop_bottom", "stage3.selection.fraction=0.5", "stage3.train.max_steps=3"],
    )
    other = run_dir / "drop-bottom"
    prepare_run_dir(cfg2, other)
    (other / "stage2").mkdir()
    (other / "stage2" / "ranking.json").write_bytes((run_dir / "stage2" / "ranking.json").read_bytes())
    stage3(cfg2, other)
    selected = set(Ranking.load(run_dir / "stage2" / "ranking.json").drop_bottom(0.5))
    changed = {n for n in captured["before"] if not torch.equal(captured["before"][n], captured["after"][n])}
    assert changed and all(".lora_" in n for n in changed)
    changed_layers = {n.split(".lora_")[0].removeprefix("base_model.model.") for n in changed}
    assert changed_layers == selected  # every selected layer trained (lora_B moves from zero), no other


def test_stage2_on_a_milestone_and_missing_inputs(tiny_run, tmp_path):
    cfg, run_dir, _ = tiny_run
    other = tmp_path / "m25"
    cfg25 = load_config(run_dir / "config.yaml", ["stage2.milestone=25", "stage2.steps=2"])
    prepare_run_dir(cfg25, other)
    with pytest.raises(ModelError, match="run stage 1 first"):
        stage2(cfg25, other)
    r = stage2(cfg25, other, adapter=run_dir / "stage1" / "milestones" / "025")
    assert r.milestone == "25%"
    with pytest.raises(IlaError, match="run stage 2 first"):
        stage3(cfg25, tmp_path / "empty")


def test_stage3_refuses_a_ranking_of_another_model(tiny_run, tmp_path):
    from conftest import write_model_dir

    cfg, run_dir, _ = tiny_run
    deeper = write_model_dir(tmp_path / "deeper", num_blocks=6)
    cfg2 = load_config(
        run_dir / "config.yaml",
        [f"model.name={deeper}", f"stage3.ranking={run_dir / 'stage2' / 'ranking.json'}"],
    )
    with pytest.raises(RankingError, match="another model"):
        stage3(cfg2, tmp_path / "run")
