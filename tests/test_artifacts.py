"""Atomic writes: an interrupted write never leaves a file or folder that looks complete."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

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


def full_disk_on(monkeypatch, is_target):
    """Make every write to a file that ``is_target(path)`` accepts run out of space half-way: the first half
    of the data reaches the disk, then ``OSError(ENOSPC)``. Other files are written as usual. This catches
    plain ``open`` / ``Path.write_text`` writes as well as ``os.fdopen`` on a temporary file (found by its
    descriptor). Returns the paths whose write failed, in order."""
    import builtins
    import io

    real_open = io.open
    attempts: list[str] = []

    class Full:
        def __init__(self, f):
            self._f = f

        def write(self, data):
            self._f.write(data[: len(data) // 2])
            self._f.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._f.close()

        def __getattr__(self, name):
            return getattr(self._f, name)

    def open_(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        if any(c in mode for c in "wax+"):
            path = os.readlink(f"/proc/self/fd/{file}") if isinstance(file, int) else os.fspath(file)
            if is_target(Path(path)):
                attempts.append(str(path))
                return Full(f)
        return f

    monkeypatch.setattr(io, "open", open_)
    monkeypatch.setattr(builtins, "open", open_)
    return attempts


def full_disk_in_safetensors(monkeypatch, is_target):
    """The same for safetensors weight files (written by Rust, not through ``open``), as peft's
    ``save_pretrained`` and ``safetensors.torch.save_file`` write them: half the bytes, then ``ENOSPC``."""
    import peft.peft_model
    import safetensors.torch

    real = safetensors.torch.save_file
    attempts: list[str] = []

    def save_file(tensors, filename, metadata=None):
        if not is_target(Path(filename)):
            return real(tensors, filename, metadata=metadata)
        attempts.append(str(filename))
        data = safetensors.torch.save(tensors, metadata=metadata)
        fd = os.open(filename, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)  # not through a patched open
        os.write(fd, data[: len(data) // 2])
        os.close(fd)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    monkeypatch.setattr(peft.peft_model, "safe_save_file", save_file)
    return attempts


def is_file_or_its_temporary(path: Path, folder: str, name: str) -> bool:
    """``folder/name`` or a temporary sibling of it (``.name.*``), as ``write_text_atomic`` makes."""
    return path.parent.name == folder and (path.name == name or path.name.startswith(f".{name}."))


def test_full_disk_while_writing_a_file_keeps_the_old_one(tmp_path, monkeypatch):
    write_json_atomic(tmp_path / "r.json", {"a": 1})
    write_json_atomic(tmp_path / "other.json", {"b": 1})
    attempts = full_disk_on(monkeypatch, lambda p: is_file_or_its_temporary(p, tmp_path.name, "r.json"))
    write_json_atomic(tmp_path / "other.json", {"b": 2})  # only r.json runs out of space
    with pytest.raises(OSError, match="No space left on device") as e:
        write_json_atomic(tmp_path / "r.json", {"a": 2, "pad": "x" * 100})
    assert e.value.errno == errno.ENOSPC and len(attempts) == 1
    monkeypatch.undo()
    assert read_json(tmp_path / "r.json") == {"a": 1}  # the old file, whole
    assert read_json(tmp_path / "other.json") == {"b": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.json", "r.json"]  # no temporary file left


def test_full_disk_while_writing_an_adapter_folder_keeps_the_old_one(tmp_path, monkeypatch):
    """save_adapter (stage-1 milestones and final, stage-3 adapter): the weights run out of space half-way. An
    earlier adapter in that folder stays whole, a new folder never appears, no temporary sibling is left."""
    import torch
    from conftest import make_model

    from ila.adapters import ADAPTER_META, AdapterMeta, save_adapter
    from ila.config import LoraConfig
    from ila.models import attach_lora

    model = attach_lora(make_model(num_blocks=1), ["model.layers.0.mlp.down_proj"], LoraConfig(r=2))
    target = tmp_path / "adapter"
    save_adapter(
        model, target, AdapterMeta(kind="ila.stage1_adapter", layers=["model.layers.0.mlp.down_proj"], step=1)
    )
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", ADAPTER_META} <= before.keys()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1.0)  # another update, so a partial overwrite would show

    # the folders adapter/ and fresh/, or their temporary siblings (.adapter.*.tmp)
    attempts = full_disk_in_safetensors(
        monkeypatch, lambda p: p.parent.name.lstrip(".").split(".")[0] in ("adapter", "fresh")
    )
    save_adapter(
        model,
        tmp_path / "other",
        AdapterMeta(kind="ila.stage1_adapter", layers=["model.layers.0.mlp.down_proj"], step=2),
    )  # other folders: written as usual
    for folder in (target, tmp_path / "fresh"):
        with pytest.raises(OSError, match="No space left on device") as e:
            save_adapter(
                model,
                folder,
                AdapterMeta(kind="ila.stage1_adapter", layers=["model.layers.0.mlp.down_proj"], step=2),
            )
        assert e.value.errno == errno.ENOSPC
    assert len(attempts) == 2, "the adapter weights were never written"
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "other"]  # no fresh/, no .tmp, no .old


def test_jsonl_metrics_stay_strict(tmp_path):
    append_jsonl(tmp_path / "m.jsonl", {"loss": float("nan"), "step": 1})
    assert json.loads((tmp_path / "m.jsonl").read_text()) == {"loss": None, "step": 1}
