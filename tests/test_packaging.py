"""The package works from a plain (non-editable) install: builtin configs by name, from any folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from ila.config import BUILTIN_CONFIGS, builtin_config_names, load_config, resolve_config
from ila.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def test_builtin_configs_resolve_by_name_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert {"smollm2", "study", "llama2-7b-gpu"} <= set(builtin_config_names())
    for spec in ("smollm2", "smollm2.yaml", "configs/smollm2.yaml"):
        assert resolve_config(spec) == BUILTIN_CONFIGS / "smollm2.yaml"
    assert load_config("smollm2").model.name == "smollm2"
    with pytest.raises(ConfigError, match="builtin configs, usable by name: .*smollm2"):
        load_config("smollm3")


def test_a_file_wins_over_a_builtin_of_the_same_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "smollm2.yaml").write_text("seed: 7\n")
    assert load_config("smollm2.yaml").seed == 7
    assert load_config("smollm2").seed == 0  # a bare name is the builtin


def test_the_clone_configs_folder_is_the_packaged_one():
    assert (ROOT / "configs").resolve() == BUILTIN_CONFIGS.resolve()


def test_a_plain_install_runs_builtin_configs_by_name(tmp_path):
    """Install ila non-editable into a fresh virtual environment (its dependencies are lent from this one
    through a .pth file, so nothing is downloaded) and run ``ila config --config smollm2`` from a folder
    that is not the clone."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    build = ["--no-build-isolation"]
    try:
        import setuptools

        if int(setuptools.__version__.split(".")[0]) < 77:
            build = []
    except ImportError:
        build = []
    # The wheel is built here (setuptools is in this environment) and installed there as a user would.
    # Without PYTHONPATH: pip would see the clone's src/ on it and skip the install as already satisfied.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    pip_env = {**env, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    wheels = tmp_path / "wheels"
    pip = [sys.executable, "-m", "pip"]
    # From a copy of the sources: an in-tree build would reuse (and leave) a build/ folder.
    source = tmp_path / "source"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "dist")
    shutil.copytree(ROOT / "src", source / "src", ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run(
        [*pip, "wheel", "-q", "--no-deps", *build, "-w", str(wheels), str(source)], check=True, env=pip_env
    )
    (wheel,) = wheels.glob("ila-*.whl")
    subprocess.run(
        [*pip, "--python", str(python), "install", "-q", "--no-deps", str(wheel)], check=True, env=pip_env
    )
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (Path(site) / "lent-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    work = tmp_path / "elsewhere"
    work.mkdir()
    probe = subprocess.run(
        [str(python), "-c", "import ila; print(ila.__file__)"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
    )
    assert probe.returncode == 0, probe.stderr
    assert Path(probe.stdout.strip()).is_relative_to(venv), "the installed copy, not the clone, must run"
    out = subprocess.run(
        [str(python), "-m", "ila.cli", "config", "--config", "smollm2", "--set", "stage2.steps=3"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert "steps: 3" in out.stdout and "name: smollm2" in out.stdout
    study = subprocess.run(
        [str(python), "-c", "from ila.study import load_study; print(load_study('study').base)"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
    )
    assert study.returncode == 0, study.stderr
    assert Path(study.stdout.strip()).is_relative_to(venv)
