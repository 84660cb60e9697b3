"""Bad input gets a clear error and loses nothing: the table of failure cases, and property-based tests
of the parsers that read what users and earlier stages wrote."""

from __future__ import annotations

import json
import os

import pytest
from conftest import TINY_OVERRIDES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_artifacts import full_disk_on, is_file_or_its_temporary

from ila.config import load_config
from ila.errors import ConfigError, IlaError, ModelError, RankingError, TrainingError
from ila.pipeline import prepare_run_dir, stage1, stage2
from ila.ranking import Ranking


@pytest.fixture
def overrides(tiny_model_dir, tiny_data_file):
    return TINY_OVERRIDES(tiny_model_dir, tiny_data_file)


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, overrides):
    cfg = load_config(
        None,
        overrides
        + [
            "stage1.train.learning_rate=1e30",
            "stage1.train.max_grad_norm=0",
            "stage1.train.save_steps=1",
            "stage1.train.warmup_ratio=0",
        ],
    )
    prepare_run_dir(cfg, tmp_path)
    with pytest.raises(TrainingError, match=r"step \d+") as e:
        stage1(cfg, tmp_path)
    assert "checkpoint" in str(e.value)
    assert not (tmp_path / "stage1" / "summary.json").exists()
    assert not (tmp_path / "stage1" / "final").exists()
    checkpoints = list((tmp_path / "stage1" / "checkpoints").glob("checkpoint-*"))
    assert checkpoints, "the last good checkpoint is kept"
    import torch
    from safetensors.torch import load_file

    for ckpt in checkpoints:
        assert all(torch.isfinite(t).all() for t in load_file(ckpt / "adapter_model.safetensors").values())


def test_sequence_length_over_the_model_limit(tmp_path, overrides):
    cfg = load_config(None, overrides + ["data.max_length=4096"])
    with pytest.raises(ConfigError, match="data.max_length.*max_position_embeddings = 512"):
        stage1(cfg, tmp_path)


def test_adapter_of_another_model_is_refused(tmp_path, overrides):
    cfg = load_config(None, overrides)
    prepare_run_dir(cfg, tmp_path / "a")
    stage1(cfg, tmp_path / "a")
    wider = tmp_path / "wider"
    from conftest import make_model
    from tiny import make_tokenizer

    make_model(hidden=96).save_pretrained(wider)
    make_tokenizer().save_pretrained(wider)
    other = load_config(None, overrides + [f"model.name={wider}"])
    with pytest.raises(ModelError, match="hidden_size 64"):
        stage2(other, tmp_path / "a")


def test_incomplete_stage1_adapter_is_refused(tmp_path, overrides):
    cfg = load_config(None, overrides)
    prepare_run_dir(cfg, tmp_path)
    (tmp_path / "stage1" / "final").mkdir(parents=True)
    (tmp_path / "stage1" / "final" / "adapter_config.json").write_text("{}")
    with pytest.raises(ModelError, match="no complete stage-1 adapter"):
        stage2(cfg, tmp_path)


def test_pickled_weights_load_only_when_allowed(tmp_path):
    import torch
    from conftest import make_model

    from ila.config import ModelConfig
    from ila.models import load_base_model

    folder = tmp_path / "pickled"
    model = make_model(num_blocks=1)
    model.save_pretrained(folder)
    for f in folder.glob("*.safetensors"):
        f.unlink()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(ModelError, match="allow_pickle"):
        load_base_model(ModelConfig(name=str(folder)))
    assert load_base_model(ModelConfig(name=str(folder), allow_pickle=True)) is not None


def test_a_run_writes_only_inside_its_run_dir(tmp_path, overrides):
    """`ila run` on a local model folder, in a fresh process (libraries read these locations when imported)
    with HOME, the caches and TMPDIR pointed at empty folders: it writes nothing outside its run directory."""
    import subprocess
    import sys

    places = {
        name: tmp_path / name.lower() for name in ("HOME", "XDG_CACHE_HOME", "HF_HOME", "ILA_CACHE", "TMPDIR")
    }
    for folder in places.values():
        folder.mkdir()
    work = tmp_path / "cwd"
    work.mkdir()
    env = {
        k: v
        for k, v in os.environ.items()
        if k
        not in {  # these would take precedence over the ones above
            "HF_HUB_CACHE",
            "HUGGINGFACE_HUB_CACHE",
            "HF_DATASETS_CACHE",
            "HF_ASSETS_CACHE",
            "TRANSFORMERS_CACHE",
            "TORCHINDUCTOR_CACHE_DIR",
            "TRITON_CACHE_DIR",
            "MPLCONFIGDIR",
            "TORCH_HOME",
            "HF_TOKEN_PATH",
        }
    }
    env.update({k: str(v) for k, v in places.items()}, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    command = [sys.executable, "-m", "ila.cli", "run", "--run-dir", "myrun"]
    for o in overrides:
        command += ["--set", o]
    done = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (work / "myrun" / "stage3" / "summary.json").is_file()
    assert os.listdir(work) == ["myrun"]
    # matplotlib (the run report's figures) keeps its own config and font cache, as on any machine that
    # draws with it; nothing else may appear outside the run directory.
    own = {"HOME": (".config", ".config/matplotlib"), "XDG_CACHE_HOME": ("matplotlib",)}
    for name in ("HOME", "XDG_CACHE_HOME", "HF_HOME", "ILA_CACHE"):
        written = sorted(str(p.relative_to(places[name])) for p in places[name].rglob("*"))
        theirs = own.get(name, ())
        written = [w for w in written if not any(w == o or w.startswith(o + "/") for o in theirs)]
        assert not written, f"the run wrote into {name}: {written[:5]}"
    assert (work / "myrun" / "report.md").is_file()
    # torch makes an (empty) torchinductor_<user> folder in TMPDIR; nothing else may be left there
    left = [p for p in places["TMPDIR"].iterdir() if not (p.is_dir() and p.name.startswith("torchinductor_"))]
    assert not left and not [p for p in places["TMPDIR"].rglob("*") if not p.is_dir()], (
        f"left in TMPDIR: {left}"
    )


def test_a_hub_id_that_is_not_cached_offline_is_a_model_error_naming_it():
    import huggingface_hub.constants

    from ila.config import ModelConfig
    from ila.models import load_base_model, load_tokenizer

    assert (
        huggingface_hub.constants.HF_HUB_OFFLINE
    )  # set by conftest before any import: the Hub is never reached
    cfg = ModelConfig(name="ila-tests/no-such-cached-model")
    for load in (load_tokenizer, load_base_model):
        with pytest.raises(
            ModelError,
            match=r"could not load the (tokenizer|model) 'ila-tests/no-such-cached-model'"
            r".*Pass a local folder",
        ):
            load(cfg)


def test_full_disk_while_writing_the_ranking_leaves_no_file(tmp_path, overrides, monkeypatch):
    import errno

    from ila.artifacts import read_json

    cfg = load_config(None, overrides + ["stage2.scorer=random"])
    prepare_run_dir(cfg, tmp_path)
    config_before = (tmp_path / "config.yaml").read_text()
    folder = tmp_path / "stage2"
    attempts = full_disk_on(
        monkeypatch, lambda p: is_file_or_its_temporary(p, "stage2", "ranking-random.json")
    )
    with pytest.raises(OSError) as e:
        stage2(cfg, tmp_path)
    assert e.value.errno == errno.ENOSPC and "No space left on device" in str(e.value)
    assert len(attempts) == 1, "the ranking write was never attempted"
    # No partial ranking, no temporary file, no summary; what was written before the ranking is intact.
    assert sorted(p.name for p in folder.iterdir()) == ["started.json"]
    assert read_json(folder / "started.json", "marker")["stage"] == "stage2"
    assert (tmp_path / "config.yaml").read_text() == config_before

    monkeypatch.undo()  # space again: the same stage completes
    stage2(cfg, tmp_path)
    assert Ranking.load(folder / "ranking-random.json").scorer == "random"


# --- property-based: the parsers never fail with anything but their own clear error ---------------------

_keys = st.sampled_from(
    [
        "seed",
        "model.name",
        "model.dtype",
        "data.max_length",
        "data.heldout_fraction",
        "lora.r",
        "lora.include_lm_head",
        "stage1.milestones",
        "stage2.learning_rate",
        "stage2.optimizer",
        "stage3.selection.mode",
        "stage3.selection.fraction",
        "stage3.selection.layers",
        "nope",
        "stage1.train.precision",
        "stage2",
    ]
)
_values = st.one_of(
    st.integers(-5, 5000),
    st.floats(allow_nan=True),
    st.booleans(),
    st.none(),
    st.text(max_size=12),
    st.lists(st.floats(0, 1.5), max_size=4),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(_keys, _values), max_size=4))
def test_config_overrides_fail_only_with_config_errors(pairs):
    overrides = [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in pairs]
    try:
        cfg = load_config(None, overrides)
    except ConfigError as e:
        assert str(e)  # a message, naming what was wrong
    else:
        cfg.validate()


def _ranking_dict():
    from ila.layers import Layer

    layers = [Layer(f"model.layers.{b}.mlp.up_proj", f"model.layers.{b}", b, "mlp.up_proj") for b in range(3)]
    r = Ranking(
        scores={layer.name: float(i) for i, layer in enumerate(layers)},
        layers=layers,
        base_model={"name": "t"},
        include_lm_head=False,
    )
    return r.to_dict()


_json = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=5)),
    lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(st.text(max_size=5), c, max_size=3)),
    max_leaves=6,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.sampled_from(
        [
            "schema_version",
            "kind",
            "layers",
            "base_model",
            "include_lm_head",
            "num_layers",
            "order",
            "scorer",
            "meta",
        ]
    ),
    _json,
)
def test_ranking_reader_fails_only_with_ranking_errors(tmp_path, key, value):
    data = _ranking_dict()
    data[key] = value
    path = tmp_path / "r.json"
    path.write_text(json.dumps(data))
    try:
        Ranking.load(path)
    except RankingError as e:
        assert str(e)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=200))
def test_ranking_reader_survives_garbage_bytes(tmp_path, blob):
    path = tmp_path / "r.json"
    path.write_bytes(blob)
    with pytest.raises(IlaError):
        Ranking.load(path)


def test_interrupted_stage_is_not_resumed_under_another_config(tmp_path, overrides):
    cfg = load_config(None, overrides)
    prepare_run_dir(cfg, tmp_path)
    folder = tmp_path / "stage1"
    (folder / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    (folder / "started.json").write_text(json.dumps({"stage": "stage1", "stage_sha256": "other"}))
    with pytest.raises(ConfigError, match="interrupted stage1 made with a different config"):
        stage1(cfg, tmp_path)


def test_unreadable_model_folder(tmp_path):
    from ila.config import ModelConfig
    from ila.models import load_base_model

    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "config.json").write_text("{ not json")
    with pytest.raises(ModelError, match="could not load the model"):
        load_base_model(ModelConfig(name=str(folder)))


def test_remote_code_is_never_enabled_silently(tiny_model_dir, monkeypatch):
    import transformers

    from ila.config import ModelConfig
    from ila.models import load_base_model

    seen = {}
    real = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    load_base_model(ModelConfig(name=str(tiny_model_dir)))
    assert seen["trust_remote_code"] is False and seen["use_safetensors"] is True
