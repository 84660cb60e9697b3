"""Strict config loading: unknown keys and bad values are errors that name the dotted key."""

from __future__ import annotations

from pathlib import Path

import pytest

from ila.config import RunConfig, load_config
from ila.errors import ConfigError

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_defaults_are_valid():
    cfg = load_config()
    assert isinstance(cfg, RunConfig)
    assert (
        cfg.stage2.optimizer == "sgd"
        and cfg.stage2.budget_lambda == 0.0
        and cfg.stage2.budget_fraction == 0.5
    )
    assert cfg.stage1.milestones == [0.25, 0.5, 0.75, 1.0]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    if path.name.startswith("study"):  # a study config names run configs; it is not one itself
        from ila.study import load_study, planned_runs

        assert planned_runs(load_study(path))
    else:
        load_config(path)


def test_overrides_are_typed():
    cfg = load_config(
        None,
        [
            "stage2.learning_rate=0.1",
            "lora.include_lm_head=true",
            "data.max_examples=null",
            "stage1.milestones=[0.5, 1.0]",
            "stage2.milestone=50",
        ],
    )
    assert cfg.stage2.learning_rate == 0.1 and cfg.lora.include_lm_head is True
    assert cfg.data.max_examples is None and cfg.stage1.milestones == [0.5, 1.0]
    assert cfg.stage2.milestone == "50"


@pytest.mark.parametrize(
    "override, key",
    [
        ("stage2.learnig_rate=0.1", "stage2.learnig_rate"),
        ("nonsense=1", "nonsense"),
        ("stage3.selection.fraction=1.5", "stage3.selection.fraction"),
        ("stage1.train.max_steps=0", "stage1.train.max_steps"),
        ("stage1.train.max_steps=ten", "stage1.train.max_steps"),
        ("lora.r=2.5", "lora.r"),
        ("data.format=csv", "data.format"),
        ("stage1.milestones=[0.5, 0.25]", "stage1.milestones"),
        ("stage2.optimizer=lion", "stage2.optimizer"),
        ("lora.include_lm_head=maybe", "lora.include_lm_head"),
        ("stage2.budget_fraction=.nan", "stage2.budget_fraction"),
        ("stage3.selection.layers=[a]", "stage3.selection.layers"),
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert str(e.value).startswith(key)


def test_contradictions_are_errors():
    with pytest.raises(ConfigError, match="fp16"):
        load_config(None, ["model.device=cpu", "stage1.train.precision=fp16"])
    with pytest.raises(ConfigError, match="stage3.selection.layers"):
        load_config(None, ["stage3.selection.mode=list"])


def test_yaml_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("stage1: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("stage2:\n  steps: 3\n  stpes: 4\n")
    with pytest.raises(ConfigError, match="stage2.stpes: unknown key"):
        load_config(unknown)
    # yaml.safe_load: no Python objects from a config file
    evil = tmp_path / "evil.yaml"
    evil.write_text("seed: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError):
        load_config(evil)


@pytest.mark.parametrize(
    "text, message", [("runs: [unclosed\n", "not valid YAML"), ("- a\n- b\n", "a mapping")]
)
def test_a_bad_study_file_is_a_config_error(tmp_path, text, message):
    """A study config is read as strictly as a run config: a clear error, not a YAML traceback."""
    from ila.study import load_study

    bad = tmp_path / "study.yaml"
    bad.write_text(text)
    with pytest.raises(ConfigError, match=f"study config .*{message}"):
        load_study(bad)


def test_config_hash_tracks_content():
    a, b = load_config(), load_config(None, ["stage2.steps=7"])
    assert a.sha256() == load_config().sha256() and a.sha256() != b.sha256()


def test_exponent_without_dot_is_a_number(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("stage1:\n  train:\n    learning_rate: 2e-4\n")
    assert load_config(path).stage1.train.learning_rate == 2e-4
    with pytest.raises(ConfigError, match="stage2.learning_rate: must be finite"):
        load_config(None, ["stage2.learning_rate=inf"])


def test_a_plain_sgd_learning_rate_with_the_normalised_step_is_refused():
    with pytest.raises(ConfigError, match="stage2.learning_rate.*normalise_step"):
        load_config(None, ["stage2.learning_rate=100"])
    assert (
        load_config(None, ["stage2.learning_rate=100", "stage2.normalise_step=false"]).stage2.learning_rate
        == 100
    )
    assert load_config(None, ["stage2.learning_rate=100", "stage2.optimizer=adam"]).stage2.optimizer == "adam"
