"""Every scorer gives a full, finite ranking; each one's defining property holds."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_OVERRIDES, make_model

from ila.config import LoraConfig, load_config
from ila.layers import adaptable_layers
from ila.models import attach_lora
from ila.pipeline import prepare_run_dir, stage1, stage2
from ila.ranking import Ranking
from ila.rundir import RunDir
from ila.scoring import SCORER_NAMES, ScoringInputs, score_layers


@pytest.fixture(scope="module")
def stage1_run(tmp_path_factory, tiny_model_dir, tiny_data_file):
    cfg = load_config(None, TINY_OVERRIDES(tiny_model_dir, tiny_data_file) + ["stage2.sample_batches=2"])
    run_dir = tmp_path_factory.mktemp("scorers")
    prepare_run_dir(cfg, run_dir)
    stage1(cfg, run_dir)
    return cfg, run_dir


@pytest.mark.parametrize("scorer", SCORER_NAMES)
def test_every_scorer_writes_a_full_finite_ranking(stage1_run, scorer):
    cfg, run_dir = stage1_run
    ranking = stage2(cfg, run_dir, scorer=scorer)
    path = RunDir(run_dir).ranking(scorer)
    back = Ranking.load(path)
    assert back.scorer == scorer and back.num_layers == 28 and back.order == ranking.order
    assert (run_dir / "stage2" / ("summary.json" if scorer == "ila" else f"summary-{scorer}.json")).is_file()


def _peft_with_updates(zero_layer: str | None = None):
    base = make_model()
    layers = adaptable_layers(base)
    model = attach_lora(base, [layer.name for layer in layers], LoraConfig(r=4, dropout=0.0))
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.3)
        p.requires_grad_(False)
    if zero_layer:
        dict(model.named_modules())["base_model.model." + zero_layer].lora_B["default"].weight.data.zero_()
    return model, layers


def _batches():
    torch.manual_seed(1)
    data = [torch.randint(0, 256, (2, 16)) for _ in range(2)]
    return lambda: iter({"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x} for x in data)


def test_update_norm_puts_a_zero_update_last():
    zero = "model.layers.2.mlp.up_proj"
    model, layers = _peft_with_updates(zero)
    scores, _ = score_layers("update-norm", ScoringInputs(model=model, layers=layers))
    assert scores[zero] == 0.0 and min(scores, key=scores.get) == zero
    assert all(v > 0 for n, v in scores.items() if n != zero)


def test_taylor_gives_a_zero_update_zero_score():
    zero = "model.layers.1.self_attn.v_proj"
    model, layers = _peft_with_updates(zero)
    scores, meta = score_layers("taylor", ScoringInputs(model=model, layers=layers, batches=_batches()))
    assert scores[zero] == 0.0 and meta["batches"] == 2
    assert sum(1 for v in scores.values() if v != 0) == len(layers) - 1
    assert "ila_gates" not in dict(model.named_modules())  # the scorer leaves the model as it found it


def _padded_batches():
    """Two right-padded batches of different lengths: pad positions (mask 0) must not count."""
    g = torch.Generator().manual_seed(1)
    out = []
    for lengths in ([16, 9], [12, 5, 16]):
        ids = torch.randint(0, 256, (len(lengths), max(lengths)), generator=g)
        mask = torch.zeros_like(ids)
        for i, n in enumerate(lengths):
            mask[i, :n] = 1
            ids[i, n:] = 256  # the pad id of make_model
        out.append({"input_ids": ids, "attention_mask": mask, "labels": ids})
    return lambda: iter(out)


def _shortgpt_block_influence(model, batches, *, count_pads=False):
    """ShortGPT's BI_b = 1 - mean over real tokens of cos(h_b, h_{b+1}), written independently of ila: the
    block inputs/outputs come from ``output_hidden_states``. HF Llama applies the final norm to the last
    hidden state, so the last block's output is taken from the input of that norm instead."""
    inner = model.model
    n = len(inner.layers)
    cosines = [[] for _ in range(n)]
    for batch in batches():
        seen = {}
        handle = inner.norm.register_forward_pre_hook(
            lambda _m, args, seen=seen: seen.__setitem__("x", args[0])
        )
        with torch.no_grad():
            hidden = model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                output_hidden_states=True,
            ).hidden_states
            handle.remove()
            assert len(hidden) == n + 1 and torch.allclose(hidden[n], inner.norm(seen["x"]))
        states = [*hidden[:n], seen["x"]]
        keep = (
            torch.ones_like(batch["attention_mask"], dtype=torch.bool)
            if count_pads
            else batch["attention_mask"].bool()
        )
        for b in range(n):
            cos = torch.nn.functional.cosine_similarity(states[b].double(), states[b + 1].double(), dim=-1)
            cosines[b].append(cos[keep])
    return [1.0 - float(torch.cat(c).mean()) for c in cosines]


def test_position_and_block_influence_rank_blocks():
    model = make_model()
    layers = adaptable_layers(model)
    last, _ = score_layers("position", ScoringInputs(model=model, layers=layers))
    first, _ = score_layers(
        "position", ScoringInputs(model=model, layers=layers, options={"position_from": "first"})
    )
    r_last = Ranking(scores=last, layers=layers, base_model={}, include_lm_head=False)
    r_first = Ranking(scores=first, layers=layers, base_model={}, include_lm_head=False)
    assert {n.split(".")[2] for n in r_last.top(0.25)} == {"3"}
    assert {n.split(".")[2] for n in r_first.top(0.25)} == {"0"}

    with_head = adaptable_layers(model, include_lm_head=True)
    bi, meta = score_layers(
        "block-influence", ScoringInputs(model=model, layers=with_head, batches=_padded_batches())
    )
    expected = _shortgpt_block_influence(model, _padded_batches())
    # Stated tolerance: 1e-5 absolute (ila sums float32 cosines in float64, the reference is float64
    # throughout).
    tol = 1e-5
    assert list(meta["block_influence"]) == [f"model.layers.{b}" for b in range(4)]
    assert list(meta["block_influence"].values()) == pytest.approx(expected, abs=tol)
    # The check can tell blocks apart (an off-by-one block fails) and tell pads from tokens (a dropped mask
    # fails).
    assert min(abs(a - b) for i, a in enumerate(expected) for b in expected[i + 1 :]) > 100 * tol
    assert (
        max(
            abs(a - b)
            for a, b in zip(
                expected, _shortgpt_block_influence(model, _padded_batches(), count_pads=True), strict=True
            )
        )
        > 100 * tol
    )
    for layer in layers:
        assert bi[layer.name] == pytest.approx(expected[layer.block_index], abs=tol)
    assert bi["lm_head"] == pytest.approx(sorted(expected)[2], abs=tol)  # the median block


def _spectrum_snr(weight: torch.Tensor) -> tuple[float, int, int]:
    """Spectrum's SNR (Hartford et al., 2024), written independently in numpy (float64): singular values
    above the Marchenko-Pastur edge sigma (1 + sqrt(beta)), sigma = IQR / 1.349, are signal, the rest noise;
    the score is (sum of signal / sum of noise) / largest singular value, capped at 1e6 / largest when there
    is no noise. Returns (score, number of signal values, number of singular values)."""
    import numpy as np

    w = weight.detach().double().numpy()
    s = np.linalg.svd(w, compute_uv=False)
    sigma = (np.percentile(s, 75) - np.percentile(s, 25)) / 1.349
    beta = min(w.shape) / max(w.shape)
    edge = sigma * (1.0 + np.sqrt(beta))
    signal, noise = s[s > edge].sum(), s[s <= edge].sum()
    return (signal / noise if noise > 0 else 1e6) / s.max(), int((s > edge).sum()), len(s)


def test_snr_and_random_are_data_free_and_finite():
    model = make_model()
    layers = adaptable_layers(model, include_lm_head=True)
    snr, _ = score_layers("snr", ScoringInputs(model=model, layers=layers))
    assert len(snr) == 29
    modules = dict(model.named_modules())
    reference = {x.name: _spectrum_snr(modules[x.name].weight) for x in layers}
    for name, (expected, _, _) in reference.items():
        # Stated tolerance: 1e-5 relative (float32 against float64 singular values).
        assert snr[name] == pytest.approx(expected, rel=1e-5), name
    # The weights exercise the rule: square and 1:2 / 2:1 shapes, the edge inside the spectrum of every block
    # layer, and lm_head (320 x 64, all signal) at the cap.
    assert all(0 < k < n for name, (_, k, n) in reference.items() if name != "lm_head")
    assert reference["lm_head"][1:] == (64, 64)
    assert {tuple(modules[x.name].weight.shape) for x in layers} == {
        (64, 64),
        (32, 64),
        (128, 64),
        (64, 128),
        (320, 64),
    }
    assert len(set(snr.values())) == 29
    a, _ = score_layers("random", ScoringInputs(model=model, layers=layers, seed=1))
    b, _ = score_layers("random", ScoringInputs(model=model, layers=layers, seed=1))
    c, _ = score_layers("random", ScoringInputs(model=model, layers=layers, seed=2))
    assert a == b and a != c


def test_default_stage2_leaves_a_zero_updates_score_where_it_started(tmp_path):
    """The default optimiser (SGD, no budget penalty) moves a score only by its own gradient: a layer whose
    update is zero keeps its initial score exactly, while every other score moves."""
    from datasets import Dataset
    from tiny import make_tokenizer

    from ila.config import Stage2Config
    from ila.gates import LayerGates
    from ila.scoring import learn_gates

    zero = "model.layers.1.mlp.down_proj"
    model, layers = _peft_with_updates(zero)
    torch.manual_seed(2)
    rows = [
        {"input_ids": x, "attention_mask": [1] * len(x), "labels": x}
        for x in torch.randint(0, 256, (8, 16)).tolist()
    ]
    s2 = Stage2Config(steps=3, batch_size=4)
    assert s2.optimizer == "sgd" and s2.budget_lambda == 0.0
    scores, _ = learn_gates(
        model,
        layers,
        tokenizer=make_tokenizer(),
        train_dataset=Dataset.from_list(rows),
        s2=s2,
        seed=0,
        device="cpu",
        folder=tmp_path,
    )
    start = LayerGates(
        [layer.name for layer in layers], init_mean=s2.init_mean, init_std=s2.init_std, seed=0
    ).as_dict()
    assert scores[zero] == start[zero]
    assert all(scores[n] != start[n] for n in scores if n != zero)


def test_the_registry_is_the_one_list_of_scorers():
    """Config, command line and dispatch all read ila.scorers: a name it lacks is refused everywhere."""
    from ila.cli import build_parser
    from ila.errors import ConfigError, IlaError
    from ila.scorers import NEEDS_ADAPTER, NEEDS_DATA, SCORERS

    assert all(callable(entry.load()) for entry in SCORERS.values())
    assert NEEDS_ADAPTER == {"ila", "taylor", "update-norm"} and NEEDS_DATA == {
        "ila",
        "taylor",
        "block-influence",
    }
    with pytest.raises(ConfigError, match="stage2.scorer"):
        load_config(None, ["stage2.scorer=tayl0r"])
    with pytest.raises(IlaError, match="unknown scorer 'tayl0r'"):
        score_layers("tayl0r", ScoringInputs(model=make_model(), layers=[]))
    with pytest.raises(SystemExit):
        build_parser().parse_args(["score", "--run-dir", "r", "--scorer", "tayl0r"])
    assert build_parser().parse_args(["score", "--run-dir", "r", "--scorer", "snr"]).scorer == "snr"
