"""Atomic writes: an interrupted write never leaves a file or folder that looks complete."""

from __future__ import annotations

import json

import pytest

from ila.artifacts import append_jsonl, atomic_dir, read_json, write_json_atomic
from ila.errors import IlaError


def test_json_is_strict(tmp_path):
    with pytest.raises(IlaError, match="non-finite"):
        write_json_atomic(tmp_path / "x.json", {"a": [1.0, float("inf")]})
    assert not (tmp_path / "x.json").exists()
    write_json_atomic(tmp_path / "x.json", {"a": 1.5})
    assert read_json(tmp_path / "x.json") == {"a": 1.5}
    (tmp_path / "nan.json").write_text('{"a": NaN}')
    with pytest.raises(IlaError, match="NaN"):
        read_json(tmp_path / "nan.json")


def test_interrupted_folder_write_leaves_old_folder(tmp_path):
    target = tmp_path / "adapter"
    with atomic_dir(target) as tmp:
        (tmp / "weights").write_text("v1")
    with pytest.raises(KeyboardInterrupt), atomic_dir(target) as tmp:
        (tmp / "weights").write_text("half")
        raise KeyboardInterrupt
    assert (target / "weights").read_text() == "v1"
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]
    with atomic_dir(target) as tmp:
        (tmp / "weights").write_text("v2")
    assert (target / "weights").read_text() == "v2"
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_interrupted_file_write_leaves_no_file(tmp_path, monkeypatch):
    import ila.artifacts as artifacts

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(artifacts.os, "fsync", boom)
    with pytest.raises(OSError, match="No space"):
        write_json_atomic(tmp_path / "r.json", {"a": 1})
    assert list(tmp_path.iterdir()) == []


def test_jsonl_metrics_stay_strict(tmp_path):
    append_jsonl(tmp_path / "m.jsonl", {"loss": float("nan"), "step": 1})
    assert json.loads((tmp_path / "m.jsonl").read_text()) == {"loss": None, "step": 1}
