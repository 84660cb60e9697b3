"""Exporting a selection to PEFT / axolotl / LLaMA-Factory / ms-swift, and the selection dry run."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import warnings

import peft
import pytest
import yaml
from conftest import make_model

from ila.cli import main
from ila.errors import IlaError, RankingError
from ila.export import dry_run, export_selection, select_layers
from ila.layers import adaptable_layers
from ila.models import model_identity
from ila.ranking import Ranking

TYPES = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
]


def _ranking(num_blocks=4, scores=None, name="tiny", include_lm_head=False):
    model = make_model(num_blocks=num_blocks)
    layers = adaptable_layers(model, include_lm_head=include_lm_head)
    if scores is None:  # scattered: the top quarter touches every block
        scores = {x.name: float((i * 7) % len(layers)) for i, x in enumerate(layers)}
    return Ranking(
        scores=scores, layers=layers, base_model=model_identity(model, name), include_lm_head=include_lm_head
    )


def _block_ranking(blocks=(1, 3)):
    """A ranking whose top half is exactly every layer of ``blocks``."""
    layers = adaptable_layers(make_model())
    scores = {x.name: (10.0 if x.block_index in blocks else 0.0) - 0.01 * i for i, x in enumerate(layers)}
    return _ranking(scores=scores)


def _adapted(model) -> set[str]:
    return {n for n, m in model.base_model.model.named_modules() if hasattr(m, "lora_A")}


def _peft_on_tiny(config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(make_model(), config)


def _strict_json(path):
    def reject(token):
        raise ValueError(f"non-strict JSON token {token}")

    return json.loads(path.read_text(), parse_constant=reject)


def _model_order(ranking, names):
    chosen = set(names)
    return [x.name for x in ranking.layers if x.name in chosen]


def test_peft_export_adapts_exactly_the_selection(tmp_path):
    ranking = _ranking()
    names = select_layers(ranking, "top", 0.25)
    blocks_of = {x.name: x.block_index for x in ranking.layers}
    assert len(names) == 7 and {blocks_of[n] for n in names} == {0, 1, 2, 3}
    summary = export_selection(
        ranking, names, tmp_path / "out", r=4, alpha=8, dropout=0.1, mode="top", fraction=0.25
    )

    cfg = peft.LoraConfig.from_pretrained(tmp_path / "out")
    assert isinstance(peft.PeftConfig.from_pretrained(tmp_path / "out"), peft.LoraConfig)
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout) == (4, 8, 0.1)
    assert cfg.base_model_name_or_path == "tiny"
    assert _adapted(_peft_on_tiny(cfg)) == set(names)
    # not whole blocks: no compact variant, and the summary says why
    assert not (tmp_path / "out" / "adapter_config.blocks.json").exists()
    blocks = summary["formats"]["adapter_config.blocks.json"]
    assert blocks["status"] == "none" and "not whole blocks" in blocks["reason"]
    assert summary["formats"]["adapter_config.json"]["status"] == "exact"


def test_whole_blocks_also_written_compactly(tmp_path):
    ranking = _block_ranking((1, 3))
    names = select_layers(ranking, "top", 0.5)
    assert {n.split(".")[2] for n in names} == {"1", "3"} and len(names) == 14
    out = tmp_path / "blocks"
    summary = export_selection(ranking, names, out, mode="top", fraction=0.5)
    assert summary["formats"]["adapter_config.blocks.json"]["status"] == "exact"

    data = json.loads((out / "adapter_config.blocks.json").read_text())
    assert data["layers_to_transform"] == [1, 3] and data["layers_pattern"] == "layers"
    assert data["target_modules"] == TYPES
    other = tmp_path / "compact"  # peft reads adapter_config.json: give the compact file that name
    other.mkdir()
    (other / "adapter_config.json").write_text((out / "adapter_config.blocks.json").read_text())
    compact = peft.LoraConfig.from_pretrained(other)
    assert _adapted(_peft_on_tiny(compact)) == set(names)
    assert _adapted(_peft_on_tiny(peft.LoraConfig.from_pretrained(out))) == set(names)

    # A later export of a selection that is not whole blocks must not leave the stale compact file behind.
    export_selection(ranking, names[:3], out)
    assert not (out / "adapter_config.blocks.json").exists()
    assert json.loads((out / "selection.json").read_text())["num_selected"] == 3


def test_tool_files_name_exactly_the_selection(tmp_path):
    ranking = _ranking(name="/models/tiny")
    names = select_layers(ranking, "drop_bottom", 0.75)
    ordered = _model_order(ranking, names)
    weights = [f"{n}.weight" for n in ordered]
    out = tmp_path / "out"
    summary = export_selection(
        ranking,
        names,
        out,
        r=8,
        alpha=16,
        dropout=0.05,
        mode="drop_bottom",
        fraction=0.75,
        ranking_path=tmp_path / "ranking.json",
    )
    model = make_model()
    modules = [n for n, _ in model.named_modules()]
    params = [n for n, _ in model.named_parameters()]

    axo = yaml.safe_load((out / "axolotl.yaml").read_text())
    assert axo["adapter"] == "lora" and axo["lora_target_linear"] is False
    assert (axo["lora_r"], axo["lora_alpha"], axo["lora_dropout"]) == (8, 16, 0.05)
    assert axo["lora_target_modules"] == ordered and axo["base_model"] == "/models/tiny"
    # axolotl's own rule (utils/freeze.py): bare dots are escaped by axolotl, then re.match
    patterns = yaml.safe_load((out / "axolotl.full.yaml").read_text())["unfrozen_parameters"]
    compiled = [re.compile(re.sub(r"\.(?!\+)", "\\.", p)) for p in patterns]
    assert {p for p in params if any(c.match(p) for c in compiled)} == set(weights)

    lf = yaml.safe_load((out / "llamafactory.yaml").read_text())
    assert (
        lf["finetuning_type"] == "lora"
        and lf["lora_rank"] == 8
        and lf["model_name_or_path"] == "/models/tiny"
    )
    targets = [t.strip() for t in lf["lora_target"].split(",")]  # LLaMA-Factory's split_arg
    assert targets == ordered
    assert _adapted(_peft_on_tiny(peft.LoraConfig(target_modules=targets))) == set(names)

    # The ms-swift scripts, run against a stand-in `swift` that prints its arguments and a `python` that
    # reports ms-swift 4.6.0 (tests/test_export_swift.py covers the flag of each ms-swift version).
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "swift").write_text("#!/bin/sh\nprintf '%s\\n' \"$@\"\n")
    (fake / "python").write_text("#!/bin/sh\necho 4.6.0\n")
    for stub in ("swift", "python"):
        (fake / stub).chmod(0o755)
    env = {**os.environ, "PATH": str(fake)}
    bash = shutil.which("bash")
    for script in ("swift.sh", "swift.full.sh"):
        assert os.stat(out / script).st_mode & stat.S_IXUSR
        subprocess.run([bash, "-n", str(out / script)], check=True)
    args = subprocess.run(
        [bash, str(out / "swift.sh"), "--dataset", "d.jsonl"],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.splitlines()
    assert args[:5] == ["sft", "--model", "/models/tiny", "--tuner_type", "lora"]
    assert args[-2:] == ["--dataset", "d.jsonl"]
    assert args[args.index("--lora_rank") + 1] == "8" and args[args.index("--lora_alpha") + 1] == "16"
    regex = args[args.index("--target_regex") + 1]
    assert {m for m in modules if re.fullmatch(regex, m)} == set(names)  # peft: re.fullmatch on module names
    args = subprocess.run(
        [bash, str(out / "swift.full.sh")],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.splitlines()
    assert args[3:5] == ["--tuner_type", "full"] and args[args.index("--freeze_parameters_ratio") + 1] == "1"
    regex = args[args.index("--trainable_parameters_regex") + 1]
    assert {p for p in params if re.search(regex, p)} == set(
        weights
    )  # ms-swift: re.search on parameter names

    listed = (out / "parameters.txt").read_text().splitlines()
    assert listed == weights and set(listed) <= set(params)

    sel = _strict_json(out / "selection.json")
    assert sel["schema_version"] == 1 and sel["kind"] == "ila.selection"
    assert sel["mode"] == "drop_bottom" and sel["fraction"] == 0.75
    assert sel["ranking"] == str(tmp_path / "ranking.json")
    assert sel["num_selected"] == 7 and sel["num_layers"] == 28 and sel["layers"] == names
    assert sel["base_model"]["num_hidden_layers"] == 4
    assert set(sel["formats"]) == {
        "adapter_config.json",
        "adapter_config.blocks.json",
        "axolotl.yaml",
        "axolotl.full.yaml",
        "axolotl.spectrum.yaml",
        "model_snr_results/snr_results_<model>.json",
        "llamafactory.yaml",
        "llamafactory.freeze.yaml",
        "swift.sh",
        "swift.full.sh",
        "parameters.txt",
    }
    for file in (
        "adapter_config.json",
        "axolotl.yaml",
        "axolotl.full.yaml",
        "llamafactory.yaml",
        "swift.sh",
        "swift.full.sh",
        "parameters.txt",
    ):
        assert sel["formats"][file]["status"] == "exact", file
        assert (out / file).is_file()
    assert summary["formats"] == sel["formats"]


def test_llamafactory_freeze_reports_what_it_cannot_express(tmp_path):
    ranking = _ranking()
    names = select_layers(ranking, "top", 0.25)  # scattered over all four blocks
    summary = export_selection(ranking, names, tmp_path / "a", mode="top", fraction=0.25)
    entry = summary["formats"]["llamafactory.freeze.yaml"]
    assert entry["status"] == "approximate" and entry["extra"] == 21 and "superset" in entry["reason"]
    text = (tmp_path / "a" / "llamafactory.freeze.yaml").read_text()
    assert "NOT EXACT" in text and "closest expressible superset" in text
    lf = yaml.safe_load(text)
    assert lf == {
        "model_name_or_path": "tiny",
        "finetuning_type": "freeze",
        "freeze_trainable_layers": 4,
        "freeze_trainable_modules": "mlp,self_attn",
    }

    # Contiguous first blocks, attention only: same layers, still flagged (whole submodules train).
    ranking = _ranking(
        scores={
            x.name: (5.0 if x.block_index < 2 and x.module_type.startswith("self_attn") else 0.0)
            for x in adaptable_layers(make_model())
        }
    )
    names = select_layers(ranking, "top", 8 / 28)
    summary = export_selection(ranking, names, tmp_path / "b", mode="top", fraction=8 / 28)
    entry = summary["formats"]["llamafactory.freeze.yaml"]
    assert entry["status"] == "approximate" and entry["extra"] == 0 and entry["trains"] == 8
    lf = yaml.safe_load((tmp_path / "b" / "llamafactory.freeze.yaml").read_text())
    assert lf["freeze_trainable_layers"] == -2 and lf["freeze_trainable_modules"] == "self_attn"
    # LLaMA-Factory's rule (model/adapter.py): ".{block}.{module}" substring of the parameter name
    ids = range(-lf["freeze_trainable_layers"])
    trained = {
        p
        for p, _ in make_model().named_parameters()
        if any(f".{i}.{m}" in p for i in ids for m in lf["freeze_trainable_modules"].split(","))
    }
    assert trained == {f"{n}.weight" for n in names}


def test_lm_head_and_builtin_base_model(tmp_path):
    ranking = _ranking(name="smollm2", include_lm_head=True)
    names = ["lm_head", "model.layers.2.mlp.up_proj"]
    summary = export_selection(ranking, names, tmp_path / "o")
    assert summary["mode"] == "list" and summary["fraction"] is None
    cfg = peft.LoraConfig.from_pretrained(tmp_path / "o")
    assert cfg.base_model_name_or_path is None and any("builtin" in n for n in summary["notes"])
    assert _adapted(_peft_on_tiny(cfg)) == set(names)
    f = summary["formats"]
    assert f["adapter_config.blocks.json"]["status"] == "none" and f["swift.sh"]["status"] == "exact"
    assert f["axolotl.full.yaml"]["status"] == "approximate" and "tied" in f["axolotl.full.yaml"]["reason"]
    lf = yaml.safe_load((tmp_path / "o" / "llamafactory.freeze.yaml").read_text())
    # the tiny model ties lm_head to the input embeddings: LLaMA-Factory knows its weight as embed_tokens
    assert lf["freeze_extra_modules"] == "embed_tokens" and lf["freeze_trainable_layers"] == 2


def _untied_model(num_blocks=4):
    """The tiny model with an lm_head of its own."""
    from transformers import LlamaForCausalLM

    config = make_model(num_blocks=num_blocks).config
    config.tie_word_embeddings = False
    return LlamaForCausalLM(config)


def _trained_by_name(out, model, tmp_path):
    """What each parameter-name file of the export in ``out`` trains on ``model``, by each tool's own rule:
    {file: set of parameter names}. LLaMA-Factory's check of freeze_extra_modules raises as it does."""
    params = [n for n, _ in model.named_parameters()]
    trained = {}
    # axolotl utils/freeze.py: '.' not followed by '+' escaped, then re.match
    patterns = yaml.safe_load((out / "axolotl.full.yaml").read_text())["unfrozen_parameters"]
    compiled = [re.compile(re.sub(r"\.(?!\+)", "\\.", p)) for p in patterns]
    trained["axolotl.full.yaml"] = {p for p in params if any(c.match(p) for c in compiled)}
    # ms-swift activate_parameters: re.search of --trainable_parameters_regex, run through the script
    fake = tmp_path / "swift-bin"
    fake.mkdir(exist_ok=True)
    (fake / "swift").write_text("#!/bin/sh\nprintf '%s\\n' \"$@\"\n")
    (fake / "swift").chmod(0o755)
    argv = subprocess.run(
        [shutil.which("bash"), str(out / "swift.full.sh")],
        env={"PATH": str(fake), "TUNER_FLAG": "--tuner_type", "MODEL": "m"},
        check=True,
        capture_output=True,
        text=True,
    ).stdout.splitlines()
    regex = argv[argv.index("--trainable_parameters_regex") + 1]
    trained["swift.full.sh"] = {p for p in params if re.search(regex, p)}
    # LLaMA-Factory model/adapter.py _setup_freeze_tuning, the non-block part: extra modules must be the
    # second-to-last part of a parameter name outside the blocks, then a substring of the trained names
    lf = yaml.safe_load((out / "llamafactory.freeze.yaml").read_text())
    non_hidden = {n.split(".")[-2] for n in params if re.search(r"\.\d+\.", n) is None}
    extra = [m.strip() for m in str(lf.get("freeze_extra_modules", "")).split(",") if m.strip()]
    for module in extra:
        if module not in non_hidden:
            raise ValueError(f"Module {module} is not found, please choose from {', '.join(non_hidden)}")
    n, num_layers = lf["freeze_trainable_layers"], model.config.num_hidden_layers
    ids = range(max(0, num_layers - n), num_layers) if n > 0 else range(min(-n, num_layers))
    entries = [f".{i}.{m}" for m in lf["freeze_trainable_modules"].split(",") for i in ids] + extra
    trained["llamafactory.freeze.yaml"] = {p for p in params if any(e in p for e in entries)}
    trained["parameters.txt"] = set((out / "parameters.txt").read_text().splitlines()) & set(params)
    return trained


NAMED = ("axolotl.full.yaml", "swift.full.sh", "llamafactory.freeze.yaml", "parameters.txt")


def _ranking_with_head(model):
    """A ranking of every layer of ``model``, lm_head included, with the model's recorded identity."""
    layers = adaptable_layers(model, include_lm_head=True)
    return Ranking(
        scores={x.name: float(i) for i, x in enumerate(layers)},
        layers=layers,
        base_model=model_identity(model, "tiny"),
        include_lm_head=True,
    )


def test_tied_lm_head_is_trained_through_the_embedding_weight(tmp_path):
    """A tied lm_head has no parameter name of its own: every parameter-name file must train it through the
    input embedding's weight, and say that this trains the input embeddings too."""
    model = make_model()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ranking = _ranking_with_head(model)
    assert ranking.base_model["tie_word_embeddings"] is True
    names = ["lm_head", "model.layers.2.mlp.up_proj"]
    summary = export_selection(ranking, names, tmp_path / "o")
    trained = _trained_by_name(tmp_path / "o", model, tmp_path)
    tensors = dict(model.named_parameters())
    for file in NAMED:
        entry = summary["formats"][file]
        assert any(tensors[p] is model.lm_head.weight for p in trained[file]), f"{file} leaves lm_head out"
        assert "model.embed_tokens.weight" in trained[file]  # one tensor: the input embeddings train too
        assert entry["status"] == "approximate", file
        assert "superset" in entry["reason"] and "input embeddings" in entry["reason"], file
    exact_names = {"model.embed_tokens.weight", "model.layers.2.mlp.up_proj.weight"}
    for file in ("axolotl.full.yaml", "swift.full.sh", "parameters.txt"):
        assert trained[file] == exact_names, file
    assert set((tmp_path / "o" / "parameters.txt").read_text().splitlines()) == exact_names
    # LoRA puts separate factors on the lm_head module: exact, whatever the tie
    assert summary["formats"]["adapter_config.json"]["status"] == "exact"
    assert summary["formats"]["swift.sh"]["status"] == "exact"


def test_untied_lm_head_is_named_as_itself(tmp_path):
    model = _untied_model()
    ranking = _ranking_with_head(model)
    assert ranking.base_model["tie_word_embeddings"] is False
    names = ["lm_head", "model.layers.2.mlp.up_proj"]
    summary = export_selection(ranking, names, tmp_path / "o")
    trained = _trained_by_name(tmp_path / "o", model, tmp_path)
    for file in ("axolotl.full.yaml", "swift.full.sh", "parameters.txt"):
        assert trained[file] == {"lm_head.weight", "model.layers.2.mlp.up_proj.weight"}, file
        assert summary["formats"][file]["status"] == "exact", file
    assert "lm_head.weight" in trained["llamafactory.freeze.yaml"]
    assert "model.embed_tokens.weight" not in trained["llamafactory.freeze.yaml"]
    assert not summary["notes"]


def test_unrecorded_tie_does_not_claim_lm_head(tmp_path):
    """A ranking written before the tie was recorded: the files name lm_head.weight, which a tied model does
    not list, so no parameter-name file may claim to train the selection."""
    model = make_model()
    layers = adaptable_layers(model, include_lm_head=True)
    old = {
        k: v
        for k, v in model_identity(model, "tiny").items()
        if k not in ("tie_word_embeddings", "input_embedding_weight", "output_embedding_weight")
    }
    ranking = Ranking(
        scores={x.name: float(i) for i, x in enumerate(layers)},
        layers=layers,
        base_model=old,
        include_lm_head=True,
    )
    summary = export_selection(ranking, ["lm_head", "model.layers.2.mlp.up_proj"], tmp_path / "o")
    for file in NAMED:
        entry = summary["formats"][file]
        assert entry["status"] == "none" and "may miss lm_head" in entry["reason"], file
    with pytest.raises(ValueError, match="Module lm_head is not found"):
        _trained_by_name(tmp_path / "o", model, tmp_path)  # LLaMA-Factory refuses the freeze file
    # and on the tied model the other files indeed leave the head out
    (tmp_path / "o" / "llamafactory.freeze.yaml").write_text(
        "freeze_trainable_layers: 1\nfreeze_trainable_modules: mlp\n"
    )
    trained = _trained_by_name(tmp_path / "o", model, tmp_path)
    for file in ("axolotl.full.yaml", "swift.full.sh", "parameters.txt"):
        assert "model.embed_tokens.weight" not in trained[file], file
    assert summary["formats"]["adapter_config.json"]["status"] == "exact"


def test_errors_name_the_problem(tmp_path):
    ranking = _ranking()
    with pytest.raises(RankingError, match="empty"):
        export_selection(ranking, [], tmp_path / "x")
    with pytest.raises(RankingError, match="did you mean 'model.layers.0.self_attn.q_proj'"):
        export_selection(ranking, ["model.layers.0.self_attn.q_prj"], tmp_path / "x")
    with pytest.raises(RankingError, match=r"\(0, 1\]"):
        export_selection(ranking, ranking.top(0.5), tmp_path / "x", mode="top", fraction=1.5)
    for mode, fraction in (("top", 0.0), ("top", 1.5), ("drop_bottom", 1.0), ("drop_bottom", -0.1)):
        with pytest.raises(RankingError, match="fraction"):
            select_layers(ranking, mode, fraction)
    with pytest.raises(RankingError, match="did you mean 'model.layers.3.mlp.down_proj'"):
        select_layers(ranking, "list", layers=["model.layers.3.mlp.down_proj", "model.layer.3.mlp.down_proj"])
    with pytest.raises(IlaError, match="rank"):
        export_selection(ranking, ranking.top(0.5), tmp_path / "x", r=0)
    assert not (tmp_path / "x").exists()  # nothing written for a refused selection


def test_dry_run_counts_match_peft():
    ranking = _ranking()
    names = select_layers(ranking, "top", 0.25)
    model = make_model()
    before = {n: (p.requires_grad, p.shape) for n, p in model.named_parameters()}
    result = dry_run(ranking, names, model, "lora", 4)

    expected = _peft_on_tiny(peft.LoraConfig(r=4, target_modules=names)).get_nb_trainable_parameters()
    assert (result["selection"]["trainable"], result["selection"]["total"]) == expected
    everything = [x.name for x in ranking.layers]
    expected_all = _peft_on_tiny(
        peft.LoraConfig(r=4, target_modules=everything)
    ).get_nb_trainable_parameters()
    assert (result["all_layers"]["trainable"], result["all_layers"]["total"]) == expected_all
    assert result["selection"]["percent"] == pytest.approx(100 * expected[0] / expected[1])
    # the model comes back as it was: no LoRA modules left, the same trainable flags
    assert {n: (p.requires_grad, p.shape) for n, p in model.named_parameters()} == before
    assert not any("lora_" in n for n, _ in model.named_modules())

    assert result["num_selected"] == 7 and result["num_blocks"] == 4
    assert sum(b["num_selected"] for b in result["blocks"]) == 7
    assert sum(b["num_layers"] for b in result["blocks"]) == 28
    assert sum(c["selected"] for c in result["per_module_type"].values()) == 7
    assert [len(b["selected"]) for b in result["blocks"]] == [b["num_selected"] for b in result["blocks"]]

    full = dry_run(ranking, names, model, "full")
    modules = dict(model.named_modules())
    assert full["selection"]["trainable"] == sum(modules[n].weight.numel() for n in names)
    assert full["selection"]["total"] == sum(p.numel() for p in model.parameters())


def test_dry_run_refuses_bad_names_and_other_models():
    ranking = _ranking()
    with pytest.raises(RankingError, match="did you mean"):
        dry_run(ranking, ["model.layers.1.mlp.gate"], make_model(), "lora", 4)
    deeper = _ranking(num_blocks=6)
    with pytest.raises(RankingError, match="another model"):
        dry_run(deeper, deeper.top(0.25), make_model(num_blocks=4), "lora", 4)


@pytest.fixture
def ranking_file(tmp_path, tiny_model_dir):
    ranking = _ranking(name=str(tiny_model_dir))
    return ranking.save(tmp_path / "run" / "ranking.json"), ranking


def test_cli_export_select_and_dry_run(ranking_file, capsys):
    path, ranking = ranking_file
    assert main(["export", str(path), "--top", "0.25", "--r", "4"]) == 0
    out = capsys.readouterr().out
    folder = path.parent / "export-top-0.25"
    assert str(folder) in out and "adapter_config.json" in out and "exact" in out and "approximate" in out
    cfg = peft.LoraConfig.from_pretrained(folder)
    assert cfg.r == 4 and set(cfg.target_modules) == set(ranking.top(0.25))
    assert json.loads((folder / "selection.json").read_text())["ranking"] == str(path)

    assert main(["select", str(path), "--drop-bottom", "0.5"]) == 0
    assert capsys.readouterr().out.splitlines() == ranking.drop_bottom(0.5)

    assert main(["select", str(path), "--top", "0.25", "--dry-run", "--r", "4"]) == 0
    out = capsys.readouterr().out
    expected = dry_run(ranking, ranking.top(0.25), make_model(), "lora", 4)["selection"]["trainable"]
    assert f"{expected:,}" in out and "q_proj" in out and "all layers" in out
    args = ["select", str(path), "--layers", "model.layers.1.mlp.up_proj", "--dry-run", "--method", "full"]
    assert main(args) == 0
    assert "full fine-tuning" in capsys.readouterr().out


def test_cli_errors_exit_2(ranking_file, capsys, tmp_path, tiny_model_dir):
    path, _ = ranking_file
    assert main(["select", str(path), "--layers", "model.layers.1.mlp.up_prj"]) == 2
    assert "did you mean 'model.layers.1.mlp.up_proj'" in capsys.readouterr().err
    assert main(["export", str(path), "--top", "1.5", "--out", str(tmp_path / "e")]) == 2
    assert "fraction" in capsys.readouterr().err and not (tmp_path / "e").exists()
    other_path = _ranking(num_blocks=6, name="elsewhere").save(tmp_path / "other.json")
    assert main(["select", str(other_path), "--top", "0.5", "--dry-run", "--model", str(tiny_model_dir)]) == 2
    assert "another model" in capsys.readouterr().err
    assert main(["select", str(tmp_path / "missing.json"), "--top", "0.5"]) == 2
    assert "does not exist" in capsys.readouterr().err
