"""One model load and one tokenization per `ila run`: the tokenized examples are a run artefact keyed by the
data config and the tokenizer, and theta_0 is shared between the stages without changing any result."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file
from tiny import make_tokenizer

from ila import models, pipeline, shared_base, tokenized
from ila.config import DataConfig, load_config
from ila.pipeline import run_all, stage1, stage2, stage3
from ila.ranking import Ranking
from ila.tokenized import data_key, tokenized_datasets


@pytest.fixture
def data_cfg(tiny_data_file):
    return DataConfig(name=str(tiny_data_file), max_length=64, max_examples=None, heldout_fraction=0.2)


def test_tokenized_once_then_read_back(tmp_path, data_cfg, monkeypatch):
    tok = make_tokenizer()
    train, heldout, stats, cached = tokenized_datasets(data_cfg, tok, tmp_path)
    assert not cached and len(list(tmp_path.iterdir())) == 1
    calls = []
    monkeypatch.setattr(tokenized, "build_datasets", lambda *a: calls.append(a))
    train2, heldout2, stats2, cached2 = tokenized_datasets(data_cfg, tok, tmp_path)
    assert cached2 and not calls and stats2 == stats
    assert train2.to_dict() == train.to_dict() and heldout2.to_dict() == heldout.to_dict()


def test_a_run_without_heldout_examples_reads_back_an_empty_split(tmp_path, data_cfg):
    cfg = replace(data_cfg, heldout_fraction=0.0)
    tok = make_tokenizer()
    train, heldout, _, _ = tokenized_datasets(cfg, tok, tmp_path)
    train2, heldout2, _, cached = tokenized_datasets(cfg, tok, tmp_path)
    assert cached and len(heldout) == len(heldout2) == 0 and len(train2) == len(train) > 0
    assert heldout2.features == train2.features


def test_the_key_follows_what_the_examples_depend_on(data_cfg):
    tok = make_tokenizer()
    key = data_key(data_cfg, tok)
    assert data_key(replace(data_cfg, padding_free="off"), tok) == key  # batching is not tokenization
    assert data_key(replace(data_cfg, max_length=32), tok) != key
    assert data_key(replace(data_cfg, seed=1), tok) != key
    other = make_tokenizer()
    other.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert data_key(data_cfg, other) != key
    other = make_tokenizer()
    other.add_tokens(["<extra>"])
    assert data_key(data_cfg, other) != key


def test_an_interrupted_write_is_not_trusted(tmp_path, data_cfg, monkeypatch):
    tok = make_tokenizer()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(tokenized, "write_json_atomic", fail)
    with pytest.raises(OSError):
        tokenized_datasets(data_cfg, tok, tmp_path)
    monkeypatch.undo()
    assert not [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    *_, cached = tokenized_datasets(data_cfg, tok, tmp_path)
    assert not cached


def tensors(folder):
    return load_file(str(folder / "adapter_model.safetensors"))


def test_one_load_one_tokenization_and_the_same_results(tmp_path, tiny_config, monkeypatch):
    """`ila run` (one process, theta_0 shared) gives exactly what three separate stage runs give."""
    cfg = load_config(None, tiny_config)
    loads, builds = [], []
    real_load, real_build = models.load_base_model, tokenized.build_datasets
    monkeypatch.setattr(shared_base, "load_base_model", lambda c: loads.append(1) or real_load(c))
    monkeypatch.setattr(tokenized, "build_datasets", lambda *a: builds.append(1) or real_build(*a))
    run_all(cfg, tmp_path / "shared")
    assert len(loads) == 1 and len(builds) == 1
    for stage in ("stage1", "stage2", "stage3"):
        record = json.loads((tmp_path / "shared" / stage / "data.json").read_text())
        assert record["from_cache"] == (stage != "stage1")

    monkeypatch.setattr(tokenized, "build_datasets", real_build)
    alone = tmp_path / "alone"
    pipeline.prepare_run_dir(cfg, alone)
    for fn in (stage1, stage2, stage3):  # each loads theta_0 itself
        fn(cfg, alone)
    assert len(loads) == 4

    a, b = tmp_path / "shared", alone
    for sub in ("stage1/final", "stage3/adapter"):
        ta, tb = tensors(a / sub), tensors(b / sub)
        assert ta.keys() == tb.keys() and ta
        for k in ta:
            assert torch.equal(ta[k], tb[k]), (sub, k)
    ra, rb = Ranking.load(a / "stage2" / "ranking.json"), Ranking.load(b / "stage2" / "ranking.json")
    assert ra.scores == rb.scores
    s3a = json.loads((a / "stage3" / "summary.json").read_text())
    s3b = json.loads((b / "stage3" / "summary.json").read_text())
    assert s3a["trainable_parameters"] == s3b["trainable_parameters"]
    assert s3a["heldout_loss"] == s3b["heldout_loss"]


def test_the_shared_model_is_theta_0_again(tiny_config):
    """After a LoRA stage, the model handed on is the loaded one: same weights, no adapter module left."""
    cfg = load_config(None, tiny_config)
    base = shared_base.SharedBase(cfg)
    tok, model, identity = base.take()
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    peft_model = models.attach_lora(model, ["model.layers.0.self_attn.q_proj"], cfg.lora)
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(1.0)
    base.release(tok, peft_model, identity, pristine=True)
    _, again, _ = base.take()
    assert base.loads == 1
    assert not any("lora" in name for name, _ in again.named_modules())
    state = again.state_dict()
    assert state.keys() == fresh.keys() and all(torch.equal(state[k], fresh[k]) for k in fresh)
    # a stage that changed base weights hands nothing on: the next stage reads theta_0 again
    base.release(tok, again, identity, pristine=False)
    base.take()
    assert base.loads == 2
