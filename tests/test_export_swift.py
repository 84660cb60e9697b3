"""The ms-swift scripts pass the tuner flag that the installed ms-swift accepts.

ms-swift is not installed here (it brings its own torch, transformers and trl). The scripts run under bash
with only stand-ins on PATH: a ``swift`` that records the arguments it receives, and a ``python`` that is
either the real interpreter, finding a stand-in ``ms-swift`` distribution (its metadata only) on
PYTHONPATH, so that the script's version check runs as on a real install, or a stub. What each install
receives is checked against the flags that version's argument dataclasses define (anything else is left over
and ``parse_args`` raises ``ValueError: remaining_argv``): 3.12.6 ``train_type`` only
(``swift/llm/argument/base_args/base_args.py``); 4.0.x ``tuner_type`` plus the deprecated alias
``train_type`` (``swift/arguments/base_args/base_args.py``); 4.1 and later ``tuner_type`` only.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys

import pytest
from conftest import make_model

from ila.export import export_selection
from ila.layers import adaptable_layers
from ila.models import model_identity
from ila.ranking import Ranking

BASH = shutil.which("bash")
SCRIPTS = {"swift.sh": "lora", "swift.full.sh": "full"}


def _accepted(version: str) -> set[str]:
    """The tuner flags ms-swift ``version`` defines (see the module docstring)."""
    major, minor = (int(x) for x in version.split(".")[:2])
    if major == 3:
        return {"--train_type"}
    if (major, minor) == (4, 0):
        return {"--train_type", "--tuner_type"}
    return {"--tuner_type"}


def _export(tmp_path, name="/models/tiny"):
    model = make_model()
    layers = adaptable_layers(model)
    ranking = Ranking(
        scores={x.name: float(i % 5) for i, x in enumerate(layers)},
        layers=layers,
        base_model=model_identity(model, name),
        include_lm_head=False,
    )
    out = tmp_path / "export"
    export_selection(ranking, ranking.top(0.25), out, mode="top", fraction=0.25)
    return out


def _stub(path, body):
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)


def _bin(tmp_path, **pythons):
    """A PATH folder with the recording ``swift`` and the given ``python``-like stubs (name -> sh body)."""
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    _stub(fake / "swift", 'printf \'%s\\n\' "$@" > "$SWIFT_ARGV"\n')
    for name, body in pythons.items():
        _stub(fake / name, body)
    return fake


def _run(script, fake, tmp_path, *args, **env):
    """Run ``script`` with only ``fake`` on PATH; (returncode, argv swift received or None, stderr)."""
    argv_file = tmp_path / "swift.argv"
    argv_file.unlink(missing_ok=True)
    proc = subprocess.run(
        [BASH, str(script), *args],
        env={"PATH": str(fake), "SWIFT_ARGV": str(argv_file), **env},
        capture_output=True,
        text=True,
    )
    argv = argv_file.read_text().splitlines() if argv_file.exists() else None
    return proc.returncode, argv, proc.stderr


def _tuner_flags(argv):
    return [a for a in argv if a in ("--train_type", "--tuner_type")]


@pytest.mark.parametrize("version", ["3.12.6", "4.0.4", "4.6.0"])
def test_each_ms_swift_gets_a_flag_it_accepts(tmp_path, version):
    out = _export(tmp_path)
    site = tmp_path / "site"
    (site / f"ms_swift-{version}.dist-info").mkdir(parents=True)
    (site / f"ms_swift-{version}.dist-info" / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: ms-swift\nVersion: {version}\n"
    )
    fake = _bin(tmp_path, python=f'exec {shlex.quote(sys.executable)} "$@"\n')
    for script, tuner in SCRIPTS.items():
        rc, argv, err = _run(out / script, fake, tmp_path, "--dataset", "d.jsonl", PYTHONPATH=str(site))
        assert rc == 0, err
        flags = _tuner_flags(argv)
        assert len(flags) == 1 and flags[0] in _accepted(version), (version, argv)
        assert argv[:5] == ["sft", "--model", "/models/tiny", flags[0], tuner]
        assert argv[-2:] == ["--dataset", "d.jsonl"]
        assert not err  # a version was found: no fallback warning


def test_the_flag_is_the_only_difference_between_installs(tmp_path):
    out = _export(tmp_path)
    received = {}
    for version in ("3.12.6", "4.6.0"):
        fake = _bin(tmp_path, python=f"echo {version}\n")
        for script in SCRIPTS:
            rc, argv, err = _run(out / script, fake, tmp_path)
            assert rc == 0, err
            received[version, script] = argv
    for script in SCRIPTS:
        old, new = received["3.12.6", script], received["4.6.0", script]
        assert [a for a in old if a != "--train_type"] == [a for a in new if a != "--tuner_type"]
        assert _tuner_flags(old) == ["--train_type"] and _tuner_flags(new) == ["--tuner_type"]


def test_version_check_falls_back_and_can_be_overridden(tmp_path):
    out = _export(tmp_path)
    script = out / "swift.sh"
    calls = tmp_path / "python.argv"

    # no Python with ms-swift: the current release's flag, and a warning that says how to choose
    fake = _bin(tmp_path, python="exit 1\n", python3="exit 1\n")
    rc, argv, err = _run(script, fake, tmp_path)
    assert rc == 0 and _tuner_flags(argv) == ["--tuner_type"]
    assert "TUNER_FLAG=--train_type" in err and "SWIFT_PYTHON" in err

    # `python` lacks ms-swift but `python3` has 3.x
    fake = _bin(tmp_path, python="exit 1\n", python3="echo 3.12.6\n")
    rc, argv, _ = _run(script, fake, tmp_path)
    assert rc == 0 and _tuner_flags(argv) == ["--train_type"]

    # SWIFT_PYTHON names the interpreter, which is asked for the ms-swift distribution's version
    other = tmp_path / "other-python"
    _stub(other, f"printf '%s\\n' \"$@\" > {calls}\necho 3.9.0\n")
    fake = _bin(tmp_path, python="echo 4.6.0\n", python3="echo 4.6.0\n")
    rc, argv, _ = _run(script, fake, tmp_path, SWIFT_PYTHON=str(other))
    assert rc == 0 and _tuner_flags(argv) == ["--train_type"]
    asked = calls.read_text().splitlines()
    assert asked[0] == "-c" and '"ms-swift"' in asked[1]

    # TUNER_FLAG skips the check
    calls.unlink()
    rc, argv, _ = _run(script, fake, tmp_path, SWIFT_PYTHON=str(other), TUNER_FLAG="--tuner_type")
    assert rc == 0 and _tuner_flags(argv) == ["--tuner_type"] and not calls.exists()

    # ms-swift 2.x named it --sft_type: refuse rather than pass a flag it does not know
    fake = _bin(tmp_path, python="echo 2.6.1\n")
    rc, argv, err = _run(script, fake, tmp_path)
    assert rc != 0 and argv is None and "2.6.1" in err


def test_usage_names_the_local_model_arguments(tmp_path):
    out = _export(tmp_path)
    for script in SCRIPTS:
        comment = [line for line in (out / script).read_text().splitlines() if line.startswith("# ")]
        text = " ".join(line[2:].strip() for line in comment)  # unwrapped
        usage = text[text.index("Usage:") :]
        assert f"bash {script} --model_type llama --template chatml --dataset" in usage
        assert "--model_type <ms-swift model type> --template <ms-swift template>" in usage
    # without a model path (the builtin model) the scripts need MODEL and say so
    builtin = _export(tmp_path / "b", name="smollm2")
    fake = _bin(tmp_path, python="echo 4.6.0\n")
    rc, argv, err = _run(builtin / "swift.sh", fake, tmp_path)
    assert rc != 0 and argv is None and "MODEL" in err
    rc, argv, _ = _run(builtin / "swift.sh", fake, tmp_path, MODEL="/cache/smollm2")
    assert rc == 0 and argv[:3] == ["sft", "--model", "/cache/smollm2"]
